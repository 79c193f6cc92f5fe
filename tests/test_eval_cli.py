"""End-to-end tests of the cxr-evaluate and cxr-predict binaries, each run in a fresh process."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from tests import eval_fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return eval_fixtures.get_tiny_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def cli_evaluation(setup, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("cli_eval") / "report"
    result = eval_fixtures.run_cli(
        "cxr_tfdata.cli.evaluate", f"--model={setup.model_path}", f"--data_dir={setup.data_dir}",
        "--split=test", f"--output_dir={output_dir}", "--bootstrap_samples=100", "--batch_size=7",
    )
    assert result.returncode == 0, result.stderr
    return output_dir, result


def test_evaluate_binary_writes_everything_and_prints_table(cli_evaluation):
    output_dir, result = cli_evaluation
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert "| Accuracy |" in result.stdout and f"{metrics['accuracy']:.4f}" in result.stdout
    assert "by patient" in result.stdout
    for name in ("report.md", "predictions.csv"):
        assert (output_dir / name).stat().st_size > 0
    for name in ("roc.png", "pr.png", "confusion_matrix.png", "calibration.png"):
        with Image.open(output_dir / name) as image:
            image.verify()
    assert metrics["bootstrap"]["samples"] == 100


def test_predict_csv_reproduces_metrics_json(cli_evaluation, setup, tmp_path):
    """cxr-predict over the test images gives the probabilities, and so the metrics, of cxr-evaluate.

    A corrupt file among them is reported on its row and in stderr; the others go on.
    """
    output_dir, _ = cli_evaluation
    metrics = json.loads((output_dir / "metrics.json").read_text())
    label_of = {}
    for record in eval_fixtures.split_records(setup.data_dir, "test"):
        path = tmp_path / "images" / record["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(record["image"])
        label_of[str(path)] = record["label"]
    bad = tmp_path / "images" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    csv_path = tmp_path / "predictions.csv"
    result = eval_fixtures.run_cli(
        "cxr_tfdata.cli.predict", f"--model={setup.model_path}", f"--output_csv={csv_path}",
        "--record_encoding=png", f"--gradcam_dir={tmp_path / 'cams'}", str(tmp_path / "images"))
    assert result.returncode == 0, result.stderr
    with open(csv_path, newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    bad_row = rows.pop(str(bad))
    assert bad_row["error"] != "" and bad_row["probability"] == "" and "bad.jpg" in result.stderr
    assert len(rows) == metrics["n"] and all(row["error"] == "" for row in rows.values())
    labels = [label_of[path] for path in rows]
    probabilities = [float(row["probability"]) for row in rows.values()]
    for block in (metrics, metrics["operating_point"]):
        expected = eval_fixtures.sklearn_metrics(labels, probabilities, block["threshold"])
        assert block["confusion_matrix"] == expected.pop("confusion_matrix")
        for key, value in expected.items():
            assert block[key] == pytest.approx(value, abs=1e-6), key
    assert len(list((tmp_path / "cams").glob("*_gradcam.png"))) == metrics["n"]


def test_predict_binary_fails_when_every_file_fails(setup, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    result = eval_fixtures.run_cli(
        "cxr_tfdata.cli.predict", f"--model={setup.model_path}", str(tmp_path / "bad.jpg"))
    assert result.returncode == 1
    assert "none of the 1 files" in result.stderr
    rows = list(csv.DictReader(result.stdout.splitlines()))  # the CSV still goes to stdout
    assert [row["path"] for row in rows] == [str(tmp_path / "bad.jpg")] and rows[0]["error"]


def test_evaluate_binary_missing_split_lists_available(setup, tmp_path):
    result = eval_fixtures.run_cli(
        "cxr_tfdata.cli.evaluate", f"--model={setup.model_path}", f"--data_dir={setup.data_dir}",
        "--split=holdout", f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 1
    assert "'holdout'" in result.stderr and "['test', 'train', 'val']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
