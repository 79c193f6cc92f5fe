"""Tests of cxr_tfdata.evaluation.evaluate: a full evaluation checked against sklearn and Keras, and bad input.

The metric maths is tested in tests/metrics/."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from cxr_tfdata.evaluation import evaluate, evaluate_config, inference, results
from cxr_tfdata.files import output_safety
from cxr_tfdata.metrics import threshold_metrics
from cxr_tfdata.modeling import loading
from tests import eval_fixtures, helpers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return eval_fixtures.get_tiny_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(setup, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("evaluation")
    config = evaluate_config.EvaluateConfig(
        model_path=str(setup.model_path), data_dir=str(setup.data_dir), output_dir=str(output_dir),
        target_recall=0.9, bootstrap_samples=200, seed=3, batch_size=5,
    )
    return config, evaluate.evaluate(config)


# --- a full evaluation ---------------------------------------------------------------------------

def test_metrics_json_has_stable_keys(evaluated):
    config, metrics = evaluated
    on_disk = json.loads((Path(config.output_dir) / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
                "confusion_matrix", "threshold", "n", "ci", "classification_report"):
        assert key in on_disk, key
        assert key in on_disk["operating_point"] and key in on_disk["threshold_0.5"], key
    for key in threshold_metrics.HEADLINE_METRICS:
        low, high = on_disk[f"{key}_ci"]
        assert 0.0 <= low <= high <= 1.0, key
        assert on_disk["ci"][key] == [low, high]
    assert on_disk["threshold"] == 0.5
    assert on_disk["n"] == sum(eval_fixtures.SPLIT_SIZES["test"])
    assert on_disk["bootstrap"]["resampled_by"] == "patient"
    patients = {r["patient_id"] for r in eval_fixtures.split_records(config.data_dir, "test")}
    assert on_disk["bootstrap"]["num_clusters"] == len(patients) < on_disk["n"]
    assert on_disk["accuracy"] == metrics["accuracy"]


def _read_predictions(output_dir):
    with open(f"{output_dir}/predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_equal_sklearn_from_predictions_csv(evaluated, setup):
    config, metrics = evaluated
    rows = _read_predictions(config.output_dir)
    labels = [int(r["label"]) for r in rows]
    probabilities = [float(r["probability"]) for r in rows]
    # Labels and patient ids stay aligned with their images: compare with the records themselves.
    records = {r["filename"]: r for r in eval_fixtures.split_records(setup.data_dir, "test")}
    assert sorted(records) == sorted(r["filename"] for r in rows)
    for row in rows:
        assert int(row["label"]) == records[row["filename"]]["label"]
        assert row["patient_id"] == records[row["filename"]]["patient_id"]
    operating = metrics["operating_point"]
    for block, threshold in ((dict(metrics), 0.5), (dict(operating), operating["threshold"])):
        expected = eval_fixtures.sklearn_metrics(labels, probabilities, threshold)
        assert block.pop("confusion_matrix") == expected.pop("confusion_matrix")
        for key, value in expected.items():
            assert block[key] == pytest.approx(value, abs=1e-9), key


def test_accuracy_equals_keras_evaluate(evaluated, setup):
    import keras

    from cxr_tfdata.core import config as config_lib
    from cxr_tfdata.data import input_pipeline

    _, metrics = evaluated
    model = loading.load_model(str(setup.model_path))
    model.compile(loss="binary_crossentropy", metrics=[keras.metrics.BinaryAccuracy(name="acc")])
    data = input_pipeline.create_dataset(
        config_lib.DataConfig(data_dir=str(setup.data_dir), image_size=32, cache="off"),
        "test", batch_size=7, training=False,
    )
    result = model.evaluate(data, verbose=0, return_dict=True)
    assert metrics["accuracy"] == pytest.approx(result["acc"], abs=1e-6)
    # Not a degenerate model: the comparison would be empty if it predicted one class only.
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    assert tn + fp > 0 and tp + fn > 0 and 0.0 < metrics["roc_auc"]


def test_operating_point_reaches_target_on_val(evaluated, setup):
    from sklearn import metrics as skm

    config, metrics = evaluated
    op = metrics["operating_point"]
    assert op["val_recall"] >= 0.9
    assert op["target_recall"] == 0.9 and op["val_split"] == "val"
    # Independently: the highest of scikit-learn's ROC thresholds on val whose recall reaches 0.9.
    model = loading.load_model(str(setup.model_path))
    val = inference.predict_split(model, str(setup.data_dir), "val", 32, batch_size=config.batch_size)
    _, recall, thresholds = skm.roc_curve(val.labels, val.probabilities, drop_intermediate=False)
    expected = float(thresholds[recall >= 0.9].max())
    assert op["threshold"] == pytest.approx(expected, abs=1e-7)
    assert 0.0 < expected < 1.0


def test_report_and_plots_written(evaluated):
    config, metrics = evaluated
    out = Path(config.output_dir)
    report = (out / "report.md").read_text()
    for text in ("## Summary", "95% CI", "False negatives", "Confusion matrix", "precision",
                 "resampled by **patient**", f"{metrics['accuracy']:.4f}"):
        assert text in report, text
    for name in ("roc.png", "pr.png", "confusion_matrix.png", "calibration.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    # Exactly the evaluation's files and its marker: no temporary file left behind, no lock file.
    assert sorted(p.name for p in out.iterdir()) == sorted([*evaluate.EVALUATION_FILES, output_safety.FOLDER_MARKER])


# --- bad input -----------------------------------------------------------------------------------

def test_image_size_mismatch_names_both(setup, tmp_path):
    data_dir = tmp_path / "data48"
    helpers.write_tiny_dataset(data_dir, {"test": (2, 2), "val": (2, 2)}, image_size=48)
    config = evaluate_config.EvaluateConfig(
        model_path=str(setup.model_path), data_dir=str(data_dir), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="32x32") as error:
        evaluate.evaluate(config)
    assert "48x48" in str(error.value) and str(setup.model_path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_missing_split_lists_available(setup, tmp_path):
    config = evaluate_config.EvaluateConfig(
        model_path=str(setup.model_path), data_dir=str(setup.data_dir),
        output_dir=str(tmp_path / "out"), split="holdout")
    with pytest.raises(ValueError, match=r"'holdout'.*\['test', 'train', 'val'\]"):
        evaluate.evaluate(config)


def test_unreadable_model_file_named(tmp_path, setup):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"this is not a zip archive")
    config = evaluate_config.EvaluateConfig(model_path=str(bad), data_dir=str(setup.data_dir),
                                     output_dir=str(tmp_path / "out"))
    with pytest.raises(loading.ModelLoadError, match="broken.keras"):
        evaluate.evaluate(config)
    with pytest.raises(loading.ModelLoadError, match="does not exist"):
        loading.load_model(str(tmp_path / "missing.keras"))


def test_config_rejects_bad_flags():
    with pytest.raises(ValueError, match="--target_recall"):
        evaluate_config.EvaluateConfig(model_path="m", data_dir="d", output_dir="o", target_recall=1.5)
    with pytest.raises(ValueError, match="--threshold"):
        evaluate_config.EvaluateConfig(model_path="m", data_dir="d", output_dir="o", threshold=-0.1)


def test_threshold_override_needs_no_val_split(setup, tmp_path):
    data_dir = tmp_path / "test_only"
    helpers.write_tiny_dataset(data_dir, {"test": (3, 5)}, image_size=32)
    config = evaluate_config.EvaluateConfig(
        model_path=str(setup.model_path), data_dir=str(data_dir), output_dir=str(tmp_path / "out"),
        threshold=0.3, bootstrap_samples=20)
    metrics = evaluate.evaluate(config)
    assert metrics["operating_point"]["threshold"] == 0.3
    assert metrics["operating_point"]["chosen_by"] == "--threshold"
    assert metrics["threshold"] == 0.5 and metrics["n"] == 8
    without_override = dataclasses.replace(config, threshold=None, output_dir=str(tmp_path / "out2"))
    with pytest.raises(ValueError, match=r"'val'.*\['test', 'train'\]"):
        evaluate.evaluate(without_override)


def test_operating_point_without_val_predictions_is_an_error_not_an_assert(setup, tmp_path):
    config = evaluate_config.EvaluateConfig(model_path=str(setup.model_path), data_dir=str(setup.data_dir),
                                     output_dir=str(tmp_path / "out"))
    assert config.threshold is None
    with pytest.raises(ValueError, match="stores no operating threshold and there is no val split"):
        results.operating_point(config, None, None)


def test_a_model_without_a_contract_is_warned_about_before_any_image_is_read(setup, tmp_path, caplog):
    config = evaluate_config.EvaluateConfig(
        model_path=str(setup.model_path), data_dir=str(setup.data_dir), output_dir=str(tmp_path / "out"))
    with caplog.at_level("WARNING"):
        evaluate._check_inputs(config)
    assert any("carries no contract" in record.getMessage() and str(setup.model_path) in record.getMessage()
               for record in caplog.records), [r.getMessage() for r in caplog.records]
