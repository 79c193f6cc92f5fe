"""cxr-bench-input: images/s and peak RSS of the input pipeline per configuration, against ImageDataGenerator.

Configurations are named `aug=<cpu|device|none>,cache=<on|off>`:
  - aug=cpu: random affine augmentation inside tf.data (create_dataset with placement "cpu");
  - aug=device: the pipeline ships un-augmented uint8 batches and augmentation runs on the accelerator
    as the model's RandomAffine layer, so its cost is not part of the input pipeline (the pipeline is
    the same as aug=none; the name records where augmentation happens in training);
  - aug=none: no augmentation anywhere;
  - cache=on: decoded uint8 images cached in memory (timed after the first epoch has filled it);
    cache=off: every image read and decoded again.
Each configuration runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import resource
import sys
import time

from absl import app, flags

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset directory written by cxr-build-tfrecords.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Images per batch.", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image size the dataset was built at.")
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
    "A Kaggle-layout folder (<dir>/NORMAL, <dir>/PNEUMONIA) to time ImageDataGenerator.flow_from_directory "
    "over (needs the `baseline` extra: tf-keras, scipy).",
)
_BASELINE_BATCHES = flags.DEFINE_integer("baseline_batches", 10, "Batches timed for the baseline.", lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "Write {configuration: {images_per_second, peak_rss_mb}} here.")
_SEED = flags.DEFINE_integer("seed", 0, "Shuffle and augmentation seed.")
_FRESH_PROCESS = flags.DEFINE_boolean(
    "fresh_process", True,
    "Measure each configuration in a new process, so peak RSS is per configuration; with "
    "--nofresh_process everything runs here and peak_rss_mb is the process peak so far.",
)

BASELINE_NAME = "baseline=ImageDataGenerator"
_AUGMENT_PLACES = ("cpu", "device", "none")


def parse_configuration(name: str) -> tuple[str, bool]:
    """'aug=cpu,cache=on' -> ("cpu", True); a bad name fails naming --configs."""
    try:
        parts = dict(item.split("=", 1) for item in name.split(","))
    except ValueError:
        parts = {}
    if set(parts) != {"aug", "cache"} or parts["aug"] not in _AUGMENT_PLACES or parts["cache"] not in ("on", "off"):
        raise ValueError(f"--configs: {name!r} is not of the form aug=cpu|device|none,cache=on|off")
    return parts["aug"], parts["cache"] == "on"


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _time_batches(iterator, warmup_batches: int, num_batches: int, batch_size: int) -> float:
    for _ in range(warmup_batches):
        next(iterator)
    start = time.perf_counter()
    images = 0
    for _ in range(num_batches):
        batch = next(iterator)
        images += int(batch[0].shape[0]) if hasattr(batch[0], "shape") else batch_size
    return images / (time.perf_counter() - start)


def measure_pipeline(settings: dict) -> dict:
    """Images/s of create_dataset in one configuration, after warm-up (and after the cache is filled)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cxr_tfdata import input_pipeline
    from cxr_tfdata.config import AugmentConfig, DataConfig

    placement, cache_on = parse_configuration(settings["name"])
    data_config = DataConfig(
        data_dir=settings["data_dir"], image_size=settings["image_size"],
        cache="memory" if cache_on else "off", seed=settings["seed"], batch_dtype=settings["batch_dtype"],
    )
    # "device" ships un-augmented batches: the augmentation runs in the model on the accelerator.
    augment = AugmentConfig(placement="cpu") if placement == "cpu" else AugmentConfig(placement="none")
    dataset = input_pipeline.create_dataset(
        data_config, settings["split"], settings["batch_size"], training=True, augment=augment, repeat=True
    )
    iterator = iter(dataset)
    warmup = settings["warmup_batches"]
    if cache_on:
        # Steady state is every epoch after the first, which fills the cache.
        num_examples = input_pipeline.split_num_examples(settings["data_dir"], settings["split"])
        warmup += math.ceil(num_examples / settings["batch_size"])
    rate = _time_batches(iterator, warmup, settings["num_batches"], settings["batch_size"])
    return {"images_per_second": rate, "peak_rss_mb": _peak_rss_mb()}


def measure_baseline(settings: dict) -> dict:
    """Images/s of the notebook's ImageDataGenerator.flow_from_directory over the same images."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from tf_keras.preprocessing.image import ImageDataGenerator
    except ImportError as e:
        raise RuntimeError("--baseline_dir needs tf-keras and scipy: pip install 'cxr-tfdata[baseline]'") from e
    from cxr_tfdata.config import AugmentConfig

    augment = AugmentConfig()
    generator = ImageDataGenerator(
        rescale=1.0 / 255, rotation_range=augment.rotation_range, zoom_range=augment.zoom_range,
        width_shift_range=augment.width_shift_range, height_shift_range=augment.height_shift_range,
    ).flow_from_directory(
        settings["baseline_dir"], target_size=(settings["image_size"],) * 2, batch_size=settings["batch_size"],
        class_mode="binary", color_mode="rgb", shuffle=True, seed=settings["seed"],
    )
    if generator.samples == 0:
        raise ValueError(f"--baseline_dir={settings['baseline_dir']}: no images in class sub-folders")
    rate = _time_batches(iter(generator), 1, settings["baseline_batches"], settings["batch_size"])
    return {"images_per_second": rate, "peak_rss_mb": _peak_rss_mb()}


def _run_in_fresh_process(function, settings: dict) -> dict:
    """Runs one measurement in a new interpreter so that its peak RSS is its own."""
    if not settings["fresh_process"]:
        return function(settings)
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, (settings,))


def run_benchmark(settings: dict, configurations: list[str], baseline_dir: str | None) -> dict[str, dict]:
    """{name: {images_per_second, peak_rss_mb}} for each configuration (and the baseline), printed as run."""
    results = {}
    if baseline_dir:
        results[BASELINE_NAME] = _run_in_fresh_process(measure_baseline, {**settings, "baseline_dir": baseline_dir})
        print(f"{BASELINE_NAME:24s} {results[BASELINE_NAME]['images_per_second']:9.1f} images/s  "
              f"peak RSS {results[BASELINE_NAME]['peak_rss_mb']:7.0f} MB", flush=True)
    for name in configurations:
        results[name] = _run_in_fresh_process(measure_pipeline, {**settings, "name": name})
        line = (f"{name:24s} {results[name]['images_per_second']:9.1f} images/s  "
                f"peak RSS {results[name]['peak_rss_mb']:7.0f} MB")
        if BASELINE_NAME in results:
            line += f"  {results[name]['images_per_second'] / results[BASELINE_NAME]['images_per_second']:6.1f}x baseline"
        print(line, flush=True)
    return results


def main(argv):
    del argv
    if not _DATA_DIR.value:
        raise app.UsageError("--data_dir is required")
    configurations = [c.strip() for c in _CONFIGS.value.split(";") if c.strip()]
    for name in configurations:
        parse_configuration(name)
    settings = {
        "data_dir": _DATA_DIR.value, "split": _SPLIT.value, "batch_size": _BATCH_SIZE.value,
        "image_size": _IMAGE_SIZE.value, "num_batches": _NUM_BATCHES.value,
        "warmup_batches": _WARMUP_BATCHES.value, "baseline_batches": _BASELINE_BATCHES.value,
        "batch_dtype": _BATCH_DTYPE.value, "seed": _SEED.value, "fresh_process": _FRESH_PROCESS.value,
    }
    results = run_benchmark(settings, configurations, _BASELINE_DIR.value)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
