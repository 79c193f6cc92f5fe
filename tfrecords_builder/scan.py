"""Finds the source images in a Kaggle-layout folder and checks the layout before any work starts.

Layout: <input_dir>/{train,test[,val]}/{NORMAL,PNEUMONIA}/<files>. Every regular file under a
class folder, subfolders included, is a candidate (a non-image is skipped later with its reason);
anything else that does not fit the layout is an error naming the path, so a typo never silently
drops a class.
"""

from __future__ import annotations

import dataclasses
import os

from cxr_tfdata import features
from tfrecords_builder import patients

REQUIRED_SPLITS = ("train", "test")
OPTIONAL_SPLITS = ("val",)


class LayoutError(ValueError):
    """The input folder does not have the expected layout; the message names the path."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One candidate image on disk."""

    path: str  # absolute path
    split: str  # the split folder it was found in
    label: int  # index into features.CLASS_NAMES
    filename: str  # "<CLASS>/<name>", relative to the split folder
    patient_id: str
    patient_id_parsed: bool


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _list_dir(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as entries:
        return sorted((e for e in entries if not _is_hidden(e.name)), key=lambda e: e.name)


def _walk_files(folder: str) -> list[str]:
    """Every non-hidden regular file under folder, subfolders included, in sorted order.

    Subfolders are read as Keras' flow_from_directory reads them (the notebook this replaces), so
    an image filed one level too deep is still used, never silently lost nor fatal to the build.
    """
    found = []
    for entry in _list_dir(folder):
        if entry.is_dir(follow_symlinks=False):
            found.extend(_walk_files(entry.path))
        elif entry.is_file():  # sockets, broken symlinks: not files
            found.append(entry.path)
    return found


def _scan_class_folder(split: str, split_dir: str, label: int, required: bool) -> list[SourceFile]:
    class_name = features.CLASS_NAMES[label]
    class_dir = os.path.join(split_dir, class_name)
    if not required and not os.path.isdir(class_dir):
        return []
    if not os.path.isdir(class_dir):
        raise LayoutError(f"missing class folder {class_dir} (expected {list(features.CLASS_NAMES)})")
    files = []
    for path in _walk_files(class_dir):
        name = os.path.relpath(path, class_dir).replace(os.sep, "/")
        patient_id, parsed = patients.patient_id_or_stem(name)
        files.append(SourceFile(os.path.abspath(path), split, label,
                                f"{class_name}/{name}", patient_id, parsed))
    if not files and required:
        raise LayoutError(f"empty class folder {class_dir}: no files")
    return files


def _scan_split(input_dir: str, split: str) -> tuple[list[SourceFile], list[str]]:
    """Returns the split's files and the paths of stray files lying beside the class folders."""
    split_dir = os.path.join(input_dir, split)
    strays = []
    for entry in _list_dir(split_dir):
        if entry.is_dir() and entry.name not in features.CLASS_NAMES:
            raise LayoutError(
                f"unknown class folder {entry.path}: expected only {list(features.CLASS_NAMES)}"
            )
        if entry.is_file():
            strays.append(os.path.abspath(entry.path))
    files = []
    for label in range(len(features.CLASS_NAMES)):
        # A given val/ may be partial: it is merged into train when too small (see plan.py).
        files.extend(_scan_class_folder(split, split_dir, label, required=split in REQUIRED_SPLITS))
    return files, strays


def scan_input(input_dir: str) -> tuple[dict[str, list[SourceFile]], list[str]]:
    """Returns {split folder: files} for train, test and (when present) val, and stray file paths."""
    if not os.path.isdir(input_dir):
        raise LayoutError(f"input dir {input_dir} does not exist or is not a folder")
    known = REQUIRED_SPLITS + OPTIONAL_SPLITS
    for entry in _list_dir(input_dir):
        if entry.is_dir() and entry.name not in known:
            raise LayoutError(f"unknown split folder {entry.path}: expected {list(known)}")
    for split in REQUIRED_SPLITS:
        if not os.path.isdir(os.path.join(input_dir, split)):
            raise LayoutError(f"missing split folder {os.path.join(input_dir, split)}")
    by_split, strays = {}, []
    for split in known:
        if os.path.isdir(os.path.join(input_dir, split)):
            by_split[split], split_strays = _scan_split(input_dir, split)
            strays.extend(split_strays)
    return by_split, strays
