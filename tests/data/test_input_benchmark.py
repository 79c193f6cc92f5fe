"""Tests of cxr_tfdata.data.input_benchmark (and its binary cxr-bench-input) on tiny records: output structure
and flags, not speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from cxr_tfdata.cli import bench_input
from cxr_tfdata.data import input_benchmark
from tests.helpers import (
    REPO_ROOT,
    assert_quiet,
    encode_png,
    labelled_image,
    source_name,
    write_tiny_dataset,
)

SIZE = 32


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("records")
    write_tiny_dataset(data_dir, image_size=SIZE, split_sizes={"train": (10, 14)})
    return data_dir


@pytest.fixture
def kaggle_folder(tmp_path):
    """The source folder of dataset_dir in Kaggle layout, plus bad files that the build skipped."""
    for index in range(24):
        label = 0 if index < 10 else 1
        path = tmp_path / "images" / "train" / ("NORMAL", "PNEUMONIA")[label] / source_name("train", index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(labelled_image(label, index, SIZE)))
    # Not in the records: a corrupt file would stop ImageDataGenerator if it were read.
    (tmp_path / "images" / "train" / "NORMAL" / "corrupt.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "images" / "train" / "PNEUMONIA" / "truncated.jpeg").write_bytes(b"\xff\xd8\xff\xe0")
    return tmp_path / "images"


@pytest.fixture(autouse=True)
def parsed_flags():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def test_bench_writes_every_configuration_and_the_baseline(dataset_dir, kaggle_folder, tmp_path):
    out = tmp_path / "bench.json"
    configs = "aug=cpu,cache=on;aug=device,cache=off;aug=none,cache=on"
    with flagsaver.flagsaver(data_dir=str(dataset_dir), image_size=SIZE, batch_size=4, num_batches=3,
                             warmup_batches=1, baseline_batches=2, configs=configs,
                             baseline_dir=str(kaggle_folder), json=str(out), fresh_process=False):
        bench_input.main([])
    results = json.loads(out.read_text())
    assert set(results) == {"aug=cpu,cache=on", "aug=device,cache=off", "aug=none,cache=on",
                            input_benchmark.BASELINE_NAME}
    for entry in results.values():
        assert set(entry) == {"images_per_second", "peak_rss_mb"}
        assert entry["images_per_second"] > 0 and entry["peak_rss_mb"] > 50


def test_bench_binary_measures_in_a_fresh_process(dataset_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "cxr_tfdata.cli.bench_input", f"--data_dir={dataset_dir}", f"--image_size={SIZE}",
         "--batch_size=4", "--num_batches=2", "--warmup_batches=1", "--configs=aug=none,cache=off",
         f"--json={out}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "aug=none,cache=off" in result.stdout
    assert_quiet(result.stderr, "cxr-bench-input")
    assert set(json.loads(out.read_text())) == {"aug=none,cache=off"}


@pytest.mark.parametrize("name", ["aug=gpu,cache=on", "aug=cpu", "cache=on,aug=cpu,x=1", "nonsense"])
def test_bad_configuration_names_are_rejected_naming_the_flag(name):
    with pytest.raises(ValueError, match="--configs"):
        input_benchmark.parse_configuration(name)
    assert input_benchmark.parse_configuration("cache=off,aug=device") == ("device", False)


def test_baseline_reads_the_split_s_own_source_files_and_skips_what_the_build_skipped(
        dataset_dir, kaggle_folder):
    for folder in (kaggle_folder, kaggle_folder / "train"):
        files = input_benchmark.split_source_files(str(dataset_dir), "train", str(folder))
        assert len(files) == 24
        assert not any("corrupt" in path or "truncated" in path for path, _ in files)
        for path, class_name in files:
            assert f"/{class_name}/TRAIN-IM-" in path
    with pytest.raises(ValueError, match="--baseline_dir=.*none of the 24 source files"):
        input_benchmark.split_source_files(str(dataset_dir), "train", str(kaggle_folder / "train" / "NORMAL"))
