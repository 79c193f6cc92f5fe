"""`python -m tfrecords_builder`: the same binary as cxr-build-tfrecords."""

from tfrecords_builder.main import run

run()
