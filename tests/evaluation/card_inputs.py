"""The metrics.json and contract inputs of the model-card tests (complete, and degraded as older models give
them), and readers of the Markdown card's sections, table rows and numbers."""

from __future__ import annotations

from cxr_tfdata.evaluation import card_facts

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")


VERSIONS = {"tensorflow": "2.99.0", "numpy": "9.9.9", "cxr-tfdata": "0.0.1"}


def threshold_block(threshold: float, base: float, **extra) -> dict:
    """A metrics.json threshold block with distinct values per metric, so a swap shows."""
    values = {key: round(base + 0.011 * i, 6) for i, key in enumerate(METRICS)}
    ci = {key: [round(v - 0.031, 6), round(min(v + 0.027, 1.0), 6)] for key, v in values.items()}
    return {"threshold": threshold, **values, "confusion_matrix": [[200, 34], [21, 369]], "n": 624,
            "ci": ci, **extra}


def full_metrics() -> dict:
    half = threshold_block(0.5, 0.81)
    return {
        **half,
        "split": "test", "model": "/abs/final.keras", "data_dir": "/abs/records",
        "class_counts": {"NORMAL": 234, "PNEUMONIA": 390},
        "source": {"kind": "records", "path": "/abs/records", "split": "test", "num_unreadable": 0,
                   "unreadable": []},
        "threshold_0.5": half,
        "operating_point": threshold_block(
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


def make_card(metrics: dict, contract: dict | None) -> dict:
    return card_facts.build(metrics, contract, versions=VERSIONS)


def md_section(md: str, title: str) -> str:
    """The text of a "## title" section of the Markdown, up to the next level-2 heading."""
    start = md.index(f"\n## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def md_row(md: str, first_cell: str) -> list[str]:
    """The cells of the one table row whose first cell is `first_cell`."""
    rows = [line for line in md.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (first_cell, rows)
    return [cell.strip() for cell in rows[0].strip("|").split(" | ")]


def parse_cell(cell: str) -> float | list[float] | None:
    if cell == "n/a":
        return None
    if cell.startswith("["):
        return [float(x) for x in cell.strip("[]").split(",")]
    return float(cell)


def close_to(parsed, value) -> bool:
    """A 4-decimal Markdown number against the JSON value it was formatted from."""
    if value is None or parsed is None:
        return parsed is None and value is None
    if isinstance(value, list):
        return len(parsed) == 2 and all(abs(p - v) <= 5e-5 for p, v in zip(parsed, value, strict=True))
    return abs(parsed - value) <= 5e-5
