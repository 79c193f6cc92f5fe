"""Tests of cxr_tfdata.serving.predict: same probabilities as the evaluation, bad files on their rows, Grad-CAM."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from cxr_tfdata.evaluation import inference
from cxr_tfdata.modeling import feeding, image_scoring, loading
from cxr_tfdata.serving import gradcam, predict
from tests import eval_fixtures, helpers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return eval_fixtures.get_tiny_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def model(setup):
    return loading.load_model(str(setup.model_path))


@pytest.fixture(scope="module")
def test_split(setup, model):
    """The evaluation's predictions on the test split, and its records written out as PNG files."""
    predictions = inference.predict_split(model, str(setup.data_dir), "test", 32, batch_size=6)
    return predictions, eval_fixtures.split_records(setup.data_dir, "test")


def _write_record_files(records, folder):
    paths = {}
    for record in records:
        path = folder / record["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(record["image"])
        paths[record["filename"]] = str(path)
    return paths


def test_probabilities_equal_evaluation(test_split, model, tmp_path):
    predictions, records = test_split
    paths = _write_record_files(records, tmp_path / "images")
    rows = image_scoring.predict_rows(model, list(paths.values()), 32, pad=False, threshold=0.5, batch_size=5)
    by_path = {row.path: row for row in rows}
    for filename, probability in zip(predictions.filenames, predictions.probabilities, strict=True):
        row = by_path[paths[filename]]
        assert row.error == ""
        assert row.probability == pytest.approx(float(probability), abs=1e-5)
        assert row.label == ("PNEUMONIA" if row.probability >= 0.5 else "NORMAL")


def test_decode_and_resize_is_identity_at_model_size(tmp_path):
    pixels = helpers.labelled_image(1, 7, 32)
    path = tmp_path / "x.png"
    path.write_bytes(helpers.encode_png(pixels))
    np.testing.assert_array_equal(image_scoring.load_image(str(path), 32, pad=False), pixels)


def test_jpeg_records_round_trip_gives_the_pixels_the_pipeline_decodes(tmp_path):
    import tensorflow as tf

    from cxr_tfdata.core import imaging
    from cxr_tfdata.data import input_pipeline

    source = np.random.default_rng(1).integers(0, 255, (61, 47), dtype=np.uint8)
    path = tmp_path / "source.png"
    Image.fromarray(source, "L").save(path)
    record = imaging.convert(path.read_bytes(), imaging.EncodeOptions(32, encoding="jpeg", jpeg_quality=90))
    seen_in_training = input_pipeline.decode_image(tf.constant(record.encoded), tf.constant("x"), 32).numpy()
    loaded = image_scoring.load_image(str(path), 32, pad=False, record_encoding="jpeg", jpeg_quality=90)
    np.testing.assert_array_equal(loaded, seen_in_training)
    assert not np.array_equal(image_scoring.load_image(str(path), 32, pad=False, record_encoding="png"), loaded)
    with pytest.raises(ValueError, match="--record_encoding"):
        predict.PredictConfig(model_path="m.keras", paths=("x",), record_encoding="webp")


def test_any_size_and_format(model, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "colour.jpg", quality=90)
    Image.fromarray(rgb[..., 0], "L").save(tmp_path / "gray.bmp")
    rows = image_scoring.predict_rows(model, [str(tmp_path / "colour.jpg"), str(tmp_path / "gray.bmp")],
                                32, pad=True, threshold=0.5, batch_size=4)
    assert [row.error for row in rows] == ["", ""]
    assert all(0.0 <= row.probability <= 1.0 for row in rows)


def test_bad_files_reported_and_rest_go_on(setup, tmp_path):
    good = tmp_path / "in" / "sub" / "good.png"
    good.parent.mkdir(parents=True)
    good.write_bytes(helpers.encode_png(helpers.labelled_image(0, 1, 32)))
    encoded = helpers.encode_png(helpers.labelled_image(1, 2, 32))
    (tmp_path / "in" / "corrupt.png").write_bytes(encoded[: len(encoded) // 2])  # truncated
    (tmp_path / "in" / "notes.txt").write_text("not an image: reported on its row, not dropped")
    (tmp_path / "in" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: not an input
    (tmp_path / "empty.jpg").write_bytes(b"")
    config = predict.PredictConfig(
        model_path=str(setup.model_path),
        paths=(str(tmp_path / "in"), str(tmp_path / "empty.jpg"), str(tmp_path / "missing.png")),
        output_csv=str(tmp_path / "out" / "predictions.csv"),
    )
    predict.predict(config, io.StringIO())
    with open(config.output_csv, newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    assert list(next(iter(rows.values())).keys()) == list(predict.CSV_COLUMNS)
    assert set(rows) == {str(tmp_path / "in" / "corrupt.png"), str(good), str(tmp_path / "empty.jpg"),
                         str(tmp_path / "missing.png"), str(tmp_path / "in" / "notes.txt")}
    assert "not a recognised image" in rows[str(tmp_path / "in" / "notes.txt")]["error"]
    assert rows[str(good)]["error"] == "" and 0.0 <= float(rows[str(good)]["probability"]) <= 1.0
    assert rows[str(good)]["label"] in ("NORMAL", "PNEUMONIA")
    assert "truncated" in rows[str(tmp_path / "in" / "corrupt.png")]["error"]
    assert "empty" in rows[str(tmp_path / "empty.jpg")]["error"]
    assert "no such file" in rows[str(tmp_path / "missing.png")]["error"]
    for path in (tmp_path / "in" / "corrupt.png", tmp_path / "empty.jpg", tmp_path / "missing.png"):
        assert rows[str(path)]["probability"] == "" and rows[str(path)]["label"] == ""


def test_gradcam_on_nested_base(setup, model, tmp_path):
    layer = gradcam.find_gradcam_layer(model)
    assert layer.name == "tiny_base"  # the nested base's 4-D output, not a preprocessing layer
    images = np.stack([helpers.labelled_image(label, i, 32) for i, label in enumerate((0, 1, 1))])
    heatmaps = gradcam.gradcam_heatmaps(model, images)
    assert heatmaps.shape == (3, 32, 32)
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert heatmaps[1].max() == pytest.approx(1.0)
    rows = [image_scoring.PredictionRow(path=f"/x/img{i}.png", pixels=image) for i, image in enumerate(images)]
    rows.append(image_scoring.PredictionRow(path="/y/img0.png", pixels=images[0]))
    rows.append(image_scoring.PredictionRow(path="/y/bad.png", error="corrupt"))
    written = gradcam.write_gradcams(model, rows, str(tmp_path / "cams"), batch_size=2)
    assert sorted(p.rsplit("/", 1)[1] for p in written) == [
        "img0_gradcam.png", "img0_gradcam_1.png", "img1_gradcam.png", "img2_gradcam.png"]
    # The sources are not on disk: each panel is drawn on the model input, upscaled to be readable.
    with Image.open(written[0]) as panel:
        assert panel.mode == "RGB"
        assert panel.width >= 2 * gradcam.MIN_LONG_SIDE and panel.height > gradcam.MIN_LONG_SIDE


def test_gradcam_searches_inside_a_pooled_base():
    pooled = eval_fixtures.tiny_model(pooled_base=True)
    assert gradcam.find_gradcam_layer(pooled).name == "conv2"
    heatmaps = gradcam.gradcam_heatmaps(pooled, np.stack([helpers.labelled_image(1, 3, 32)]))
    assert heatmaps.shape == (1, 32, 32) and np.isfinite(heatmaps).all()
    # The temporary capture is undone: the layer's call is the class method again.
    assert "call" not in vars(pooled.get_layer("tiny_base").get_layer("conv2"))


def test_gradcam_on_flat_model():
    import keras

    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="only_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    flat = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    assert gradcam.find_gradcam_layer(flat).name == "only_conv"
    heatmaps = gradcam.gradcam_heatmaps(flat, np.stack([helpers.labelled_image(0, 1, 32)]))
    assert heatmaps.shape == (1, 32, 32)


def test_predict_config_rejects_bad_flags():
    with pytest.raises(ValueError, match="--resize"):
        predict.PredictConfig(model_path="m", paths=("x",), resize="crop")
    with pytest.raises(ValueError, match="no image files"):
        predict.PredictConfig(model_path="m", paths=())


def _dataset_manifest(folder, image_size=32, **build_flags) -> str:
    """A dataset folder holding only what --data_dir reads: manifest.json with the builder's flags, beside
    the tensorflow-datasets metadata files every tool requires (their content is not read here)."""
    import json

    from cxr_tfdata.core import dataset_info, record_schema

    folder.mkdir(parents=True, exist_ok=True)
    flags = {"image_size": image_size, "resize": "squash", "encoding": "jpeg", "jpeg_quality": 95, **build_flags}
    manifest = {"format_version": 1, "image_size": image_size, "channels": 1, "encoding": flags["encoding"],
                "resize": flags["resize"], "class_names": list(record_schema.CLASS_NAMES), "splits": {},
                "flags": flags}
    (folder / dataset_info.MANIFEST_FILENAME).write_text(json.dumps(manifest))
    for name in dataset_info.TFDS_METADATA_FILES:
        (folder / name).write_text("{}")
    return str(folder)


def test_record_settings_come_from_the_manifest_and_conflicts_are_refused(tmp_path):
    """A model without a contract: --data_dir's manifest, else the flags given, else the defaults."""
    from cxr_tfdata.core import imaging

    model = eval_fixtures.tiny_model()
    data_dir = _dataset_manifest(tmp_path / "data", resize="pad", encoding="jpeg", jpeg_quality=80)
    built = feeding.RecordSettings(resize="pad", record_encoding="jpeg", jpeg_quality=80)
    assert feeding.resolve_reading(model, "m.keras", data_dir).records == built
    assert feeding.resolve_reading(model, "m.keras", data_dir, resize="pad", record_encoding="jpeg",
                                   jpeg_quality=80).records == built
    for given, message in (({"resize": "squash"}, "--resize=squash contradicts --data_dir: .*--resize=pad"),
                           ({"record_encoding": "png"}, "--record_encoding=png contradicts .*--encoding=jpeg"),
                           ({"jpeg_quality": 95}, "--jpeg_quality=95 contradicts .*--jpeg_quality=80")):
        with pytest.raises(ValueError, match=message) as error:
            feeding.resolve_reading(model, "m.keras", data_dir, **given)
        assert str(tmp_path / "data" / "manifest.json") in str(error.value)
    # Without --data_dir: what was given, else the builder's defaults; labels at 0.5.
    default = feeding.resolve_reading(model, "m.keras")
    assert default.records == feeding.RecordSettings(
        imaging.DEFAULT_RESIZE, imaging.DEFAULT_ENCODING, imaging.DEFAULT_JPEG_QUALITY)
    assert (default.threshold, default.temperature, default.contract) == (0.5, None, None)
    assert feeding.resolve_reading(model, "m.keras", resize="pad", record_encoding="png").records == (
        feeding.RecordSettings("pad", "png", imaging.DEFAULT_JPEG_QUALITY))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        feeding.resolve_reading(model, "m.keras", str(tmp_path / "not_a_dataset"))


def test_data_dir_of_another_image_size_is_refused(setup, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(helpers.encode_png(helpers.labelled_image(1, 3, 32)))
    config = predict.PredictConfig(model_path=str(setup.model_path), paths=(str(image),),
                                   data_dir=_dataset_manifest(tmp_path / "data64", image_size=64))
    with pytest.raises(ValueError, match="image size mismatch.*data64"):
        predict.predict(config, io.StringIO())
