"""cxr-make-sample: writes a Kaggle-layout folder of synthetic chest-X-ray-like images."""

from __future__ import annotations

from absl import app, flags, logging

from cxr_tfdata.cli import run_main
from tfrecords_builder import sample

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to create: {train,test}/{NORMAL,PNEUMONIA}/*.jpeg.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 240, "Number of images (about 1 NORMAL : 3 PNEUMONIA).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the same seed writes the same images.")
flags.mark_flag_as_required("output_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    images = sample.write_sample(_OUTPUT_DIR.value, _NUM_IMAGES.value, _SEED.value)
    logging.info("wrote %d images to %s", len(images), _OUTPUT_DIR.value)


def run():
    run_main(main, __name__, "cxr-make-sample")


if __name__ == "__main__":
    run()
