"""Tests of cxr_tfdata.features: a record serialised by the schema parses back with the schema."""

from __future__ import annotations

import tensorflow as tf

from cxr_tfdata import features
from tests.helpers import encode_png, labelled_image


def test_a_serialised_record_parses_back_exactly():
    image = encode_png(labelled_image(1, 7, 16))
    record = features.serialize_example(image, 1, filename="PNEUMONIA/x.png", patient_id="person7",
                                        original_height=900, original_width=1200)
    parsed = tf.io.parse_single_example(record, features.parse_spec())
    assert parsed[features.IMAGE].numpy() == image
    assert int(parsed[features.LABEL]) == 1
    assert parsed[features.FILENAME].numpy() == b"PNEUMONIA/x.png"
    assert parsed[features.PATIENT_ID].numpy() == b"person7"
    assert (int(parsed[features.ORIGINAL_HEIGHT]), int(parsed[features.ORIGINAL_WIDTH])) == (900, 1200)


def test_optional_metadata_has_defaults():
    example = tf.train.Example(features=tf.train.Features(feature={
        features.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"])),
        features.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
    }))
    parsed = tf.io.parse_single_example(example.SerializeToString(), features.parse_spec())
    assert parsed[features.FILENAME].numpy() == b"" and int(parsed[features.ORIGINAL_WIDTH]) == 0


def test_class_names_are_the_kaggle_folders_with_pneumonia_positive():
    assert features.CLASS_NAMES == ("NORMAL", "PNEUMONIA")
    assert features.CLASS_NAMES.index(features.POSITIVE_CLASS) == 1
