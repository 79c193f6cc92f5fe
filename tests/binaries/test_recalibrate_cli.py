"""cxr-recalibrate end to end, as a user runs it: a new model with the site calibration, the input model
untouched, and predict, evaluate and export of the new model agreeing on every image."""

from __future__ import annotations

import csv
import hashlib
import io
import json

import numpy as np
import pytest

from tests import eval_fixtures
from tests.evaluation import recalibrate_inputs


@pytest.fixture(scope="module")
def recalibrated(tmp_path_factory):
    setup = eval_fixtures.get_tiny_setup(tmp_path_factory)
    root = tmp_path_factory.mktemp("recalibrate")
    model = recalibrate_inputs.model_with_contract(setup, root / "sealed.keras")
    site = recalibrate_inputs.site_folder(root / "site")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    result = eval_fixtures.run_cli("cxr_tfdata.cli.recalibrate", f"--model={model}", f"--images_dir={site}",
                                   f"--output_model={root / 'site.keras'}", "--folds=3", "--bootstrap_samples=50")
    assert result.returncode == 0, result.stderr[-2000:]
    return root, model, site, digest, result


def test_the_new_model_carries_the_site_calibration_and_the_input_is_untouched(recalibrated):
    from cxr_tfdata.modeling import contract, loading

    root, model, _, digest, result = recalibrated
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest
    stored = contract.read(loading.load_model(str(root / "site.keras")))
    site = stored["site_calibration"]
    assert site["written_by"] == "cxr-recalibrate" and site["images"] == 80 and site["date"]
    assert site["patients_per_class"] == {"NORMAL": 20, "PNEUMONIA": 20}
    assert site["data"]["kind"] == "images_dir" and site["refitted"] == ["temperature", "logit_shift"]
    assert stored["temperature"] == site["final"]["temperature"] and stored["logit_shift"] == site["final"]["intercept"]
    assert stored["operating_threshold"] == recalibrate_inputs.STORED["operating_threshold"]
    for key in ("ece", "nll", "brier"):
        assert site["cross_fitted"][key]["low"] is not None
    assert "Cross-fitted by patient" in result.stdout and "Operating threshold kept" in result.stdout


def test_refusals_leave_no_output(recalibrated, tmp_path):
    root, model, site, digest, _ = recalibrated
    same = eval_fixtures.run_cli("cxr_tfdata.cli.recalibrate", f"--model={model}", f"--images_dir={site}",
                                 f"--output_model={model}")
    assert same.returncode != 0 and "same path as --model" in same.stderr
    small = recalibrate_inputs.site_folder(tmp_path / "small", per_class=12)
    refused = eval_fixtures.run_cli("cxr_tfdata.cli.recalibrate", f"--model={model}", f"--images_dir={small}",
                                    f"--output_model={tmp_path / 'new.keras'}")
    assert refused.returncode != 0 and "fewer than the minimum 30" in refused.stderr
    assert not (tmp_path / "new.keras").exists() and hashlib.sha256(model.read_bytes()).hexdigest() == digest


def test_predict_evaluate_and_export_agree_per_image(recalibrated, tmp_path):
    import tensorflow as tf

    from cxr_tfdata.evaluation import evaluate, evaluate_config
    from cxr_tfdata.serving import export, predict

    root, _, site, _, _ = recalibrated
    new_model = str(root / "site.keras")
    rows = predict.predict(predict.PredictConfig(model_path=new_model, paths=(str(site),)), io.StringIO())
    predicted = {row.path.rsplit("/", 1)[-1]: row.calibrated_probability for row in rows}
    evaluate.evaluate(evaluate_config.EvaluateConfig(model_path=new_model, images_dir=str(site),
                                                     output_dir=str(tmp_path / "eval"), bootstrap_samples=20))
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        evaluated = {r["filename"].rsplit("/", 1)[-1]: float(r["calibrated_probability"]) for r in csv.DictReader(f)}
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["calibration"]["prevalence"] == pytest.approx(0.5)
    assert "stored in the model (refitted on a site's sample" in metrics["calibration"]["temperature_source"]
    out = export.export(export.ExportConfig(model_path=new_model, output_dir=str(tmp_path / "export")))
    serve = tf.saved_model.load(out).signatures["serving_default"]
    paths = [row.path for row in rows]
    served = serve(image_bytes=tf.constant([open(p, "rb").read() for p in paths]))["calibrated_probability"].numpy()
    names = [p.rsplit("/", 1)[-1] for p in paths]
    assert set(names) == set(evaluated)
    np.testing.assert_allclose([predicted[n] for n in names], [evaluated[n] for n in names], atol=1e-6)
    np.testing.assert_allclose(served, [predicted[n] for n in names], atol=1e-5)
