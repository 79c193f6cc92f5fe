"""The serving graph and the converter on the formats they could read differently.

Transparent PNGs (alpha channel or tRNS), 16-bit PNGs and palette PNGs: the served pixels equal the
converter's (cxr_tfdata.core.imaging, what cxr-build-tfrecords, cxr-predict and Grad-CAM decode with).
CMYK JPEGs: TensorFlow cannot repeat PIL's CMYK conversion, so the serving graph refuses them with a
reason, never scoring them otherwise than cxr-predict.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cxr_tfdata.core import imaging
from cxr_tfdata.modeling import image_scoring, loading
from cxr_tfdata.serving import export, imaging_in_graph
from tests import eval_fixtures

_WIDTH, _HEIGHT = 40, 30


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(samples: np.ndarray, colour_type: int, bit_depth: int, palette: np.ndarray | None = None,
             transparency: bytes | None = None) -> bytes:
    """A PNG written byte by byte, for what Pillow does not write (16-bit colour and alpha, tRNS on gray/RGB)."""
    height, width = samples.shape[:2]
    rows = samples.reshape(height, width, -1).astype(">u2" if bit_depth == 16 else np.uint8)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    if palette is not None:
        png += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if transparency is not None:
        png += _chunk(b"tRNS", transparency)
    return png + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _pil_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _samples(channels: int, seed: int, high: int = 256) -> np.ndarray:
    shape = (_HEIGHT, _WIDTH) if channels == 1 else (_HEIGHT, _WIDTH, channels)
    return np.random.default_rng(seed).integers(0, high, shape)


def _palette_png(transparent: bool) -> bytes:
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 16, (_HEIGHT, _WIDTH), dtype=np.uint8), mode="P")
    image.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tobytes())
    if transparent:
        image.info["transparency"] = bytes(rng.integers(0, 256, 16, dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG", **({"transparency": image.info["transparency"]} if transparent else {}))
    return buf.getvalue()


# name -> (PNG bytes, does the converter composite it on black)
_PNGS = {
    "rgba": (_pil_png(Image.fromarray(_samples(4, 1).astype(np.uint8), mode="RGBA")), True),
    "gray_alpha": (_pil_png(Image.fromarray(_samples(2, 2).astype(np.uint8), mode="LA")), True),
    "rgba_16bit": (_raw_png(_samples(4, 3, 65536), 6, 16), True),
    "gray_alpha_16bit": (_raw_png(_samples(2, 4, 65536), 4, 16), True),
    "palette_trns": (_palette_png(transparent=True), True),
    "palette": (_palette_png(transparent=False), False),
    "gray_16bit": (_pil_png(Image.fromarray(_samples(1, 5, 65536).astype(np.uint16))), False),
    "rgb_16bit": (_raw_png(_samples(3, 6, 65536), 2, 16), False),
    "rgb": (_pil_png(Image.fromarray(_samples(3, 8).astype(np.uint8), mode="RGB")), False),
    # A tRNS colour on gray or RGB: PIL keeps mode L/RGB and the converter ignores it.
    "gray_trns": (_raw_png(_samples(1, 9), 0, 8, transparency=struct.pack(">H", 77)), False),
    "rgb_trns": (_raw_png(_samples(3, 10), 2, 8, transparency=struct.pack(">HHH", 1, 2, 3)), False),
    "gray_1bit": (_pil_png(Image.fromarray(_samples(1, 11, 2).astype(bool))), False),
}


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_samples(4, 12).astype(np.uint8), mode="CMYK").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(_PNGS))
@pytest.mark.parametrize("image_size, pad", [(16, False), (16, True), (48, False)])
def test_served_pixels_equal_the_converters(name, image_size, pad):
    data, _ = _PNGS[name]
    converter, _ = imaging.decode_and_resize(data, image_size, pad=pad)
    in_graph = imaging_in_graph.decode_image_bytes(tf.constant(data), image_size, pad=pad).numpy()
    np.testing.assert_array_equal(in_graph, converter.astype(np.float32))


@pytest.mark.parametrize("name", sorted(_PNGS))
def test_the_cases_are_not_trivial(name):
    """Each image really has what makes it a case: alpha changes the converter's pixels, a 16-bit
    image is 16-bit, and TensorFlow's own decode (what the graph used before) gives other pixels."""
    data, composited = _PNGS[name]
    converter = np.asarray(imaging.decode_grayscale(data))
    naive = tf.io.decode_image(data, channels=1, expand_animations=False).numpy()[..., 0]
    if composited:
        opaque = Image.open(io.BytesIO(data)).convert("RGBA").convert("RGB").convert("L")
        assert np.abs(converter.astype(int) - np.asarray(opaque)).max() > 50
    if name not in ("palette", "gray_trns", "gray_1bit"):
        assert not np.array_equal(converter, naive)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_every_value_and_alpha_composites_as_pil(mode):
    """All 256 x 256 (value, alpha) pairs, at the source size (the resize is then the identity)."""
    value, alpha = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    channels = [value, 255 - value, value // 3, alpha] if mode == "RGBA" else [value, alpha]
    data = _pil_png(Image.fromarray(np.stack(channels, axis=-1), mode=mode))
    converter, _ = imaging.decode_and_resize(data, 256)
    in_graph = imaging_in_graph.decode_image_bytes(tf.constant(data), 256).numpy()
    np.testing.assert_array_equal(in_graph, converter.astype(np.float32))


def test_every_16bit_gray_value_rounds_as_the_converter():
    data = _raw_png(np.arange(65536).reshape(256, 256), 0, 16)
    converter, _ = imaging.decode_and_resize(data, 256)
    in_graph = imaging_in_graph.decode_image_bytes(tf.constant(data), 256).numpy()
    np.testing.assert_array_equal(in_graph, converter.astype(np.float32))


def test_predict_reads_the_same_pixels(tmp_path):
    """cxr-predict (and Grad-CAM, through decode_grayscale) decode with the converter."""
    for name, (data, _) in _PNGS.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        predicted = image_scoring.load_image(str(path), 16, pad=False, record_encoding="png")
        in_graph = imaging_in_graph.decode_image_bytes(tf.constant(data), 16).numpy()
        np.testing.assert_array_equal(in_graph, predicted.astype(np.float32), err_msg=name)
        np.testing.assert_array_equal(np.asarray(imaging.decode_grayscale(data)).shape, (_HEIGHT, _WIDTH))


def test_cmyk_jpeg_decode_fails_in_graph_rather_than_differ():
    data = _cmyk_jpeg()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    imaging.decode_and_resize(data, 16)  # the converter reads it
    with pytest.raises(tf.errors.InvalidArgumentError):
        imaging_in_graph.decode_image_bytes(tf.constant(data), 16)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return loading.load_model(str(eval_fixtures.get_tiny_setup(tmp_path_factory).model_path))


@pytest.mark.parametrize("pad", [False, True])
def test_serving_scores_as_predict_or_refuses_with_the_reason(model, tmp_path, pad):
    size = loading.model_image_size(model)
    threshold = 0.5
    names = [*sorted(_PNGS), "cmyk"]
    paths = []
    for name in names:
        path = tmp_path / (f"{name}.jpeg" if name == "cmyk" else f"{name}.png")
        path.write_bytes(_cmyk_jpeg() if name == "cmyk" else _PNGS[name][0])
        paths.append(str(path))
    rows = image_scoring.predict_rows(model, paths, size, pad=pad, threshold=threshold, batch_size=4,
                                      record_encoding="png")
    module = export.ServingModule(model, pad=pad, threshold=threshold)
    served = {key: value.numpy() for key, value in
              module.serve(tf.constant([Path(p).read_bytes() for p in paths])).items()}
    for i, (name, row) in enumerate(zip(names, rows, strict=True)):
        error = served[export.ERROR_KEY][i].decode()
        if name == "cmyk":
            assert row.error == "" and row.probability is not None, "cxr-predict scores a CMYK JPEG"
            assert error == imaging_in_graph.CMYK_REASON
            assert np.isnan(served[export.OUTPUT_KEY][i]) and served[export.LABEL_KEY][i] == b""
            continue
        assert error == "" and row.error == "", (name, error, row.error)
        np.testing.assert_allclose(served[export.OUTPUT_KEY][i], row.probability, atol=1e-5, err_msg=name)
        assert served[export.LABEL_KEY][i].decode() == row.label, name
