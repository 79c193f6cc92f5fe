"""Tests of cxr_tfdata.export: the serving SavedModel answers like the evaluation, in a fresh process too."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cxr_tfdata import evaluate, export, model_io
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
print(sorted(result), result["probability"].dtype.name, "cxr_tfdata" in sys.modules)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return eval_fixtures.get_tiny_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    """The export of the tiny model, the test records' bytes (.npy), and the evaluation's probabilities."""
    root = tmp_path_factory.mktemp("export")
    result = eval_fixtures.run_cli(
        "cxr_tfdata.cli.export", f"--model={setup.model_path}", f"--output_dir={root / 'saved'}")
    assert result.returncode == 0, result.stderr
    model = model_io.load_model(str(setup.model_path))
    predictions = evaluate.predict_split(model, str(setup.data_dir), "test", 32, batch_size=8)
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
    assert result.stdout.strip().splitlines()[-1] == "['probability'] float32 False"
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
    decoded = export.decode_image_bytes(tf.constant(helpers.encode_png(pixels)), 32).numpy()
    np.testing.assert_array_equal(decoded, pixels.astype(np.float32))
    larger = export.decode_image_bytes(tf.constant(helpers.encode_png(np.full((64, 48), 77, np.uint8))), 32)
    np.testing.assert_array_equal(larger.numpy(), np.full((32, 32, 1), 77, np.float32))


def test_existing_output_refused_and_overwrite_replaces(setup, tmp_path):
    target = tmp_path / "saved"
    target.mkdir()
    (target / "keep.txt").write_text("not to be lost")
    model = model_io.load_model(str(setup.model_path))
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export_saved_model(model, str(target))
    assert (target / "keep.txt").exists()
    export.export_saved_model(model, str(target), overwrite=True)
    assert (target / "saved_model.pb").exists() and not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"], "staging directories left behind"


def test_export_refuses_unsafe_model(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 1))
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, keras.layers.Lambda(lambda x: x + 1.0)(inputs)).save(path)
    config = export.ExportConfig(model_path=str(path), output_dir=str(tmp_path / "out"))
    with pytest.raises(model_io.ModelLoadError, match="safe mode") as error:
        export.export(config)
    assert str(path) in str(error.value)
    assert not (tmp_path / "out").exists()
