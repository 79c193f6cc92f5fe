"""Tests of the DICOM reader: the standard's display formulas, codecs, refusals and identity."""

from __future__ import annotations

import copy
import glob
import logging
import os
import warnings

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pydicom", reason='the DICOM reader needs pip install "cxr-tfdata[dicom]"')

from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing
from pydicom.sequence import Sequence

from cxr_tfdata.core import dicom, dicom_decode
from tests.dicom_writer import (
    IDENTITY,
    build_dataset,
    jpeg_file_as_dicom,
    smooth_image,
    write_dicom,
    write_raw_elements,
)

CHEST_XRAYS = "/work/shared/data/chest_xray_orig"


def read(path, **kwargs) -> dicom.DicomImage:
    with open(path, "rb") as f:
        return dicom.read_dicom(f.read(), **kwargs)


def refusal(path, **kwargs) -> str:
    with pytest.raises(dicom.DicomError) as info:
        read(path, **kwargs)
    return str(info.value)


# --- the standard's formulas, written out independently (PS3.3 C.11.2.1.2, C.11.2.1.3) ---------


def standard_linear(x: float, c: float, w: float, y_min=0.0, y_max=255.0) -> float:
    if x <= c - 0.5 - (w - 1) / 2:
        return y_min
    if x > c - 0.5 + (w - 1) / 2:
        return y_max
    return ((x - (c - 0.5)) / (w - 1) + 0.5) * (y_max - y_min) + y_min


def standard_linear_exact(x: float, c: float, w: float, y_min=0.0, y_max=255.0) -> float:
    if x <= c - w / 2:
        return y_min
    if x > c + w / 2:
        return y_max
    return ((x - c) / w + 0.5) * (y_max - y_min) + y_min


def standard_sigmoid(x: float, c: float, w: float, y_min=0.0, y_max=255.0) -> float:
    return (y_max - y_min) / (1 + np.exp(-4 * (x - c) / w)) + y_min


STANDARD = {
    "LINEAR": standard_linear,
    "LINEAR_EXACT": standard_linear_exact,
    "SIGMOID": standard_sigmoid,
}


def expected_8bit(values: np.ndarray, fn, *args) -> np.ndarray:
    out = np.vectorize(lambda v: fn(float(v), *args))(values)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --- recognition ---------------------------------------------------------------------------------


def test_is_dicom_by_content_not_extension(tmp_path):
    path = write_dicom(tmp_path / "IM000001", np.zeros((4, 4), np.uint8))  # no extension
    assert dicom.is_dicom(path)
    with open(path, "rb") as f:
        assert dicom.is_dicom(f.read(dicom.HEADER_BYTES))
    fake = tmp_path / "scan.dcm"
    fake.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 200)
    assert not dicom.is_dicom(fake)
    assert not dicom.is_dicom(b"DICM")
    assert not dicom.is_dicom(tmp_path / "missing")
    assert read(path).pixels.shape == (4, 4)


def test_is_dicom_never_blocks_on_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert not dicom.is_dicom(fifo)
    assert not dicom.is_dicom(tmp_path)


# --- display pipeline ----------------------------------------------------------------------------


def test_monochrome2_8bit_identity_window_keeps_every_value(tmp_path):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    # LINEAR, c=128, w=256 is the identity on 0..255 by the standard's formula.
    result = read(write_dicom(tmp_path / "a", pixels, WindowCenter=128, WindowWidth=256))
    assert np.array_equal(result.pixels, pixels)
    assert (result.voi, result.voi_function, result.inverted) == ("window", "LINEAR", False)
    assert (result.rows, result.columns, result.bits_stored, result.reduction) == (16, 16, 8, 1)
    assert result.transfer_syntax == "Explicit VR Little Endian"
    assert result.image().mode == "L"


def test_12bit_rescale_then_window_matches_standard_and_pydicom(tmp_path):
    stored = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    attrs = dict(
        BitsStored=12,
        HighBit=11,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=1500,
        WindowWidth=3000,
        ViewPosition="PA",
    )
    result = read(write_dicom(tmp_path / "a", stored, **attrs))
    modality = stored * 2.0 - 1024
    assert np.array_equal(result.pixels, expected_8bit(modality, standard_linear, 1500, 3000))
    assert result.view_position == "PA" and result.bits_stored == 12
    # pydicom's windowing gives the same curve in the rescaled stored-bits range.
    ds = build_dataset(stored, **attrs)
    y_min, y_max = 0 * 2 - 1024, 4095 * 2 - 1024
    theirs = (apply_windowing(apply_modality_lut(stored, ds), ds) - y_min) / (y_max - y_min) * 255
    assert np.abs(theirs - dicom.window(modality, 1500, 3000)).max() < 1e-9


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_functions_match_standard_and_pydicom(function):
    x = np.linspace(-100, 1200, 661)
    ours = dicom.window(x, 500, 400, function)
    assert np.abs(ours - np.array([STANDARD[function](v, 500, 400) for v in x])).max() < 1e-9
    ds = build_dataset(
        np.zeros((2, 2), np.uint16),
        BitsStored=16,
        WindowCenter=500,
        WindowWidth=400,
        VOILUTFunction=function,
    )
    theirs = apply_windowing(x.copy(), ds) / 65535 * 255
    assert np.abs(theirs - ours).max() < 1e-6


def test_linear_window_of_width_one_is_a_threshold():
    x = np.array([9.0, 9.5, 10.0, 11.0])
    expected = [standard_linear(v, 10, 1) for v in x]
    assert dicom.window(x, 10, 1, "LINEAR").tolist() == expected == [0, 0, 255, 255]


def test_monochrome1_16bit_is_inverted_after_the_window(tmp_path):
    stored = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    result = read(
        write_dicom(
            tmp_path / "a",
            stored,
            PhotometricInterpretation="MONOCHROME1",
            WindowCenter=30000,
            WindowWidth=40000,
        )
    )
    assert result.inverted and result.photometric_interpretation == "MONOCHROME1"
    assert np.array_equal(result.pixels, 255 - expected_8bit(stored, standard_linear, 30000, 40000))
    assert result.pixels[0, 0] == 255 and result.pixels[-1, -1] == 0  # low stored value = white


def test_presentation_lut_shape_inverse(tmp_path):
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mono2 = read(
        write_dicom(
            tmp_path / "a",
            stored,
            WindowCenter=128,
            WindowWidth=256,
            PresentationLUTShape="INVERSE",
        )
    )
    assert np.array_equal(mono2.pixels, 255 - stored)
    # MONOCHROME1 comes with INVERSE in the standard: one inversion, not two.
    mono1 = read(
        write_dicom(
            tmp_path / "b",
            stored,
            WindowCenter=128,
            WindowWidth=256,
            PhotometricInterpretation="MONOCHROME1",
            PresentationLUTShape="INVERSE",
        )
    )
    assert np.array_equal(mono1.pixels, 255 - stored)


def test_window_saturates_burned_in_marker_and_keeps_lung_contrast(tmp_path):
    stored = smooth_image(128, 128, 600, 1800)  # "lungs and mediastinum"
    stored[10:20, 10:40] = 4095  # burned-in "L" marker at full scale
    result = read(
        write_dicom(
            tmp_path / "a", stored, BitsStored=12, HighBit=11, WindowCenter=1200, WindowWidth=1300
        )
    )
    marker, body = result.pixels[10:20, 10:40], result.pixels[30:, :]
    assert (marker == 255).all()
    assert body.max() < 255 and body.min() > 0  # nothing in the body is clipped
    assert body.max() - body.min() > 200 and len(np.unique(body)) > 150  # contrast kept
    # The full stored range would have squeezed the body into about a third of the grey levels.
    squeezed = expected_8bit(stored[30:, :], standard_linear, 2048, 4096)
    assert int(squeezed.max()) - int(squeezed.min()) < 90


def test_only_first_of_several_windows_is_used(tmp_path):
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    result = read(
        write_dicom(tmp_path / "a", stored, WindowCenter=[128, 40], WindowWidth=[256, 80])
    )
    assert np.array_equal(result.pixels, stored)


def test_unused_high_bits_are_ignored(tmp_path):
    stored = smooth_image(16, 16, 0, 4095)
    overlay = stored | 0x8000  # an overlay bit in bit 15 of a 12-bit image
    attrs = dict(BitsStored=12, HighBit=11, WindowCenter=2048, WindowWidth=4096)
    assert np.array_equal(
        read(write_dicom(tmp_path / "a", overlay, **attrs)).pixels,
        read(write_dicom(tmp_path / "b", stored, **attrs)).pixels,
    )


def voi_lut_item(
    entries: int, first: int, bits: int, data: list[int], as_ow: bool = False
) -> Dataset:
    """A LUT Sequence item; LUT Data as US values, or as little-endian OW bytes when as_ow."""
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, first, bits])
    if as_ow:
        item.add_new(0x00283006, "OW", np.asarray(data, dtype="<u2").tobytes())
    else:
        item.add_new(0x00283006, "US", list(data))
    return item


def test_voi_lut_sequence_8bit_output_with_4096_entries(tmp_path):
    stored = np.array([[0, 100, 300, 1000], [2048, 4000, 4095, 256]], dtype=np.uint16)
    lut = [i // 16 for i in range(4096)]  # 12-bit in, 8-bit out
    result = read(
        write_dicom(
            tmp_path / "a",
            stored,
            BitsStored=12,
            HighBit=11,
            VOILUTSequence=Sequence([voi_lut_item(4096, 0, 8, lut)]),
        )
    )
    assert result.voi == "lut"
    assert np.array_equal(result.pixels, (stored // 16).astype(np.uint8))


def test_pydicom_apply_voi_wraps_indices_of_8bit_luts_longer_than_256():
    """Documents why the module does its own LUT lookup: pydicom 3.0's apply_voi builds its index
    array in the LUT's output type (uint8 here), so inputs above 255 wrap. If this starts failing,
    pydicom has fixed it and apply_voi could be used."""
    stored = np.array([[300, 1000]], dtype=np.uint16)
    ds = build_dataset(
        stored,
        BitsStored=12,
        VOILUTSequence=Sequence([voi_lut_item(4096, 0, 8, [i // 16 for i in range(4096)])]),
    )
    assert apply_voi(stored, ds).tolist() == [[2, 14]]  # correct: [[18, 62]]


def test_voi_lut_sequence_ow_data(tmp_path):
    stored = np.array([[0, 1, 2, 3]], dtype=np.uint8)
    result = read(
        write_dicom(
            tmp_path / "a",
            stored,
            VOILUTSequence=Sequence([voi_lut_item(4, 0, 16, [0, 65535, 21845, 43690], as_ow=True)]),
        )
    )
    assert result.pixels[0].tolist() == [0, 255, 85, 170]


def test_voi_lut_first_value_mapped_and_clamping(tmp_path):
    stored = np.array([[0, 99, 100, 101, 102, 103, 500]], dtype=np.uint16)
    lut = [0, 1000, 3000, 4095]  # 12-bit output entries for inputs 100..103
    result = read(
        write_dicom(
            tmp_path / "a",
            stored,
            BitsStored=12,
            HighBit=11,
            VOILUTSequence=Sequence([voi_lut_item(4, 100, 12, lut)]),
        )
    )
    expected = np.rint(np.array([0, 0, 0, 1000, 3000, 4095, 4095]) / 4095 * 255)
    assert result.pixels[0].tolist() == expected.tolist()
    # pydicom agrees here (16-bit output, short LUT):
    ds = build_dataset(stored, VOILUTSequence=Sequence([voi_lut_item(4, 100, 12, lut)]))
    assert apply_voi(stored, ds)[0].tolist() == [0, 0, 0, 1000, 3000, 4095, 4095]


def test_window_wins_over_voi_lut_sequence(tmp_path):
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    result = read(
        write_dicom(
            tmp_path / "a",
            stored,
            WindowCenter=128,
            WindowWidth=256,
            VOILUTSequence=Sequence([voi_lut_item(256, 0, 8, [255 - i for i in range(256)])]),
        )
    )
    assert result.voi == "window" and np.array_equal(result.pixels, stored)


def test_modality_lut_sequence_then_window(tmp_path):
    stored = np.array([[0, 1, 2, 3, 9]], dtype=np.uint16)
    item = voi_lut_item(4, 0, 16, [100, 200, 400, 800])
    ds_attrs = dict(
        BitsStored=12,
        HighBit=11,
        ModalityLUTSequence=Sequence([item]),
        WindowCenter=450,
        WindowWidth=701,
    )
    result = read(write_dicom(tmp_path / "a", stored, **ds_attrs))
    modality = np.array([100, 200, 400, 800, 800.0])  # beyond the last entry: the last value
    assert np.array_equal(
        apply_modality_lut(stored, build_dataset(stored, **ds_attrs))[0], modality
    )
    assert result.pixels[0].tolist() == expected_8bit(modality, standard_linear, 450, 701).tolist()


def test_no_voi_uses_flagged_percentile_fallback(tmp_path):
    stored = smooth_image(64, 64, 1000, 3000)
    result = read(write_dicom(tmp_path / "a", stored, BitsStored=12, HighBit=11))
    assert result.voi == "fallback" and result.voi_fallback and result.voi_function == "PERCENTILE"
    low, high = np.percentile(stored, dicom.FALLBACK_PERCENTILES)
    expected = expected_8bit(stored, standard_linear_exact, (low + high) / 2, high - low)
    assert np.abs(result.pixels.astype(int) - expected).max() <= 1
    assert result.pixels.min() == 0 and result.pixels.max() == 255


@pytest.mark.parametrize(
    "attrs",
    [
        dict(WindowCenter=100, WindowWidth=0),
        dict(WindowCenter=100, WindowWidth=50, VOILUTFunction="GAMMA"),
        dict(WindowCenter=100),
    ],
)
def test_unusable_window_falls_back_flagged(tmp_path, attrs):
    result = read(
        write_dicom(tmp_path / "a", smooth_image(16, 16, 0, 255, dtype=np.uint8), **attrs)
    )
    assert result.voi == "fallback"


def test_constant_image_without_voi_is_black(tmp_path):
    result = read(write_dicom(tmp_path / "a", np.full((8, 8), 700, np.uint16), BitsStored=12))
    assert result.voi_fallback and not result.pixels.any()


# --- codecs --------------------------------------------------------------------------------------

LOSSLESS = [uid.RLELossless, uid.JPEG2000Lossless, uid.JPEGLSLossless]


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: s.name)
def test_lossless_codecs_decode_to_the_source(tmp_path, syntax):
    stored = smooth_image(96, 80, 0, 4095, seed=3)
    attrs = dict(BitsStored=12, HighBit=11, WindowCenter=2048, WindowWidth=4096)
    native = read(write_dicom(tmp_path / "n", stored, **attrs))
    coded = read(write_dicom(tmp_path / "c", stored, transfer_syntax=syntax, **attrs))
    assert coded.transfer_syntax == syntax.name
    assert np.abs(coded.pixels.astype(int) - native.pixels).max() <= 1


def test_jpeg_baseline_within_jpeg_tolerance(tmp_path):
    stored = smooth_image(96, 80, 0, 255, dtype=np.uint8)
    result = read(
        write_dicom(
            tmp_path / "j",
            stored,
            transfer_syntax=uid.JPEGBaseline8Bit,
            WindowCenter=128,
            WindowWidth=256,
        )
    )
    diff = np.abs(result.pixels.astype(int) - stored)
    assert diff.mean() < 1.5 and diff.max() <= 12


def box_mean(values: np.ndarray, factor: int) -> np.ndarray:
    h, w = values.shape[0] // factor * factor, values.shape[1] // factor * factor
    return values[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def assert_close_to_box_mean(reduced: np.ndarray, full: np.ndarray, factor: int) -> None:
    """The wavelet low-pass band is not a box filter: about a grey level apart, with no offset
    (an offset would mean the bit-depth or signedness undoing is wrong)."""
    diff = reduced - box_mean(full.astype(float), factor)
    assert abs(diff.mean()) < 0.5 and np.abs(diff).mean() < 2.0


def test_jpeg2000_reduced_resolution_decode(tmp_path):
    stored = smooth_image(1024, 768, 0, 4095)
    attrs = dict(BitsStored=12, HighBit=11, WindowCenter=2048, WindowWidth=4096)
    path = write_dicom(tmp_path / "j", stored, transfer_syntax=uid.JPEG2000Lossless, **attrs)
    full, reduced = read(path), read(path, min_size=180)
    assert reduced.reduction == 4 and reduced.pixels.shape == (256, 192)  # 768 / 8 < 180
    assert (reduced.rows, reduced.columns) == (1024, 768)
    assert_close_to_box_mean(reduced.pixels, full.pixels, 4)
    assert read(path, min_size=1024).reduction == 1  # never below min_size


def test_jpeg2000_reduced_signed_with_rescale(tmp_path):
    stored = smooth_image(512, 512, 0, 2000, dtype=np.int16) - 1000  # CT-like signed values
    attrs = dict(
        BitsStored=16, RescaleSlope=1, RescaleIntercept=-24, WindowCenter=0, WindowWidth=2000
    )
    path = write_dicom(tmp_path / "s", stored, transfer_syntax=uid.JPEG2000Lossless, **attrs)
    full, reduced = read(path), read(path, min_size=128)
    assert reduced.reduction == 4
    assert_close_to_box_mean(reduced.pixels, full.pixels, 4)


def test_jpeg_baseline_reduced_by_dct_scaling(tmp_path):
    stored = smooth_image(512, 640, 0, 255, dtype=np.uint8)
    path = write_dicom(
        tmp_path / "j",
        stored,
        transfer_syntax=uid.JPEGBaseline8Bit,
        WindowCenter=128,
        WindowWidth=256,
    )
    full, reduced = read(path), read(path, min_size=120)
    assert reduced.reduction == 4 and reduced.pixels.shape == (128, 160)
    assert np.abs(reduced.pixels - box_mean(full.pixels.astype(float), 4)).mean() < 1.5


def test_native_and_rle_decode_in_full_even_with_min_size(tmp_path):
    stored = smooth_image(256, 256, 0, 255, dtype=np.uint8)
    for syntax in (uid.ExplicitVRLittleEndian, uid.RLELossless):
        result = read(write_dicom(tmp_path / "a", stored, transfer_syntax=syntax), min_size=32)
        assert result.reduction == 1 and result.pixels.shape == (256, 256)


# --- refusals ------------------------------------------------------------------------------------


def test_refuses_structured_report(tmp_path):
    path = write_dicom(tmp_path / "sr", None, SOPClassUID=uid.BasicTextSRStorage)
    assert refusal(path) == "not an image: DICOM Basic Text SR Storage object"


def test_refuses_presentation_state(tmp_path):
    path = write_dicom(
        tmp_path / "pr", None, SOPClassUID=uid.GrayscaleSoftcopyPresentationStateStorage
    )
    assert "not an image: DICOM Grayscale Softcopy Presentation State Storage" in refusal(path)


def test_refuses_missing_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "np", None, Rows=4, Columns=4)
    assert refusal(path).startswith("no pixel data in this DICOM file (Digital X-Ray Image Storage")


def test_refuses_multi_frame(tmp_path):
    frames = np.zeros((8, 4), np.uint8)
    path = write_dicom(tmp_path / "mf", frames, Rows=4, NumberOfFrames=2)
    assert refusal(path) == "multi-frame DICOM (2 frames): only single-frame images are read"


def test_refuses_colour(tmp_path):
    rgb = np.zeros((4, 12), np.uint8)
    path = write_dicom(
        tmp_path / "rgb",
        rgb,
        Columns=4,
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
    )
    assert refusal(path) == "colour DICOM (3 samples per pixel): only grayscale images are read"


def test_refuses_other_photometric_interpretations(tmp_path):
    path = write_dicom(
        tmp_path / "p", np.zeros((4, 4), np.uint8), PhotometricInterpretation="PALETTE COLOR"
    )
    assert refusal(path) == (
        "photometric interpretation PALETTE COLOR: only MONOCHROME1 and MONOCHROME2 are read"
    )
    odd = write_dicom(tmp_path / "q", np.zeros((4, 4), np.uint8), PhotometricInterpretation="DOE")
    assert "a non-standard value" in refusal(odd) and "DOE" not in refusal(odd)


def test_refuses_too_large_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "big", np.zeros((2, 2), np.uint8), Rows=20000, Columns=20000)
    assert refusal(path).startswith("image too large: 20000x20000 pixels")


@pytest.mark.parametrize(
    "syntax",
    [uid.ExplicitVRLittleEndian, uid.RLELossless, uid.JPEG2000Lossless, uid.JPEGBaseline8Bit],
    ids=lambda s: s.name,
)
def test_refuses_truncation_anywhere(tmp_path, syntax):
    stored = smooth_image(64, 64, 0, 255, dtype=np.uint8)
    data = open(write_dicom(tmp_path / "t", stored, transfer_syntax=syntax), "rb").read()
    for cut in sorted(
        {
            *range(dicom.HEADER_BYTES, len(data), max(1, len(data) // 97)),
            len(data) - 1,
            len(data) - 5,
            len(data) - 8,
        }
    ):
        with pytest.raises(dicom.DicomError) as info:
            dicom.read_dicom(data[:cut], min_size=8)  # the reduced decode paths too
        message = str(info.value)
        assert "truncated" in message or message.startswith("no pixel data"), (cut, message)


def test_trailing_sequences_are_not_mistaken_for_truncation(tmp_path):
    ds = build_dataset(smooth_image(16, 16, 0, 255, dtype=np.uint8))
    item = Dataset()
    item.CodeValue = "X"
    ds.add_new(0xFFFAFFFA, "SQ", Sequence([item]))  # Digital Signatures Sequence, after Pixel Data
    ds[0xFFFAFFFA].is_undefined_length = True
    ds.save_as(tmp_path / "s", enforce_file_format=True)
    assert read(tmp_path / "s").pixels.shape == (16, 16)


def test_refuses_non_dicom_and_short_input():
    for data in (b"", b"\xff\xd8\xff" * 100, b"\0" * 128 + b"DICM"):
        with pytest.raises(dicom.DicomError):
            dicom.read_dicom(data)


def test_refuses_missing_decoder_naming_the_package(tmp_path, monkeypatch):
    class Unavailable:
        is_available = False

    path = write_dicom(
        tmp_path / "j", smooth_image(16, 16, 0, 4095), transfer_syntax=uid.JPEGLSLossless
    )
    monkeypatch.setattr(dicom_decode, "get_decoder", lambda tsuid: Unavailable())
    assert refusal(path) == (
        "no decoder installed for JPEG-LS Lossless Image Compression: "
        "pip install pyjpegls or python-gdcm"
    )


def test_refuses_unknown_transfer_syntax(tmp_path):
    path = write_dicom(tmp_path / "x", np.zeros((4, 4), np.uint8))
    ds = build_dataset(np.zeros((4, 4), np.uint8))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    assert refusal(path).startswith("unsupported transfer syntax 1.2.3.4.5")


def test_decoder_errors_are_scrubbed_of_identity(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "a", np.zeros((4, 4), np.uint8))

    def broken(self):
        raise RuntimeError(f"codec failed near {IDENTITY['PatientID']} / Janet\nsecond line")

    monkeypatch.setattr(Dataset, "pixel_array", property(broken))
    message = refusal(path)
    assert message == (
        "pixel data do not decode (RuntimeError): codec failed near <redacted> / <redacted> "
        "second line"
    )


def test_an_identity_value_straddling_the_message_limit_leaves_no_prefix(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "a", np.zeros((4, 4), np.uint8))

    def broken(self):
        raise RuntimeError("x" * 190 + IDENTITY["PatientID"])

    monkeypatch.setattr(Dataset, "pixel_array", property(broken))
    message = refusal(path)
    assert IDENTITY["PatientID"][:5] not in message


def test_zero_padding_after_the_last_element_is_not_truncation(tmp_path):
    data = open(write_dicom(tmp_path / "a", smooth_image(16, 16, 0, 255, dtype=np.uint8)), "rb").read()
    for padding in (b"\x00", b"\x00" * 7, b"\x00" * 512):
        assert dicom.read_dicom(data + padding).pixels.shape == (16, 16)
    with pytest.raises(dicom.DicomError, match="truncated"):
        dicom.read_dicom(data + b"\x01\x02\x03")  # not padding: the start of a cut element


# --- identity ------------------------------------------------------------------------------------


def refusal_cases(tmp_path) -> list[bytes]:
    pixels = np.zeros((4, 4), np.uint8)
    paths = [
        write_dicom(tmp_path / "sr", None, SOPClassUID=uid.BasicTextSRStorage),
        write_dicom(tmp_path / "np", None, Rows=4, Columns=4),
        write_dicom(tmp_path / "mf", np.zeros((8, 4), np.uint8), Rows=4, NumberOfFrames=2),
        write_dicom(tmp_path / "pc", pixels, PhotometricInterpretation="PALETTE COLOR"),
        write_dicom(tmp_path / "pn", pixels, PhotometricInterpretation=IDENTITY["PatientID"]),
        write_dicom(tmp_path / "bd", pixels, BitsAllocated=32),
    ]
    datas = [open(p, "rb").read() for p in paths]
    full = open(
        write_dicom(
            tmp_path / "ok",
            smooth_image(8, 8, 0, 255, dtype=np.uint8),
            PatientBirthDate="not a date at all",
        ),
        "rb",
    ).read()
    datas += [full[:n] for n in range(0, len(full), 23)]
    return datas


def test_identity_never_in_messages_warnings_or_logs(tmp_path, caplog):
    secrets = [*IDENTITY.values(), *(p for v in IDENTITY.values() for p in v.split("^"))]
    cases = refusal_cases(tmp_path)  # writing them warns about the planted invalid values
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in cases:
            with pytest.raises(dicom.DicomError) as info:
                dicom.read_dicom(data)
            assert not any(s in str(info.value) for s in secrets), str(info.value)
    emitted = " ".join(str(w.message) for w in caught) + caplog.text
    assert not any(s in emitted for s in secrets)


def test_metadata_holds_no_identity(tmp_path):
    result = read(write_dicom(tmp_path / "a", np.zeros((4, 4), np.uint8)))
    text = repr(dataclass_values(result))
    assert not any(s in text for s in IDENTITY.values())


def test_identity_planted_in_display_attributes_goes_nowhere(tmp_path, caplog):
    """Free text where a window, VOI function or view position belongs: not echoed, not warned."""
    path = write_raw_elements(
        tmp_path / "r",
        np.zeros((4, 4), np.uint8),
        {
            0x00281050: ("DS", b"Doe^Janet "),
            0x00281051: ("DS", b"100 "),
            0x00281056: ("CS", b"SECRETVILLE "),
            0x00185101: ("CS", IDENTITY["PatientID"].encode() + b" "),
        },
    )
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = read(path)
    assert result.voi == "fallback" and result.view_position == "other"
    emitted = (
        " ".join(str(w.message) for w in caught) + caplog.text + repr(dataclass_values(result))
    )
    assert "Janet" not in emitted and "SECRET" not in emitted.upper()


def dataclass_values(result: dicom.DicomImage) -> list:
    return [getattr(result, f) for f in result.__dataclass_fields__ if f != "pixels"]


def test_source_ids_for_hmac_grouping(tmp_path):
    path = write_dicom(tmp_path / "a", np.zeros((4, 4), np.uint8))
    ids = dicom.read_source_ids(open(path, "rb").read())
    assert ids.patient_id == IDENTITY["PatientID"]
    assert ids.study_instance_uid == "1.2.826.0.1.3680043.8.498.4711"
    assert IDENTITY["PatientID"] not in repr(ids) and "<set>" in repr(ids)
    bare = write_dicom(
        tmp_path / "b", np.zeros((4, 4), np.uint8), PatientID=None, StudyInstanceUID=None
    )
    none = dicom.read_source_ids(open(bare, "rb").read())
    assert none.patient_id is None and none.study_instance_uid is None


# --- real files ----------------------------------------------------------------------------------


def _pydicom_test_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return path


@pytest.mark.parametrize(
    "name, reason",
    [
        (
            "JPGExtended.dcm",
            "no decoder installed for 12-bit JPEG Extended: pip install pylibjpeg "
            "pylibjpeg-libjpeg (GPLv3)",
        ),
        ("rtdose.dcm", "multi-frame DICOM (15 frames)"),
        ("SC_rgb.dcm" if False else "SC_rgb_rle.dcm", "colour DICOM (3 samples per pixel)"),
        ("examples_palette.dcm", "photometric interpretation PALETTE COLOR"),
        ("test-SR.dcm", "not an image: DICOM"),
        ("MR_truncated.dcm", "truncated"),
    ],
)
def test_pydicom_sample_refusals(name, reason):
    path = _pydicom_test_file(name)
    assert reason in refusal(path)


def test_pydicom_samples_decode_alike():
    reference = read(_pydicom_test_file("MR_small.dcm")).pixels
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ):
        assert np.abs(read(_pydicom_test_file(name)).pixels.astype(int) - reference).max() <= 1, (
            name
        )
    assert read(_pydicom_test_file("JPEG2000.dcm")).pixels.dtype == np.uint8


def _chest_xray_jpegs(count: int) -> list[str]:
    if not os.path.isdir(CHEST_XRAYS):
        pytest.skip(f"{CHEST_XRAYS} is not available")
    paths = sorted(glob.glob(os.path.join(CHEST_XRAYS, "test", "NORMAL", "*.jpeg")))[:count]
    if not paths:
        pytest.skip("no chest X-ray JPEGs found")
    return paths


@pytest.mark.real_data
def test_real_chest_xray_wrapped_as_jpeg_dicom(tmp_path):
    """A real radiograph's JPEG bytes inside a DICOM decode as Pillow decodes the JPEG itself
    (in tmp_path only: the data set is never copied anywhere permanent)."""
    for jpeg_path in _chest_xray_jpegs(2):
        with Image.open(jpeg_path) as image:
            if image.mode != "L":
                continue
            direct = np.asarray(image.convert("L"))
            with Image.open(jpeg_path) as drafted:
                drafted.draft("L", (224, 224))
                direct_draft = np.asarray(drafted.convert("L"))
        path = jpeg_file_as_dicom(jpeg_path, tmp_path / "cxr")
        ds_path = write_window(path, tmp_path / "cxr_w")
        full, reduced = read(ds_path), read(ds_path, min_size=224)
        assert np.abs(full.pixels.astype(int) - direct).max() <= 1
        assert reduced.pixels.shape == direct_draft.shape and min(reduced.pixels.shape) >= 224
        assert np.abs(reduced.pixels.astype(int) - direct_draft).max() <= 1


def write_window(path, out_path) -> str:
    """The same file plus the identity window (c=128, w=256): pixels pass through unchanged."""
    from pydicom import dcmread

    ds = dcmread(path)
    ds = copy.deepcopy(ds)
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.save_as(out_path, enforce_file_format=True)
    return str(out_path)
