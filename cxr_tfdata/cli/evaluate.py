"""cxr-evaluate: metrics, intervals, report and plots of a trained model on one split of a dataset."""

from __future__ import annotations

from absl import app, flags

from cxr_tfdata.cli import run_main

_MODEL = flags.DEFINE_string("model", None, "Trained model (.keras) to evaluate; loaded in Keras safe mode.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset directory written by cxr-build-tfrecords.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None,
    "Where metrics.json, report.md, predictions.csv and the plots (roc, pr, confusion_matrix, calibration .png) go.")
_VAL_SPLIT = flags.DEFINE_string("val_split", "val", "Split on which the operating threshold is chosen.")
_TARGET_RECALL = flags.DEFINE_float(
    "target_recall", 0.95,
    "The operating threshold is the highest threshold whose recall (sensitivity) on --val_split is at least this.")
_THRESHOLD = flags.DEFINE_float(
    "threshold", None, "Fixed operating threshold; overrides the choice on --val_split (which is then not read).")
_BOOTSTRAP_SAMPLES = flags.DEFINE_integer(
    "bootstrap_samples", 1000, "Bootstrap resamples for the 95% intervals (by patient when ids exist); 0 disables.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per inference batch.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Write into a non-empty --output_dir that cxr-evaluate did not write, beside what is there. A file of "
    "the same name as one of cxr-evaluate's (e.g. cxr-train's metrics.json) is never replaced. A folder "
    "cxr-evaluate wrote before is updated without this flag.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cxr_tfdata import evaluate

    config = evaluate.EvaluateConfig(
        model_path=_MODEL.value or "",
        data_dir=_DATA_DIR.value or "",
        output_dir=_OUTPUT_DIR.value or "",
        split=_SPLIT.value,
        val_split=_VAL_SPLIT.value,
        target_recall=_TARGET_RECALL.value,
        threshold=_THRESHOLD.value,
        bootstrap_samples=_BOOTSTRAP_SAMPLES.value,
        seed=_SEED.value,
        batch_size=_BATCH_SIZE.value,
        overwrite=_OVERWRITE.value,
    )
    metrics = evaluate.evaluate(config)
    boot = metrics["bootstrap"]
    print(f"Split {config.split!r}: {metrics['n']} images. 95% bootstrap intervals by {boot['resampled_by']} "
          f"({boot['samples']} resamples).")
    print(evaluate.summary_table(metrics))
    print(f"Wrote metrics.json, report.md, predictions.csv and plots to {config.output_dir}")
    return 0


def run():
    run_main(main, __name__, "cxr-evaluate")


if __name__ == "__main__":
    run()
