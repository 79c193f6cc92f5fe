"""The contract a trained model carries inside its .keras file: how to feed it and how to read it.

A `ModelContract` layer sits right after the model's input. It passes its input through unchanged
and holds, in its config (so in the .keras file, through every save and load in safe mode), what a
user of the model needs and could otherwise get wrong:
  image_size, resize, record_encoding, jpeg_quality   how images must be prepared (the records' build)
  class_names, positive_class                          what the output means
  dataset_fingerprint                                  which dataset it was trained on
  operating_threshold, target_recall, threshold_chosen_on
                                                       the label rule, chosen on val after training
  temperature, logit_shift, calibration                calibrated = sigmoid(logit(p) / temperature + logit_shift)
  train_prevalence                                     the train split's PNEUMONIA share: the prevalence the
                                                       calibrated probabilities assume (--prevalence moves it)
  calibrated_prevalence                                only in an export's copy (cxr-export --prevalence): the
                                                       prevalence folded into its logit_shift, read first
  site_calibration                                     written by cxr-recalibrate: where, when and how the
                                                       calibration above was refitted on a site's sample
  training_patients                                    the train and val patients, as 64-bit prefixes of their
                                                       keyed hashes (`training_patients`), so cxr-recalibrate
                                                       can refuse a site sample sharing a patient with them
  training                                             the run's settings (cxr-train's config.json)
cxr-train writes the preparation part into every model it saves and adds the threshold and the
temperature when a stage ends. cxr-predict, cxr-export and cxr-evaluate read it, so a model copied
alone to another machine needs no flag, and a flag that contradicts it is refused. A sidecar file
could be lost or mismatched; a layer's config cannot.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

import keras

from cxr_tfdata.core import record_schema

FORMAT = 1
LAYER_NAME = "model_contract"


@keras.saving.register_keras_serializable(package="cxr_tfdata")
class ModelContract(keras.layers.Layer):
    """Identity layer whose config is the model's contract (a JSON object)."""

    def __init__(self, contract: dict | None = None, **kwargs):
        kwargs.pop("trainable", None)
        # float32 whatever the global policy: an identity layer computing in bfloat16 would cast its
        # input. (No compute_output_shape: Keras then traces call, and the output keeps the input dtype.)
        kwargs["dtype"] = "float32"
        super().__init__(trainable=False, **kwargs)
        # A JSON round trip now, so a value the file could not hold (NaN, a numpy scalar) fails here.
        self.contract = json.loads(json.dumps(contract or {}, allow_nan=False))

    def call(self, inputs):
        return inputs

    def get_config(self):
        return {**super().get_config(), "contract": copy.deepcopy(self.contract)}


def _contract_layer(model: keras.Model) -> ModelContract | None:
    for layer in model.layers:
        if isinstance(layer, ModelContract):
            return layer
        if isinstance(layer, keras.Model):
            found = _contract_layer(layer)
            if found is not None:
                return found
    return None


def read(model: keras.Model) -> dict[str, Any] | None:
    """The model's contract, or None for a model without one (not written by cxr-train). A model of
    another format (runtimes.PortableModel) carries the one read from its file's metadata."""
    if not isinstance(model, keras.Model):
        return copy.deepcopy(getattr(model, "contract", None))
    layer = _contract_layer(model)
    return copy.deepcopy(layer.contract) if layer is not None else None


def update(model: keras.Model, **values) -> dict[str, Any]:
    """Sets contract entries in place (no weight changes); save the model afterwards."""
    layer = _contract_layer(model)
    if layer is None:
        raise ValueError(f"model {model.name!r} carries no contract")
    layer.contract = json.loads(json.dumps({**layer.contract, **values}, allow_nan=False))
    return copy.deepcopy(layer.contract)


def for_dataset(manifest: dict[str, Any], fingerprint: str, training: dict[str, Any],
                stage: str = "") -> dict[str, Any]:
    """A new model's contract: what the dataset's build did to every image, what the data was, and
    empty threshold and calibration entries (filled when its stage ends)."""
    return {
        "format": FORMAT,
        **preparation(manifest),
        "class_names": list(record_schema.CLASS_NAMES),
        "positive_class": record_schema.POSITIVE_CLASS,
        "dataset_fingerprint": fingerprint,
        "data": data_summary(manifest),
        "stage": stage,
        "operating_threshold": None,
        "target_recall": None,
        "threshold_chosen_on": None,
        "temperature": None,
        "logit_shift": None,
        "calibration": None,
        "training_patients": None,  # filled when the stage is sealed (val_calibration.seal)
        "training": training,
    }


# 16 hex digits (64 bits) of each patient's keyed hash. A sample patient not in training matches one of
# N training prefixes by chance with probability N / 2^64: for 10,000 training patients and 1,000 site
# patients, a false "same patient" about 5e-13 of the time. Full 128-bit hashes would double the
# contract's size for nothing; fewer bits would also reveal less, but 64 keep chance matches negligible.
PATIENT_PREFIX_HEX_CHARS = 16


def training_patients(manifest: dict[str, Any], patient_ids: Iterable[str],
                      splits: Iterable[str]) -> dict[str, Any] | None:
    """The contract's training_patients entry: the sorted, distinct 16-hex-digit prefixes of the keyed
    patient hashes of `splits` (read from its records), with the fingerprint of the key that made them
    (manifest "patient_ids"). None for records whose patient ids are not keyed hashes (built before
    patient keys): their raw ids must not be copied into a model."""
    key_fingerprint = (manifest.get("patient_ids") or {}).get("key_fingerprint")
    if not key_fingerprint:
        return None
    return {
        "key_fingerprint": key_fingerprint,
        "splits": list(splits),
        "hash": f"first {PATIENT_PREFIX_HEX_CHARS} hex digits of each patient's keyed hash (HMAC-SHA256)",
        "prefixes": sorted({patient[:PATIENT_PREFIX_HEX_CHARS] for patient in patient_ids if patient}),
    }


def preparation(manifest: dict[str, Any]) -> dict[str, Any]:
    """How the dataset's build prepared every image (image size, resize, record encoding, JPEG quality), from its
    manifest.json.

    jpeg_quality is None for lossless (png) records: no round trip to repeat.
    """
    flags = manifest.get("flags") or {}
    encoding = manifest.get("encoding", flags.get("encoding", "jpeg"))
    return {
        "image_size": int(manifest["image_size"]),
        "resize": manifest.get("resize", flags.get("resize", "squash")),
        "record_encoding": encoding,
        "jpeg_quality": flags.get("jpeg_quality") if encoding == "jpeg" else None,
    }


def data_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a model card says about the training data, from the dataset's manifest.json."""
    flags = manifest.get("flags") or {}
    duplicates = manifest.get("duplicates") or {}
    return {
        "source": flags.get("input_dir"),
        "val_source": manifest.get("val_source"),
        "splits": {name: {"images": int(split.get("num_examples", 0)),
                          "patients": split.get("num_patients"),
                          "class_counts": dict(split.get("class_counts") or {}),
                          "skipped_files": int(split.get("num_skipped", 0) or 0)}
                   for name, split in (manifest.get("splits") or {}).items()},
        "leaks_dropped": len(manifest.get("dropped_leaks") or []),
        "drop_leaks": flags.get("drop_leaks"),
        "patients_in_several_given_splits": len(manifest.get("patients_in_several_given_splits") or []),
        "duplicates_across_splits": len(duplicates.get("across_splits") or []),
        "skipped_files": len(manifest.get("skipped") or []),
    }


# Reader flags whose value the contract keeps under another name, and the converter flag each
# preparation value came from.
_CONTRACT_KEY = {"threshold": "operating_threshold"}
_BUILD_FLAG = {"image_size": "image_size", "resize": "resize", "record_encoding": "encoding",
               "jpeg_quality": "jpeg_quality"}


def resolve(contract: dict[str, Any] | None, dataset: dict[str, Any] | None, given: dict[str, Any],
            model_path: str = "the model", manifest_path: str = "manifest.json") -> dict[str, Any]:
    """The values a reader uses, from the model's contract, the dataset's build and explicit flags.

    given: every value asked for, keyed by its flag name, None when the flag was not typed; dataset:
    the preparation values a --data_dir's manifest records (`preparation`), or None. A value given
    two ways must agree: a disagreement is an error naming both. What nothing gives stays None.
    """
    resolved: dict[str, Any] = {}
    for key, typed in given.items():
        stored_as = _CONTRACT_KEY.get(key, key)
        candidates = []
        if contract is not None and contract.get(stored_as) is not None:
            candidates.append((contract[stored_as], f"the contract stored in {model_path} ({stored_as}={contract[stored_as]!r})"))
        if dataset is not None and dataset.get(key) is not None:
            candidates.append((dataset[key], f"--data_dir: {manifest_path} was built with cxr-build-tfrecords "
                                             f"--{_BUILD_FLAG.get(key, key)}={dataset[key]}"))
        if typed is not None:
            candidates.append((typed, f"--{key}={typed}"))
        for value, where in candidates[1:]:
            if _comparable(value) != _comparable(candidates[0][0]):
                raise ValueError(f"{where} contradicts {candidates[0][1]}; drop the value that is wrong")
        resolved[key] = candidates[0][0] if candidates else None
    return resolved


def _comparable(value):
    return round(value, 9) if isinstance(value, float) else value
