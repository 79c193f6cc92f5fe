"""Test ordering for the parallel run (`pytest -n auto --dist loadfile`).

Each worker takes whole files from a queue in collection order. Queuing the longest files first
(longest-processing-time-first scheduling) keeps one worker from starting a long file while the other
has run out of work, which otherwise adds a minute or more to the wall time on two cores. The list
holds the files that train models or start processes, longest first, as paths relative to tests/;
every other file keeps its alphabetical place after them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

# Seconds each took in one parallel run before the tests were split by folder, for reference:
# distributed 172, train_cli 146, contract 97, train 85, data_safety (now binaries/test_*_safety.py) 85,
# eval_cli 62, export 43, input_pipeline 34, model 29, builder 26. The safety files' places are estimates.
LONGEST_FIRST = (
    "training/test_distributed.py",
    "binaries/test_train_cli.py",
    "modeling/test_contract.py",
    "training/test_train.py",
    "binaries/test_eval_cli.py",
    "binaries/test_train_safety.py",
    "serving/test_export.py",
    "binaries/test_shared_safety.py",
    "data/test_input_pipeline.py",
    "modeling/test_model.py",
    "tfrecords_builder/test_builder.py",
    "binaries/test_build_safety.py",
    "binaries/test_predict_safety.py",
    "binaries/test_bench_input_safety.py",
)


def pytest_collection_modifyitems(items):
    missing = [name for name in LONGEST_FIRST if not (TESTS_DIR / name).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names files that do not exist: {missing}")
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}

    def key(item) -> int:
        try:
            name = item.path.resolve().relative_to(TESTS_DIR).as_posix()
        except ValueError:  # a test file outside tests/
            return len(rank)
        return rank.get(name, len(rank))

    items.sort(key=key)  # stable: file order kept within


@pytest.fixture(autouse=True, scope="session")
def _patient_key_config_home(tmp_path_factory):
    """The patient key (cxr_tfdata.core.patient_keys) is made in a temporary config folder, never the user's;
    binaries started by tests inherit it."""
    previous = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg_config"))
    yield
    if previous is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = previous
