"""Stored pixel values of a DICOM data set (cxr_tfdata.core.dicom): which decoder is installed, a
reduced-resolution decode where the codec offers one (JPEG 2000 levels, JPEG DCT scaling), else the
full decode; decoder messages are passed on scrubbed of identity. No TensorFlow here.
"""

from __future__ import annotations

import importlib.util
import io
import re

import numpy as np
from PIL import Image
from pydicom import uid as dcm_uid
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_j2k_parameters

from cxr_tfdata.core.dicom_display import DicomError

# PatientName, PatientID, PatientBirthDate, AccessionNumber, InstitutionName, ReferringPhysicianName,
# StudyDate, StudyTime, IssuerOfPatientID, OtherPatientIDs, StudyID: never quoted in a message.
_IDENTITY_TAGS = (0x00100010, 0x00100020, 0x00100030, 0x00080050, 0x00080080, 0x00080090,
                  0x00080020, 0x00080030, 0x00100021, 0x00101000, 0x00200010)
_UID_PATTERN = re.compile(r"^[0-9.]{1,64}$")

_J2K_SYNTAXES = (dcm_uid.JPEG2000Lossless, dcm_uid.JPEG2000)
# What to pip install when pydicom has no decoder for a transfer syntax (GPL packages are named
# last and marked: the project prefers not to require them).
_DECODER_PACKAGES = {
    dcm_uid.JPEGBaseline8Bit: "pillow or python-gdcm",
    dcm_uid.JPEGExtended12Bit: (
        "pillow or python-gdcm (8-bit); 12-bit needs pylibjpeg pylibjpeg-libjpeg (GPLv3)"
    ),
    dcm_uid.JPEGLossless: "python-gdcm (or pylibjpeg pylibjpeg-libjpeg, GPLv3)",
    dcm_uid.JPEGLosslessSV1: "python-gdcm (or pylibjpeg pylibjpeg-libjpeg, GPLv3)",
    dcm_uid.JPEGLSLossless: "pyjpegls or python-gdcm",
    dcm_uid.JPEGLSNearLossless: "pyjpegls or python-gdcm",
    dcm_uid.JPEG2000Lossless: "pylibjpeg pylibjpeg-openjpeg, or python-gdcm",
    dcm_uid.JPEG2000: "pylibjpeg pylibjpeg-openjpeg, or python-gdcm",
    dcm_uid.HTJ2KLossless: "pylibjpeg pylibjpeg-openjpeg",
    dcm_uid.HTJ2KLosslessRPCL: "pylibjpeg pylibjpeg-openjpeg",
    dcm_uid.HTJ2K: "pylibjpeg pylibjpeg-openjpeg",
    dcm_uid.RLELossless: "pylibjpeg pylibjpeg-rle (pydicom's own RLE decoder should already work)",
}



def _raw_text(ds: Dataset, tag: int) -> str | None:
    """An element's value as text without pydicom's value conversion (which would validate it and
    could warn with the value). None when absent or empty."""
    if tag not in ds:
        return None
    value = ds.get_item(tag).value
    if isinstance(value, (bytes, bytearray)):
        encodings = convert_encodings(ds.get("SpecificCharacterSet") or None)
        value = decode_bytes(bytes(value), encodings, set())
    text = str(value).strip(" \x00")
    return text or None


def _identity_values(ds: Dataset) -> list[str]:
    values = []
    for tag in _IDENTITY_TAGS:
        text = _raw_text(ds, tag)
        if text:
            values.extend([text, *(part for part in re.split(r"[\^=\s]+", text) if len(part) > 2)])
    return values


def _scrub(message: str, ds: Dataset) -> str:
    """A third-party message on one line, identity values removed, then at most 200 characters
    (cut after the removal, so a value straddling the cut cannot leave a prefix behind)."""
    message = " ".join(message.split())
    for value in sorted(_identity_values(ds), key=len, reverse=True):
        message = message.replace(value, "<redacted>")
    return message[:200]

def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise DicomError(f"invalid {keyword} value") from None


def _check_decoder(ds: Dataset, tsuid: dcm_uid.UID) -> None:
    """Refuses a transfer syntax no installed package decodes, naming what to pip install."""
    if not _UID_PATTERN.match(str(tsuid)):
        raise DicomError("invalid transfer syntax UID")
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError:
        raise DicomError(
            f"unsupported transfer syntax {tsuid.name}: no pydicom decoder exists"
        ) from None
    if not decoder.is_available:
        package = _DECODER_PACKAGES.get(tsuid, "a pydicom pixel data plugin")
        raise DicomError(f"no decoder installed for {tsuid.name}: pip install {package}")
    # python-gdcm and Pillow decode only 8-bit JPEG Extended; 12-bit needs libjpeg (GPL).
    if (
        tsuid == dcm_uid.JPEGExtended12Bit
        and _int(ds, "BitsStored", 8) > 8
        and importlib.util.find_spec("libjpeg") is None
    ):
        raise DicomError(
            "no decoder installed for 12-bit JPEG Extended: pip install pylibjpeg "
            "pylibjpeg-libjpeg (GPLv3)"
        )


# --- pixel decoding ------------------------------------------------------------------------------


def _reduction_steps(rows: int, columns: int, min_size: int | None, limit: int = 3) -> int:
    """How many halvings keep the smaller side >= min_size (0 without min_size), at most `limit`."""
    if not min_size:
        return 0
    steps, side = 0, min(rows, columns)
    while steps < limit and -(-side // (2 << steps)) >= min_size:
        steps += 1
    return steps


def _first_frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _j2k_levels(codestream: bytes) -> int:
    """Wavelet decomposition levels in a JPEG 2000 main header: the most reduction possible."""
    pos = 2  # after SOC
    while pos + 4 <= len(codestream):
        marker = codestream[pos : pos + 2]
        if marker == b"\xff\x52":  # COD: Lcod(2) Scod(1) SGcod(4), then the number of levels
            return codestream[pos + 9] if pos + 9 < len(codestream) else 0
        if marker in (b"\xff\x90", b"\xff\x93"):  # first tile: no COD in the main header
            return 0
        pos += 2 + int.from_bytes(codestream[pos + 2 : pos + 4], "big")
    return 0


def _decode_j2k_reduced(ds: Dataset, min_size: int) -> tuple[np.ndarray, int] | None:
    """Decodes only the needed JPEG 2000 resolution levels, with Pillow's OpenJPEG (None: cannot).

    pydicom's pylibjpeg-openjpeg path (2.6) has no resolution-reduction option, and pydicom would
    reshape the result to Rows x Columns, so the codestream is handed to Pillow instead.
    """
    frame = _first_frame(ds)
    params = get_j2k_parameters(frame)
    precision, signed = params.get("precision"), params.get("is_signed")
    # Only the plain case: the codestream agrees with the header (pydicom reconciles the rest).
    if precision != ds.BitsStored or bool(signed) != bool(ds.PixelRepresentation) or precision > 16:
        return None
    steps = min(_reduction_steps(ds.Rows, ds.Columns, min_size, limit=8), _j2k_levels(frame))
    if steps == 0:
        return None
    with Image.open(io.BytesIO(frame)) as image:
        image.reduce = steps  # Pillow's Jpeg2KImageFile: decode at 1 / 2**steps
        image.load()
        pixels = np.asarray(image)
    # Pillow scales samples to fill its 8- or 16-bit container and offsets signed ones to unsigned.
    container = 8 if precision <= 8 else 16
    values = pixels.astype(np.int32) >> (container - precision)
    if signed:
        values -= 1 << (precision - 1)
    return values, 1 << steps


def _decode_jpeg_draft(ds: Dataset, min_size: int) -> tuple[np.ndarray, int] | None:
    """Decodes an 8-bit baseline JPEG with libjpeg's DCT scaling (1/2, 1/4, 1/8): Pillow's draft."""
    if ds.BitsStored != 8 or _reduction_steps(ds.Rows, ds.Columns, min_size) == 0:
        return None
    with Image.open(io.BytesIO(_first_frame(ds))) as image:
        if image.mode != "L":
            return None
        image.draft("L", (min_size, min_size))  # keeps both sides >= min_size
        image.load()
        pixels = np.asarray(image)
    return pixels, max(1, round(ds.Columns / pixels.shape[1]))


def _decode_reduced(
    ds: Dataset, tsuid: dcm_uid.UID, min_size: int
) -> tuple[np.ndarray, int] | None:
    """A reduced-resolution decode where the codec offers one; None to decode in full instead."""
    try:
        if tsuid in _J2K_SYNTAXES:
            return _decode_j2k_reduced(ds, min_size)
        if tsuid == dcm_uid.JPEGBaseline8Bit:
            return _decode_jpeg_draft(ds, min_size)
    except (OSError, ValueError, SyntaxError, KeyError, IndexError, StopIteration):
        # An optimisation only: the full decode gives the authoritative answer (or refusal).
        return None
    return None


def _decode(ds: Dataset, tsuid: dcm_uid.UID, min_size: int | None) -> tuple[np.ndarray, int]:
    """(stored values [h, w], reduction factor); reduced only where the codec does it itself."""
    reduced = _decode_reduced(ds, tsuid, min_size) if min_size else None
    return reduced if reduced is not None else (_decode_full(ds), 1)


def _decode_full(ds: Dataset) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except (
        ValueError,
        RuntimeError,
        OSError,
        KeyError,
        IndexError,
        TypeError,
        StopIteration,
        NotImplementedError,
        AttributeError,
        EOFError,
    ) as e:
        reason = _scrub(str(e), ds)
        if "less than expected" in reason or isinstance(e, (EOFError, StopIteration)):
            raise DicomError(f"truncated DICOM pixel data: {reason}") from None
        raise DicomError(f"pixel data do not decode ({type(e).__name__}): {reason}") from None
    if pixels.ndim != 2:
        raise DicomError(
            f"decoded pixel array has shape {pixels.shape}, expected one grayscale frame"
        )
    return pixels

