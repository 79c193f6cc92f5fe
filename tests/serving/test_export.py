"""Tests of cxr_tfdata.serving.export: the serving SavedModel answers like the evaluation, in a fresh process too."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cxr_tfdata.evaluation import inference
from cxr_tfdata.modeling import feeding, image_scoring, loading
from cxr_tfdata.serving import export, imaging_in_graph
from tests import eval_fixtures, helpers

# Loads the SavedModel with TensorFlow alone (no cxr_tfdata import: the graph must be self-contained).
_FRESH_PROCESS_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
images = np.load(sys.argv[2], allow_pickle=True)
result = serve(image_bytes=tf.constant(list(images), dtype=tf.string))
np.save(sys.argv[3], result["probability"].numpy())
print(sorted(result), result["probability"].dtype.name, "cxr_tfdata" in sys.modules,
      sorted(set(result["error"].numpy().tolist())))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return eval_fixtures.get_tiny_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    """The export of the tiny model, the test records' bytes (.npy), and the evaluation's probabilities."""
    root = tmp_path_factory.mktemp("export")
    result = eval_fixtures.run_cli(
        "cxr_tfdata.cli.export", f"--model={setup.model_path}", f"--output_dir={root / 'saved'}",
        "--record_encoding=png")  # the tiny records are PNG
    assert result.returncode == 0, result.stderr
    model = loading.load_model(str(setup.model_path))
    predictions = inference.predict_split(model, str(setup.data_dir), "test", 32, batch_size=8)
    records = {r["filename"]: r for r in eval_fixtures.split_records(setup.data_dir, "test")}
    encoded = np.array([records[name]["image"] for name in predictions.filenames], dtype=object)
    np.save(root / "images.npy", encoded, allow_pickle=True)
    return root, predictions


def test_fresh_process_gives_evaluation_probabilities(exported):
    root, predictions = exported
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_SCRIPT, str(root / "saved"), str(root / "images.npy"),
         str(root / "fresh.npy")],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        "['calibrated_probability', 'error', 'label', 'probability'] float32 False [b'']")
    np.testing.assert_allclose(np.load(root / "fresh.npy"), predictions.probabilities, atol=1e-5)


def test_saved_model_cli_run(exported):
    root, predictions = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run(
        [cli, "run", "--dir", str(root / "saved"), "--tag_set", "serve",
         "--signature_def", "serving_default", "--inputs", f"image_bytes={root / 'images.npy'}",
         "--outdir", str(root / "cli_out")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Result for output key probability" in result.stdout
    probabilities = np.load(root / "cli_out" / "probability.npy")
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, predictions.probabilities, atol=1e-5)


def test_any_size_gray_or_colour_jpeg_or_png(exported):
    root, _ = exported
    serve = tf.saved_model.load(str(root / "saved")).signatures["serving_default"]
    rng = np.random.default_rng(0)
    encoded = []
    for size, mode, fmt in (((120, 90), "RGB", "JPEG"), ((17, 40), "L", "PNG"), ((64, 64), "RGBA", "PNG")):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8).squeeze()
        buf = io.BytesIO()
        Image.fromarray(pixels, mode).save(buf, format=fmt)
        encoded.append(buf.getvalue())
    probabilities = serve(image_bytes=tf.constant(encoded))["probability"].numpy()
    assert probabilities.shape == (3,) and np.all((probabilities >= 0) & (probabilities <= 1))
    empty = serve(image_bytes=tf.constant([], dtype=tf.string))["probability"].numpy()
    assert empty.shape == (0,)


def test_in_graph_decode_keeps_model_sized_pixels_exact():
    pixels = helpers.labelled_image(1, 5, 32)
    decoded = imaging_in_graph.decode_image_bytes(tf.constant(helpers.encode_png(pixels)), 32).numpy()
    np.testing.assert_array_equal(decoded, pixels.astype(np.float32))
    larger = imaging_in_graph.decode_image_bytes(tf.constant(helpers.encode_png(np.full((64, 48), 77, np.uint8))), 32)
    np.testing.assert_array_equal(larger.numpy(), np.full((32, 32, 1), 77, np.float32))


def test_existing_export_refused_and_overwrite_replaces_it(setup, tmp_path):
    target = tmp_path / "saved"
    model = loading.load_model(str(setup.model_path))
    export.export_saved_model(model, str(target))
    first = (target / "saved_model.pb").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export_saved_model(model, str(target))
    assert (target / "saved_model.pb").read_bytes() == first
    padded = feeding.resolve_reading(model, str(setup.model_path), resize="pad")
    export.export_saved_model(model, str(target), padded, overwrite=True)
    described = json.loads((target / "assets" / "cxr_export.json").read_text())
    assert described["resize"] == "pad" and described["written_by"] == "cxr-export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"], "staging directories left behind"


def test_export_refuses_unsafe_model(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 1))
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, keras.layers.Lambda(lambda x: x + 1.0)(inputs)).save(path)
    config = export.ExportConfig(model_path=str(path), output_dir=str(tmp_path / "out"))
    with pytest.raises(loading.ModelLoadError, match="safe mode") as error:
        export.export(config)
    assert str(path) in str(error.value)
    assert not (tmp_path / "out").exists()


def _bright_non_square(width: int, height: int, seed: int) -> np.ndarray:
    """A PNEUMONIA-like (bright) image whose letterbox borders are unmistakable black."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(170, 25, (height, width)), 40, 255).astype(np.uint8)


@pytest.mark.parametrize("width, height", [(70, 45), (24, 96), (33, 32), (101, 7)])
def test_in_graph_letterbox_has_the_converters_geometry(width, height):
    from cxr_tfdata.core import imaging

    encoded = helpers.encode_png(_bright_non_square(width, height, seed=width))
    converter, _ = imaging.decode_and_resize(encoded, 32, pad=True)
    in_graph = imaging_in_graph.decode_image_bytes(tf.constant(encoded), 32, pad=True).numpy()
    assert in_graph.shape == (32, 32, 1)
    # The black border is exactly where the converter puts it; inside, the filters differ slightly.
    np.testing.assert_array_equal(in_graph == 0, converter == 0)
    assert np.abs(in_graph - converter.astype(np.float32)).mean() < 3.0


def test_pad_export_matches_predict_with_resize_pad(setup, tmp_path):

    paths = []
    for i, (width, height) in enumerate(((24, 96), (96, 30), (50, 64))):
        path = tmp_path / f"image{i}.png"
        path.write_bytes(helpers.encode_png(_bright_non_square(width, height, seed=i)))
        paths.append(str(path))
    model = loading.load_model(str(setup.model_path))
    rows = image_scoring.predict_rows(model, paths, 32, pad=True, threshold=0.5, batch_size=4, record_encoding="png")
    expected = np.array([row.probability for row in rows], np.float32)
    encoded = tf.constant([open(p, "rb").read() for p in paths])
    served = {}
    for resize in ("pad", "squash"):
        config = export.ExportConfig(model_path=str(setup.model_path), output_dir=str(tmp_path / resize),
                                     resize=resize, record_encoding="png")
        serve = tf.saved_model.load(export.export(config)).signatures[export.SIGNATURE_KEY]
        served[resize] = serve(image_bytes=encoded)[export.OUTPUT_KEY].numpy()
    np.testing.assert_allclose(served["pad"], expected, atol=0.01)
    # The comparison can tell the two apart: squashing these images gives other probabilities.
    assert np.abs(served["squash"] - expected).max() > 0.05


def test_export_config_rejects_unknown_resize():
    with pytest.raises(ValueError, match="--resize"):
        export.ExportConfig(model_path="m.keras", output_dir="out", resize="crop")


def test_in_graph_jpeg_round_trip_gives_predicts_pixels(tmp_path):

    source = np.random.default_rng(3).integers(0, 255, (61, 47), dtype=np.uint8)
    path = tmp_path / "source.png"
    path.write_bytes(helpers.encode_png(source))
    for pad in (False, True):
        lossless = imaging_in_graph.decode_image_bytes(tf.constant(path.read_bytes()), 32, pad=pad).numpy()
        in_graph = imaging_in_graph.decode_image_bytes(tf.constant(path.read_bytes()), 32, pad=pad, jpeg_quality=80).numpy()
        expected = image_scoring.load_image(str(path), 32, pad=pad, record_encoding="jpeg", jpeg_quality=80)
        assert np.abs(in_graph - expected).mean() < 2.0
        # The round trip happened: noise does not survive JPEG at quality 80 unchanged.
        assert np.abs(in_graph - lossless).mean() > 2 * np.abs(in_graph - expected).mean()
