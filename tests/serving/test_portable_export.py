"""Tests of cxr-export --format/--quantize (serving/portable_export.py, quantization_guard.py): every format
scores the tiny model's pixels as Keras does and carries its contract; the guard refuses a broken quantization."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cxr_tfdata.files import output_safety
from cxr_tfdata.modeling import contract, loading
from cxr_tfdata.modeling import portable_formats as pf
from cxr_tfdata.serving import export, portable_export, quantization_guard
from tests import eval_fixtures
from tests.evaluation import recalibrate_inputs

LOOSE = {"max_auc_drop": 1.0, "max_label_flips": 1.0}
# name -> (format, quantize, guard, probability tolerance against Keras)
EXPORTS = {
    "saved_model": ("saved_model", "none", {}, 1e-5),
    "onnx": ("onnx", "none", {}, 1e-5),
    "openvino": ("openvino", "none", {}, 1e-2),  # bfloat16 compute where the CPU has it
    "tflite": ("tflite", "none", {}, 1e-5),
    # The guard's own behaviour has tests of its own below; here a conversion must round-trip. On 20 val
    # images of a near-chance tiny model one swapped pair moves ROC-AUC by 0.007, past the default limit.
    "openvino_float16": ("openvino", "float16", LOOSE, 1e-2),
    "tflite_float16": ("tflite", "float16", LOOSE, 1e-2),
    "tflite_int8": ("tflite", "int8", LOOSE, None),
    "onnx_int8": ("onnx", "int8", LOOSE, None),
    "openvino_int8": ("openvino", "int8", LOOSE, None),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    setup = eval_fixtures.get_tiny_setup(tmp_path_factory)
    root = tmp_path_factory.mktemp("portable")
    model_path = recalibrate_inputs.model_with_contract(setup, root / "model.keras")
    for name, (fmt, quantize, guard, _) in EXPORTS.items():
        export.export(export.ExportConfig(model_path=str(model_path), output_dir=str(root / name), format=fmt,
                                          quantize=quantize, data_dir=str(setup.data_dir), calibration_images=16,
                                          **guard))
    model = loading.load_model(str(model_path))
    pixels, _ = next(quantization_guard._batches(str(setup.data_dir), "val", eval_fixtures.IMAGE_SIZE))
    return root, setup, model_path, model, pixels


def _score(folder: str, fmt: str, pixels: np.ndarray) -> np.ndarray:
    """Each file read back as a user would, with its runtime alone."""
    if fmt == "saved_model":
        import tensorflow as tf

        serve = tf.saved_model.load(folder).signatures[pf.SAVED_MODEL_PIXELS_SIGNATURE]
        return serve(**{pf.PIXELS_INPUT: tf.constant(pixels)})[pf.PROBABILITY_OUTPUT].numpy().reshape(-1)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
        return session.run([pf.PROBABILITY_OUTPUT], {pf.PIXELS_INPUT: pixels})[0].reshape(-1)
    if fmt == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(os.path.join(folder, "model.xml"), "CPU")
        return np.asarray(compiled(pixels)[compiled.output(pf.PROBABILITY_OUTPUT)]).reshape(-1)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=os.path.join(folder, "model.tflite"))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(pixels.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, pixels)
    interpreter.invoke()
    output = interpreter.get_output_details()[0]
    assert output["name"] == pf.PROBABILITY_OUTPUT
    return np.array(interpreter.get_tensor(output["index"])).reshape(-1)


def _metadata(folder: str, fmt: str) -> dict[str, dict]:
    """{CONTRACT_KEY: ..., DESCRIPTION_KEY: ...} read from the file's own metadata."""
    if fmt == "saved_model":
        with open(os.path.join(folder, output_safety.EXPORT_MARKER), encoding="utf-8") as f:
            described = json.load(f)
        return {pf.CONTRACT_KEY: described["contract"], pf.DESCRIPTION_KEY: described}
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(os.path.join(folder, "model.onnx")).metadata_props}
    elif fmt == "openvino":
        import openvino as ov

        model = ov.Core().read_model(os.path.join(folder, "model.xml"))
        props = {key: model.get_rt_info([key]).astype(str) for key in (pf.CONTRACT_KEY, pf.DESCRIPTION_KEY)}
    else:
        from ai_edge_litert import schema_py_generated as schema

        with open(os.path.join(folder, "model.tflite"), "rb") as f:
            flat = schema.Model.GetRootAs(bytearray(f.read()), 0)
        entries = {flat.Metadata(i).Name().decode(): flat.Metadata(i).Buffer() for i in range(flat.MetadataLength())}
        props = {key: flat.Buffers(entries[key]).DataAsNumpy().tobytes().decode() for key in
                 (pf.CONTRACT_KEY, pf.DESCRIPTION_KEY)}
    return {key: json.loads(props[key]) for key in (pf.CONTRACT_KEY, pf.DESCRIPTION_KEY)}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_each_export_scores_as_keras_and_carries_the_contract(exports, name):
    root, _, _, model, pixels = exports
    fmt, quantize, _, tolerance = EXPORTS[name]
    folder = str(root / name)
    assert output_safety.export_problems(folder) == []
    expected = np.asarray(model.predict_on_batch(pixels), np.float64).reshape(-1)
    got = _score(folder, fmt, pixels)
    assert got.shape == expected.shape
    metadata = _metadata(folder, fmt)
    stored = dict(metadata[pf.CONTRACT_KEY])
    quantization = stored.pop(pf.QUANTIZATION_KEY, None)
    assert stored == contract.read(model)
    if fmt == "saved_model":
        assert sorted(os.listdir(folder)) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    else:
        assert sorted(os.listdir(folder)) == sorted([*pf.MODEL_FILES[fmt], pf.DESCRIPTION_FILE])
        with open(os.path.join(folder, pf.DESCRIPTION_FILE), encoding="utf-8") as f:
            assert json.load(f) == metadata[pf.DESCRIPTION_KEY]
        described = metadata[pf.DESCRIPTION_KEY]
        assert (described["format"], described["quantize"]) == (fmt, quantize)
        assert "image_scoring.load_image" in described["input"][pf.PIXELS_INPUT]
        assert described[pf.QUANTIZATION_KEY] == quantization
    if quantize == "none":
        assert quantization is None
        np.testing.assert_allclose(got, expected, atol=tolerance)
        return
    assert quantization["val_images"] == 20 and quantization["calibration_images"] == (16 if quantize == "int8" else 0)
    if tolerance is not None:
        np.testing.assert_allclose(got, expected, atol=tolerance)
    else:  # int8: within its guard, and the recorded figures are the val split's
        assert quantization["auc_drop"] <= LOOSE["max_auc_drop"]
        assert quantization["max_abs_difference"] < 0.5


def test_a_refused_quantization_writes_nothing(exports, tmp_path):
    root, setup, model_path, _, _ = exports
    config = export.ExportConfig(model_path=str(model_path), output_dir=str(tmp_path / "out"), format="tflite",
                                 quantize="float16", data_dir=str(setup.data_dir), max_auc_drop=-1.0)
    with pytest.raises(quantization_guard.QuantizationRefused, match=r"ROC-AUC .* against .*--max_auc_drop=-1"):
        export.export(config)
    assert not os.path.exists(tmp_path / "out")
    assert [e for e in os.listdir(tmp_path) if e.startswith(".out.incomplete")] == []


def test_the_guard_refuses_a_broken_conversion(exports, tmp_path, monkeypatch):
    root, setup, model_path, model, _ = exports
    broken = loading.load_model(str(model_path))
    dense = broken.get_layer("probability")
    kernel, bias = dense.get_weights()
    dense.set_weights([-kernel, bias])  # what a quantizer ruining the head would give
    real = portable_export.convert
    monkeypatch.setattr(portable_export, "convert", lambda m, fmt, q, c=None, w="": real(broken, fmt, "none"))
    config = export.ExportConfig(model_path=str(model_path), output_dir=str(root / "onnx"), overwrite=True,
                                 format="onnx", quantize="int8", data_dir=str(setup.data_dir), calibration_images=4)
    with pytest.raises(quantization_guard.QuantizationRefused, match="flips the label"):
        export.export(config)
    assert pf.QUANTIZATION_KEY not in _metadata(str(root / "onnx"), "onnx")[pf.CONTRACT_KEY]  # left as it was


@pytest.mark.parametrize("values, message", [
    ({"format": "pytorch"}, "--format: must be one of saved_model, onnx, openvino, tflite, got 'pytorch'"),
    ({"format": "onnx", "quantize": "float16", "data_dir": "d"}, "--quantize: float16 is not available with --format=onnx"),
    ({"quantize": "int8", "data_dir": "d"}, "--quantize: int8 is not available with --format=saved_model"),
    ({"format": "tflite", "quantize": "int8"}, "--quantize: int8 needs --data_dir"),
    ({"format": "tflite", "quantize": "bf16"}, "--quantize: must be one of none, float16, int8"),
    ({"calibration_images": 0}, "--calibration_images: must be in"),
    ({"max_label_flips": 2.0}, "--max_label_flips: must be in"),
])
def test_flag_refusals_name_the_flags(values, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as error:
        export.ExportConfig(model_path="m.keras", output_dir="out", **values)
    assert "\n" not in str(error.value)


def test_cli_refusal_is_one_line(exports):
    _, _, model_path, _, _ = exports
    result = eval_fixtures.run_cli("cxr_tfdata.cli.export", f"--model={model_path}", "--output_dir=/tmp/x",
                                   "--format=onnx", "--quantize=float16", "--data_dir=/tmp")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "--quantize" in line]
    assert len(lines) == 1 and "--format=onnx" in lines[0], result.stderr


def test_a_second_export_replaces_only_an_export(exports, tmp_path):
    root, _, model_path, _, _ = exports
    # An export of one format is replaced by one of another: a SavedModel by LiteRT, LiteRT by ONNX.
    target = tmp_path / "served"
    for fmt in ("saved_model", "tflite", "onnx"):
        export.export(export.ExportConfig(model_path=str(model_path), output_dir=str(target), format=fmt,
                                          overwrite=True))
        assert output_safety.export_problems(str(target)) == []
    assert sorted(os.listdir(target)) == sorted([*pf.MODEL_FILES["onnx"], pf.DESCRIPTION_FILE])
    with pytest.raises(FileExistsError, match="--output_dir: .* already exists"):
        export.export(export.ExportConfig(model_path=str(model_path), output_dir=str(target), format="onnx"))
    (target / "notes.txt").write_text("mine")
    with pytest.raises(output_safety.UnsafeOutputError, match="notes.txt"):
        export.export(export.ExportConfig(model_path=str(model_path), output_dir=str(target), format="onnx",
                                          overwrite=True))
    assert (target / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.onnx").write_bytes(b"not ours")
    with pytest.raises(output_safety.UnsafeOutputError, match="is not a SavedModel written by cxr-export"):
        export.export(export.ExportConfig(model_path=str(model_path), output_dir=str(other), format="onnx",
                                          overwrite=True))
    assert output_safety.export_problems(str(root / "saved_model")) == []
