"""Loading trained .keras models safely, with errors that name the file, and reading their image size."""

from __future__ import annotations

import os
import stat
import zipfile

import keras

# Imported for what importing them does: they register the package's custom layers with Keras
# under their saved names ("cxr_tfdata>ToResNetInput", ...), so `safe_mode=True` resolves them in
# every .keras file ever written, whichever folder the classes live in today.
from cxr_tfdata.data import augment  # noqa: F401  (RandomAffine)
from cxr_tfdata.modeling import contract, preprocessing  # noqa: F401  (ModelContract, ToResNetInput)

# A .keras file is a zip archive; ResNet50V2's is about 100 MB unpacked and its members barely
# compress (weights). Archives that would unpack to more, or members that compress like a
# decompression bomb, are refused before anything is unpacked.
MAX_UNPACKED_MODEL_BYTES = 2 << 30
MAX_MEMBER_COMPRESSION_RATIO = 50
_SMALL_MEMBER_BYTES = 10 << 20  # config.json and metadata compress well and are small
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class ModelLoadError(ValueError):
    """A model file that cannot be used; the message names the file and the reason."""


def check_model_file(path: str) -> None:
    """Refuses, before Keras reads anything, a --model that is not a regular file (a FIFO would
    block, a device would never end) or a zip archive that would unpack to too much."""
    if not os.path.exists(path):
        raise ModelLoadError(f"--model: {path} does not exist")
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise ModelLoadError(f"--model: {path} is a directory; expected a .keras file written by cxr-train")
    if not stat.S_ISREG(mode):
        raise ModelLoadError(f"--model: {path} is not a regular file (a FIFO, socket or device); not read")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(len(_HDF5_MAGIC)) == _HDF5_MAGIC:
                return  # a legacy Keras .h5 file: Keras names what is wrong with it
        raise ModelLoadError(f"--model: {path} is not a Keras model file (a .keras file is a zip archive, "
                             f"a legacy one HDF5); not loaded")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"--model: cannot read {path} as a .keras archive ({e})") from e
    unpacked = sum(member.file_size for member in members)
    if unpacked > MAX_UNPACKED_MODEL_BYTES:
        raise ModelLoadError(f"--model: {path} would unpack to {unpacked >> 20} MB, more than the "
                             f"{MAX_UNPACKED_MODEL_BYTES >> 20} MB limit; not loaded")
    for member in members:
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > _SMALL_MEMBER_BYTES and ratio > MAX_MEMBER_COMPRESSION_RATIO:
            raise ModelLoadError(f"--model: {path} holds {member.filename}, compressed {ratio:.0f} to 1 (a "
                                 f"decompression bomb, not model weights); not loaded")


def load_model(path: str) -> keras.Model:
    """Loads a .keras model in Keras safe mode (no arbitrary code), naming `path` in any error."""
    path = os.fspath(path)
    check_model_file(path)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 -- Keras raises many types for bad files; re-raised with the path
        message = str(e)
        if "safe_mode" in message or "unsafe" in message.lower():
            raise ModelLoadError(
                f"--model: refused to load {path} in Keras safe mode: it contains code that would "
                f"run on load (for example a Lambda layer). Only load models you trust; this tool "
                f"never disables safe mode. Keras said: {message.splitlines()[0]}"
            ) from e
        raise ModelLoadError(
            f"--model: cannot load {path} as a Keras model ({type(e).__name__}: "
            f"{message.splitlines()[0] if message else 'no details'})"
        ) from e
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"--model: {path} holds a {type(model).__name__}, not a Keras model")
    check_binary_output(model, path)
    return model


def check_binary_output(model: keras.Model, path: str = "") -> None:
    """Refuses a model whose output is not one sigmoid unit, the probability of PNEUMONIA.

    A softmax over two classes, several outputs or raw logits would be read wrongly by every tool
    here, so they are refused up front rather than giving a wrong probability.
    """
    name = path or model.name
    shapes = [tuple(output.shape) for output in model.outputs]
    if len(shapes) != 1 or len(shapes[0]) != 2 or shapes[0][1] != 1:
        raise ModelLoadError(f"--model: {name} outputs {shapes}; expected one sigmoid unit of shape "
                             f"(None, 1): the probability of PNEUMONIA")
    history = getattr(model.outputs[0], "_keras_history", None)
    layer = history[0] if history else None
    activation = getattr(layer, "activation", None)
    if activation is not keras.activations.sigmoid:
        found = getattr(activation, "__name__", None) or "none"
        raise ModelLoadError(f"--model: {name} ends in layer {getattr(layer, 'name', '?')!r} with activation "
                             f"{found!r}; expected a sigmoid output unit (the probability of PNEUMONIA)")


def model_image_size(model: keras.Model, path: str = "") -> int:
    """The square image size S of a model whose input is [None, S, S, 1] raw pixels."""
    if not isinstance(model, keras.Model) and isinstance(getattr(model, "image_size", None), int):
        return model.image_size  # runtimes.PortableModel: read from its file's input shape
    shape = tuple(model.inputs[0].shape) if model.inputs else ()
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 1:
        raise ModelLoadError(
            f"--model: {path or model.name} takes input shape {shape}; expected [None, S, S, 1] "
            f"grayscale pixels"
        )
    return int(shape[1])


def check_image_size(model_size: int, data_size: int, model_path: str, data_dir: str) -> None:
    """Fails when the model and the dataset disagree on the image size, naming both."""
    if model_size != data_size:
        raise ValueError(
            f"image size mismatch: model {model_path} takes {model_size}x{model_size} images but "
            f"dataset {data_dir} holds {data_size}x{data_size} images (manifest.json image_size); "
            f"give the dataset the model was trained on, or records built with --image_size={model_size}"
        )
