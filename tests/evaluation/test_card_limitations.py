"""Tests of cxr_tfdata.evaluation.card_limitations: the standing limitations, and the warnings the inputs
call for (a small val split, evaluating on val, nothing stored, a fixed threshold), in both forms."""

from __future__ import annotations

import pytest

from cxr_tfdata.evaluation import card_markdown
from tests.evaluation.card_inputs import (
    full_contract,
    full_metrics,
    make_card,
    md_section,
)


@pytest.mark.parametrize(("val_images", "warned"), [(548, False), (100, False), (99, True), (16, True)])
def test_the_val_size_warning_appears_exactly_when_val_is_small(val_images, warned):
    card = make_card(full_metrics(), full_contract(val_images))
    md = md_section(card_markdown.markdown(card), "Known limitations")
    warnings = [item for item in card["limitations"] if "val split is small" in item]
    assert len(warnings) == int(warned)
    assert ("val split is small" in md) == warned
    if warned:
        assert f"({val_images} images" in warnings[0]


def test_limitations_cover_the_standing_list_and_the_measured_recall():
    card = make_card(full_metrics(), full_contract())
    text = " ".join(card["limitations"]).lower()
    for words in ("single center", "label noise", "not independent", "patients", "calibration",
                  "grad-cam", "224x224"):
        assert words in text, words
    op = card["metrics"]["operating_point"]["values"]["recall"]
    expected = f"{op['value']:.4f} (95% CI [{op['ci'][0]:.4f}, {op['ci'][1]:.4f}])"
    assert expected in " ".join(card["limitations"])
    assert expected in md_section(card_markdown.markdown(card), "Known limitations")
    assert "falls short of the target" in text


def test_evaluating_on_val_is_warned_and_test_is_not():
    assert not any("optimistic" in item for item in make_card(full_metrics(), full_contract())["limitations"])
    metrics = full_metrics()
    metrics["split"] = metrics["source"]["split"] = "val"
    assert any("'val' split" in item for item in make_card(metrics, full_contract())["limitations"])


def test_a_contract_without_threshold_or_temperature_says_so():
    contract = full_contract()
    for key in ("operating_threshold", "target_recall", "threshold_chosen_on", "threshold_val_metrics",
                "temperature", "calibration"):
        contract[key] = None
    metrics = full_metrics()
    metrics["calibration"].update(temperature=None, temperature_source=None, calibrated=None)
    card = make_card(metrics, contract)
    text = " ".join(card["limitations"])
    assert "No operating threshold is stored" in text and "No temperature is stored" in text
    assert "Stored operating threshold: not stored" in card_markdown.markdown(card)


def test_a_fixed_threshold_is_not_described_as_chosen_for_a_target():
    metrics = full_metrics()
    metrics["operating_point"] = {**metrics["operating_point"], "chosen_by": "--threshold"}
    metrics["operating_point"].pop("target_recall", None)
    md = card_markdown.markdown(make_card(metrics, full_contract()))
    limitations = md_section(md, "Known limitations")
    assert "fixed by the user (--threshold)" in limitations
    assert "falls short of the target" not in limitations and "target recall 0.9500" not in limitations
