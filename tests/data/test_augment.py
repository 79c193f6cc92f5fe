"""Tests of cxr_tfdata.data.augment: ImageDataGenerator's meaning, ranges, seeds, and the Keras layer."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from cxr_tfdata.core.config import AugmentConfig
from cxr_tfdata.data.augment import (
    RandomAffine,
    affine_transforms,
    augment_batch,
    random_affine_transforms,
    stateless_uniform,
)

SIZE = 41
NO_AUGMENT = AugmentConfig(
    placement="cpu", rotation_range=0.0, zoom_range=0.0, width_shift_range=0.0, height_shift_range=0.0
)


def _smooth_images(n: int, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    images = [100 + 60 * np.sin(xx / (4.0 + i)) + 40 * np.cos(yy / 3.0) + xx for i in range(n)]
    return np.clip(np.stack(images), 0, 255).astype(np.float32)[..., None]


def _dot_images(n: int, row: int, col: int, size: int = SIZE) -> np.ndarray:
    images = np.zeros((n, size, size, 1), np.float32)
    images[:, row, col] = 255.0
    return images


def _centroids(images: np.ndarray) -> np.ndarray:
    """(row, col) intensity centroid of each image."""
    weights = images[..., 0]
    rows, cols = np.mgrid[0 : weights.shape[1], 0 : weights.shape[2]]
    total = weights.sum(axis=(1, 2))
    return np.stack([(weights * rows).sum(axis=(1, 2)) / total, (weights * cols).sum(axis=(1, 2)) / total], 1)


@pytest.mark.parametrize(
    "theta, shift_x, shift_y, zoom_x, zoom_y",
    [(15.0, 0.0, 0.0, 1.0, 1.0), (0.0, 4.0, -3.0, 1.0, 1.0), (0.0, 0.0, 0.0, 1.2, 0.85), (-8.0, 3.0, 2.0, 0.9, 1.1)],
)
def test_transform_matches_imagedatagenerator_apply_affine_transform(theta, shift_x, shift_y, zoom_x, zoom_y):
    image_module = pytest.importorskip("tf_keras.preprocessing.image")
    image = _smooth_images(1)[0]
    expected = image_module.apply_affine_transform(
        image, theta=theta, tx=shift_x, ty=shift_y, zx=zoom_x, zy=zoom_y,
        row_axis=0, col_axis=1, channel_axis=2, fill_mode="nearest", order=1,
    )
    transforms = affine_transforms([theta], [zoom_x], [zoom_y], [shift_x], [shift_y], [1.0], SIZE, SIZE)
    ours = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transforms, output_shape=[SIZE, SIZE], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="NEAREST",
    )[0]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-3)


@pytest.mark.parametrize("xla_compatible", [False, True])
def test_zero_ranges_are_the_identity(xla_compatible):
    images = _smooth_images(4)
    out = augment_batch(images, NO_AUGMENT, seed=3, xla_compatible=xla_compatible)
    np.testing.assert_array_equal(out.numpy(), images)


@pytest.mark.parametrize("fill_mode", ["nearest", "constant", "reflect", "wrap"])
def test_gather_resampler_equals_fused_kernel(fill_mode):
    config = AugmentConfig(placement="cpu", rotation_range=40, zoom_range=0.5, width_shift_range=0.6,
                           height_shift_range=0.6, horizontal_flip=True, fill_mode=fill_mode, fill_value=17)
    images = np.random.default_rng(0).integers(0, 256, (6, 24, 24, 1)).astype(np.uint8)
    fused = augment_batch(images, config, seed=[5, 9])
    gathered = augment_batch(images, config, seed=[5, 9], xla_compatible=True)
    np.testing.assert_allclose(gathered.numpy(), fused.numpy(), atol=1e-3)
    assert np.abs(fused.numpy() - images).max() > 10  # something moved


@pytest.mark.parametrize("xla_compatible", [False, True])
def test_same_seed_same_output_eagerly_and_inside_dataset_map(xla_compatible):
    config = AugmentConfig(placement="cpu", rotation_range=20, zoom_range=0.2)
    images = _smooth_images(5)
    eager = augment_batch(images, config, seed=[7, 11], xla_compatible=xla_compatible).numpy()
    mapped = next(iter(
        tf.data.Dataset.from_tensors(images).map(
            lambda x: augment_batch(x, config, seed=tf.constant([7, 11]), xla_compatible=xla_compatible)
        )
    )).numpy()
    # Graph rewrites may reorder float arithmetic: equal to float rounding, far below a grey level.
    np.testing.assert_allclose(mapped, eager, atol=1e-3)
    other_seed = augment_batch(images, config, seed=[7, 12], xla_compatible=xla_compatible).numpy()
    assert np.abs(other_seed - eager).max() > 1.0


def test_xla_compiled_equals_eager():
    config = AugmentConfig(placement="cpu", rotation_range=20, zoom_range=0.2)
    images = _smooth_images(5)
    compiled = tf.function(lambda x, s: augment_batch(x, config, s, xla_compatible=True), jit_compile=True)
    np.testing.assert_allclose(
        compiled(images, tf.constant([1, 2])).numpy(), augment_batch(images, config, [1, 2]).numpy(), atol=1e-2
    )


def test_random_numbers_are_the_same_under_xla_and_uniform():
    eager = stateless_uniform([5000], [3, 4]).numpy()
    compiled = tf.function(lambda s: stateless_uniform([5000], s), jit_compile=True)(tf.constant([3, 4])).numpy()
    np.testing.assert_array_equal(compiled, eager)
    assert 0.0 <= eager.min() and eager.max() < 1.0
    assert abs(eager.mean() - 0.5) < 0.02 and abs(np.median(eager) - 0.5) < 0.03


def test_shift_moves_a_dot_at_most_the_range_along_its_own_axis():
    config = dataclasses.replace(NO_AUGMENT, width_shift_range=0.2)
    centre = SIZE // 2
    images = _dot_images(64, centre, centre)
    moved = _centroids(augment_batch(images, config, seed=1).numpy())
    dx, dy = moved[:, 1] - centre, moved[:, 0] - centre
    assert np.abs(dy).max() < 1e-3
    assert np.abs(dx).max() <= 0.2 * SIZE + 1e-3
    assert np.abs(dx).max() > 0.15 * SIZE  # the range is used, not a fraction of it
    config = dataclasses.replace(NO_AUGMENT, height_shift_range=0.2)
    moved = _centroids(augment_batch(images, config, seed=1).numpy())
    assert np.abs(moved[:, 1] - centre).max() < 1e-3
    assert 0.15 * SIZE < np.abs(moved[:, 0] - centre).max() <= 0.2 * SIZE + 1e-3


def test_rotation_turns_a_dot_by_at_most_the_range():
    config = dataclasses.replace(NO_AUGMENT, rotation_range=30.0)
    centre, radius = SIZE // 2, 15
    images = _dot_images(64, centre, centre + radius)
    moved = _centroids(augment_batch(images, config, seed=2).numpy())
    angles = np.degrees(np.arctan2(moved[:, 0] - centre, moved[:, 1] - centre))
    distances = np.hypot(moved[:, 0] - centre, moved[:, 1] - centre)
    np.testing.assert_allclose(distances, radius, atol=0.5)
    assert np.abs(angles).max() <= 30.0 + 1.0
    assert np.abs(angles).max() > 22.0


def test_zoom_scales_distances_from_the_centre_within_the_range():
    config = dataclasses.replace(NO_AUGMENT, zoom_range=0.25)
    centre, offset = SIZE // 2, 12
    images = _dot_images(64, centre, centre + offset)
    moved = _centroids(augment_batch(images, config, seed=3).numpy())
    # The matrix maps output to input: zoom factor z shows the dot at offset / z.
    ratio = (moved[:, 1] - centre) / offset
    assert np.abs(moved[:, 0] - centre).max() < 1e-3
    assert ratio.min() >= 1 / 1.25 - 0.02 and ratio.max() <= 1 / 0.75 + 0.02
    assert ratio.min() < 0.87 and ratio.max() > 1.2


def test_horizontal_flip_off_by_default_and_mirrors_half_when_on():
    assert AugmentConfig().horizontal_flip is False
    images = _smooth_images(32)
    flipped = augment_batch(images, dataclasses.replace(NO_AUGMENT, horizontal_flip=True), seed=4).numpy()
    mirrored = [np.array_equal(f, img[:, ::-1]) for f, img in zip(flipped, images, strict=True)]
    unchanged = [np.array_equal(f, img) for f, img in zip(flipped, images, strict=True)]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))
    assert 8 <= sum(mirrored) <= 24


def test_transforms_per_image_differ_within_a_batch():
    transforms = random_affine_transforms(8, SIZE, SIZE, AugmentConfig(), seed=5).numpy()
    assert len({tuple(np.round(t, 5)) for t in transforms}) == 8


def test_layer_identity_at_inference_and_fresh_transform_each_training_call():
    layer = RandomAffine.from_config_values(AugmentConfig(rotation_range=20), seed=1)
    images = _smooth_images(3)
    np.testing.assert_array_equal(layer(images, training=False).numpy(), images)
    first = layer(images, training=True).numpy()
    second = layer(images, training=True).numpy()
    assert np.abs(first - second).max() > 1.0
    assert first.min() >= 0.0 and first.max() <= 255.0


def test_layer_config_round_trip_and_saved_model_reload(tmp_path):
    layer = RandomAffine(rotation_range=12.0, zoom_range=0.2, horizontal_flip=True, fill_mode="reflect", seed=9)
    clone = RandomAffine.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    inputs = keras.Input((16, 16, 1), dtype="uint8")
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "augment.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert reloaded.layers[1].get_config()["fill_mode"] == "reflect"
    assert isinstance(reloaded.layers[1], RandomAffine)


def test_layer_under_mixed_precision_and_xla():
    layer = RandomAffine(dtype="mixed_bfloat16", seed=3)
    images = tf.constant(_smooth_images(2).astype(np.uint8))
    compiled = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    out = compiled(images)
    assert out.dtype == tf.bfloat16
    values = tf.cast(out, tf.float32).numpy()
    assert values.min() >= 0.0 and values.max() <= 255.0
    assert layer(images, training=False).dtype == tf.bfloat16
