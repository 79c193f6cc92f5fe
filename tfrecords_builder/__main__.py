"""`python -m tfrecords_builder`: the same binary as cxr-build-tfrecords."""

from tfrecords_builder import main

main.run()
