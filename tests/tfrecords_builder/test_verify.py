"""cxr-verify-tfrecords: a good dataset passes; truncated, corrupted or miscounted shards are named."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, assert_quiet
from tfrecords_builder import build, sample, verify


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    sample.write_sample(str(root / "images"), num_images=24, seed=5)
    build.build_dataset(build.BuildConfig(input_dir=str(root / "images"), output_dir=str(root / "data"),
                                          image_size=32, num_workers=1, num_shards=2))
    return root / "data"


@pytest.fixture
def data_dir(built, tmp_path):
    return shutil.copytree(built, tmp_path / "data")


def _shard(data_dir, split="train", index=1):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return data_dir / manifest["splits"][split]["shard_files"][index]


def test_good_dataset_passes(data_dir):
    report = verify.verify_dataset(str(data_dir))
    assert report.ok, report.summary()
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert report.num_examples == {s: v["num_examples"] for s, v in manifest["splits"].items()}


def test_truncated_shard_is_named(data_dir):
    shard = _shard(data_dir)
    shard.write_bytes(shard.read_bytes()[:-100])
    report = verify.verify_dataset(str(data_dir))
    assert not report.ok
    assert any(str(shard) in e and "DataLoss" in e for e in report.errors), report.errors
    assert not any("{{" in e or "\n" in e for e in report.errors), report.errors


def test_flipped_byte_fails_the_record_crc(data_dir):
    shard = _shard(data_dir, "test", 0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify.verify_dataset(str(data_dir))
    assert any(str(shard) in e for e in report.errors), report.errors
    # The cause in one line, without TensorFlow's internal node names.
    assert not any("{{" in e or "\n" in e for e in report.errors), report.errors


def test_count_mismatch_and_missing_shard_are_reported(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["splits"]["val"]["num_examples"] += 1
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    _shard(data_dir, "train", 0).unlink()
    errors = verify.verify_dataset(str(data_dir)).errors
    assert any("split val" in e and "manifest says" in e for e in errors), errors
    assert any(e.startswith("missing shard") and "train" in e for e in errors), errors


def test_not_a_dataset_is_reported(tmp_path):
    report = verify.verify_dataset(str(tmp_path))
    assert not report.ok and "manifest.json not found" in report.errors[0]


def test_binary_exits_nonzero_naming_the_shard(data_dir):
    shard = _shard(data_dir)
    shard.write_bytes(shard.read_bytes()[:-100])
    # A subprocess, not flagsaver: importing several entry points into one test process would
    # define flags such as --data_dir twice.
    result = subprocess.run(
        [sys.executable, "-m", "tfrecords_builder.cli.verify_tfrecords", f"--data_dir={data_dir}"],
        cwd=REPO_ROOT, env=dict(os.environ),
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert str(shard) in result.stderr
    assert_quiet(result.stderr, "cxr-verify-tfrecords", "cxr-verify-tfrecords: error: ")
