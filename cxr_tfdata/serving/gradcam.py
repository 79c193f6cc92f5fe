"""Grad-CAM: where the model looked, drawn for a reader.

`gradcam_heatmaps` computes Grad-CAM of the PNEUMONIA probability at the model's input size.
`write_gradcams` writes one PNG per predicted image into a folder claimed for cxr-predict. Each is a
panel a clinician can read: the source image at its own resolution (at least MIN_LONG_SIDE px on
its long side, at most MAX_LONG_SIDE), plain on the left and with the heatmap on the right, under a
text band that gives the probability, the label and the threshold it was drawn at. The heatmap is
mapped from the model's square input back onto the source (`heatmap_on_source`), undoing the
squash or letterbox resize the image went through before it was scored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from cxr_tfdata.core import imaging, record_schema
from cxr_tfdata.files import atomic, output_safety

PROGRAM = "cxr-predict"

# The long side of each half of a panel: a smaller source is upscaled to MIN_LONG_SIDE (a model
# input of 224 px is too small to read); a larger one is kept as it is up to MAX_LONG_SIDE, above
# which it is shrunk so a panel stays a few MB.
MIN_LONG_SIDE = 512
MAX_LONG_SIDE = 2048
# Resampling of the displayed grayscale image (PIL antialiases it when shrinking).
DISPLAY_RESAMPLING = Image.Resampling.BICUBIC
OVERLAY_ALPHA = 0.4
# The source as re-read, resized as it was for the model, must be within this mean absolute
# difference (grey levels) of the pixels that were scored, or the file changed since it was
# scored and is not drawn on. A JPEG record round trip differs by about 1 (quality 95) to 5
# (quality 10); two different radiographs by 20 or more.
SOURCE_MATCH_MAX_MEAN_DIFF = 10.0
# Text band: font size as a fraction of the panel width, so the text keeps its size relative to
# the images when a panel is shown fitted to a screen.
_FONT_FRACTION = 1 / 64
_MIN_FONT_SIZE = 14
_BAND_BACKGROUND = (24, 24, 24)
_TEXT_COLOUR = (255, 255, 255)
_WARNING_COLOUR = (255, 196, 64)
_POSITIVE = record_schema.CLASS_NAMES[1]


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


def display_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) at which an image of that size is drawn: unchanged when its long side is in
    [MIN_LONG_SIDE, MAX_LONG_SIDE], otherwise scaled (aspect ratio kept) to the nearer bound."""
    if height < 1 or width < 1:
        raise ValueError(f"image of {width} x {height} pixels has nothing to draw")
    long_side = max(height, width)
    if MIN_LONG_SIDE <= long_side <= MAX_LONG_SIDE:
        return height, width
    scale = (MIN_LONG_SIDE if long_side < MIN_LONG_SIDE else MAX_LONG_SIDE) / long_side
    return max(1, round(height * scale)), max(1, round(width * scale))


def letterbox_box(source_hw: tuple[int, int], image_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image content in `imaging.resize(image, image_size,
    pad=True)` of a source of (height, width) `source_hw`; the rest of the square is black bars."""
    height, width = source_hw
    return imaging.letterbox_box(width, height, image_size)


def heatmap_on_source(heatmap: np.ndarray, source_hw: tuple[int, int], image_size: int, pad: bool,
                      output_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The [S, S] heatmap of a model input mapped onto its source: float32 [H, W] in [0, 1].

    The model input was made from a source of (height, width) `source_hw` by imaging.resize: with
    pad=False the whole square is the source squashed, so the whole heatmap is stretched back to
    the source's size; with pad=True the source sits in `letterbox_box` between black bars, so only
    that part of the heatmap is stretched back (the bars hold no anatomy). The result has
    `output_hw` (default `source_hw`): the source's size or the size it is displayed at.
    """
    heatmap = np.asarray(heatmap, np.float32)
    if heatmap.shape != (image_size, image_size):
        raise ValueError(f"heatmap of shape {heatmap.shape} is not the {image_size} x {image_size} model input")
    if min(source_hw) < 1:
        raise ValueError(f"source of {source_hw[1]} x {source_hw[0]} pixels has nothing to map onto")
    out_height, out_width = output_hw or source_hw
    left, top, right, bottom = letterbox_box(source_hw, image_size) if pad else (0, 0, image_size, image_size)
    # Cropped before resizing: a resize `box` would still let its edge pixels sample the bars.
    content = np.ascontiguousarray(heatmap[top:bottom, left:right])
    mapped = Image.fromarray(content).resize((out_width, out_height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(mapped, np.float32), 0.0, 1.0)


def overlay(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the grayscale image ([H, W] or [H, W, 1]) with the [H, W] heatmap in
    the jet colour map blended on top (`alpha` of the colour, the rest the image)."""
    from matplotlib import colormaps

    gray = np.asarray(pixels, np.float32).reshape(*heatmap.shape, 1)
    colours = colormaps["jet"](np.clip(np.asarray(heatmap, np.float32), 0, 1), bytes=True)[..., :3]
    return np.clip((1 - alpha) * gray + alpha * colours, 0, 255).round().astype(np.uint8)


def _printable(text: str) -> str:
    """Text safe to draw on one line: control and other unprintable characters shown as '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _decimals(probabilities: Sequence[float], threshold: float) -> int:
    """Decimals (3 to 6) at which no probability that differs from the threshold reads as equal to
    it, so the label can be checked against the numbers shown."""
    decimals = 3
    while decimals < 6 and any(p != threshold and f"{p:.{decimals}f}" == f"{threshold:.{decimals}f}"
                               for p in probabilities):
        decimals += 1
    return decimals


def caption_lines(row, threshold: float, threshold_source: str = "") -> list[str]:
    """The text band's lines for a prediction row: its numbers, then the colour legend.

    E.g. `P(PNEUMONIA) 0.873 (calibrated 0.812) | label PNEUMONIA | threshold 0.374 (model's
    operating threshold)`; the calibrated probability is shown when given and different from the
    probability at the decimals shown. " | " separates the parts a narrow panel may wrap between.
    """
    given = [p for p in (row.probability, row.calibrated_probability) if p is not None]
    decimals = _decimals(given, threshold)
    if row.probability is None:
        numbers = f"P({_POSITIVE}) not computed"
    else:
        numbers = f"P({_POSITIVE}) {row.probability:.{decimals}f}"
    calibrated = row.calibrated_probability
    if calibrated is not None and (row.probability is None
                                   or f"{calibrated:.{decimals}f}" != f"{row.probability:.{decimals}f}"):
        numbers += f" (calibrated {calibrated:.{decimals}f})"
    label = f"label {_printable(row.label)}" if row.label else "no label"
    source = f" ({_printable(threshold_source)})" if threshold_source else ""
    return [
        f"{numbers} | {label} | threshold {threshold:.{decimals}f}{source}",
        f"Grad-CAM: red = regions that raised the {_POSITIVE} probability most, blue = little or none "
        f"| left: the image alone, right: with Grad-CAM",
    ]


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """Lines of at most max_width pixels: parts separated by " | " kept whole where they fit, a
    part too wide on its own broken between words (a single word too wide is left whole)."""
    lines: list[str] = []
    for part in text.split(" | "):
        joined = f"{lines[-1]} | {part}" if lines else part
        if lines and font.getlength(joined) <= max_width:
            lines[-1] = joined
            continue
        words, current = part.split(" "), ""
        for word in words:
            candidate = f"{current} {word}" if current else word
            if current and font.getlength(candidate) > max_width:
                lines.append(current)
                candidate = word
            current = candidate
        lines.append(current)
    return lines


def render_panel(gray: np.ndarray, heatmap: np.ndarray, lines: Sequence[str], warning: str = "") -> Image.Image:
    """RGB panel: a text band on top, then the [H, W] uint8 image on the left and the same image
    with the [H, W] heatmap overlaid on the right, a narrow gap of the band's colour between them.

    The band holds `lines` in white, then `warning` (if any) in amber, in a font whose size scales
    with the panel width; lines too wide for the panel wrap.
    """
    gray = np.asarray(gray, np.uint8)
    if gray.ndim == 3:
        gray = gray[..., 0]
    height, width = gray.shape
    gap = max(4, width // 64)
    panel_width = 2 * width + gap
    font_size = max(_MIN_FONT_SIZE, round(panel_width * _FONT_FRACTION))
    font = ImageFont.load_default(size=font_size)
    margin = font_size // 2
    texts = [(line, _TEXT_COLOUR) for text in lines for line in _wrap(_printable(text), font, panel_width - 2 * margin)]
    if warning:
        texts += [(line, _WARNING_COLOUR) for line in _wrap(_printable(warning), font, panel_width - 2 * margin)]
    probe = font.getbbox("Ag|(")
    pitch = (probe[3] - probe[1]) + font_size // 3
    band_height = 2 * margin + len(texts) * pitch
    panel = Image.new("RGB", (panel_width, band_height + height), _BAND_BACKGROUND)
    draw = ImageDraw.Draw(panel)
    for i, (line, colour) in enumerate(texts):
        draw.text((margin, margin + i * pitch), line, fill=colour, font=font)
    panel.paste(Image.fromarray(gray).convert("RGB"), (0, band_height))
    panel.paste(Image.fromarray(overlay(gray, heatmap)), (width + gap, band_height))
    return panel


def _reread_source(row, pad: bool, max_file_bytes: int) -> tuple[Image.Image | None, str]:
    """The row's source as grayscale ("L", EXIF orientation applied), or None and why it cannot
    be drawn on: unreadable now, or no longer the image that was scored."""
    try:
        image = imaging.decode_grayscale(imaging.read_source(row.path, max_file_bytes))
    except imaging.ImageError as e:
        return None, str(e)
    size = row.pixels.shape[0]
    again = np.asarray(imaging.resize(image, size, pad), np.float32)
    difference = float(np.mean(np.abs(again - np.asarray(row.pixels, np.float32).reshape(again.shape))))
    if difference > SOURCE_MATCH_MAX_MEAN_DIFF:
        return None, f"it changed since it was scored (mean difference {difference:.0f} grey levels)"
    return image, ""


def gradcam_panel(row, heatmap: np.ndarray, threshold: float = 0.5, threshold_source: str = "",
                  pad: bool = False,
                  max_file_bytes: int = int(imaging.DEFAULT_MAX_FILE_MB * (1 << 20))) -> Image.Image:
    """The panel of one scored row (`render_panel`), its [S, S] heatmap mapped onto the source.

    The source at `row.path` is read again (as the converter reads it, at full resolution) and
    shown at `display_size`. If it cannot be read, or no longer matches `row.pixels`, the panel is
    drawn on `row.pixels` upscaled instead, and the band says so.
    """
    size = row.pixels.shape[0]
    name = os.path.basename(row.path)
    source, reason = _reread_source(row, pad, max_file_bytes)
    warning = ""
    if source is None:
        logging.warning("Grad-CAM of %s drawn on the %d px model input: the source could not be used: %s",
                        row.path, size, reason)
        source, pad = Image.fromarray(np.asarray(row.pixels, np.uint8).reshape(size, size)), False
        warning = f"{name}: source not re-read ({reason}); drawn on the {size} x {size} px model input, upscaled"
    source_hw = (source.height, source.width)
    shown_hw = display_size(*source_hw)
    if shown_hw != source_hw:
        shown = source.resize((shown_hw[1], shown_hw[0]), DISPLAY_RESAMPLING)
    else:
        shown = source
    lines = caption_lines(row, threshold, threshold_source)
    if not warning:
        scaled = f", shown at {shown_hw[1]} x {shown_hw[0]} px" if shown_hw != source_hw else ""
        lines.append(f"{name}: {source_hw[1]} x {source_hw[0]} px{scaled}")
    mapped = heatmap_on_source(heatmap, source_hw, size, pad, output_hw=shown_hw)
    return render_panel(np.asarray(shown, np.uint8), mapped, lines, warning)


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


def write_gradcams(model: keras.Model, rows: list, gradcam_dir: str, batch_size: int, threshold: float = 0.5,
                   threshold_source: str = "", pad: bool = False,
                   max_file_bytes: int = int(imaging.DEFAULT_MAX_FILE_MB * (1 << 20))) -> list[str]:
    """One Grad-CAM panel PNG (`gradcam_panel`) per readable row, named by `gradcam_names`, into a
    folder claimed for cxr-predict (new, empty, or holding an earlier run's overlays; see
    output_safety.claim_folder). Returns the paths written.

    `threshold` and `threshold_source` (where it came from, e.g. "model's operating threshold")
    are those the rows' labels were given at; `pad` is the resize the rows' pixels were made with
    (True: letterbox); `max_file_bytes` limits the re-read of each source as it did the first read.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    names = gradcam_names(rows)
    output_safety.claim_folder("--gradcam_dir", gradcam_dir, PROGRAM, names, overwrite=None)
    layer = find_gradcam_layer(model)
    readable = [row for row in rows if row.pixels is not None]
    written = []
    for start in range(0, len(readable), batch_size):
        batch = readable[start:start + batch_size]
        heatmaps = gradcam_heatmaps(model, np.stack([row.pixels for row in batch]), layer)
        for row, heatmap, name in zip(batch, heatmaps, names[start:start + batch_size], strict=True):
            path = os.path.join(gradcam_dir, name)
            image = gradcam_panel(row, heatmap, threshold, threshold_source, pad, max_file_bytes)
            atomic.write_with(path, lambda tmp, image=image: image.save(tmp, format="PNG"), suffix=".png")
            written.append(path)
    return written
