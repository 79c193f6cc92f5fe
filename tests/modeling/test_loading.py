"""Tests of cxr_tfdata.modeling.loading: only a file holding one sigmoid-unit model is loaded."""

from __future__ import annotations

import os

import pytest

from cxr_tfdata.modeling import loading

IMAGE_SIZE = 32


def test_a_model_whose_output_is_not_one_sigmoid_unit_is_refused(tmp_path):
    import keras

    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    for name, output in (("softmax2", keras.layers.Dense(2, activation="softmax")(pooled)),
                         ("logit", keras.layers.Dense(1)(pooled))):
        keras.Model(inputs, output).save(tmp_path / f"{name}.keras")
        with pytest.raises(loading.ModelLoadError, match="sigmoid"):
            loading.load_model(str(tmp_path / f"{name}.keras"))


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder", "zip_bomb"])
def test_a_model_path_that_is_no_model_file_is_refused_unread(tmp_path, kind):
    path = tmp_path / "model.keras"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        import zipfile

        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("config.json", "{}")
            with archive.open("model.weights.h5", "w") as member:
                for _ in range(64):
                    member.write(bytes(1 << 20))
    with pytest.raises(loading.ModelLoadError, match="--model"):
        loading.load_model(str(path))


def test_lambda_model_refused_in_safe_mode(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 1))
    outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(loading.ModelLoadError, match="safe mode") as error:
        loading.load_model(str(path))
    assert "lambda.keras" in str(error.value)


def test_a_model_file_that_is_neither_zip_nor_hdf5_is_named_for_what_it_is(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("not a model")
    with pytest.raises(loading.ModelLoadError, match=r"is not a Keras model file \(a .keras file is a zip archive"):
        loading.load_model(str(path))
