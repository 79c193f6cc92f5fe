"""--labels_format presets: the RSNA, NIH ChestX-ray14 and CheXpert tables read into table_rows.Row.

rsna      stage_2_train_labels.csv (patientId,x,y,width,height,Target), one row per box: an image
          (<patientId>.dcm) is PNEUMONIA when any of its rows has Target 1; boxes are not kept. No split.
nih       Data_Entry_2017.csv: PNEUMONIA when `Finding Labels` lists Pneumonia; NORMAL is every other
          image (--nih_normal=not_pneumonia) or only "No Finding" (--nih_normal=no_finding). The official
          train_val_list.txt / test_list.txt beside the table give the splits when present.
chexpert  train.csv (and valid.csv beside it, whose rows are val): `Pneumonia` 1.0 / 0.0, -1.0 by
          --uncertain, blank not labelled; the patient is the patientNNNNN folder of `Path`.
"""

from __future__ import annotations

import os
import re

from tfrecords_builder.table_rows import Row, TableError, normalise_value, read_table, skip

FORMATS = ("rsna", "nih", "chexpert")
DEFAULT_TABLE = {"rsna": "stage_2_train_labels.csv", "nih": "Data_Entry_2017.csv", "chexpert": "train.csv"}
UNCERTAIN_POLICIES = {"exclude": None, "positive": 1, "negative": 0}
NIH_NORMAL = ("not_pneumonia", "no_finding")
NIH_LISTS = {"test": "test_list.txt", "train": "train_val_list.txt"}  # a name in both lists: test
_CHEXPERT_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")


def rsna_rows(path: str) -> list[Row]:
    """One row per image: PNEUMONIA when any of its rows has Target 1. A row whose Target is not 0/1
    is skipped on its own; the image keeps its other rows."""
    rows, first_line, labels = [], {}, {}
    for where, record in read_table(path, ("patientId", "Target")):
        patient, target = record["patientId"].strip(), normalise_value(record["Target"])
        if not patient:
            rows.append(skip(where, "", "no patientId"))
        elif target not in ("0", "1"):
            rows.append(skip(where, f"{patient}.dcm", f"unknown label value {record['Target'].strip()!r} "
                                                      f"in column 'Target' (expected 0 or 1)"))
        else:
            first_line.setdefault(patient, where)
            labels[patient] = max(labels.get(patient, 0), int(target))
    rows += [Row(first_line[p], f"{p}.dcm", label, p) for p, label in labels.items()]
    return rows


def _nih_label(findings: str, nih_normal: str) -> tuple[int | None, str]:
    names = {f.strip().casefold() for f in findings.split("|") if f.strip()}
    if not names:
        return None, "no label (blank 'Finding Labels')"
    if "pneumonia" in names:
        return 1, ""
    if nih_normal == "no_finding" and names != {"no finding"}:
        return None, f"findings {findings.strip()!r} are neither Pneumonia nor only 'No Finding' " \
                     f"(--nih_normal=no_finding)"
    return 0, ""


def _nih_splits(path: str) -> dict[str, str] | None:
    """{image name: split} from the official lists beside the table; None when neither is there."""
    folder = os.path.dirname(os.path.abspath(path))
    present = {split: os.path.join(folder, name) for split, name in NIH_LISTS.items()
               if os.path.isfile(os.path.join(folder, name))}
    if not present:
        return None
    if len(present) < len(NIH_LISTS):
        missing = [os.path.join(folder, n) for s, n in NIH_LISTS.items() if s not in present]
        raise TableError(f"found {list(present.values())[0]} but not {missing[0]}: give both lists or neither")
    splits = {}
    for split, list_path in present.items():
        with open(list_path, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    splits.setdefault(line.strip(), split)
    return splits


def nih_rows(path: str, nih_normal: str) -> list[Row]:
    lists = _nih_splits(path)
    rows = []
    for where, record in read_table(path, ("Image Index", "Finding Labels", "Patient ID")):
        name = record["Image Index"].strip()
        label, reason = _nih_label(record["Finding Labels"], nih_normal)
        split = None if lists is None else lists.get(name)
        if not reason and lists is not None and split is None:
            reason = f"in neither {NIH_LISTS['train']} nor {NIH_LISTS['test']}"
        if not name:
            reason = "no image name (blank 'Image Index')"
        rows.append(skip(where, name, reason) if reason else
                    Row(where, name, label, record["Patient ID"].strip(), split))
    return rows


def _chexpert_label(cell: str, uncertain: str) -> tuple[int | None, str]:
    value = normalise_value(cell)
    if not value:
        return None, "not labelled (blank 'Pneumonia')"
    if value == "-1":
        label = UNCERTAIN_POLICIES[uncertain]
        return label, "" if label is not None else "uncertain (-1.0 'Pneumonia'; --uncertain=exclude)"
    if value in ("0", "1"):
        return int(value), ""
    return None, f"unknown label value {cell.strip()!r} in column 'Pneumonia' (expected 1.0, 0.0, -1.0 or blank)"


def _chexpert_table(path: str, split: str, uncertain: str) -> list[Row]:
    rows = []
    for where, record in read_table(path, ("Path", "Pneumonia")):
        name = record["Path"].strip().replace("\\", "/")
        label, reason = _chexpert_label(record["Pneumonia"], uncertain)
        match = _CHEXPERT_PATIENT.search(name)
        if not name:
            reason = "no image path (blank 'Path')"
        rows.append(skip(where, name, reason) if reason else
                    Row(where, name, label, match.group(1) if match else "", split))
    return rows


def chexpert_rows(path: str, uncertain: str) -> tuple[list[Row], list[str]]:
    """Rows of the table (train; val when the file is valid.csv) and of valid.csv beside it (val), and
    the tables read."""
    split = "val" if os.path.basename(path) == "valid.csv" else "train"
    rows, read = _chexpert_table(path, split, uncertain), [path]
    valid = os.path.join(os.path.dirname(os.path.abspath(path)), "valid.csv")
    if split == "train" and os.path.isfile(valid):
        rows += _chexpert_table(valid, "val", uncertain)
        read.append(valid)
    return rows, read


def preset_rows(labels_format: str, path: str, uncertain: str, nih_normal: str) -> tuple[list[Row], list[str]]:
    """The rows of a preset's table, and every file read for them (tables and list files)."""
    if labels_format == "rsna":
        return rsna_rows(path), [path]
    if labels_format == "nih":
        folder = os.path.dirname(os.path.abspath(path))
        lists = [os.path.join(folder, n) for n in NIH_LISTS.values() if os.path.isfile(os.path.join(folder, n))]
        return nih_rows(path, nih_normal), [path, *lists]
    return chexpert_rows(path, uncertain)
