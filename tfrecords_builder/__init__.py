"""Kaggle chest X-ray folders -> TFDS-readable sharded TFRecords: scan, split, encode, write, verify."""
