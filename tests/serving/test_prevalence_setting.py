"""--prevalence: one reading of the stated prevalence for predict, export and evaluate, moving the
calibrated logit by exactly logit(P) - logit(P_train) and never the operating threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_tfdata.core import contract_values
from cxr_tfdata.evaluation import results
from cxr_tfdata.evaluation.inference import SplitPredictions
from cxr_tfdata.metrics import calibration
from cxr_tfdata.modeling import feeding

CONTRACT = {"temperature": 1.7, "logit_shift": -0.4, "train_prevalence": 0.72, "operating_threshold": 0.3}


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def test_the_stated_prevalence_moves_the_calibrated_logit_exactly():
    setting = feeding.resolve_prevalence(CONTRACT, "m.keras", 0.4)
    assert setting.assumed == 0.4 and setting.stored == 0.72
    assert setting.shift == pytest.approx(_logit(0.4) - _logit(0.72), abs=1e-12)
    raw = np.linspace(0.01, 0.99, 50)
    as_stored = calibration.apply_temperature(raw, 1.7, -0.4)
    restated = calibration.apply_temperature(raw, 1.7, -0.4 + setting.shift)
    np.testing.assert_allclose(calibration.logit(restated) - calibration.logit(as_stored), setting.shift, atol=1e-9)
    assert "operating threshold applies to the raw probability and is unaffected" in setting.description


def test_without_prevalence_nothing_moves_and_the_stored_one_is_named():
    setting = feeding.resolve_prevalence(CONTRACT, "m.keras")
    assert (setting.assumed, setting.shift) == (0.72, 0.0) and "train_prevalence" in setting.source
    assert feeding.Reading(feeding.RecordSettings(), 0.3, "", 1.7, -0.4, CONTRACT).calibration_shift == -0.4


def test_an_older_contract_gives_its_train_split_share_from_the_class_counts():
    older = {"temperature": 1.0, "data": {"splits": {"train": {"class_counts": {"NORMAL": 25, "PNEUMONIA": 75}}}}}
    assert contract_values.calibration_prevalence(older).value == 0.75
    assert feeding.resolve_prevalence(older, "m.keras", 0.5).shift == pytest.approx(-_logit(0.75))
    site = {**CONTRACT, "site_calibration": {"sample_prevalence": 0.5}}
    assert feeding.resolve_prevalence(site, "m.keras", 0.5).shift == 0.0  # a recalibrated model: the sample's


@pytest.mark.parametrize("contract, reason", [
    ({"temperature": 1.0}, "records no train_prevalence and no class counts"),
    ({"temperature": None, "train_prevalence": 0.5}, "stores no calibration"),
    (None, "stores no calibration"),
])
def test_prevalence_is_refused_naming_why(contract, reason):
    with pytest.raises(ValueError, match=f"^--prevalence: .*{reason}"):
        feeding.resolve_prevalence(contract, "m.keras", 0.3)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.2, float("nan")])
def test_a_prevalence_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match="^--prevalence"):
        feeding.resolve_prevalence(CONTRACT, "m.keras", value)


def _predictions(n: int = 400, seed: int = 0) -> SplitPredictions:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.5).astype(np.int64)
    raw = calibration.sigmoid(np.where(labels == 1, 1.0, -1.0) + rng.normal(0.0, 1.0, n)).astype(np.float32)
    return SplitPredictions([f"{i}" for i in range(n)], [f"P{i // 2}" for i in range(n)], labels, raw)


def test_evaluate_states_the_prevalence_and_keeps_the_threshold():
    predictions = _predictions()
    setting = feeding.resolve_prevalence(CONTRACT, "m.keras", 0.4)
    block = results.calibration_block(predictions, CONTRACT, None, "val", setting)
    assert block["prevalence"] == 0.4 and block["stored_prevalence"] == 0.72
    assert block["prevalence_shift"] == setting.shift and "raw probability" in block["threshold_note"]
    expected = calibration.apply_temperature(predictions.probabilities, 1.7, -0.4 + setting.shift)
    np.testing.assert_allclose(results.calibrated_probabilities(predictions, {"calibration": block}), expected)
    assert block["holds"] is None  # no bootstrap asked


def test_evaluate_warns_when_calibration_does_not_hold():
    predictions = _predictions()  # calibrated at temperature 1 with no shift: a shift of 2 breaks it
    broken = {"temperature": 1.0, "logit_shift": 2.0, "train_prevalence": 0.5}
    block = results.calibration_block(predictions, broken, None, "val", feeding.resolve_prevalence(broken, "m"), 200, 0)
    assert block["does_not_hold"] is True and block["holds"]["difference_ci"][0] > 0
    assert "cxr-recalibrate" in block["warning"] and f"{block['holds']['ece_raw']:.4f}" in block["warning"]
    fine = {"temperature": 1.0, "logit_shift": 0.0, "train_prevalence": 0.5}
    block = results.calibration_block(predictions, fine, None, "val", feeding.resolve_prevalence(fine, "m"), 200, 0)
    assert block["does_not_hold"] is False and block["warning"] is None


def test_sealing_records_the_train_split_share():
    from cxr_tfdata.core import dataset_info
    from cxr_tfdata.training import val_calibration

    splits = {"train": {"num_examples": 100, "class_counts": {"NORMAL": 28, "PNEUMONIA": 72}, "shards": []},
              "val": {"num_examples": 10, "class_counts": {"NORMAL": 5, "PNEUMONIA": 5}, "shards": []}}
    info = dataset_info.DatasetInfo("d", {"image_size": 32, "splits": splits})
    assert val_calibration.train_prevalence(info) == pytest.approx(0.72)
    labels, raw = _predictions(100).labels, _predictions(100).probabilities
    values = val_calibration.fit_on_val(labels, raw, 0.9, "val", train_prevalence=0.72)
    assert values["train_prevalence"] == 0.72
    assert "train_prevalence" not in val_calibration.fit_on_val(labels, raw, 0.9, "val")
