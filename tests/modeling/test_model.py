"""Tests of cxr_tfdata.modeling.model: layer sets per stage, dtypes, weights sources."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cxr_tfdata.core.config import AugmentConfig, ModelConfig
from cxr_tfdata.data.augment import RandomAffine
from cxr_tfdata.modeling import model as model_lib

IMAGE_SIZE = 32
NO_AUGMENT = AugmentConfig(placement="none")


@pytest.fixture(autouse=True)
def float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _model(head_batch_norm=False, **model_kwargs):
    return model_lib.build_model(
        IMAGE_SIZE, ModelConfig(weights="none", **model_kwargs), NO_AUGMENT, head_batch_norm=head_batch_norm
    )


def _base_layers_from(model, prefix):
    base = model.get_layer(model_lib.BASE_NAME)
    start = next(i for i, layer in enumerate(base.layers) if layer.name.startswith(prefix + "_"))
    return base.layers, start


def test_frozen_stage_trains_only_the_head():
    model = _model()
    model_lib.configure_trainable(model, "frozen", ModelConfig(weights="none"))
    assert model_lib.trainable_base_layer_names(model) == []
    trainable = {v.path.split("/")[0] for v in model.trainable_variables}
    assert trainable == {model_lib.OUTPUT_NAME}
    assert len(model.get_layer(model_lib.BASE_NAME).trainable_weights) == 0


@pytest.mark.parametrize("fine_tune_at", ["conv5_block1", "conv4_block6"])
def test_finetune_stage_trains_exactly_the_layers_from_fine_tune_at_without_batch_norm(fine_tune_at):
    config = ModelConfig(weights="none", fine_tune_at=fine_tune_at)
    model = _model(head_batch_norm=True, fine_tune_at=fine_tune_at)
    model_lib.configure_trainable(model, "finetune", config)
    layers, start = _base_layers_from(model, fine_tune_at)
    expected = [
        layer.name for layer in layers[start:]
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert expected and model_lib.trainable_base_layer_names(model) == expected
    assert all(not layer.trainable_weights for layer in layers[:start])
    base_bn = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert base_bn and not any(layer.trainable for layer in base_bn)
    head_bn = model.get_layer(model_lib.HEAD_BATCH_NORM_NAME)
    assert head_bn.trainable and head_bn.momentum == config.head_batch_norm_momentum
    assert model.get_layer(model_lib.OUTPUT_NAME).trainable


def test_finetune_step_changes_unfrozen_convs_only_and_keeps_base_batch_norm_statistics():
    config = ModelConfig(weights="none")
    model = _model(head_batch_norm=True)
    model_lib.configure_trainable(model, "finetune", config)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    base = model.get_layer(model_lib.BASE_NAME)
    watched = {name: [w.numpy().copy() for w in base.get_layer(name).weights]
               for name in ("conv5_block3_3_conv", "conv4_block6_3_conv", "conv5_block1_preact_bn", "post_bn")}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, IMAGE_SIZE, IMAGE_SIZE, 1)).astype("uint8")
    model.train_on_batch(images, rng.integers(0, 2, (8,)).astype("float32"))
    changed = {name: any(not np.array_equal(a, w.numpy()) for a, w in zip(before, base.get_layer(name).weights, strict=True))
               for name, before in watched.items()}
    assert changed == {"conv5_block3_3_conv": True, "conv4_block6_3_conv": False,
                       "conv5_block1_preact_bn": False, "post_bn": False}


def test_train_base_makes_every_layer_trainable():
    config = ModelConfig(weights="none", train_base=True)
    model = _model(train_base=True)
    model_lib.configure_trainable(model, "frozen", config)
    base = model.get_layer(model_lib.BASE_NAME)
    assert all(layer.trainable for layer in base.layers)
    base_bn = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert base_bn and all(layer.momentum == config.scratch_batch_norm_momentum for layer in base_bn)
    assert len(base.trainable_weights) == len(base.weights) - 2 * sum(
        isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers)  # moving stats


def test_unknown_fine_tune_at_names_the_flag():
    model = _model()
    with pytest.raises(ValueError, match="--fine_tune_at='conv9_block1'"):
        model_lib.configure_trainable(model, "finetune", ModelConfig(weights="none", fine_tune_at="conv9_block1"))


def test_mixed_bfloat16_computes_in_bfloat16_and_outputs_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = model_lib.build_model(IMAGE_SIZE, ModelConfig(weights="none"), AugmentConfig(placement="device"))
    base = model.get_layer(model_lib.BASE_NAME)
    convs = [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs)
    assert all(layer.variable_dtype == "float32" for layer in convs)
    assert model.get_layer("to_resnet_input").compute_dtype == "bfloat16"
    assert model.get_layer(model_lib.OUTPUT_NAME).compute_dtype == "float32"
    output = model(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8), training=False)
    assert output.dtype == "float32" and tuple(output.shape) == (2, 1)
    # Device placement puts the augmentation first, before the ResNet preprocessing.
    assert isinstance(model.layers[1], RandomAffine) and model.layers[1].name == "random_affine"
    assert model.layers[2].name == "to_resnet_input"


def test_model_layers_in_order():
    names = [layer.name for layer in _model(head_batch_norm=True).layers]
    assert names == ["image", "to_resnet_input", model_lib.BASE_NAME, "avg_pool",
                     model_lib.HEAD_BATCH_NORM_NAME, "dropout", model_lib.OUTPUT_NAME]


def test_transfer_weights_copies_base_and_output():
    source, target = _model(), _model(head_batch_norm=True)
    copied = model_lib.transfer_weights(source, target)
    assert set(copied) == {model_lib.BASE_NAME, model_lib.OUTPUT_NAME}
    for name in copied:
        for a, b in zip(source.get_layer(name).get_weights(), target.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_imagenet_weights_offline_fails_at_once_naming_the_file(tmp_path):
    with pytest.raises(model_lib.WeightsUnavailableError) as error:
        model_lib.check_imagenet_weights_available(
            cache_dir=str(tmp_path), url="http://127.0.0.1:9/unreachable.h5", timeout=2)
    message = str(error.value)
    expected_file = tmp_path / "models" / model_lib.IMAGENET_WEIGHTS_FILE
    assert str(expected_file) in message and "--weights=" in message


def test_imagenet_weights_found_in_cache_without_network(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / model_lib.IMAGENET_WEIGHTS_FILE).write_bytes(b"cached")
    assert model_lib.check_imagenet_weights_available(
        cache_dir=str(tmp_path), url="http://127.0.0.1:9/unreachable.h5", timeout=2) == "cached"


def test_weights_from_a_local_file(tmp_path):
    source = model_lib.build_base(IMAGE_SIZE, ModelConfig(weights="none"))
    path = tmp_path / "base.weights.h5"
    source.save_weights(str(path))
    loaded = model_lib.build_base(IMAGE_SIZE, ModelConfig(weights=str(path)))
    for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("content, suffix", [(b"not an hdf5 file", ".h5"), (None, ".h5"), (b"x", ".bin")])
def test_bad_weights_file_fails_naming_the_path(tmp_path, content, suffix):
    path = tmp_path / f"weights{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(model_lib.WeightsUnavailableError, match=f"--weights={path}"):
        model_lib.build_base(IMAGE_SIZE, ModelConfig(weights=str(path)))


# Keras warns once per layer group it cannot match in the wrong file before the load fails.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
def test_weights_of_another_architecture_fail_naming_the_path(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(str(path))
    with pytest.raises(model_lib.WeightsUnavailableError, match=f"--weights={path}"):
        model_lib.build_base(IMAGE_SIZE, ModelConfig(weights=str(path)))


def test_weights_from_a_keras_applications_style_h5_file(tmp_path):
    """The layout of resnet50v2_..._notop.h5 as keras.applications publishes it (Keras 2 HDF5 weights)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    source = model_lib.build_base(IMAGE_SIZE, ModelConfig(weights="none"))
    path = tmp_path / model_lib.IMAGENET_WEIGHTS_FILE
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    loaded = model_lib.build_base(IMAGE_SIZE, ModelConfig(weights=str(path)))
    for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
