"""End-to-end tests of the cxr-evaluate and cxr-predict binaries, each run in a fresh process."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from cxr_tfdata.modeling import image_scoring
from tests import eval_fixtures, helpers


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
    helpers.assert_quiet(result.stderr, "cxr-evaluate", "cxr-evaluate: evaluating ")
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


@pytest.fixture
def padded_dataset(tmp_path):
    """A tall bright image, and a dataset folder whose manifest says it was built with pad and PNG."""
    import numpy as np

    from cxr_tfdata.core import dataset_info, record_schema
    from tests import helpers

    pixels = np.clip(np.random.default_rng(5).normal(170, 25, (96, 24)), 40, 255).astype(np.uint8)
    image = tmp_path / "tall.png"
    image.write_bytes(helpers.encode_png(pixels))
    data_dir = tmp_path / "records"
    data_dir.mkdir()
    (data_dir / dataset_info.MANIFEST_FILENAME).write_text(json.dumps({
        "format_version": 1, "image_size": eval_fixtures.IMAGE_SIZE, "class_names": list(record_schema.CLASS_NAMES),
        "splits": {}, "encoding": "png", "resize": "pad",
        "flags": {"image_size": eval_fixtures.IMAGE_SIZE, "resize": "pad", "encoding": "png", "jpeg_quality": 95},
    }))
    for name in dataset_info.TFDS_METADATA_FILES:  # present, as in every dataset (their content is not read)
        (data_dir / name).write_text("{}")
    return image, data_dir


def _in_process_probability(setup, image, **settings) -> float:
    from cxr_tfdata.modeling import loading

    model = loading.load_model(str(setup.model_path))
    [row] = image_scoring.predict_rows(model, [str(image)], eval_fixtures.IMAGE_SIZE, threshold=0.5, batch_size=1,
                                 **settings)
    return row.probability


def test_predict_and_export_take_build_settings_from_data_dir(setup, padded_dataset, tmp_path):
    import tensorflow as tf

    image, data_dir = padded_dataset
    built = _in_process_probability(setup, image, pad=True, record_encoding="png")
    defaults = _in_process_probability(setup, image, pad=False, record_encoding="jpeg")
    assert abs(built - defaults) > 0.05  # the settings matter for this image
    result = eval_fixtures.run_cli(
        "cxr_tfdata.cli.predict", f"--model={setup.model_path}", f"--data_dir={data_dir}", str(image))
    assert result.returncode == 0, result.stderr
    [row] = list(csv.DictReader(result.stdout.splitlines()))
    assert float(row["probability"]) == pytest.approx(built, abs=1e-5)
    result = eval_fixtures.run_cli(
        "cxr_tfdata.cli.export", f"--model={setup.model_path}", f"--data_dir={data_dir}",
        f"--output_dir={tmp_path / 'saved'}")
    assert result.returncode == 0, result.stderr
    serve = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    served = serve(image_bytes=tf.constant([image.read_bytes()]))["probability"].numpy()
    assert served[0] == pytest.approx(built, abs=0.01)


@pytest.mark.parametrize("module", ["cxr_tfdata.cli.predict", "cxr_tfdata.cli.export"])
def test_a_flag_contradicting_data_dir_is_refused(setup, padded_dataset, tmp_path, module):
    image, data_dir = padded_dataset
    extra = [str(image)] if module.endswith("predict") else [f"--output_dir={tmp_path / 'saved'}"]
    result = eval_fixtures.run_cli(module, f"--model={setup.model_path}", f"--data_dir={data_dir}",
                                   "--resize=squash", *extra)
    assert result.returncode == 1
    assert "--resize=squash contradicts --data_dir" in result.stderr and "--resize=pad" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "saved").exists()
