"""Does the serving SavedModel see the pixels the converter stores? In-graph decode and resize
(cxr_tfdata.serving.export.decode_image_bytes) against the converter's (cxr_tfdata.serving.predict.load_image, PIL),
on every image under a folder, for each resize mode and record encoding. Prints, per setting, the
mean and largest absolute difference in grey levels and how many images differ at all.

  python benchmarks/serving_parity.py --images_dir=../shared/data/chest_xray_orig --image_size=224
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from cxr_tfdata.modeling import image_scoring
from cxr_tfdata.serving import imaging_in_graph

_IMAGES_DIR = flags.DEFINE_string("images_dir", None, "Folder of JPEG/PNG images (searched recursively).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Model input size.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Use at most this many images (0: all).")


def _images(folder: str) -> list[str]:
    found = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
             if name.lower().endswith((".jpeg", ".jpg", ".png"))]
    return sorted(found)[:_LIMIT.value or None]


def main(argv):
    del argv
    paths = _images(_IMAGES_DIR.value)
    size = _IMAGE_SIZE.value
    print(f"{len(paths)} images from {_IMAGES_DIR.value}, image size {size}")
    for pad in (False, True):
        for quality in (None, 95):
            started, means, largest, refused = time.monotonic(), [], [], 0
            for path in paths:
                with open(path, "rb") as f:
                    data = f.read()
                try:  # a CMYK JPEG: the serving graph refuses it (CMYK_REASON) rather than score it otherwise
                    in_graph = imaging_in_graph.decode_image_bytes(tf.constant(data), size, pad=pad,
                                                                   jpeg_quality=quality).numpy()
                except tf.errors.InvalidArgumentError:
                    refused += 1
                    continue
                converter = image_scoring.load_image(path, size, pad, "jpeg" if quality else "png", quality or 95)
                difference = np.abs(in_graph - converter.astype(np.float32))
                means.append(float(difference.mean()))
                largest.append(float(difference.max()))
            print(f"resize {'pad' if pad else 'squash':6s} records {'jpeg q' + str(quality) if quality else 'png':8s}: "
                  f"mean |difference| {np.mean(means):.4f} grey levels, largest {max(largest):.0f}, images differing "
                  f"{sum(m > 0 for m in largest)}/{len(paths)}, refused {refused} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    flags.mark_flag_as_required("images_dir")
    app.run(main)
