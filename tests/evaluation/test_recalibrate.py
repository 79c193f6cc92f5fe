"""cxr-recalibrate's library: a planted miscalibration is recovered, and every refusal names its reason."""

from __future__ import annotations

import math
import os
import types

import numpy as np
import pytest

from cxr_tfdata.evaluation import recalibrate
from cxr_tfdata.evaluation.inference import SplitPredictions
from cxr_tfdata.files import output_safety
from cxr_tfdata.metrics import calibration

PLANTED_TEMPERATURE, PLANTED_INTERCEPT = 2.0, -0.8


def _config(tmp_path, **values) -> recalibrate.RecalibrateConfig:
    return recalibrate.RecalibrateConfig(**{"model_path": str(tmp_path / "m.keras"),
                                            "output_model": str(tmp_path / "new.keras"),
                                            "images_dir": str(tmp_path / "site"), "bootstrap_samples": 100, **values})


def _planted(n_patients: int, seed: int = 0) -> SplitPredictions:
    """Raw probabilities whose true calibration is sigmoid(logit(p) / 2 - 0.8), two images per patient."""
    rng = np.random.default_rng(seed)
    z = np.repeat(rng.normal(0.0, 1.0, n_patients), 2) * 3.0 + rng.normal(0.0, 1.0, 2 * n_patients)
    labels = (rng.random(z.size) < calibration.sigmoid(z / PLANTED_TEMPERATURE + PLANTED_INTERCEPT)).astype(np.int64)
    return SplitPredictions([f"{i}.png" for i in range(z.size)], [f"P{i // 2}" for i in range(z.size)], labels,
                            calibration.sigmoid(z).astype(np.float32))


def test_a_planted_temperature_and_intercept_are_recovered_within_10_percent(tmp_path):
    contract = {"temperature": 1.0, "logit_shift": 0.0, "operating_threshold": 0.5}
    values, site = recalibrate.fit_site(_config(tmp_path), _planted(2000), contract, None, [])
    assert values["temperature"] == pytest.approx(PLANTED_TEMPERATURE, rel=0.1)
    assert values["logit_shift"] == pytest.approx(PLANTED_INTERCEPT, rel=0.1)
    assert "operating_threshold" not in values  # no --target_recall: the stored threshold is kept
    assert site["refitted"] == ["temperature", "logit_shift"] and site["images"] == 4000
    assert site["patients_per_class"]["NORMAL"] > 10 and site["resampled_by"] == "patient"
    # Cross-fitted figures: the fit beats the stored (identity) calibration, with a paired interval.
    assert site["change"]["nll"]["value"] < 0 and site["change"]["nll"]["high"] < 0
    assert site["cross_fitted"]["nll"]["value"] >= site["in_sample"]["nll"]["value"] - 1e-12


def test_target_recall_re_chooses_the_threshold_cross_fitted(tmp_path):
    contract = {"temperature": 1.0, "logit_shift": 0.0, "operating_threshold": 0.5}
    values, site = recalibrate.fit_site(_config(tmp_path, target_recall=0.9), _planted(300), contract, None, [])
    assert values["target_recall"] == 0.9 and site["threshold"]["in_sample_recall"]["value"] >= 0.9
    assert "operating_threshold" in site["refitted"] and site["threshold"]["cross_fitted_recall"]["low"] is not None


def test_too_small_a_sample_is_refused_with_the_minimum(tmp_path):
    with pytest.raises(ValueError, match=r"--images_dir=.*refused: .*fewer than the minimum 30"):
        recalibrate.fit_site(_config(tmp_path), _planted(20), {"temperature": 1.0}, None, [])


@pytest.mark.parametrize("values, flag", [
    ({"output_model": "new.h5"}, "--output_model"), ({"folds": 1}, "--folds"), ({"target_recall": 0.0}, "--target_recall"),
    ({"data_dir": "d"}, "--data_dir"), ({"images_dir": "", "data_dir": "d"}, "--split"),
    ({"bootstrap_samples": -1}, "--bootstrap_samples"), ({"method": "slope"}, "--refit")])
def test_bad_flags_are_refused_naming_the_flag(tmp_path, values, flag):
    with pytest.raises(ValueError, match=f"^{flag}"):
        _config(tmp_path, **values)


def test_the_output_may_never_be_the_input_model_or_an_existing_file(tmp_path):
    (tmp_path / "m.keras").write_bytes(b"model")
    with pytest.raises(output_safety.UnsafeOutputError, match="same path as --model"):
        recalibrate.recalibrate(_config(tmp_path, output_model=str(tmp_path / "m.keras")))
    os.symlink(tmp_path / "m.keras", tmp_path / "link.keras")
    with pytest.raises(output_safety.UnsafeOutputError, match="same path as --model"):
        recalibrate.recalibrate(_config(tmp_path, output_model=str(tmp_path / "link.keras")))
    (tmp_path / "new.keras").write_bytes(b"other")
    with pytest.raises(FileExistsError, match="--output_model: .* already exists"):
        recalibrate.recalibrate(_config(tmp_path))
    assert (tmp_path / "m.keras").read_bytes() == b"model" and (tmp_path / "new.keras").read_bytes() == b"other"


def test_a_sample_from_the_training_data_is_refused(tmp_path):
    contract = {"dataset_fingerprint": "abc", "threshold_chosen_on": "val", "data": {"source": str(tmp_path / "src")}}
    info = types.SimpleNamespace(fingerprint="abc")
    for split in ("train", "val"):
        with pytest.raises(ValueError, match=f"--split={split}: .*same fingerprint abc"):
            recalibrate.check_not_training_data(_config(tmp_path, images_dir="", data_dir="d", split=split),
                                                contract, info)
    recalibrate.check_not_training_data(_config(tmp_path, images_dir="", data_dir="d", split="test"), contract, info)
    recalibrate.check_not_training_data(_config(tmp_path, images_dir="", data_dir="d", split="val"), contract,
                                        types.SimpleNamespace(fingerprint="other"))
    (tmp_path / "src" / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(ValueError, match="--images_dir=.* lies in .*train"):
        recalibrate.check_not_training_data(_config(tmp_path, images_dir=str(tmp_path / "src" / "train")), contract,
                                            None)


def test_the_stored_calibration_becomes_the_start_and_the_before_figure(tmp_path):
    predictions = _planted(300)
    contract = {"temperature": PLANTED_TEMPERATURE, "logit_shift": PLANTED_INTERCEPT}
    _, site = recalibrate.fit_site(_config(tmp_path, bootstrap_samples=0), predictions, contract, None, [])
    before = calibration.apply_temperature(predictions.probabilities, PLANTED_TEMPERATURE, PLANTED_INTERCEPT)
    assert site["before"]["nll"]["value"] == pytest.approx(calibration.nll(predictions.labels, before))
    assert site["before"]["nll"]["low"] is None and math.isfinite(site["cross_fitted"]["ece"]["value"])
