"""Every binary as a hostile or careless user would run it, against real folders.

Each case ends by checking what matters: the user's files are still there with the same bytes, no
hidden staging or lock file is left behind, and the error is one line naming what is wrong.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_tfdata import (
    dataset_info,
    locking,
    model_io,
    outputs,
    predict,
    run_dir,
    stages,
    tables,
)
from tests import eval_fixtures
from tests.helpers import REPO_ROOT, write_tiny_dataset
from tfrecords_builder import build, imaging, sample, writer

IMAGE_SIZE = 32


# ----------------------------------------------------------------------------------------------
# Helpers


def _tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 (files), 'dir' (folders) or 'link:<target>' (symlinks): a snapshot."""
    snapshot = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = Path(root) / name
            rel = str(full.relative_to(path))
            if full.is_symlink():
                snapshot[rel] = f"link:{os.readlink(full)}"
            elif full.is_dir():
                snapshot[rel] = "dir"
            else:
                snapshot[rel] = hashlib.sha256(full.read_bytes()).hexdigest()
    return snapshot


def _user_home(path: Path) -> Path:
    """A folder of someone's own files."""
    (path / "photos").mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work")
    (path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff not really a cat")
    return path


def _run(module: str, *args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    full_env.pop("CXR_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _one_error_line(result: subprocess.CompletedProcess, program: str) -> str:
    """The single '<program>: error: ...' line of a failed run (no traceback, nothing after it)."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(errors[0])
    return errors[0]


_HOLDER = textwrap.dedent("""
    import sys, time
    from cxr_tfdata import locking
    with locking.exclusive_lock(sys.argv[1], "test", sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
""")


@contextlib.contextmanager
def _lock_held_by_another_process(lock_path: str, program: str):
    """A real second process holding the lock; yields its pid, and kills it with SIGKILL after."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, lock_path, program], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False):
    """A small real file system mounted at path (root only; the test is skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose valid IHDR announces width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_with_blank_scan(path: Path) -> bytes:
    """A real JPEG whose header is intact but whose entropy-coded scan data is zeroed."""
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    scan_start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    end = data.rindex(b"\xff\xd9")
    return data[:scan_start] + bytes(end - scan_start) + data[end:]


def _good_png(value: int = 100) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "images"
    sample.write_sample(str(path), num_images=24, seed=5)
    return path


@pytest.fixture
def images(sample_dir, tmp_path):
    return shutil.copytree(sample_dir, tmp_path / "images")


def _build_config(input_dir, output_dir, **overrides):
    settings = dict(input_dir=str(input_dir), output_dir=str(output_dir), image_size=IMAGE_SIZE,
                    num_workers=1, num_shards=1)
    settings.update(overrides)
    return build.BuildConfig(**settings)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return eval_fixtures.get_tiny_setup(tmp_path_factory)


# ----------------------------------------------------------------------------------------------
# cxr-build-tfrecords


def test_build_overwrite_refuses_a_users_folder_and_changes_nothing(images, tmp_path):
    home = _user_home(tmp_path / "victim" / "home")
    before = _tree(tmp_path / "victim")
    with pytest.raises(outputs.UnsafeOutputError) as refused:
        build.build_dataset(_build_config(images, home, overwrite=True))
    assert str(home) in str(refused.value) and "thesis.txt" in str(refused.value)
    assert _tree(tmp_path / "victim") == before
    assert sorted(os.listdir(tmp_path / "victim")) == ["home"]  # no lock, staging or .previous left


@pytest.mark.parametrize("where", ["parent_of_input", "input_itself", "inside_input", "symlink_to_input"])
def test_build_output_overlapping_the_input_is_refused(images, tmp_path, where):
    output = {"parent_of_input": tmp_path, "input_itself": images, "inside_input": images / "train" / "out",
              "symlink_to_input": tmp_path / "link"}[where]
    if where == "symlink_to_input":
        output.symlink_to(images)
    before = _tree(tmp_path)
    with pytest.raises(outputs.UnsafeOutputError, match="--input_dir"):
        build.build_dataset(_build_config(images, output, overwrite=True))
    assert _tree(tmp_path) == before


def test_a_second_build_of_the_same_output_is_refused_naming_the_first(images, tmp_path):
    out = tmp_path / "out"
    with _lock_held_by_another_process(locking.lock_path_beside(str(out)), "cxr-build-tfrecords") as pid:
        with pytest.raises(locking.LockedError, match=f"cxr-build-tfrecords \\(pid {pid} on host .*, started 20"):
            build.build_dataset(_build_config(images, out))
        assert not out.exists()
    # The holder was killed with SIGKILL: the operating system released its lock.
    build.build_dataset(_build_config(images, out))
    assert (out / "manifest.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["images", "out"]


def test_unusable_entries_of_class_folders_are_listed_not_dropped(images, tmp_path):
    normal = images / "train" / "NORMAL"
    (normal / "linked_folder").symlink_to(images / "test" / "NORMAL", target_is_directory=True)
    (normal / "dangling.jpeg").symlink_to(tmp_path / "gone.jpeg")
    os.mkfifo(normal / "pipe.jpeg")
    (normal / "zero.jpeg").symlink_to("/dev/zero")
    manifest = build.build_dataset(_build_config(images, tmp_path / "out"))
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert reasons["train/NORMAL/linked_folder"] == "symbolic link to a folder (not followed)"
    assert reasons["train/NORMAL/dangling.jpeg"] == "broken symbolic link"
    assert reasons["train/NORMAL/pipe.jpeg"].startswith("a FIFO (named pipe), not a regular file")
    assert reasons["train/NORMAL/zero.jpeg"].startswith("a character device, not a regular file")
    with pytest.raises(writer.BuildError, match="pipe.jpeg|linked_folder|dangling|zero"):
        build.build_dataset(_build_config(images, tmp_path / "strict", strict=True))
    assert not (tmp_path / "strict").exists()


def test_a_jpeg_with_blank_scan_data_is_flagged_and_fatal_under_strict(images, tmp_path):
    victim = sorted((images / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    victim.write_bytes(_jpeg_with_blank_scan(victim))
    manifest = build.build_dataset(_build_config(images, tmp_path / "out"))
    flagged = [entry["path"] for entry in manifest["near_constant"]]
    assert flagged == [f"train/PNEUMONIA/{victim.name}"]
    assert manifest["near_constant"][0]["pixel_std"] < imaging.NEAR_CONSTANT_STD
    assert sum(s["num_near_constant"] for s in manifest["splits"].values()) == 1
    with pytest.raises(writer.BuildError, match=f"{victim.name}: near-constant image"):
        build.build_dataset(_build_config(images, tmp_path / "strict", strict=True))


def test_oversized_sources_and_bomb_headers_are_skipped_unread(images, tmp_path):
    (images / "train" / "NORMAL" / "bomb.png").write_bytes(_png_header_claiming(50_000, 50_000))
    big = images / "train" / "NORMAL" / "big.jpeg"
    big.write_bytes(b"\xff\xd8\xff" + bytes(300_000))
    manifest = build.build_dataset(_build_config(images, tmp_path / "out", max_file_mb=0.25))
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert "image too large" in reasons["train/NORMAL/bomb.png"]
    assert "larger than the 0.25 MB limit: not read" in reasons["train/NORMAL/big.jpeg"]


def test_build_binary_refusals_are_one_line(images, tmp_path):
    home = _user_home(tmp_path / "home")
    line = _one_error_line(_run("tfrecords_builder", f"--input_dir={images}", f"--output_dir={home}",
                                "--overwrite"), "cxr-build-tfrecords")
    assert f"--output_dir={home} is not a dataset written by cxr-build-tfrecords" in line
    assert "thesis.txt" in line and (home / "thesis.txt").read_text() == "four years of work"


def test_build_on_a_full_disk_fails_in_one_line_and_leaves_nothing(images, tmp_path):
    with _tmpfs(tmp_path / "small", "64k") as disk:
        result = _run("tfrecords_builder", f"--input_dir={images}", f"--output_dir={disk / 'out'}",
                      "--image_size=64", "--encoding=png", "--num_workers=1")
        line = _one_error_line(result, "cxr-build-tfrecords")
        assert "no space left on the device (disk full)" in line
        assert os.listdir(disk) == []


# ----------------------------------------------------------------------------------------------
# Manifests that point outside their dataset


def test_a_shard_path_leaving_the_dataset_folder_is_refused(tmp_path):
    from tfrecords_builder import verify

    data_dir = tmp_path / "records"
    manifest = write_tiny_dataset(data_dir, {"train": (2, 2), "val": (2, 2)}, image_size=IMAGE_SIZE, num_shards=1)
    manifest["splits"]["train"]["shard_files"] = ["../../../../etc/passwd"]
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="outside the dataset folder"):
        dataset_info.shard_paths(str(data_dir), dataset_info.read_manifest(str(data_dir)), "train")
    report = verify.verify_dataset(str(data_dir))
    assert any("outside the dataset folder" in error for error in report.errors)


# ----------------------------------------------------------------------------------------------
# cxr-train


def _train_config(data_dir, model_dir, **overrides):
    from cxr_tfdata.config import AugmentConfig, DataConfig, ModelConfig, StageConfig, TrainConfig

    settings = dict(
        model_dir=str(model_dir), data=DataConfig(data_dir=str(data_dir), image_size=IMAGE_SIZE),
        augment=AugmentConfig(placement="none"), model=ModelConfig(weights="none"),
        frozen=StageConfig(name="frozen", batch_size=4, epochs=1), stage="frozen", mixed_precision="float32")
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture
def records(tmp_path):
    write_tiny_dataset(tmp_path / "records", {"train": (6, 6), "val": (3, 3)}, image_size=IMAGE_SIZE)
    return tmp_path / "records"


def test_a_second_training_run_on_the_same_model_dir_is_refused(records, tmp_path):
    from cxr_tfdata import train

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with _lock_held_by_another_process(locking.lock_path_beside(str(model_dir)), "cxr-train") as pid:
        with pytest.raises(locking.LockedError, match=f"--model_dir={model_dir} is in use by cxr-train \\(pid {pid}"):
            train.train_and_evaluate(_train_config(records, model_dir))
    assert os.listdir(model_dir) == []  # the refused run wrote nothing


def test_resume_on_a_rebuilt_dataset_is_refused_naming_both_fingerprints(records, tmp_path):
    from cxr_tfdata import train

    model_dir = tmp_path / "model"
    config = _train_config(records, model_dir)
    started_on = dataset_info.manifest_fingerprint(dataset_info.read_manifest(str(records)))
    run_dir.prepare(config, started_on)
    state = run_dir.stage_paths(str(model_dir), "frozen").state
    Path(state).write_text(json.dumps({**stages.initial_state(config.frozen), "epochs_completed": 1}))
    shutil.rmtree(records)
    write_tiny_dataset(records, {"train": (4, 4), "val": (3, 3)}, image_size=IMAGE_SIZE)  # rebuilt, fewer images
    before = _tree(model_dir)
    with pytest.raises(run_dir.ConfigMismatchError) as refused:
        train.train_and_evaluate(config)
    message = str(refused.value)
    now = dataset_info.manifest_fingerprint(dataset_info.read_manifest(str(records)))
    assert started_on[:23] in message and now[:23] in message and now != started_on
    assert f"--data_dir={records} does not hold the dataset" in message
    assert _tree(model_dir) == before


def test_data_dir_spelled_differently_is_the_same_run(records, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fingerprint = dataset_info.manifest_fingerprint(dataset_info.read_manifest(str(records)))
    for spelling in ("records", "./records/", str(records)):
        run_dir.prepare(_train_config(spelling, tmp_path / "model"), fingerprint)
        Path(run_dir.stage_paths(str(tmp_path / "model"), "frozen").state).write_text("{}")  # something to resume
    written = json.loads((tmp_path / "model" / "config.json").read_text())
    assert written["data"]["data_dir"] == str(records.resolve())


@pytest.mark.parametrize("change, flag", [
    ({"stage": "both"}, "--fine_tune_at"),  # finetune_at below names no layer
    ({"frozen_batch_size": 64}, "--frozen_batch_size"),
])
def test_errors_that_would_come_late_come_before_anything_is_written(records, tmp_path, change, flag):
    import dataclasses

    from cxr_tfdata import train
    from cxr_tfdata.config import ModelConfig, StageConfig

    model_dir = tmp_path / "model"
    config = _train_config(records, model_dir, model=ModelConfig(weights="none", fine_tune_at="conv9_block1"))
    if "stage" in change:
        config = dataclasses.replace(config, stage=change["stage"])
    else:
        config = dataclasses.replace(config, frozen=StageConfig(name="frozen", batch_size=64, epochs=1))
    with pytest.raises(ValueError, match=flag):
        train.train_and_evaluate(config)
    assert not model_dir.exists()


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_model_dir_equal_to_or_inside_the_data_dir_is_refused(records, where):
    from cxr_tfdata import train

    model_dir = records if where == "equal" else records / "runs" / "a"
    before = _tree(records)
    with pytest.raises(outputs.UnsafeOutputError, match="--data_dir"):
        train.train_and_evaluate(_train_config(records, model_dir))
    assert _tree(records) == before


def test_a_model_dir_holding_foreign_files_of_our_names_is_never_touched(records, tmp_path):
    from cxr_tfdata import train

    model_dir = tmp_path / "mine"
    model_dir.mkdir()
    (model_dir / "final.keras").write_bytes(b"my own model")
    (model_dir / "metrics.json").write_text('{"mine": 1}')
    before = _tree(model_dir)
    for overwrite in (False, True):
        with pytest.raises(outputs.UnsafeOutputError, match="no config.json of cxr-train"):
            train.train_and_evaluate(_train_config(records, model_dir), overwrite=overwrite)
    assert _tree(model_dir) == before


def test_train_binary_model_dir_that_is_a_file_is_one_line(records, tmp_path):
    blocker = tmp_path / "model"
    blocker.write_text("a file")
    line = _one_error_line(_run("cxr_tfdata.cli.train", f"--data_dir={records}", f"--model_dir={blocker}",
                                "--weights=none", "--stage=frozen"), "cxr-train")
    assert line == f"cxr-train: error: --model_dir={blocker} is a file, not a folder"


def test_train_binary_read_only_model_dir_is_one_line(records, tmp_path):
    with _tmpfs(tmp_path / "ro", "1m") as disk:
        _remount_read_only(disk)
        result = _run("cxr_tfdata.cli.train", f"--data_dir={records}", f"--model_dir={disk / 'model'}",
                      "--weights=none", "--stage=frozen", "--frozen_batch_size=4", "--frozen_epochs=1")
        line = _one_error_line(result, "cxr-train")
        assert f"--model_dir={disk / 'model'} (its lock file" in line and line.endswith("read-only file system")


@pytest.mark.slow
def test_train_binary_on_a_full_disk_is_one_line_and_keeps_the_run(records, tmp_path):
    # Room for config.json and the checkpoint folder, not for a 90 MB ResNet50V2 model file.
    with _tmpfs(tmp_path / "small", "2m") as disk:
        args = [f"--data_dir={records}", f"--model_dir={disk / 'model'}", "--weights=none", "--stage=frozen",
                "--frozen_batch_size=4", "--frozen_epochs=1", "--augment=none", "--mixed_precision=float32"]
        line = _one_error_line(_run("cxr_tfdata.cli.train", *args, env={"KERAS_HOME": str(tmp_path / "kh")}),
                               "cxr-train")
        assert "no space left on the device (disk full); earlier outputs are intact" in line
        left = sorted(str(p.relative_to(disk / "model")) for p in (disk / "model").rglob("*") if p.is_file())
        # No half-written or temporary file and no lock: config.json and TensorBoard's first events.
        assert left[0] == "config.json" and all(name.startswith("logs/frozen/") for name in left[1:]), left
        assert json.loads((disk / "model" / "config.json").read_text())["stage"] == "frozen"


# ----------------------------------------------------------------------------------------------
# cxr-evaluate


def _evaluate_config(tiny, output_dir, **overrides):
    from cxr_tfdata import evaluate

    settings = dict(model_path=str(tiny.model_path), data_dir=str(tiny.data_dir), output_dir=str(output_dir),
                    bootstrap_samples=0, batch_size=16)
    settings.update(overrides)
    return evaluate.EvaluateConfig(**settings)


def test_evaluate_never_replaces_cxr_trains_metrics_in_a_model_dir(tiny, tmp_path):
    from cxr_tfdata import evaluate

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny.model_path, run / "final.keras")
    (run / "metrics.json").write_text('{"frozen": {"val_auc": 0.9}}')
    (run / "config.json").write_text('{"model_dir": "run"}')
    before = _tree(run)
    for overwrite in (False, True):
        with pytest.raises(outputs.UnsafeOutputError, match="metrics.json, which cxr-evaluate did not write"):
            evaluate.evaluate(_evaluate_config(tiny, run, model_path=str(run / "final.keras"), overwrite=overwrite))
    assert _tree(run) == before


def test_evaluate_refuses_a_foreign_folder_unless_overwrite_then_adds_beside(tiny, tmp_path):
    from cxr_tfdata import evaluate

    home = _user_home(tmp_path / "home")
    before = _tree(home)
    with pytest.raises(outputs.UnsafeOutputError, match="is not empty and was not written by cxr-evaluate"):
        evaluate.evaluate(_evaluate_config(tiny, home))
    assert _tree(home) == before
    evaluate.evaluate(_evaluate_config(tiny, home, overwrite=True))
    after = _tree(home)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(evaluate.EVALUATION_FILES) <= set(after)
    # A folder cxr-evaluate wrote is updated without --overwrite; the user's files stay.
    evaluate.evaluate(_evaluate_config(tiny, home, split="val", threshold=0.5))
    assert {k: v for k, v in _tree(home).items() if k in before} == before


def test_evaluate_refuses_choosing_the_threshold_on_the_evaluated_split(tiny, tmp_path):
    with pytest.raises(ValueError, match="--val_split: is --split='test'"):
        _evaluate_config(tiny, tmp_path / "eval", split="test", val_split="test")
    _evaluate_config(tiny, tmp_path / "eval", split="test", val_split="test", threshold=0.5)  # nothing chosen


def test_evaluate_refused_run_leaves_no_folder(tiny, tmp_path):
    from cxr_tfdata import evaluate

    with pytest.raises(ValueError, match="split 'nope'"):
        evaluate.evaluate(_evaluate_config(tiny, tmp_path / "eval", split="nope"))
    assert not (tmp_path / "eval").exists()


def test_evaluation_csv_neutralises_formula_file_names():
    from cxr_tfdata import evaluate

    predictions = evaluate.SplitPredictions(
        filenames=["NORMAL/=HYPERLINK(\"http://x\").png", "PNEUMONIA/a.png"], patient_ids=["+p1", "-p2"],
        labels=np.array([0, 1]), probabilities=np.array([0.25, 0.75], np.float32))
    rows = list(csv.reader(io.StringIO(evaluate.predictions_csv(predictions))))
    assert rows[1][:2] == ["NORMAL/=HYPERLINK(\"http://x\").png", "'+p1"] and rows[2][1] == "'-p2"


# ----------------------------------------------------------------------------------------------
# cxr-export


def test_export_overwrite_refuses_a_training_run(tiny, tmp_path):
    from cxr_tfdata import export

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny.model_path, run / "final.keras")
    (run / "checkpoints" / "frozen_state.json").write_text("{}")
    (run / "history_frozen.csv").write_text("epoch,loss\n0,0.5\n")
    before = _tree(run)
    config = export.ExportConfig(model_path=str(run / "final.keras"), output_dir=str(run), overwrite=True,
                                 record_encoding="png")
    with pytest.raises(outputs.UnsafeOutputError, match="contains --model"):
        export.export(config)
    elsewhere = tmp_path / "model.keras"
    shutil.copy(tiny.model_path, elsewhere)
    with pytest.raises(outputs.UnsafeOutputError, match="is not a SavedModel written by cxr-export"):
        export.export(export.ExportConfig(model_path=str(elsewhere), output_dir=str(run), overwrite=True,
                                          record_encoding="png"))
    assert _tree(run) == before
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "run"]


def test_a_serving_batch_with_bad_images_answers_every_good_one(tiny, tmp_path):
    import tensorflow as tf

    from cxr_tfdata import export

    model = model_io.load_model(str(tiny.model_path))
    module = export.ServingModule(model)
    good_a, good_b = _good_png(1), _good_png(2)
    flat = io.BytesIO()
    Image.new("L", (40, 40), 128).save(flat, format="JPEG")
    batch = [good_a, b"", b"GIF89a not supported", _png_header_claiming(50_000, 50_000),
             good_a[: len(good_a) // 2], flat.getvalue(), b"\xff\xd8\xff\xe0 broken", good_b]
    result = module.serve(tf.constant(batch))
    errors = [e.decode() for e in result["error"].numpy()]
    probability = result["probability"].numpy()
    assert errors[0] == errors[7] == ""
    assert errors[1] == "empty input" and errors[2] == "not a JPEG or PNG image"
    assert errors[3].startswith("image too large: 50000x50000 pixels")
    assert errors[4] == "cannot decode the image: corrupt or truncated data"
    assert errors[5].startswith("near-constant image") and errors[6] == "corrupt JPEG header"
    assert np.isnan(probability[1:7]).all()
    alone = module.serve(tf.constant([good_a, good_b]))["probability"].numpy()
    np.testing.assert_allclose(probability[[0, 7]], alone, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# cxr-predict


def _predict_config(tiny, paths, **overrides):
    settings = dict(model_path=str(tiny.model_path), paths=tuple(str(p) for p in paths), record_encoding="png")
    settings.update(overrides)
    return predict.PredictConfig(**settings)


def test_a_fifo_does_not_hang_predict_and_gets_its_row(tiny, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(_good_png())
    os.mkfifo(folder / "waiting.png")
    result = _run("cxr_tfdata.cli.predict", f"--model={tiny.model_path}", "--record_encoding=png",
                  f"--output_csv={tmp_path / 'out.csv'}", str(folder), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "out.csv").open())}
    assert "a FIFO (named pipe), not a regular file" in rows[str(folder / "waiting.png")]["error"]
    assert rows[str(folder / "good.png")]["error"] == ""


def test_devices_huge_files_bombs_and_linked_folders_get_their_rows(tiny, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.png").write_bytes(_good_png())
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "huge.png").write_bytes(_good_png() + bytes(2 << 20))
    (folder / "bomb.png").write_bytes(_png_header_claiming(50_000, 50_000))
    (folder / "linked").symlink_to(folder / "sub", target_is_directory=True)
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    rows = {Path(r.path).name: r for r in predict.predict(_predict_config(tiny, [folder], max_file_mb=1),
                                                          io.StringIO())}
    assert rows["good.png"].error == "" and rows["good.png"].probability is not None
    assert "a character device, not a regular file" in rows["zero.png"].error
    assert "larger than the 1 MB limit" in rows["huge.png"].error
    assert "image too large" in rows["bomb.png"].error
    assert rows["linked"].error == "cannot read image: symbolic link to a folder (not followed)"
    assert rows["dangling.png"].error == "cannot read image: broken symbolic link"


def test_predict_csv_has_no_formula_cells(tiny, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["=HYPERLINK(\"evil.example\",\"x\").png", "+cmd.png", "-2+3.png", "@SUM(A1).png", "\tx.png"]
    for name in names:
        (folder / name).write_bytes(_good_png())
    (folder / "=bad.png").write_bytes(b"not an image")  # its error message repeats nothing dangerous first
    out = tmp_path / "out.csv"
    predict.predict(_predict_config(tiny, [folder], output_csv=str(out)), io.StringIO())
    cells = [cell for row in csv.reader(out.open()) for cell in row]
    assert len(cells) == len(predict.CSV_COLUMNS) * (len(names) + 2)
    assert not [cell for cell in cells if cell.startswith(tables.FORMULA_STARTERS)]
    assert f"'{folder}" not in cells  # paths not starting with a formula character are left as they are


@pytest.mark.parametrize("target", ["model", "image", "foreign_file", "inside_input_folder"])
def test_predict_outputs_never_overwrite_an_input_or_a_foreign_file(tiny, tmp_path, target):
    folder = tmp_path / "in"
    folder.mkdir()
    image = folder / "good.png"
    image.write_bytes(_good_png())
    model = tmp_path / "model.keras"
    shutil.copy(tiny.model_path, model)
    (tmp_path / "notes.txt").write_text("mine")
    csv_path = {"model": model, "image": image, "foreign_file": tmp_path / "notes.txt",
                "inside_input_folder": folder / "out.csv"}[target]
    before = _tree(tmp_path)
    with pytest.raises(outputs.UnsafeOutputError, match="--output_csv"):
        predict.predict(_predict_config(tiny, [folder], model_path=str(model), output_csv=str(csv_path)),
                        io.StringIO())
    with pytest.raises(outputs.UnsafeOutputError, match="--gradcam_dir"):
        predict.predict(_predict_config(tiny, [folder], model_path=str(model), gradcam_dir=str(folder)),
                        io.StringIO())
    assert _tree(tmp_path) == before


def test_predict_replaces_its_own_csv_and_gradcams(tiny, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(_good_png())
    out, cams = tmp_path / "out.csv", tmp_path / "cams"
    for _ in range(2):  # the second run replaces the first run's CSV and overlays
        predict.predict(_predict_config(tiny, [folder], output_csv=str(out), gradcam_dir=str(cams)), io.StringIO())
    assert sorted(os.listdir(cams)) == [outputs.FOLDER_MARKER, "good_gradcam.png"]
    (cams / "mine.txt").write_text("the user's")
    (cams / "good_gradcam.png").unlink()
    _user_home(tmp_path / "home")
    with pytest.raises(outputs.UnsafeOutputError, match="not empty and was not written by cxr-predict"):
        predict.predict(_predict_config(tiny, [folder], gradcam_dir=str(tmp_path / "home")), io.StringIO())


# ----------------------------------------------------------------------------------------------
# Models that do not answer the question


def test_a_model_whose_output_is_not_one_sigmoid_unit_is_refused(tmp_path):
    import keras

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    for name, output in (("softmax2", keras.layers.Dense(2, activation="softmax")(pooled)),
                         ("logit", keras.layers.Dense(1)(pooled))):
        keras.Model(inputs, output).save(tmp_path / f"{name}.keras")
        with pytest.raises(model_io.ModelLoadError, match="sigmoid"):
            model_io.load_model(str(tmp_path / f"{name}.keras"))


# ----------------------------------------------------------------------------------------------
# cxr-bench-input


@pytest.mark.parametrize("flag, fragment", [
    ("--configs=aug=gpu,cache=on", "--configs: 'aug=gpu,cache=on' is not of the form"),
    ("--split=holdout", "split 'holdout' not in dataset"),
])
def test_bench_input_bad_flags_are_one_line(records, flag, fragment):
    line = _one_error_line(_run("cxr_tfdata.cli.bench_input", f"--data_dir={records}", flag), "cxr-bench-input")
    assert fragment in line


def test_a_lock_is_released_when_its_holder_is_killed(tmp_path):
    lock = str(tmp_path / "x.lock")
    with _lock_held_by_another_process(lock, "cxr-train"):
        with pytest.raises(locking.LockedError):
            with locking.exclusive_lock(lock, "x"):
                pass
        time.sleep(0)  # the holder is killed on leaving the with-block
    with locking.exclusive_lock(lock, "x"):
        assert json.loads(Path(lock).read_text())["pid"] == os.getpid()
    assert not os.path.exists(lock)


# ----------------------------------------------------------------------------------------------
# Paths that the checks and the writes could read differently


def test_a_dot_dot_after_a_symlink_is_where_the_os_goes(tmp_path, monkeypatch):
    images = tmp_path / "src" / "test" / "NORMAL"
    images.mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(images)
    monkeypatch.chdir(tmp_path)
    # lnk/.. is src/test for the operating system, not "." as a textual normalisation would say.
    assert outputs.canonical("lnk/../x.csv") == str(tmp_path / "src" / "test" / "x.csv")
    with pytest.raises(outputs.UnsafeOutputError, match="lies inside"):
        outputs.check_apart("--output_csv", "lnk/../x.csv", {"image path 1": "src/test"})
    # A "~" the shell did not expand is a folder named "~", for the checks as for the writes.
    assert outputs.canonical("~/ds") == str(tmp_path / "~" / "ds")


def test_a_bind_mount_of_an_input_is_that_input(tmp_path):
    data = tmp_path / "records"
    data.mkdir()
    (tmp_path / "elsewhere").mkdir()
    mounted = subprocess.run(["mount", "--bind", str(data), str(tmp_path / "elsewhere")], capture_output=True,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        for output in (tmp_path / "elsewhere", tmp_path / "elsewhere" / "model"):
            with pytest.raises(outputs.UnsafeOutputError, match="--data_dir"):
                outputs.check_apart("--model_dir", str(output), {"--data_dir": str(data)})
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "elsewhere")], check=False)


def test_make_sample_without_an_output_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynotes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--output_dir: is required"):
        sample.write_sample("", num_images=8)
    assert os.listdir(tmp_path) == ["mynotes.txt"]


# ----------------------------------------------------------------------------------------------
# Leftovers of killed runs: only ever ours, never an input


def test_a_leftover_name_never_deletes_or_moves_an_input(images, tmp_path, tiny):
    from cxr_tfdata import export

    disguised = tmp_path / ".out.incomplete-999999999"
    shutil.copytree(images, disguised)
    before = _tree(disguised)
    build.build_dataset(_build_config(disguised, tmp_path / "out"))
    assert _tree(disguised) == before
    model_dir = tmp_path / ".exp.incomplete-999999999"
    model_dir.mkdir()
    shutil.copy(tiny.model_path, model_dir / "m.keras")
    export.export(export.ExportConfig(model_path=str(model_dir / "m.keras"), output_dir=str(tmp_path / "exp"),
                                      record_encoding="png"))
    assert (model_dir / "m.keras").is_file()


def test_a_refused_build_keeps_the_dataset_a_killed_swap_left_aside(images, tmp_path):
    previous = tmp_path / ".ds.previous-999999999"
    build.build_dataset(_build_config(images, previous))  # the old dataset, moved aside by a killed run
    before = _tree(previous)
    user = _user_home(tmp_path / "ds")
    with pytest.raises(writer.BuildError, match="already exists"):
        build.build_dataset(_build_config(images, user))
    assert _tree(previous) == before and (user / "thesis.txt").is_file()


@pytest.mark.parametrize("kind", ["dataset", "export"])
def test_a_folder_where_our_file_belongs_is_not_ours(tmp_path, kind):
    folder = tmp_path / "out"
    folder.mkdir()
    if kind == "dataset":
        (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "tfds": {}, "splits": {
            "train": {"num_examples": 1, "shard_files": ["cxr-train.tfrecord-00000-of-00001"]}}}))
        (folder / "dataset_info.json").write_text("{}")
        (folder / "cxr-train.tfrecord-00000-of-00001").mkdir()
        (folder / "cxr-train.tfrecord-00000-of-00001" / "thesis.txt").write_text("mine")
        problems = outputs.dataset_problems(str(folder))
    else:
        (folder / "assets").mkdir()
        (folder / "saved_model.pb").write_bytes(b"pb")
        (folder / "assets" / "cxr_export.json").write_text("{}")
        (folder / "fingerprint.pb").mkdir()
        (folder / "fingerprint.pb" / "notes.txt").write_text("mine")
        problems = outputs.saved_model_problems(str(folder))
    assert problems and "did not write" in problems[0]


# ----------------------------------------------------------------------------------------------
# One writer per output, whichever binary writes it


def test_different_binaries_on_one_output_exclude_each_other(tiny, tmp_path):
    from cxr_tfdata import evaluate

    target = tmp_path / "X"
    with _lock_held_by_another_process(locking.lock_path_beside(str(target)), "cxr-export") as pid:
        with pytest.raises(locking.LockedError, match=f"cxr-export \\(pid {pid}"):
            evaluate.evaluate(_evaluate_config(tiny, target, overwrite=True))
        with pytest.raises(locking.LockedError, match=f"cxr-export \\(pid {pid}"):
            predict.predict(_predict_config(tiny, [tiny.model_path], output_csv=str(target)), io.StringIO())
    assert not target.exists()


def test_a_file_named_like_a_lock_is_never_written_over(tmp_path):
    out = tmp_path / "ds"
    lock = Path(locking.lock_path_beside(str(out)))
    lock.write_text("my own notes")
    with pytest.raises(locking.LockedError, match="not a lock file"):
        with locking.exclusive_lock(str(lock), "--output_dir=ds"):
            pass
    assert lock.read_text() == "my own notes"


def test_markers_belong_to_one_program_and_remember_its_files(tiny, tmp_path):
    from cxr_tfdata import evaluate

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(_good_png(1))
    (folder / "b.png").write_bytes(_good_png(2))
    cams = tmp_path / "cams"
    for paths in ([folder / "a.png"], [folder / "b.png"], [folder / "a.png"]):  # A, then B, then A again
        predict.predict(_predict_config(tiny, paths, gradcam_dir=str(cams)), io.StringIO())
    assert sorted(os.listdir(cams)) == [outputs.FOLDER_MARKER, "a_gradcam.png", "b_gradcam.png"]
    marker = (cams / outputs.FOLDER_MARKER).read_text()
    with pytest.raises(outputs.UnsafeOutputError, match="holds the output of cxr-predict"):
        evaluate.evaluate(_evaluate_config(tiny, cams, overwrite=True))
    assert (cams / outputs.FOLDER_MARKER).read_text() == marker


def test_a_failed_evaluation_in_an_existing_folder_keeps_its_claim(tiny, tmp_path):
    from cxr_tfdata import evaluate

    folder = tmp_path / "eval"
    evaluate.evaluate(_evaluate_config(tiny, folder, threshold=0.5))
    with pytest.raises(ValueError, match="split 'nope'"):
        evaluate.evaluate(_evaluate_config(tiny, folder, split="nope", threshold=0.5))
    evaluate.evaluate(_evaluate_config(tiny, folder, threshold=0.5))  # still recognised: no --overwrite needed


def test_evaluation_on_a_full_disk_names_the_file_and_leaves_nothing(tiny, tmp_path):
    from cxr_tfdata import evaluate

    with _tmpfs(tmp_path / "small", "40k") as disk:
        with pytest.raises(OSError) as failed:
            evaluate.evaluate(_evaluate_config(tiny, disk / "eval", threshold=0.5))
        assert failed.value.filename and str(disk / "eval") in failed.value.filename
        assert os.listdir(disk) == []


def test_bench_json_replaces_only_its_own_results(tmp_path):
    from cxr_tfdata.cli import bench_input

    (tmp_path / "settings.json").write_text("{}")
    (tmp_path / "ours.json").write_text(json.dumps({"aug=cpu,cache=on": {"images_per_second": 1.0}}))
    assert not bench_input.is_benchmark_json(str(tmp_path / "settings.json"))
    assert bench_input.is_benchmark_json(str(tmp_path / "ours.json"))


# ----------------------------------------------------------------------------------------------
# Content, not only counts; files that never end


def test_the_fingerprint_changes_when_the_images_do(images, tmp_path):
    first = build.build_dataset(_build_config(images, tmp_path / "a"))
    for path in (images / "train" / "NORMAL").glob("*.jpeg"):
        with Image.open(path) as image:
            image.transpose(Image.Transpose.ROTATE_90).save(path)
    second = build.build_dataset(_build_config(images, tmp_path / "b"))
    assert first["splits"]["train"]["num_examples"] == second["splits"]["train"]["num_examples"]
    assert dataset_info.manifest_fingerprint(first) != dataset_info.manifest_fingerprint(second)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder", "zip_bomb"])
def test_a_model_path_that_is_no_model_file_is_refused_unread(tmp_path, kind):
    path = tmp_path / "model.keras"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        import zipfile

        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("config.json", "{}")
            with archive.open("model.weights.h5", "w") as member:
                for _ in range(64):
                    member.write(bytes(1 << 20))
    with pytest.raises(model_io.ModelLoadError, match="--model"):
        model_io.load_model(str(path))


@pytest.mark.parametrize("kind", ["fifo", "outside"])
def test_a_shard_that_is_a_fifo_or_leads_outside_is_refused(tmp_path, kind):
    data_dir = tmp_path / "records"
    manifest = write_tiny_dataset(data_dir, {"train": (2, 2), "val": (2, 2)}, image_size=IMAGE_SIZE, num_shards=1)
    shard = data_dir / manifest["splits"]["train"]["shard_files"][0]
    shard.unlink()
    if kind == "fifo":
        os.mkfifo(shard)
    else:
        (tmp_path / "elsewhere").write_bytes(b"")
        shard.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not a regular file|outside the dataset folder"):
        dataset_info.shard_paths(str(data_dir), dataset_info.read_manifest(str(data_dir)), "train")


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe not utf-8", "is not valid JSON"),
    (json.dumps({"image_size": "abc", "class_names": ["NORMAL", "PNEUMONIA"], "splits": {}}).encode(),
     "'image_size' is 'abc'"),
    (json.dumps({"image_size": 32, "class_names": ["NORMAL", "PNEUMONIA"],
                 "splits": {"train": {"num_examples": 1}}}).encode(), "no list of 'shard_files'"),
])
def test_a_garbled_manifest_is_named_with_what_is_wrong(tmp_path, content, fragment):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ValueError, match=fragment) as refused:
        dataset_info.read_manifest(str(tmp_path))
    assert str(tmp_path / "manifest.json") in str(refused.value)


# ----------------------------------------------------------------------------------------------
# Errors and signals


@pytest.mark.parametrize("module, args, fragment", [
    ("cxr_tfdata.cli.bench_input", ["--data_dir="], "--data_dir: is required"),
    ("tfrecords_builder", ["--input_dir=x", "--output_dir=y", "--image_size=abc"], "--image_size"),
])
def test_flag_errors_are_one_line(module, args, fragment):
    result = _run(module, *args)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
    assert "FATAL" not in result.stderr and "USAGE" not in result.stderr


def test_max_file_mb_must_be_finite():
    with pytest.raises(ValueError, match="--max_file_mb"):
        build.BuildConfig(input_dir="a", output_dir="b", max_file_mb=float("inf"))


_SLOW_BUILD = textwrap.dedent("""
    import sys, time
    from tfrecords_builder import imaging
    from tfrecords_builder.cli import build_tfrecords
    real = imaging.convert
    def slow(data, options):
        time.sleep(0.3)
        return real(data, options)
    imaging.convert = slow
    sys.argv = ["cxr-build-tfrecords", *sys.argv[1:]]
    build_tfrecords.run()
""")


def test_sigterm_during_a_build_cleans_up_like_ctrl_c(images, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ)
    process = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, f"--input_dir={images}", f"--output_dir={out}",
                                "--image_size=32", "--num_workers=1"], cwd=REPO_ROOT, env=env,
                               stderr=subprocess.PIPE, text=True)
    staging = tmp_path / f".out.incomplete-{process.pid}"
    deadline = time.monotonic() + 120
    while not staging.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the build never started writing"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    assert stderr.rstrip().endswith("cxr-build-tfrecords: terminated")
    assert sorted(os.listdir(tmp_path)) == ["images"]  # no staging folder, no lock file
