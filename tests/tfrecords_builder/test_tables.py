"""Label tables as the converter's input: generic columns, the rsna/nih/chexpert presets, lookups, skips.

Most tests read the table only (tables.scan_table: no image is decoded); two run the whole converter
(a generic table with a split column, and RSNA DICOMs) and check the manifest.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import encode_png, labelled_image
from tfrecords_builder import build, table_rows, tables
from tfrecords_builder.tables import TableOptions


def _png(path: Path, label: int = 0, index: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(labelled_image(label, index, 16)))
    return path


def _jpeg(path: Path, label: int = 0, index: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(labelled_image(label, index, 16)[..., 0], mode="L").save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue())
    return path


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _names(files) -> list[str]:
    return sorted(f.filename for f in files)


def _reasons(scan) -> dict[str, str]:
    return {os.path.basename(u.path): u.reason for u in scan.skipped}


# --- flags and values ------------------------------------------------------------------------------------


def test_label_values_syntax():
    assert table_rows.parse_label_values(["1=PNEUMONIA", "0=normal", "Sick=Pneumonia"]) == {
        "1": 1, "0": 0, "sick": 1}
    assert table_rows.parse_label_values([])["1"] == 1  # default: 0/1 and the class names
    assert table_rows.normalise_value(" 1.0 ") == table_rows.normalise_value("1")
    for bad in (["PNEUMONIA=1"], ["1"], ["=NORMAL"], ["1=PNEUMONIA", "1.0=NORMAL"]):
        with pytest.raises(ValueError, match="VALUE=CLASS|both classes"):
            table_rows.parse_label_values(bad)


@pytest.mark.parametrize("flags, message", [
    (dict(labels_csv="t.csv", label_column="y"), "--image_column: is required"),
    (dict(labels_csv="t.csv", image_column="f", label_column="y", label_values=("PNEUMONIA=1",)),
     "--label_values: 'PNEUMONIA=1': write VALUE=CLASS"),
    (dict(labels_format="rsna", image_column="f"), "--image_column: names a column"),
    (dict(image_column="f"), "--image_column: is only used with --labels_csv"),
    (dict(labels_format="rsna", test_fraction=0.0), "--test_fraction"),
    (dict(labels_format="chexpert", uncertain="maybe"), "--uncertain"),
])
def test_build_config_checks_table_flags(flags, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build.BuildConfig(input_dir="in", output_dir="out", **flags)


# --- finding the files -------------------------------------------------------------------------------------


def test_name_found_twice_is_an_error_naming_both_paths(tmp_path):
    first, second = _png(tmp_path / "a" / "x.png"), _png(tmp_path / "b" / "x.png")
    index = tables.FolderIndex(str(tmp_path))
    with pytest.raises(tables.TableError) as error:
        index.find("x.png")
    assert str(first) in str(error.value) and str(second) in str(error.value)
    assert index.find("a/x.png") == str(first)  # a path picks one
    assert index.find("data/b/x.png") == str(second)  # --input_dir is one of the path's folders
    assert index.find("missing.png") is None


def test_a_name_found_twice_names_neither_folder_under_redact_paths(tmp_path):
    from cxr_tfdata.core import patient_keys

    _png(tmp_path / "Jane-Doe-MRN1" / "x.png"), _png(tmp_path / "John-Roe-MRN2" / "x.png")
    key = patient_keys.load_key(str(tmp_path.parent / "site.key"))
    index = tables.FolderIndex(str(tmp_path), patient_keys.ShownPaths(str(tmp_path), key).full)
    with pytest.raises(tables.TableError, match="found 2 times") as error:
        index.find("x.png")
    assert "MRN" not in str(error.value) and "Doe" not in str(error.value)


def test_a_path_is_found_when_input_dir_lies_above_the_tables_root(tmp_path):
    image = _png(tmp_path / "site" / "images" / "p1" / "x.png")
    assert tables.FolderIndex(str(tmp_path)).find("images/p1/x.png") == str(image)


# --- the generic table ------------------------------------------------------------------------------------


def _generic_folder(root: Path) -> Path:
    """8 images of 4 patients in train, 4 of 4 in test, one patient also in test, and the rows to skip."""
    rows = []
    for i in range(12):
        split, label = ("train" if i < 8 else "test"), i % 2
        _png(root / "pngs" / f"img{i:02d}.png", label, i)
        rows.append([f"img{i:02d}.png", ["healthy", "sick"][label], f"P{i // 2 if i < 8 else i}", split])
    rows.append(["img00.png", "healthy", "P0", "val"])  # the same file again
    _png(root / "pngs" / "leak.png", 1, 20)
    rows.append(["leak.png", "sick", "P11", "train"])  # P11 is in test too: dropped from train
    rows.append(["gone.png", "sick", "P20", "train"])  # missing file
    _png(root / "pngs" / "odd.png", 0, 21)
    rows.append(["odd.png", "maybe", "P21", "train"])  # unknown label value
    _png(root / "pngs" / "nosplit.png", 0, 22)
    rows.append(["nosplit.png", "healthy", "P22", "later"])  # unknown split value
    for i in range(3):
        _png(root / "pngs" / "extra" / f"unnamed{i}.png", 0, 30 + i)
    return _csv(root / "labels.csv", ["file", "diagnosis", "pid", "subset"], rows)


GENERIC = dict(image_column="file", label_column="diagnosis", label_values=("healthy=NORMAL", "sick=PNEUMONIA"),
               patient_column="pid", split_column="subset")


def test_generic_table_with_a_split_column(tmp_path):
    table = _generic_folder(tmp_path / "in")
    scan = tables.scan_table(str(tmp_path / "in"), TableOptions(str(table), **GENERIC))
    assert set(scan.by_split) == {"train", "test"}  # no val row: val is carved later by plan.py
    assert len(scan.by_split["train"]) == 9 and len(scan.by_split["test"]) == 4
    assert scan.by_split["train"][0].patient_id == "P0" and scan.summary["test_source"] == "given"
    reasons = _reasons(scan)
    assert reasons["img00.png"] == "labels.csv line 14: names the same file as labels.csv line 2"
    assert reasons["gone.png"].endswith("no such file under --input_dir")
    assert "unknown label value 'maybe' in column 'diagnosis'" in reasons["odd.png"]
    assert "unknown split value 'later'" in reasons["nosplit.png"]
    assert [u.path for u in scan.file_problems] == [str(tmp_path / "in" / "gone.png")]
    assert scan.summary["num_unnamed_images"] == 3  # the table itself is not counted


def test_unnamed_images_are_counted_exactly_and_listed_up_to_the_cap(tmp_path, monkeypatch):
    table = _generic_folder(tmp_path / "in")
    monkeypatch.setattr(tables, "MAX_LISTED_UNNAMED", 2)
    scan = tables.scan_table(str(tmp_path / "in"), TableOptions(str(table), **GENERIC))
    assert scan.summary["num_unnamed_images"] == 3
    assert [os.path.basename(p) for p in scan.summary["unnamed_images"]] == ["unnamed0.png", "unnamed1.png"]


def test_generic_table_build_lists_skips_and_drops_a_patient_in_two_given_splits(tmp_path):
    table = _generic_folder(tmp_path / "in")
    manifest = build.build_dataset(build.BuildConfig(
        input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"), image_size=32, encoding="png",
        val_fraction=0.0, num_workers=1, labels_csv=str(table), **GENERIC))
    assert manifest["splits"]["train"]["num_examples"] == 8 and manifest["splits"]["test"]["num_examples"] == 4
    assert manifest["splits"]["train"]["num_dropped_leaks"] == 1
    assert [d["path"] for d in manifest["dropped_leaks"]] == ["pngs/leak.png"]
    assert len(manifest["patients_in_several_given_splits"]) == 1
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert skipped["gone.png"].endswith("no such file under --input_dir")
    assert "unknown label value" in skipped["pngs/odd.png"]
    assert manifest["table"]["num_unnamed_images"] == 3
    assert manifest["table"]["unnamed_images"][0] == "pngs/extra/unnamed0.png"


# --- presets ---------------------------------------------------------------------------------------------


def test_rsna_preset_builds_dicoms_with_several_rows_per_image(tmp_path):
    pytest.importorskip("pydicom", reason='the DICOM reader needs pip install "cxr-tfdata[dicom]"')
    from tests.dicom_writer import write_dicom

    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    rows = []
    for i in range(10):
        pid, label = f"rsna-{i:03d}", i % 2
        window = dict(WindowCenter="127.5", WindowWidth="255", VOILUTFunction="LINEAR_EXACT")
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", labelled_image(label, i, 16)[..., 0], **window)
        if label:  # two boxes, and one of its rows says 0: still positive
            rows += [[pid, 10, 20, 30, 40, 1], [pid, 50, 60, 10, 10, 1], [pid, "", "", "", "", 0]]
        else:
            rows.append([pid, "", "", "", "", 0])
    rows.append(["rsna-999", "", "", "", "", 0])  # no such file
    rows.append(["rsna-000", "", "", "", "", "x"])  # a bad row of a good image
    _csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    manifest = build.build_dataset(build.BuildConfig(
        input_dir=str(root), output_dir=str(tmp_path / "out"), image_size=32, encoding="png", val_fraction=0.0,
        num_workers=1, labels_format="rsna", test_fraction=0.2))
    counts = {s: e["class_counts"] for s, e in manifest["splits"].items()}
    assert counts == {"train": {"NORMAL": 4, "PNEUMONIA": 4}, "test": {"NORMAL": 1, "PNEUMONIA": 1}}
    assert manifest["table"]["test_source"].startswith("carved from train by patient")
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert skipped["rsna-999.dcm"].endswith("no such file under --input_dir")
    assert "unknown label value 'x' in column 'Target'" in skipped["stage_2_train_images/rsna-000.dcm"]


def _nih_folder(root: Path, lists: bool = True) -> Path:
    findings = ["No Finding", "Pneumonia|Effusion", "Effusion", "Pneumonia", "No Finding", "Infiltration|Pneumonia",
                "Atelectasis", "No Finding", "Pneumonia", "No Finding"]
    rows, train, test = [], [], []
    for i, finding in enumerate(findings):
        name = f"{i:08d}_000.png"
        _png(root / f"images_{1 + i // 5:03d}" / "images" / name, int("Pneumonia" in finding), i)
        rows.append([name, finding, 0, i])
        (test if i >= 6 else train).append(name)
    _png(root / "images_002" / "images" / "00000099_000.png", 0, 99)
    rows.append(["00000099_000.png", "No Finding", 0, 99])  # in neither list
    if lists:
        (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
        (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return _csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID"], rows)


def test_nih_preset_nested_folders_and_official_lists(tmp_path):
    _nih_folder(tmp_path)
    scan = tables.scan_table(str(tmp_path), TableOptions(labels_format="nih"))
    labels = {f.filename: f.label for files in scan.by_split.values() for f in files}
    assert labels["images_001/images/00000001_000.png"] == 1 and labels["images_001/images/00000002_000.png"] == 0
    assert len(scan.by_split["train"]) == 6 and len(scan.by_split["test"]) == 4
    assert scan.by_split["test"][0].patient_id == "6"
    assert "in neither train_val_list.txt nor test_list.txt" in _reasons(scan)["00000099_000.png"]
    assert set(scan.summary["files_read"]) == {str(tmp_path / n) for n in (
        "Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt")}


def test_nih_no_finding_only_as_normal(tmp_path):
    _nih_folder(tmp_path)
    scan = tables.scan_table(str(tmp_path), TableOptions(labels_format="nih", nih_normal="no_finding"))
    assert "neither Pneumonia nor only 'No Finding'" in _reasons(scan)["00000002_000.png"]
    assert sum(len(files) for files in scan.by_split.values()) == 8


def test_nih_without_lists_carves_test_and_one_list_alone_is_an_error(tmp_path):
    _nih_folder(tmp_path / "a", lists=False)
    scan = tables.scan_table(str(tmp_path / "a"), TableOptions(labels_format="nih"))
    assert scan.summary["test_source"].startswith("carved") and len(scan.by_split["test"]) >= 2
    _nih_folder(tmp_path / "b")
    (tmp_path / "b" / "test_list.txt").unlink()
    with pytest.raises(tables.TableError, match="give both lists or neither"):
        tables.scan_table(str(tmp_path / "b"), TableOptions(labels_format="nih"))


def _chexpert_folder(root: Path) -> Path:
    """train.csv: per patient 1.0, 0.0, -1.0 and blank; valid.csv: two labelled rows."""
    base, rows = root / "CheXpert-v1.0-small", []
    for p, value in enumerate(["1.0", "0.0", "-1.0", "", "1.0", "0.0", "1.0", "0.0", "-1.0", "1.0", "0.0"]):
        rel = f"CheXpert-v1.0-small/train/patient{p:05d}/study1/view1_frontal.jpg"
        _jpeg(root / rel, int(value == "1.0"), p)
        rows.append([rel, "Female", 50, "Frontal", value])
    _csv(base / "train.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "Pneumonia"], rows)
    valid = []
    for p, value in ((64540, "1.0"), (64541, "0.0")):
        rel = f"CheXpert-v1.0-small/valid/patient{p:05d}/study1/view1_frontal.jpg"
        _jpeg(root / rel, int(value == "1.0"), p)
        valid.append([rel, "Male", 60, "Frontal", value])
    _csv(base / "valid.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "Pneumonia"], valid)
    return base / "train.csv"


@pytest.mark.parametrize("uncertain, expected", [("exclude", None), ("positive", 1), ("negative", 0)])
def test_chexpert_preset_uncertain_and_blank(tmp_path, uncertain, expected):
    table = _chexpert_folder(tmp_path)
    scan = tables.scan_table(str(tmp_path / "CheXpert-v1.0-small"),  # the table's root folder as --input_dir
                             TableOptions(str(table), labels_format="chexpert", uncertain=uncertain))
    files = {f.filename: f for fs in scan.by_split.values() for f in fs}
    uncertain_file = files.get("train/patient00002/study1/view1_frontal.jpg")
    assert (uncertain_file.label if uncertain_file else None) == expected
    reasons = {u.reason.split(": ", 1)[1] for u in scan.skipped}
    assert "not labelled (blank 'Pneumonia')" in reasons
    assert ("uncertain (-1.0 'Pneumonia'; --uncertain=exclude)" in reasons) == (uncertain == "exclude")
    assert _names(scan.by_split["val"]) == [f"valid/patient{p}/study1/view1_frontal.jpg" for p in (64540, 64541)]
    assert files["valid/patient64540/study1/view1_frontal.jpg"].patient_id == "patient64540"
    assert scan.by_split["test"] and scan.summary["test_source"].startswith("carved")


def test_chexpert_from_the_folder_above(tmp_path):
    table = _chexpert_folder(tmp_path)
    scan = tables.scan_table(str(tmp_path), TableOptions(str(table), labels_format="chexpert"))
    assert len(scan.by_split["val"]) == 2 and not scan.file_problems
    assert scan.summary["num_unnamed_images"] == 0
