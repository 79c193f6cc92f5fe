"""Reads one grayscale DICOM radiograph into 8-bit display pixels, or refuses it with a reason.

Display order (DICOM PS3.3 C.11 and PS3.4 N.2): stored pixels are decoded (native, RLE, JPEG,
JPEG-LS, JPEG 2000), then the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence),
then the first VOI transform (Window Center/Width with its VOI LUT Function, else a VOI LUT
Sequence, else a flagged fallback window), then MONOCHROME1 (or a Presentation LUT Shape of
INVERSE) is inverted, then the result is rounded to 8 bits. The output plugs into the converter's
resize step like a decoded JPEG: an 8-bit grayscale image at full or power-of-two reduced size.

Identity: PatientName, PatientID, birth date, accession number, institution and referring
physician are never put in an exception message, a warning or the returned metadata. Third-party
exception text is only passed on from the pixel decoders, and scrubbed of those values first.
`read_source_ids` returns PatientID and StudyInstanceUID raw, for the caller to HMAC before
anything is written.

No TensorFlow here: converter worker processes import this module. The work is split by job:
dicom_decode.py (stored values, decoders) and dicom_display.py (Modality LUT, VOI, polarity).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import stat
import struct
import threading
import warnings

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr_tfdata.core import imaging
from cxr_tfdata.core.dicom_decode import _UID_PATTERN, _check_decoder, _decode, _int, _raw_text
from cxr_tfdata.core.dicom_display import (  # noqa: F401  (re-exported: the module's public names)
    FALLBACK_PERCENTILES,
    VOI_FALLBACK,
    VOI_LUT,
    VOI_WINDOW,
    DicomError,
    _display,
    _inverted,
    window,
)

HEADER_BYTES = imaging.DICOM_HEADER_BYTES  # what is_dicom needs to see: the preamble and "DICM"
# The same decompression-bomb limit as the converter's imaging module (Pillow's, ~9459 x 9459).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS

_VIEW_POSITIONS = ("AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO")  # PS3.3 C.8.11.5.1.1
_PHOTOMETRICS = (
    "MONOCHROME1",
    "MONOCHROME2",
    "PALETTE COLOR",
    "RGB",
    "HSV",
    "ARGB",
    "CMYK",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
    "XYB",
)
# Words in a SOP class name (pydicom's UID dictionary) that mark an object with no picture.
_NON_IMAGE_CLASSES = (
    "SR Storage",
    "Presentation State",
    "Key Object Selection",
    "Encapsulated",
    "Raw Data",
    "Waveform",
    "Structured Report",
)
_PATIENT_ID, _STUDY_UID = 0x00100020, 0x0020000D


@dataclasses.dataclass(frozen=True)
class DicomImage:
    """One decoded radiograph and the non-identifying facts a manifest may record about it."""

    pixels: (
        np.ndarray
    )  # uint8 [h, w]: display values, 0 = black; h, w are rows, columns / reduction
    rows: int  # stored size, before any reduced-resolution decode
    columns: int
    reduction: int  # 1 = full resolution; 2, 4, 8...: the decoder skipped that much detail
    photometric_interpretation: str  # MONOCHROME1 or MONOCHROME2 (already inverted to 0 = black)
    inverted: bool  # MONOCHROME1, or MONOCHROME2 with Presentation LUT Shape INVERSE
    bits_stored: int
    transfer_syntax: (
        str  # pydicom's name for it, e.g. "JPEG 2000 Image Compression (Lossless Only)"
    )
    transfer_syntax_uid: str
    view_position: (
        str  # (0018,5101) a defined term (AP, PA, LL, RL, ...); "" when absent, "other" otherwise
    )
    voi: str  # VOI_WINDOW, VOI_LUT or VOI_FALLBACK
    voi_function: (
        str  # LINEAR, LINEAR_EXACT or SIGMOID for a window; "LUT"; "PERCENTILE" for the fallback
    )

    @property
    def voi_fallback(self) -> bool:
        """True when the file had no usable VOI and got the fallback window (for the manifest)."""
        return self.voi == VOI_FALLBACK

    def image(self) -> Image.Image:
        """The pixels as a PIL "L" image, ready for the converter's resize."""
        return Image.fromarray(self.pixels, mode="L")


@dataclasses.dataclass(frozen=True)
class SourceIds:
    """Identifiers for grouping images by patient. Raw identity: HMAC them, never write or log them.

    The repr shows only whether each is present, so a stray print or log line leaks nothing.
    """

    patient_id: str | None = dataclasses.field(repr=False)
    study_instance_uid: str | None = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return (
            f"SourceIds(patient_id={'<set>' if self.patient_id else None}, "
            f"study_instance_uid={'<set>' if self.study_instance_uid else None})"
        )


# --- keeping pydicom quiet while a file is read -------------------------------------------------

_reading = threading.local()


class _DropWhileReading(logging.Filter):
    """Drops pydicom's log records emitted inside this module's reads: pydicom's value-validation
    messages quote element values, which could be identity."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_reading, "depth", 0)


logging.getLogger("pydicom").addFilter(_DropWhileReading())


@contextlib.contextmanager
def _quiet():
    """No pydicom warnings or log records while reading (they may quote element values).

    warnings.catch_warnings is process-wide state: converter workers are processes, one read at a
    time each; with threads, a warning from another thread may be hidden meanwhile, never shown.
    """
    _reading.depth = getattr(_reading, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _reading.depth -= 1


# --- recognising and parsing ---------------------------------------------------------------------


def is_dicom(source: str | os.PathLike | bytes | bytearray | memoryview) -> bool:
    """True when the content is a DICOM Part 10 file: "DICM" at byte 128. The file name is ignored.

    `source` is a path or the file's first bytes (at least HEADER_BYTES). A path that is not a
    regular file (FIFO, device, folder) or cannot be read is not DICOM; it is never blocked on.
    Data sets without the 128-byte preamble (not Part 10 files) are not recognised.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return imaging.is_dicom(bytes(source[:HEADER_BYTES]))
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    if not stat.S_ISREG(
        os.fstat(fd).st_mode
    ):  # checked on the descriptor: the path may have changed
        os.close(fd)
        return False
    with os.fdopen(fd, "rb") as f:
        try:
            return imaging.is_dicom(f.read(HEADER_BYTES))
        except OSError:
            return False


def _parse(data: bytes, stop_before_pixels: bool = False) -> Dataset:
    """The data set in `data`; refuses non-DICOM, unparseable and (with pixels) truncated files."""
    if not is_dicom(data):
        raise DicomError("not a DICOM file: no 'DICM' marker at byte 128")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, struct.error):
        # struct.error: pydicom unpacked an element header from fewer bytes than it needs.
        raise DicomError("truncated or malformed DICOM header") from None
    except (
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        OverflowError,
        NotImplementedError,
        OSError,
    ) as e:
        # Parser messages can quote element values: only the exception type is reported.
        raise DicomError(f"unreadable DICOM header ({type(e).__name__})") from None
    if not stop_before_pixels:
        _check_complete(ds, data)
    return ds


def _check_complete(ds: Dataset, data: bytes) -> None:
    """Refuses a data set whose last element does not end where the file's content ends.

    pydicom stops silently at the end of a truncated file: a value cut short keeps the bytes
    there are, fewer than 8 trailing bytes are dropped, and encapsulated pixel data without its
    delimiter can leave an empty data set. Elements are stored in tag order, so the last tag is
    the last element in the file. Zero bytes after it are padding (some media writers pad files
    to an even length or a block), not a cut element, and are accepted.
    """
    if len(ds) == 0:
        raise DicomError("truncated DICOM file: no data set after the file meta information")
    end = _element_end(ds.get_item(max(ds.keys())))
    size = len(data)
    if end is None or end == size or (end < size and not data[end:].strip(b"\x00")):
        return
    raise DicomError(
        f"truncated DICOM file: its last element ends at byte {end}, the file at byte {size}"
    )


def _element_end(raw) -> int | None:
    """The byte offset just past a raw element read from a file (None when not known)."""
    tell = getattr(raw, "value_tell", None)
    if tell is None or not isinstance(raw.value, (bytes, bytearray)):
        return None  # already converted, e.g. a sequence parsed while reading
    if raw.length == 0xFFFFFFFF:
        return tell + len(raw.value) + 8  # undefined length: the value, then its 8-byte delimiter
    return tell + raw.length


# --- identity: kept out of messages, returned only for hashing ----------------------------------


def read_source_ids(data: bytes) -> SourceIds:
    """PatientID and StudyInstanceUID, for grouping a patient's images into one split.

    Raw identity: the caller must HMAC them (keyed, so ids cannot be recovered by hashing guesses)
    before they reach a manifest, a log or an exception. Pixel data are not parsed. Raises
    DicomError for a file that is not DICOM or whose header does not parse.
    """
    with _quiet():
        ds = _parse(data, stop_before_pixels=True)
        return SourceIds(
            patient_id=_raw_text(ds, _PATIENT_ID), study_instance_uid=_raw_text(ds, _STUDY_UID)
        )


# --- refusals ------------------------------------------------------------------------------------


def _sop_class_name(ds: Dataset) -> str:
    value = _raw_text(ds, 0x00080016) or ""
    if not _UID_PATTERN.match(value):
        return "unknown SOP class"
    return dcm_uid.UID(value).name


def _check_image(ds: Dataset) -> None:
    """Refuses what is not one grayscale frame, before any pixel is decoded."""
    sop = _sop_class_name(ds)
    if any(word in sop for word in _NON_IMAGE_CLASSES):
        raise DicomError(f"not an image: DICOM {sop} object")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise DicomError("float pixel data: only integer radiographs are read")
    if "PixelData" not in ds:
        raise DicomError(f"no pixel data in this DICOM file ({sop})")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames): only single-frame images are read")
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise DicomError(
            f"colour DICOM ({samples} samples per pixel): only grayscale images are read"
        )
    _check_photometric(ds)
    _check_geometry(ds)


def _check_photometric(ds: Dataset) -> None:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return
    # Only the standard's enumerated values are echoed: a free-text value could hold anything.
    shown = photometric if photometric in _PHOTOMETRICS else "a non-standard value"
    raise DicomError(
        f"photometric interpretation {shown}: only MONOCHROME1 and MONOCHROME2 are read"
    )


def _check_geometry(ds: Dataset) -> None:
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows < 1 or columns < 1:
        raise DicomError(f"image has no pixels ({columns}x{rows})")
    if rows * columns > MAX_IMAGE_PIXELS:
        raise DicomError(
            f"image too large: {columns}x{rows} pixels, more than the {MAX_IMAGE_PIXELS} "
            f"pixel limit; not decoded"
        )
    allocated, stored = _int(ds, "BitsAllocated", 0), _int(ds, "BitsStored", 0)
    if allocated not in (8, 16) or not 1 <= stored <= allocated:
        raise DicomError(
            f"unsupported bit depth (BitsAllocated={allocated}, BitsStored={stored}): "
            f"only 8- and 16-bit radiographs are read"
        )



def _view_position(ds: Dataset) -> str:
    """(0018,5101) when it is one of the standard's defined terms, "" when absent, else "other"
    (free text is never passed on: it could hold anything)."""
    value = (_raw_text(ds, 0x00185101) or "").upper()
    return value if value in _VIEW_POSITIONS or not value else "other"

# --- the whole read ------------------------------------------------------------------------------


def read_dicom(data: bytes, min_size: int | None = None) -> DicomImage:
    """DICOM file bytes -> 8-bit display pixels and non-identifying metadata.

    min_size: the smallest side that must stay >= this after a reduced-resolution decode (the
    converter's target size). JPEG 2000 decodes only the needed wavelet levels and 8-bit baseline
    JPEG uses DCT scaling; everything else decodes in full. None decodes in full.
    Raises DicomError with a one-line reason: not DICOM, truncated, not an image (SR, presentation
    state...), no pixel data, multi-frame, colour, photometric interpretation other than
    MONOCHROME1/2, too large, no installed decoder (naming the pip package), undecodable pixels.
    """
    with _quiet():
        return _read(data, min_size)


def _read(data: bytes, min_size: int | None) -> DicomImage:
    ds = _parse(data)
    _check_image(ds)
    tsuid = ds.file_meta.get("TransferSyntaxUID") or dcm_uid.ImplicitVRLittleEndian
    _check_decoder(ds, tsuid)
    stored, reduction = _decode(ds, tsuid, min_size)
    pixels, voi, function = _display(stored, ds)
    return DicomImage(
        pixels=pixels,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        reduction=reduction,
        photometric_interpretation=str(ds.PhotometricInterpretation).strip(),
        inverted=_inverted(ds),
        bits_stored=int(ds.BitsStored),
        transfer_syntax=tsuid.name,
        transfer_syntax_uid=str(tsuid),
        view_position=_view_position(ds),
        voi=voi,
        voi_function=function,
    )


def read_dicom_file(path: str | os.PathLike, min_size: int | None = None) -> DicomImage:
    """read_dicom on a file's bytes. The converter reads bytes itself (size limits, FIFOs): this is
    for tools and tests."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DicomError(f"unreadable file: {e.strerror or type(e).__name__}") from None
    return read_dicom(data, min_size)
