"""Decode any source image once, make it 8-bit grayscale at the target size, and encode it.

Resize method: PIL's antialiased bilinear filter (its support widens with the downscale factor)
applied to a reduced-scale JPEG draft. For JPEG sources, PIL's draft mode lets libjpeg do the
first power-of-two reduction inside the inverse DCT (scale 1/2, 1/4 or 1/8, never below the
target size), which skips most of the decode work for 2000+ px radiographs.
A DICOM (recognised by content) is decoded by cxr_tfdata.core.dicom to 8-bit display pixels, at
reduced resolution for JPEG 2000 and baseline JPEG, then resized like any other image.
`tf.image.resize(method="bilinear", antialias=True)` approximates the same filter in-graph.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

# The one definition of the build settings that readers must repeat (cxr-build-tfrecords,
# cxr-predict and cxr-export all import these).
ENCODINGS = ("jpeg", "png")
RESIZE_MODES = ("squash", "pad")  # squash: stretch to a square; pad: letterbox on black
DEFAULT_ENCODING = "jpeg"
DEFAULT_RESIZE = "squash"
DEFAULT_JPEG_QUALITY = 95
# Limits on what is read and decoded, shared by the converter, cxr-predict and the serving export.
# A source file larger than this is not read (radiographs are a few MB; the cap keeps a stray
# video or disk image from filling memory).
DEFAULT_MAX_FILE_MB = 256.0
# Pillow's decompression-bomb limit (about 9459 x 9459): a header announcing more pixels is refused
# before any pixel is decoded.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
# A decoded image whose pixel standard deviation is below this many grey levels is near-constant:
# blank, or a JPEG whose header is intact but whose scan data is damaged (libjpeg decodes that
# "successfully" as flat grey). Radiographs have standard deviations of tens of grey levels.
NEAR_CONSTANT_STD = 2.0

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_DICOM_MAGIC_OFFSET = 128  # "DICM" follows a DICOM file's 128-byte preamble
DICOM_HEADER_BYTES = _DICOM_MAGIC_OFFSET + 4  # the bytes is_dicom needs to see
# DICOM View Position (0018,5101) defined terms (PS3.3 C.8.11.5.1.1): what cxr-build-tfrecords --views takes.
DICOM_VIEW_POSITIONS = ("AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO")


class ImageError(ValueError):
    """A source file that cannot be used as an image; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How every image is resized and stored."""

    image_size: int = 224
    pad: bool = False  # True: aspect-preserving letterbox on black; False: squash to a square
    encoding: str = DEFAULT_ENCODING
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    max_file_bytes: int = int(DEFAULT_MAX_FILE_MB * (1 << 20))

    def __post_init__(self):
        # The supported range (cxr_tfdata.core.config.MIN/MAX_IMAGE_SIZE) is checked by BuildConfig:
        # importing features here would load TensorFlow into every converter worker.
        if self.image_size < 1:
            raise ValueError(f"--image_size: must be >= 1, got {self.image_size}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"--encoding: must be one of {ENCODINGS}, got {self.encoding!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg_quality: must be in [1, 100], got {self.jpeg_quality}")


@dataclasses.dataclass(frozen=True)
class ConvertedImage:
    """One source image after decode, resize and encode."""

    encoded: bytes
    original_height: int
    original_width: int
    pixel_std: float  # of the resized pixels; below NEAR_CONSTANT_STD the image is near-constant
    # DICOM sources only, for the manifest: {"view_position": (0018,5101) or "", "voi_fallback": bool}.
    dicom: dict | None = None


_KIND_OF_MODE = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _check_regular(mode: int, size: int, max_bytes: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KIND_OF_MODE if test(mode)), "not a regular file")
        raise ImageError(f"{kind}, not a regular file: not read")
    if size > max_bytes:
        raise ImageError(f"file of {size / (1 << 20):.1f} MB is larger than the {max_bytes / (1 << 20):g} MB "
                         f"limit: not read")


def read_source(path: str, max_bytes: int = int(DEFAULT_MAX_FILE_MB * (1 << 20))) -> bytes:
    """The bytes of a regular file (symbolic links followed), at most max_bytes.

    FIFOs, sockets, devices and folders are refused from their metadata, before they are opened
    (so a FIFO never blocks and /dev/zero is never read), and again on the opened descriptor, in
    case the path changed in between. Raises ImageError with the reason.
    """
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise ImageError("broken symbolic link" if os.path.islink(path) else "no such file") from None
    except OSError as e:
        raise ImageError(f"unreadable file: {e.strerror or e}") from e
    _check_regular(before.st_mode, before.st_size, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageError(f"unreadable file: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as f:
        opened = os.fstat(fd)
        _check_regular(opened.st_mode, opened.st_size, max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError(f"file grew past the {max_bytes / (1 << 20):g} MB limit while being read: not read")
    return data


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file, recognised by its content ("DICM" at byte 128), whatever its name."""
    return data[_DICOM_MAGIC_OFFSET:DICOM_HEADER_BYTES] == b"DICM"


def _open_dicom(data: bytes, draft_size: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """A DICOM through cxr_tfdata.core.dicom (pixel data, Modality LUT, VOI, MONOCHROME1, 8 bits),
    at reduced resolution where the codec allows (JPEG 2000 levels, JPEG DCT scaling)."""
    try:
        from cxr_tfdata.core import dicom  # pydicom is the optional [dicom] extra
    except ImportError:
        raise ImageError('DICOM file, but the DICOM reader is not installed: '
                         'pip install "cxr-tfdata[dicom]"') from None
    try:
        read = dicom.read_dicom(data, min_size=draft_size)
    except dicom.DicomError as e:
        raise ImageError(str(e)) from None
    image = read.image()
    image.info["dicom"] = {"view_position": read.view_position, "voi_fallback": read.voi_fallback}
    return image, (read.columns, read.rows)


def _open(data: bytes, draft_size: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """Opens and fully decodes the first frame; returns the image and its stored (width, height)."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    if is_dicom(data):
        return _open_dicom(data, draft_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        stored_size = image.size
        if stored_size[0] * stored_size[1] > MAX_IMAGE_PIXELS:
            raise ImageError(f"image too large: {stored_size[0]}x{stored_size[1]} pixels, more than the "
                             f"{MAX_IMAGE_PIXELS} pixel limit; not decoded")
        if draft_size and image.format == "JPEG":
            # Mode "L" makes libjpeg emit luma only for colour JPEGs; the size request keeps
            # every side >= draft_size, so the final resize still only shrinks.
            image.draft("L", (draft_size, draft_size))
        image.load()
    except Image.UnidentifiedImageError as e:
        raise ImageError("not a recognised image format") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own message names its error limit (twice ours); say ours, as every other refusal does.
        announced = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(announced.group(1))} pixels, " if announced else ""
        raise ImageError(f"image too large: {size}more than the {MAX_IMAGE_PIXELS} pixel limit; not decoded") from e
    except OSError as e:
        raise ImageError(f"corrupt or truncated image: {e}") from e
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError) as e:
        # Malformed headers surface from PIL's plugins as any of these.
        raise ImageError(f"corrupt image: {type(e).__name__}: {e}") from e
    if stored_size[0] < 1 or stored_size[1] < 1:
        raise ImageError(f"image has no pixels ({stored_size[0]}x{stored_size[1]})")
    return image, stored_size


def _orient(image: Image.Image, stored_size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Applies the EXIF orientation; returns the image and the original (height, width) as seen."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as e:
        raise ImageError(f"unreadable EXIF data: {e}") from e
    width, height = stored_size
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return image, (height, width)


def to_grayscale(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit "L": 16-bit scaled by 1/257, alpha composited on black."""
    if image.mode == "L":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Full 16-bit range to 8-bit: 65535 -> 255 (PIL's own conversion clips instead).
        pixels = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(pixels) * scale), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    try:
        return image.convert("L")
    except ValueError:
        # Modes without a direct path to L (e.g. LAB, HSV) go through RGB.
        return image.convert("RGB").convert("L")


def letterbox_box(width: int, height: int, image_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a width x height image letterboxed into image_size x image_size:
    scaled to fit, aspect ratio kept, centred; the rest is black bars."""
    scale = image_size / max(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (image_size - new_width) // 2, (image_size - new_height) // 2
    return left, top, left + new_width, top + new_height


def resize(image: Image.Image, image_size: int, pad: bool) -> Image.Image:
    """Squashes to image_size x image_size, or letterboxes on black keeping the aspect ratio."""
    if not pad:
        return image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    left, top, right, bottom = letterbox_box(*image.size, image_size)
    canvas = Image.new("L", (image_size, image_size), 0)
    canvas.paste(image.resize((right - left, bottom - top), Image.Resampling.BILINEAR), (left, top))
    return canvas


def decode_and_resize(
    data: bytes, image_size: int, pad: bool = False, draft: bool = True
) -> tuple[np.ndarray, tuple[int, int]]:
    """Source bytes -> (uint8 [S, S, 1] pixels, original (height, width) after EXIF orientation).

    Raises ImageError with the reason for empty, corrupt, truncated or non-image input.
    draft=False decodes JPEGs at full resolution (to measure what draft mode changes).
    """
    pixels, original_hw, _ = _decode_resize(data, image_size, pad, draft)
    return pixels, original_hw


def _decode_resize(data: bytes, image_size: int, pad: bool,
                   draft: bool) -> tuple[np.ndarray, tuple[int, int], dict | None]:
    """decode_and_resize, plus a DICOM's facts for the manifest (None for other formats)."""
    image, stored_size = _open(data, image_size if draft else None)
    facts = image.info.get("dicom")
    image, original_hw = _orient(image, stored_size)
    image = resize(to_grayscale(image), image_size, pad)
    return np.asarray(image, dtype=np.uint8)[..., None], original_hw, facts


def decode_grayscale(data: bytes) -> Image.Image:
    """Source bytes -> the whole image as 8-bit grayscale ("L"), EXIF orientation applied, not resized.

    The decode of `decode_and_resize` at full resolution (no JPEG draft), for drawing on the source
    as it is (cxr-predict's Grad-CAM). Raises ImageError with the reason, as decode_and_resize does.
    """
    image, stored_size = _open(data, None)
    image, _ = _orient(image, stored_size)
    return to_grayscale(image)


def encode(pixels: np.ndarray, encoding: str, jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """uint8 [H, W, 1] or [H, W] -> single-channel JPEG or PNG bytes."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    array = np.asarray(pixels, dtype=np.uint8)
    if array.ndim == 3:
        array = array[..., 0]
    buf = io.BytesIO()
    if encoding == "jpeg":
        Image.fromarray(array, mode="L").save(buf, format="JPEG", quality=jpeg_quality)
    else:
        Image.fromarray(array, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_encoded(encoded: bytes) -> np.ndarray:
    """Encoded record image -> uint8 [H, W, 1] (for checks; the training pipeline decodes in-graph)."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.load()
            return np.asarray(to_grayscale(image), dtype=np.uint8)[..., None]
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"record image does not decode: {e}") from e


def convert(data: bytes, options: EncodeOptions) -> ConvertedImage:
    """The whole per-image job: decode, orient, grayscale, resize, encode."""
    pixels, (height, width), dicom_facts = _decode_resize(data, options.image_size, options.pad, True)
    return ConvertedImage(
        encoded=encode(pixels, options.encoding, options.jpeg_quality),
        original_height=height,
        original_width=width,
        pixel_std=float(np.std(pixels)),
        dicom=dicom_facts,
    )
