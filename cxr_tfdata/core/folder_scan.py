"""Finds the source images in a Kaggle-layout folder and checks the layout before any work starts.

Layout: <input_dir>/{train,test[,val]}/{NORMAL,PNEUMONIA}/<files>. Every regular file under a
class folder, subfolders included, is a candidate (a non-image is skipped later with its reason);
an entry that cannot be one (a symbolic link to a folder, which is not followed, a broken link, a
FIFO, socket or device) is listed as unusable with its reason, never dropped silently; anything
else that does not fit the layout is an error naming the path, so a typo never silently drops a
class.
"""

from __future__ import annotations

import dataclasses
import os
import stat

from cxr_tfdata.core import patients, record_schema

REQUIRED_SPLITS = ("train", "test")
OPTIONAL_SPLITS = ("val",)


class LayoutError(ValueError):
    """The input folder does not have the expected layout; the message names the path."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One candidate image on disk."""

    path: str  # absolute path
    split: str  # the split folder it was found in
    label: int  # index into record_schema.CLASS_NAMES
    filename: str  # "<CLASS>/<name>", relative to the split folder
    patient_id: str  # raw from a scan; a keyed hash once patient_keys.pseudonymize has run
    patient_id_parsed: bool
    # True when patient_id came from the file name: a DICOM's PatientID then replaces it (patient_keys).
    patient_id_from_name: bool = False


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _list_dir(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as entries:
        return sorted((e for e in entries if not is_hidden(e.name)), key=lambda e: e.name)


@dataclasses.dataclass(frozen=True)
class Unusable:
    """An entry of a class folder that cannot be read as a file."""

    path: str  # absolute path
    reason: str


_KIND_OF_MODE = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def unusable_reason(path: str) -> str | None:
    """Why `path` cannot be read as an image file (None for a regular file, or a link to one)."""
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "no such file"
    except OSError as e:
        return f"cannot be examined: {e.strerror or e}"
    if stat.S_ISREG(target.st_mode):
        return None
    if stat.S_ISDIR(target.st_mode):
        return "symbolic link to a folder (not followed)"
    kind = next((name for test, name in _KIND_OF_MODE if test(target.st_mode)), "not a regular file")
    return f"{kind}, not a regular file" + (" (through a symbolic link)" if os.path.islink(path) else "")


def _walk_files(folder: str) -> tuple[list[str], list[Unusable]]:
    """Every non-hidden regular file under folder, subfolders included, in sorted order, and the
    entries that are not regular files (with why).

    Subfolders are read as Keras' flow_from_directory reads them (the notebook this replaces), so
    an image filed one level too deep is still used, never silently lost nor fatal to the build.
    """
    found, unusable = [], []
    for entry in _list_dir(folder):
        if entry.is_dir(follow_symlinks=False):
            sub_found, sub_unusable = _walk_files(entry.path)
            found.extend(sub_found)
            unusable.extend(sub_unusable)
            continue
        reason = unusable_reason(entry.path)
        if reason is None:
            found.append(entry.path)
        else:
            unusable.append(Unusable(os.path.abspath(entry.path), reason))
    return found, unusable


def _scan_class_folder(split: str, split_dir: str, label: int, required: bool,
                       unusable: list[Unusable]) -> list[SourceFile]:
    class_name = record_schema.CLASS_NAMES[label]
    class_dir = os.path.join(split_dir, class_name)
    if not required and not os.path.isdir(class_dir):
        return []
    if not os.path.isdir(class_dir):
        raise LayoutError(f"missing class folder {class_dir} (expected {list(record_schema.CLASS_NAMES)})")
    files = []
    paths, class_unusable = _walk_files(class_dir)
    unusable.extend(class_unusable)
    for path in paths:
        name = os.path.relpath(path, class_dir).replace(os.sep, "/")
        patient_id, parsed = patients.patient_id_or_stem(name)
        files.append(SourceFile(os.path.abspath(path), split, label,
                                f"{class_name}/{name}", patient_id, parsed, patient_id_from_name=True))
    if not files and required:
        raise LayoutError(f"empty class folder {class_dir}: no files")
    return files


def _scan_split(input_dir: str, split: str, unusable: list[Unusable],
                required: bool | None = None) -> tuple[list[SourceFile], list[str]]:
    """Returns the split's files and the paths of stray files lying beside the class folders."""
    split_dir = os.path.join(input_dir, split)
    strays = []
    for entry in _list_dir(split_dir):
        if entry.is_dir() and entry.name not in record_schema.CLASS_NAMES:
            raise LayoutError(
                f"unknown class folder {entry.path}: expected only {list(record_schema.CLASS_NAMES)}"
            )
        if not entry.is_dir():  # a file, link, FIFO...: nothing beside the class folders is read
            strays.append(os.path.abspath(entry.path))
    files = []
    for label in range(len(record_schema.CLASS_NAMES)):
        # A given val/ may be partial: it is merged into train when too small (see plan.py).
        files.extend(_scan_class_folder(split, split_dir, label,
                                        split in REQUIRED_SPLITS if required is None else required, unusable))
    return files, strays


def scan_labelled_folder(folder: str) -> tuple[list[SourceFile], list[str], list[Unusable]]:
    """A folder holding NORMAL/ and PNEUMONIA/ (cxr-evaluate --images_dir), read exactly as one split
    folder of the converter's input is: the same files, names, labels and patient ids, the same stray
    files beside the class folders and the same unusable entries. Both class folders are required."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise LayoutError(f"{folder} does not exist or is not a folder")
    unusable: list[Unusable] = []
    files, strays = _scan_split(os.path.dirname(folder), os.path.basename(folder), unusable, required=True)
    return files, strays, unusable


def has_class_folders(folder: str) -> bool:
    """True when `folder` holds a NORMAL/ or PNEUMONIA/ folder: a labelled folder, not a plain one."""
    return any(os.path.isdir(os.path.join(folder, name)) for name in record_schema.CLASS_NAMES)


def scan_unlabelled_folder(folder: str) -> tuple[list[SourceFile], list[Unusable]]:
    """Every file of a folder of unlabelled images (subfolders included), with the file names and
    patient ids a labelled folder's files get; `label` is -1. Entries that are not regular files are
    returned as unusable, with why."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise LayoutError(f"{folder} does not exist or is not a folder")
    paths, unusable = _walk_files(folder)
    files = []
    for path in paths:
        name = os.path.relpath(path, folder).replace(os.sep, "/")
        patient_id, parsed = patients.patient_id_or_stem(name)
        files.append(SourceFile(os.path.abspath(path), "", -1, name, patient_id, parsed, patient_id_from_name=True))
    return files, unusable


def scan_input(input_dir: str) -> tuple[dict[str, list[SourceFile]], list[str], list[Unusable]]:
    """Returns {split folder: files} for train, test and (when present) val, the paths of stray
    files beside the class folders, and the entries of class folders that are not regular files."""
    if not os.path.isdir(input_dir):
        raise LayoutError(f"input dir {input_dir} does not exist or is not a folder")
    known = REQUIRED_SPLITS + OPTIONAL_SPLITS
    for entry in _list_dir(input_dir):
        if entry.is_dir() and entry.name not in known:
            raise LayoutError(f"unknown split folder {entry.path}: expected {list(known)}")
    for split in REQUIRED_SPLITS:
        if not os.path.isdir(os.path.join(input_dir, split)):
            raise LayoutError(f"missing split folder {os.path.join(input_dir, split)}")
    by_split, strays, unusable = {}, [], []
    for split in known:
        if os.path.isdir(os.path.join(input_dir, split)):
            by_split[split], split_strays = _scan_split(input_dir, split, unusable)
            strays.extend(split_strays)
    return by_split, strays, unusable
