"""cxr-build-tfrecords: Kaggle chest X-ray folders -> a TFDS-readable sharded TFRecord dataset."""

from __future__ import annotations

import sys

from absl import app, flags, logging

from cxr_tfdata.cli import run_main
from tfrecords_builder import imaging

_INPUT_DIR = flags.DEFINE_string("input_dir", None, "Folder with {train,test[,val]}/{NORMAL,PNEUMONIA}/*.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Dataset folder to create (TFDS dataset dir + manifest.json).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Side of the square output images, in pixels.")
_RESIZE = flags.DEFINE_enum("resize", imaging.DEFAULT_RESIZE, imaging.RESIZE_MODES,
                            "squash: stretch to a square; pad: keep the aspect ratio, letterbox on black.")
_ENCODING = flags.DEFINE_enum("encoding", imaging.DEFAULT_ENCODING, imaging.ENCODINGS,
                              "How record images are stored (png is lossless).")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", imaging.DEFAULT_JPEG_QUALITY, "JPEG quality, 1-100.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.2,
                                   "Share of each class's train images carved out as val (by patient) when "
                                   "there is no usable val/ folder. 0: no val split.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the val carve-out.")
_MIN_VAL_IMAGES = flags.DEFINE_integer("min_val_images", 100,
                                       "A given val/ folder with fewer images (Kaggle's has 16) is merged into "
                                       "train and val is carved out instead.")
_DROP_LEAKS = flags.DEFINE_bool("drop_leaks", True,
                                "Remove from train/val the files byte-identical to a file in a higher split "
                                "(test > val > train), and the images of a patient who is also in a higher "
                                "split. Leaks are reported either way.")
_STRICT = flags.DEFINE_bool(
    "strict", False,
    "Fail on the first file that cannot be used (corrupt, non-image, too large, not a regular file) or looks "
    "damaged (a near-constant picture) instead of skipping or flagging it.")
_MAX_FILE_MB = flags.DEFINE_float("max_file_mb", imaging.DEFAULT_MAX_FILE_MB,
                                  "Source files larger than this are skipped unread.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Decode/resize/encode processes; 0: all cores.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Shards per split; 0: from --target_shard_mb.")
_TARGET_SHARD_MB = flags.DEFINE_float("target_shard_mb", 32.0,
                                      "Shard size aimed at when --num_shards=0 (at least 4 shards per split).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Replace an existing --output_dir once the new dataset is complete. Only a dataset written by this "
    "binary that holds nothing else is replaced; any other folder is refused.")
_VERIFY = flags.DEFINE_bool("verify", False, "After building, re-read and check every shard (as cxr-verify-tfrecords).")

flags.mark_flags_as_required(["input_dir", "output_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tfrecords_builder import (  # TensorFlow loads here, after the flags are checked
        build,
        verify,
    )

    config = build.BuildConfig(
        input_dir=_INPUT_DIR.value, output_dir=_OUTPUT_DIR.value, image_size=_IMAGE_SIZE.value,
        resize=_RESIZE.value, encoding=_ENCODING.value, jpeg_quality=_JPEG_QUALITY.value,
        val_fraction=_VAL_FRACTION.value, seed=_SEED.value, min_val_images=_MIN_VAL_IMAGES.value,
        drop_leaks=_DROP_LEAKS.value, strict=_STRICT.value, num_workers=_NUM_WORKERS.value,
        num_shards=_NUM_SHARDS.value, target_shard_mb=_TARGET_SHARD_MB.value, overwrite=_OVERWRITE.value,
        max_file_mb=_MAX_FILE_MB.value)
    build.build_dataset(config)
    if _VERIFY.value:
        report = verify.verify_dataset(config.output_dir)
        if not report.ok:
            for problem in report.errors:
                print(f"cxr-build-tfrecords: problem: {problem}", file=sys.stderr)
            raise verify.VerifyError(f"verify failed: {report.summary()}")
        logging.info("%s", report.summary())


def run():
    run_main(main, __name__, "cxr-build-tfrecords")


if __name__ == "__main__":
    run()
