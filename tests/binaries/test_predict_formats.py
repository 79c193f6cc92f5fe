"""cxr-predict and cxr-evaluate on every model format: per image the .keras model's probabilities and labels,
the same CSV columns, a report and model card that say which format and file was run; Grad-CAM and
cxr-recalibrate refuse a non-Keras model naming why."""

from __future__ import annotations

import csv
import io
import json
import types

import pytest

from cxr_tfdata.evaluation import evaluate, recalibrate
from cxr_tfdata.evaluation.evaluate_config import EvaluateConfig
from cxr_tfdata.serving import predict
from tests.binaries.safety_helpers import one_error_line, run_binary
from tests.evaluation import recalibrate_inputs
from tests.modeling import portable_models

FORMATS = ("saved_model", "onnx", "openvino", "tflite")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    return portable_models.get_portable_set(tmp_path_factory)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return recalibrate_inputs.site_folder(tmp_path_factory.mktemp("site") / "site", per_class=8)


def _predict_rows(model_path, paths, csv_path):
    config = predict.PredictConfig(model_path=str(model_path), paths=tuple(str(p) for p in paths),
                                   output_csv=str(csv_path), batch_size=5)
    predict.predict(config, io.StringIO())
    return list(csv.DictReader(csv_path.open()))


def _evaluate(model_path, output_dir, **source):
    config = EvaluateConfig(model_path=str(model_path), output_dir=str(output_dir), bootstrap_samples=20,
                            batch_size=7, **source)
    evaluate.evaluate(config)
    return list(csv.DictReader((output_dir / "predictions.csv").open()))


def _same_per_image(rows, reference, key, label_key):
    assert [r[key] for r in rows] == [r[key] for r in reference]
    assert sum(bool(r["probability"]) for r in reference) >= 10
    for row, ref in zip(rows, reference, strict=True):
        assert row.get("error", "") == ref.get("error", "")
        if ref["probability"]:
            p, q = float(row["probability"]), float(ref["probability"])
            assert abs(p - q) <= TOLERANCE, row
            if abs(q - 0.5) > TOLERANCE:
                assert row[label_key] == ref[label_key], row


@pytest.fixture(scope="module")
def keras_results(portable, site, sample_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("keras_results")
    data = str(portable.setup.data_dir)
    return {
        "predict": _predict_rows(portable.keras_path, [sample_dir], root / "keras.csv"),
        "records": _evaluate(portable.keras_path, root / "records", data_dir=data),
        "site": _evaluate(portable.keras_path, root / "site", images_dir=str(site)),
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_and_evaluate_on_each_format_agree_with_keras_per_image(portable, site, sample_dir, keras_results,
                                                                        tmp_path, fmt):
    model_path = portable.files[fmt]
    rows = _predict_rows(model_path, [sample_dir], tmp_path / "predictions.csv")
    assert list(rows[0]) == list(predict.CSV_COLUMNS)
    _same_per_image(rows, keras_results["predict"], "path", "label")
    # records for two formats, an image folder for the other two: each reader path once per format
    source = ({"data_dir": str(portable.setup.data_dir)} if fmt in ("saved_model", "onnx")
              else {"images_dir": str(site)})
    evaluated = _evaluate(model_path, tmp_path / "eval", **source)
    _same_per_image(evaluated, keras_results["records" if "data_dir" in source else "site"], "filename",
                    "predicted_label")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["model_file"]["format"] == fmt
    assert metrics["model_file"]["quantization"] == portable_models.QUANTIZATION
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"Format evaluated: {fmt}" in report and "quantization: none (auc_drop: 0" in report
    card = json.loads((tmp_path / "eval" / "model_card.json").read_text())
    assert card["model"]["format"] == fmt and card["model"]["quantization"]["method"] == "none"
    assert f"- Format evaluated: {fmt}" in (tmp_path / "eval" / "MODEL_CARD.md").read_text()


def test_gradcam_and_recalibrate_refuse_a_non_keras_model(portable, sample_dir, tmp_path):
    config = predict.PredictConfig(model_path=str(portable.files["onnx"]), paths=(str(sample_dir),),
                                   output_csv=str(tmp_path / "p.csv"), gradcam_dir=str(tmp_path / "cams"))
    with pytest.raises(ValueError, match="--gradcam_dir: needs a .keras --model") as raised:
        predict.predict(config, io.StringIO())
    assert "--model=" in str(raised.value) and not (tmp_path / "cams").exists()
    with pytest.raises(ValueError, match="cxr-recalibrate writes the refitted calibration into a new .keras"):
        recalibrate._load(types.SimpleNamespace(model_path=str(portable.files["tflite"])))


def test_the_binaries_take_portable_models(portable, site, sample_dir, keras_results, tmp_path):
    csv_path = tmp_path / "ov.csv"
    result = run_binary("cxr_tfdata.cli.predict", f"--model={portable.files['openvino']}",
                        f"--output_csv={csv_path}", "--batch_size=5", str(sample_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    _same_per_image(list(csv.DictReader(csv_path.open())), keras_results["predict"], "path", "label")
    out = tmp_path / "eval"
    result = run_binary("cxr_tfdata.cli.evaluate", f"--model={portable.files['tflite']}", f"--images_dir={site}",
                        f"--output_dir={out}", "--bootstrap_samples=20", "--batch_size=7")
    assert result.returncode == 0, result.stderr[-3000:]
    _same_per_image(list(csv.DictReader((out / "predictions.csv").open())), keras_results["site"], "filename",
                    "predicted_label")
    assert json.loads((out / "metrics.json").read_text())["model_file"]["format"] == "tflite"
    line = one_error_line(run_binary("cxr_tfdata.cli.predict", f"--model={portable.files['saved_model']}",
                                     f"--gradcam_dir={tmp_path / 'cams'}", str(sample_dir)), "cxr-predict")
    assert "--gradcam_dir" in line and "--model=" in line


def test_an_openvino_models_weights_are_an_input_no_output_may_replace(portable, sample_dir, tmp_path):
    from cxr_tfdata.files import output_safety

    xml = portable.files["openvino"]
    config = predict.PredictConfig(model_path=str(xml), paths=(str(sample_dir),),
                                   output_csv=str(xml.with_suffix(".bin")), overwrite=True)
    with pytest.raises(output_safety.UnsafeOutputError, match="same path as --model's file 1"):
        predict.predict(config, io.StringIO())
    assert xml.with_suffix(".bin").stat().st_size > 1000
