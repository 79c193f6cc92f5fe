"""The functions worker processes run: no TensorFlow import here, so workers start fast."""

from __future__ import annotations

import hashlib

from tfrecords_builder import imaging


def hash_file(path: str) -> tuple[str, str | None]:
    """(path, sha256 of the bytes), None for an empty or unreadable file (reported later)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return path, None
    return path, hashlib.sha256(data).hexdigest() if data else None


def convert_file(
    task: tuple[int, str, imaging.EncodeOptions],
) -> tuple[int, imaging.ConvertedImage | None, str | None]:
    """(index, converted image or None, skip reason or None) for one source file."""
    index, path, options = task
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return index, None, f"unreadable file: {e.strerror or e}"
    try:
        return index, imaging.convert(data, options), None
    except imaging.ImageError as e:
        return index, None, str(e)
