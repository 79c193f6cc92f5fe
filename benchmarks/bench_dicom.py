"""Benchmark: images/s converting 2048x2048 12-bit DICOMs to 224 px, full vs reduced decode.

Run: .venv/bin/python benchmarks/bench_dicom.py [--images 4] [--repeats 3]  (needs the [dicom] extra)
Synthetic images (smooth anatomy-like field plus detector noise) are written to a temporary
folder, read back as bytes, then converted as the converter would: read_dicom (with or without
min_size) and a squash resize to 224 x 224 with Pillow's antialiased bilinear filter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from pydicom import uid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the package and tests/dicom_writer.py, from a checkout

from cxr_tfdata.core import dicom  # noqa: E402
from tests.dicom_writer import smooth_image, write_dicom  # noqa: E402

TARGET = 224
MAX_THREADS = 2  # the machine has 2 cores; the converter runs one process per core
WINDOW = dict(
    BitsStored=12,
    HighBit=11,
    RescaleSlope=1,
    RescaleIntercept=0,
    WindowCenter=2048,
    WindowWidth=3000,
)


def convert(data: bytes, min_size: int | None) -> np.ndarray:
    image = dicom.read_dicom(data, min_size=min_size).image()
    return np.asarray(image.resize((TARGET, TARGET), Image.Resampling.BILINEAR))


def make_files(folder: str, count: int, size: int) -> dict[str, list[bytes]]:
    """{case name: [file bytes]} for each transfer syntax, written once to disk and read back."""
    cases = {
        "uncompressed": (uid.ExplicitVRLittleEndian, WINDOW),
        "uncompressed, no VOI (fallback)": (
            uid.ExplicitVRLittleEndian,
            dict(BitsStored=12, HighBit=11),
        ),
        "JPEG 2000 lossless": (uid.JPEG2000Lossless, WINDOW),
    }
    out = {}
    for name, (syntax, attrs) in cases.items():
        datas = []
        for i in range(count):
            pixels = smooth_image(size, size, 200, 3900, seed=i)
            path = write_dicom(
                os.path.join(folder, f"{len(out)}_{i}"), pixels, transfer_syntax=syntax, **attrs
            )
            with open(path, "rb") as f:
                datas.append(f.read())
        out[name] = datas
    return out


def rate(
    datas: list[bytes], min_size: int | None, threads: int, repeats: int
) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process) over `repeats` passes
    through the files, after one warm-up conversion. The CPU-time rate is the steadier figure on a
    shared machine; the wall-clock rate with 2 threads shows what the GIL lets run in parallel."""
    convert(datas[0], min_size)
    work = datas * repeats
    start, cpu_start = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(lambda d: convert(d, min_size), work):
            pass
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return len(work) / wall, len(work) / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        files = make_files(folder, args.images, args.size)
        print(
            f"wrote {args.images} x {len(files)} files of {args.size}x{args.size} 12-bit in "
            f"{time.perf_counter() - t0:.1f} s; sizes: "
            + ", ".join(
                f"{name} {np.mean([len(d) for d in datas]) / 1e6:.1f} MB"
                for name, datas in files.items()
            )
        )
    threads = range(1, MAX_THREADS + 1)
    load = os.getloadavg()[0]
    print(
        f"load average {load:.1f} on {os.cpu_count()} cores (other work slows wall-clock figures)"
    )
    header = " ".join(f"wall {t} thr".rjust(12) for t in threads) + "  cpu-time rate"
    print(f"{'case':34s} {'decode':8s} {'reduction':>9s} {header}")
    for name, datas in files.items():
        for label, min_size in (("full", None), ("reduced", TARGET)):
            reduction = dicom.read_dicom(datas[0], min_size=min_size).reduction
            rates = [rate(datas, min_size, t, args.repeats) for t in threads]
            walls = " ".join(f"{wall:7.1f} im/s" for wall, _ in rates)
            print(f"{name:34s} {label:8s} {reduction:>9d} {walls} {rates[0][1]:9.1f} im/s")


if __name__ == "__main__":
    main()
