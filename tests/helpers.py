"""Test helpers: hand-made record datasets in the converter's layout, and the shared real data."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_tfdata import features

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


def write_tiny_dataset(
    data_dir: Path,
    split_sizes: dict[str, Sequence[int]] | None = None,
    image_size: int = 32,
    num_shards: int = 2,
) -> dict:
    """Writes hand-made PNG records and a manifest.json in the converter's layout.

    split_sizes maps a split to (num_normal, num_pneumonia). Each record's index is unique over the
    whole dataset; patient ids are "p<index // 2>" so patients hold two images. Returns the manifest.
    """
    import tensorflow as tf

    split_sizes = split_sizes or {"train": (12, 20), "val": (4, 4), "test": (4, 4)}
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": 1,
        "image_size": image_size,
        "channels": 1,
        "encoding": "png",
        "class_names": list(features.CLASS_NAMES),
        "splits": {},
        "flags": {},
        "skipped": [],
        "duplicates": {"within_split": [], "across_splits": []},
    }
    index = 0
    for split, (n_normal, n_pneumonia) in split_sizes.items():
        records = []
        for label, count in ((0, n_normal), (1, n_pneumonia)):
            for _ in range(count):
                name = f"{features.CLASS_NAMES[label]}/img{index:05d}.png"
                records.append(
                    features.serialize_example(
                        encode_png(labelled_image(label, index, image_size)),
                        label,
                        filename=name,
                        patient_id=f"p{index // 2}",
                        original_height=image_size,
                        original_width=image_size,
                    )
                )
                index += 1
        rng = np.random.default_rng(len(records))
        records = [records[i] for i in rng.permutation(len(records))]
        shard_files = []
        for shard in range(num_shards):
            rel = f"cxr-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}"
            with tf.io.TFRecordWriter(str(data_dir / rel)) as writer:
                for record in records[shard::num_shards]:
                    writer.write(record)
            shard_files.append(rel)
        manifest["splits"][split] = {
            "num_examples": n_normal + n_pneumonia,
            "class_counts": {"NORMAL": n_normal, "PNEUMONIA": n_pneumonia},
            "num_patients": len({(i // 2) for i in range(index - n_normal - n_pneumonia, index)}),
            "shard_files": shard_files,
        }
    (data_dir / features.MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2))
    return manifest
