"""The display chain of a DICOM radiograph, after its stored values are decoded (cxr_tfdata.core.dicom).

Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the first VOI transform
(Window Center/Width with its VOI LUT Function, else a VOI LUT Sequence, else a flagged fallback
window), then MONOCHROME1 (or a Presentation LUT Shape of INVERSE) is inverted, then 8 bits.
Also DicomError, the refusal every DICOM module raises. No TensorFlow here.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

# Fallback VOI window: these percentiles of the Modality LUT output (see _fallback_window).
FALLBACK_PERCENTILES = (0.5, 99.5)
# The fallback's percentiles are taken on a regular subsample of at most about this many pixels.
_FALLBACK_SAMPLE = 1 << 16

VOI_WINDOW, VOI_LUT, VOI_FALLBACK = "window", "lut", "fallback"
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class DicomError(ValueError):
    """A file that cannot be used as a DICOM radiograph; the message is the one-line reason.

    Messages never hold identity (names, ids, dates, institution, physician).
    """



def _modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT (PS3.3 C.11.1), pydicom's apply_modality_lut: slope * x + intercept, or LUT."""
    try:
        return apply_modality_lut(stored, ds)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
        raise DicomError(f"unusable Modality LUT ({type(e).__name__})") from None


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """VOI windowing (PS3.3 C.11.2.1.2, C.11.2.1.3) straight to display values in [0, 255] (float).

    The standard's formulas with y_min = 0, y_max = 255. pydicom's apply_windowing computes the
    same curve into the stored-bits range of the file (and writes attributes back into the
    dataset), so it is used only in the tests, as a cross-check.
    LINEAR: width >= 1; x <= c - 0.5 - (w - 1) / 2 -> 0; x > c - 0.5 + (w - 1) / 2 -> 255;
            else ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.
    LINEAR_EXACT: width > 0; ((x - c) / w + 0.5) * 255, clipped.
    SIGMOID: width > 0; 255 / (1 + exp(-4 (x - c) / w)).
    """
    if function not in _VOI_FUNCTIONS or width <= 0 or (function == "LINEAR" and width < 1):
        raise ValueError(f"invalid window: {function} width {width}")
    x = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
        if width == 0:  # a one-value-wide window is a threshold
            return np.where(x <= center, 0.0, 255.0)
    # Clipping the ramp gives exactly the standard's piecewise definition.
    return np.clip(((x - center) / width + 0.5) * 255.0, 0.0, 255.0)


def _first_number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0] if len(value) else None
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _window_params(ds: Dataset) -> tuple[float, float, str] | None:
    """The first Window Center/Width and VOI LUT Function, when usable (None otherwise)."""
    center, width = _first_number(ds, "WindowCenter"), _first_number(ds, "WindowWidth")
    if center is None or width is None or not np.isfinite(center) or not np.isfinite(width):
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS or width <= 0 or (function == "LINEAR" and width < 1):
        return None
    return center, width, function


def _lut_table(ds: Dataset, item: Dataset) -> tuple[np.ndarray, int, int]:
    """(LUT data, first value mapped, largest output) of a LUT Sequence item (PS3.3 C.11.2.1.1)."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 1 << 16
    if first >= 1 << 15 and ds.get("PixelRepresentation") == 1:
        first -= 1 << 16  # the descriptor's US reading of an SS first value
    element = item["LUTData"]
    if element.VR == "OW" or isinstance(element.value, (bytes, bytearray)):
        little = ds.original_encoding[1] is not False
        data = np.frombuffer(bytes(element.value), dtype="<u2" if little else ">u2")
    else:
        data = np.asarray(
            element.value
            if isinstance(element.value, (list, tuple, pydicom.multival.MultiValue))
            else [element.value],
            dtype=np.int64,
        )
    if bits == 8 and data.size * 2 == entries:  # 8-bit entries packed two to a 16-bit word
        data = np.frombuffer(data.astype("<u2").tobytes(), dtype=np.uint8)
    if data.size < entries:
        raise ValueError("LUT Data shorter than its descriptor")
    table = data[:entries].astype(np.int64)
    # Some writers declare fewer bits than their entries use: trust the data over the descriptor.
    top = max((1 << bits) - 1, (1 << int(table.max()).bit_length()) - 1)
    return table, first, top


def _apply_lut(values: np.ndarray, table: np.ndarray, first: int) -> np.ndarray:
    """LUT lookup, clamped as the standard says: below `first` entry 0, past the end the last entry.

    Done here rather than with pydicom 3.0's apply_voi, which builds its index array in the LUT's
    output type: an 8-bit LUT with more than 256 entries wraps the indices (tested).
    """
    index = np.rint(values).astype(np.int64) - first
    return table[np.clip(index, 0, table.size - 1)]


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    try:
        table, first, top = _lut_table(ds, sequence[0])
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return None  # an unusable LUT is treated as absent: the fallback is flagged instead
    return _apply_lut(values, table, first) * (255.0 / top)


def _fallback_window(values: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """The VOI used when a file has none: a linear window over the 0.5th-99.5th percentiles.

    Why not the full range of the stored bits (after the Modality LUT)? Bits Stored describes the
    container, not the signal: detectors store 12-16 bits of which an exposure occupies a
    fraction, and a rescale moves the range anywhere, so the full range gives dark, flat images
    whose brightness depends on the vendor. A percentile window is what viewers' automatic
    windowing does; it adapts to the exposure and ignores the few pixels of burned-in labels,
    markers and collimator edges, which saturate. Its cost is that contrast is normalised per
    image, which is why such files are flagged (voi="fallback") for the manifest.
    Percentiles are taken on `sample`, the Modality LUT values of a regular subsample of the image
    (deterministic; ~65k pixels is plenty); the window is applied to `values`.
    """
    low, high = np.percentile(sample, FALLBACK_PERCENTILES)
    if high <= low:
        return np.zeros(
            values.shape, dtype=np.float64
        )  # constant image: flagged later as near-constant
    return window(values, float(low + high) / 2, float(high - low), "LINEAR_EXACT")


def _voi(values: np.ndarray, ds: Dataset, sample) -> tuple[np.ndarray, str, str]:
    """(display values in [0, 255], voi kind, function). The window comes first, as viewers show it.

    sample() returns the image's Modality LUT values the fallback window is computed from.
    """
    params = _window_params(ds)
    if params is not None:
        center, width, function = params
        return window(values, center, width, function), VOI_WINDOW, function
    looked_up = _voi_lut(values, ds)
    if looked_up is not None:
        return looked_up, VOI_LUT, "LUT"
    return _fallback_window(values, sample()), VOI_FALLBACK, "PERCENTILE"



def _inverted(ds: Dataset) -> bool:
    """MONOCHROME1 shows its minimum as white; a Presentation LUT Shape of INVERSE does the same to
    MONOCHROME2. (The standard pairs MONOCHROME1 with INVERSE: one inversion, not two.)"""
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        return True
    return str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"


def _to_uint8(display: np.ndarray, invert: bool) -> np.ndarray:
    if invert:
        display = 255.0 - display
    return np.clip(np.rint(display), 0, 255).astype(np.uint8)


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if ds.get("PixelRepresentation") == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _display(stored: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str, str]:
    """(uint8 display pixels, voi kind, function), via one table over every possible stored value.

    Each step from stored to display value (Modality LUT, VOI, inversion, rounding) depends on the
    stored value alone, so the chain is computed once per possible value (at most 65536) and
    applied with one lookup: a 2048 x 2048 image costs one pass instead of several float64 passes.
    Only the fallback window looks at the image, through a subsample of its Modality LUT values.
    """
    low, high = _stored_range(ds)
    modality = _modality(np.arange(low, high + 1, dtype=np.int64), ds)
    # Unsigned values index the table as they are; values outside the stored range (a decoder's
    # rounding at reduced resolution) are clamped to its ends by mode="clip".
    index = stored if low == 0 and stored.dtype.kind == "u" else stored.astype(np.int32) - low
    step = max(1, int(np.sqrt(index.size / _FALLBACK_SAMPLE)))
    display, voi, function = _voi(
        modality, ds, lambda: np.take(modality, index[::step, ::step], mode="clip")
    )
    table = _to_uint8(display, _inverted(ds))
    return np.take(table, index, mode="clip"), voi, function
