"""Decode/resize/encode of every kind of source image, and the reasons given for bad ones."""

import io

import numpy as np
import pytest
from PIL import Image

from cxr_tfdata.core import imaging
from cxr_tfdata.modeling import feeding
from tests.helpers import SHARED_DATA, requires_shared_data


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _gradient(height=48, width=64) -> np.ndarray:
    return (np.add.outer(np.arange(height) * 2, np.arange(width)) % 256).astype(np.uint8)


def test_png_round_trip_is_exact():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 1), dtype=np.uint8)
    encoded = imaging.encode(pixels, "png")
    np.testing.assert_array_equal(imaging.decode_encoded(encoded), pixels)
    decoded, original = imaging.decode_and_resize(encoded, 32)  # same size: resize is the identity
    np.testing.assert_array_equal(decoded, pixels)
    assert original == (32, 32)


def test_jpeg_output_is_single_channel_and_close():
    pixels = np.repeat(_gradient(32, 32)[..., None], 1, axis=-1)
    encoded = imaging.encode(pixels, "jpeg", jpeg_quality=95)
    assert Image.open(io.BytesIO(encoded)).mode == "L"
    assert np.abs(imaging.decode_encoded(encoded).astype(int) - pixels).mean() < 3


def test_rgb_rgba_cmyk_and_16bit_become_8bit_gray():
    gray = _gradient()
    rgb = Image.fromarray(np.stack([gray] * 3, -1))
    rgba = Image.fromarray(np.dstack([np.stack([gray] * 3, -1), np.full_like(gray, 255)]))
    sources = {
        "rgb_jpeg": _save(rgb, "JPEG", quality=98),
        "rgba_png": _save(rgba, "PNG"),
        "cmyk_jpeg": _save(rgb.convert("CMYK"), "JPEG", quality=98),
        "i16_png": _save(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        "palette_png": _save(Image.fromarray(gray).convert("P"), "PNG"),
    }
    assert Image.open(io.BytesIO(sources["i16_png"])).mode.startswith("I")
    for name, data in sources.items():
        pixels, original = imaging.decode_and_resize(data, 64, draft=False)
        assert pixels.shape == (64, 64, 1) and pixels.dtype == np.uint8, name
        assert original == (48, 64), name
        expected = np.asarray(Image.fromarray(gray).resize((64, 64), Image.Resampling.BILINEAR))
        assert np.abs(pixels[..., 0].astype(int) - expected).mean() < 4, name


def test_16bit_scaling_uses_full_range():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    pixels, _ = imaging.decode_and_resize(_save(Image.fromarray(ramp), "PNG"), 64)
    np.testing.assert_array_equal(pixels[..., 0], np.rint(ramp / 257.0).astype(np.uint8))


def test_rgba_transparent_pixels_are_black():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:8, :, 3] = 255  # top half opaque, bottom half fully transparent
    pixels, _ = imaging.decode_and_resize(_save(Image.fromarray(rgba), "PNG"), 16)
    assert pixels[:8].min() == 200 and pixels[8:].max() == 0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt):
    stored = np.zeros((20, 40), np.uint8)
    stored[:, :20] = 255  # left half white as stored
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise: left half becomes the top
    pixels, original = imaging.decode_and_resize(_save(image, fmt, exif=exif.tobytes()), 16)
    assert original == (40, 20)
    assert pixels[:6].mean() > 200 and pixels[10:].mean() < 50


def test_pad_keeps_aspect_ratio_on_black():
    wide = np.full((50, 100), 255, np.uint8)
    pixels, original = imaging.decode_and_resize(_save(Image.fromarray(wide), "PNG"), 20, pad=True)
    assert original == (50, 100)
    assert pixels[:5].max() == 0 and pixels[15:].max() == 0 and pixels[6:14].min() == 255


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not an image\n" * 10, "not a recognised image"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not a recognised image|corrupt"),
    ],
)
def test_bad_input_raises_image_error_with_reason(data, reason):
    with pytest.raises(imaging.ImageError, match=reason):
        imaging.decode_and_resize(data, 32)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_rejected(fmt):
    noisy = np.random.default_rng(1).integers(0, 256, (200, 200), dtype=np.uint8)
    data = _save(Image.fromarray(noisy), fmt)
    with pytest.raises(imaging.ImageError, match="truncated|corrupt"):
        imaging.decode_and_resize(data[: len(data) // 2], 32)


def test_convert_returns_original_size_and_encoded_image():
    data = _save(Image.fromarray(_gradient()), "PNG")
    result = imaging.convert(data, imaging.EncodeOptions(image_size=32, encoding="png"))
    assert (result.original_height, result.original_width) == (48, 64)
    assert imaging.decode_encoded(result.encoded).shape == (32, 32, 1)


def test_options_name_the_bad_flag():
    with pytest.raises(ValueError, match="--encoding"):
        imaging.EncodeOptions(encoding="webp")
    with pytest.raises(ValueError, match="--jpeg_quality"):
        imaging.EncodeOptions(jpeg_quality=0)


@requires_shared_data
def test_draft_decoding_is_close_to_full_decoding_on_real_images():
    paths = sorted((SHARED_DATA / "chest_xray_orig" / "train" / "PNEUMONIA").glob("*.jpeg"))[:4]
    for path in paths:
        data = path.read_bytes()
        fast, shape_fast = imaging.decode_and_resize(data, 224)
        full, shape_full = imaging.decode_and_resize(data, 224, draft=False)
        assert shape_fast == shape_full
        # Measured 0.75 grey levels on average over 40 originals (at most 2.5).
        assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3.0, path.name


def test_build_settings_have_one_definition_that_every_tool_uses():
    from tfrecords_builder import build

    assert imaging.ENCODINGS == ("jpeg", "png") and imaging.RESIZE_MODES == ("squash", "pad")
    options, config = imaging.EncodeOptions(), build.BuildConfig(input_dir="in", output_dir="out")
    assert options.jpeg_quality == config.jpeg_quality == imaging.DEFAULT_JPEG_QUALITY
    assert options.encoding == config.encoding == imaging.DEFAULT_ENCODING
    assert config.resize == imaging.DEFAULT_RESIZE
    # A reader given no flag and a model without a contract falls back to the converter's defaults.
    assert feeding.RecordSettings() == feeding.RecordSettings(
        imaging.DEFAULT_RESIZE, imaging.DEFAULT_ENCODING, imaging.DEFAULT_JPEG_QUALITY)


def test_image_size_bounds_are_the_ones_the_trainer_accepts():
    from cxr_tfdata.core import config as cxr_config
    from tfrecords_builder import build

    for size in (cxr_config.MIN_IMAGE_SIZE, 224, cxr_config.MAX_IMAGE_SIZE):
        assert build.BuildConfig(input_dir="in", output_dir="out", image_size=size).image_size == size
    for size in (8, cxr_config.MIN_IMAGE_SIZE - 1, cxr_config.MAX_IMAGE_SIZE + 1, 4096):
        with pytest.raises(ValueError, match=r"--image_size: must be in \[32, 1024\]"):
            build.BuildConfig(input_dir="in", output_dir="out", image_size=size)
    with pytest.raises(ValueError, match="--image_size"):
        imaging.EncodeOptions(image_size=0)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height (its pixel data is never reached)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 20_000])  # above our limit, and above Pillow's own error limit (2x)
def test_every_bomb_is_refused_naming_the_one_limit(side):
    with pytest.raises(imaging.ImageError) as refused:
        imaging.decode_and_resize(_png_header(side, side), 32)
    message = str(refused.value)
    assert f"more than the {imaging.MAX_IMAGE_PIXELS} pixel limit" in message
    assert str(2 * imaging.MAX_IMAGE_PIXELS) not in message
