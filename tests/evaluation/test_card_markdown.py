"""Tests of cxr_tfdata.evaluation.card_markdown: MODEL_CARD.md says what model_card.json says, number for
number, and is rebuilt from the JSON alone; its tables survive any cell."""

from __future__ import annotations

import json
import re

import pytest

from cxr_tfdata.evaluation import card_markdown, formatting
from tests.evaluation.card_inputs import (
    close_to,
    degraded_metrics,
    full_contract,
    full_metrics,
    make_card,
    md_row,
    md_section,
    parse_cell,
)


def test_json_and_markdown_give_the_same_split_sizes_and_patients():
    card = make_card(full_metrics(), full_contract())
    md = card_markdown.markdown(card)
    splits = card["training_data"]["splits"]
    assert {name: (s["images"], s["patients"]) for name, s in splits.items()} == {
        "train": (4684, 1300), "val": (548, 150), "test": (624, None)}
    for name, split in splits.items():
        cells = md_row(md, name)
        assert cells[1] == str(split["images"])
        assert cells[2] == (str(split["patients"]) if split["patients"] is not None else "unknown")
        assert cells[3:5] == [str(split["class_counts"]["NORMAL"]), str(split["class_counts"]["PNEUMONIA"])]
        assert close_to(parse_cell(cells[5]), split["positive_fraction"])
    assert splits["train"]["positive_fraction"] == pytest.approx(3477 / 4684)


@pytest.mark.parametrize("block", ["threshold_0.5", "operating_point"])
def test_json_and_markdown_give_the_same_metrics_and_intervals(block):
    metrics = full_metrics()
    card = make_card(metrics, full_contract())
    md = md_section(card_markdown.markdown(card), "Metrics")
    offset = 1 if block == "threshold_0.5" else 3
    for key, label in formatting.METRIC_LABELS.items():
        entry = card["metrics"][block]["values"][key]
        assert entry == {"value": metrics[block][key], "ci": metrics[block]["ci"][key]}
        cells = md_row(md, label)
        assert close_to(parse_cell(cells[offset]), entry["value"]), (key, cells)
        assert close_to(parse_cell(cells[offset + 1]), entry["ci"]), (key, cells)
    recall = md_row(md, "Recall (sensitivity)")
    specificity = md_row(md, "Specificity")
    assert parse_cell(recall[offset]) != parse_cell(specificity[offset])


def test_markdown_states_bootstrap_and_where_the_operating_threshold_came_from():
    card = make_card(full_metrics(), full_contract())
    md = md_section(card_markdown.markdown(card), "Metrics")
    assert "1000 resamples of 500 patients" in md and "95%" in md
    assert "chosen by cxr-train on val for recall >= 0.95" in md
    assert card["metrics"]["operating_point"]["chosen_by"] in md
    assert md_row(md, "Metric")[3].startswith("@ 0.3735")


def test_markdown_is_rebuilt_from_model_card_json_alone():
    for metrics, contract in ((full_metrics(), full_contract()), (degraded_metrics(), None)):
        card = make_card(metrics, contract)
        assert card_markdown.markdown(json.loads(json.dumps(card))) == card_markdown.markdown(card)


def test_out_of_scope_names_adults_lateral_views_and_other_centers():
    card = make_card(full_metrics(), full_contract())
    md = md_section(card_markdown.markdown(card), "Out-of-scope uses").lower()
    text = " ".join(card["out_of_scope"]).lower()
    for words in ("adults", "lateral", "other centers", "cxr-evaluate --images_dir", "bacterial",
                  "without human review"):
        assert words in text and words in md, words
    intended = md_section(card_markdown.markdown(card), "Intended use").lower()
    assert "pediatric" in intended and "clinician" in intended and "not a diagnosis" in intended


def test_the_degraded_card_says_threshold_and_temperature_are_not_stored():
    card = make_card(degraded_metrics(), None)
    md = card_markdown.markdown(card)
    assert card["model"]["stored_threshold"]["value"] is None
    assert card["model"]["stored_threshold"]["note"].startswith("not stored")
    assert card["calibration"]["temperature"] is None
    assert card["calibration"]["temperature_source"].startswith("not stored")
    assert "Stored operating threshold: not stored" in md
    assert "Temperature: n/a (not stored" in md
    assert "no operating threshold or temperature is stored" in " ".join(card["limitations"])
    assert "Not stored: the model carries no training config." in md
    limitations = md_section(md, "Known limitations")
    assert "2 unreadable file(s) were excluded" in limitations
    assert "single class" in limitations and "bootstrap resampled images" in limitations
    for label in ("ROC-AUC", "PR-AUC (average precision)"):
        assert md_row(md, label)[1:] == ["n/a"] * 4
    assert md_row(md, "Recall (sensitivity)")[1:] == ["0.9000", "n/a", "0.9000", "n/a"]
    assert md_row(md, "ECE")[1:] == ["0.1000", "n/a", "n/a", "n/a"]
    assert "image folder /abs/other_hospital" in md


def test_model_facts_and_training_config_appear_in_both():
    contract = full_contract()
    card = make_card(full_metrics(), contract)
    md = md_section(card_markdown.markdown(card), "Model")
    model = card["model"]
    assert (model["image_size"], model["resize"], model["record_encoding"], model["jpeg_quality"],
            model["stage"], model["dataset_fingerprint"]) == (224, "squash", "jpeg", 95, "finetune",
                                                               "sha256:abc123")
    for fact in ("Input image size: 224; resize mode: squash", "JPEG quality: 95",
                 "Training stage the model is from: finetune (run setting: both)", "`sha256:abc123`",
                 "ImageNet transfer learning", "P(PNEUMONIA)", "NORMAL, PNEUMONIA"):
        assert fact in md, fact
    assert card["training_config"] == contract["training"]
    assert md_row(md, "finetune.learning_rate") == ["finetune.learning_rate", "1e-05"]
    assert md_row(md, "frozen.batch_size") == ["frozen.batch_size", "128"]
    assert md_row(md, "model.weights") == ["model.weights", "imagenet"]
    assert md_row(md, "mixed_precision") == ["mixed_precision", "mixed_bfloat16"]


def test_calibration_facts_appear_in_both():
    card = make_card(full_metrics(), full_contract())
    md = md_section(card_markdown.markdown(card), "Calibration")
    cal = card["calibration"]
    assert cal["temperature"] == 1.14 and cal["ece_bins"] == 15
    assert "Temperature: 1.1400 (stored in the model (fitted by cxr-train on val))" in md
    assert "15 equal-width bins" in md
    columns = (cal["on_evaluation_data"]["raw"], cal["on_evaluation_data"]["calibrated"],
               cal["on_fit_split"]["raw"], cal["on_fit_split"]["calibrated"])
    for key, label in formatting.CALIBRATION_LABELS.items():
        cells = md_row(md, label)[1:]
        assert all(close_to(parse_cell(c), column[key]) for c, column in zip(cells, columns, strict=True)), key


def test_table_cells_cannot_break_the_markdown_tables():
    contract = full_contract()
    contract["training"]["model_dir"] = "/runs/a|b\nc"
    md = card_markdown.markdown(make_card(full_metrics(), contract))
    row = next(line for line in md.splitlines() if line.startswith("| model_dir |"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 3
