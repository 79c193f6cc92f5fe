"""cxr-train deletes only what its ledgers name: pending best models (`checkpoints/<stage>_pending_models.json`)
and a non-chief worker's scratch checkpoints (`checkpoints/workertemp_<N>/worker_checkpoints.json`), never a
file merely named like one. One tiny run (tests/binaries/conftest.py) is trained; every test copies it first."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cxr_tfdata.core import dataset_info
from cxr_tfdata.training import run_files, run_ledger, stage_runner
from tests.binaries.safety_helpers import train_config


def _state(model_dir: Path) -> dict:
    return json.loads((model_dir / "checkpoints" / "frozen_state.json").read_text())


def _users_files(model_dir: Path) -> dict[Path, bytes]:
    """A user's files in checkpoints/ named like pending best models (the committed epoch's name
    included) and like a worker's scratch checkpoint."""
    checkpoints = model_dir / "checkpoints"
    best = _state(model_dir)["best_epoch"]
    files = [checkpoints / "frozen_best-epoch3.keras", checkpoints / "frozen_best-epoch3-reviewed.keras",
             checkpoints / "frozen_best-epoch2.keras", checkpoints / f"frozen_best-epoch{best}.keras",
             checkpoints / "workertemp_1" / "frozen_epoch2.index"]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the user's bytes " + path.name.encode())
    return {path: path.read_bytes() for path in files}


def _snapshot(files: dict[Path, bytes]) -> dict[Path, bytes | None]:
    return {path: path.read_bytes() if path.exists() else None for path in files}


def test_a_plain_rerun_keeps_a_users_files_named_like_pending_best_models(run_copy):
    from cxr_tfdata.training import train

    records, model_dir = run_copy
    best_model = (model_dir / "frozen_best.keras").read_bytes()
    users = _users_files(model_dir)
    train.train_and_evaluate(train_config(records, model_dir, epochs=2, steps_per_epoch=1))  # settles; stage done
    assert _snapshot(users) == users
    assert (model_dir / "frozen_best.keras").read_bytes() == best_model  # not replaced by the user's file
    assert run_files.stage_paths(str(model_dir), "frozen").recorded_pending_models() == []


def test_overwrite_keeps_a_users_files_named_like_pending_models_and_worker_scratch(run_copy):
    from cxr_tfdata.training import train

    records, model_dir = run_copy
    users = _users_files(model_dir)
    train.train_and_evaluate(train_config(records, model_dir, epochs=1, steps_per_epoch=1), overwrite=True)
    assert _snapshot(users) == users
    assert json.loads((model_dir / "config.json").read_text())["frozen"]["epochs"] == 1


def test_settle_renames_in_only_the_recorded_committed_model_and_deletes_only_recorded_ones(run_copy):
    _, model_dir = run_copy
    paths = run_files.stage_paths(str(model_dir), "frozen")
    users = _users_files(model_dir)
    best_model = Path(paths.best_model).read_bytes()
    # Killed after the state file committed the best epoch, before its model was renamed in ...
    state = _state(model_dir)
    name = paths.pending_best_name(state["best_epoch"])
    assert name == f"frozen_best-epoch{state['best_epoch']}-1.keras"  # the plain name is the user's file
    pending = os.path.join(paths.checkpoint_dir, name)
    paths.record_pending_models(add=(name, "frozen_best-epoch9.keras"))
    os.replace(paths.best_model, pending)
    state["pending_best_model"] = {"name": name, "identity": run_ledger.file_identity(pending)}
    Path(paths.state).write_text(json.dumps(state))
    # ... and after writing a later epoch's model the state never committed.
    Path(paths.checkpoint_dir, "frozen_best-epoch9.keras").write_bytes(b"uncommitted")
    stage_runner.settle(paths, state)
    assert Path(paths.best_model).read_bytes() == best_model
    assert not os.path.exists(pending) and not os.path.exists(os.path.join(paths.checkpoint_dir, "frozen_best-epoch9.keras"))
    assert paths.recorded_pending_models() == []
    assert _snapshot(users) == users
    stage_runner.settle(paths, state)  # again: nothing more happens
    assert Path(paths.best_model).read_bytes() == best_model and _snapshot(users) == users


def test_overwrite_deletes_the_recorded_pending_model_and_worker_scratch_only(run_copy):
    records, model_dir = run_copy
    paths = run_files.stage_paths(str(model_dir), "frozen")
    users = _users_files(model_dir)
    paths.record_pending_models(add=("frozen_best-epoch5.keras",))
    Path(paths.checkpoint_dir, "frozen_best-epoch5.keras").write_bytes(b"the run's")
    scratch = model_dir / "checkpoints" / "workertemp_1"
    run_ledger.record_names(run_ledger.worker_ledger(str(scratch)), add=("frozen_epoch1",))
    (scratch / "frozen_epoch1.index").write_bytes(b"the worker's")
    (scratch / "frozen_epoch1.data-00000-of-00001").write_bytes(b"the worker's")
    only_ours = model_dir / "checkpoints" / "workertemp_3"  # a killed worker's scratch, nothing else in it
    only_ours.mkdir()
    run_ledger.record_names(run_ledger.worker_ledger(str(only_ours)), add=("frozen_epoch0_step1",))
    (only_ours / "frozen_epoch0_step1.index").write_bytes(b"the worker's")
    fingerprint = dataset_info.load(str(records)).fingerprint
    run_files.prepare(train_config(records, model_dir, epochs=2, steps_per_epoch=1), fingerprint, overwrite=True)
    assert _snapshot(users) == users
    assert sorted(os.listdir(scratch)) == ["frozen_epoch2.index"] and not only_ours.exists()
    for name in ("frozen_best-epoch5.keras", "frozen_pending_models.json", "frozen_checkpoints.json"):
        assert not (model_dir / "checkpoints" / name).exists(), name


def test_a_run_of_an_older_version_keeps_its_committed_model_and_every_unrecorded_file(run_copy, caplog):
    _, model_dir = run_copy
    paths = run_files.stage_paths(str(model_dir), "frozen")
    state = _state(model_dir)
    state.pop("pending_best_model", None)  # an older version's state file: no ledger of pending models
    state["completed"] = False
    os.remove(paths.pending_ledger)
    committed = paths.pending_best_model(state["best_epoch"])
    os.replace(paths.best_model, committed)  # killed between the commit and the rename
    committed_bytes = Path(committed).read_bytes()
    other = Path(paths.checkpoint_dir, "frozen_best-epoch3-reviewed.keras")
    other.write_bytes(b"the user's")
    stage_runner.settle(paths, state)
    assert Path(paths.best_model).read_bytes() == committed_bytes  # the committed best model is not lost
    assert Path(committed).read_bytes() == committed_bytes and other.read_bytes() == b"the user's"
    assert "Left " in caplog.text and other.name in caplog.text and os.path.basename(committed) in caplog.text
