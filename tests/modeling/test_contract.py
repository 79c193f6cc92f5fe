"""A model trained by cxr-train carries its contract: the preparation of its images, its operating
threshold and its temperature. Copied alone to another folder, it gives cxr-predict, the export and
cxr-evaluate (records or an image folder) the same answers with no flag, and a flag that contradicts
it is refused."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from sklearn import metrics as skm

from cxr_tfdata.core import dataset_info, record_schema
from cxr_tfdata.core.config import AugmentConfig, DataConfig, ModelConfig, StageConfig, TrainConfig
from cxr_tfdata.evaluation import evaluate, evaluate_config, inference
from cxr_tfdata.metrics import threshold_metrics
from cxr_tfdata.modeling import contract, loading
from cxr_tfdata.serving import export, predict
from cxr_tfdata.training import train
from tests import eval_fixtures, helpers
from tfrecords_builder import build

IMAGE_SIZE = 32
JPEG_QUALITY = 90
SPLIT_SIZES = {"train": (16, 16), "val": (10, 10), "test": (6, 6)}


def _source_image(label: int, index: int) -> np.ndarray:
    """A labelled image, wider than tall (40 x 32), so squash and pad give different pixels."""
    square = helpers.labelled_image(label, index, IMAGE_SIZE)[..., 0]
    return np.pad(square, ((0, 0), (4, 4)), mode="edge")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Sources, records built from them with non-default preparation (pad, JPEG q90), a frozen
    stage trained on them, and its final.keras copied alone into another folder."""
    root = tmp_path_factory.mktemp("contract")
    sources, index = root / "sources", 0
    for split, counts in SPLIT_SIZES.items():
        for label, count in enumerate(counts):
            folder = sources / split / record_schema.CLASS_NAMES[label]
            folder.mkdir(parents=True)
            for _ in range(count):
                (folder / helpers.source_name(split, index)).write_bytes(
                    helpers.encode_png(_source_image(label, index)))
                index += 1
    data_dir = root / "records"
    build.build_dataset(build.BuildConfig(
        input_dir=str(sources), output_dir=str(data_dir), image_size=IMAGE_SIZE, resize="pad",
        encoding="jpeg", jpeg_quality=JPEG_QUALITY, val_fraction=0.0, min_val_images=1, num_workers=1,
        num_shards=2))
    config = TrainConfig(
        model_dir=str(root / "run"),
        data=DataConfig(data_dir=str(data_dir), image_size=IMAGE_SIZE, seed=1),
        augment=AugmentConfig(placement="none"),
        model=ModelConfig(weights="none"),
        frozen=StageConfig(name="frozen", batch_size=8, epochs=2, learning_rate=1e-3),
        finetune=StageConfig(name="finetune", batch_size=8, epochs=1, learning_rate=1e-3),
        stage="frozen",
        mixed_precision="mixed_bfloat16",
        target_recall=0.9,
    )
    train.train_and_evaluate(config)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(root / "run" / "final.keras", elsewhere / "model.keras")
    return {"root": root, "sources": sources, "data_dir": data_dir, "run": root / "run",
            "model": elsewhere / "model.keras", "target_recall": 0.9}


def _contract(path) -> dict:
    return contract.read(loading.load_model(str(path)))


def test_trained_models_carry_their_contract(trained):
    info = dataset_info.load(str(trained["data_dir"]))
    for path in (trained["model"], trained["run"] / "frozen_best.keras"):
        stored = _contract(path)
        assert (stored["image_size"], stored["resize"], stored["record_encoding"], stored["jpeg_quality"]) == (
            IMAGE_SIZE, "pad", "jpeg", JPEG_QUALITY), path
        assert stored["class_names"] == list(record_schema.CLASS_NAMES)
        assert stored["dataset_fingerprint"] == info.fingerprint
        assert stored["target_recall"] == trained["target_recall"] and stored["threshold_chosen_on"] == "val"
        assert 0.0 < stored["operating_threshold"] < 1.0 and stored["temperature"] > 0.0
        assert stored["data"]["splits"]["val"]["images"] == sum(SPLIT_SIZES["val"])
        patients = stored["training_patients"]  # sealed: the train and val patients, two images each
        assert patients["key_fingerprint"] == info.manifest["patient_ids"]["key_fingerprint"]
        assert len(patients["prefixes"]) == (sum(SPLIT_SIZES["train"]) + sum(SPLIT_SIZES["val"])) // 2
    metrics = json.loads((trained["run"] / "metrics.json").read_text())
    logged = json.dumps(metrics)
    assert str(stored["operating_threshold"])[:6] in logged and "temperature" in logged


def test_stored_threshold_and_temperature_equal_an_independent_fit_on_val(trained):
    from scipy import optimize

    stored = _contract(trained["model"])
    model = loading.load_model(str(trained["model"]))
    val = inference.predict_split(model, str(trained["data_dir"]), "val", IMAGE_SIZE, batch_size=5)
    fpr, tpr, thresholds = skm.roc_curve(val.labels, val.probabilities, drop_intermediate=False)
    expected = float(np.max(thresholds[tpr >= trained["target_recall"]]))
    assert stored["operating_threshold"] == pytest.approx(expected, abs=1e-6)

    p = np.clip(val.probabilities.astype(np.float64), 2.0 ** -24, 1 - 2.0 ** -24)
    z, y = np.log(p) - np.log1p(-p), val.labels.astype(np.float64)
    shift = stored["logit_shift"]  # 0 here: the tiny train split is balanced, so are its class weights
    assert shift == pytest.approx(0.0, abs=1e-12)

    def nll(log_t):
        logits = z / np.exp(log_t) + shift
        return float(np.mean(np.logaddexp(0.0, logits) - y * logits))

    fitted = optimize.minimize_scalar(nll, bounds=(np.log(1e-2), np.log(1e2)), method="bounded",
                                      options={"xatol": 1e-10})
    assert stored["temperature"] == pytest.approx(float(np.exp(fitted.x)), rel=1e-4)


def test_predict_export_and_evaluate_agree_with_no_flags(trained, tmp_path):
    """The copied model alone: cxr-predict (the binary), the SavedModel and cxr-evaluate on the image
    folder and on the records give the same probabilities, calibrated probabilities and labels."""
    model_path = str(trained["model"])
    stored = _contract(model_path)
    test_dir = trained["sources"] / "test"

    result = eval_fixtures.run_cli("cxr_tfdata.cli.predict", f"--model={model_path}",
                                   f"--output_csv={tmp_path / 'predicted.csv'}", str(test_dir))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "predicted.csv", newline="") as f:
        predicted = {str(Path(row["path"]).relative_to(test_dir)): row for row in csv.DictReader(f)}

    from_folder = evaluate.evaluate(evaluate_config.EvaluateConfig(
        model_path=model_path, images_dir=str(test_dir), output_dir=str(tmp_path / "folder"),
        bootstrap_samples=50))
    from_records = evaluate.evaluate(evaluate_config.EvaluateConfig(
        model_path=model_path, data_dir=str(trained["data_dir"]), output_dir=str(tmp_path / "records"),
        bootstrap_samples=50))
    with open(tmp_path / "folder" / "predictions.csv", newline="") as f:
        evaluated = {row["filename"]: row for row in csv.DictReader(f)}

    export.export(export.ExportConfig(model_path=model_path, output_dir=str(tmp_path / "saved")))
    serve = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    names = sorted(evaluated)
    served = serve(image_bytes=tf.constant([(test_dir / name).read_bytes() for name in names]))

    assert sorted(predicted) == names and len(names) == sum(SPLIT_SIZES["test"])
    for i, name in enumerate(names):
        probability = float(evaluated[name]["probability"])
        assert float(predicted[name]["probability"]) == pytest.approx(probability, abs=1e-6), name
        # The export decodes and resizes in-graph as the converter does (to the grey level).
        assert float(served["probability"][i]) == pytest.approx(probability, abs=1e-5), name
        calibrated = float(evaluated[name]["calibrated_probability"])
        assert float(predicted[name]["calibrated_probability"]) == pytest.approx(calibrated, abs=1e-6), name
        assert float(served["calibrated_probability"][i]) == pytest.approx(calibrated, abs=1e-5), name
        label = record_schema.CLASS_NAMES[int(probability >= stored["operating_threshold"])]
        assert evaluated[name]["predicted_label"] == predicted[name]["label"] == label, name
        assert served["label"][i].numpy().decode() == label, name

    # The folder and the records built from it: the same images, the same metrics.
    for key in ("threshold_0.5", "operating_point"):
        for metric in (*threshold_metrics.HEADLINE_METRICS, "n", "threshold"):
            assert from_folder[key][metric] == pytest.approx(from_records[key][metric], abs=1e-9), (key, metric)
    assert from_folder["operating_point"]["threshold"] == stored["operating_threshold"]
    assert from_folder["source"] == {"kind": "images_dir", "path": str(test_dir), "split": None,
                                     "num_unreadable": 0, "unreadable": []}
    asset = json.loads((tmp_path / "saved" / "assets" / export.DESCRIPTION_ASSET).read_text())
    assert asset["contract"] == stored and asset["operating_threshold"] == stored["operating_threshold"]
    for name in ("MODEL_CARD.md", "model_card.json", "report.md", "calibration.png"):
        assert (tmp_path / "folder" / name).is_file(), name


def test_contradicting_flags_are_refused_naming_both(trained, tmp_path):
    model_path = str(trained["model"])
    stored = _contract(model_path)
    image = trained["sources"] / "test" / "NORMAL"
    for given, expected in (({"resize": "squash"}, "--resize=squash contradicts .*resize='pad'"),
                            ({"record_encoding": "png"}, "--record_encoding=png contradicts .*record_encoding='jpeg'"),
                            ({"jpeg_quality": 95}, f"--jpeg_quality=95 contradicts .*jpeg_quality={JPEG_QUALITY}"),
                            ({"threshold": 0.5}, "--threshold=0.5 contradicts .*operating_threshold=")):
        with pytest.raises(ValueError, match=expected) as error:
            predict.predict(predict.PredictConfig(model_path=model_path, paths=(str(image),), **given),
                            io.StringIO())
        assert model_path in str(error.value)
    with pytest.raises(ValueError, match="--resize=squash contradicts .*resize='pad'"):
        export.export(export.ExportConfig(model_path=model_path, output_dir=str(tmp_path / "x"), resize="squash"))
    assert not (tmp_path / "x").exists()
    # Giving the stored values is allowed.
    rows = predict.predict(predict.PredictConfig(
        model_path=model_path, paths=(str(image),), resize="pad", record_encoding="jpeg",
        jpeg_quality=JPEG_QUALITY, threshold=stored["operating_threshold"]), io.StringIO())
    assert all(row.error == "" for row in rows)
    with pytest.raises(ValueError, match="--target_recall=0.8 but .* chosen for recall 0.9"):
        evaluate.evaluate(evaluate_config.EvaluateConfig(model_path=model_path, data_dir=str(trained["data_dir"]),
                                                  output_dir=str(tmp_path / "ev"), target_recall=0.8))
    assert not (tmp_path / "ev").exists()


def test_evaluate_chooses_a_new_threshold_only_when_asked(trained, tmp_path):
    model_path = str(trained["model"])
    stored = _contract(model_path)
    chosen = evaluate.evaluate(evaluate_config.EvaluateConfig(
        model_path=model_path, data_dir=str(trained["data_dir"]), output_dir=str(tmp_path / "a"),
        target_recall=trained["target_recall"], choose_threshold_on_val=True, bootstrap_samples=0))
    assert "chosen by cxr-evaluate" in chosen["operating_point"]["chosen_by"]
    # The same rule on the same val predictions: the stored threshold again.
    assert chosen["operating_point"]["threshold"] == pytest.approx(stored["operating_threshold"], abs=1e-6)
    assert "chosen by cxr-evaluate" in (tmp_path / "a" / "report.md").read_text()


def test_images_dir_lists_and_excludes_unreadable_files(trained, tmp_path):
    folder = tmp_path / "hospital"
    shutil.copytree(trained["sources"] / "test", folder)
    (folder / "PNEUMONIA" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "NORMAL" / "a|b.png").write_bytes(b"")
    (folder / "notes.txt").write_text("=HYPERLINK(\"x\")")
    metrics = evaluate.evaluate(evaluate_config.EvaluateConfig(
        model_path=str(trained["model"]), images_dir=str(folder), output_dir=str(tmp_path / "out"),
        bootstrap_samples=0))
    reasons = {Path(e["path"]).name: e["error"] for e in metrics["source"]["unreadable"]}
    assert metrics["source"]["num_unreadable"] == 3 and set(reasons) == {"broken.png", "a|b.png", "notes.txt"}
    assert metrics["n"] == sum(SPLIT_SIZES["test"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "3 unreadable file(s) excluded" in report and "broken.png" in report
    assert "a\\|b.png" in report  # escaped: the table keeps its columns
    assert "=HYPERLINK" not in (tmp_path / "out" / "report.md").read_text().replace("'=HYPERLINK", "")


def test_images_dir_needs_a_model_with_a_contract(tmp_path):
    model_path = tmp_path / "plain.keras"
    eval_fixtures.tiny_model().save(model_path)
    (tmp_path / "imgs" / "NORMAL").mkdir(parents=True)
    (tmp_path / "imgs" / "PNEUMONIA").mkdir()
    with pytest.raises(ValueError, match="carries no contract"):
        evaluate.evaluate(evaluate_config.EvaluateConfig(model_path=str(model_path), images_dir=str(tmp_path / "imgs"),
                                                  output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# The contract itself, without training ----------------------------------------------------------


def test_contract_layer_survives_save_and_safe_load_and_changes_no_output(tmp_path):
    import keras

    stored = {"image_size": IMAGE_SIZE, "resize": "pad", "operating_threshold": 0.25, "temperature": 1.5}
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
    layers = [keras.layers.Conv2D(2, 3), keras.layers.GlobalAveragePooling2D(),
              keras.layers.Dense(1, activation="sigmoid")]

    def head(x):
        for layer in layers:
            x = layer(x)
        return x

    with_contract = keras.Model(inputs, head(contract.ModelContract(stored, name=contract.LAYER_NAME)(inputs)))
    without = keras.Model(inputs, head(inputs))
    images = np.stack([helpers.labelled_image(i % 2, i, IMAGE_SIZE) for i in range(3)]).astype(np.float32)
    np.testing.assert_array_equal(with_contract.predict_on_batch(images), without.predict_on_batch(images))
    path = tmp_path / "m.keras"
    with_contract.save(path)
    loaded = loading.load_model(str(path))
    assert contract.read(loaded) == stored and contract.read(without) is None
    np.testing.assert_array_equal(loaded.predict_on_batch(images), without.predict_on_batch(images))
    contract.update(loaded, temperature=2.0)
    assert contract.read(loaded)["temperature"] == 2.0
    with pytest.raises(ValueError):
        contract.update(loaded, temperature=float("nan"))  # a file must hold what JSON can
    with pytest.raises(ValueError, match="carries no contract"):
        contract.update(without, temperature=1.0)


def test_resolve_takes_any_agreeing_source_and_names_both_sides_of_a_contradiction():
    stored = {"resize": "pad", "record_encoding": "jpeg", "jpeg_quality": 90, "operating_threshold": 0.3}
    dataset = {"resize": "pad", "record_encoding": "jpeg", "jpeg_quality": 90}
    given = {"resize": None, "record_encoding": "jpeg", "jpeg_quality": None, "threshold": None}
    assert contract.resolve(stored, dataset, given, "m.keras") == {
        "resize": "pad", "record_encoding": "jpeg", "jpeg_quality": 90, "threshold": 0.3}
    assert contract.resolve(None, None, {"resize": None, "threshold": 0.7}) == {"resize": None, "threshold": 0.7}
    with pytest.raises(ValueError, match=r"--data_dir: d/manifest.json was built with cxr-build-tfrecords "
                                         r"--encoding=png contradicts the contract stored in m.keras"):
        contract.resolve(stored, {"record_encoding": "png"}, {"record_encoding": None}, "m.keras", "d/manifest.json")
    with pytest.raises(ValueError, match=r"--threshold=0.5 contradicts .*operating_threshold=0.3"):
        contract.resolve(stored, None, {"threshold": 0.5}, "m.keras")
