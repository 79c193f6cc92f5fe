"""cxr-build-tfrecords: Kaggle chest X-ray folders -> a TFDS-readable sharded TFRecord dataset."""

from __future__ import annotations

import sys

from absl import app, flags, logging

from cxr_tfdata.core import imaging
from cxr_tfdata.core.runner import run_main
from tfrecords_builder import table_presets

_INPUT_DIR = flags.DEFINE_string("input_dir", None, "Folder with {train,test[,val]}/{NORMAL,PNEUMONIA}/*, or "
                                   "the images a --labels_csv / --labels_format table names.")
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
_VIEWS = flags.DEFINE_list(
    "views", [], "DICOM ViewPositions to keep, e.g. PA,AP (defined terms: "
    f"{','.join(imaging.DICOM_VIEW_POSITIONS)}). Every other file, JPEG/PNG included, is left out and listed "
    "in manifest.json under \"excluded_views\". Empty: every file.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Decode/resize/encode processes; 0: all cores.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 0, "Shards per split; 0: from --target_shard_mb.")
_TARGET_SHARD_MB = flags.DEFINE_float("target_shard_mb", 32.0,
                                      "Shard size aimed at when --num_shards=0 (at least 4 shards per split).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Replace an existing --output_dir once the new dataset is complete. Only a dataset written by this "
    "binary that holds nothing else is replaced; any other folder is refused.")
_PATIENT_KEY_FILE = flags.DEFINE_string(
    "patient_key_file", None,
    "The site's secret key that hashes patient ids (HMAC-SHA256) before anything is written; created on first "
    "use, owner-only. Default: $XDG_CONFIG_HOME/cxr-tfdata/patient_key (~/.config/cxr-tfdata/patient_key). "
    "Must lie outside --input_dir and --output_dir and be readable by its owner only.")
_REDACT_PATHS = flags.DEFINE_bool(
    "redact_paths", False,
    "Replace every source path in every output (records' filename, manifest.json, logs) by its keyed hash, "
    "keeping the extension: for folders or files named after patients.")
_LABELS_CSV = flags.DEFINE_string(
    "labels_csv", None, "A label table (CSV) naming the images under --input_dir (found recursively) instead of "
    "Kaggle folders; its columns are given by --image_column, --label_column, --label_values, --patient_column "
    "and --split_column, or by --labels_format. With --labels_format: default <input_dir>/<the preset's file>.")
_LABELS_FORMAT = flags.DEFINE_enum(
    "labels_format", None, table_presets.FORMATS,
    "A public table: rsna (stage_2_train_labels.csv), nih (Data_Entry_2017.csv, with train_val_list.txt and "
    "test_list.txt beside it when present) or chexpert (train.csv, and valid.csv beside it as val).")
_IMAGE_COLUMN = flags.DEFINE_string("image_column", None, "--labels_csv column naming the image file (a name "
                                    "or a path relative to --input_dir).")
_LABEL_COLUMN = flags.DEFINE_string("label_column", None, "--labels_csv column holding the label.")
_LABEL_VALUES = flags.DEFINE_list(
    "label_values", [], "VALUE=CLASS items mapping --label_column values to NORMAL or PNEUMONIA, e.g. "
    "1=PNEUMONIA,0=NORMAL (numbers compare by value, words ignore case). Empty: 0=NORMAL,1=PNEUMONIA and the "
    "class names themselves. A row with another value is skipped, with its reason.")
_PATIENT_COLUMN = flags.DEFINE_string("patient_column", None, "--labels_csv column with the patient identifier. "
                                      "Empty: from the file name, as for Kaggle folders.")
_SPLIT_COLUMN = flags.DEFINE_string("split_column", None, "--labels_csv column with train, val or test. Empty: "
                                    "test (and val) are carved from the rows by patient.")
_TEST_FRACTION = flags.DEFINE_float("test_fraction", 0.2, "Share of each class's images carved out as test (by "
                                    "patient) when a label table gives no test split.")
_UNCERTAIN = flags.DEFINE_enum("uncertain", "exclude", tuple(table_presets.UNCERTAIN_POLICIES),
                               "--labels_format=chexpert: what a -1.0 (uncertain) Pneumonia label becomes.")
_NIH_NORMAL = flags.DEFINE_enum(
    "nih_normal", "not_pneumonia", table_presets.NIH_NORMAL,
    "--labels_format=nih: NORMAL is every image without Pneumonia (not_pneumonia) or only those labelled "
    "'No Finding' (no_finding; images with other findings are skipped).")
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
        max_file_mb=_MAX_FILE_MB.value, views=tuple(v.strip().upper() for v in _VIEWS.value if v.strip()),
        patient_key_file=_PATIENT_KEY_FILE.value or "", redact_paths=_REDACT_PATHS.value,
        labels_csv=_LABELS_CSV.value or "", labels_format=_LABELS_FORMAT.value or "",
        image_column=_IMAGE_COLUMN.value or "", label_column=_LABEL_COLUMN.value or "",
        label_values=tuple(v.strip() for v in _LABEL_VALUES.value if v.strip()),
        patient_column=_PATIENT_COLUMN.value or "", split_column=_SPLIT_COLUMN.value or "",
        test_fraction=_TEST_FRACTION.value, uncertain=_UNCERTAIN.value, nih_normal=_NIH_NORMAL.value)
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
