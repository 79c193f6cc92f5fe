"""Model-input preprocessing, defined once: grayscale pixels in [0, 255] to ResNet50V2's input.

Every path (training, evaluation, prediction, the serving export) goes through
`ToResNetInput`, which is the first layer after augmentation in the model itself,
so the data side only ever ships raw pixel values (uint8, or float in [0, 255]).
"""

from __future__ import annotations

import keras
import tensorflow as tf


def to_resnet_input(images: tf.Tensor, dtype: str | tf.DType = tf.float32) -> tf.Tensor:
    """[N, H, W, 1] pixel values in [0, 255] -> [N, H, W, 3] in [-1, 1] (ResNet50V2's "tf" mode)."""
    images = tf.cast(images, dtype)
    scaled = images / tf.constant(127.5, dtype) - tf.constant(1.0, dtype)
    return tf.repeat(scaled, repeats=3, axis=-1) if scaled.shape[-1] == 1 else scaled


@keras.saving.register_keras_serializable(package="cxr_tfdata")
class ToResNetInput(keras.layers.Layer):
    """Keras layer form of `to_resnet_input`, computing in the layer's compute dtype."""

    def call(self, inputs):
        return to_resnet_input(inputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)
