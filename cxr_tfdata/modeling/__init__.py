"""The model and what it needs to be used: ResNet50V2 and its head, preprocessing, the contract a
model carries, safe loading, and how to feed a model the images it was trained on.

May import: cxr_tfdata.files, cxr_tfdata.core, cxr_tfdata.metrics, cxr_tfdata.data.
"""
