"""absl entry points of the converter's binaries: cxr-build-tfrecords, cxr-verify-tfrecords, cxr-make-sample."""
