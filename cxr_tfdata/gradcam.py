"""Grad-CAM: where the model looked, drawn for a reader.

`gradcam_heatmaps` computes Grad-CAM of the PNEUMONIA probability at the model's input size;
`write_gradcams` writes one PNG per predicted image into a folder claimed for cxr-predict.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from cxr_tfdata import atomic, outputs

PROGRAM = "cxr-predict"


def _output_rank(layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # a layer never called in a graph has no output
        return None


def find_gradcam_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer producing the model's last 4-D feature map, searching inside nested models.

    A nested base model whose output is 4-D (ResNet50V2 with include_top=False) is itself that
    layer; one that pools inside (pooling="avg") is searched for its own last 4-D layer.
    """
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model) and _output_rank(layer) != 4:
            try:
                return find_gradcam_layer(layer)
            except ValueError:
                continue
        if _output_rank(layer) == 4:
            return layer
    raise ValueError(f"model {model.name!r} has no layer with a 4-D feature map for Grad-CAM")


def gradcam_heatmaps(model: keras.Model, images: np.ndarray, layer: keras.layers.Layer | None = None) -> np.ndarray:
    """Grad-CAM of the PNEUMONIA probability: [N, S, S] float32 in [0, 1], one per image.

    The feature map is captured by wrapping the layer's `call` for one eager forward pass, which
    works at any nesting depth. The input is watched so frozen (non-trainable) layers still record
    gradients.
    """
    layer = layer or find_gradcam_layer(model)
    captured = []
    original_call = layer.call

    def capturing_call(*args, **kwargs):
        outputs = original_call(*args, **kwargs)
        captured.append(outputs)
        return outputs

    inputs = tf.convert_to_tensor(np.asarray(images, np.float32))
    # object.__setattr__ skips Keras' attribute tracking: this is a temporary instance override.
    object.__setattr__(layer, "call", capturing_call)
    try:
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            probabilities = model(inputs, training=False)
            score = tf.reduce_sum(tf.cast(probabilities, tf.float32))
    finally:
        object.__delattr__(layer, "call")  # back to the class's own method
    if not captured:
        raise ValueError(f"layer {layer.name!r} did not run in the forward pass")
    feature_map = captured[-1]
    gradients = tf.cast(tape.gradient(score, feature_map), tf.float32)
    feature_map = tf.cast(feature_map, tf.float32)
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(feature_map * channel_weights, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    return tf.where(peak > 0, cam / tf.maximum(peak, 1e-12), tf.zeros_like(cam)).numpy()


def overlay(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """uint8 RGB [S, S, 3]: the grayscale image with the heatmap in the jet colour map on top."""
    from matplotlib import colormaps

    gray = np.repeat(np.asarray(pixels, np.float32).reshape(*heatmap.shape, 1), 3, axis=-1)
    colours = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * gray + alpha * colours, 0, 255).round().astype(np.uint8)


def gradcam_names(rows: list) -> list[str]:
    """The overlay file name of each readable row: `<stem>_gradcam.png`, a numeric suffix keeping
    equal stems apart."""
    used, names = set(), []
    for row in rows:
        if row.pixels is None:
            continue
        stem = os.path.splitext(os.path.basename(row.path))[0]
        name, suffix = f"{stem}_gradcam.png", 1
        while name in used:
            name, suffix = f"{stem}_gradcam_{suffix}.png", suffix + 1
        used.add(name)
        names.append(name)
    return names


def write_gradcams(model: keras.Model, rows: list, gradcam_dir: str, batch_size: int) -> list[str]:
    """One overlay PNG per readable image, named by `gradcam_names`, into a folder claimed for
    cxr-predict (new, empty, or holding an earlier run's overlays; see outputs.claim_folder)."""
    names = gradcam_names(rows)
    outputs.claim_folder("--gradcam_dir", gradcam_dir, PROGRAM, names, overwrite=None)
    layer = find_gradcam_layer(model)
    readable = [row for row in rows if row.pixels is not None]
    written = []
    for start in range(0, len(readable), batch_size):
        batch = readable[start:start + batch_size]
        heatmaps = gradcam_heatmaps(model, np.stack([row.pixels for row in batch]), layer)
        for row, heatmap, name in zip(batch, heatmaps, names[start:start + batch_size], strict=True):
            path = os.path.join(gradcam_dir, name)
            image = Image.fromarray(overlay(row.pixels, heatmap), mode="RGB")
            atomic.write_with(path, lambda tmp, image=image: image.save(tmp, format="PNG"), suffix=".png")
            written.append(path)
    return written
