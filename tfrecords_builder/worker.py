"""The functions worker processes run: no TensorFlow import here, so workers start fast."""

from __future__ import annotations

import hashlib

from cxr_tfdata.core import imaging


def hash_file(task: tuple[str, int]) -> tuple[str, str | None]:
    """(path, sha256 of the bytes), None for an empty or unreadable file (reported later)."""
    path, max_bytes = task
    try:
        data = imaging.read_source(path, max_bytes)
    except imaging.ImageError:
        return path, None
    return path, hashlib.sha256(data).hexdigest() if data else None


def convert_file(
    task: tuple[int, str, imaging.EncodeOptions, str | None],
) -> tuple[int, imaging.ConvertedImage | None, str | None]:
    """(index, converted image or None, skip reason or None) for one source file.

    planned_sha256 is the hash the split plan saw, for files that could have a byte-identical
    twin; only those are hashed again here (hashing every file costs ~5% of the conversion).
    """
    index, path, options, planned_sha256 = task
    try:
        data = imaging.read_source(path, options.max_file_bytes)
    except imaging.ImageError as e:
        return index, None, str(e)
    if planned_sha256 and hashlib.sha256(data).hexdigest() != planned_sha256:
        # The split plan and duplicate report were made from other bytes.
        return index, None, "file changed while the dataset was being built"
    try:
        return index, imaging.convert(data, options), None
    except imaging.ImageError as e:
        return index, None, str(e)
