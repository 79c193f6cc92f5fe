"""Kaggle chest X-ray folders -> TFDS-readable sharded TFRecords: plan splits, encode, write, verify.

May import: cxr_tfdata.files and cxr_tfdata.core only (the record schema, image decode, folder scan,
file safety and the binary runner live there, on the side both packages share). cxr_tfdata never
imports this package: dependencies run one way, from the builder to cxr_tfdata's bottom layers.
"""
