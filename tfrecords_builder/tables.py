"""A label table as the converter's input: the same SourceFile lists per split as the folder scan.

The table's rows (table_rows.py, table_presets.py) name images that are looked up under --input_dir,
recursively: a bare name by its file name anywhere below (found twice: an error naming both paths), a
path by its path relative to --input_dir, also when --input_dir is one of the path's leading folders or
lies above them. Rows whose file is missing or not a regular file, or whose label is unknown, become
skipped entries with their reason; images in the folder that no row names are counted and listed.
Given splits (a split column, NIH's lists, CheXpert's valid.csv) are kept; when no row is in test,
test is carved from train by patient (--test_fraction), as val is later (plan.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from absl import logging

from cxr_tfdata.core import config as cxr_config
from cxr_tfdata.core import folder_scan, patients
from cxr_tfdata.core.folder_scan import SourceFile, Unusable
from tfrecords_builder import splits, table_presets, table_rows
from tfrecords_builder.table_rows import Row, TableError

# Files counted as images the table might have named (no extension: DICOM exports often have none).
IMAGE_SUFFIXES = ("", ".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# The manifest lists this many unnamed images (in path order); their count is always exact.
MAX_LISTED_UNNAMED = 100
UNCERTAIN_CHOICES = tuple(table_presets.UNCERTAIN_POLICIES)


@dataclasses.dataclass(frozen=True)
class TableOptions:
    labels_csv: str = ""  # "" with a preset: its usual file name in --input_dir
    labels_format: str = ""  # "" (the columns below), or one of table_presets.FORMATS
    image_column: str = ""
    label_column: str = ""
    label_values: tuple[str, ...] = ()  # VALUE=CLASS items; (): 0/1 and NORMAL/PNEUMONIA
    patient_column: str = ""  # "": from the file name, as for folders
    split_column: str = ""
    test_fraction: float = 0.2
    seed: int = 0
    uncertain: str = "exclude"
    nih_normal: str = "not_pneumonia"

    def table_path(self, input_dir: str) -> str:
        if self.labels_csv:
            return os.path.abspath(self.labels_csv)
        return os.path.join(input_dir, table_presets.DEFAULT_TABLE[self.labels_format])


@dataclasses.dataclass
class TableScan:
    by_split: dict[str, list[SourceFile]]  # train, test and (when any) val, as folder_scan.scan_input
    skipped: list[Unusable]  # the rows not used, each with its reason (path: the named file)
    file_problems: list[Unusable]  # those of them whose file is missing or not a regular file
    summary: dict  # the manifest's "table" entry


class FolderIndex:
    """Every non-hidden file under a folder, walked once: by file name and by relative path."""

    def __init__(self, root: str, shown: Callable[[str], str] = str):
        self.root = root
        self.shown = shown  # how a path appears in a message (hashed under --redact_paths)
        self.by_name: dict[str, str] = {}  # file name -> relative path (the first found)
        self.twice: dict[str, list[str]] = {}  # file name -> every relative path, for names found twice
        self.by_rel: dict[str, str] = {}  # relative path ("/"-separated) -> absolute path
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not folder_scan.is_hidden(d))
            for name in sorted(f for f in files if not folder_scan.is_hidden(f)):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                self.by_rel[rel] = path
                if name in self.by_name:
                    self.twice.setdefault(name, [self.by_name[name]]).append(rel)
                else:
                    self.by_name[name] = rel

    def _ambiguous(self, name: str, rels: list[str]) -> TableError:
        return TableError(f"the table's {self.shown(os.path.join(self.root, name))!r} is found {len(rels)} times "
                          f"under --input_dir: {' and '.join(self.shown(os.path.join(self.root, r)) for r in rels[:2])}")

    def find(self, name: str) -> str | None:
        """The absolute path the table's name or relative path means; None when there is none."""
        name = name.replace("\\", "/")
        if os.path.isabs(name):
            name = os.path.relpath(name, self.root).replace(os.sep, "/")
        base = name.rsplit("/", 1)[-1]
        if "/" not in name:
            if base in self.twice:
                raise self._ambiguous(name, self.twice[base])
            return self.by_rel.get(self.by_name.get(base, ""))
        parts = name.strip("/").split("/")
        for start in range(len(parts) - 1):  # --input_dir is the table's root, or one of its folders
            rel = "/".join(parts[start:])
            if rel in self.by_rel:
                return self.by_rel[rel]
        # --input_dir above the table's root: the files ending with the table's path.
        tails = [r for r in self.twice.get(base, [self.by_name.get(base, "")]) if r.endswith("/" + name)]
        if len(tails) > 1:
            raise self._ambiguous(name, tails)
        return self.by_rel[tails[0]] if tails else None

    def unnamed(self, used: set[str]) -> list[str]:
        """Relative paths of the image-like files no row named, in order."""
        return sorted(rel for rel, path in self.by_rel.items()
                      if path not in used and os.path.splitext(rel)[1].lower() in IMAGE_SUFFIXES)


def _rows(options: TableOptions, path: str) -> tuple[list[Row], list[str]]:
    if options.labels_format:
        return table_presets.preset_rows(options.labels_format, path, options.uncertain, options.nih_normal)
    return table_rows.column_rows(path, options.image_column, options.label_column, options.label_values,
                                  options.patient_column, options.split_column), [path]


def _source(row: Row, path: str, rel: str) -> SourceFile:
    if row.patient:
        return SourceFile(os.path.abspath(path), row.split or "train", row.label, rel, row.patient, True)
    # As for folders: a Kaggle-style name's patient, else the file is its own patient (a DICOM's PatientID
    # replaces either when the ids are hashed: patient_keys.pseudonymize).
    patient, parsed = patients.parse_patient_id(rel), True
    if patient is None:
        patient, parsed = os.path.splitext(rel)[0], False
    return SourceFile(os.path.abspath(path), row.split or "train", row.label, rel, patient, parsed,
                      patient_id_from_name=True)


def _resolve(rows: list[Row], index: FolderIndex, input_dir: str):
    """(SourceFile per usable row, skipped entries, those with a file problem, paths named by any row)."""
    files, skipped, file_problems, used, named = [], [], [], {}, set()
    for row in rows:
        path = index.find(row.name) if row.name else None
        named.add(path)
        file_problem = "" if row.reason else ("no such file under --input_dir" if path is None else
                                              folder_scan.unusable_reason(path) or "")
        reason = row.reason or file_problem or (f"names the same file as {used[path]}" if path in used else "")
        if reason:
            skipped.append(Unusable(path or os.path.join(input_dir, row.name), f"{row.where}: {reason}"))
            file_problems.extend(skipped[-1:] if file_problem else [])
            continue
        used[path] = row.where
        files.append(_source(row, path, os.path.relpath(path, input_dir).replace(os.sep, "/")))
    return files, skipped, file_problems, named


def carve_test(train: list[SourceFile], test_fraction: float, seed: int):
    """(train, test): about test_fraction of each class's images to test, whole patients only."""
    groups = splits.group_images([f.patient_id for f in train], [None] * len(train))
    chosen = splits.choose_val_groups([f.label for f in train], groups, test_fraction, seed)
    test = [dataclasses.replace(f, split="test") for f, g in zip(train, groups, strict=True) if g in chosen]
    return [f for f, g in zip(train, groups, strict=True) if g not in chosen], test


def _split(files: list[SourceFile], options: TableOptions) -> tuple[dict[str, list[SourceFile]], str]:
    by_split: dict[str, list[SourceFile]] = {"train": [], "val": [], "test": []}
    for f in files:
        by_split[f.split].append(f)
    test_source = "given"
    if not by_split["test"]:
        by_split["train"], by_split["test"] = carve_test(by_split["train"], options.test_fraction, options.seed)
        test_source = "carved from train by patient (--test_fraction)"
    if not by_split["val"]:
        del by_split["val"]
    for split in folder_scan.REQUIRED_SPLITS:
        if not by_split[split]:
            raise TableError(f"no usable image for split {split!r} in the label table: every row was skipped "
                             f"or none is in {split}")
    return by_split, test_source


def scan_table(input_dir: str, options: TableOptions, shown: Callable[[str], str] = str) -> TableScan:
    """The table's images per split, the rows skipped and the manifest's "table" entry; `shown` is how
    an error message writes a path (patient_keys.ShownPaths.full under --redact_paths)."""
    if not os.path.isdir(input_dir):
        raise folder_scan.LayoutError(f"input dir {input_dir} does not exist or is not a folder")
    path = options.table_path(input_dir)
    rows, tables_read = _rows(options, path)
    index = FolderIndex(input_dir, shown)
    files, skipped, file_problems, named = _resolve(rows, index, input_dir)
    by_split, test_source = _split(files, options)
    read = {os.path.abspath(p) for p in tables_read}
    unnamed = [r for r in index.unnamed(named) if os.path.abspath(os.path.join(input_dir, r)) not in read]
    summary = {
        "labels_csv": path,
        "labels_format": options.labels_format or "columns",
        "files_read": tables_read,
        "num_images": len(files),
        "num_rows_skipped": len(skipped),
        "test_source": test_source,
        "num_unnamed_images": len(unnamed),
        "unnamed_images": [os.path.join(input_dir, r) for r in unnamed[:MAX_LISTED_UNNAMED]],
    }
    return TableScan(by_split, skipped, file_problems, summary)


def report(table: TableScan, strict: bool, shown) -> None:
    """Logs what the table gave; with strict, a row naming a missing or unusable file is fatal.
    shown: patient_keys.ShownPaths, how paths appear in outputs."""
    if strict and table.file_problems:
        first = table.file_problems[0]
        raise TableError(f"{shown.full(first.path)}: {first.reason} (--strict makes unusable files fatal)")
    counts = ", ".join(f"{split} {len(files)}" for split, files in table.by_split.items())
    summary = table.summary
    log = logging.warning if table.skipped else logging.info
    log("label table %s: %d images (%s, test %s); %d rows skipped (manifest.json lists each under \"skipped\" "
        "with its reason); %d images under --input_dir not named by the table (under \"table\")",
        shown.full(summary["labels_csv"]), summary["num_images"], counts, summary["test_source"], len(table.skipped),
        summary["num_unnamed_images"])


def manifest_entry(table: TableScan, shown) -> dict:
    """The manifest's "table" entry, each path shown as outputs show paths (relative, or hashed)."""
    summary = dict(table.summary)
    summary["labels_csv"] = shown.full(summary["labels_csv"])
    summary["files_read"] = [shown.full(p) for p in summary["files_read"]]
    summary["unnamed_images"] = [shown.relative(p) for p in summary["unnamed_images"]]
    return summary


def check_flags(c) -> None:
    """Validates a BuildConfig's table flags (README "Label tables")."""
    require = cxr_config.require
    columns = {"image_column": c.image_column, "label_column": c.label_column, "patient_column": c.patient_column,
               "split_column": c.split_column, "label_values": c.label_values}
    require(c.labels_format in ("", *table_presets.FORMATS), "labels_format",
            f"must be one of {list(table_presets.FORMATS)} (or empty: the columns given by flags), "
            f"got {c.labels_format!r}")
    for flag, value in columns.items():
        require(not value or (c.labels_csv and not c.labels_format), flag,
                f"names a column of --labels_csv; --labels_format={c.labels_format} sets its own"
                if c.labels_format else "is only used with --labels_csv")
    if c.labels_csv and not c.labels_format:
        require(bool(c.image_column), "image_column", "is required with --labels_csv (or pass --labels_format)")
        require(bool(c.label_column), "label_column", "is required with --labels_csv (or pass --labels_format)")
        try:
            table_rows.parse_label_values(c.label_values)
        except ValueError as e:
            require(False, "label_values", str(e))
    require(0.0 < c.test_fraction < 1.0, "test_fraction", f"must be in (0, 1), got {c.test_fraction}")
    require(c.uncertain in UNCERTAIN_CHOICES, "uncertain", f"must be one of {list(UNCERTAIN_CHOICES)}, "
            f"got {c.uncertain!r}")
    require(c.nih_normal in table_presets.NIH_NORMAL, "nih_normal",
            f"must be one of {list(table_presets.NIH_NORMAL)}, got {c.nih_normal!r}")
