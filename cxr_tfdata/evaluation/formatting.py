"""Numbers, intervals and text as the report and the model card print them, and strict JSON values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "precision": "Precision (PPV)",
    "recall": "Recall (sensitivity)",
    "specificity": "Specificity",
    "f1": "F1",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC (average precision)",
}
CALIBRATION_LABELS = {"ece": "ECE", "brier": "Brier score", "nll": "NLL (log loss)"}

def fmt(value: Any) -> str:
    """A measured number with 4 decimals; None (or anything not a number) as n/a."""
    value = number(value)
    return "n/a" if value is None else f"{value:.4f}"


def fmt_ci(value: Any) -> str:
    """A [low, high] interval with 4 decimals; anything else as n/a."""
    ends = interval(value)
    return "n/a" if ends is None else f"[{ends[0]:.4f}, {ends[1]:.4f}]"


def plain(value: Any) -> str:
    """A count, name or flag for a Markdown line: None as unknown, booleans as yes/no."""
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return cell(str(value))


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell or list item: one line, no column separators."""
    return str(text).replace("\r", " ").replace("\n", " ").replace("|", "\\|")


def code(text: Any) -> str:
    """A path or identifier as inline code, with a fence longer than any backtick run inside."""
    if text is None:
        return "unknown"
    text = str(text).replace("\r", " ").replace("\n", " ")
    fence = "`" * (_longest_backtick_run(text) + 1)
    padded = f" {text} " if "`" in text else text
    return f"{fence}{padded}{fence}".replace("|", "\\|")


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return longest


def number(value: Any) -> float | None:
    """A finite real number as float, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def interval(value: Any) -> list[float] | None:
    """[low, high] when both ends are finite numbers, else None."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    low, high = number(value[0]), number(value[1])
    return None if low is None or high is None else [low, high]


def as_dict(value: Any) -> dict:
    return dict(value) if isinstance(value, Mapping) else {}


def jsonable(value: Any) -> Any:
    """`value` as strict JSON: string keys, lists for tuples, None for NaN and infinities."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if hasattr(value, "item"):  # a NumPy scalar, without importing NumPy
        return jsonable(value.item())
    return str(value)
