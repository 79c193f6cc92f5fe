"""cxr-make-sample: writes a Kaggle-layout folder of synthetic chest-X-ray-like images."""

from __future__ import annotations

import os

from absl import app, flags, logging

from cxr_tfdata.core.runner import run_main
from tfrecords_builder import sample

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to create: {train,test}/{NORMAL,PNEUMONIA}/*.jpeg.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 240, "Number of images (about 1 NORMAL : 3 PNEUMONIA).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the same seed writes the same images.")
flags.mark_flag_as_required("output_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cxr_tfdata.files import locking, output_safety

    if not _OUTPUT_DIR.value:
        raise ValueError("--output_dir: is required")
    output_dir = output_safety.canonical(_OUTPUT_DIR.value)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    with locking.exclusive_lock(locking.lock_path_beside(output_dir), f"--output_dir={output_dir}",
                                "cxr-make-sample"):
        images = sample.write_sample(output_dir, _NUM_IMAGES.value, _SEED.value)
    logging.info("wrote %d images to %s", len(images), _OUTPUT_DIR.value)


def run():
    run_main(main, __name__, "cxr-make-sample")


if __name__ == "__main__":
    run()
