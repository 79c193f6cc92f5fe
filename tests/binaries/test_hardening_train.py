"""cxr-train hardening: checkpoint names are not ownership, locks follow symlinks, edited
manifests and bad flags are refused before anything is written. One tiny run (tests/binaries/conftest.py) is trained;
every test copies it before changing anything."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cxr_tfdata.core import dataset_info
from cxr_tfdata.files import locking
from cxr_tfdata.training import run_files, run_ledger
from tests.binaries.safety_helpers import (
    one_error_line,
    run_binary,
    train_config,
    tree_snapshot,
)
from tests.helpers import lock_held_by_another_process


def _users_files(checkpoints: Path) -> list[Path]:
    """Files a user keeps in checkpoints/ whose names look like cxr-train's own."""
    files = [checkpoints / "frozen_epoch7.index", checkpoints / "frozen_epoch7.data-00000-of-00001",
             checkpoints / "frozen_epoch0.index.bak", checkpoints / "workertemp_backup" / "frozen_epoch3.index",
             checkpoints / "workertemp_backup" / "notes.txt", checkpoints / "workertemp_2" / "mine.txt"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the user's bytes " + path.name.encode())
    return files


def test_a_plain_rerun_never_deletes_a_users_file_named_like_a_checkpoint(run_copy):
    from cxr_tfdata.training import train

    records, model_dir = run_copy
    paths = run_files.stage_paths(str(model_dir), "frozen")
    ours = paths.checkpoint_files()
    assert ours and all(os.path.basename(p).startswith("frozen_epoch1.") for p in ours)  # the committed one
    users = _users_files(model_dir / "checkpoints")
    before = {p: p.read_bytes() for p in users}
    train.train_and_evaluate(train_config(records, model_dir, epochs=2, steps_per_epoch=1))  # the same command again: settles, resumes
    assert {p: p.read_bytes() for p in users} == before
    assert all(os.path.exists(p) for p in ours)


def test_overwrite_removes_the_runs_checkpoints_and_no_folder_or_file_merely_named_like_ours(run_copy):
    records, model_dir = run_copy
    checkpoints = model_dir / "checkpoints"
    ours = run_files.stage_paths(str(model_dir), "frozen").checkpoint_files()
    scratch = checkpoints / "workertemp_1"  # a killed worker's scratch copy: only checkpoint files
    scratch.mkdir()
    (scratch / "frozen_epoch1.index").write_bytes(b"scratch")
    run_ledger.record_names(run_ledger.worker_ledger(str(scratch)), add=("frozen_epoch1",))  # as a worker does
    users = _users_files(checkpoints)
    before = {p: p.read_bytes() for p in users}
    fingerprint = dataset_info.load(str(records)).fingerprint
    run_files.prepare(train_config(records, model_dir, epochs=2, steps_per_epoch=1), fingerprint, overwrite=True)
    assert {p: p.read_bytes() for p in users} == before
    assert not any(os.path.exists(p) for p in ours) and not scratch.exists()
    assert not (checkpoints / "frozen_checkpoints.json").exists()
    assert not (model_dir / "frozen_best.keras").exists()


def test_a_new_checkpoint_never_writes_over_a_users_file_of_its_name(run_copy):
    records, model_dir = run_copy
    paths = run_files.stage_paths(str(model_dir), "frozen")
    users = _users_files(model_dir / "checkpoints")
    name = paths.checkpoint_name(7)
    assert name == "frozen_epoch7-1" and all(not p.name.startswith(name + ".") for p in users)
    assert paths.checkpoint_name(1) == "frozen_epoch1"  # the run's own name is its own


def test_metrics_name_the_best_epoch_both_ways(trained):
    _, model_dir = trained
    metrics = json.loads((model_dir / "metrics.json").read_text())["frozen"]
    state = json.loads((model_dir / "checkpoints" / "frozen_state.json").read_text())
    assert metrics["best_epoch"] == state["best_epoch"]  # 0-based, as the history's epoch column
    assert metrics["best_epoch_number"] == state["best_epoch"] + 1  # 1-based, as the log


@pytest.mark.parametrize("spelling", ["link", "link_parent"])
def test_a_lock_cannot_be_bypassed_through_a_symlink(trained, tmp_path, spelling):
    """A real process holds runD's lock; a second writer reaching runD through a symlink is refused."""
    from cxr_tfdata.training import train

    records, _ = trained
    run = tmp_path / "runD"
    run.mkdir()
    (tmp_path / "runDlink").symlink_to(run)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "up").symlink_to(tmp_path)
    other = tmp_path / "runDlink" if spelling == "link" else tmp_path / "elsewhere" / "up" / "runDlink"
    before = tree_snapshot(tmp_path)
    with lock_held_by_another_process(locking.lock_path_beside(str(run)), "cxr-train") as pid:
        assert locking.lock_path_beside(str(other)) == locking.lock_path_beside(str(run))
        with pytest.raises(locking.LockedError, match=f"cxr-train \\(pid {pid}"):
            with locking.exclusive_lock(locking.lock_path_beside(str(other)), "test"):
                pass
        with pytest.raises(locking.LockedError, match=f"cxr-train \\(pid {pid}"):
            train.train_and_evaluate(train_config(records, other, epochs=2, steps_per_epoch=1))
    assert {k: v for k, v in tree_snapshot(tmp_path).items() if "cxr-lock" not in k} == \
        {k: v for k, v in before.items() if "cxr-lock" not in k}
    assert os.listdir(run) == []


def _edited(records: Path, tmp_path: Path, edit) -> Path:
    copy = Path(shutil.copytree(records, tmp_path / "records"))
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest["splits"]["train"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda train: train.update(num_examples=100, class_counts={"NORMAL": 90, "PNEUMONIA": 10}),
     "its shards hold 12 records"),
    (lambda train: train.update(class_counts={"NORMAL": 9, "PNEUMONIA": 1}), "adding up to 10, not its num_examples 12"),
])
def test_edited_manifest_counts_are_refused_before_anything_is_written(trained, tmp_path, edit, message):
    from cxr_tfdata.training import train

    records = _edited(trained[0], tmp_path, edit)
    model_dir = tmp_path / "model"
    with pytest.raises(ValueError, match=f"{records / 'manifest.json'}: split 'train'.*{message}"):
        train.train_and_evaluate(train_config(records, model_dir, epochs=2, steps_per_epoch=1))
    assert not model_dir.exists()


def test_train_binary_edited_manifest_is_one_line_naming_the_file(trained, tmp_path):
    records = _edited(trained[0], tmp_path, lambda train: train.update(
        num_examples=100, class_counts={"NORMAL": 90, "PNEUMONIA": 10}))
    result = run_binary("cxr_tfdata.cli.train", f"--data_dir={records}", f"--model_dir={tmp_path / 'model'}",
                        "--weights=none", "--stage=frozen", "--frozen_batch_size=4", "--frozen_epochs=1")
    line = one_error_line(result, "cxr-train")
    assert f"{records / 'manifest.json'}" in line and "shards hold 12 records" in line
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("flag, expected", [
    ("--seed=-1", "--seed: must be in [0, 2**32 - 1], got -1"),
    ("--worker_timeout=-1", "--worker_timeout: must be > 0 seconds, got -1"),
])
def test_train_binary_bad_flags_name_the_flag_before_anything_is_written(trained, tmp_path, flag, expected):
    records, _ = trained
    result = run_binary("cxr_tfdata.cli.train", f"--data_dir={records}", f"--model_dir={tmp_path / 'model'}",
                        "--weights=none", "--stage=frozen", "--frozen_batch_size=4", "--frozen_epochs=1", flag)
    assert expected in one_error_line(result, "cxr-train")
    assert not (tmp_path / "model").exists()


def test_fine_tune_at_is_checked_under_train_base(trained, tmp_path):
    from cxr_tfdata.core.config import ModelConfig
    from cxr_tfdata.training import train

    records, _ = trained
    config = train_config(records, tmp_path / "model", epochs=2, steps_per_epoch=1, stage="both",
                          model=ModelConfig(weights="none", train_base=True, fine_tune_at="conv9_block1"))
    with pytest.raises(ValueError, match="--fine_tune_at"):
        train.train_and_evaluate(config)
    assert not (tmp_path / "model").exists()
