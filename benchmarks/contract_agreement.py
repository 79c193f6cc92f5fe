"""Do cxr-predict, the exported SavedModel and cxr-evaluate --images_dir agree, given only the model?

Runs the three on one folder of NORMAL/ and PNEUMONIA/ images with nothing but the model (its
contract supplies the rest), then prints the largest differences in probability and calibrated
probability, how many labels agree, and the evaluation's raw and calibrated ECE.

  python benchmarks/contract_agreement.py --model=run/final.keras --images_dir=../shared/data/chest_xray_orig/test
"""

from __future__ import annotations

import csv
import io
import os
import tempfile

import numpy as np
import tensorflow as tf
from absl import app, flags

from cxr_tfdata.evaluation import evaluate, evaluate_config
from cxr_tfdata.serving import export, predict

_MODEL = flags.DEFINE_string("model", None, "A .keras model written by cxr-train.")
_IMAGES_DIR = flags.DEFINE_string("images_dir", None, "A folder with NORMAL/ and PNEUMONIA/ subfolders.")


def main(argv):
    del argv
    folder = os.path.abspath(_IMAGES_DIR.value)
    with tempfile.TemporaryDirectory(prefix="cxr-agreement-") as work:
        metrics = evaluate.evaluate(evaluate_config.EvaluateConfig(
            model_path=_MODEL.value, images_dir=folder, output_dir=os.path.join(work, "eval")))
        with open(os.path.join(work, "eval", "predictions.csv"), newline="") as f:
            evaluated = {row["filename"]: row for row in csv.DictReader(f)}
        rows = predict.predict(predict.PredictConfig(model_path=_MODEL.value, paths=(folder,)), io.StringIO())
        predicted = {os.path.relpath(row.path, folder): row for row in rows if not row.error}
        export.export(export.ExportConfig(model_path=_MODEL.value, output_dir=os.path.join(work, "export")))
        serve = tf.saved_model.load(os.path.join(work, "export")).signatures[export.SIGNATURE_KEY]
        names = sorted(evaluated)
        served = {key: value.numpy() for key, value in serve(image_bytes=tf.constant(
            [open(os.path.join(folder, name), "rb").read() for name in names])).items()}

    raw = np.array([float(evaluated[n]["probability"]) for n in names])
    calibrated = np.array([float(evaluated[n]["calibrated_probability"]) for n in names])
    labels = [evaluated[n]["predicted_label"] for n in names]
    served_labels = [label.decode() for label in served[export.LABEL_KEY]]
    by_predict = np.array([predicted[n].probability for n in names])
    by_predict_calibrated = np.array([predicted[n].calibrated_probability for n in names])
    print(f"{len(names)} images of {folder} evaluated ({metrics['source']['num_unreadable']} unreadable); "
          f"threshold {metrics['operating_point']['threshold']:.4g} ({metrics['operating_point']['chosen_by']})")
    print(f"probability: max |evaluate - predict| {np.abs(raw - by_predict).max():.2e}, "
          f"max |evaluate - export| {np.abs(raw - served[export.OUTPUT_KEY]).max():.2e}")
    print(f"calibrated probability: max |evaluate - predict| {np.abs(calibrated - by_predict_calibrated).max():.2e}, "
          f"max |evaluate - export| {np.abs(calibrated - served[export.CALIBRATED_KEY]).max():.2e}")
    same_as_predict = sum(label == predicted[name].label for label, name in zip(labels, names, strict=True))
    same_as_export = sum(a == b for a, b in zip(labels, served_labels, strict=True))
    print(f"labels equal: evaluate and predict {same_as_predict}/{len(names)}, evaluate and export "
          f"{same_as_export}/{len(names)}")
    cal = metrics["calibration"]
    print(f"ECE ({cal['ece_bins']} bins): raw {cal['raw']['ece']:.4f}, calibrated "
          f"{cal['calibrated']['ece'] if cal['calibrated'] else float('nan'):.4f}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["model", "images_dir"])
    app.run(main)
