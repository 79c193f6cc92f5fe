"""The shared vocabulary of both packages, with no TensorFlow at import: the record schema, dataset
info (manifest.json), validated configs, progress lines, the image decode and folder scan shared by
the converter and every reader, patient ids, and how every binary runs (runner, console).

May import: cxr_tfdata.files. tfrecords_builder imports this folder and cxr_tfdata.files, nothing else.
"""
