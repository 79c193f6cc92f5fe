"""What cxr-evaluate runs, validated once: every bad value fails naming its flag."""

from __future__ import annotations

import dataclasses

from cxr_tfdata.core import config as config_lib
from cxr_tfdata.modeling import feeding


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """What cxr-evaluate runs: a model over one split, with the val split for the operating point."""

    model_path: str
    data_dir: str = ""  # records written by cxr-build-tfrecords (or images_dir)
    output_dir: str = ""
    split: str = "test"
    val_split: str = "val"
    # The recall an operating threshold chosen on val must reach; None: the one the model's stored
    # threshold was chosen for, else DEFAULT_TARGET_RECALL.
    target_recall: float | None = None
    threshold: float | None = None  # a fixed operating threshold (neither the model's nor chosen on val)
    bootstrap_samples: int = 1000
    seed: int = 0
    batch_size: int = 32
    overwrite: bool = False  # write into a non-empty --output_dir that cxr-evaluate did not write
    images_dir: str = ""  # evaluate on a folder of NORMAL/ and PNEUMONIA/ images instead of records
    choose_threshold_on_val: bool = False  # choose afresh on --val_split even when the model stores one
    max_file_mb: float = 256.0  # with --images_dir: bytes read per file at most
    prevalence: float | None = None  # restate calibrated probabilities at this PNEUMONIA prevalence
    # With --images_dir: the site key hashing patient ids ("": the default one), and whether paths are hashed too.
    patient_key_file: str = ""
    redact_paths: bool = False

    def __post_init__(self):
        config_lib.require(bool(self.model_path), "model", "is required")
        config_lib.require(bool(self.data_dir) != bool(self.images_dir), "data_dir",
                 "give exactly one of --data_dir (records) and --images_dir (an image folder)")
        config_lib.require(bool(self.output_dir), "output_dir", "is required")
        config_lib.require(not (self.images_dir and self.choose_threshold_on_val), "choose_threshold_on_val",
                 "needs --data_dir: an image folder has no val split")
        config_lib.require(not (self.threshold is not None and self.choose_threshold_on_val), "choose_threshold_on_val",
                 f"contradicts --threshold={self.threshold}: give one of them")
        config_lib.require(bool(self.images_dir) or self.threshold is not None or self.val_split != self.split, "val_split",
                 f"is --split={self.split!r}: the operating threshold would be chosen on the very data it "
                 f"is evaluated on, which flatters every metric at it; choose it on another split "
                 f"(e.g. val) or pass a fixed --threshold")
        config_lib.require(self.target_recall is None or 0.0 < self.target_recall <= 1.0, "target_recall",
                 f"must be in (0, 1], got {self.target_recall}")
        feeding.check_reading_flags(threshold=self.threshold, prevalence=self.prevalence)
        config_lib.require(self.bootstrap_samples >= 0, "bootstrap_samples", f"must be >= 0, got {self.bootstrap_samples}")
        config_lib.require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        config_lib.require(0 < self.max_file_mb < 1 << 30, "max_file_mb", f"must be a number of MB in (0, 2^30), got {self.max_file_mb}")
