"""Decides which source file goes to which output split before any image is decoded.

Order of decisions: a given val/ smaller than min_val_images is merged into train; byte-identical
copies across the given splits, and images of one patient in several given splits, are leaks,
reported and (drop_leaks) removed from the lower split (test > val > train), so test stays as
given; then, when there is no usable val/, a patient-grouped stratified val split is carved from
train. Nothing is ever moved out of test.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from cxr_tfdata.core import patient_keys
from cxr_tfdata.core.folder_scan import SourceFile
from tfrecords_builder import splits

# Higher wins when the same bytes sit in two given splits.
_SPLIT_PRIORITY = {"test": 2, "val": 1, "train": 0}


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    val_fraction: float = 0.2
    seed: int = 0
    drop_leaks: bool = True
    min_val_images: int = 100


@dataclasses.dataclass
class Plan:
    splits: dict[str, list[SourceFile]]
    val_source: str  # "given", "carved from train", or "none"
    duplicates: dict[str, Any]
    dropped_leaks: list[dict[str, str]]
    patients_in_several_given_splits: list[dict[str, Any]]
    # Files each given split lost as leaks (before any val carve-out: a carved val shows 0).
    num_dropped_by_split: dict[str, int] = dataclasses.field(default_factory=dict)


def _relative(path: str, input_dir) -> str:
    """input_dir: the folder, or patient_keys.ShownPaths (which may redact the path)."""
    return patient_keys.relative(path, input_dir)


def _given_splits(by_split: dict[str, list[SourceFile]], min_val_images: int) -> tuple[dict, bool]:
    """Train/test (and val when big enough); returns the splits and whether val/ is used as given."""
    given = {"train": list(by_split["train"]), "test": list(by_split["test"])}
    val_files = by_split.get("val", [])
    if len(val_files) >= min_val_images:
        given["val"] = list(val_files)
        return given, True
    given["train"].extend(val_files)  # too few to validate on; their patients join the carve-out
    return given, False


def _find_duplicates(given, hashes, input_dir):
    """Groups of identical bytes: within one split, and across splits (leaks)."""
    where = collections.defaultdict(lambda: collections.defaultdict(list))
    for split, files in given.items():
        for f in files:
            if hashes.get(f.path):
                where[hashes[f.path]][split].append(f.path)
    within, across = [], []
    for digest, by_split in sorted(where.items()):
        for split, paths in sorted(by_split.items()):
            if len(paths) > 1:
                within.append({"sha256": digest, "split": split,
                               "paths": sorted(_relative(p, input_dir) for p in paths)})
        if len(by_split) > 1:
            across.append({"sha256": digest, "paths": {
                s: sorted(_relative(p, input_dir) for p in ps) for s, ps in sorted(by_split.items())}})
    return within, across


def _drop_leaks(given, across, input_dir) -> list[dict[str, str]]:
    """Removes each leaked copy from every split but the highest-priority one holding it."""
    to_drop: dict[str, str] = {}
    for group in across:
        keep = max(group["paths"], key=_SPLIT_PRIORITY.__getitem__)
        group["kept_in"] = keep
        for split, paths in group["paths"].items():
            if split != keep:
                for rel in paths:
                    to_drop[rel] = f"identical bytes in {keep}: {group['paths'][keep][0]}"
    for split in given:
        given[split] = [f for f in given[split] if _relative(f.path, input_dir) not in to_drop]
    return [{"path": rel, "reason": reason} for rel, reason in sorted(to_drop.items())]


def _drop_patient_leaks(given, input_dir) -> list[dict[str, str]]:
    """Removes a patient's images from every given split but the highest-priority one holding them.

    A patient seen in training and tested on is a leak even when no two files are identical.
    """
    home: dict[str, tuple[str, SourceFile]] = {}
    for split in sorted(given, key=_SPLIT_PRIORITY.__getitem__, reverse=True):
        for f in given[split]:
            home.setdefault(f.patient_id, (split, f))
    dropped = []
    for split in given:
        kept = []
        for f in given[split]:
            home_split, example = home[f.patient_id]
            if home_split == split:
                kept.append(f)
            else:
                dropped.append({"path": _relative(f.path, input_dir),
                                "reason": f"patient {f.patient_id} is in {home_split}: "
                                          f"{_relative(example.path, input_dir)}"})
        given[split] = kept
    return dropped


def _patient_overlap(given) -> list[dict[str, Any]]:
    split_sets = collections.defaultdict(set)
    for split, files in given.items():
        for f in files:
            split_sets[f.patient_id].add(split)
    return [{"patient_id": p, "splits": sorted(s)} for p, s in sorted(split_sets.items()) if len(s) > 1]


def _carve_val(train: list[SourceFile], hashes, options: PlanOptions):
    groups = splits.group_images([f.patient_id for f in train], [hashes.get(f.path) for f in train])
    val_groups = splits.choose_val_groups([f.label for f in train], groups,
                                          options.val_fraction, options.seed)
    new_train = [f for f, g in zip(train, groups, strict=True) if g not in val_groups]
    val = [f for f, g in zip(train, groups, strict=True) if g in val_groups]
    return new_train, val


def make_plan(by_split, hashes: dict[str, str | None], input_dir: str, options: PlanOptions) -> Plan:
    """by_split from scan.scan_input; hashes maps a source path to its sha256 (None: unreadable)."""
    given, val_given = _given_splits(by_split, options.min_val_images)
    _, across = _find_duplicates(given, hashes, input_dir)
    overlap = _patient_overlap(given)
    dropped = []
    sizes_as_given = {split: len(files) for split, files in given.items()}
    if options.drop_leaks:
        dropped = _drop_leaks(given, across, input_dir) + _drop_patient_leaks(given, input_dir)
        dropped.sort(key=lambda d: d["path"])
    num_dropped = {split: size - len(given[split]) for split, size in sizes_as_given.items()}
    if val_given:
        val_source = "given"
    elif options.val_fraction > 0:
        given["train"], given["val"] = _carve_val(given["train"], hashes, options)
        val_source = "carved from train"
    else:
        val_source = "none"
    ordered = {s: sorted(given[s], key=lambda f: f.filename) for s in ("train", "val", "test") if given.get(s)}
    within, _ = _find_duplicates(ordered, hashes, input_dir)
    return Plan(ordered, val_source, {"within_split": within, "across_splits": across},
                dropped, overlap, num_dropped)
