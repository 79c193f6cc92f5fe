"""Tests of cxr_tfdata.core.record_schema: a record serialised by the schema parses back with the schema."""

from __future__ import annotations

import tensorflow as tf

from cxr_tfdata.core import record_schema
from tests.helpers import encode_png, labelled_image


def test_a_serialised_record_parses_back_exactly():
    image = encode_png(labelled_image(1, 7, 16))
    record = record_schema.serialize_example(image, 1, filename="PNEUMONIA/x.png", patient_id="person7",
                                        original_height=900, original_width=1200)
    parsed = tf.io.parse_single_example(record, record_schema.parse_spec())
    assert parsed[record_schema.IMAGE].numpy() == image
    assert int(parsed[record_schema.LABEL]) == 1
    assert parsed[record_schema.FILENAME].numpy() == b"PNEUMONIA/x.png"
    assert parsed[record_schema.PATIENT_ID].numpy() == b"person7"
    assert (int(parsed[record_schema.ORIGINAL_HEIGHT]), int(parsed[record_schema.ORIGINAL_WIDTH])) == (900, 1200)


def test_optional_metadata_has_defaults():
    example = tf.train.Example(features=tf.train.Features(feature={
        record_schema.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"])),
        record_schema.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
    }))
    parsed = tf.io.parse_single_example(example.SerializeToString(), record_schema.parse_spec())
    assert parsed[record_schema.FILENAME].numpy() == b"" and int(parsed[record_schema.ORIGINAL_WIDTH]) == 0


def test_class_names_are_the_kaggle_folders_with_pneumonia_positive():
    assert record_schema.CLASS_NAMES == ("NORMAL", "PNEUMONIA")
    assert record_schema.CLASS_NAMES.index(record_schema.POSITIVE_CLASS) == 1
