"""Shared fixtures of the evaluation tests: a tiny dataset and a tiny trained model, built once per run.

The model has the package's input convention (raw [S, S, 1] pixels -> RandomAffine -> ToResNetInput ->
a nested convolutional base -> pooling -> sigmoid), so it exercises what the ResNet50V2 model does:
registered custom layers under safe mode, a nested base for Grad-CAM, a float32 output.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests import helpers

IMAGE_SIZE = 32
SPLIT_SIZES = {"train": (16, 24), "val": (8, 12), "test": (10, 14)}
REPO_ROOT = Path(__file__).resolve().parents[1]

_CACHE: dict[str, TinySetup] = {}


@dataclasses.dataclass(frozen=True)
class TinySetup:
    data_dir: Path
    model_path: Path
    manifest: dict


def tiny_model(image_size: int = IMAGE_SIZE, pooled_base: bool = False, seed: int = 0):
    """An untrained tiny model with the package's input convention and a nested conv base."""
    import keras

    from cxr_tfdata.data.augment import RandomAffine
    from cxr_tfdata.modeling.preprocessing import ToResNetInput

    keras.utils.set_random_seed(seed)
    base_input = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(base_input)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(x)
    if pooled_base:
        x = keras.layers.GlobalAveragePooling2D(name="inner_pool")(x)
    base = keras.Model(base_input, x, name="tiny_base")

    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = RandomAffine(name="random_affine")(inputs)
    x = ToResNetInput(name="to_resnet_input")(x)
    x = base(x, training=False)
    if not pooled_base:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name="tiny_cxr")


def _train(model, data_dir: Path) -> None:
    import keras

    from cxr_tfdata.core import config as config_lib
    from cxr_tfdata.data import input_pipeline

    data_config = config_lib.DataConfig(data_dir=str(data_dir), image_size=IMAGE_SIZE, cache="off", seed=0)
    train = input_pipeline.create_dataset(data_config, "train", batch_size=8, training=True)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    # A handful of steps: enough to move probabilities off 0.5, not enough to be perfect.
    model.fit(train, epochs=2, verbose=0)


def get_tiny_setup(tmp_path_factory) -> TinySetup:
    """Builds (once per test process) the tiny dataset and a tiny model trained on it, saved as .keras."""
    if "setup" not in _CACHE:
        root = tmp_path_factory.mktemp("eval_setup")
        data_dir = root / "data"
        manifest = helpers.write_tiny_dataset(data_dir, SPLIT_SIZES, image_size=IMAGE_SIZE)
        for split in ("val", "test"):
            manifest = flip_labels(data_dir, split, every=4)
        model = tiny_model()
        _train(model, data_dir)
        model_path = root / "tiny.keras"
        model.save(model_path)
        _CACHE["setup"] = TinySetup(data_dir=data_dir, model_path=model_path, manifest=manifest)
    return _CACHE["setup"]


def flip_labels(data_dir: Path, split: str, every: int) -> dict:
    """Flips the label of every `every`-th record of a split, so no model can be perfect on it.

    The filename keeps the class the image shows; the manifest's class counts follow the labels.
    """
    import json

    import tensorflow as tf

    from cxr_tfdata.core import dataset_info, record_schema

    manifest = dataset_info.read_manifest(str(data_dir))
    counts = dict.fromkeys(record_schema.CLASS_NAMES, 0)
    position = 0
    for path in dataset_info.shard_paths(str(data_dir), manifest, split):
        records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
        with tf.io.TFRecordWriter(path) as writer:
            for serialized in records:
                example = tf.train.Example.FromString(serialized)
                label_list = example.features.feature[record_schema.LABEL].int64_list
                if position % every == 0:
                    label_list.value[0] = 1 - label_list.value[0]
                counts[record_schema.CLASS_NAMES[label_list.value[0]]] += 1
                writer.write(example.SerializeToString())
                position += 1
    manifest["splits"][split]["class_counts"] = counts
    (data_dir / dataset_info.MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def split_records(data_dir: Path, split: str) -> list[dict]:
    """The split's records in file order: encoded image bytes, label, filename, patient id."""
    import tensorflow as tf

    from cxr_tfdata.core import dataset_info, record_schema

    manifest = dataset_info.read_manifest(str(data_dir))
    records = []
    for path in dataset_info.shard_paths(str(data_dir), manifest, split):
        for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
            parsed = tf.io.parse_single_example(serialized, record_schema.parse_spec())
            records.append({
                "image": parsed[record_schema.IMAGE].numpy(),
                "label": int(parsed[record_schema.LABEL].numpy()),
                "filename": parsed[record_schema.FILENAME].numpy().decode(),
                "patient_id": parsed[record_schema.PATIENT_ID].numpy().decode(),
            })
    return records


def run_cli(module: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Runs an entry point in a fresh interpreter, as a user would."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env, check=False,
    )


def sklearn_metrics(labels, probabilities, threshold: float) -> dict:
    """The headline numbers recomputed independently with scikit-learn."""
    from sklearn import metrics as skm

    labels = np.asarray(labels, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    predicted = (probabilities >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {
        "accuracy": skm.accuracy_score(labels, predicted),
        "precision": skm.precision_score(labels, predicted, zero_division=0),
        "recall": skm.recall_score(labels, predicted),
        "specificity": tn / (tn + fp),
        "f1": skm.f1_score(labels, predicted),
        "roc_auc": skm.roc_auc_score(labels, probabilities),
        "pr_auc": skm.average_precision_score(labels, probabilities),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
        "n": int(labels.size),
    }
