"""Rows of a label table: reading the CSV, mapping label values to classes, and the generic columns.

A row becomes a `Row`: the image name as the table gives it, its class (or None with the reason the
row is not used), its raw patient identifier and its given split. Presets (table_presets.py) read
the RSNA, NIH and CheXpert tables into the same rows; tables.py finds the files and makes splits.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterator, Sequence

from cxr_tfdata.core import folder_scan, record_schema

CLASS_BY_NAME = {name.casefold(): index for index, name in enumerate(record_schema.CLASS_NAMES)}
# --label_values when none is given: 0/1 and the class names themselves (any case).
DEFAULT_LABEL_VALUES = ("0=NORMAL", "1=PNEUMONIA", "NORMAL=NORMAL", "PNEUMONIA=PNEUMONIA")
SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}


class TableError(folder_scan.LayoutError):
    """A label table or its folder cannot be used; the message names the file (and both paths of a
    name found twice)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One image named by a table (several rows of one image are merged by their preset)."""

    where: str  # "<table file> line <n>", for reasons
    name: str  # the image's name or relative path, as the table gives it
    label: int | None  # index into record_schema.CLASS_NAMES; None when the row is not used
    patient: str = ""  # the raw source identifier ("": derived from the name, as for folders)
    split: str | None = None  # "train", "val" or "test" when the table (or its lists) says so
    reason: str = ""  # why the row is not used ("" when it is)


def skip(where: str, name: str, reason: str) -> Row:
    return Row(where, name, None, reason=reason)


def normalise_value(value: str) -> str:
    """A cell as compared with --label_values: numbers by value ("1", "1.0"), words by casefold."""
    value = value.strip()
    try:
        return format(float(value), "g")
    except ValueError:
        return value.casefold()


def parse_label_values(items: Sequence[str]) -> dict[str, int]:
    """VALUE=CLASS items (`1=PNEUMONIA,0=NORMAL`) -> {normalised value: class index}; ValueError naming
    the bad item."""
    mapping: dict[str, int] = {}
    for item in items or DEFAULT_LABEL_VALUES:
        value, sep, class_name = item.rpartition("=")
        if not sep or not value.strip() or class_name.strip().casefold() not in CLASS_BY_NAME:
            raise ValueError(f"{item!r}: write VALUE=CLASS with CLASS one of {list(record_schema.CLASS_NAMES)}, "
                             f"e.g. 1=PNEUMONIA,0=NORMAL")
        key, label = normalise_value(value), CLASS_BY_NAME[class_name.strip().casefold()]
        if mapping.get(key, label) != label:
            raise ValueError(f"{item!r}: value {value.strip()!r} is mapped to both classes")
        mapping[key] = label
    return mapping


def read_table(path: str, required: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """("<file> line <n>", {column: cell}) per data row; TableError when the file or a column is missing."""
    if not os.path.isfile(path):
        raise TableError(f"label table {path} does not exist or is not a file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c and c not in columns]
        if missing:
            raise TableError(f"{path}: no column {missing[0]!r} (its columns: {columns})")
        for record in reader:
            yield f"{os.path.basename(path)} line {reader.line_num}", {
                k: (v or "") for k, v in record.items() if k is not None}


def label_of(cell: str, column: str, mapping: dict[str, int]) -> tuple[int | None, str]:
    """(class, "") or (None, why): a blank cell is not labelled, an unknown value is named."""
    if not cell.strip():
        return None, f"no label (blank {column!r})"
    label = mapping.get(normalise_value(cell))
    if label is None:
        known = ", ".join(sorted(mapping))
        return None, f"unknown label value {cell.strip()!r} in column {column!r} (--label_values maps: {known})"
    return label, ""


def split_of(cell: str, column: str) -> tuple[str | None, str]:
    """(split, "") or (None, why) for a split column's cell."""
    split = SPLIT_VALUES.get(cell.strip().casefold())
    if split is None:
        return None, f"unknown split value {cell.strip()!r} in column {column!r} (expected train, val or test)"
    return split, ""


def column_rows(path: str, image_column: str, label_column: str, label_values: Sequence[str],
                patient_column: str = "", split_column: str = "") -> list[Row]:
    """A table with the columns the flags name (--labels_csv without --labels_format)."""
    mapping = parse_label_values(label_values)
    rows = []
    for where, record in read_table(path, (image_column, label_column, patient_column, split_column)):
        name = record[image_column].strip()
        label, reason = label_of(record[label_column], label_column, mapping)
        split = None
        if split_column and not reason:
            split, reason = split_of(record[split_column], split_column)
        if not name:
            reason = f"no image name (blank {image_column!r})"
        patient = record[patient_column].strip() if patient_column else ""
        rows.append(skip(where, name, reason) if reason else Row(where, name, label, patient, split))
    return rows
