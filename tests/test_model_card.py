"""Tests of cxr_tfdata.model_card: model_card.json and MODEL_CARD.md say the same things, cover what a
model card must, and survive the incomplete inputs older or degraded models give."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_tfdata import model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")
VERSIONS = {"tensorflow": "2.99.0", "numpy": "9.9.9", "cxr-tfdata": "0.0.1"}


def _block(threshold: float, base: float, **extra) -> dict:
    """A metrics.json threshold block with distinct values per metric, so a swap shows."""
    values = {key: round(base + 0.011 * i, 6) for i, key in enumerate(METRICS)}
    ci = {key: [round(v - 0.031, 6), round(min(v + 0.027, 1.0), 6)] for key, v in values.items()}
    return {"threshold": threshold, **values, "confusion_matrix": [[200, 34], [21, 369]], "n": 624,
            "ci": ci, **extra}


def full_metrics() -> dict:
    half = _block(0.5, 0.81)
    return {
        **half,
        "split": "test", "model": "/abs/final.keras", "data_dir": "/abs/records",
        "class_counts": {"NORMAL": 234, "PNEUMONIA": 390},
        "source": {"kind": "records", "path": "/abs/records", "split": "test", "num_unreadable": 0,
                   "unreadable": []},
        "threshold_0.5": half,
        "operating_point": _block(
            0.3735, 0.73, target_recall=0.95,
            chosen_by="stored in the model: chosen by cxr-train on val for recall >= 0.95"),
        "bootstrap": {"resampled_by": "patient", "num_clusters": 500, "samples": 1000,
                      "confidence": 0.95, "method": "percentile", "seed": 0},
        "calibration": {"ece_bins": 15, "ece_definition": "15 equal-width bins of P(PNEUMONIA) over [0, 1]",
                        "temperature": 1.14,
                        "temperature_source": "stored in the model (fitted by cxr-train on val)",
                        "raw": {"ece": 0.0512, "brier": 0.0823, "nll": 0.3011},
                        "calibrated": {"ece": 0.0344, "brier": 0.0731, "nll": 0.2544}},
    }


def full_contract(val_images: int = 548) -> dict:
    return {
        "format": 1, "image_size": 224, "resize": "squash", "record_encoding": "jpeg", "jpeg_quality": 95,
        "class_names": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA",
        "dataset_fingerprint": "sha256:abc123", "stage": "finetune",
        "operating_threshold": 0.3735, "target_recall": 0.95, "threshold_chosen_on": "val",
        "threshold_val_metrics": {"recall": 0.96, "specificity": 0.8, "precision": 0.9, "n": val_images},
        "temperature": 1.14,
        "calibration": {"method": "temperature scaling (one scalar dividing the logit)", "fitted_on": "val",
                        "temperature_at_search_bound": False, "ece_bins": 15,
                        "raw": {"ece": 0.35, "brier": 0.19, "nll": 0.53},
                        "calibrated": {"ece": 0.30, "brier": 0.18, "nll": 0.52}},
        "training": {
            "model_dir": "/runs/a", "stage": "both", "mixed_precision": "mixed_bfloat16", "target_recall": 0.95,
            "data": {"data_dir": "/abs/records", "image_size": 224, "seed": 1},
            "model": {"weights": "imagenet", "fine_tune_at": "conv5_block1_preact_bn"},
            "frozen": {"batch_size": 128, "epochs": 50, "learning_rate": 0.001},
            "finetune": {"batch_size": 32, "epochs": 30, "learning_rate": 1e-05},
            "dataset_fingerprint": "sha256:abc123",
        },
        "data": {
            "source": "/data/chest_xray", "val_source": "carved from train by patient (10%)",
            "splits": {
                "train": {"images": 4684, "patients": 1300, "class_counts": {"NORMAL": 1207, "PNEUMONIA": 3477},
                          "skipped_files": 0},
                "val": {"images": val_images, "patients": 150,
                        "class_counts": {"NORMAL": val_images // 4, "PNEUMONIA": val_images - val_images // 4},
                        "skipped_files": 0},
                "test": {"images": 624, "patients": None, "class_counts": {"NORMAL": 234, "PNEUMONIA": 390},
                         "skipped_files": 0},
            },
            "leaks_dropped": 3, "drop_leaks": True, "patients_in_several_given_splits": 3,
            "duplicates_across_splits": 0, "skipped_files": 0,
        },
    }


def degraded_metrics() -> dict:
    """An image folder with one class, no intervals, no temperature, two unreadable files."""
    half = {"threshold": 0.5, "accuracy": 0.9, "precision": 1.0, "recall": 0.9, "specificity": 0.0,
            "f1": 0.947, "roc_auc": None, "pr_auc": None, "confusion_matrix": [[0, 0], [4, 36]],
            "n": 40, "ci": None}
    return {
        **half,
        "split": None, "model": "/abs/old.keras", "data_dir": None,
        "class_counts": {"NORMAL": 0, "PNEUMONIA": 40},
        "source": {"kind": "images_dir", "path": "/abs/other_hospital", "split": None, "num_unreadable": 2,
                   "unreadable": [{"path": "/abs/other_hospital/PNEUMONIA/x.jpeg", "error": "truncated"}]},
        "threshold_0.5": half,
        "operating_point": {**half, "ci": dict.fromkeys(METRICS), "chosen_by": "--threshold"},
        "bootstrap": {"resampled_by": "image", "num_clusters": 40, "samples": 0, "confidence": 0.95,
                      "method": "percentile", "seed": 0},
        "calibration": {"ece_bins": 15, "temperature": None, "temperature_source": None,
                        "raw": {"ece": 0.1, "brier": 0.09, "nll": 0.4}, "calibrated": None},
    }


def _card(metrics: dict, contract: dict | None) -> dict:
    return model_card.build(metrics, contract, versions=VERSIONS)


def _section(md: str, title: str) -> str:
    """The text of a "## title" section of the Markdown, up to the next level-2 heading."""
    start = md.index(f"\n## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def _row(md: str, first_cell: str) -> list[str]:
    """The cells of the one table row whose first cell is `first_cell`."""
    rows = [line for line in md.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (first_cell, rows)
    return [cell.strip() for cell in rows[0].strip("|").split(" | ")]


def _parse(cell: str) -> float | list[float] | None:
    if cell == "n/a":
        return None
    if cell.startswith("["):
        return [float(x) for x in cell.strip("[]").split(",")]
    return float(cell)


def _close(parsed, value) -> bool:
    """A 4-decimal Markdown number against the JSON value it was formatted from."""
    if value is None or parsed is None:
        return parsed is None and value is None
    if isinstance(value, list):
        return len(parsed) == 2 and all(abs(p - v) <= 5e-5 for p, v in zip(parsed, value, strict=True))
    return abs(parsed - value) <= 5e-5


def test_json_and_markdown_give_the_same_split_sizes_and_patients():
    card = _card(full_metrics(), full_contract())
    md = model_card.markdown(card)
    splits = card["training_data"]["splits"]
    assert {name: (s["images"], s["patients"]) for name, s in splits.items()} == {
        "train": (4684, 1300), "val": (548, 150), "test": (624, None)}
    for name, split in splits.items():
        cells = _row(md, name)
        assert cells[1] == str(split["images"])
        assert cells[2] == (str(split["patients"]) if split["patients"] is not None else "unknown")
        assert cells[3:5] == [str(split["class_counts"]["NORMAL"]), str(split["class_counts"]["PNEUMONIA"])]
        assert _close(_parse(cells[5]), split["positive_fraction"])
    assert splits["train"]["positive_fraction"] == pytest.approx(3477 / 4684)


@pytest.mark.parametrize("block", ["threshold_0.5", "operating_point"])
def test_json_and_markdown_give_the_same_metrics_and_intervals(block):
    metrics = full_metrics()
    card = _card(metrics, full_contract())
    md = _section(model_card.markdown(card), "Metrics")
    offset = 1 if block == "threshold_0.5" else 3
    for key, label in model_card.METRIC_LABELS.items():
        entry = card["metrics"][block]["values"][key]
        assert entry == {"value": metrics[block][key], "ci": metrics[block]["ci"][key]}
        cells = _row(md, label)
        assert _close(_parse(cells[offset]), entry["value"]), (key, cells)
        assert _close(_parse(cells[offset + 1]), entry["ci"]), (key, cells)
    recall = _row(md, "Recall (sensitivity)")
    specificity = _row(md, "Specificity")
    assert _parse(recall[offset]) != _parse(specificity[offset])


def test_markdown_states_bootstrap_and_where_the_operating_threshold_came_from():
    card = _card(full_metrics(), full_contract())
    md = _section(model_card.markdown(card), "Metrics")
    assert "1000 resamples of 500 patients" in md and "95%" in md
    assert "chosen by cxr-train on val for recall >= 0.95" in md
    assert card["metrics"]["operating_point"]["chosen_by"] in md
    assert _row(md, "Metric")[3].startswith("@ 0.3735")


def test_markdown_is_rebuilt_from_model_card_json_alone():
    for metrics, contract in ((full_metrics(), full_contract()), (degraded_metrics(), None)):
        card = _card(metrics, contract)
        assert model_card.markdown(json.loads(json.dumps(card))) == model_card.markdown(card)


def test_the_date_is_an_iso_date_under_its_own_key():
    card = _card(full_metrics(), full_contract())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", card[model_card.DATE_KEY])
    assert card[model_card.DATE_KEY] in model_card.markdown(card)


def test_out_of_scope_names_adults_lateral_views_and_other_centers():
    card = _card(full_metrics(), full_contract())
    md = _section(model_card.markdown(card), "Out-of-scope uses").lower()
    text = " ".join(card["out_of_scope"]).lower()
    for words in ("adults", "lateral", "other centers", "cxr-evaluate --images_dir", "bacterial",
                  "without human review"):
        assert words in text and words in md, words
    intended = _section(model_card.markdown(card), "Intended use").lower()
    assert "pediatric" in intended and "clinician" in intended and "not a diagnosis" in intended


@pytest.mark.parametrize(("val_images", "warned"), [(548, False), (100, False), (99, True), (16, True)])
def test_the_val_size_warning_appears_exactly_when_val_is_small(val_images, warned):
    card = _card(full_metrics(), full_contract(val_images))
    md = _section(model_card.markdown(card), "Known limitations")
    warnings = [item for item in card["limitations"] if "val split is small" in item]
    assert len(warnings) == int(warned)
    assert ("val split is small" in md) == warned
    if warned:
        assert f"({val_images} images" in warnings[0]


def test_limitations_cover_the_standing_list_and_the_measured_recall():
    card = _card(full_metrics(), full_contract())
    text = " ".join(card["limitations"]).lower()
    for words in ("single center", "label noise", "not independent", "patients", "calibration",
                  "grad-cam", "224x224"):
        assert words in text, words
    op = card["metrics"]["operating_point"]["values"]["recall"]
    expected = f"{op['value']:.4f} (95% CI [{op['ci'][0]:.4f}, {op['ci'][1]:.4f}])"
    assert expected in " ".join(card["limitations"])
    assert expected in _section(model_card.markdown(card), "Known limitations")
    assert "falls short of the target" in text


def test_evaluating_on_val_is_warned_and_test_is_not():
    assert not any("optimistic" in item for item in _card(full_metrics(), full_contract())["limitations"])
    metrics = full_metrics()
    metrics["split"] = metrics["source"]["split"] = "val"
    assert any("'val' split" in item for item in _card(metrics, full_contract())["limitations"])


def test_the_degraded_card_says_threshold_and_temperature_are_not_stored():
    card = _card(degraded_metrics(), None)
    md = model_card.markdown(card)
    assert card["model"]["stored_threshold"]["value"] is None
    assert card["model"]["stored_threshold"]["note"].startswith("not stored")
    assert card["calibration"]["temperature"] is None
    assert card["calibration"]["temperature_source"].startswith("not stored")
    assert "Stored operating threshold: not stored" in md
    assert "Temperature: n/a (not stored" in md
    assert "no operating threshold or temperature is stored" in " ".join(card["limitations"])
    assert "Not stored: the model carries no training config." in md
    limitations = _section(md, "Known limitations")
    assert "2 unreadable file(s) were excluded" in limitations
    assert "single class" in limitations and "bootstrap resampled images" in limitations
    for label in ("ROC-AUC", "PR-AUC (average precision)"):
        assert _row(md, label)[1:] == ["n/a"] * 4
    assert _row(md, "Recall (sensitivity)")[1:] == ["0.9000", "n/a", "0.9000", "n/a"]
    assert _row(md, "ECE")[1:] == ["0.1000", "n/a", "n/a", "n/a"]
    assert "image folder /abs/other_hospital" in md


def test_a_contract_without_threshold_or_temperature_says_so():
    contract = full_contract()
    for key in ("operating_threshold", "target_recall", "threshold_chosen_on", "threshold_val_metrics",
                "temperature", "calibration"):
        contract[key] = None
    metrics = full_metrics()
    metrics["calibration"].update(temperature=None, temperature_source=None, calibrated=None)
    card = _card(metrics, contract)
    text = " ".join(card["limitations"])
    assert "No operating threshold is stored" in text and "No temperature is stored" in text
    assert "Stored operating threshold: not stored" in model_card.markdown(card)


@pytest.mark.parametrize("key", sorted(full_contract()))
def test_any_missing_or_none_contract_key_still_gives_a_card(key):
    for contract in (full_contract(), full_contract()):
        contract.pop(key)
        model_card.markdown(_card(full_metrics(), contract))
    contract = full_contract()
    contract[key] = None
    json.dumps(_card(full_metrics(), contract), allow_nan=False)


@pytest.mark.parametrize("key", sorted(full_metrics()))
def test_any_missing_metrics_key_still_gives_a_card(key):
    metrics = full_metrics()
    metrics.pop(key)
    card = _card(metrics, full_contract())
    model_card.markdown(card)
    json.dumps(card, allow_nan=False)


def test_the_card_is_strict_json_even_when_inputs_hold_nan():
    metrics = full_metrics()
    metrics["calibration"]["raw"]["ece"] = math.nan
    metrics["operating_point"]["ci"]["recall"] = [math.nan, 0.9]
    contract = copy.deepcopy(full_contract())
    contract["training"]["frozen"]["learning_rate"] = math.inf
    for card in (_card(metrics, contract), _card(degraded_metrics(), None)):
        text = json.dumps(card, allow_nan=False)
        assert json.loads(text) == card
    card = _card(metrics, contract)
    assert card["calibration"]["on_evaluation_data"]["raw"]["ece"] is None
    assert card["metrics"]["operating_point"]["values"]["recall"]["ci"] is None


def test_model_facts_and_training_config_appear_in_both():
    contract = full_contract()
    card = _card(full_metrics(), contract)
    md = _section(model_card.markdown(card), "Model")
    model = card["model"]
    assert (model["image_size"], model["resize"], model["record_encoding"], model["jpeg_quality"],
            model["stage"], model["dataset_fingerprint"]) == (224, "squash", "jpeg", 95, "finetune",
                                                               "sha256:abc123")
    for fact in ("Input image size: 224; resize mode: squash", "JPEG quality: 95",
                 "Training stage the model is from: finetune (run setting: both)", "`sha256:abc123`",
                 "ImageNet transfer learning", "P(PNEUMONIA)", "NORMAL, PNEUMONIA"):
        assert fact in md, fact
    assert card["training_config"] == contract["training"]
    assert _row(md, "finetune.learning_rate") == ["finetune.learning_rate", "1e-05"]
    assert _row(md, "frozen.batch_size") == ["frozen.batch_size", "128"]
    assert _row(md, "model.weights") == ["model.weights", "imagenet"]
    assert _row(md, "mixed_precision") == ["mixed_precision", "mixed_bfloat16"]


def test_calibration_facts_appear_in_both():
    card = _card(full_metrics(), full_contract())
    md = _section(model_card.markdown(card), "Calibration")
    cal = card["calibration"]
    assert cal["temperature"] == 1.14 and cal["ece_bins"] == 15
    assert "Temperature: 1.1400 (stored in the model (fitted by cxr-train on val))" in md
    assert "15 equal-width bins" in md
    columns = (cal["on_evaluation_data"]["raw"], cal["on_evaluation_data"]["calibrated"],
               cal["on_fit_split"]["raw"], cal["on_fit_split"]["calibrated"])
    for key, label in model_card.CALIBRATION_LABELS.items():
        cells = _row(md, label)[1:]
        assert all(_close(_parse(c), column[key]) for c, column in zip(cells, columns, strict=True)), key


def test_table_cells_cannot_break_the_markdown_tables():
    contract = full_contract()
    contract["training"]["model_dir"] = "/runs/a|b\nc"
    md = model_card.markdown(_card(full_metrics(), contract))
    row = next(line for line in md.splitlines() if line.startswith("| model_dir |"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 3


def test_versions_come_from_the_argument_when_given():
    assert _card(full_metrics(), full_contract())["library_versions"] == VERSIONS
    assert "| numpy | 9.9.9 |" in model_card.markdown(_card(full_metrics(), full_contract()))
    default = model_card.build(full_metrics(), full_contract())["library_versions"]
    assert list(default) == list(model_card.LIBRARIES)


def test_library_versions_reads_installed_metadata():
    versions = model_card.library_versions()
    assert versions["numpy"] == importlib.metadata.version("numpy")
    assert re.match(r"\d+\.\d+", versions["numpy"])
    assert model_card.library_versions(("cxr-no-such-package",)) == {
        "cxr-no-such-package": model_card.NOT_INSTALLED}


def test_library_versions_imports_neither_tensorflow_nor_numpy():
    code = ("from cxr_tfdata import model_card; model_card.library_versions(); import sys; "
            "print('tensorflow' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]


def test_a_fixed_threshold_is_not_described_as_chosen_for_a_target():
    metrics = full_metrics()
    metrics["operating_point"] = {**metrics["operating_point"], "chosen_by": "--threshold"}
    metrics["operating_point"].pop("target_recall", None)
    md = model_card.markdown(_card(metrics, full_contract()))
    limitations = _section(md, "Known limitations")
    assert "fixed by the user (--threshold)" in limitations
    assert "falls short of the target" not in limitations and "target recall 0.9500" not in limitations
