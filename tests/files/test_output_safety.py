"""Tests of cxr_tfdata.files.output_safety: paths read as the operating system reads them, and folders
holding what we did not write."""

from __future__ import annotations

import json
import subprocess

import pytest

from cxr_tfdata.files import output_safety


def test_a_dot_dot_after_a_symlink_is_where_the_os_goes(tmp_path, monkeypatch):
    images = tmp_path / "src" / "test" / "NORMAL"
    images.mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(images)
    monkeypatch.chdir(tmp_path)
    # lnk/.. is src/test for the operating system, not "." as a textual normalisation would say.
    assert output_safety.canonical("lnk/../x.csv") == str(tmp_path / "src" / "test" / "x.csv")
    with pytest.raises(output_safety.UnsafeOutputError, match="lies inside"):
        output_safety.check_apart("--output_csv", "lnk/../x.csv", {"image path 1": "src/test"})
    # A "~" the shell did not expand is a folder named "~", for the checks as for the writes.
    assert output_safety.canonical("~/ds") == str(tmp_path / "~" / "ds")


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
            with pytest.raises(output_safety.UnsafeOutputError, match="--data_dir"):
                output_safety.check_apart("--model_dir", str(output), {"--data_dir": str(data)})
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "elsewhere")], check=False)


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
        problems = output_safety.dataset_problems(str(folder))
    else:
        (folder / "assets").mkdir()
        (folder / "saved_model.pb").write_bytes(b"pb")
        (folder / "assets" / "cxr_export.json").write_text("{}")
        (folder / "fingerprint.pb").mkdir()
        (folder / "fingerprint.pb" / "notes.txt").write_text("mine")
        problems = output_safety.saved_model_problems(str(folder))
    assert problems and "did not write" in problems[0]


def test_a_linked_dataset_info_is_named_as_a_link_not_as_missing(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "tfds": {}, "splits": {}}))
    (tmp_path / "elsewhere.json").write_text("{}")
    (folder / "dataset_info.json").symlink_to(tmp_path / "elsewhere.json")
    problems = output_safety.dataset_problems(str(folder))
    assert problems == ["dataset_info.json is a symbolic link, which cxr-build-tfrecords never writes"]
