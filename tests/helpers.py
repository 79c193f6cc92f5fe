"""Test helpers: small datasets built by the real converter from labelled images, and the shared real data."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_tfdata.core import record_schema

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real images not available at {SHARED_DATA}"
)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless single-channel PNG of a [H, W] or [H, W, 1] uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8).squeeze(-1) if np.ndim(pixels) == 3 else np.asarray(pixels, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def labelled_image(label: int, index: int, image_size: int) -> np.ndarray:
    """An image that encodes its own label and index, so alignment can be checked after any shuffle.

    Pixel (0, 0) holds the label (0 or 1) times 200, pixel (0, 1) the index mod 256, pixel (0, 2)
    the index // 256; the rest is a learnable pattern: NORMAL dark, PNEUMONIA bright with a blob.
    """
    rng = np.random.default_rng(index)
    base = 60 if label == 0 else 150
    img = np.clip(rng.normal(base, 20, (image_size, image_size)), 0, 255).astype(np.uint8)
    if label == 1:
        c = image_size // 2
        r = max(2, image_size // 5)
        img[c - r : c + r, c - r : c + r] = 230
    img[0, 0] = 200 * label
    img[0, 1] = index % 256
    img[0, 2] = index // 256
    return img[..., None]


def patient_of(split: str, index: int) -> str:
    """The patient id write_tiny_dataset gives the image of `index` in `split`: two images per patient."""
    return f"{split.upper()}-IM-{index // 2:04d}"


def source_name(split: str, index: int) -> str:
    """The file name write_tiny_dataset gives the image of `index` in `split`."""
    return f"{patient_of(split, index)}-{index % 2 + 1:04d}.png"


def write_tiny_dataset(
    data_dir: Path,
    split_sizes: dict[str, Sequence[int]] | None = None,
    image_size: int = 32,
    num_shards: int = 2,
) -> dict:
    """Builds a dataset of labelled images with the real converter (cxr-build-tfrecords); returns its manifest.

    split_sizes maps a split to (num_normal, num_pneumonia). Each image's index is unique over the
    whole dataset and written into its pixels (`labelled_image`); files are PNG at the target size,
    stored losslessly, so records hold exactly those pixels. File names are
    `<SPLIT>-IM-<index // 2>-<n>.png` (patient_of: two images per patient, no patient in two splits).
    The converter needs train and test: a split not asked for is built with one image per class
    (val is then absent unless asked for). data_dir must not exist or be empty.
    """
    import shutil
    import tempfile

    from tfrecords_builder import build

    split_sizes = dict(split_sizes or {"train": (12, 20), "val": (4, 4), "test": (4, 4)})
    for required in ("train", "test"):
        split_sizes.setdefault(required, (1, 1))
    data_dir = Path(data_dir)
    if data_dir.is_dir() and not any(data_dir.iterdir()):
        data_dir.rmdir()
    sources = Path(tempfile.mkdtemp(prefix="cxr-sources-"))
    try:
        index = 0
        for split in ("train", "val", "test"):
            if split not in split_sizes:
                continue
            for label, count in enumerate(split_sizes[split]):
                folder = sources / split / record_schema.CLASS_NAMES[label]
                folder.mkdir(parents=True, exist_ok=True)
                for _ in range(count):
                    (folder / source_name(split, index)).write_bytes(encode_png(labelled_image(label, index, image_size)))
                    index += 1
        config = build.BuildConfig(
            input_dir=str(sources), output_dir=str(data_dir), image_size=image_size, encoding="png",
            val_fraction=0.0, min_val_images=1, num_workers=1, num_shards=num_shards)
        return build.build_dataset(config)
    finally:
        shutil.rmtree(sources, ignore_errors=True)


# What libraries print that a binary must not pass on at the default verbosity.
NOISE_MARKERS = (
    "oneDNN custom operations", "Could not find cuda drivers", "failed call to cuInit", "absl::InitializeLog",
    "Downloading and preparing dataset", "Done writing", "The default buffer size is",
    "This TensorFlow binary is optimized", "Local rendezvous is aborting", "oneDNN supports DT_INT32 only",
)


def assert_quiet(stderr: str, program: str, summary: str = "") -> None:
    """stderr holds only the binary's own lines (each `<program>: ...`), no library noise, and `summary`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    noise = [line for line in lines if any(marker in line for marker in NOISE_MARKERS)]
    assert not noise, noise
    foreign = [line for line in lines if not line.startswith(f"{program}:")]
    assert not foreign, foreign
    assert summary in stderr, stderr[-2000:]


_HOLDER = textwrap.dedent("""
    import sys, time
    from cxr_tfdata.files import locking
    with locking.exclusive_lock(sys.argv[1], "test", sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
""")


@contextlib.contextmanager
def lock_held_by_another_process(lock_path: str, program: str):
    """A real second process holding the lock; yields its pid, and kills it with SIGKILL after."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, lock_path, program], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def free_ports(count: int) -> list[int]:
    """Ports free on localhost just now (for worker processes the test starts next)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
