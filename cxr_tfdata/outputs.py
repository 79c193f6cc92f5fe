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

from cxr_tfdata import atomic

# The metadata tensorflow-datasets writes beside the shards (features.json lists the features,
# label.labels.txt the class names), and the manifest that marks a complete build.
DATASET_METADATA_FILES = ("manifest.json", "dataset_info.json", "features.json", "label.labels.txt")
# What tf.saved_model.save writes, and cxr-export's own asset, whose presence marks its exports.
EXPORT_MARKER = os.path.join("assets", "cxr_export.json")
_SAVED_MODEL_TOP = {"saved_model.pb", "fingerprint.pb", "variables", "assets"}
_SAVED_MODEL_VARIABLES = re.compile(r"^variables\.(index|data-\d{5}-of-\d{5})$")
# A folder that a binary fills with files of its own (evaluation, Grad-CAM overlays) names them here.
FOLDER_MARKER = ".cxr-tfdata-output.json"
_SHOWN_ENTRIES = 5


class UnsafeOutputError(ValueError):
    """Writing the output would touch an input or something this package did not make."""


def resolved(path: str) -> str:
    """The absolute path with every symlink followed (for comparing paths, never for messages)."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def is_within(path: str, folder: str) -> bool:
    """True when `path` is `folder` or lies inside it (both already resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


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
        inp = resolved(path)
        named = f"{flag}={path}" if flag.startswith("--") else f"{flag} ({path})"
        if out == inp:
            raise UnsafeOutputError(f"{output_flag}={output} is the same path as {named}: "
                                    f"an output must never replace an input")
        if is_within(out, inp):
            raise UnsafeOutputError(f"{output_flag}={output} lies inside {named}: choose an "
                                    f"output outside the inputs, which are never written to")
        if is_within(inp, out) and not may_contain_inputs:
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


def dataset_problems(folder: str) -> list[str]:
    """Why `folder` is not a complete dataset written by cxr-build-tfrecords; [] when it is."""
    manifest = _read_json(os.path.join(folder, "manifest.json"))
    if not isinstance(manifest, dict) or not {"format_version", "splits", "tfds"} <= set(manifest):
        return ["no manifest.json written by cxr-build-tfrecords"]
    if not os.path.isfile(os.path.join(folder, "dataset_info.json")):
        return ["no dataset_info.json (tensorflow-datasets metadata)"]
    known = set(DATASET_METADATA_FILES)
    for entry in manifest["splits"].values():
        known.update(entry.get("shard_files", []) if isinstance(entry, dict) else [])
    unknown = set(os.listdir(folder)) - known
    return [f"files cxr-build-tfrecords did not write: {_describe(unknown, folder)}"] if unknown else []


def saved_model_problems(folder: str) -> list[str]:
    """Why `folder` is not a SavedModel written by cxr-export; [] when it is."""
    if not os.path.isfile(os.path.join(folder, "saved_model.pb")):
        return ["no saved_model.pb"]
    if not os.path.isfile(os.path.join(folder, EXPORT_MARKER)):
        return [f"no {EXPORT_MARKER}, which cxr-export writes into every export"]
    unknown = [e for e in os.listdir(folder) if e not in _SAVED_MODEL_TOP]
    variables = os.path.join(folder, "variables")
    if os.path.isdir(variables):
        unknown += [f"variables/{e}" for e in os.listdir(variables) if not _SAVED_MODEL_VARIABLES.match(e)]
    assets = os.path.join(folder, "assets")
    unknown += [f"assets/{e}" for e in os.listdir(assets) if e != os.path.basename(EXPORT_MARKER)]
    return [f"files cxr-export did not write: {_describe(unknown, folder)}"] if unknown else []


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
                 overwrite: bool, ignore: Iterable[str] = ()) -> None:
    """Makes `folder` ready for `program` to write `files` (fixed names) into it, or refuses.

    Allowed: a missing or empty folder; a folder whose marker says `program` wrote it (its files
    are replaced, other entries are left alone); with `overwrite`, a non-empty folder that holds
    none of `files` (they are added beside what is there). Never replaced: a file of one of those
    names that `program` did not write (e.g. cxr-train's metrics.json in a model dir). The marker,
    listing the files, is written before any of them, so a killed run's leftovers stay claimed.
    """
    files = sorted(set(files))
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise UnsafeOutputError(f"{output_flag}={folder} is a file, not a folder")
    os.makedirs(folder, exist_ok=True)
    marker = read_folder_marker(folder)
    ours = set(marker["files"]) if marker and marker.get("program") == program else set()
    entries = set(os.listdir(folder)) - {FOLDER_MARKER, *ignore}
    clashes = sorted((entries & set(files)) - ours)
    if clashes:
        raise UnsafeOutputError(
            f"{output_flag}={folder} holds {_describe(clashes, folder)}, which {program} did not write "
            f"and will not replace{' even with --overwrite' if overwrite else ''}; choose another folder")
    others = entries - set(files) - ours
    if others and not ours and not overwrite:
        raise UnsafeOutputError(
            f"{output_flag}={folder} is not empty and was not written by {program} (it holds "
            f"{_describe(others, folder)}); choose an empty or new folder, or pass --overwrite to add "
            f"{program}'s files beside what is there")
    atomic.write_json(os.path.join(folder, FOLDER_MARKER), {"program": program, "files": files})


def check_file_replaceable(output_flag: str, path: str, looks_ours) -> None:
    """Refuses to write over an existing `path` unless `looks_ours(path)` recognises it."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isfile(path):
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
