"""`python -m tfrecords_builder`: the same binary as cxr-build-tfrecords."""

from tfrecords_builder.cli import build_tfrecords

build_tfrecords.run()
