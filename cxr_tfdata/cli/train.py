"""cxr-train: flags -> one frozen TrainConfig -> train_and_evaluate (both transfer stages, resumable)."""

from __future__ import annotations

import json

from absl import app, flags, logging

from cxr_tfdata.core import config as config_lib
from cxr_tfdata.core import console, endpoints
from cxr_tfdata.core.runner import run_main, stop_at_step_boundaries_on_sigterm
from cxr_tfdata.training import distribute

_FROZEN = config_lib.StageConfig()
_FINETUNE = config_lib.default_finetune_stage()
_AUGMENT = config_lib.AugmentConfig()
_DATA_DEFAULTS = config_lib.DataConfig(data_dir="-")
_MODEL = config_lib.ModelConfig()

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset directory written by cxr-build-tfrecords.")
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Where models, histories, logs, metrics.json, config.json and resume checkpoints go.")
_STAGE = flags.DEFINE_enum("stage", "both", list(config_lib.STAGES),
                           "frozen: head only; finetune: from frozen_best.keras in --model_dir; both.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Image side in pixels; default: the dataset's.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Delete the earlier run's outputs in --model_dir (models, metrics, histories, logs, checkpoints; "
    "no other files) and start afresh instead of resuming it.")

_FROZEN_BATCH_SIZE = flags.DEFINE_integer("frozen_batch_size", _FROZEN.batch_size, "Per-replica batch, frozen stage.")
_FINETUNE_BATCH_SIZE = flags.DEFINE_integer("finetune_batch_size", _FINETUNE.batch_size, "Per-replica batch, finetune stage.")
_FROZEN_EPOCHS = flags.DEFINE_integer("frozen_epochs", _FROZEN.epochs, "Most epochs of the frozen stage.")
_FINETUNE_EPOCHS = flags.DEFINE_integer("finetune_epochs", _FINETUNE.epochs, "Most epochs of the finetune stage.")
_FROZEN_LR = flags.DEFINE_float("frozen_learning_rate", _FROZEN.learning_rate, "Adam learning rate, frozen stage.")
_FINETUNE_LR = flags.DEFINE_float("finetune_learning_rate", _FINETUNE.learning_rate, "Initial Adam learning rate, finetune stage.")
_FROZEN_LR_DECAY = flags.DEFINE_float(
    "frozen_lr_decay_per_epoch", _FROZEN.lr_decay_per_epoch, "LR multiplied by this each epoch (1: constant).")
_FINETUNE_LR_DECAY = flags.DEFINE_float(
    "finetune_lr_decay_per_epoch", _FINETUNE.lr_decay_per_epoch,
    "Finetune LR multiplied by this each epoch (exponential decay, per epoch).")
_FROZEN_ES_PATIENCE = flags.DEFINE_integer(
    "frozen_early_stopping_patience", _FROZEN.early_stopping_patience, "EarlyStopping patience (val_loss), frozen.")
_FINETUNE_ES_PATIENCE = flags.DEFINE_integer(
    "finetune_early_stopping_patience", _FINETUNE.early_stopping_patience, "EarlyStopping patience, finetune.")
_FROZEN_RLR_PATIENCE = flags.DEFINE_integer(
    "frozen_reduce_lr_patience", _FROZEN.reduce_lr_patience, "ReduceLROnPlateau patience (val_loss), frozen.")
_FINETUNE_RLR_PATIENCE = flags.DEFINE_integer(
    "finetune_reduce_lr_patience", _FINETUNE.reduce_lr_patience, "ReduceLROnPlateau patience, finetune.")
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", 0, "Cap on train steps per epoch (0: a full pass over the train split); for smoke runs.")

_WEIGHTS = flags.DEFINE_string(
    "weights", _MODEL.weights, "imagenet | none | PATH to a ResNet50V2 include_top=False .h5 weights file.")
_FINE_TUNE_AT = flags.DEFINE_string(
    "fine_tune_at", _MODEL.fine_tune_at,
    "First ResNet50V2 layer (name or block prefix) unfrozen in the finetune stage; the default is the start "
    "of the last stage (conv5), the most task-specific features, ~15M of 23.6M base weights.")
_DROPOUT = flags.DEFINE_float("dropout_rate", _MODEL.dropout_rate, "Dropout before the sigmoid output.")
_SCRATCH_BN_MOMENTUM = flags.DEFINE_float(
    "scratch_batch_norm_momentum", _MODEL.scratch_batch_norm_momentum,
    "With --train_base: momentum of the base BN moving averages (Keras' 0.99 lags in short runs).")
_HEAD_BN_MOMENTUM = flags.DEFINE_float(
    "head_batch_norm_momentum", _MODEL.head_batch_norm_momentum,
    "Momentum of the finetune head's BatchNormalization moving averages.")
_TRAIN_BASE = flags.DEFINE_bool(
    "train_base", False, "Train every layer in every stage, base BN included (from scratch with --weights=none).")

_MIXED_PRECISION = flags.DEFINE_enum(
    "mixed_precision", "auto", list(config_lib.PRECISION_POLICIES),
    "auto: mixed_float16 on tensor-core GPUs, mixed_bfloat16 on TPUs and bfloat16 CPUs, else float32.")
_JIT_COMPILE = flags.DEFINE_enum(
    "jit_compile", "auto", list(config_lib.JIT_CHOICES),
    "XLA-compile each replica's forward and backward pass. auto: on with a GPU or TPU, off on a CPU.")
_DISTRIBUTION = flags.DEFINE_enum(
    "distribution", "auto", list(config_lib.DISTRIBUTIONS),
    "auto: multi_worker when TF_CONFIG or --worker_hosts name several workers, mirrored with >1 GPU, else "
    "default (one device); mirrored: all GPUs, or all logical CPUs; multi_worker: MultiWorkerMirroredStrategy.")
_WORKER_HOSTS = flags.DEFINE_string(
    "worker_hosts", None,
    "host:port of every worker, comma-separated, the chief first (instead of TF_CONFIG); with --task_index.")
_TASK_INDEX = flags.DEFINE_integer("task_index", None, "This worker's index in --worker_hosts (0: the chief).")
_WORKER_TIMEOUT = flags.DEFINE_float(
    "worker_timeout", 180.0,
    "Seconds a multi-worker run waits for every worker to join before it fails naming the ones that do not answer.")
_STEPS_PER_LOOP = flags.DEFINE_integer(
    "steps_per_loop", 10, "Training steps per host call: more keeps an accelerator busier between Python calls.")
_TARGET_RECALL = flags.DEFINE_float(
    "target_recall", config_lib.DEFAULT_TARGET_RECALL,
    "When a stage ends, its best model stores the highest threshold whose val recall is at least this "
    "(the label rule of cxr-predict and cxr-export), and a temperature fitted on val.")
_DATA_SERVICE = flags.DEFINE_string(
    "data_service_address", "",
    "grpc://host:port of a tf.data service dispatcher (cxr-data-service): the train split is read, decoded "
    "and augmented (--augment=cpu) on its workers. Val stays local.")
_DATA_SERVICE_TIMEOUT = flags.DEFINE_float(
    "data_service_timeout", 60.0,
    "Seconds to wait for the --data_service_address dispatcher to answer before failing, naming it.")

_AUGMENT_PLACEMENT = flags.DEFINE_enum(
    "augment", _AUGMENT.placement, list(config_lib.AUGMENT_PLACEMENTS),
    "Where training augmentation runs: cpu (tf.data), device (model input layer), none.")
_ROTATION = flags.DEFINE_float("rotation_range", _AUGMENT.rotation_range, "Degrees, uniform in [-r, r].")
_ZOOM = flags.DEFINE_float("zoom_range", _AUGMENT.zoom_range, "Scale uniform in [1-z, 1+z].")
_WIDTH_SHIFT = flags.DEFINE_float("width_shift_range", _AUGMENT.width_shift_range, "Fraction of the width.")
_HEIGHT_SHIFT = flags.DEFINE_float("height_shift_range", _AUGMENT.height_shift_range, "Fraction of the height.")
_HORIZONTAL_FLIP = flags.DEFINE_bool("horizontal_flip", _AUGMENT.horizontal_flip, "Random left-right flips.")
_FILL_MODE = flags.DEFINE_enum("fill_mode", _AUGMENT.fill_mode, list(config_lib.FILL_MODES), "Fill outside the image.")

_CACHE = flags.DEFINE_enum("cache", _DATA_DEFAULTS.cache, list(config_lib.CACHE_MODES), "Cache of decoded images.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "", "Directory of the cache files with --cache=file.")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", _DATA_DEFAULTS.shuffle_buffer, "Examples in the shuffle buffer.")
_BALANCED = flags.DEFINE_bool("balanced_sampling", False, "Sample classes equally instead of weighting the loss by class (one correction, not both).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of initialization, shuffling and augmentation.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False, "Deterministic input order and TF ops (slower).")


def _stage_config(name: str, batch_size, epochs, learning_rate, decay, es_patience, rlr_patience):
    defaults = _FROZEN if name == "frozen" else _FINETUNE
    return config_lib.StageConfig(
        name=name, batch_size=batch_size.value, epochs=epochs.value, learning_rate=learning_rate.value,
        lr_decay_per_epoch=decay.value, early_stopping_patience=es_patience.value,
        reduce_lr_patience=rlr_patience.value, reduce_lr_factor=defaults.reduce_lr_factor,
        min_learning_rate=min(defaults.min_learning_rate, learning_rate.value),
    )


def _dataset_image_size(data_dir: str) -> int:
    from cxr_tfdata.core import dataset_info

    return dataset_info.load(data_dir).image_size


def config_from_flags() -> config_lib.TrainConfig:
    """The run's frozen config; a bad value raises ValueError naming its flag."""
    data_dir = _DATA_DIR.value or ""
    if not data_dir:
        raise ValueError("--data_dir: is required")
    image_size = _IMAGE_SIZE.value if _IMAGE_SIZE.value is not None else _dataset_image_size(data_dir)
    data = config_lib.DataConfig(
        data_dir=data_dir, image_size=image_size, cache=_CACHE.value, cache_dir=_CACHE_DIR.value,
        shuffle_buffer=_SHUFFLE_BUFFER.value, balanced_sampling=_BALANCED.value, seed=_SEED.value,
        deterministic=_DETERMINISTIC.value, data_service=_DATA_SERVICE.value,
    )
    augment = config_lib.AugmentConfig(
        placement=_AUGMENT_PLACEMENT.value, rotation_range=_ROTATION.value, zoom_range=_ZOOM.value,
        width_shift_range=_WIDTH_SHIFT.value, height_shift_range=_HEIGHT_SHIFT.value,
        horizontal_flip=_HORIZONTAL_FLIP.value, fill_mode=_FILL_MODE.value,
    )
    model = config_lib.ModelConfig(
        weights=_WEIGHTS.value, fine_tune_at=_FINE_TUNE_AT.value, dropout_rate=_DROPOUT.value,
        train_base=_TRAIN_BASE.value, scratch_batch_norm_momentum=_SCRATCH_BN_MOMENTUM.value,
        head_batch_norm_momentum=_HEAD_BN_MOMENTUM.value,
    )
    return config_lib.TrainConfig(
        model_dir=_MODEL_DIR.value or "", data=data, augment=augment, model=model,
        frozen=_stage_config("frozen", _FROZEN_BATCH_SIZE, _FROZEN_EPOCHS, _FROZEN_LR, _FROZEN_LR_DECAY,
                             _FROZEN_ES_PATIENCE, _FROZEN_RLR_PATIENCE),
        finetune=_stage_config("finetune", _FINETUNE_BATCH_SIZE, _FINETUNE_EPOCHS, _FINETUNE_LR,
                               _FINETUNE_LR_DECAY, _FINETUNE_ES_PATIENCE, _FINETUNE_RLR_PATIENCE),
        stage=_STAGE.value, mixed_precision=_MIXED_PRECISION.value, jit_compile=_JIT_COMPILE.value,
        distribution=_DISTRIBUTION.value, steps_per_epoch=_STEPS_PER_EPOCH.value,
        steps_per_loop=_STEPS_PER_LOOP.value,
        target_recall=_TARGET_RECALL.value,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # SIGTERM (a spot machine's preemption, a supervisor's stop) inside the train loop: save at the
    # next step boundary and exit 0; elsewhere it stops at once, as in every binary.
    stop_at_step_boundaries_on_sigterm()
    if not _WORKER_TIMEOUT.value > 0:  # checked on every run, used only by multi-worker ones
        raise ValueError(f"--worker_timeout: must be > 0 seconds, got {_WORKER_TIMEOUT.value}")
    if _WORKER_HOSTS.value:
        distribute.cluster_from_flags(_WORKER_HOSTS.value, _TASK_INDEX.value)
    elif _TASK_INDEX.value is not None:
        raise ValueError("--task_index: only with --worker_hosts")
    _check_data_service(_DATA_SERVICE.value, _DATA_SERVICE_TIMEOUT.value)
    watchdog = _multi_worker_watchdog(_DISTRIBUTION.value)  # forked before TensorFlow is imported
    config = config_from_flags()
    # A multi-worker strategy must exist before any other TensorFlow op: it is made first.
    placement = distribute.choose_placement(config.distribution, config.jit_compile)
    if watchdog is not None:
        watchdog.cluster_formed()
    from cxr_tfdata.training import train

    metrics = train.train_and_evaluate(config, overwrite=_OVERWRITE.value, placement=placement)
    logging.info("Done: final.keras, the best model of each stage, metrics.json, the histories and TensorBoard "
                 "logs are in %s", config.model_dir)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _check_data_service(address: str, seconds: float) -> None:
    """Fails in one line unless a dispatcher listens at `address` within `seconds`: TensorFlow would wait
    for it without a bound, deaf to SIGTERM."""
    if not seconds > 0:
        raise ValueError(f"--data_service_timeout: must be > 0 seconds, got {seconds}")
    if not address:
        return
    host, port = endpoints.split_address(address, "--data_service_address")
    if not endpoints.wait_for_listener(host, port, seconds):
        raise ValueError(f"--data_service_address={address}: no tf.data service dispatcher answers at "
                         f"{host}:{port} within {seconds:g} s (--data_service_timeout); start cxr-data-service "
                         f"--role=dispatcher there, or train without --data_service_address")


def _multi_worker_watchdog(distribution: str):
    """A watchdog for the forming of a multi-worker cluster (see distribute.Watchdog), or None."""
    cluster = distribute.cluster_config()
    addresses = distribute.cluster_addresses(cluster) if cluster else []
    if distribution == "multi_worker" or (distribution == "auto" and len(addresses) > 1):
        if not _WORKER_TIMEOUT.value > 0:
            raise ValueError(f"--worker_timeout: must be > 0 seconds, got {_WORKER_TIMEOUT.value}")
        others = [a for a in addresses if a != distribute.own_address(cluster)]
        # The worker's own stderr is a pipe its filter thread reads (cli/output.py): the watchdog
        # writes past it, since it kills the worker and the thread with it.
        return distribute.Watchdog(_WORKER_TIMEOUT.value, others, "cxr-train", len(addresses),
                                   error_fd=console.original_stderr_fd())
    return None


def run():
    run_main(main, __name__, "cxr-train")


if __name__ == "__main__":
    run()
