"""cxr-verify-tfrecords: re-reads every shard of a built dataset; exits non-zero naming the bad shard."""

from __future__ import annotations

import sys

from absl import app, flags, logging

from cxr_tfdata.core.runner import run_main

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset folder written by cxr-build-tfrecords.")
flags.mark_flag_as_required("data_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tfrecords_builder import verify  # TensorFlow loads here, after the flags are checked

    report = verify.verify_dataset(_DATA_DIR.value)
    if not report.ok:
        for problem in report.errors:
            print(f"cxr-verify-tfrecords: problem: {problem}", file=sys.stderr)
        raise verify.VerifyError(report.summary())
    logging.info("%s", report.summary())


def run():
    run_main(main, __name__, "cxr-verify-tfrecords")


if __name__ == "__main__":
    run()
