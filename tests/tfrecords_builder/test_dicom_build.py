"""DICOMs through the one image-reading path: the converter and cxr-predict's load_image.

A tiny Kaggle-layout folder of DICOMs in several encodings, some without an extension, is converted;
every record holds the source pixels (within 1 grey level) after the converter's own resize, and a
structured report is skipped with its reason.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pydicom", reason='the DICOM reader needs pip install "cxr-tfdata[dicom]"')

import tensorflow_datasets as tfds  # noqa: E402
from pydicom import uid  # noqa: E402

from cxr_tfdata.core import imaging, record_schema  # noqa: E402
from tests.dicom_writer import write_dicom  # noqa: E402
from tests.helpers import encode_png, labelled_image  # noqa: E402
from tfrecords_builder import build  # noqa: E402

SOURCE_SIZE = 64
IMAGE_SIZE = 48  # a real resize, and no reduced-resolution decode (64 // 2 < 48)


def _mono1_16bit(path, pixels):
    """MONOCHROME1 at 16 bits: stored (255 - p) * 257; a LINEAR_EXACT window over the full range maps
    it to 255 - p, and the inversion gives p back."""
    stored = ((255 - pixels.astype(np.uint16)) * 257).astype(np.uint16)
    return write_dicom(path, stored, PhotometricInterpretation="MONOCHROME1", WindowCenter="32767.5",
                       WindowWidth="65535", VOILUTFunction="LINEAR_EXACT", ViewPosition="AP")


# An 8-bit window that maps every stored value to itself (without a VOI, the fallback window would
# stretch each image's contrast: tested in tests/core/test_dicom.py).
IDENTITY_WINDOW = dict(WindowCenter="127.5", WindowWidth="255", VOILUTFunction="LINEAR_EXACT")
ENCODINGS = (  # (file suffix, writer)
    (".dcm", lambda path, p: write_dicom(path, p, ViewPosition="PA", **IDENTITY_WINDOW)),  # MONOCHROME2
    ("", _mono1_16bit),
    (".dcm", lambda path, p: write_dicom(path, p, transfer_syntax=uid.RLELossless, **IDENTITY_WINDOW)),
    ("", lambda path, p: write_dicom(path, p, transfer_syntax=uid.JPEG2000Lossless, **IDENTITY_WINDOW)),
    (".dcm", lambda path, p: write_dicom(path, p, transfer_syntax=uid.JPEGLSLossless, **IDENTITY_WINDOW)),
)


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory):
    """{relative path: source pixels [S, S]} of a train/test x NORMAL/PNEUMONIA folder of DICOMs."""
    root = tmp_path_factory.mktemp("dicoms")
    sources, index = {}, 0
    for split in ("train", "test"):
        for label, name in enumerate(record_schema.CLASS_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for _ in range(2):
                pixels = labelled_image(label, index, SOURCE_SIZE)[..., 0]
                suffix, write = ENCODINGS[index % len(ENCODINGS)]
                filename = f"IM-{index:04d}-0001{suffix}"
                write(folder / filename, pixels)
                sources[f"{split}/{name}/{filename}"] = pixels
                index += 1
    write_dicom(root / "train" / "NORMAL" / "report", None, SOPClassUID=uid.BasicTextSRStorage)
    # No VOI at all: converted with the percentile fallback window, and flagged in the manifest.
    write_dicom(root / "train" / "PNEUMONIA" / "no-voi.dcm", (labelled_image(1, 99, SOURCE_SIZE)[..., 0] // 2),
                ViewPosition="LL")
    return root, sources


def _expected(pixels: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The source after the converter's resize, decoded from a PNG of it."""
    return imaging.decode_and_resize(encode_png(pixels[..., None]), image_size)[0]


def test_every_dicom_is_converted_to_its_source_pixels(dicom_folder, tmp_path):
    root, sources = dicom_folder
    config = build.BuildConfig(input_dir=str(root), output_dir=str(tmp_path / "out"), image_size=IMAGE_SIZE,
                               encoding="png", val_fraction=0.0, min_val_images=1, num_workers=1, num_shards=1,
                               drop_leaks=False)  # every test DICOM has one PatientID: one patient in both splits
    manifest = build.build_dataset(config)

    assert manifest["skipped"] == [{"path": "train/NORMAL/report",
                                    "reason": "not an image: DICOM Basic Text SR Storage object"}]
    builder = tfds.builder_from_directory(str(tmp_path / "out"))
    records = {}
    for split in manifest["splits"]:
        for record in builder.as_dataset(split=split).as_numpy_iterator():
            records[f"{split}/{record['filename'].decode()}"] = record
    assert sorted(records) == sorted([*sources, "train/PNEUMONIA/no-voi.dcm"])
    facts = {e["path"]: e for e in manifest["dicom"]}
    assert len(facts) == len(sources) + 1
    assert facts["train/PNEUMONIA/no-voi.dcm"] == {"path": "train/PNEUMONIA/no-voi.dcm", "view_position": "LL",
                                                   "voi_fallback": True}
    assert facts["train/NORMAL/IM-0000-0001.dcm"]["view_position"] == "PA"
    assert facts["train/NORMAL/IM-0001-0001"]["view_position"] == "AP"
    assert not any(facts[name]["voi_fallback"] for name in sources)
    for name, pixels in sources.items():
        got = records[name]["image"].astype(int)
        assert np.abs(got - _expected(pixels).astype(int)).max() <= 1, name
        assert (records[name]["original_height"], records[name]["original_width"]) == pixels.shape


def test_predict_reads_a_dicom_as_it_reads_the_png(dicom_folder, tmp_path):
    image_scoring = pytest.importorskip("cxr_tfdata.modeling.image_scoring")
    root, sources = dicom_folder
    for name in ("train/NORMAL/IM-0000-0001.dcm", "train/NORMAL/IM-0001-0001", "test/NORMAL/IM-0004-0001.dcm"):
        png = tmp_path / "same.png"
        png.write_bytes(encode_png(sources[name][..., None]))
        from_dicom = image_scoring.load_image(str(root / name), 32, pad=False)
        from_png = image_scoring.load_image(str(png), 32, pad=False)
        assert np.abs(from_dicom.astype(int) - from_png.astype(int)).max() <= 1, name
    with pytest.raises(imaging.ImageError, match="not an image: DICOM Basic Text SR"):
        image_scoring.load_image(str(root / "train" / "NORMAL" / "report"), 32, pad=False)


def test_a_dicom_without_the_extra_names_the_package(dicom_folder, monkeypatch):
    import sys

    import cxr_tfdata.core

    root, _ = dicom_folder
    monkeypatch.setitem(sys.modules, "cxr_tfdata.core.dicom", None)  # import fails as if pydicom were absent
    monkeypatch.delattr(cxr_tfdata.core, "dicom", raising=False)
    data = (root / "train" / "NORMAL" / "IM-0000-0001.dcm").read_bytes()
    with pytest.raises(imaging.ImageError, match=r'pip install "cxr-tfdata\[dicom\]"'):
        imaging.decode_and_resize(data, 32)


def test_views_keeps_only_the_dicoms_of_those_views(dicom_folder, tmp_path):
    root, sources = dicom_folder
    folder = tmp_path / "images"
    for split in ("train", "test"):
        for name in record_schema.CLASS_NAMES:
            (folder / split / name).mkdir(parents=True)
    kept = {"train/NORMAL/a.dcm": "PA", "train/PNEUMONIA/b": "AP", "test/NORMAL/c.dcm": "PA",
            "test/PNEUMONIA/d": "AP"}
    for index, (name, view) in enumerate(kept.items()):
        write_dicom(folder / name, labelled_image(index % 2, index, SOURCE_SIZE)[..., 0], ViewPosition=view,
                    **IDENTITY_WINDOW)
    write_dicom(folder / "train/NORMAL/lateral.dcm", labelled_image(0, 7, SOURCE_SIZE)[..., 0],
                ViewPosition="LL", **IDENTITY_WINDOW)
    write_dicom(folder / "train/NORMAL/no-view", labelled_image(0, 8, SOURCE_SIZE)[..., 0], **IDENTITY_WINDOW)
    (folder / "train/PNEUMONIA/photo.png").write_bytes(encode_png(labelled_image(1, 9, SOURCE_SIZE)))
    with pytest.raises(ValueError, match="views"):
        build.BuildConfig(input_dir=str(folder), output_dir=str(tmp_path / "x"), views=("FRONTAL",))
    config = build.BuildConfig(input_dir=str(folder), output_dir=str(tmp_path / "out"), image_size=IMAGE_SIZE,
                               encoding="png", val_fraction=0.0, min_val_images=1, num_workers=1, num_shards=1,
                               views=("PA", "AP"), drop_leaks=False)  # one PatientID in both splits
    manifest = build.build_dataset(config)

    assert manifest["excluded_views"] == [
        {"path": "train/NORMAL/lateral.dcm", "view_position": "LL"},
        {"path": "train/NORMAL/no-view", "view_position": "absent"},
        {"path": "train/PNEUMONIA/photo.png", "view_position": "not DICOM"},
    ]
    assert manifest["skipped"] == []
    assert sum(s["num_examples"] for s in manifest["splits"].values()) == len(kept)
    assert sorted(e["path"] for e in manifest["dicom"]) == sorted(kept)
