"""Every binary's --help lists its own flags (console scripts run a wrapper __main__ with none)."""

import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, assert_quiet


@pytest.mark.parametrize("binary, module, expected", [
    ("cxr-build-tfrecords", "tfrecords_builder.cli.build_tfrecords", ("--input_dir", "--output_dir", "--val_fraction")),
    ("cxr-verify-tfrecords", "tfrecords_builder.cli.verify_tfrecords", ("--data_dir",)),
    ("cxr-make-sample", "tfrecords_builder.cli.make_sample", ("--output_dir", "--num_images")),
    ("cxr-bench-input", "cxr_tfdata.cli.bench_input", ("--data_dir", "--baseline_dir", "--json")),
    ("cxr-train", "cxr_tfdata.cli.train", ("--data_dir", "--model_dir", "--stage", "--fine_tune_at")),
    ("cxr-evaluate", "cxr_tfdata.cli.evaluate", ("--model", "--split", "--target_recall")),
    ("cxr-predict", "cxr_tfdata.cli.predict", ("--model", "--output_csv", "--gradcam_dir")),
    ("cxr-export", "cxr_tfdata.cli.export", ("--model", "--output_dir", "--[no]overwrite")),
    ("cxr-recalibrate", "cxr_tfdata.cli.recalibrate", ("--model", "--output_model", "--images_dir", "--folds")),
    ("cxr-data-service", "cxr_tfdata.cli.data_service", ("--role", "--port", "--dispatcher_address")),
])
def test_help_lists_the_binary_s_own_flags(binary, module, expected):
    code = f"import sys; sys.argv = [{binary!r}, '--help']; import {module} as m; m.run()"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    for flag in expected:
        assert flag in result.stdout, (flag, result.stdout[-800:])
    assert_quiet(result.stderr, binary)  # nothing at all on stderr
    assert "tensorflow" not in result.stdout.lower()
