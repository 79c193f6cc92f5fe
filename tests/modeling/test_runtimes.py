"""runtimes.open_model: every format by content, probabilities and contract as the .keras model's, one-line
refusals; and image_scoring's overlapped decoding, row for row the serial one."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

from cxr_tfdata.modeling import contract, feeding, image_scoring, loading, runtimes
from tests import helpers
from tests.modeling import portable_models

FORMATS = ("saved_model", "onnx", "openvino", "tflite")


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    return portable_models.get_portable_set(tmp_path_factory)


@pytest.fixture(scope="module")
def keras_model(portable):
    return loading.load_model(str(portable.keras_path))


def _pixels(n=5, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 1)).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_opens_by_content_with_keras_probabilities_and_contract(portable, keras_model, fmt):
    model = runtimes.open_model(str(portable.files[fmt]))
    assert isinstance(model, runtimes.PortableModel) and model.format == fmt
    assert loading.model_image_size(model, "m") == 32
    assert contract.read(model) == portable.contract == contract.read(keras_model)
    x = _pixels()
    expected = np.asarray(keras_model.predict_on_batch(x), np.float32)
    got = model.predict_on_batch(x)
    assert got.shape == (5, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # uint8 batches (the input pipeline's), other batch sizes and an empty batch
    np.testing.assert_allclose(model.predict_on_batch(x[:2].astype(np.uint8)),
                               keras_model.predict_on_batch(x[:2].astype(np.uint8)), atol=1e-4)
    assert model.predict_on_batch(x[:0]).shape == (0, 1)
    reading = feeding.resolve_reading(model, str(portable.files[fmt]))
    assert (reading.threshold, reading.temperature, reading.logit_shift) == (0.5, 1.5, -0.3)
    assert runtimes.describe(model, str(portable.files[fmt]))["quantization"] == portable_models.QUANTIZATION


def test_keras_opens_as_a_keras_model(portable):
    model = runtimes.open_model(str(portable.keras_path))
    assert runtimes.is_keras(model)
    assert runtimes.describe(model, str(portable.keras_path))["format"] == "keras"


def test_the_content_decides_not_the_extension(portable, tmp_path):
    files = portable.files
    shutil.copy(files["onnx"], tmp_path / "onnx_named.tflite")
    shutil.copy(files["tflite"], tmp_path / "tflite_named.onnx")
    shutil.copy(portable.keras_path, tmp_path / "keras_named.onnx")
    shutil.copy(files["openvino"], tmp_path / "ir_named.keras")
    shutil.copy(files["openvino"].with_suffix(".bin"), tmp_path / "ir_named.bin")
    shutil.copytree(files["saved_model"], tmp_path / "saved.onnx")
    expected = {"onnx_named.tflite": "onnx", "tflite_named.onnx": "tflite", "keras_named.onnx": "keras",
                "ir_named.keras": "openvino", "saved.onnx": "saved_model"}
    for name, fmt in expected.items():
        assert runtimes.detect_format(str(tmp_path / name))[0] == fmt, name
    x = _pixels(3)
    reference = runtimes.open_model(str(files["onnx"])).predict_on_batch(x)
    for name in ("onnx_named.tflite", "tflite_named.onnx", "ir_named.keras"):
        np.testing.assert_allclose(runtimes.open_model(str(tmp_path / name)).predict_on_batch(x), reference, atol=1e-4)


def test_an_export_folder_opens_the_one_model_it_holds(portable, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(portable.files["tflite"], folder / "model.tflite")
    (folder / "cxr_export.json").write_text(json.dumps({"written_by": "cxr-export", "format": "tflite"}))
    model = runtimes.open_model(str(folder))
    assert model.format == "tflite" and model.contract == portable.contract
    assert model.description["written_by"] == "cxr-export"
    shutil.copy(portable.files["onnx"], folder / "model.onnx")
    with pytest.raises(loading.ModelLoadError, match="holds 2 models"):
        runtimes.open_model(str(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(loading.ModelLoadError, match="saved_model.pb"):
        runtimes.open_model(str(empty))


@pytest.mark.parametrize(("fmt", "module"), [("onnx", "onnxruntime"), ("openvino", "openvino"),
                                             ("tflite", "ai_edge_litert.interpreter")])
def test_a_missing_runtime_is_one_line_naming_the_extra(portable, monkeypatch, fmt, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(runtimes.MissingRuntimeError) as raised:
        runtimes.open_model(str(portable.files[fmt]))
    message = str(raised.value)
    assert "\n" not in message and "pip install 'cxr-tfdata[serving]'" in message and str(portable.files[fmt]) in message


def test_a_keras_model_needs_no_serving_runtime(portable, monkeypatch):
    for module in ("onnx", "onnxruntime", "openvino", "ai_edge_litert", "ai_edge_litert.interpreter"):
        monkeypatch.setitem(sys.modules, module, None)
    assert runtimes.is_keras(runtimes.open_model(str(portable.keras_path)))


def test_unusable_files_are_refused_naming_them(portable, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 not a protobuf at all" * 10)
    with pytest.raises(loading.ModelLoadError, match="not a model file"):
        runtimes.open_model(str(junk))
    fifo = tmp_path / "fifo.tflite"
    os.mkfifo(fifo)
    with pytest.raises(loading.ModelLoadError, match="not a regular file"):
        runtimes.open_model(str(fifo))
    lonely = tmp_path / "lonely.xml"
    shutil.copy(portable.files["openvino"], lonely)
    with pytest.raises(loading.ModelLoadError, match="weights file"):
        runtimes.open_model(str(lonely))
    linked = tmp_path / "linked_saved_model"
    shutil.copytree(portable.files["saved_model"], linked)
    os.symlink("/etc/hostname", linked / "assets" / "elsewhere")
    with pytest.raises(loading.ModelLoadError, match="symbolic link"):
        runtimes.open_model(str(linked))
    assert runtimes.companion_files(str(portable.files["openvino"])) == [str(portable.files["openvino"].with_suffix(".bin"))]


def test_overlapped_decoding_gives_the_serial_rows_in_order(keras_model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(11):
        path = folder / f"img_{i:02d}.png"
        if i == 3:
            path.write_bytes(b"not an image")
        elif i == 7:
            path.write_bytes(helpers.encode_png(np.full((40, 40), 128, np.uint8)))
        else:
            path.write_bytes(helpers.encode_png(helpers.labelled_image(i % 2, i, 48)))
        paths.append(str(path))
    paths.insert(5, str(folder / "missing.png"))

    def run(workers, keep):
        return image_scoring.predict_rows(keras_model, paths, 32, pad=False, threshold=0.5, batch_size=3,
                                          decode_workers=workers, keep_pixels=keep)

    serial, overlapped = run(0, True), run(2, False)
    assert [r.path for r in overlapped] == paths
    assert [(r.path, r.probability, r.calibrated_probability, r.label, r.error) for r in serial] == \
           [(r.path, r.probability, r.calibrated_probability, r.label, r.error) for r in overlapped]
    assert sum(bool(r.error) for r in serial) == 3 and all(r.pixels is None for r in overlapped)
    assert all(r.pixels is not None for r in serial if not r.error)
