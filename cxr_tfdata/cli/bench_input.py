"""cxr-bench-input: images/s and peak RSS of the input pipeline per configuration, against
ImageDataGenerator (the logic: cxr_tfdata.data.input_benchmark)."""

from __future__ import annotations

import os

from absl import app, flags

from cxr_tfdata.core.runner import run_main
from cxr_tfdata.data import input_benchmark

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset directory written by cxr-build-tfrecords.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Images per batch.", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Image size the dataset was built at; default: the dataset's.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 100, "Batches timed per configuration.", lower_bound=1)
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 10, "Batches read before timing starts.", lower_bound=0)
_CONFIGS = flags.DEFINE_string(
    "configs",
    "aug=cpu,cache=on;aug=cpu,cache=off;aug=device,cache=on;aug=none,cache=on;aug=none,cache=off",
    "Configurations to time, separated by ';' (each `aug=cpu|device|none,cache=on|off`).",
)
_BATCH_DTYPE = flags.DEFINE_enum("batch_dtype", "uint8", ["uint8", "float16", "bfloat16", "float32"],
                                 "Dtype of the delivered batches.")
_BASELINE_DIR = flags.DEFINE_string(
    "baseline_dir", None,
    "The source images the dataset was built from (the Kaggle folder given to cxr-build-tfrecords, or one "
    "of its split folders): ImageDataGenerator is timed over the same images as the timed split, found "
    "there by the records' file names (needs the `baseline` extra: tf-keras, scipy).",
)
_BASELINE_BATCHES = flags.DEFINE_integer("baseline_batches", 10, "Batches timed for the baseline.", lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "Write {configuration: {images_per_second, peak_rss_mb}} here.")
_SEED = flags.DEFINE_integer("seed", 0, "Shuffle and augmentation seed.")
_FRESH_PROCESS = flags.DEFINE_boolean(
    "fresh_process", True,
    "Measure each configuration in a new process, so peak RSS is per configuration; with "
    "--nofresh_process everything runs here and peak_rss_mb is the process peak so far.",
)


def check_settings(configurations: list[str]) -> int:
    """Every flag checked before any measurement, so a bad one fails at once, naming it; returns
    the image size (the dataset's unless --image_size is given)."""
    from cxr_tfdata.core import dataset_info
    from cxr_tfdata.files import output_safety

    for name in configurations:
        input_benchmark.parse_configuration(name)
    if not configurations:
        raise ValueError("--configs: no configuration given")
    info = dataset_info.load(_DATA_DIR.value)
    num_examples = info.num_examples(_SPLIT.value)
    if num_examples < _BATCH_SIZE.value:
        raise ValueError(f"--batch_size={_BATCH_SIZE.value} is more than the {num_examples} examples of split "
                         f"{_SPLIT.value!r}")
    built = info.image_size
    if _IMAGE_SIZE.value is not None and _IMAGE_SIZE.value != built:
        raise ValueError(f"--image_size={_IMAGE_SIZE.value}: {_DATA_DIR.value} was built at {built}x{built}")
    if _BASELINE_DIR.value and not os.path.isdir(_BASELINE_DIR.value):
        raise ValueError(f"--baseline_dir={_BASELINE_DIR.value} is not a folder")
    if _JSON.value:
        output_safety.check_apart("--json", _JSON.value, {"--data_dir": _DATA_DIR.value,
                                                    "--baseline_dir": _BASELINE_DIR.value or ""})
        output_safety.check_file_replaceable("--json", _JSON.value, input_benchmark.is_benchmark_json)
    return built


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _DATA_DIR.value:
        raise ValueError("--data_dir: is required")
    configurations = [c.strip() for c in _CONFIGS.value.split(";") if c.strip()]
    image_size = check_settings(configurations)
    settings = {
        "data_dir": _DATA_DIR.value, "split": _SPLIT.value, "batch_size": _BATCH_SIZE.value,
        "image_size": image_size, "num_batches": _NUM_BATCHES.value,
        "warmup_batches": _WARMUP_BATCHES.value, "baseline_batches": _BASELINE_BATCHES.value,
        "batch_dtype": _BATCH_DTYPE.value, "seed": _SEED.value, "fresh_process": _FRESH_PROCESS.value,
    }
    results = input_benchmark.run_benchmark(settings, configurations, _BASELINE_DIR.value)
    if _JSON.value:
        from cxr_tfdata.files import atomic

        atomic.write_json(_JSON.value, results)


def run():
    run_main(main, __name__, "cxr-bench-input")


if __name__ == "__main__":
    run()
