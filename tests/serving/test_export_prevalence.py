"""cxr-export --prevalence=P: the contract every exported format embeds records the calibration as exported,
so a reader of the export (cxr-predict --model=<export>) and the SavedModel's own calibrated_probability
give one calibrated answer, at P, equal to the .keras model read with --prevalence=P."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cxr_tfdata.core import contract_values
from cxr_tfdata.metrics import calibration
from cxr_tfdata.modeling import contract, feeding, image_scoring, loading, runtimes
from cxr_tfdata.modeling import portable_formats as pf
from cxr_tfdata.serving import export, quantization_guard
from tests import eval_fixtures, helpers
from tests.evaluation import recalibrate_inputs

PREVALENCE = 0.3
FORMATS = ("saved_model", "onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    setup = eval_fixtures.get_tiny_setup(tmp_path_factory)
    root = tmp_path_factory.mktemp("export_prevalence")
    model_path = recalibrate_inputs.model_with_contract(setup, root / "model.keras")
    with open(model_path, "rb") as f:
        keras_bytes = f.read()
    for fmt in FORMATS:
        export.export(export.ExportConfig(model_path=str(model_path), output_dir=str(root / fmt), format=fmt,
                                          prevalence=PREVALENCE))
    with open(model_path, "rb") as f:
        assert f.read() == keras_bytes  # the input model is never modified
    # Image files (the val split's pixels as PNGs), read as cxr-predict reads them and served as bytes.
    val, _ = next(quantization_guard._batches(str(setup.data_dir), "val", eval_fixtures.IMAGE_SIZE))
    images = [helpers.encode_png(np.asarray(p, np.uint8)) for p in val]
    for i, data in enumerate(images):
        (root / f"{i}.png").write_bytes(data)
    records = feeding.resolve_reading(loading.load_model(str(model_path)), str(model_path)).records
    pixels = np.stack([image_scoring.load_image(str(root / f"{i}.png"), eval_fixtures.IMAGE_SIZE,
                                                records.resize == "pad", records.record_encoding,
                                                records.jpeg_quality) for i in range(len(images))])
    return root, model_path, pixels.astype(np.float32), images


def _calibrated(model, path: str, pixels: np.ndarray, prevalence: float | None = None):
    reading = feeding.resolve_reading(model, path, prevalence=prevalence)
    raw = np.asarray(model.predict_on_batch(pixels), np.float64).reshape(-1)
    return reading, calibration.apply_temperature(raw, reading.temperature, reading.calibration_shift)


def _keras(model_path, pixels):
    model = loading.load_model(str(model_path))
    return _calibrated(model, str(model_path), pixels, PREVALENCE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_readers_of_the_export_report_the_exported_prevalence(exported, fmt):
    root, model_path, pixels, _ = exported
    keras_reading, expected = _keras(model_path, pixels)
    assert keras_reading.prevalence.assumed == PREVALENCE and keras_reading.prevalence.shift != 0.0
    model = runtimes.open_model(str(root / fmt))
    assert isinstance(model, runtimes.PortableModel) and model.format == fmt
    stored = model.contract
    original = contract.read(loading.load_model(str(model_path)))
    assert stored["calibrated_prevalence"] == PREVALENCE
    assert stored["calibrated_prevalence_source"] == "cxr-export --prevalence"
    assert stored["logit_shift"] == pytest.approx(original["logit_shift"] + keras_reading.prevalence.shift, abs=1e-12)
    assert contract_values.calibration_prevalence(stored).value == PREVALENCE
    reading, got = _calibrated(model, str(root / fmt), pixels)
    assert reading.prevalence.assumed == PREVALENCE and reading.prevalence.shift == 0.0
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # A further --prevalence moves from P: restating at the train prevalence gives the .keras model's own.
    train = original["train_prevalence"]
    again, restated = _calibrated(model, str(root / fmt), pixels, train)
    assert again.prevalence.stored == PREVALENCE
    _, as_stored = _calibrated(loading.load_model(str(model_path)), str(model_path), pixels)
    np.testing.assert_allclose(restated, as_stored, atol=1e-5)


def test_the_savedmodel_graph_applies_the_shift_once(exported):
    import tensorflow as tf

    root, model_path, pixels, images = exported
    _, expected = _keras(model_path, pixels)
    serve = tf.saved_model.load(str(root / "saved_model")).signatures[export.SIGNATURE_KEY]
    out = serve(**{export.INPUT_KEY: tf.constant(images)})
    assert [e.decode() for e in out[export.ERROR_KEY].numpy()] == [""] * len(images)
    np.testing.assert_allclose(out[export.CALIBRATED_KEY].numpy(), expected, atol=1e-5)
    # ... and equal to what a reader of the same SavedModel reports from its raw probabilities.
    model = runtimes.open_model(str(root / "saved_model"))
    reading = feeding.resolve_reading(model, str(root / "saved_model"))
    from_served = calibration.apply_temperature(out[export.OUTPUT_KEY].numpy().astype(np.float64),
                                                reading.temperature, reading.calibration_shift)
    np.testing.assert_allclose(out[export.CALIBRATED_KEY].numpy(), from_served, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_description_states_the_exported_calibration(exported, fmt):
    root, model_path, _, _ = exported
    folder = str(root / fmt)
    path = os.path.join(folder, "assets" if fmt == "saved_model" else "", pf.DESCRIPTION_FILE)
    with open(path, encoding="utf-8") as f:
        described = json.load(f)
    assert described["prevalence"] == PREVALENCE
    assert described["contract"]["calibrated_prevalence"] == PREVALENCE
    # The top-level figures still add up to the exported calibration.
    assert described["logit_shift"] + described["prevalence_shift"] == pytest.approx(
        described["contract"]["logit_shift"], abs=1e-12)


def test_without_prevalence_the_contract_is_embedded_unchanged(exported, tmp_path):
    _, model_path, _, _ = exported
    export.export(export.ExportConfig(model_path=str(model_path), output_dir=str(tmp_path / "plain"), format="onnx"))
    model = runtimes.open_model(str(tmp_path / "plain"))
    assert model.contract == contract.read(loading.load_model(str(model_path)))
    assert "calibrated_prevalence" not in model.contract


def test_the_exported_prevalence_is_read_before_a_site_sample_and_train_prevalence():
    values = {"temperature": 1.5, "logit_shift": -0.3, "train_prevalence": 0.6,
              "site_calibration": {"sample_prevalence": 0.5}}
    assert contract_values.calibration_prevalence(values).value == 0.5
    exported = {**values, "calibrated_prevalence": PREVALENCE, "calibrated_prevalence_source": "cxr-export --prevalence"}
    read = contract_values.calibration_prevalence(exported)
    assert read.value == PREVALENCE and "cxr-export --prevalence" in read.source
    assert feeding.resolve_prevalence(exported, "export", PREVALENCE).shift == 0.0
