"""ResNet50V2 + classification head, the ImageNet weights it starts from, and what each stage trains.

Keras 3 semantics relied on (checked in keras/src/layers/normalization/batch_normalization.py,
`call`: batch statistics are used only `if training and self.trainable`):
  * a BatchNormalization layer with `trainable=False` normalizes with its moving mean and variance
    (inference mode) even when the model is called with training=True, and neither its gamma/beta
    nor its moving statistics change;
  * the base is also called with `training=False` inside the functional graph, so every base BN
    layer runs in inference mode in both stages even before `trainable` is looked at (the base has
    no Dropout, so `training=False` changes nothing else);
  * setting `trainable` on a model sets it on every nested layer; changes take effect at the next
    `compile()`, which is why each stage configures `trainable` first and compiles afterwards.
With `ModelConfig.train_base` (training from scratch) all layers are trainable and the base follows
the `training` flag of `fit`/`evaluate`, so its BN layers learn batch statistics as usual.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import keras
from absl import logging

from cxr_tfdata.core.config import AugmentConfig, ModelConfig
from cxr_tfdata.modeling.preprocessing import ToResNetInput

BASE_NAME = "resnet50v2"
HEAD_BATCH_NORM_NAME = "head_batch_norm"
OUTPUT_NAME = "predictions"
STAGES = ("frozen", "finetune")

# Where keras.applications.ResNet50V2(weights="imagenet", include_top=False) looks for its file.
IMAGENET_WEIGHTS_FILE = "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + IMAGENET_WEIGHTS_FILE
)
# Long enough for a slow link to answer a HEAD request, short enough that an offline run fails fast.
WEIGHTS_PROBE_TIMEOUT_SECONDS = 10.0


class WeightsUnavailableError(RuntimeError):
    """The requested base weights cannot be obtained; the message says which file and how."""


def imagenet_weights_cache_path(cache_dir: str | None = None) -> str:
    """The file Keras reads ImageNet weights from (`$KERAS_HOME` or ~/.keras, then models/)."""
    base = cache_dir or os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = os.path.join(base, "models", IMAGENET_WEIGHTS_FILE)
    # keras.utils.get_file falls back to /tmp/.keras when the home cache is not writable.
    fallback = os.path.join("/tmp", ".keras", "models", IMAGENET_WEIGHTS_FILE)
    if cache_dir is None and not os.path.isfile(path) and os.path.isfile(fallback):
        return fallback
    return path


def check_imagenet_weights_available(
    cache_dir: str | None = None,
    url: str = IMAGENET_WEIGHTS_URL,
    timeout: float = WEIGHTS_PROBE_TIMEOUT_SECONDS,
) -> str:
    """Fails at once, naming the file, when ImageNet weights are neither cached nor downloadable.

    Returns "cached" or "downloadable". Checks the cache file first (no network), then probes the
    download URL with a short HEAD request instead of letting Keras hang on a download.
    """
    path = imagenet_weights_cache_path(cache_dir)
    if os.path.isfile(path):
        return "cached"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return "downloadable"
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise WeightsUnavailableError(
            f"--weights=imagenet: ImageNet weights are not cached at {path} and cannot be downloaded "
            f"from {url} ({e}). Copy {IMAGENET_WEIGHTS_FILE} into {os.path.dirname(path)}, or pass "
            f"--weights=/path/to/{IMAGENET_WEIGHTS_FILE} (any ResNet50V2 include_top=False .h5 file), "
            f"or --weights=none to start from random weights."
        ) from e


def check_weights_file(path: str) -> None:
    """Fails naming --weights when a local weights path is missing or not an .h5 file."""
    if not os.path.exists(path):
        raise WeightsUnavailableError(f"--weights={path}: no such file")
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"--weights={path}: not a regular file (a folder, FIFO or device)")
    if not path.endswith((".h5", ".hdf5")):
        raise WeightsUnavailableError(
            f"--weights={path}: expected a ResNet50V2 'notop' weights file ending in .h5 "
            f"(e.g. {IMAGENET_WEIGHTS_FILE}, or a Keras .weights.h5 file)"
        )


def build_base(image_size: int, model_config: ModelConfig) -> keras.Model:
    """ResNet50V2 without its top, with ImageNet, random or local-file weights."""
    weights = None if model_config.weights == "none" else model_config.weights
    local_path = model_config.weights_path
    base = keras.applications.ResNet50V2(
        include_top=False,
        weights=None if local_path else weights,
        input_shape=(image_size, image_size, 3),
    )
    if local_path:
        check_weights_file(local_path)
        try:
            base.load_weights(local_path)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise WeightsUnavailableError(
                f"--weights={local_path}: not loadable as ResNet50V2 include_top=False weights "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'})"
            ) from e
    return base


def _augmentation_layer(augment: AugmentConfig, seed: int | None) -> keras.layers.Layer:
    from cxr_tfdata.data.augment import RandomAffine

    return RandomAffine.from_config_values(augment, seed=seed, name="random_affine")


def build_model(
    image_size: int,
    model_config: ModelConfig,
    augment: AugmentConfig | None = None,
    head_batch_norm: bool = False,
    seed: int | None = None,
    contract: dict | None = None,
) -> keras.Model:
    """[S, S, 1] raw pixels (0..255) -> pneumonia probability [N, 1] in float32.

    Layers: ModelContract (with `contract`: the model's contract, see contract.py; an identity) ->
    RandomAffine (only when augment.placement == "device") -> ToResNetInput ->
    ResNet50V2 -> GlobalAveragePooling2D -> [BatchNormalization, the finetune stage's head] ->
    Dropout -> Dense(1, sigmoid, float32 even under a mixed-precision policy).
    """
    inputs = keras.Input(shape=(image_size, image_size, 1), name="image")
    x = inputs
    if contract is not None:
        from cxr_tfdata.modeling.contract import LAYER_NAME, ModelContract

        x = ModelContract(contract, name=LAYER_NAME)(x)
    if augment is not None and augment.placement == "device":
        x = _augmentation_layer(augment, seed)(x)
    x = ToResNetInput(name="to_resnet_input")(x)
    base = build_base(image_size, model_config)
    if model_config.train_base:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = model_config.scratch_batch_norm_momentum
    # Frozen/finetune: base BN in inference mode always (see module docstring); from scratch: follow fit.
    x = base(x, training=None if model_config.train_base else False)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if head_batch_norm:
        x = keras.layers.BatchNormalization(
            momentum=model_config.head_batch_norm_momentum, name=HEAD_BATCH_NORM_NAME)(x)
    x = keras.layers.Dropout(model_config.dropout_rate, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name="cxr_resnet50v2")


def fine_tune_start_index(base: keras.Model, fine_tune_at: str) -> int:
    """Index of the first base layer named `fine_tune_at` or starting with `fine_tune_at + "_"`."""
    for index, layer in enumerate(base.layers):
        if layer.name == fine_tune_at or layer.name.startswith(fine_tune_at + "_"):
            return index
    stages = sorted({layer.name.split("_")[0] for layer in base.layers if "_block" in layer.name})
    raise ValueError(
        f"--fine_tune_at={fine_tune_at!r} names no layer of ResNet50V2; use a layer name or a "
        f"block prefix such as conv5_block1 (stages: {stages})"
    )


def check_fine_tune_at(fine_tune_at: str) -> None:
    """Fails naming --fine_tune_at when it names no ResNet50V2 layer (before any training)."""
    base = keras.applications.ResNet50V2(include_top=False, weights=None, input_shape=(32, 32, 3))
    try:
        fine_tune_start_index(base, fine_tune_at)
    finally:
        del base
        keras.backend.clear_session()


def configure_trainable(model: keras.Model, stage: str, model_config: ModelConfig) -> None:
    """Sets which layers train in a stage; call before compile().

    frozen: the whole base frozen, the head trainable.
    finetune: base layers from `fine_tune_at` on trainable except BatchNormalization, which stays
      frozen (and so in inference mode); everything before `fine_tune_at` frozen; head trainable.
    train_base: every layer trainable (training from scratch).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    model.trainable = True
    if model_config.train_base:
        return
    base = model.get_layer(BASE_NAME)
    if stage == "frozen":
        base.trainable = False
        return
    start = fine_tune_start_index(base, model_config.fine_tune_at)
    for index, layer in enumerate(base.layers):
        is_batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= start and not is_batch_norm


def trainable_base_layer_names(model: keras.Model) -> list[str]:
    """Names of base layers that have trainable weights in the model's current configuration."""
    base = model.get_layer(BASE_NAME)
    if not base.trainable:
        return []
    return [layer.name for layer in base.layers if layer.trainable and layer.trainable_weights]


def transfer_weights(source: keras.Model, target: keras.Model) -> list[str]:
    """Copies weights layer by layer where names match (base and Dense head); returns the names.

    Used to start the finetune model (which adds the head BatchNormalization) from the frozen
    stage's best model.
    """
    copied = []
    for layer in target.layers:
        if not layer.weights:
            continue
        try:
            source_layer = source.get_layer(layer.name)
        except ValueError:
            continue
        layer.set_weights(source_layer.get_weights())
        copied.append(layer.name)
    missing = {BASE_NAME, OUTPUT_NAME} - set(copied)
    if missing:
        raise ValueError(f"source model has no layers {sorted(missing)} to start from")
    logging.debug("Copied weights of layers %s", copied)
    return copied
