"""Builds small DICOM files from NumPy arrays, so every expected pixel of a test is known."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image
from pydicom import config, uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag

# Identity planted in every test file: none of it may appear in a message, warning or log.
IDENTITY = {
    "PatientName": "Doe^Janet^Secretname",
    "PatientID": "PID-SECRET-4711",
    "PatientBirthDate": "19871231",
    "AccessionNumber": "ACC-SECRET-99",
    "InstitutionName": "Secretville General Hospital",
    "ReferringPhysicianName": "Whoever^Drsecret",
}

# ds.compress() plugin per transfer syntax; JPEG baseline has no pydicom encoder (done by hand).
_PLUGINS = {
    uid.RLELossless: "pydicom",
    uid.JPEG2000Lossless: "pylibjpeg",
    uid.JPEG2000: "pylibjpeg",
    uid.JPEGLSLossless: "pyjpegls",
    uid.JPEGLSNearLossless: "pyjpegls",
}


def build_dataset(pixels: np.ndarray | None, **attrs) -> Dataset:
    """An uncompressed single-frame DX data set holding `pixels` (uint8, uint16 or int16 [h, w])."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = uid.generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.4711"
    ds.Modality = "DX"
    for key, value in IDENTITY.items():
        setattr(ds, key, value)
    if pixels is not None:
        _set_pixels(ds, np.ascontiguousarray(pixels))
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    bits = pixels.dtype.itemsize * 8
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray | None,
    *,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
    jpeg_quality: int = 95,
    **attrs,
) -> str:
    """Writes a Part 10 file (preamble + 'DICM') with `pixels` encoded in `transfer_syntax`.

    attrs are DICOM keywords set on the data set after the pixel attributes (so BitsStored=12
    etc. override the defaults); a value of None removes the element.
    """
    with config.disable_value_validation():  # tests plant invalid values on purpose
        ds = build_dataset(pixels, **attrs)
        if transfer_syntax == uid.JPEGBaseline8Bit:
            _encapsulate_jpeg(ds, pixels, jpeg_quality)
        elif transfer_syntax != uid.ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, pixels, encoding_plugin=_PLUGINS[transfer_syntax])
        ds.save_as(path, enforce_file_format=True)
    return str(path)


def write_raw_elements(
    path: str | os.PathLike, pixels: np.ndarray, raw: dict[int, tuple[str, bytes]]
) -> str:
    """write_dicom, plus elements written byte for byte (values pydicom would refuse to build)."""
    ds = build_dataset(pixels)
    for tag, (vr, value) in raw.items():
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def _encapsulate_jpeg(ds: Dataset, pixels: np.ndarray, quality: int) -> None:
    """8-bit baseline JPEG from Pillow, encapsulated by hand (pydicom 3 has no JPEG encoder)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").save(
        buf, format="JPEG", quality=quality
    )
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.LossyImageCompression = "01"


def jpeg_file_as_dicom(jpeg_path: str, out_path: str | os.PathLike) -> str:
    """Wraps an existing 8-bit grayscale JPEG's bytes, unchanged, as a JPEG baseline DICOM."""
    with open(jpeg_path, "rb") as f:
        encoded = f.read()
    with Image.open(io.BytesIO(encoded)) as image:
        width, height = image.size
        mode = image.mode
    if mode != "L":
        raise ValueError(f"{jpeg_path}: not a grayscale JPEG ({mode})")
    ds = build_dataset(np.zeros((1, 1), np.uint8))
    ds.Rows, ds.Columns = height, width
    ds.PixelData = encapsulate([encoded])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.save_as(out_path, enforce_file_format=True)
    return str(out_path)


def smooth_image(
    rows: int, cols: int, low: int, high: int, seed: int = 0, dtype=np.uint16
) -> np.ndarray:
    """A smooth radiograph-like ramp-and-blob image with mild noise, values in [low, high]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    base = (
        0.5
        + 0.3 * np.sin(6 * x) * np.cos(4 * y)
        + 0.2 * np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) * 8)
    )
    base = (base - base.min()) / (base.max() - base.min())
    noisy = base + rng.normal(0, 0.01, base.shape)
    values = low + np.clip(noisy, 0, 1) * (high - low)
    return np.rint(values).astype(dtype)
