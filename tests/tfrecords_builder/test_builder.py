"""cxr-build-tfrecords end to end: real images through TFDS, every bad input, the binary itself."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from cxr_tfdata.core import dataset_info, folder_scan, patient_keys, record_schema
from cxr_tfdata.core.progress import Progress
from tests.helpers import REPO_ROOT, SHARED_DATA, assert_quiet, requires_shared_data
from tfrecords_builder import build, sample, worker, writer


def _config(input_dir, output_dir, **overrides):
    settings = dict(input_dir=str(input_dir), output_dir=str(output_dir), image_size=32,
                    num_workers=1, num_shards=2)
    settings.update(overrides)
    return build.BuildConfig(**settings)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "images"
    sample.write_sample(str(path), num_images=40, seed=3)
    return path


@pytest.fixture
def images(sample_dir, tmp_path):
    """A private copy of the synthetic sample that a test may damage."""
    return shutil.copytree(sample_dir, tmp_path / "images")


def _records(data_dir, split):
    builder = tfds.builder_from_directory(str(data_dir))
    return list(builder.as_dataset(split=split).as_numpy_iterator())


@requires_shared_data
def test_real_images_build_reads_back_through_tfds_with_exact_counts(tmp_path):
    source = shutil.copytree(SHARED_DATA / "chest_xray_orig", tmp_path / "orig")
    manifest = build.build_dataset(_config(source, tmp_path / "out", image_size=64, num_workers=2,
                                           num_shards=0, target_shard_mb=0.1))
    builder = tfds.builder_from_directory(str(tmp_path / "out"))
    assert builder.info.features["label"].names == list(record_schema.CLASS_NAMES)
    assert builder.info.features["image"].shape == (64, 64, 1)
    counts = {s: builder.info.splits[s].num_examples for s in ("train", "val", "test")}
    num_sources = sum(1 for _ in source.glob("*/*/*.jpeg"))
    dropped = len(manifest["dropped_leaks"]) + len(manifest["skipped"])
    assert sum(counts.values()) == num_sources - dropped
    assert counts["test"] == 71  # test stays as given: 40 NORMAL + 31 PNEUMONIA
    assert manifest["splits"]["test"]["class_counts"] == {"NORMAL": 40, "PNEUMONIA": 31}
    assert manifest["val_source"] == "carved from train"
    patients_by_split = {}
    for split in counts:
        records = _records(tmp_path / "out", split)
        assert len(records) == counts[split] == manifest["splits"][split]["num_examples"]
        assert manifest["splits"][split]["num_shards"] >= 2
        labels = [int(r["label"]) for r in records]
        assert manifest["splits"][split]["class_counts"] == {"NORMAL": labels.count(0), "PNEUMONIA": labels.count(1)}
        assert all(r["image"].shape == (64, 64, 1) and r["original_width"] >= 399 for r in records)
        patients_by_split[split] = {r["patient_id"] for r in records}
    assert not patients_by_split["train"] & patients_by_split["val"]
    assert not patients_by_split["train"] & patients_by_split["test"]
    assert not patients_by_split["val"] & patients_by_split["test"]
    assert manifest["duplicates"] == {"within_split": [], "across_splits": []}  # none in this folder
    raw = next(iter(tf.data.TFRecordDataset(str(tmp_path / "out" / manifest["splits"]["val"]["shard_files"][0]))))
    parsed = tf.io.parse_single_example(raw, record_schema.parse_spec())  # the schema readers use
    assert tf.io.decode_jpeg(parsed["image"]).shape == (64, 64, 1)


def _add_bad_and_odd_files(images):
    normal = images / "train" / "NORMAL"
    good = sorted(normal.glob("*.jpeg"))[0].read_bytes()
    (normal / "IM-9001-0001.jpeg").write_bytes(b"")
    (normal / "IM-9002-0001.jpeg").write_bytes(good[: len(good) // 2])
    (normal / "IM-9003-0001.jpeg").write_bytes(b"\xff\xd8\xff\xe0garbage" * 50)
    (normal / "notes.txt").write_text("not an image")
    gray = np.asarray(Image.open(io.BytesIO(good)).convert("L"))
    Image.fromarray(np.stack([gray] * 3, -1)).convert("CMYK").save(normal / "IM-9004-0001.jpeg")
    Image.fromarray(gray.astype(np.uint16) * 257).save(normal / "IM-9005-0001.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)])).save(normal / "IM-9006-0001.png")
    rotated = Image.fromarray(gray)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(normal / "IM-9007-0001.jpeg", exif=exif.tobytes())
    return {"train/NORMAL/IM-9001-0001.jpeg", "train/NORMAL/IM-9002-0001.jpeg",
            "train/NORMAL/IM-9003-0001.jpeg", "train/NORMAL/notes.txt"}, gray.shape


def test_bad_files_are_skipped_with_reasons_and_odd_formats_kept(images, tmp_path):
    bad, (height, width) = _add_bad_and_odd_files(images)
    num_good = sum(1 for p in images.glob("*/*/*") if p.is_file()) - len(bad)
    manifest = build.build_dataset(_config(images, tmp_path / "out", num_workers=2))
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == bad
    assert sum(s["num_skipped"] for s in manifest["splits"].values()) == len(bad)
    assert "empty" in skipped["train/NORMAL/IM-9001-0001.jpeg"]
    assert "truncated" in skipped["train/NORMAL/IM-9002-0001.jpeg"]
    assert "not a recognised image" in skipped["train/NORMAL/notes.txt"]
    assert sum(s["num_examples"] for s in manifest["splits"].values()) == num_good
    by_name = {r["filename"].decode(): r for s in manifest["splits"] for r in _records(tmp_path / "out", s)}
    for name in ("IM-9004-0001.jpeg", "IM-9005-0001.png", "IM-9006-0001.png"):
        record = by_name[f"NORMAL/{name}"]
        assert (record["original_height"], record["original_width"]) == (height, width)
        assert record["patient_id"].decode() == patient_keys.load_key().patient(name[:7])
    assert (by_name["NORMAL/IM-9007-0001.jpeg"]["original_height"],
            by_name["NORMAL/IM-9007-0001.jpeg"]["original_width"]) == (width, height)


def test_strict_makes_a_bad_file_fatal_and_writes_nothing(images, tmp_path):
    (images / "test" / "PNEUMONIA" / "person999_virus_1.jpeg").write_bytes(b"")
    with pytest.raises(writer.BuildError, match="person999_virus_1.jpeg"):
        build.build_dataset(_config(images, tmp_path / "out", strict=True))
    assert sorted(os.listdir(tmp_path)) == ["images"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: shutil.rmtree(d / "train" / "PNEUMONIA"), "missing class folder .*train/PNEUMONIA"),
        (lambda d: [p.unlink() for p in (d / "test" / "NORMAL").iterdir()], "empty class folder .*test/NORMAL"),
        (lambda d: (d / "train" / "COVID").mkdir(), "unknown class folder .*train/COVID"),
        (lambda d: (d / "extra").mkdir(), "unknown split folder .*extra"),
        (lambda d: shutil.rmtree(d / "test"), "missing split folder .*test"),
    ],
)
def test_bad_layout_names_the_path_and_writes_nothing(images, tmp_path, damage, message):
    damage(images)
    with pytest.raises(folder_scan.LayoutError, match=message):
        build.build_dataset(_config(images, tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["images"]


def test_images_in_subfolders_of_a_class_folder_are_read(images, tmp_path):
    normal = images / "train" / "NORMAL"
    (normal / "batch2" / ".hidden").mkdir(parents=True)
    moved = sorted(normal.glob("*.jpeg"))[0]
    shutil.move(str(moved), normal / "batch2" / moved.name)
    shutil.copy(normal / "batch2" / moved.name, normal / "batch2" / ".hidden" / "IM-9999-0001.jpeg")
    (normal / "batch2" / "notes.txt").write_text("not an image")
    num_files = sum(1 for p in images.glob("*/*/*") if p.is_file()) + 1
    manifest = build.build_dataset(_config(images, tmp_path / "out"))
    assert sum(s["num_examples"] for s in manifest["splits"].values()) == num_files
    assert manifest["skipped"] == [{"path": "train/NORMAL/batch2/notes.txt",
                                    "reason": "not a recognised image format"}]
    names = {r["filename"].decode() for s in manifest["splits"] for r in _records(tmp_path / "out", s)}
    assert f"NORMAL/batch2/{moved.name}" in names


def test_a_class_with_only_bad_files_is_an_error(images, tmp_path):
    for path in (images / "test" / "NORMAL").iterdir():
        path.write_bytes(b"not a jpeg")
    with pytest.raises(writer.BuildError, match="test/NORMAL"):
        build.build_dataset(_config(images, tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["images"]


def test_existing_dataset_is_refused_then_replaced_with_overwrite(images, tmp_path):
    out = tmp_path / "out"
    build.build_dataset(_config(images, out))
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(writer.BuildError, match="already exists.*--overwrite"):
        build.build_dataset(_config(images, out))
    assert (out / "manifest.json").read_bytes() == before
    stale = tmp_path / ".out.incomplete-999999999"  # a killed run's staging folder
    (stale / "dataset").mkdir(parents=True)
    manifest = build.build_dataset(_config(images, out, overwrite=True, encoding="png"))
    assert json.loads((out / "manifest.json").read_text())["encoding"] == "png" == manifest["encoding"]
    assert sorted(os.listdir(tmp_path)) == ["images", "out"]


def test_small_given_val_is_merged_and_a_large_one_kept(images, tmp_path):
    val = images / "val" / "PNEUMONIA"
    val.mkdir(parents=True)
    shutil.move(str(next((images / "train" / "PNEUMONIA").glob("*.jpeg"))), val)
    merged = build.build_dataset(_config(images, tmp_path / "a", min_val_images=5))
    assert merged["val_source"] == "carved from train"
    kept = build.build_dataset(_config(images, tmp_path / "b", min_val_images=1))
    assert kept["val_source"] == "given" and kept["splits"]["val"]["num_examples"] == 1


def test_pad_and_seed_are_recorded_and_carve_out_is_seeded(images, tmp_path):
    first = build.build_dataset(_config(images, tmp_path / "a", resize="pad", seed=1))
    again = build.build_dataset(_config(images, tmp_path / "b", resize="pad", seed=1))
    assert first["flags"]["resize"] == "pad" and first["flags"]["seed"] == 1
    # cxr-predict/cxr-export --data_dir read these settings back from the manifest the builder writes.
    from cxr_tfdata.modeling import contract

    assert contract.preparation(dataset_info.load(str(tmp_path / "a")).manifest) == {
        "image_size": first["image_size"], "resize": "pad", "record_encoding": "jpeg", "jpeg_quality": 95}
    assert first["splits"]["val"]["class_counts"] == again["splits"]["val"]["class_counts"]
    assert sorted(r["filename"] for r in _records(tmp_path / "a", "val")) == sorted(
        r["filename"] for r in _records(tmp_path / "b", "val"))


def _run_binary(*args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "tfrecords_builder", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def test_binary_missing_input_dir_exits_nonzero_and_leaves_no_output(tmp_path):
    result = _run_binary(f"--input_dir={tmp_path / 'nope'}", f"--output_dir={tmp_path / 'out'}")
    assert result.returncode != 0
    assert f"{tmp_path / 'nope'}" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()


def test_binary_builds_and_verifies(images, tmp_path):
    result = _run_binary(f"--input_dir={images}", f"--output_dir={tmp_path / 'out'}", "--image_size=32",
                         "--num_workers=2", "--verify")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_quiet(result.stderr, "cxr-build-tfrecords", f"cxr-build-tfrecords: wrote {tmp_path / 'out'}: train ")
    assert "OK" in result.stderr and "converted: 40/40 images (100%)" in result.stderr
    assert dataset_info.read_manifest(str(tmp_path / "out"))["flags"]["num_workers"] == 2


def test_interrupted_build_leaves_nothing_behind(images, tmp_path, monkeypatch):
    real_convert, calls = worker.convert_file, []

    def convert_then_interrupt(task):
        calls.append(task)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real_convert(task)

    monkeypatch.setattr(worker, "convert_file", convert_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build.build_dataset(_config(images, tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["images"]


def test_a_file_that_changes_during_the_build_is_skipped(images, tmp_path, monkeypatch):
    real_hash = writer.hash_sources
    changed = sorted((images / "train" / "PNEUMONIA").glob("*.jpeg"))[0]

    def hash_then_change(pool, paths, max_bytes):
        hashes = real_hash(pool, paths, max_bytes)
        hashes[str(changed)] = "0" * 64  # as if the bytes differed when they were hashed
        return hashes

    monkeypatch.setattr(writer, "hash_sources", hash_then_change)
    manifest = build.build_dataset(_config(images, tmp_path / "out"))
    assert manifest["skipped"] == [{"path": f"train/PNEUMONIA/{changed.name}",
                                    "reason": "file changed while the dataset was being built"}]


def test_progress_line_reports_rate_and_eta():
    now = [100.0]
    progress = Progress(total=10, label="converted", clock=lambda: now[0])
    now[0] = 102.0
    progress.advance(5)
    assert progress.line() == "converted: 5/10 images (50%), 2.5 images/s, ETA 00:00:02"


def test_identical_files_are_reported_and_leaks_dropped_from_train(images, tmp_path, caplog):
    train_file = sorted((images / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    shutil.copy(train_file, images / "test" / "PNEUMONIA" / "person900_virus_1.jpeg")  # a leak
    shutil.copy(train_file, images / "train" / "PNEUMONIA" / "person901_virus_1.jpeg")  # train twin
    with caplog.at_level(logging.INFO, logger="absl"):
        manifest = build.build_dataset(_config(images, tmp_path / "out"))
    assert manifest["splits"]["train"]["num_dropped_leaks"] == 2
    assert manifest["splits"]["test"]["num_dropped_leaks"] == 0
    [train_line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("split train:")]
    assert "2 dropped as leaks" in train_line and "0 skipped as unreadable (0.0%)" in train_line
    [leak] = manifest["duplicates"]["across_splits"]
    assert leak["kept_in"] == "test" and leak["paths"]["test"] == ["test/PNEUMONIA/person900_virus_1.jpeg"]
    assert {d["path"] for d in manifest["dropped_leaks"]} == {
        f"train/PNEUMONIA/{train_file.name}", "train/PNEUMONIA/person901_virus_1.jpeg"}
    names = {r["filename"].decode() for s in manifest["splits"] for r in _records(tmp_path / "out", s)}
    assert "PNEUMONIA/person900_virus_1.jpeg" in names and "PNEUMONIA/person901_virus_1.jpeg" not in names


def test_identical_files_in_one_split_are_kept_and_reported(images, tmp_path):
    train_file = sorted((images / "train" / "NORMAL").glob("*.jpeg"))[0]
    shutil.copy(train_file, images / "train" / "NORMAL" / "IM-9999-0001.jpeg")
    manifest = build.build_dataset(_config(images, tmp_path / "out"))
    [group] = manifest["duplicates"]["within_split"]
    assert group["paths"] == sorted([f"train/NORMAL/{train_file.name}", "train/NORMAL/IM-9999-0001.jpeg"])
    assert manifest["dropped_leaks"] == []


def test_split_losses_are_logged_with_shares_and_a_warning_above_five_percent(caplog):
    def entry(written, skipped, dropped):
        return {"num_examples": written, "num_skipped": skipped, "num_dropped_leaks": dropped}

    splits = {"train": entry(90, 4, 6), "val": entry(95, 0, 5), "test": entry(97, 2, 1)}
    with caplog.at_level(logging.INFO, logger="absl"):
        build.log_split_losses(splits)
    lines = {r.getMessage().split(":")[0]: r for r in caplog.records if r.getMessage().startswith("split ")}
    assert lines["split train"].levelno == logging.WARNING  # 10% missing
    assert lines["split train"].getMessage().startswith(
        "split train: 90 of 100 images written; 4 skipped as unreadable (4.0%), 6 dropped as leaks (6.0%): "
        "more than 5% of the split is missing")
    assert lines["split val"].levelno == logging.INFO  # exactly 5%: not more
    assert lines["split test"].levelno == logging.INFO
    assert lines["split test"].getMessage() == (
        "split test: 97 of 100 images written; 2 skipped as unreadable (2.0%), 1 dropped as leaks (1.0%)")


def test_binary_unwritable_output_names_the_path_without_a_traceback(images, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = _run_binary(f"--input_dir={images}", f"--output_dir={blocker / 'out'}", "--image_size=32")
    assert result.returncode == 1
    assert f"cxr-build-tfrecords: error: {blocker}" in result.stderr
    assert "Traceback" not in result.stderr


_OLD_MANIFEST = '{"format_version": 1, "splits": {}, "tfds": {}, "old": true}'


def _old_dataset(path):
    """A stand-in for an earlier build: what cxr-build-tfrecords recognises as its own dataset."""
    path.mkdir()
    (path / "manifest.json").write_text(_OLD_MANIFEST)
    (path / "dataset_info.json").write_text("{}")
    return path


def test_overwrite_interrupted_between_the_renames_keeps_the_old_dataset(images, tmp_path, monkeypatch):
    out = _old_dataset(tmp_path / "out")
    real_rename = os.rename

    def rename_then_die(source, target):
        if str(target) == str(out) and os.path.basename(source) == "dataset":
            raise KeyboardInterrupt  # after the old dataset moved aside, before the new one moved in
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        build.build_dataset(_config(images, out, overwrite=True))
    assert (out / "manifest.json").read_text() == _OLD_MANIFEST
    assert sorted(os.listdir(tmp_path)) == ["images", "out"]


def test_a_dataset_left_aside_by_a_killed_overwrite_is_restored_by_the_next_run(images, tmp_path, caplog):
    previous = _old_dataset(tmp_path / ".out.previous-999999999")  # the killed run's pid
    with caplog.at_level(logging.INFO, logger="absl"), pytest.raises(writer.BuildError, match="already exists"):
        build.build_dataset(_config(images, tmp_path / "out"))
    assert (tmp_path / "out" / "manifest.json").read_text() == _OLD_MANIFEST and not previous.exists()
    assert any("restored" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # The swap had completed: the leftover is the replaced dataset and goes.
    _old_dataset(previous)
    build.build_dataset(_config(images, tmp_path / "out", overwrite=True))
    assert sorted(os.listdir(tmp_path)) == ["images", "out"]
