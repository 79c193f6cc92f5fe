"""cxr-evaluate as a hostile or careless user would run it: training runs and users' folders kept, refused
runs leave nothing, formula cells, full disks."""

from __future__ import annotations

import csv
import io
import os
import shutil

import numpy as np
import pytest

from cxr_tfdata.evaluation import inference, results
from cxr_tfdata.files import output_safety
from tests.binaries.safety_helpers import (
    evaluation_config,
    tmpfs,
    tree_snapshot,
    user_home,
)


def test_evaluate_never_replaces_cxr_trains_metrics_in_a_model_dir(tiny, tmp_path):
    from cxr_tfdata.evaluation import evaluate

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny.model_path, run / "final.keras")
    (run / "metrics.json").write_text('{"frozen": {"val_auc": 0.9}}')
    (run / "config.json").write_text('{"model_dir": "run"}')
    before = tree_snapshot(run)
    for overwrite in (False, True):
        with pytest.raises(output_safety.UnsafeOutputError, match="metrics.json, which cxr-evaluate did not write"):
            evaluate.evaluate(evaluation_config(tiny, run, model_path=str(run / "final.keras"), overwrite=overwrite))
    assert tree_snapshot(run) == before


def test_evaluate_refuses_a_foreign_folder_unless_overwrite_then_adds_beside(tiny, tmp_path):
    from cxr_tfdata.evaluation import evaluate

    home = user_home(tmp_path / "home")
    before = tree_snapshot(home)
    with pytest.raises(output_safety.UnsafeOutputError, match="is not empty and was not written by cxr-evaluate"):
        evaluate.evaluate(evaluation_config(tiny, home))
    assert tree_snapshot(home) == before
    evaluate.evaluate(evaluation_config(tiny, home, overwrite=True))
    after = tree_snapshot(home)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(evaluate.EVALUATION_FILES) <= set(after)
    # A folder cxr-evaluate wrote is updated without --overwrite; the user's files stay.
    evaluate.evaluate(evaluation_config(tiny, home, split="val", threshold=0.5))
    assert {k: v for k, v in tree_snapshot(home).items() if k in before} == before


def test_evaluate_refuses_choosing_the_threshold_on_the_evaluated_split(tiny, tmp_path):
    with pytest.raises(ValueError, match="--val_split: is --split='test'"):
        evaluation_config(tiny, tmp_path / "eval", split="test", val_split="test")
    evaluation_config(tiny, tmp_path / "eval", split="test", val_split="test", threshold=0.5)  # nothing chosen


def test_evaluate_refused_run_leaves_no_folder(tiny, tmp_path):
    from cxr_tfdata.evaluation import evaluate

    with pytest.raises(ValueError, match="split 'nope'"):
        evaluate.evaluate(evaluation_config(tiny, tmp_path / "eval", split="nope"))
    assert not (tmp_path / "eval").exists()


def test_evaluation_csv_neutralises_formula_file_names():

    predictions = inference.SplitPredictions(
        filenames=["NORMAL/=HYPERLINK(\"http://x\").png", "PNEUMONIA/a.png"], patient_ids=["+p1", "-p2"],
        labels=np.array([0, 1]), probabilities=np.array([0.25, 0.75], np.float32))
    rows = list(csv.reader(io.StringIO(results.predictions_csv(predictions))))
    assert rows[1][:2] == ["NORMAL/=HYPERLINK(\"http://x\").png", "'+p1"] and rows[2][1] == "'-p2"


def test_a_failed_evaluation_in_an_existing_folder_keeps_its_claim(tiny, tmp_path):
    from cxr_tfdata.evaluation import evaluate

    folder = tmp_path / "eval"
    evaluate.evaluate(evaluation_config(tiny, folder, threshold=0.5))
    with pytest.raises(ValueError, match="split 'nope'"):
        evaluate.evaluate(evaluation_config(tiny, folder, split="nope", threshold=0.5))
    evaluate.evaluate(evaluation_config(tiny, folder, threshold=0.5))  # still recognised: no --overwrite needed


def test_evaluation_on_a_full_disk_names_the_file_and_leaves_nothing(tiny, tmp_path):
    from cxr_tfdata.evaluation import evaluate

    with tmpfs(tmp_path / "small", "40k") as disk:
        with pytest.raises(OSError) as failed:
            evaluate.evaluate(evaluation_config(tiny, disk / "eval", threshold=0.5))
        assert failed.value.filename and str(disk / "eval") in failed.value.filename
        assert os.listdir(disk) == []
