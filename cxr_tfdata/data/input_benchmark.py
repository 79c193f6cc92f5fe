"""The input benchmark's logic behind cxr-bench-input: images/s and peak RSS of the input pipeline
per configuration, against the notebook's ImageDataGenerator.

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
import shutil
import sys
import tempfile
import time

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
    from cxr_tfdata.core import dataset_info
    from cxr_tfdata.core.config import AugmentConfig, DataConfig
    from cxr_tfdata.data import input_pipeline

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
        num_examples = dataset_info.load(settings["data_dir"]).num_examples(settings["split"])
        warmup += math.ceil(num_examples / settings["batch_size"])
    rate = _time_batches(iterator, warmup, settings["num_batches"], settings["batch_size"])
    return {"images_per_second": rate, "peak_rss_mb": _peak_rss_mb()}


def split_source_files(data_dir: str, split: str, baseline_dir: str) -> list[tuple[str, str]]:
    """(source path, class name) of each record of the split, found under baseline_dir.

    Records name their source relative to its split folder ("PNEUMONIA/x.jpeg"); the split folder
    is looked up in the Kaggle layout (val may have been carved from train). Only these files are
    timed, so the baseline reads the images the pipeline reads and none that the build skipped
    (a corrupt file would stop ImageDataGenerator).
    """
    import tensorflow as tf

    from cxr_tfdata.core import dataset_info, record_schema

    info = dataset_info.load(data_dir)
    spec = {key: record_schema.parse_spec()[key] for key in (record_schema.FILENAME, record_schema.LABEL)}
    records = tf.data.TFRecordDataset(info.shard_paths(split))
    roots = [os.path.join(baseline_dir, folder) for folder in (split, "train", "val", "test")] + [baseline_dir]
    found, missing = [], []
    for record in records.map(lambda r: tf.io.parse_single_example(r, spec)).as_numpy_iterator():
        name = record[record_schema.FILENAME].decode()
        path = next((os.path.join(r, name) for r in roots if os.path.isfile(os.path.join(r, name))), None)
        if path is None:
            missing.append(name)
        else:
            found.append((path, record_schema.CLASS_NAMES[int(record[record_schema.LABEL])]))
    if not found:
        raise ValueError(f"--baseline_dir={baseline_dir}: none of the {len(missing)} source files of split "
                         f"{split!r} (e.g. {missing[:1]}) is there; pass the folder the dataset was built from")
    if missing:
        print(f"baseline: {len(missing)} of {len(missing) + len(found)} source files not found under "
              f"{baseline_dir} (e.g. {missing[0]}); timing the {len(found)} found", flush=True)
    return found


def _link_class_folders(files: list[tuple[str, str]], folder: str) -> None:
    """folder/<class>/<n>-<name> symlinks to the files, the layout flow_from_directory reads."""
    from cxr_tfdata.core import record_schema

    for class_name in record_schema.CLASS_NAMES:
        os.makedirs(os.path.join(folder, class_name))
    for index, (path, class_name) in enumerate(files):
        os.symlink(os.path.abspath(path), os.path.join(folder, class_name, f"{index}-{os.path.basename(path)}"))


def measure_baseline(settings: dict) -> dict:
    """Images/s of the notebook's ImageDataGenerator over the split's own source images."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from tf_keras.preprocessing.image import ImageDataGenerator
    except ImportError as e:
        raise RuntimeError("--baseline_dir needs tf-keras and scipy: pip install 'cxr-tfdata[baseline]'") from e
    from cxr_tfdata.core import record_schema
    from cxr_tfdata.core.config import AugmentConfig

    files = split_source_files(settings["data_dir"], settings["split"], settings["baseline_dir"])
    augment = AugmentConfig()
    links = tempfile.mkdtemp(prefix="cxr-baseline-")
    try:
        _link_class_folders(files, links)
        generator = ImageDataGenerator(
            rescale=1.0 / 255, rotation_range=augment.rotation_range, zoom_range=augment.zoom_range,
            width_shift_range=augment.width_shift_range, height_shift_range=augment.height_shift_range,
        ).flow_from_directory(
            links, classes=list(record_schema.CLASS_NAMES), target_size=(settings["image_size"],) * 2, batch_size=settings["batch_size"],
            class_mode="binary", color_mode="rgb", shuffle=True, seed=settings["seed"], follow_links=True,
        )
        rate = _time_batches(iter(generator), 1, settings["baseline_batches"], settings["batch_size"])
    finally:
        shutil.rmtree(links, ignore_errors=True)
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


def is_benchmark_json(path: str) -> bool:
    """True for a file this binary wrote: a JSON object of {configuration: {images_per_second, ...}}."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(content, dict) or not content:
        return False
    for name, value in content.items():
        if not isinstance(value, dict) or "images_per_second" not in value:
            return False
        if name != BASELINE_NAME:
            try:
                parse_configuration(name)
            except ValueError:
                return False
    return True
