"""The guard a quantized export must pass before cxr-export writes it.

int8 calibrates on images drawn from the train split of --data_dir (a seeded sample over the whole
split, read through the evaluation pipeline: the pixels a model takes, 0..255 as float32). Every
quantized export (float16 or int8) is then checked on the val split: the quantized and the float Keras
model score the same images, and the export is refused, naming both figures, when the quantized
ROC-AUC is lower by more than --max_auc_drop or the label at the operating threshold changes on more
than --max_label_flips of the images. The figures go into the export's contract and description.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from cxr_tfdata.core import config as config_lib

CALIBRATION_SEED = 0
BATCH_SIZE = 32
METHODS = {("onnx", "int8"): "ONNX Runtime static QDQ int8 (per-channel int8 weights, uint8 activations, MinMax)",
           ("openvino", "float16"): "OpenVINO IR with float16-compressed weights",
           ("openvino", "int8"): "NNCF post-training int8 quantization of the OpenVINO IR",
           ("tflite", "float16"): "LiteRT float16 weights (post-training)",
           ("tflite", "int8"): "LiteRT full-integer int8 (representative data; float32 input and output)"}


class QuantizationRefused(ValueError):
    """The quantized model disagrees with the float model by more than the guard allows."""


def _batches(data_dir: str, split: str, image_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels float32 [B, S, S, 1] 0..255, labels int [B]) of a split in file order, no augmentation."""
    from cxr_tfdata.data import input_pipeline

    data_config = config_lib.DataConfig(data_dir=data_dir, image_size=image_size, cache="off", deterministic=True)
    for images, labels in input_pipeline.create_dataset(data_config, split, BATCH_SIZE, training=False):
        yield np.asarray(images, np.float32), np.rint(np.asarray(labels)).astype(np.int64).reshape(-1)


def calibration_pixels(data_dir: str, image_size: int, count: int, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """`count` images drawn uniformly (seeded reservoir sample) from the train split, float32 [n, S, S, 1];
    all of them when the split holds fewer."""
    rng = np.random.default_rng(seed)
    sample: list[np.ndarray] = []
    seen = 0
    for pixels, _ in _batches(data_dir, "train", image_size):
        for image in pixels:
            if len(sample) < count:
                sample.append(image)
            else:
                slot = int(rng.integers(0, seen + 1))
                if slot < count:
                    sample[slot] = image
            seen += 1
    if not sample:
        raise ValueError(f"--data_dir: the train split of {data_dir} holds no images to calibrate on")
    return np.stack(sample)


@dataclasses.dataclass(frozen=True)
class GuardResult:
    method: str
    calibration_images: int  # 0: no calibration (float16)
    val_images: int
    auc_float: float
    auc_quantized: float
    label_flips: int
    threshold: float
    max_abs_difference: float
    max_auc_drop: float
    max_label_flips: float

    @property
    def auc_drop(self) -> float:
        return self.auc_float - self.auc_quantized

    @property
    def flip_share(self) -> float:
        return self.label_flips / self.val_images

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "auc_drop": self.auc_drop, "label_flip_share": self.flip_share,
                "val_split": "val", "guard": "refused when auc_drop > max_auc_drop or label_flip_share > "
                                             "max_label_flips (labels at threshold, against the float model)"}


def check(float_score: Callable[[np.ndarray], np.ndarray], quantized_score: Callable[[np.ndarray], np.ndarray],
          data_dir: str, image_size: int, threshold: float, *, method: str, calibration_images: int,
          max_auc_drop: float, max_label_flips: float, what: str) -> GuardResult:
    """Scores the val split with both models; the figures, or QuantizationRefused naming both."""
    from sklearn.metrics import roc_auc_score

    labels, float_p, quantized_p = [], [], []
    for pixels, batch_labels in _batches(data_dir, "val", image_size):
        labels.append(batch_labels)
        float_p.append(np.asarray(float_score(pixels), np.float64).reshape(-1))
        quantized_p.append(np.asarray(quantized_score(pixels), np.float64).reshape(-1))
    if not labels:
        raise ValueError(f"--data_dir: the val split of {data_dir} holds no images for the quantization guard")
    y, p, q = np.concatenate(labels), np.concatenate(float_p), np.concatenate(quantized_p)
    if len(np.unique(y)) < 2:
        raise ValueError(f"--data_dir: the val split of {data_dir} holds one class only; the quantization guard "
                         f"needs both to compare ROC-AUC")
    if not np.all(np.isfinite(q)):
        raise QuantizationRefused(f"--quantize: refused, the quantized {what} gives non-finite probabilities on "
                                  f"the val split; nothing was written")
    result = GuardResult(method, calibration_images, int(y.size), float(roc_auc_score(y, p)),
                         float(roc_auc_score(y, q)), int(np.sum((p >= threshold) != (q >= threshold))),
                         float(threshold), float(np.max(np.abs(p - q))), float(max_auc_drop), float(max_label_flips))
    if result.auc_drop > max_auc_drop or result.flip_share > max_label_flips:
        raise QuantizationRefused(
            f"--quantize: refused, the quantized {what} scores val ROC-AUC {result.auc_quantized:.4f} against "
            f"{result.auc_float:.4f} for the float model (a drop of {result.auc_drop:.4f}; --max_auc_drop="
            f"{max_auc_drop:g}) and flips the label at {threshold:.4g} on {result.label_flips} of "
            f"{result.val_images} val images ({result.flip_share:.2%}; --max_label_flips={max_label_flips:g}); "
            f"nothing was written")
    return result
