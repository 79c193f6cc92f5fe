"""cxr-bench-input as a careless user would run it: bad flags in one line, only its own results replaced."""

from __future__ import annotations

import json

import pytest

from cxr_tfdata.data import input_benchmark
from tests.binaries.safety_helpers import (
    one_error_line,
    run_binary,
)


@pytest.mark.parametrize("flag, fragment", [
    ("--configs=aug=gpu,cache=on", "--configs: 'aug=gpu,cache=on' is not of the form"),
    ("--split=holdout", "split 'holdout' not in dataset"),
])
def test_bench_input_bad_flags_are_one_line(records, flag, fragment):
    line = one_error_line(run_binary("cxr_tfdata.cli.bench_input", f"--data_dir={records}", flag), "cxr-bench-input")
    assert fragment in line


def test_bench_json_replaces_only_its_own_results(tmp_path):

    (tmp_path / "settings.json").write_text("{}")
    (tmp_path / "ours.json").write_text(json.dumps({"aug=cpu,cache=on": {"images_per_second": 1.0}}))
    assert not input_benchmark.is_benchmark_json(str(tmp_path / "settings.json"))
    assert input_benchmark.is_benchmark_json(str(tmp_path / "ours.json"))
