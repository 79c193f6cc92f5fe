"""Random affine augmentation with ImageDataGenerator's meaning, vectorized over a batch.

`augment_batch` is a pure, stateless function of (images, config, seed): the same seed gives the same
output eagerly, inside `tf.data` and inside a compiled model. It draws one rotation, zoom, shift (and
optional horizontal flip) per image, folds them into one affine matrix and resamples each image once
with `ImageProjectiveTransformV3` (bilinear, ImageDataGenerator's `interpolation_order=1`).

`RandomAffine` is the Keras layer form (for augmentation on the accelerator at the model input): it
draws a fresh seed from a `keras.random.SeedGenerator` at every call and is the identity at inference.

Meaning of the ranges, as in `ImageDataGenerator.get_random_transform` / `apply_affine_transform`:
  - rotation_range r: angle uniform in [-r, r] degrees about the image centre;
  - zoom_range z: zx and zy drawn independently, uniform in [1 - z, 1 + z]; the matrix maps output
    to input coordinates, so a factor above 1 samples a larger area (zooms out), below 1 zooms in;
  - width_shift_range / height_shift_range s: uniform in [-s, s] times the width / height, in pixels;
  - the shift is applied before the rotation and the zoom first (input = c + R (Z (p - c) + t));
  - fill_mode "nearest" (ImageDataGenerator's default) repeats the edge pixels; "constant" uses
    fill_value; "reflect" and "wrap" as in scipy.ndimage.
ImageDataGenerator builds its matrix in (row, col) order and swaps the axes afterwards, so its
`height_shift_range` ends up moving columns and its rotation turns the other way. The ranges are
symmetric and the notebook uses equal width and height ranges on square images, so the
distributions are the same; here each range moves the axis its name says.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from cxr_tfdata.config import AugmentConfig

_FILL_MODES = {"nearest": "NEAREST", "constant": "CONSTANT", "reflect": "REFLECT", "wrap": "WRAP"}


def _as_seed(seed) -> tf.Tensor:
    """A [2] int32 stateless seed from an int, a pair, or a seed tensor of any integer dtype."""
    if isinstance(seed, int):
        return tf.constant([seed, 0], tf.int32)
    seed = tf.convert_to_tensor(seed)
    if seed.dtype != tf.int32:
        # int64/uint32 seeds (tf.data, Keras SeedGenerator) are folded to int32 bit patterns.
        seed = tf.cast(tf.bitwise.bitwise_and(tf.cast(seed, tf.int64), 0x7FFFFFFF), tf.int32)
    return tf.reshape(seed, [2])


def random_affine_transforms(
    batch_size, height, width, config: AugmentConfig, seed
) -> tf.Tensor:
    """[N, 8] projective transforms (output -> input pixel coordinates) for ImageProjectiveTransformV3."""
    seed = _as_seed(seed)
    uniform = tf.random.stateless_uniform([batch_size, 6], seed=seed, minval=-1.0, maxval=1.0)
    theta = uniform[:, 0] * (config.rotation_range * math.pi / 180.0)
    zoom_x = 1.0 + uniform[:, 1] * config.zoom_range
    zoom_y = 1.0 + uniform[:, 2] * config.zoom_range
    width_f = tf.cast(width, tf.float32)
    height_f = tf.cast(height, tf.float32)
    shift_x = uniform[:, 3] * config.width_shift_range * width_f
    shift_y = uniform[:, 4] * config.height_shift_range * height_f
    if config.horizontal_flip:
        flip = tf.where(uniform[:, 5] < 0.0, -1.0, 1.0)
    else:
        flip = tf.ones_like(theta)
    cos, sin = tf.cos(theta), tf.sin(theta)
    # A = R(theta) @ diag(zoom_x, zoom_y) @ diag(flip, 1); pixel centres sit at integer coordinates.
    a00, a01 = cos * zoom_x * flip, -sin * zoom_y
    a10, a11 = sin * zoom_x * flip, cos * zoom_y
    center_x = (width_f - 1.0) / 2.0
    center_y = (height_f - 1.0) / 2.0
    # input = A (out - c) + R t + c
    offset_x = center_x - a00 * center_x - a01 * center_y + cos * shift_x - sin * shift_y
    offset_y = center_y - a10 * center_x - a11 * center_y + sin * shift_x + cos * shift_y
    zeros = tf.zeros_like(theta)
    return tf.stack([a00, a01, offset_x, a10, a11, offset_y, zeros, zeros], axis=1)


def augment_batch(images: tf.Tensor, config: AugmentConfig, seed) -> tf.Tensor:
    """Randomly rotates, zooms, shifts (and optionally flips) each image of a [N, H, W, C] batch.

    Any numeric input dtype; computes and returns float32 pixel values in the input's range (no
    rounding). Stateless: the same `seed` (int, or [2] integer tensor) gives the same output.
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(f"augment_batch expects [N, H, W, C] images, got shape {images.shape}")
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    height = images.shape[1] if images.shape[1] is not None else shape[1]
    width = images.shape[2] if images.shape[2] is not None else shape[2]
    transforms = random_affine_transforms(shape[0], height, width, config, seed)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.stack([height, width]),
        fill_value=tf.constant(config.fill_value, tf.float32),
        interpolation="BILINEAR",
        fill_mode=_FILL_MODES[config.fill_mode],
    )


@keras.saving.register_keras_serializable(package="cxr_tfdata")
class RandomAffine(keras.layers.Layer):
    """`augment_batch` as a Keras layer: a fresh random transform per image at each training call.

    Computes in float32 and returns the layer's compute dtype (pixel values stay in [0, 255]); the
    identity (cast to the compute dtype) when training is False.
    """

    def __init__(
        self,
        rotation_range: float = 10.0,
        zoom_range: float = 0.1,
        width_shift_range: float = 0.1,
        height_shift_range: float = 0.1,
        horizontal_flip: bool = False,
        fill_mode: str = "nearest",
        fill_value: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Validation of every range lives in AugmentConfig.
        self.augment_config = AugmentConfig(
            placement="device",
            rotation_range=float(rotation_range),
            zoom_range=float(zoom_range),
            width_shift_range=float(width_shift_range),
            height_shift_range=float(height_shift_range),
            horizontal_flip=bool(horizontal_flip),
            fill_mode=fill_mode,
            fill_value=float(fill_value),
        )
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="random_affine_seed")
        self.supports_masking = False

    @classmethod
    def from_config_values(cls, config: AugmentConfig, seed: int | None = None, **kwargs):
        """The layer for an AugmentConfig (its placement is not looked at)."""
        return cls(
            rotation_range=config.rotation_range,
            zoom_range=config.zoom_range,
            width_shift_range=config.width_shift_range,
            height_shift_range=config.height_shift_range,
            horizontal_flip=config.horizontal_flip,
            fill_mode=config.fill_mode,
            fill_value=config.fill_value,
            seed=seed,
            **kwargs,
        )

    def call(self, inputs, training=None):
        if not training:
            return tf.cast(inputs, self.compute_dtype)
        seed = self.seed_generator.next()
        return tf.cast(augment_batch(inputs, self.augment_config, seed), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        c = self.augment_config
        config.update(
            rotation_range=c.rotation_range,
            zoom_range=c.zoom_range,
            width_shift_range=c.width_shift_range,
            height_shift_range=c.height_shift_range,
            horizontal_flip=c.horizontal_flip,
            fill_mode=c.fill_mode,
            fill_value=c.fill_value,
            seed=self.seed,
        )
        return config
