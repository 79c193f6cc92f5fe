"""Converter throughput: cxr-build-tfrecords at 1 and N workers against a naive serial writer.

The naive writer is what a first script does: PIL full-resolution decode, grayscale, bilinear
resize, JPEG encode and tf.io.TFRecordWriter, one process. All runs see the same files in the
same process after one warm-up read (page cache), and each is repeated; the table shows the best
and the median wall time of whole builds (scan, hashing, plan, TFDS writing, manifest included).

  python benchmarks/bench_builder.py --input_dir=../shared/data/chest_xray_orig [--json=out.json]
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import app, flags, logging
from PIL import Image

from cxr_tfdata.core import folder_scan, imaging, record_schema
from tfrecords_builder import build

_INPUT_DIR = flags.DEFINE_string("input_dir", "../shared/data/chest_xray_orig", "Kaggle-layout image folder.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Output image side.")
_WORKERS = flags.DEFINE_list("workers", ["1", str(os.cpu_count() or 1)], "Worker counts to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs per configuration (best and median reported).")
_DRAFT_IMAGES = flags.DEFINE_integer("draft_images", 40, "Images for the draft-vs-full decode difference.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here as JSON.")


def _source_files(input_dir: str) -> list[folder_scan.SourceFile]:
    by_split, _, _ = folder_scan.scan_input(input_dir)
    return [f for files in by_split.values() for f in files]


def naive_serial_write(files: list[folder_scan.SourceFile], image_size: int, path: str) -> int:
    """Full decode + resize + encode + TFRecordWriter, one image after another."""
    written = 0
    with tf.io.TFRecordWriter(path) as writer:
        for source in files:
            with Image.open(source.path) as image:
                gray = image.convert("L")
                height, width = gray.height, gray.width
                resized = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            resized.save(buf, format="JPEG", quality=95)
            writer.write(record_schema.serialize_example(buf.getvalue(), source.label, source.filename,
                                                    source.patient_id, height, width))
            written += 1
    return written


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _time(fn, repeats: int) -> tuple[list[float], int, float]:
    """Wall seconds of each run, the image count, and the median CPU seconds per run."""
    seconds, cpu, count = [], [], 0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        count = fn()
        seconds.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - start_cpu)
    return seconds, count, statistics.median(cpu)


def _converter_run(input_dir: str, work_dir: str, workers: int, image_size: int) -> int:
    output_dir = os.path.join(work_dir, f"built-{workers}")
    shutil.rmtree(output_dir, ignore_errors=True)
    manifest = build.build_dataset(build.BuildConfig(input_dir=input_dir, output_dir=output_dir,
                                                     image_size=image_size, num_workers=workers))
    return sum(s["num_examples"] for s in manifest["splits"].values())


def draft_difference(files: list[folder_scan.SourceFile], image_size: int, count: int) -> dict[str, float]:
    """Mean absolute difference (grey levels) between draft-mode and full JPEG decoding."""
    diffs = []
    for source in files[:: max(1, len(files) // max(1, count))][:count]:
        with open(source.path, "rb") as f:
            data = f.read()
        fast, _ = imaging.decode_and_resize(data, image_size)
        full, _ = imaging.decode_and_resize(data, image_size, draft=False)
        diffs.append(float(np.abs(fast.astype(np.int16) - full.astype(np.int16)).mean()))
    return {"images": len(diffs), "mean_abs_diff": float(np.mean(diffs)), "max_image_mean_abs_diff": float(np.max(diffs))}


def _busy(_: int) -> int:
    total = 0
    for i in range(2_000_000):
        total += i
    return total


def parallelism_available(workers: int) -> float:
    """Speed-up of a pure CPU loop on `workers` processes: what the machine can give right now."""
    start = time.perf_counter()
    for i in range(2 * workers):
        _busy(i)
    serial = time.perf_counter() - start
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        start = time.perf_counter()
        pool.map(_busy, range(2 * workers), chunksize=1)
        parallel = time.perf_counter() - start
    return serial / parallel


def _row(name, workers, timing, naive_rate, one_worker_rate):
    seconds, count, cpu = timing
    best, median = min(seconds), statistics.median(seconds)
    rate = count / best
    return {"method": name, "workers": workers, "images": count, "best_s": round(best, 3),
            "cpu_ms_per_image": round(1000 * cpu / count, 2),
            "median_s": round(median, 3), "images_per_s": round(rate, 1),
            "median_images_per_s": round(count / median, 1),
            "vs_naive": round(rate / naive_rate, 2) if naive_rate else None,
            "vs_1_worker": round(rate / one_worker_rate, 2) if one_worker_rate else None}


def _print_table(rows, draft, load, control):
    print(f"\nconverter benchmark, {rows[0]['images']} images, image_size={_IMAGE_SIZE.value}, "
          f"load average before: {load}")
    print(f"control: a pure CPU loop speeds up {control['speedup']:.2f}x on {control['workers']} "
          "processes right now (about the worker count on an idle machine)")
    header = (f"{'method':<22}{'workers':>8}{'best s':>9}{'median s':>10}{'img/s':>9}{'x naive':>9}"
              f"{'x 1 worker':>12}{'cpu ms/img':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:<22}{r['workers']:>8}{r['best_s']:>9.2f}{r['median_s']:>10.2f}"
              f"{r['images_per_s']:>9.1f}{r['vs_naive'] or '':>9}{r['vs_1_worker'] or '':>12}"
              f"{r['cpu_ms_per_image']:>12.2f}")
    print("cpu ms/img: CPU time of the process and its workers per image; it does not depend on "
          "what else runs on the machine, unlike the wall-clock columns.")
    print(f"draft vs full JPEG decode at {_IMAGE_SIZE.value} px over {draft['images']} images: "
          f"mean |diff| {draft['mean_abs_diff']:.2f} grey levels (worst image {draft['max_image_mean_abs_diff']:.2f})")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep the per-build progress lines out of the table
    input_dir, size = os.path.abspath(_INPUT_DIR.value), _IMAGE_SIZE.value
    files = _source_files(input_dir)
    for source in files:  # warm the page cache so that no run pays the first disk read
        with open(source.path, "rb") as f:
            f.read()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench_builder_") as work_dir:
        naive = _time(lambda: naive_serial_write(files, size, os.path.join(work_dir, "naive.tfrecord")),
                      _REPEATS.value)
        rows = [_row("naive serial writer", 1, naive, None, None)]
        naive_rate, one_rate = naive[1] / min(naive[0]), None
        for workers in (int(w) for w in _WORKERS.value):
            timing = _time(lambda w=workers: _converter_run(input_dir, work_dir, w, size), _REPEATS.value)
            rows.append(_row("cxr-build-tfrecords", workers, timing, naive_rate, one_rate))
            if workers == 1:
                one_rate = timing[1] / min(timing[0])
    draft = draft_difference(files, size, _DRAFT_IMAGES.value)
    most = max(int(w) for w in _WORKERS.value)
    control = {"workers": most, "speedup": round(parallelism_available(most), 2)}
    _print_table(rows, draft, load, control)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"rows": rows, "draft": draft, "load_average_before": load, "control": control,
                       "input_dir": input_dir, "cpu_count": os.cpu_count()}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
