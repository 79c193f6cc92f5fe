"""Random affine augmentation with ImageDataGenerator's meaning, vectorized over a batch.

`augment_batch` is a pure, stateless function of (images, config, seed): the same seed gives the same
output eagerly, inside `tf.data` and inside a compiled model. It draws one rotation, zoom, shift (and
optional horizontal flip) per image, folds them into one affine matrix and resamples each image once,
bilinear (ImageDataGenerator's `interpolation_order=1`), with `ImageProjectiveTransformV3`'s
sampling rule. Both users in the package, the tf.data pipeline (`input_pipeline`, XLA-compiled:
about five times the kernel's throughput on CPU) and `RandomAffine`, resample with gathers that XLA
compiles (`xla_compatible=True`); the `ImageProjectiveTransformV3` kernel path gives the same result
to float rounding and is kept as the reference the gather path is tested against.

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
`affine_transforms` with given parameters reproduces tf_keras's `apply_affine_transform` (tested
against it). One difference in the random draw: ImageDataGenerator passes `height_shift_range`
times the height as `tx`, which `apply_affine_transform` applies along the columns, so its
"height" shift moves images sideways. The notebook uses equal width and height ranges on square
images, so the distributions are the same; here each range moves the axis its name says.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from cxr_tfdata.core.config import AFFINE_FIELDS, AugmentConfig

_FILL_MODES = {"nearest": "NEAREST", "constant": "CONSTANT", "reflect": "REFLECT", "wrap": "WRAP"}


_MASK32 = 0xFFFFFFFF


def _as_seed(seed) -> tf.Tensor:
    """A [2] int64 seed (each in [0, 2**32)) from an int, a pair, or a seed tensor of any integer dtype."""
    if isinstance(seed, int):
        seed = [seed, 0]
    seed = tf.cast(tf.reshape(tf.convert_to_tensor(seed), [2]), tf.int64)
    return tf.bitwise.bitwise_and(seed, _MASK32)


def _mix32(x: tf.Tensor) -> tf.Tensor:
    # An integer avalanche hash on 32-bit values held in int64: products stay below 2**59, so no
    # overflow, and every op is plain integer arithmetic that XLA and TensorFlow compute alike.
    x = tf.bitwise.bitwise_and((tf.bitwise.right_shift(x, 16) ^ x) * 0x45D9F3B, _MASK32)
    x = tf.bitwise.bitwise_and((tf.bitwise.right_shift(x, 16) ^ x) * 0x45D9F3B, _MASK32)
    return tf.bitwise.right_shift(x, 16) ^ x


def stateless_uniform(shape, seed) -> tf.Tensor:
    """Uniform [0, 1) float32 values, a pure function of `seed` that is the same on every device.

    tf.random's stateless ops derive their Philox key differently under XLA, so the same seed
    would give other transforms inside a compiled model than in tf.data; a counter hash does not.
    """
    seed = _as_seed(seed)
    count = tf.reduce_prod(tf.cast(shape, tf.int64))
    counter = tf.range(count, dtype=tf.int64)
    h = _mix32(tf.bitwise.bitwise_and(counter * 0x9E3779B1, _MASK32) ^ seed[0])
    h = _mix32(h ^ seed[1])
    # The top 24 bits convert exactly to float32.
    return tf.reshape(tf.cast(tf.bitwise.right_shift(h, 8), tf.float32) / float(1 << 24), shape)


def affine_transforms(theta_degrees, zoom_x, zoom_y, shift_x, shift_y, flip, height, width) -> tf.Tensor:
    """[N, 8] transforms (output -> input pixel coordinates) for ImageProjectiveTransformV3.

    Per image (each argument [N]): rotation in degrees, zoom factors, shifts in pixels, and flip
    (-1.0 to mirror left-right, 1.0 not to), composed as ImageDataGenerator's
    apply_affine_transform(theta, tx=shift_x, ty=shift_y, zx=zoom_x, zy=zoom_y) then flip_axis:
    input = c + R(theta) (diag(zoom_x, zoom_y) F (output - c) + shift), c the image centre.
    """
    theta = tf.convert_to_tensor(theta_degrees, tf.float32) * (math.pi / 180.0)
    zoom_x, zoom_y, shift_x, shift_y, flip = (
        tf.convert_to_tensor(v, tf.float32) for v in (zoom_x, zoom_y, shift_x, shift_y, flip)
    )
    cos, sin = tf.cos(theta), tf.sin(theta)
    # A = R(theta) @ diag(zoom_x, zoom_y) @ diag(flip, 1); pixel centres sit at integer coordinates.
    a00, a01 = cos * zoom_x * flip, -sin * zoom_y
    a10, a11 = sin * zoom_x * flip, cos * zoom_y
    center_x = (tf.cast(width, tf.float32) - 1.0) / 2.0
    center_y = (tf.cast(height, tf.float32) - 1.0) / 2.0
    offset_x = center_x - a00 * center_x - a01 * center_y + cos * shift_x - sin * shift_y
    offset_y = center_y - a10 * center_x - a11 * center_y + sin * shift_x + cos * shift_y
    zeros = tf.zeros_like(theta)
    return tf.stack([a00, a01, offset_x, a10, a11, offset_y, zeros, zeros], axis=1)


def random_affine_transforms(batch_size, height, width, config: AugmentConfig, seed) -> tf.Tensor:
    """[N, 8] random transforms: ImageDataGenerator's distribution of each parameter, drawn from `seed`."""
    uniform = 2.0 * stateless_uniform(tf.stack([batch_size, 6]), seed) - 1.0
    if config.horizontal_flip:
        flip = tf.where(uniform[:, 5] < 0.0, -1.0, 1.0)
    else:
        flip = tf.ones_like(uniform[:, 5])
    return affine_transforms(
        theta_degrees=uniform[:, 0] * config.rotation_range,
        zoom_x=1.0 + uniform[:, 1] * config.zoom_range,
        zoom_y=1.0 + uniform[:, 2] * config.zoom_range,
        shift_x=uniform[:, 3] * config.width_shift_range * tf.cast(width, tf.float32),
        shift_y=uniform[:, 4] * config.height_shift_range * tf.cast(height, tf.float32),
        flip=flip,
        height=height,
        width=width,
    )


def _map_coordinates(coords: tf.Tensor, length: int | tf.Tensor, fill_mode: str) -> tf.Tensor:
    """Maps out-of-image coordinates back inside, exactly as ImageProjectiveTransformV3's MapCoordinate."""
    length = tf.cast(length, tf.float32)
    last = length - 1.0
    if fill_mode == "reflect":
        size2 = 2.0 * length
        low = tf.where(coords < size2, size2 * tf.floor(-coords / size2) + coords, coords)
        low = tf.where(low < -length, low + size2, -low - 1.0)
        high = coords - size2 * tf.floor(coords / size2)
        high = tf.where(high >= length, size2 - high - 1.0, high)
        coords = tf.where(coords < 0.0, low, tf.where(coords > last, high, coords))
    elif fill_mode == "wrap":
        low = coords + length * (tf.floor(-coords / last) + 1.0)
        high = coords - length * tf.floor(coords / last)
        coords = tf.where(coords < 0.0, low, tf.where(coords > last, high, coords))
    elif fill_mode == "constant":
        return coords
    return tf.clip_by_value(coords, 0.0, last)


def _affine_resample_gather(images: tf.Tensor, transforms: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Bilinear resampling with gathers: ImageProjectiveTransformV3's result with ops XLA can compile."""
    shape = tf.shape(images)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    ys = tf.cast(tf.range(height), tf.float32)[None, :, None]
    xs = tf.cast(tf.range(width), tf.float32)[None, None, :]
    t = transforms[:, :, None, None]
    x = _map_coordinates(t[:, 0] * xs + t[:, 1] * ys + t[:, 2], width, config.fill_mode)
    y = _map_coordinates(t[:, 3] * xs + t[:, 4] * ys + t[:, 5], height, config.fill_mode)
    x0, y0 = tf.floor(x), tf.floor(y)
    flat = tf.reshape(images, [batch, height * width, channels])
    fill = tf.constant(config.fill_value, tf.float32)

    def read(yi: tf.Tensor, xi: tf.Tensor) -> tf.Tensor:
        inside = (yi >= 0.0) & (yi < tf.cast(height, tf.float32)) & (xi >= 0.0) & (xi < tf.cast(width, tf.float32))
        yc = tf.clip_by_value(tf.cast(yi, tf.int32), 0, height - 1)
        xc = tf.clip_by_value(tf.cast(xi, tf.int32), 0, width - 1)
        index = tf.reshape(yc * width + xc, [batch, -1])
        values = tf.reshape(tf.gather(flat, index, batch_dims=1), [batch, height, width, channels])
        return tf.where(inside[..., None], values, fill)

    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    top = (1.0 - wx) * read(y0, x0) + wx * read(y0, x0 + 1.0)
    bottom = (1.0 - wx) * read(y0 + 1.0, x0) + wx * read(y0 + 1.0, x0 + 1.0)
    return (1.0 - wy) * top + wy * bottom


def augment_batch(images: tf.Tensor, config: AugmentConfig, seed, xla_compatible: bool = False) -> tf.Tensor:
    """Randomly rotates, zooms, shifts (and optionally flips) each image of a [N, H, W, C] batch.

    Any numeric input dtype; computes and returns float32 pixel values in the input's range (no
    rounding). Stateless: the same `seed` (int, or [2] integer tensor) gives the same output.
    xla_compatible=True resamples with gathers that XLA compiles (what the tf.data pipeline and
    RandomAffine use); False with the ImageProjectiveTransformV3 kernel (same result to float
    rounding; slower on CPU than the XLA-compiled gathers, and not compilable by XLA).
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(f"augment_batch expects [N, H, W, C] images, got shape {images.shape}")
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    height = images.shape[1] if images.shape[1] is not None else shape[1]
    width = images.shape[2] if images.shape[2] is not None else shape[2]
    transforms = random_affine_transforms(shape[0], height, width, config, seed)
    if xla_compatible:
        return _affine_resample_gather(images, transforms, config)
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

    def __init__(self, seed: int | None = None, **kwargs):
        # The transform's settings (AugmentConfig's fields, validated there) arrive by name, as
        # get_config saved them; the rest are the Layer's own.
        settings = {name: kwargs.pop(name) for name in AFFINE_FIELDS if name in kwargs}
        super().__init__(**kwargs)
        self.augment_config = AugmentConfig(placement="device", **settings)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="random_affine_seed")
        self.supports_masking = False

    @classmethod
    def from_config_values(cls, config: AugmentConfig, seed: int | None = None, **kwargs):
        """The layer for an AugmentConfig (its placement is not looked at)."""
        return cls(seed=seed, **config.affine_settings(), **kwargs)

    def call(self, inputs, training=None):
        if not training:
            return tf.cast(inputs, self.compute_dtype)
        seed = _as_seed(self.seed_generator.next())
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # Each replica draws its own transforms rather than repeating the first replica's.
            replica_id = tf.cast(replica.replica_id_in_sync_group, tf.int64)
            seed = tf.stack([seed[0], seed[1] ^ tf.bitwise.left_shift(replica_id + 1, 24)])
        # Gathers rather than the fused kernel: the model may be compiled with XLA, which has no
        # kernel for ImageProjectiveTransformV3.
        images = augment_batch(inputs, self.augment_config, seed, xla_compatible=True)
        return tf.cast(images, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(self.augment_config.affine_settings(), seed=self.seed)
        return config
