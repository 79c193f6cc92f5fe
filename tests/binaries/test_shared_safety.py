"""Rules every binary keeps, run as a hostile or careless user would: paths, leftovers of killed runs, one
writer per output, content not counts, errors and signals.

Each case ends by checking what matters: the user's files are still there with the same bytes, no
hidden staging or lock file is left behind, and the error is one line naming what is wrong. Each
binary's own cases are in test_<binary>_safety.py beside this file.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from PIL import Image

from cxr_tfdata.core import dataset_info
from cxr_tfdata.files import locking, output_safety
from cxr_tfdata.serving import predict
from tests.binaries.safety_helpers import (
    build_config,
    evaluation_config,
    good_png,
    prediction_config,
    run_binary,
    tree_snapshot,
    user_home,
)
from tests.helpers import REPO_ROOT, lock_held_by_another_process
from tfrecords_builder import build, sample, writer

# ----------------------------------------------------------------------------------------------
# Paths that the checks and the writes could read differently


def test_make_sample_without_an_output_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynotes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--output_dir: is required"):
        sample.write_sample("", num_images=8)
    assert os.listdir(tmp_path) == ["mynotes.txt"]


# ----------------------------------------------------------------------------------------------
# Leftovers of killed runs: only ever ours, never an input


def test_a_leftover_name_never_deletes_or_moves_an_input(images, tmp_path, tiny):
    from cxr_tfdata.serving import export

    disguised = tmp_path / ".out.incomplete-999999999"
    shutil.copytree(images, disguised)
    before = tree_snapshot(disguised)
    build.build_dataset(build_config(disguised, tmp_path / "out"))
    assert tree_snapshot(disguised) == before
    model_dir = tmp_path / ".exp.incomplete-999999999"
    model_dir.mkdir()
    shutil.copy(tiny.model_path, model_dir / "m.keras")
    export.export(export.ExportConfig(model_path=str(model_dir / "m.keras"), output_dir=str(tmp_path / "exp"),
                                      record_encoding="png"))
    assert (model_dir / "m.keras").is_file()


def test_a_refused_build_keeps_the_dataset_a_killed_swap_left_aside(images, tmp_path):
    previous = tmp_path / ".ds.previous-999999999"
    build.build_dataset(build_config(images, previous))  # the old dataset, moved aside by a killed run
    before = tree_snapshot(previous)
    user = user_home(tmp_path / "ds")
    with pytest.raises(writer.BuildError, match="already exists"):
        build.build_dataset(build_config(images, user))
    assert tree_snapshot(previous) == before and (user / "thesis.txt").is_file()


# ----------------------------------------------------------------------------------------------
# One writer per output, whichever binary writes it


def test_different_binaries_on_one_output_exclude_each_other(tiny, tmp_path):
    from cxr_tfdata.evaluation import evaluate

    target = tmp_path / "X"
    with lock_held_by_another_process(locking.lock_path_beside(str(target)), "cxr-export") as pid:
        with pytest.raises(locking.LockedError, match=f"cxr-export \\(pid {pid}"):
            evaluate.evaluate(evaluation_config(tiny, target, overwrite=True))
        with pytest.raises(locking.LockedError, match=f"cxr-export \\(pid {pid}"):
            predict.predict(prediction_config(tiny, [tiny.model_path], output_csv=str(target)), io.StringIO())
    assert not target.exists()


def test_markers_belong_to_one_program_and_remember_its_files(tiny, tmp_path):
    from cxr_tfdata.evaluation import evaluate

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(good_png(1))
    (folder / "b.png").write_bytes(good_png(2))
    cams = tmp_path / "cams"
    for paths in ([folder / "a.png"], [folder / "b.png"], [folder / "a.png"]):  # A, then B, then A again
        predict.predict(prediction_config(tiny, paths, gradcam_dir=str(cams)), io.StringIO())
    assert sorted(os.listdir(cams)) == [output_safety.FOLDER_MARKER, "a_gradcam.png", "b_gradcam.png"]
    marker = (cams / output_safety.FOLDER_MARKER).read_text()
    with pytest.raises(output_safety.UnsafeOutputError, match="holds the output of cxr-predict"):
        evaluate.evaluate(evaluation_config(tiny, cams, overwrite=True))
    assert (cams / output_safety.FOLDER_MARKER).read_text() == marker


# ----------------------------------------------------------------------------------------------
# Content, not only counts


def test_the_fingerprint_changes_when_the_images_do(images, tmp_path):
    first = build.build_dataset(build_config(images, tmp_path / "a"))
    for path in (images / "train" / "NORMAL").glob("*.jpeg"):
        with Image.open(path) as image:
            image.transpose(Image.Transpose.ROTATE_90).save(path)
    second = build.build_dataset(build_config(images, tmp_path / "b"))
    assert first["splits"]["train"]["num_examples"] == second["splits"]["train"]["num_examples"]
    assert dataset_info.manifest_fingerprint(first) != dataset_info.manifest_fingerprint(second)


# ----------------------------------------------------------------------------------------------
# Errors and signals


@pytest.mark.parametrize("module, args, fragment", [
    ("cxr_tfdata.cli.bench_input", ["--data_dir="], "--data_dir: is required"),
    ("tfrecords_builder", ["--input_dir=x", "--output_dir=y", "--image_size=abc"], "--image_size"),
])
def test_flag_errors_are_one_line(module, args, fragment):
    result = run_binary(module, *args)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
    assert "FATAL" not in result.stderr and "USAGE" not in result.stderr


_SLOW_BUILD = textwrap.dedent("""
    import sys, time
    from cxr_tfdata.core import imaging
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
