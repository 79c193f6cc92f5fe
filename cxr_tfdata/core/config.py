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
# Image sizes the converter writes and the trainer accepts.
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024
# The recall (sensitivity) an operating threshold is chosen for: a missed pneumonia costs more than a false alarm.
DEFAULT_TARGET_RECALL = 0.95
# The largest seed NumPy and TensorFlow accept (keras.utils.set_random_seed).
MAX_SEED = 2**32 - 1


def require(condition: bool, flag: str, message: str) -> None:
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
        require(self.placement in AUGMENT_PLACEMENTS, "augment", f"must be one of {AUGMENT_PLACEMENTS}, got {self.placement!r}")
        require(0.0 <= self.rotation_range <= 180.0, "rotation_range", f"must be in [0, 180] degrees, got {self.rotation_range}")
        require(0.0 <= self.zoom_range < 1.0, "zoom_range", f"must be in [0, 1), got {self.zoom_range}")
        require(0.0 <= self.width_shift_range < 1.0, "width_shift_range", f"must be in [0, 1), got {self.width_shift_range}")
        require(0.0 <= self.height_shift_range < 1.0, "height_shift_range", f"must be in [0, 1), got {self.height_shift_range}")
        require(self.fill_mode in FILL_MODES, "fill_mode", f"must be one of {FILL_MODES}, got {self.fill_mode!r}")

    @property
    def enabled(self) -> bool:
        return self.placement != "none"

    def affine_settings(self) -> dict[str, Any]:
        """Every field but the placement: the random affine transform itself (RandomAffine's config)."""
        return {name: getattr(self, name) for name in AFFINE_FIELDS}


# The fields that define the transform (RandomAffine's saved config), in AugmentConfig's order.
AFFINE_FIELDS = tuple(field.name for field in dataclasses.fields(AugmentConfig) if field.name != "placement")


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
    # grpc://host:port of a tf.data service dispatcher: the train split's reading, decoding and CPU
    # augmentation then run on the service's workers (input_pipeline.py says how). "": in process.
    data_service: str = ""

    def __post_init__(self):
        require(bool(self.data_dir), "data_dir", "is required")
        require(MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE, "image_size",
                 f"must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {self.image_size}")
        require(self.cache in CACHE_MODES, "cache", f"must be one of {CACHE_MODES}, got {self.cache!r}")
        require(self.cache != "file" or bool(self.cache_dir), "cache_dir", "is required with --cache=file")
        require(self.shuffle_buffer >= 1, "shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        require(0 <= self.seed <= MAX_SEED, "seed", f"must be in [0, 2**32 - 1], got {self.seed}")
        require(self.batch_dtype in ("uint8", "float16", "bfloat16", "float32"), "batch_dtype", f"unknown dtype {self.batch_dtype!r}")
        require(not self.data_service or _is_service_address(self.data_service), "data_service_address",
                 f"must be grpc://host:port, got {self.data_service!r}")


def _is_service_address(address: str) -> bool:
    protocol, _, rest = address.partition("://")
    host, _, port = rest.rpartition(":")
    return protocol == "grpc" and bool(host) and port.isdigit()


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


STAGES = ("frozen", "finetune", "both")
WEIGHTS_CHOICES = ("imagenet", "none")  # or a path to a local "notop" .h5 file
PRECISION_POLICIES = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
DISTRIBUTIONS = ("auto", "default", "mirrored", "multi_worker")
JIT_CHOICES = ("auto", "true", "false")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """ResNet50V2 + classification head, and which base layers each transfer stage trains.

    weights: "imagenet", "none" (random init), or a path to a local ResNet50V2 "notop" .h5 file.
    fine_tune_at: first base layer (name, or name prefix up to a "_") unfrozen in the finetune stage.
      Default "conv5_block1", the start of ResNet50V2's last stage: its 3 blocks hold ~15M of the base's
      23.6M weights and the most ImageNet-specific features, while the earlier stages' generic edges and
      textures transfer well to radiographs; unfreezing more with ~5k images mostly adds overfitting.
    train_base: every layer trainable in every stage, base BatchNormalization in training mode
      (for training from scratch with weights="none").
    """

    weights: str = "imagenet"
    fine_tune_at: str = "conv5_block1"
    dropout_rate: float = 0.1
    train_base: bool = False
    # With train_base, the base BN layers' moving-average momentum (Keras: 0.99). A few hundred steps
    # from scratch leave 0.99 averages far from the batch statistics, so inference-mode validation
    # predicts one class; 0.9 tracks them within ~30 steps.
    scratch_batch_norm_momentum: float = 0.9
    # The finetune head's new BN starts at identity statistics; with Keras' 0.99 its moving averages
    # would still be mostly that after an epoch, so validation would see a head unlike the trained one.
    head_batch_norm_momentum: float = 0.9

    def __post_init__(self):
        require(bool(self.weights), "weights", f"must be one of {WEIGHTS_CHOICES} or a file path")
        require(bool(self.fine_tune_at), "fine_tune_at", "must name a ResNet50V2 layer, e.g. conv5_block1")
        require(0.0 <= self.dropout_rate < 1.0, "dropout_rate", f"must be in [0, 1), got {self.dropout_rate}")
        require(0.0 < self.head_batch_norm_momentum < 1.0, "head_batch_norm_momentum", f"must be in (0, 1), got {self.head_batch_norm_momentum}")
        require(0.0 < self.scratch_batch_norm_momentum < 1.0, "scratch_batch_norm_momentum", f"must be in (0, 1), got {self.scratch_batch_norm_momentum}")

    @property
    def weights_path(self) -> str | None:
        """The local weights file, or None for "imagenet"/"none"."""
        return None if self.weights in WEIGHTS_CHOICES else self.weights


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Optimizer, schedule and stopping rules of one transfer stage ("frozen" or "finetune").

    lr_decay_per_epoch: learning rate multiplied by this at the start of each epoch after the first
      (an exponential decay expressed per epoch, so ReduceLROnPlateau can still lower the same LR).
    """

    name: str = "frozen"
    batch_size: int = 128
    epochs: int = 50
    learning_rate: float = 1e-3
    lr_decay_per_epoch: float = 1.0
    early_stopping_patience: int = 5
    reduce_lr_patience: int = 2
    reduce_lr_factor: float = 0.2
    min_learning_rate: float = 1e-7

    def __post_init__(self):
        p = self.name
        require(p in ("frozen", "finetune"), "stage", f"stage settings must be 'frozen' or 'finetune', got {p!r}")
        require(self.batch_size >= 1, f"{p}_batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.epochs >= 1, f"{p}_epochs", f"must be >= 1, got {self.epochs}")
        require(0.0 < self.learning_rate < 1.0, f"{p}_learning_rate", f"must be in (0, 1), got {self.learning_rate}")
        require(0.0 < self.lr_decay_per_epoch <= 1.0, f"{p}_lr_decay_per_epoch", f"must be in (0, 1], got {self.lr_decay_per_epoch}")
        require(self.early_stopping_patience >= 1, f"{p}_early_stopping_patience", f"must be >= 1, got {self.early_stopping_patience}")
        require(self.reduce_lr_patience >= 1, f"{p}_reduce_lr_patience", f"must be >= 1, got {self.reduce_lr_patience}")
        require(0.0 < self.reduce_lr_factor < 1.0, f"{p}_reduce_lr_factor", f"must be in (0, 1), got {self.reduce_lr_factor}")
        require(0.0 <= self.min_learning_rate <= self.learning_rate, f"{p}_min_learning_rate", f"must be in [0, learning rate], got {self.min_learning_rate}")


def default_finetune_stage() -> StageConfig:
    return StageConfig(
        name="finetune", batch_size=32, epochs=50, learning_rate=1e-4, lr_decay_per_epoch=0.95,
        early_stopping_patience=15, reduce_lr_patience=5,
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One cxr-train run: data, augmentation, model, both stages, precision and placement.

    steps_per_epoch: 0 means a full pass over the train split; a positive value caps each epoch.
    """

    model_dir: str = ""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    frozen: StageConfig = dataclasses.field(default_factory=StageConfig)
    finetune: StageConfig = dataclasses.field(default_factory=default_finetune_stage)
    stage: str = "both"
    mixed_precision: str = "auto"
    jit_compile: str = "auto"  # auto: XLA on with a GPU or TPU, off on a CPU
    distribution: str = "auto"
    steps_per_epoch: int = 0
    steps_per_loop: int = 10  # training steps per host call (one tf.function call runs them all)
    # When a stage ends, its best model stores the highest threshold reaching this recall on val.
    target_recall: float = DEFAULT_TARGET_RECALL

    def __post_init__(self):
        require(bool(self.model_dir), "model_dir", "is required")
        require(0.0 < self.target_recall <= 1.0, "target_recall", f"must be in (0, 1], got {self.target_recall}")
        require(self.stage in STAGES, "stage", f"must be one of {STAGES}, got {self.stage!r}")
        require(self.mixed_precision in PRECISION_POLICIES, "mixed_precision", f"must be one of {PRECISION_POLICIES}, got {self.mixed_precision!r}")
        require(self.distribution in DISTRIBUTIONS, "distribution", f"must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        require(self.steps_per_epoch >= 0, "steps_per_epoch", f"must be >= 0 (0: full epochs), got {self.steps_per_epoch}")
        require(self.jit_compile in JIT_CHOICES, "jit_compile", f"must be one of {JIT_CHOICES}, got {self.jit_compile!r}")
        require(self.steps_per_loop >= 1, "steps_per_loop", f"must be >= 1, got {self.steps_per_loop}")
        require(self.frozen.name == "frozen", "stage", "the frozen stage's settings must be named 'frozen'")
        require(self.finetune.name == "finetune", "stage", "the finetune stage's settings must be named 'finetune'")

    @property
    def stages(self) -> tuple[str, ...]:
        return ("frozen", "finetune") if self.stage == "both" else (self.stage,)

    @property
    def stage_configs(self) -> tuple[StageConfig, ...]:
        """The settings of each stage to run, in order."""
        return tuple(self.frozen if name == "frozen" else self.finetune for name in self.stages)
