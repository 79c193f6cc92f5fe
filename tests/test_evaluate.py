"""Tests of cxr_tfdata.evaluate: metric definitions, threshold choice, bootstrap, and a full evaluation."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_tfdata import atomic, evaluate, model_io, outputs
from tests import eval_fixtures, helpers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return eval_fixtures.get_tiny_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(setup, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("evaluation")
    config = evaluate.EvaluateConfig(
        model_path=str(setup.model_path), data_dir=str(setup.data_dir), output_dir=str(output_dir),
        target_recall=0.9, bootstrap_samples=200, seed=3, batch_size=5,
    )
    return config, evaluate.evaluate(config)


# --- metric definitions -------------------------------------------------------------------------

def test_binary_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probabilities = np.array([0.1, 0.6, 0.4, 0.7, 0.5, 0.2, 0.9])
    m = evaluate.binary_metrics(labels, probabilities, 0.5)
    # predicted: 0 1 0 1 1 0 1 -> tn=2 fp=1 fn=1 tp=3 (0.5 counts as positive)
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.75)
    # AUC: of 12 (pos, neg) pairs the positive scores higher in 9.
    assert m["roc_auc"] == pytest.approx(9 / 12)
    assert m["n"] == 7 and m["threshold"] == 0.5


def test_operating_threshold_is_highest_reaching_target():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probabilities = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1).round(2)  # with ties
    for target in (0.5, 0.8, 0.95, 1.0):
        t = evaluate.choose_operating_threshold(labels, probabilities, target)
        assert evaluate.binary_metrics(labels, probabilities, t)["recall"] >= target
        higher = probabilities[probabilities > t]
        if higher.size:
            next_up = higher.min()
            assert evaluate.binary_metrics(labels, probabilities, next_up)["recall"] < target


def test_operating_threshold_needs_positives():
    with pytest.raises(ValueError, match="no PNEUMONIA"):
        evaluate.choose_operating_threshold(np.zeros(4), np.linspace(0, 1, 4), 0.9)


def test_cluster_weights_take_whole_patients():
    groups = ["a", "a", "b", "c", "c", "c"]
    weights = evaluate.cluster_weights(groups, 6, 50, np.random.default_rng(1))
    assert weights.shape == (50, 6)
    np.testing.assert_array_equal(weights[:, 0], weights[:, 1])
    np.testing.assert_array_equal(weights[:, 3], weights[:, 5])
    # Three patients drawn with replacement per resample.
    np.testing.assert_array_equal(weights[:, [0, 2, 3]].sum(axis=1), 3)
    by_image = evaluate.cluster_weights(None, 6, 50, np.random.default_rng(1))
    np.testing.assert_array_equal(by_image.sum(axis=1), 6)


def test_bootstrap_interval_matches_resampled_sklearn():
    """The weighted (multiplicity) computation equals explicitly resampling the images."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 60)
    probabilities = rng.random(60)
    groups = [f"p{i // 3}" for i in range(60)]
    weights = evaluate.cluster_weights(groups, 60, 1, np.random.default_rng(7))[0]
    index = np.repeat(np.arange(60), weights.astype(int))
    expected = eval_fixtures.sklearn_metrics(labels[index], probabilities[index], 0.5)
    predicted = (probabilities >= 0.5).astype(int)
    threshold_part = evaluate._weighted_threshold_metrics(weights[None], labels, predicted)
    ranking_part = evaluate._weighted_ranking_metrics(weights[None], labels, probabilities)
    for key in ("accuracy", "precision", "recall", "specificity", "f1"):
        assert threshold_part[key][0] == pytest.approx(expected[key])
    for key in ("roc_auc", "pr_auc"):
        assert ranking_part[key][0] == pytest.approx(expected[key])


def test_bootstrap_intervals_bracket_the_estimate():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 300)
    probabilities = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    intervals = evaluate.bootstrap_intervals(labels, probabilities, {"a": 0.5}, None, 300, 0)["a"]
    point = evaluate.binary_metrics(labels, probabilities, 0.5)
    for key in evaluate.HEADLINE_METRICS:
        low, high = intervals[key]
        assert low < point[key] < high, key
        assert high - low < 0.25, key


# --- a full evaluation ---------------------------------------------------------------------------

def test_metrics_json_has_stable_keys(evaluated):
    config, metrics = evaluated
    on_disk = json.loads((Path(config.output_dir) / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
                "confusion_matrix", "threshold", "n", "ci", "classification_report"):
        assert key in on_disk, key
        assert key in on_disk["operating_point"] and key in on_disk["threshold_0.5"], key
    for key in evaluate.HEADLINE_METRICS:
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

    from cxr_tfdata import config as config_lib
    from cxr_tfdata import input_pipeline

    _, metrics = evaluated
    model = model_io.load_model(str(setup.model_path))
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
    model = model_io.load_model(str(setup.model_path))
    val = evaluate.predict_split(model, str(setup.data_dir), "val", 32, batch_size=config.batch_size)
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
    assert sorted(p.name for p in out.iterdir()) == sorted([*evaluate.EVALUATION_FILES, outputs.FOLDER_MARKER])


# --- bad input -----------------------------------------------------------------------------------

def test_image_size_mismatch_names_both(setup, tmp_path):
    data_dir = tmp_path / "data48"
    helpers.write_tiny_dataset(data_dir, {"test": (2, 2), "val": (2, 2)}, image_size=48)
    config = evaluate.EvaluateConfig(
        model_path=str(setup.model_path), data_dir=str(data_dir), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="32x32") as error:
        evaluate.evaluate(config)
    assert "48x48" in str(error.value) and str(setup.model_path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_missing_split_lists_available(setup, tmp_path):
    config = evaluate.EvaluateConfig(
        model_path=str(setup.model_path), data_dir=str(setup.data_dir),
        output_dir=str(tmp_path / "out"), split="holdout")
    with pytest.raises(ValueError, match=r"'holdout'.*\['test', 'train', 'val'\]"):
        evaluate.evaluate(config)


def test_unreadable_model_file_named(tmp_path, setup):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"this is not a zip archive")
    config = evaluate.EvaluateConfig(model_path=str(bad), data_dir=str(setup.data_dir),
                                     output_dir=str(tmp_path / "out"))
    with pytest.raises(model_io.ModelLoadError, match="broken.keras"):
        evaluate.evaluate(config)
    with pytest.raises(model_io.ModelLoadError, match="does not exist"):
        model_io.load_model(str(tmp_path / "missing.keras"))


def test_lambda_model_refused_in_safe_mode(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 1))
    outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(model_io.ModelLoadError, match="safe mode") as error:
        model_io.load_model(str(path))
    assert "lambda.keras" in str(error.value)


def test_config_rejects_bad_flags():
    with pytest.raises(ValueError, match="--target_recall"):
        evaluate.EvaluateConfig(model_path="m", data_dir="d", output_dir="o", target_recall=1.5)
    with pytest.raises(ValueError, match="--threshold"):
        evaluate.EvaluateConfig(model_path="m", data_dir="d", output_dir="o", threshold=-0.1)


def test_threshold_override_needs_no_val_split(setup, tmp_path):
    data_dir = tmp_path / "test_only"
    helpers.write_tiny_dataset(data_dir, {"test": (3, 5)}, image_size=32)
    config = evaluate.EvaluateConfig(
        model_path=str(setup.model_path), data_dir=str(data_dir), output_dir=str(tmp_path / "out"),
        threshold=0.3, bootstrap_samples=20)
    metrics = evaluate.evaluate(config)
    assert metrics["operating_point"]["threshold"] == 0.3
    assert metrics["operating_point"]["chosen_by"] == "--threshold"
    assert metrics["threshold"] == 0.5 and metrics["n"] == 8
    without_override = dataclasses.replace(config, threshold=None, output_dir=str(tmp_path / "out2"))
    with pytest.raises(ValueError, match=r"'val'.*\['test', 'train'\]"):
        evaluate.evaluate(without_override)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask):
    import os
    import stat

    from matplotlib.figure import Figure

    from cxr_tfdata import plots

    previous = os.umask(umask)
    try:
        atomic.write_text(str(tmp_path / "metrics.json"), "{}")
        figure = Figure()
        figure.add_subplot().plot([0, 1], [0, 1])
        plots._save(figure, str(tmp_path / "roc.png"))
    finally:
        os.umask(previous)
    for name in ("metrics.json", "roc.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_operating_point_without_val_predictions_is_an_error_not_an_assert(setup, tmp_path):
    config = evaluate.EvaluateConfig(model_path=str(setup.model_path), data_dir=str(setup.data_dir),
                                     output_dir=str(tmp_path / "out"))
    assert config.threshold is None
    with pytest.raises(ValueError, match="stores no operating threshold and there is no val split"):
        evaluate.operating_point(config, None, None)


def test_a_typed_threshold_labels_as_predict_and_the_export_do():
    """float32(0.7) is just below 0.7: every rule here compares in float64, as cxr-predict does."""
    probabilities = np.array([0.7, 0.9], np.float32)
    labels = np.array([1, 1])
    block = evaluate.binary_metrics(labels, probabilities, 0.7)
    assert block["confusion_matrix"] == [[0, 0], [1, 1]]
    assert (float(probabilities[0]) >= 0.7) is False  # cxr-predict's comparison
    at_threshold = np.full(6, 0.7, np.float32)  # every resample holds only these: recall 0 in all of them
    intervals = evaluate.bootstrap_intervals(np.ones(6), at_threshold, {"t": 0.7}, None, 20, 0)
    assert intervals["t"]["recall"] == [0.0, 0.0]
    report = evaluate.classification_report(labels, probabilities, 0.7, as_dict=True)
    assert report["PNEUMONIA"]["recall"] == 0.5
