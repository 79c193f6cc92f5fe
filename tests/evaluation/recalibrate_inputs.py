"""Inputs of the site-calibration tests: the tiny model with a contract, a site's labelled image folder."""

from __future__ import annotations

from pathlib import Path

from tests import helpers

STORED = {"operating_threshold": 0.5, "target_recall": 0.95, "threshold_chosen_on": "val", "temperature": 1.5,
          "logit_shift": -0.3, "train_prevalence": 0.6}


def model_with_contract(setup, path: Path, **values) -> Path:
    """The tiny model of eval_fixtures behind a ModelContract layer holding a sealed contract (+ values)."""
    import keras

    from cxr_tfdata.core import dataset_info
    from cxr_tfdata.modeling import contract, loading

    base = loading.load_model(str(setup.model_path))
    info = dataset_info.load(str(setup.data_dir))
    stored = {**contract.for_dataset(info.manifest, info.fingerprint, {}, "head"), **STORED, **values}
    inputs = keras.Input(tuple(base.inputs[0].shape[1:]), name="image")
    x = contract.ModelContract(stored, name=contract.LAYER_NAME)(inputs)
    for layer in base.layers[1:]:  # the tiny model is a chain: its layers, shared, behind the contract
        x = layer(x)
    keras.Model(inputs, x, name="tiny_cxr").save(path)
    return path


def site_folder(root: Path, per_class: int = 40, image_size: int = 32, wrong_every: int = 4) -> Path:
    """NORMAL/ and PNEUMONIA/ PNGs, two images per patient; every `wrong_every`-th image shows the other
    class, so no model is perfect on it."""
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            index = 1000 * (label + 1) + i
            shown = 1 - label if i % wrong_every == 0 else label
            (folder / helpers.source_name("site", index)).write_bytes(
                helpers.encode_png(helpers.labelled_image(shown, index, image_size)))
    return root
