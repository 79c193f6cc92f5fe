"""What a binary may write over or delete: never an input, never anything it did not make.

Two rules, applied by every binary before it writes anything:
  * an output never equals, contains or lies inside one of the run's inputs (paths compared after
    following symlinks), so no output can overwrite, delete or be mixed into its inputs;
  * an existing output is replaced only when it is recognisably this package's own and holds
    nothing else: a dataset folder is its manifest.json, TFDS metadata and the shards the
    manifest lists; a SavedModel is the files tf.saved_model writes plus cxr-export's
    `assets/cxr_export.json`; an evaluation or Grad-CAM folder is what its marker file lists.
Anything else is refused with an `UnsafeOutputError` naming the path and what was found there.
No TensorFlow import here: the converter checks its output before forking workers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping

from cxr_tfdata.files import atomic

# The metadata tensorflow-datasets writes beside the shards (features.json lists the features,
# label.labels.txt the class names), and the manifest that marks a complete build.
DATASET_METADATA_FILES = ("manifest.json", "dataset_info.json", "features.json", "label.labels.txt")
# What tf.saved_model.save writes, and cxr-export's own asset, whose presence marks its exports.
EXPORT_MARKER = os.path.join("assets", "cxr_export.json")
_SAVED_MODEL_VARIABLES = re.compile(r"^variables\.(index|data-\d{5}-of-\d{5})$")
# A folder that a binary fills with files of its own (evaluation, Grad-CAM overlays) names them here.
FOLDER_MARKER = ".cxr-tfdata-output.json"
_SHOWN_ENTRIES = 5


class UnsafeOutputError(ValueError):
    """Writing the output would touch an input or something this package did not make."""


def resolved(path: str) -> str:
    """The absolute path with every symlink followed, as the operating system follows them: a
    `..` after a symlink goes up from the link's target (no textual normalisation first, and no
    `~` expansion, which the shell did not do for `--flag=~/x`). For comparing paths only."""
    return os.path.realpath(os.fspath(path))


def canonical(path: str) -> str:
    """The path a binary writes to: absolute, its folder resolved as `resolved` resolves it, its
    last component kept as given (so a symlink there is seen, not silently followed).

    Every output is checked and written under this one spelling, so the checks and the writes
    can never see two different places."""
    path = os.fspath(path)
    head, tail = os.path.split(path.rstrip(os.sep) or path)
    if tail in ("", os.curdir, os.pardir):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(head or os.curdir), tail)


def is_within(path: str, folder: str) -> bool:
    """True when `path` is `folder` or lies inside it (both already resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _within_by_identity(path: str, folder: str) -> bool:
    """True when `path` (or its nearest existing ancestor chain) passes through `folder`'s inode:
    catches what paths cannot show, such as a bind mount of the folder elsewhere."""
    target = _identity(folder)
    if target is None:
        return False
    current = path
    while True:
        if _identity(current) == target:
            return True
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


def _overlap(out: str, inp: str) -> str | None:
    """"same", "inside" (out inside inp), "contains" (inp inside out) or None; both resolved."""
    same = out == inp or (_identity(out) is not None and _identity(out) == _identity(inp))
    if same:
        return "same"
    if is_within(out, inp) or _within_by_identity(out, inp):
        return "inside"
    if is_within(inp, out) or _within_by_identity(inp, out):
        return "contains"
    return None


def check_apart(output_flag: str, output: str, inputs: Mapping[str, str | None],
                may_contain_inputs: bool = False) -> None:
    """Refuses an output that is, contains or lies inside an input (symlinks followed).

    inputs maps a flag (e.g. "--input_dir") or a description (e.g. "image path 3") to its path;
    empty paths are ignored. With
    may_contain_inputs, an output folder that only receives new files of fixed names (it is never
    replaced or emptied) may hold an input, as an evaluation folder may hold the model it tests.
    """
    out = resolved(output)
    for flag, path in inputs.items():
        if not path:
            continue
        named = f"{flag}={path}" if flag.startswith("--") else f"{flag} ({path})"
        overlap = _overlap(out, resolved(path))
        if overlap == "same":
            raise UnsafeOutputError(f"{output_flag}={output} is the same path as {named}: "
                                    f"an output must never replace an input")
        if overlap == "inside":
            raise UnsafeOutputError(f"{output_flag}={output} lies inside {named}: choose an "
                                    f"output outside the inputs, which are never written to")
        if overlap == "contains" and not may_contain_inputs:
            raise UnsafeOutputError(f"{output_flag}={output} contains {named}: replacing it "
                                    f"would delete that input; choose another output path")


def _describe(entries: Iterable[str], folder: str) -> str:
    names = sorted(entries)
    shown = [f"{n}/" if os.path.isdir(os.path.join(folder, n)) else n for n in names[:_SHOWN_ENTRIES]]
    more = f" and {len(names) - _SHOWN_ENTRIES} more" if len(names) > _SHOWN_ENTRIES else ""
    return ", ".join(shown) + more


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_plain_file(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def _is_plain_folder(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _foreign_entries(folder: str, expected_files: set[str], expected_folders: set[str] = frozenset(),
                     prefix: str = "") -> list[str]:
    """Entries of folder that are not one of the expected regular files or plain folders (a link,
    or a folder where a file belongs, is foreign too)."""
    foreign = []
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if entry in expected_files and _is_plain_file(path):
            continue
        if entry in expected_folders and _is_plain_folder(path):
            continue
        foreign.append(prefix + entry)
    return foreign


def dataset_problems(folder: str) -> list[str]:
    """Why `folder` is not a complete dataset written by cxr-build-tfrecords; [] when it is."""
    manifest = _read_json(os.path.join(folder, "manifest.json"))
    if not isinstance(manifest, dict) or not {"format_version", "splits", "tfds"} <= set(manifest):
        return ["no manifest.json written by cxr-build-tfrecords"]
    info = os.path.join(folder, "dataset_info.json")
    if os.path.islink(info):
        return ["dataset_info.json is a symbolic link, which cxr-build-tfrecords never writes"]
    if not _is_plain_file(info):
        return ["no dataset_info.json (tensorflow-datasets metadata)"]
    known = set(DATASET_METADATA_FILES)
    for entry in manifest["splits"].values() if isinstance(manifest["splits"], dict) else []:
        shards = entry.get("shard_files", []) if isinstance(entry, dict) else []
        known.update(name for name in shards if isinstance(name, str))
    foreign = _foreign_entries(folder, known)
    return [f"entries cxr-build-tfrecords did not write: {_describe(foreign, folder)}"] if foreign else []


def saved_model_problems(folder: str) -> list[str]:
    """Why `folder` is not a SavedModel written by cxr-export; [] when it is."""
    if not _is_plain_file(os.path.join(folder, "saved_model.pb")):
        return ["no saved_model.pb"]
    if not _is_plain_file(os.path.join(folder, EXPORT_MARKER)):
        return [f"no {EXPORT_MARKER}, which cxr-export writes into every export"]
    foreign = _foreign_entries(folder, {"saved_model.pb", "fingerprint.pb"}, {"variables", "assets"})
    variables = os.path.join(folder, "variables")
    if _is_plain_folder(variables):
        names = {e for e in os.listdir(variables) if _SAVED_MODEL_VARIABLES.match(e)}
        foreign += _foreign_entries(variables, names, prefix="variables/")
    foreign += _foreign_entries(os.path.join(folder, "assets"), {os.path.basename(EXPORT_MARKER)},
                                prefix="assets/")
    return [f"entries cxr-export did not write: {_describe(foreign, folder)}"] if foreign else []


# cxr-export's other formats (--format): the model file(s) beside the export's description, cxr_export.json.
# (modeling/portable_formats.MODEL_FILES names the same files.)
PORTABLE_EXPORT_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin"),
                         "tflite": ("model.tflite",)}
PORTABLE_EXPORT_MARKER = os.path.basename(EXPORT_MARKER)


def portable_export_problems(folder: str) -> list[str]:
    """Why `folder` is not an ONNX, OpenVINO or LiteRT export written by cxr-export; [] when it is: its
    cxr_export.json names cxr-export and the format, and the folder holds exactly that format's files."""
    marker_path = os.path.join(folder, PORTABLE_EXPORT_MARKER)
    marker = _read_json(marker_path) if _is_plain_file(marker_path) else None
    if not isinstance(marker, dict) or marker.get("written_by") != "cxr-export":
        return [f"no {PORTABLE_EXPORT_MARKER} written by cxr-export"]
    files = PORTABLE_EXPORT_FILES.get(marker.get("format"))
    if files is None:
        return [f"{PORTABLE_EXPORT_MARKER} names no format cxr-export writes ({marker.get('format')!r})"]
    missing = [name for name in files if not _is_plain_file(os.path.join(folder, name))]
    foreign = _foreign_entries(folder, {PORTABLE_EXPORT_MARKER, *files})
    return ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"entries cxr-export did not write: {_describe(foreign, folder)}"] if foreign else [])


def export_problems(folder: str) -> list[str]:
    """Why `folder` is not an export of cxr-export in any format (SavedModel, ONNX, OpenVINO, LiteRT)."""
    if os.path.lexists(os.path.join(folder, "saved_model.pb")):
        return saved_model_problems(folder)
    portable = portable_export_problems(folder)
    return portable if os.path.lexists(os.path.join(folder, PORTABLE_EXPORT_MARKER)) else ["no saved_model.pb"] + portable


def check_replaceable(output_flag: str, folder: str, what: str, problems: list[str]) -> None:
    """Refuses to replace `folder` unless it is `what` (a recognised output) with nothing else in it."""
    if not os.path.lexists(folder):
        return
    if os.path.isdir(folder) and not os.path.islink(folder) and not problems:
        return
    if os.path.islink(folder):
        found = f"a symbolic link to {os.path.realpath(folder)}"
    elif not os.path.isdir(folder):
        found = "a file, not a folder"
    else:
        entries = os.listdir(folder)
        found = "; ".join(problems) + (f" (it holds {_describe(entries, folder)})" if entries else "")
    raise UnsafeOutputError(f"{output_flag}={folder} is not {what}, so --overwrite will not replace it: "
                            f"{found}. Choose another path, or move it away yourself")


def read_folder_marker(folder: str) -> dict | None:
    """The marker a binary wrote into a folder it fills (None when absent or unreadable)."""
    marker = _read_json(os.path.join(folder, FOLDER_MARKER))
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def claim_folder(output_flag: str, folder: str, program: str, files: Iterable[str],
                 overwrite: bool | None, ignore: Iterable[str] = ()) -> None:
    """Makes `folder` ready for `program` to write `files` (fixed names) into it, or refuses.

    Allowed: a missing or empty folder; a folder whose marker says `program` wrote it (its files
    are replaced, other entries are left alone); with `overwrite`, a non-empty folder that holds
    none of `files` and no other program's output (they are added beside what is there).
    overwrite=None: the program has no --overwrite flag. Never replaced: a file of one of those
    names that `program` did not write (e.g. cxr-train's metrics.json in a model dir). The marker,
    listing every file `program` has written there, is written before any of them, so a killed
    run's leftovers stay claimed.
    """
    files = sorted(set(files))
    if os.path.lexists(folder) and not _is_plain_folder(folder):
        raise UnsafeOutputError(f"{output_flag}={folder} is not a folder (a file, or a symbolic link)")
    os.makedirs(folder, exist_ok=True)
    marker = read_folder_marker(folder)
    if marker is None and os.path.lexists(os.path.join(folder, FOLDER_MARKER)):
        raise UnsafeOutputError(f"{output_flag}={folder} holds an unreadable {FOLDER_MARKER}; choose another folder")
    if marker and marker.get("program") != program:
        raise UnsafeOutputError(f"{output_flag}={folder} holds the output of {marker.get('program')}, which "
                                f"{program} will not write into; choose another folder")
    ours = set(marker["files"]) if marker else set()
    entries = set(os.listdir(folder)) - {FOLDER_MARKER, *ignore}
    clashes = sorted((entries & set(files)) - ours)
    clashes += sorted(e for e in entries & set(files) & ours if not _is_plain_file(os.path.join(folder, e)))
    if clashes:
        raise UnsafeOutputError(
            f"{output_flag}={folder} holds {_describe(clashes, folder)}, which {program} did not write "
            f"and will not replace{' even with --overwrite' if overwrite else ''}; choose another folder")
    others = entries - set(files) - ours
    if others and not ours and not overwrite:
        advice = (f"or pass --overwrite to add {program}'s files beside what is there" if overwrite is not None
                  else "nothing in it is replaced")
        raise UnsafeOutputError(
            f"{output_flag}={folder} is not empty and was not written by {program} (it holds "
            f"{_describe(others, folder)}); choose an empty or new folder, {advice}")
    atomic.write_json(os.path.join(folder, FOLDER_MARKER), {"program": program, "files": sorted(ours | set(files))})


def check_file_replaceable(output_flag: str, path: str, looks_ours) -> None:
    """Refuses to write over an existing `path` unless `looks_ours(path)` recognises it."""
    if not os.path.lexists(path):
        return
    if not _is_plain_file(path):
        raise UnsafeOutputError(f"{output_flag}={path} exists and is not a regular file; choose another path")
    if not looks_ours(path):
        raise UnsafeOutputError(f"{output_flag}={path} exists and was not written by this program; "
                                f"choose another path, or move that file away yourself")


def first_line(path: str, limit: int = 4096) -> str:
    """The first line of a text file (for recognising a CSV by its header)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    except OSError:
        return ""
