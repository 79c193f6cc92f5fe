"""The record schema: feature keys and class names, the one place the writer and the readers import.

`tfrecords_builder` writes records through tensorflow-datasets with exactly these features;
`cxr_tfdata.data.input_pipeline` parses the same bytes with `parse_spec()`. Tests build hand-made
records with `serialize_example`. The manifest beside the records is dataset_info.py's. TensorFlow
is imported only by the functions that need it.
"""

from __future__ import annotations

# Class names come from the Kaggle folder names; the label is the index here.
CLASS_NAMES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
POSITIVE_CLASS = "PNEUMONIA"
# The label rule when no operating threshold is chosen: PNEUMONIA when probability >= this.
DEFAULT_THRESHOLD = 0.5

# Feature keys, as tensorflow-datasets serializes a flat FeaturesDict.
IMAGE = "image"  # encoded JPEG or PNG, single channel, image_size x image_size
LABEL = "label"  # int64 index into CLASS_NAMES
FILENAME = "filename"  # source file name relative to the split/class folder, e.g. "PNEUMONIA/person1_virus_6.jpeg"
PATIENT_ID = "patient_id"  # parsed from the file name; the file stem when it cannot be parsed
ORIGINAL_HEIGHT = "original_height"
ORIGINAL_WIDTH = "original_width"



def parse_spec() -> dict:
    """tf.io.parse_single_example's spec of a record."""
    import tensorflow as tf

    return {
        IMAGE: tf.io.FixedLenFeature([], tf.string),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
        FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
        PATIENT_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
        ORIGINAL_HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=0),
        ORIGINAL_WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    }


def serialize_example(
    encoded_image: bytes,
    label: int,
    filename: str = "",
    patient_id: str = "",
    original_height: int = 0,
    original_width: int = 0,
) -> bytes:
    """Serializes one record the way tensorflow-datasets writes it (for tests and tools)."""
    import tensorflow as tf

    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _int(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                IMAGE: _bytes(encoded_image),
                LABEL: _int(label),
                FILENAME: _bytes(filename.encode("utf-8")),
                PATIENT_ID: _bytes(patient_id.encode("utf-8")),
                ORIGINAL_HEIGHT: _int(original_height),
                ORIGINAL_WIDTH: _int(original_width),
            }
        )
    )
    return example.SerializeToString()
