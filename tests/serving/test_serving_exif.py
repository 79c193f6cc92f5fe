"""The serving graph applies a JPEG's EXIF orientation as the converter does (ImageOps.exif_transpose
after the draft decode, before the resize), so a rotated or mirrored JPEG gets the converter's pixels
and cxr-predict's score; an orientation the graph cannot read as PIL does is refused with a reason.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from cxr_tfdata.modeling import image_scoring, loading
from cxr_tfdata.serving import export, imaging_in_graph
from tests import eval_fixtures

_WIDTH, _HEIGHT = 90, 52  # not square, large enough for a reduced DCT scale at 16 px
_ORIENTATIONS = range(1, 9)


def _source() -> Image.Image:
    """An image with no symmetry: a gradient, noise and a bright block in one corner."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:_HEIGHT, 0:_WIDTH]
    pixels = (x * 2 + y + rng.integers(0, 40, (_HEIGHT, _WIDTH))).clip(0, 255).astype(np.uint8)
    pixels[:12, :20] = 250
    return Image.fromarray(pixels, mode="L")


def _tiff(entries: list[tuple[int, int, int, bytes]], big_endian: bool) -> bytes:
    """A TIFF header and IFD0 of (tag, type, count, 4 value bytes) entries, as APP1 "Exif" carries it."""
    order = ">" if big_endian else "<"
    body = (b"MM\0*" if big_endian else b"II*\0") + struct.pack(order + "IH", 8, len(entries))
    for tag, kind, count, value in entries:
        body += struct.pack(order + "HHI", tag, kind, count) + value
    return b"Exif\0\0" + body + struct.pack(order + "I", 0)


def _jpeg(exif: bytes | None = None, xmp: bytes | None = None, mode: str = "L") -> bytes:
    image = _source().convert(mode)
    options = {"quality": 90}
    if exif is not None:
        options["exif"] = exif
    if xmp is not None:
        options["xmp"] = xmp
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **options)
    return buf.getvalue()


def _oriented(orientation: int, big_endian: bool = False, mode: str = "L") -> bytes:
    if not big_endian:
        exif = Image.Exif()
        exif[0x0112] = orientation
        exif[0x010F] = "cxr-tfdata test"  # a second IFD0 entry, so the walk has to find the tag
        return _jpeg(exif.tobytes(), mode=mode)
    value = struct.pack(">HH", orientation, 0)
    return _jpeg(_tiff([(0x010F, 2, 4, b"cxr\0"), (0x0112, 3, 1, value)], big_endian=True), mode=mode)


def _predict_pixels(tmp_path: Path, data: bytes, image_size: int, pad: bool) -> np.ndarray:
    path = tmp_path / "image.jpeg"
    path.write_bytes(data)
    return image_scoring.load_image(str(path), image_size, pad, record_encoding="png").astype(np.float32)


def _in_graph(data: bytes, image_size: int, pad: bool) -> np.ndarray:
    return imaging_in_graph.decode_image_bytes(tf.constant(data), image_size, pad=pad).numpy()


@pytest.mark.parametrize("orientation", _ORIENTATIONS)
@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("image_size, pad", [(16, False), (16, True), (40, True), (48, False)])
def test_served_pixels_equal_the_converters_for_each_orientation(tmp_path, orientation, big_endian, image_size, pad):
    data = _oriented(orientation, big_endian)
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == orientation
    orientation_in_graph, readable = imaging_in_graph.exif_orientation(tf.constant(data))
    assert int(orientation_in_graph) == orientation and bool(readable)
    np.testing.assert_array_equal(_in_graph(data, image_size, pad), _predict_pixels(tmp_path, data, image_size, pad))


@pytest.mark.parametrize("orientation", _ORIENTATIONS)
def test_the_transpose_is_pils(orientation):
    """At full size (no resize) the in-graph transpose is ImageOps.exif_transpose to the pixel."""
    data = _oriented(orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    decoded = tf.io.decode_jpeg(data, channels=1, dct_method="INTEGER_ACCURATE")
    transposed = imaging_in_graph._transposed(decoded, tf.constant(orientation)).numpy()[..., 0]
    np.testing.assert_array_equal(transposed, expected)
    if orientation != 1:  # the cases are not trivial: the orientation changes the served pixels
        assert not np.array_equal(_in_graph(data, 16, True), _in_graph(_oriented(1), 16, True))


def test_colour_jpeg_and_xmp_orientation(tmp_path):
    colour = _oriented(6, mode="RGB")
    np.testing.assert_array_equal(_in_graph(colour, 16, True), _predict_pixels(tmp_path, colour, 16, True))
    # PIL reads an XMP tiff:Orientation when the EXIF has none.
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description '
           b'tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>')
    for data in (_jpeg(xmp=xmp), _jpeg(exif=Image.Exif().tobytes() or None, xmp=xmp)):
        assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (_HEIGHT, _WIDTH)
        assert int(imaging_in_graph.exif_orientation(tf.constant(data))[0]) == 8
        np.testing.assert_array_equal(_in_graph(data, 16, True), _predict_pixels(tmp_path, data, 16, True))
    # The EXIF's orientation wins over the XMP's, as in PIL.
    both = _jpeg(exif=_oriented_exif(3), xmp=xmp)
    assert int(imaging_in_graph.exif_orientation(tf.constant(both))[0]) == 3
    np.testing.assert_array_equal(_in_graph(both, 16, False), _predict_pixels(tmp_path, both, 16, False))


def _oriented_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_png_and_plain_jpeg_are_upright():
    buf = io.BytesIO()
    _source().save(buf, format="PNG")
    for data in (buf.getvalue(), _jpeg()):
        orientation, readable = imaging_in_graph.exif_orientation(tf.constant(data))
        assert int(orientation) == 1 and bool(readable)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return loading.load_model(str(eval_fixtures.get_tiny_setup(tmp_path_factory).model_path))


@pytest.mark.parametrize("pad", [False, True])
def test_serving_scores_each_orientation_as_predict(model, tmp_path, pad):
    size = loading.model_image_size(model)
    threshold = 0.5
    paths = []
    for orientation in _ORIENTATIONS:
        for big_endian in (False, True):
            path = tmp_path / f"o{orientation}_{'mm' if big_endian else 'ii'}.jpeg"
            path.write_bytes(_oriented(orientation, big_endian))
            paths.append(str(path))
    # An orientation stored as a LONG: PIL may read it, the graph does not try; it is refused.
    odd = tmp_path / "long.jpeg"
    odd.write_bytes(_jpeg(_tiff([(0x0112, 4, 1, struct.pack("<I", 6))], big_endian=False)))
    paths.append(str(odd))
    rows = image_scoring.predict_rows(model, paths, size, pad=pad, threshold=threshold, batch_size=4,
                                      record_encoding="png")
    module = export.ServingModule(model, pad=pad, threshold=threshold)
    served = {key: value.numpy() for key, value in
              module.serve(tf.constant([Path(p).read_bytes() for p in paths])).items()}
    for i, (path, row) in enumerate(zip(paths, rows, strict=True)):
        error = served[export.ERROR_KEY][i].decode()
        if path == str(odd):
            assert error == imaging_in_graph.UNREADABLE_ORIENTATION_REASON
            assert np.isnan(served[export.OUTPUT_KEY][i]) and served[export.LABEL_KEY][i] == b""
            continue
        assert error == "" and row.error == "", (path, error, row.error)
        np.testing.assert_allclose(served[export.OUTPUT_KEY][i], row.probability, atol=1e-5, err_msg=path)
        assert served[export.LABEL_KEY][i].decode() == row.label, path
    upright = served[export.OUTPUT_KEY][0]
    assert any(abs(p - upright) > 1e-6 for p in served[export.OUTPUT_KEY][2:-1]), "orientation changes the score"


@pytest.mark.parametrize("width, height, out_width, out_height", [
    (26, 45, 16, 16), (52, 90, 16, 16), (140, 103, 118, 13), (172, 132, 89, 18), (99, 100, 16, 16), (30, 20, 64, 8)])
def test_resize_passes_run_in_pillows_order(width, height, out_width, out_height):
    """A portrait image (as orientations 5..8 make one) is resized vertical pass first by Pillow 13 when
    its height shrinks by more than twice as many rows as its width: the graph follows that order."""
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width)).astype(np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((out_width, out_height), Image.Resampling.BILINEAR))
    in_graph = imaging_in_graph._resize_rounded(tf.constant(pixels[..., None]), out_height, out_width).numpy()
    np.testing.assert_array_equal(in_graph[..., 0], expected.astype(np.float32))


def _png(exif: bytes | None = None, info=None) -> bytes:
    buf = io.BytesIO()
    options = {"pnginfo": info} if info is not None else {}
    if exif is not None:
        options["exif"] = exif
    _source().save(buf, format="PNG", **options)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", _ORIENTATIONS)
def test_png_exif_chunk_orientation(tmp_path, orientation):
    """PIL applies a PNG's eXIf orientation too (the converter and cxr-predict rotate the PNG)."""
    data = _png(_oriented_exif(orientation))
    assert b"eXIf" in data
    got, readable = imaging_in_graph.exif_orientation(tf.constant(data))
    assert int(got) == orientation and bool(readable)
    for image_size, pad in ((16, False), (40, True)):
        path = tmp_path / "image.png"
        path.write_bytes(data)
        expected = image_scoring.load_image(str(path), image_size, pad, record_encoding="png").astype(np.float32)
        np.testing.assert_array_equal(_in_graph(data, image_size, pad), expected)


def test_png_metadata_the_graph_cannot_read_is_refused():
    from PIL import PngImagePlugin

    profile = PngImagePlugin.PngInfo()
    profile.add_text("Raw profile type exif", "\nexif\n      10\n45786966000049492a00\n", zip=True)
    compressed_xmp = PngImagePlugin.PngInfo()
    compressed_xmp.add_itxt("XML:com.adobe.xmp", '<x tiff:Orientation="6"/>', zip=True)
    plain_xmp = PngImagePlugin.PngInfo()
    plain_xmp.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta/>")
    for data, readable in ((_png(info=profile), False), (_png(info=compressed_xmp), False),
                           (_png(info=plain_xmp), True), (_png(_oriented_exif(6), info=profile), True)):
        assert bool(imaging_in_graph.exif_orientation(tf.constant(data))[1]) is readable
