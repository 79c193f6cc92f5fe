"""Fixtures of the binary-level tests. The expensive ones are built once per session; tests copy what they
change (`images` is a fresh copy of the session's sample folder, `records` a fresh dataset)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests import eval_fixtures
from tests.binaries.safety_helpers import IMAGE_SIZE, train_config
from tests.helpers import write_tiny_dataset
from tfrecords_builder import sample


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "images"
    sample.write_sample(str(path), num_images=24, seed=5)
    return path


@pytest.fixture
def images(sample_dir, tmp_path):
    """A fresh copy of the session's sample image folder, for the test to change."""
    return shutil.copytree(sample_dir, tmp_path / "images")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny dataset and model of tests/eval_fixtures.py (cached for the session there too); tests copy
    the model before changing anything beside it."""
    return eval_fixtures.get_tiny_setup(tmp_path_factory)


@pytest.fixture
def records(tmp_path):
    """A fresh tiny dataset per test: some tests rebuild or damage it."""
    write_tiny_dataset(tmp_path / "records", {"train": (6, 6), "val": (3, 3)}, image_size=IMAGE_SIZE)
    return tmp_path / "records"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(records, model dir) of one finished two-epoch frozen run, trained once; tests
    read it or take `run_copy`."""
    from cxr_tfdata.training import train

    root = tmp_path_factory.mktemp("trained_run")
    records = root / "records"
    write_tiny_dataset(records, {"train": (6, 6), "val": (3, 3)}, image_size=IMAGE_SIZE)
    model_dir = root / "run"
    train.train_and_evaluate(train_config(records, model_dir, epochs=2, steps_per_epoch=1))
    return records, model_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run for the test to change, its config.json naming the copy."""
    records, model_dir = trained
    copy = Path(shutil.copytree(model_dir, tmp_path / "run"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_dir": str(copy)}))  # the run, as if made here
    return records, copy
