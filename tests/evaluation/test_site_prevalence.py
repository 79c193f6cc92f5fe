"""Tests of cxr_tfdata.evaluation.site_prevalence: cxr-evaluate on unlabelled images estimates the
site's prevalence, says how far to trust it, and applies it to nothing."""

from __future__ import annotations

import csv
import io
import json
import shutil

import pytest

from cxr_tfdata.evaluation import evaluate, evaluate_config, site_prevalence
from tests import eval_fixtures
from tests.evaluation import recalibrate_inputs


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """The tiny model with a sealed contract, and a flat folder of its site images with labels removed."""
    setup = eval_fixtures.get_tiny_setup(tmp_path_factory)
    root = tmp_path_factory.mktemp("site_prevalence")
    model = recalibrate_inputs.model_with_contract(setup, root / "sealed.keras")
    labelled = recalibrate_inputs.site_folder(root / "labelled", per_class=60)
    flat = root / "unlabelled"
    flat.mkdir()
    for path in sorted(labelled.rglob("*.png")):
        shutil.copy(path, flat / path.name)
    return setup, model, flat


def _config(model, images_dir, output_dir, **overrides):
    return evaluate_config.EvaluateConfig(model_path=str(model), images_dir=str(images_dir),
                                          output_dir=str(output_dir), bootstrap_samples=200, **overrides)


def test_an_unlabelled_folder_gets_an_estimate_that_is_reported_not_applied(unlabelled, tmp_path):
    _, model, flat = unlabelled
    metrics = evaluate.evaluate(_config(model, flat, tmp_path / "out"))
    block = metrics["prevalence_estimate"]
    assert block["n"] == 120 and block["applied"] is False
    assert 0.0 < block["value"] < 1.0
    low, high = block["interval"]
    assert low <= block["value"] <= high
    assert block["calibration_reflects_prevalence"] == recalibrate_inputs.STORED["train_prevalence"]
    assert block["resampled_by"] == "patient"
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["prevalence_estimate"]["value"] == pytest.approx(block["value"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "unreliable under image shift" in report and "--prevalence" in report
    rows = list(csv.reader(io.StringIO((tmp_path / "out" / "predictions.csv").read_text())))
    assert rows[0] == list(site_prevalence.PREDICTIONS_COLUMNS) and len(rows) == 121


def test_the_estimate_follows_the_scores(unlabelled, tmp_path):
    """The same images, fewer of one class: the estimate moves towards the class that remains."""
    setup, model, flat = unlabelled
    full = evaluate.evaluate(_config(model, flat, tmp_path / "full"))["prevalence_estimate"]["value"]
    fewer_pneumonia = tmp_path / "fewer_pneumonia"
    fewer_pneumonia.mkdir()
    for path in sorted(flat.glob("*.png"))[:60]:  # every NORMAL image (site_folder names them first)
        shutil.copy(path, fewer_pneumonia / path.name)
    for path in sorted(flat.glob("*.png"))[60:100]:  # and 40 of the 60 PNEUMONIA images
        shutil.copy(path, fewer_pneumonia / path.name)
    fewer = evaluate.evaluate(_config(model, fewer_pneumonia, tmp_path / "fewer"))["prevalence_estimate"]["value"]
    assert fewer < full


def test_a_model_without_calibration_is_refused_before_any_image_is_read(unlabelled, tmp_path):
    setup, _, flat = unlabelled
    bare = recalibrate_inputs.model_with_contract(setup, tmp_path / "bare.keras", temperature=None)
    with pytest.raises(ValueError, match="unlabelled images.*stores no calibration"):
        evaluate.evaluate(_config(bare, flat, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_too_few_images_are_refused_naming_the_minimum(unlabelled, tmp_path):
    _, model, flat = unlabelled
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(flat.glob("*.png"))[:10]:
        shutil.copy(path, few / path.name)
    with pytest.raises(ValueError, match="prevalence estimate refused"):
        evaluate.evaluate(_config(model, few, tmp_path / "out"))
