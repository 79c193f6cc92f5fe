"""cxr-train as a hostile or careless user would run it: locked, rebuilt or overlapping folders, foreign files,
read-only and full disks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cxr_tfdata.core import dataset_info
from cxr_tfdata.files import locking, output_safety
from cxr_tfdata.training import run_files, stage_runner
from tests.binaries.safety_helpers import (
    IMAGE_SIZE,
    one_error_line,
    remount_read_only,
    run_binary,
    tmpfs,
    train_config,
    tree_snapshot,
)
from tests.helpers import lock_held_by_another_process, write_tiny_dataset


def test_a_second_training_run_on_the_same_model_dir_is_refused(records, tmp_path):
    from cxr_tfdata.training import train

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with lock_held_by_another_process(locking.lock_path_beside(str(model_dir)), "cxr-train") as pid:
        with pytest.raises(locking.LockedError, match=f"--model_dir={model_dir} is in use by cxr-train \\(pid {pid}"):
            train.train_and_evaluate(train_config(records, model_dir))
    assert os.listdir(model_dir) == []  # the refused run wrote nothing


def test_resume_on_a_rebuilt_dataset_is_refused_naming_both_fingerprints(records, tmp_path):
    from cxr_tfdata.training import train

    model_dir = tmp_path / "model"
    config = train_config(records, model_dir)
    started_on = dataset_info.manifest_fingerprint(dataset_info.read_manifest(str(records)))
    run_files.prepare(config, started_on)
    state = run_files.stage_paths(str(model_dir), "frozen").state
    Path(state).write_text(json.dumps({**stage_runner.initial_state(config.frozen), "epochs_completed": 1}))
    shutil.rmtree(records)
    write_tiny_dataset(records, {"train": (4, 4), "val": (3, 3)}, image_size=IMAGE_SIZE)  # rebuilt, fewer images
    before = tree_snapshot(model_dir)
    with pytest.raises(run_files.ConfigMismatchError) as refused:
        train.train_and_evaluate(config)
    message = str(refused.value)
    now = dataset_info.manifest_fingerprint(dataset_info.read_manifest(str(records)))
    assert started_on[:23] in message and now[:23] in message and now != started_on
    assert f"--data_dir={records} does not hold the dataset" in message
    assert tree_snapshot(model_dir) == before


def test_data_dir_spelled_differently_is_the_same_run(records, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fingerprint = dataset_info.manifest_fingerprint(dataset_info.read_manifest(str(records)))
    for spelling in ("records", "./records/", str(records)):
        run_files.prepare(train_config(spelling, tmp_path / "model"), fingerprint)
        Path(run_files.stage_paths(str(tmp_path / "model"), "frozen").state).write_text("{}")  # something to resume
    written = json.loads((tmp_path / "model" / "config.json").read_text())
    assert written["data"]["data_dir"] == str(records.resolve())


@pytest.mark.parametrize("change, flag", [
    ({"stage": "both"}, "--fine_tune_at"),  # finetune_at below names no layer
    ({"frozen_batch_size": 64}, "--frozen_batch_size"),
])
def test_errors_that_would_come_late_come_before_anything_is_written(records, tmp_path, change, flag):
    import dataclasses

    from cxr_tfdata.core.config import ModelConfig, StageConfig
    from cxr_tfdata.training import train

    model_dir = tmp_path / "model"
    config = train_config(records, model_dir, model=ModelConfig(weights="none", fine_tune_at="conv9_block1"))
    if "stage" in change:
        config = dataclasses.replace(config, stage=change["stage"])
    else:
        config = dataclasses.replace(config, frozen=StageConfig(name="frozen", batch_size=64, epochs=1))
    with pytest.raises(ValueError, match=flag):
        train.train_and_evaluate(config)
    assert not model_dir.exists()


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_model_dir_equal_to_or_inside_the_data_dir_is_refused(records, where):
    from cxr_tfdata.training import train

    model_dir = records if where == "equal" else records / "runs" / "a"
    before = tree_snapshot(records)
    with pytest.raises(output_safety.UnsafeOutputError, match="--data_dir"):
        train.train_and_evaluate(train_config(records, model_dir))
    assert tree_snapshot(records) == before


def test_a_model_dir_holding_foreign_files_of_our_names_is_never_touched(records, tmp_path):
    from cxr_tfdata.training import train

    model_dir = tmp_path / "mine"
    model_dir.mkdir()
    (model_dir / "final.keras").write_bytes(b"my own model")
    (model_dir / "metrics.json").write_text('{"mine": 1}')
    before = tree_snapshot(model_dir)
    for overwrite in (False, True):
        with pytest.raises(output_safety.UnsafeOutputError, match="no config.json of cxr-train"):
            train.train_and_evaluate(train_config(records, model_dir), overwrite=overwrite)
    assert tree_snapshot(model_dir) == before


def test_train_binary_model_dir_that_is_a_file_is_one_line(records, tmp_path):
    blocker = tmp_path / "model"
    blocker.write_text("a file")
    line = one_error_line(run_binary("cxr_tfdata.cli.train", f"--data_dir={records}", f"--model_dir={blocker}",
                                "--weights=none", "--stage=frozen"), "cxr-train")
    assert line == f"cxr-train: error: --model_dir={blocker} is a file, not a folder"


def test_train_binary_read_only_model_dir_is_one_line(records, tmp_path):
    with tmpfs(tmp_path / "ro", "1m") as disk:
        remount_read_only(disk)
        result = run_binary("cxr_tfdata.cli.train", f"--data_dir={records}", f"--model_dir={disk / 'model'}",
                      "--weights=none", "--stage=frozen", "--frozen_batch_size=4", "--frozen_epochs=1")
        line = one_error_line(result, "cxr-train")
        assert f"--model_dir={disk / 'model'} (its lock file" in line and line.endswith("read-only file system")


@pytest.mark.slow
def test_train_binary_on_a_full_disk_is_one_line_and_keeps_the_run(records, tmp_path):
    # Room for config.json and the checkpoint folder, not for a 90 MB ResNet50V2 model file.
    with tmpfs(tmp_path / "small", "2m") as disk:
        args = [f"--data_dir={records}", f"--model_dir={disk / 'model'}", "--weights=none", "--stage=frozen",
                "--frozen_batch_size=4", "--frozen_epochs=1", "--augment=none", "--mixed_precision=float32"]
        line = one_error_line(run_binary("cxr_tfdata.cli.train", *args, env={"KERAS_HOME": str(tmp_path / "kh")}),
                               "cxr-train")
        assert "no space left on the device (disk full); earlier outputs are intact" in line
        left = sorted(str(p.relative_to(disk / "model")) for p in (disk / "model").rglob("*") if p.is_file())
        # No half-written or temporary file and no lock: config.json, TensorBoard's first events, and the
        # ledger naming the model file the run was about to write (so a rerun may delete what it claimed).
        ledgers = [name for name in left if name.startswith("checkpoints/") and name.endswith(".json")]
        assert ledgers in ([], ["checkpoints/frozen_pending_models.json"]), left
        left = [name for name in left if name not in ledgers]
        assert left[0] == "config.json" and all(name.startswith("logs/frozen/") for name in left[1:]), left
        assert json.loads((disk / "model" / "config.json").read_text())["stage"] == "frozen"
