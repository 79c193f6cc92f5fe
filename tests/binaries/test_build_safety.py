"""cxr-build-tfrecords as a hostile or careless user would run it: users' folders, overlapping paths, bad
entries, full disks."""

from __future__ import annotations

import os

import pytest

from cxr_tfdata.core import imaging
from cxr_tfdata.files import locking, output_safety
from tests.binaries.safety_helpers import (
    build_config,
    jpeg_with_blank_scan,
    one_error_line,
    png_header_claiming,
    run_binary,
    tmpfs,
    tree_snapshot,
    user_home,
)
from tests.helpers import lock_held_by_another_process
from tfrecords_builder import build, writer


def test_build_overwrite_refuses_a_users_folder_and_changes_nothing(images, tmp_path):
    home = user_home(tmp_path / "victim" / "home")
    before = tree_snapshot(tmp_path / "victim")
    with pytest.raises(output_safety.UnsafeOutputError) as refused:
        build.build_dataset(build_config(images, home, overwrite=True))
    assert str(home) in str(refused.value) and "thesis.txt" in str(refused.value)
    assert tree_snapshot(tmp_path / "victim") == before
    assert sorted(os.listdir(tmp_path / "victim")) == ["home"]  # no lock, staging or .previous left


@pytest.mark.parametrize("where", ["parent_of_input", "input_itself", "inside_input", "symlink_to_input"])
def test_build_output_overlapping_the_input_is_refused(images, tmp_path, where):
    output = {"parent_of_input": tmp_path, "input_itself": images, "inside_input": images / "train" / "out",
              "symlink_to_input": tmp_path / "link"}[where]
    if where == "symlink_to_input":
        output.symlink_to(images)
    before = tree_snapshot(tmp_path)
    with pytest.raises(output_safety.UnsafeOutputError, match="--input_dir"):
        build.build_dataset(build_config(images, output, overwrite=True))
    assert tree_snapshot(tmp_path) == before


def test_a_second_build_of_the_same_output_is_refused_naming_the_first(images, tmp_path):
    out = tmp_path / "out"
    with lock_held_by_another_process(locking.lock_path_beside(str(out)), "cxr-build-tfrecords") as pid:
        with pytest.raises(locking.LockedError, match=f"cxr-build-tfrecords \\(pid {pid} on host .*, started 20"):
            build.build_dataset(build_config(images, out))
        assert not out.exists()
    # The holder was killed with SIGKILL: the operating system released its lock.
    build.build_dataset(build_config(images, out))
    assert (out / "manifest.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["images", "out"]


def test_unusable_entries_of_class_folders_are_listed_not_dropped(images, tmp_path):
    normal = images / "train" / "NORMAL"
    (normal / "linked_folder").symlink_to(images / "test" / "NORMAL", target_is_directory=True)
    (normal / "dangling.jpeg").symlink_to(tmp_path / "gone.jpeg")
    os.mkfifo(normal / "pipe.jpeg")
    (normal / "zero.jpeg").symlink_to("/dev/zero")
    manifest = build.build_dataset(build_config(images, tmp_path / "out"))
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert reasons["train/NORMAL/linked_folder"] == "symbolic link to a folder (not followed)"
    assert reasons["train/NORMAL/dangling.jpeg"] == "broken symbolic link"
    assert reasons["train/NORMAL/pipe.jpeg"].startswith("a FIFO (named pipe), not a regular file")
    assert reasons["train/NORMAL/zero.jpeg"].startswith("a character device, not a regular file")
    with pytest.raises(writer.BuildError, match="pipe.jpeg|linked_folder|dangling|zero"):
        build.build_dataset(build_config(images, tmp_path / "strict", strict=True))
    assert not (tmp_path / "strict").exists()


def test_a_jpeg_with_blank_scan_data_is_flagged_and_fatal_under_strict(images, tmp_path):
    victim = sorted((images / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    victim.write_bytes(jpeg_with_blank_scan(victim))
    manifest = build.build_dataset(build_config(images, tmp_path / "out"))
    flagged = [entry["path"] for entry in manifest["near_constant"]]
    assert flagged == [f"train/PNEUMONIA/{victim.name}"]
    assert manifest["near_constant"][0]["pixel_std"] < imaging.NEAR_CONSTANT_STD
    assert sum(s["num_near_constant"] for s in manifest["splits"].values()) == 1
    with pytest.raises(writer.BuildError, match=f"{victim.name}: near-constant image"):
        build.build_dataset(build_config(images, tmp_path / "strict", strict=True))


def test_oversized_sources_and_bomb_headers_are_skipped_unread(images, tmp_path):
    (images / "train" / "NORMAL" / "bomb.png").write_bytes(png_header_claiming(50_000, 50_000))
    big = images / "train" / "NORMAL" / "big.jpeg"
    big.write_bytes(b"\xff\xd8\xff" + bytes(300_000))
    manifest = build.build_dataset(build_config(images, tmp_path / "out", max_file_mb=0.25))
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert "image too large" in reasons["train/NORMAL/bomb.png"]
    assert "larger than the 0.25 MB limit: not read" in reasons["train/NORMAL/big.jpeg"]


def test_build_binary_refusals_are_one_line(images, tmp_path):
    home = user_home(tmp_path / "home")
    line = one_error_line(run_binary("tfrecords_builder", f"--input_dir={images}", f"--output_dir={home}",
                                "--overwrite"), "cxr-build-tfrecords")
    assert f"--output_dir={home} is not a dataset written by cxr-build-tfrecords" in line
    assert "thesis.txt" in line and (home / "thesis.txt").read_text() == "four years of work"


def test_build_on_a_full_disk_fails_in_one_line_and_leaves_nothing(images, tmp_path):
    with tmpfs(tmp_path / "small", "64k") as disk:
        result = run_binary("tfrecords_builder", f"--input_dir={images}", f"--output_dir={disk / 'out'}",
                      "--image_size=64", "--encoding=png", "--num_workers=1")
        line = one_error_line(result, "cxr-build-tfrecords")
        assert "no space left on the device (disk full)" in line
        assert os.listdir(disk) == []


def test_max_file_mb_must_be_finite():
    with pytest.raises(ValueError, match="--max_file_mb"):
        build.BuildConfig(input_dir="a", output_dir="b", max_file_mb=float("inf"))
