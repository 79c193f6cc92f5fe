"""Benchmark: cxr-predict's images/s on original-resolution JPEGs, serial decode vs decode overlapped with
inference (image_scoring.predict_rows with decode_workers=0 and 2), in the same run.

Run: .venv/bin/python benchmarks/bench_predict.py [--images 128] [--batch_size 32] [--repeats 2]
The images are the first N (sorted, repeated if fewer) of /work/shared/data/chest_xray_orig/{train,test}/
{NORMAL,PNEUMONIA} (read-only; the benchmark is skipped when the folder is absent). The model is ResNet50V2 as cxr-train
builds it (cxr_tfdata.modeling.model, weights="none", 224 px, float32), saved as .keras and loaded as
cxr-predict loads it. Each setting is timed `repeats` times after a warm-up batch (alternating, best kept).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DATA = "/work/shared/data/chest_xray_orig"
IMAGE_SIZE = 224


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--record_encoding", default="jpeg", choices=("jpeg", "png"))
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.data, "*", "*", "*.jpeg")))
    if not paths:
        print(f"skipped: no images under {args.data}")
        return 0
    paths = (paths * (args.images // len(paths) + 1))[:args.images]

    from cxr_tfdata.core.config import ModelConfig
    from cxr_tfdata.modeling import image_scoring, model, runtimes

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model.build_model(IMAGE_SIZE, ModelConfig(weights="none")).save(path)
        loaded = runtimes.open_model(path)

    def run(workers: int, files: list[str]) -> float:
        start = time.perf_counter()
        rows = image_scoring.predict_rows(loaded, files, IMAGE_SIZE, False, 0.5, args.batch_size,
                                          args.record_encoding, decode_workers=workers, keep_pixels=False)
        assert not any(row.error for row in rows), [row.error for row in rows if row.error][:3]
        return len(files) / (time.perf_counter() - start)

    run(2, paths[:args.batch_size])  # warm-up: Keras traces, oneDNN primitives
    best = {0: 0.0, 2: 0.0}
    for _ in range(args.repeats):
        for workers in best:
            best[workers] = max(best[workers], run(workers, paths))
    print(f"{len(paths)} original-resolution JPEGs of {args.data}, ResNet50V2 at {IMAGE_SIZE} px, batch "
          f"{args.batch_size}, records {args.record_encoding}, {os.cpu_count()} CPUs, best of {args.repeats}:")
    print(f"  serial decode:      {best[0]:6.1f} images/s")
    print(f"  overlapped decode:  {best[2]:6.1f} images/s  ({best[2] / best[0]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
