"""Frozen, validated run configuration: data, augmentation, model and training settings.

Entry points turn flags into these dataclasses; library code only ever reads them.
Every invalid value fails in `__post_init__` with a message naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

AUGMENT_PLACEMENTS = ("cpu", "device", "none")
CACHE_MODES = ("memory", "file", "off")
FILL_MODES = ("nearest", "constant", "reflect", "wrap")


def _require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise ValueError(f"--{flag}: {message}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random affine augmentation with ImageDataGenerator's meaning of each range.

    rotation_range: degrees, angle uniform in [-r, r].
    zoom_range: scale uniform in [1 - z, 1 + z] (ImageDataGenerator: >1 shows more of the image).
    width_shift_range / height_shift_range: fraction of the width/height, uniform in [-s, s].
    fill_mode: how pixels outside the source are filled ("nearest" is ImageDataGenerator's default).
    placement: "cpu" inside tf.data, "device" as a layer at the model input, "none" to disable.
    """

    placement: str = "device"
    rotation_range: float = 10.0
    zoom_range: float = 0.1
    width_shift_range: float = 0.1
    height_shift_range: float = 0.1
    horizontal_flip: bool = False
    fill_mode: str = "nearest"
    fill_value: float = 0.0

    def __post_init__(self):
        _require(self.placement in AUGMENT_PLACEMENTS, "augment", f"must be one of {AUGMENT_PLACEMENTS}, got {self.placement!r}")
        _require(0.0 <= self.rotation_range <= 180.0, "rotation_range", f"must be in [0, 180] degrees, got {self.rotation_range}")
        _require(0.0 <= self.zoom_range < 1.0, "zoom_range", f"must be in [0, 1), got {self.zoom_range}")
        _require(0.0 <= self.width_shift_range < 1.0, "width_shift_range", f"must be in [0, 1), got {self.width_shift_range}")
        _require(0.0 <= self.height_shift_range < 1.0, "height_shift_range", f"must be in [0, 1), got {self.height_shift_range}")
        _require(self.fill_mode in FILL_MODES, "fill_mode", f"must be one of {FILL_MODES}, got {self.fill_mode!r}")

    @property
    def enabled(self) -> bool:
        return self.placement != "none"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the records are and how the input pipeline reads them."""

    data_dir: str = ""
    image_size: int = 224
    cache: str = "memory"  # memory | file | off
    cache_dir: str = ""  # used when cache == "file"
    shuffle_buffer: int = 4096
    balanced_sampling: bool = False
    seed: int = 0
    deterministic: bool = False
    # Dtype the batches travel in: "uint8", or the compute dtype ("float16", "bfloat16", "float32").
    batch_dtype: str = "uint8"

    def __post_init__(self):
        _require(bool(self.data_dir), "data_dir", "is required")
        _require(32 <= self.image_size <= 1024, "image_size", f"must be in [32, 1024], got {self.image_size}")
        _require(self.cache in CACHE_MODES, "cache", f"must be one of {CACHE_MODES}, got {self.cache!r}")
        _require(self.cache != "file" or bool(self.cache_dir), "cache_dir", "is required with --cache=file")
        _require(self.shuffle_buffer >= 1, "shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        _require(self.batch_dtype in ("uint8", "float16", "bfloat16", "float32"), "batch_dtype", f"unknown dtype {self.batch_dtype!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)
