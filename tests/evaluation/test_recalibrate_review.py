"""cxr-recalibrate after review: the stored threshold's figures are the cross-fitted ones, a sample sharing a
patient with the training records is refused, another key only warns, and --redact_paths keeps every
sample path out of the new model."""

from __future__ import annotations

import io
import logging
import os
import zipfile

import numpy as np
import pytest

from cxr_tfdata.core import contract_values, patient_keys
from cxr_tfdata.evaluation import recalibrate, results
from cxr_tfdata.evaluation.inference import SplitPredictions
from cxr_tfdata.metrics import calibration
from cxr_tfdata.modeling import contract as contract_lib
from tests import eval_fixtures
from tests.evaluation import recalibrate_inputs


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The tiny setup, a site folder, a site key outside it, and the sample's keyed patient hashes."""
    from cxr_tfdata.core import folder_scan

    setup = eval_fixtures.get_tiny_setup(tmp_path_factory)
    root = tmp_path_factory.mktemp("review")
    folder = recalibrate_inputs.site_folder(root / "site")
    key = patient_keys.load_key(str(root / "keys" / "site_key"))
    files, _, _ = folder_scan.scan_labelled_folder(str(folder))
    patients = sorted({f.patient_id for f in patient_keys.pseudonymize(files, key)})
    return setup, root, folder, key, patients


def _planted_patients(key_fingerprint: str, prefixes: list[str]) -> dict:
    return {"key_fingerprint": key_fingerprint, "splits": ["train", "val"], "hash": "test",
            "prefixes": sorted(prefixes)}


def _config(root, folder, key, output: str, **values) -> recalibrate.RecalibrateConfig:
    return recalibrate.RecalibrateConfig(model_path=str(root / values.pop("model")), output_model=str(root / output),
                                         images_dir=str(folder), patient_key_file=key.path, folds=3,
                                         bootstrap_samples=20, **values)


def test_the_stored_threshold_figures_are_the_cross_fitted_ones(tmp_path):
    rng = np.random.default_rng(3)
    z = np.repeat(rng.normal(0.0, 1.5, 150), 2) + rng.normal(0.0, 1.0, 300)
    labels = (rng.random(z.size) < calibration.sigmoid(z)).astype(np.int64)
    predictions = SplitPredictions([f"{i}.png" for i in range(z.size)], [f"P{i // 2}" for i in range(z.size)],
                                   labels, calibration.sigmoid(z).astype(np.float32))
    config = recalibrate.RecalibrateConfig(model_path=str(tmp_path / "m.keras"), output_model=str(tmp_path / "n.keras"),
                                           images_dir=str(tmp_path / "site"), target_recall=0.95,
                                           bootstrap_samples=50)
    values, site_block = recalibrate.fit_site(config, predictions, {"temperature": 1.0, "logit_shift": 0.0}, None, [])
    stored, threshold = values["threshold_val_metrics"], site_block["threshold"]
    assert stored["recall"] == threshold["cross_fitted_recall"]["value"]
    assert stored["specificity"] == threshold["cross_fitted_specificity"]["value"]
    assert (stored["recall"], stored["specificity"]) != (threshold["in_sample_recall"]["value"],
                                                         threshold["in_sample_specificity"]["value"])
    assert values["threshold_chosen_on"] == "site sample (cross-fitted by patient)"
    # What cxr-evaluate, its report and the model card read of it says where it came from.
    block = results.stored_threshold({**values, "operating_threshold": values["operating_threshold"]})
    assert block["val_recall"] == stored["recall"] and "cxr-recalibrate" in block["chosen_by"]
    assert "cross-fitted by patient" in block["chosen_by"] and "cxr-train" not in block["chosen_by"]
    assert block["val_measured_on"] == "the site sample (cross-fitted by patient)"
    assert contract_values.describe_threshold({"threshold_chosen_on": "val", "target_recall": 0.95}).startswith(
        "stored in the model: chosen by cxr-train on val")


def test_the_train_and_val_patients_are_read_from_the_records(site):
    from cxr_tfdata.core import dataset_info
    from cxr_tfdata.training import val_calibration

    setup = site[0]
    info = dataset_info.load(str(setup.data_dir))
    entry = val_calibration.training_patient_entry(info)
    expected = {r["patient_id"][:16] for split in ("train", "val")
                for r in eval_fixtures.split_records(setup.data_dir, split)}
    assert entry["prefixes"] == sorted(expected) and all(len(p) == 16 for p in entry["prefixes"])
    assert entry["key_fingerprint"] == info.manifest["patient_ids"]["key_fingerprint"]
    assert entry["splits"] == ["train", "val"]


def test_a_sample_sharing_patients_with_the_training_records_is_refused_naming_the_count(site):
    setup, root, folder, key, patients = site
    planted = _planted_patients(key.fingerprint, [p[:16] for p in patients[:3]] + ["0" * 16, "f" * 16])
    recalibrate_inputs.model_with_contract(setup, root / "shared.keras", training_patients=planted)
    with pytest.raises(ValueError, match=r"--images_dir=.*: 3 of the sample's 40 patients are among the 5 "
                                         r"train/val patients"):
        recalibrate.recalibrate(_config(root, folder, key, "shared_out.keras", model="shared.keras"))
    assert not (root / "shared_out.keras").exists()
    # The same key and no shared patient: accepted, and the contract says how it was checked.
    none_shared = _planted_patients(key.fingerprint, ["0" * 16, "f" * 16])
    assert recalibrate.check_patients(_config(root, folder, key, "x.keras", model="shared.keras"),
                                      {"training_patients": none_shared}, patients, key.fingerprint
                                      ).startswith("by keyed patient hash")


def test_another_key_fingerprint_warns_that_patients_cannot_be_compared(site, caplog):
    setup, root, folder, key, patients = site
    planted = _planted_patients("0123456789abcdef", [p[:16] for p in patients])  # would all match, other key
    recalibrate_inputs.model_with_contract(setup, root / "other_key.keras", training_patients=planted)
    with caplog.at_level(logging.WARNING):
        result = recalibrate.recalibrate(_config(root, folder, key, "other_key_out.keras", model="other_key.keras"))
    checked = result["patients_checked_against_training"]
    assert checked.startswith("not by patient") and "0123456789abcdef" in checked and key.fingerprint in checked
    assert "cannot be compared" in caplog.text and "0123456789abcdef" in caplog.text


def test_redact_paths_leaves_no_raw_sample_path_in_the_new_model(site, caplog):
    from cxr_tfdata.modeling import loading

    setup, root, folder, key, _ = site
    recalibrate_inputs.model_with_contract(setup, root / "plain.keras")
    output = root / "redacted.keras"
    with caplog.at_level(logging.INFO):
        recalibrate.recalibrate(_config(root, folder, key, "redacted.keras", model="plain.keras", redact_paths=True,
                                        target_recall=0.8))
    raw = output.read_bytes()
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        contents = [raw] + [archive.read(name) for name in archive.namelist()]
    for path in {str(folder), os.path.realpath(folder), str(root / "plain.keras")}:
        assert not any(path.encode() in blob for blob in contents), path
        assert path not in caplog.text
    stored = contract_lib.read(loading.load_model(str(output)))
    site_block = stored["site_calibration"]
    assert site_block["data"]["path"] == key.path_name(str(folder)) and site_block["data"]["path_redacted"]
    assert site_block["patients_checked_against_training"].startswith("not by patient")  # planted no patients
    assert stored["threshold_val_metrics"]["recall"] == site_block["threshold"]["cross_fitted_recall"]["value"]
    assert stored["threshold_chosen_by"] == "cxr-recalibrate"
