"""Opening a --model of any format the readers take, chosen by its content, not its name.

  .keras (a zip archive; a legacy HDF5 file)  -> keras.Model, loaded in safe mode (loading.load_model)
  a SavedModel folder (saved_model.pb)          -> PortableModel, its `serving_pixels` signature
  ONNX (a protobuf onnx.load parses)            -> PortableModel run by ONNX Runtime
  OpenVINO IR (XML with <net ...>, + its .bin)  -> PortableModel run by OpenVINO
  LiteRT / TFLite ("TFL3" at byte 4)            -> PortableModel run by LiteRT (ai-edge-litert)
  an export folder (cxr_export.json) holding one of them -> that model

Every non-Keras format takes what a .keras model takes (portable_formats.py): float32 [N, S, S, 1] grey
values 0..255, and gives [N, 1] probabilities; its contract is read from its own metadata. The runtimes
are imported only when a file of theirs is opened, so a .keras user needs none of them installed; a
missing one is refused in one line naming the extra that installs it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import stat
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from cxr_tfdata.modeling import portable_formats
from cxr_tfdata.modeling.loading import MAX_UNPACKED_MODEL_BYTES, ModelLoadError

SERVING_EXTRA = "cxr-tfdata[serving]"
DEFAULT_THREADS = 2
KERAS, SAVED_MODEL, ONNX, OPENVINO, TFLITE = "keras", "saved_model", "onnx", "openvino", "tflite"
EXPORT_DESCRIPTION = "cxr_export.json"  # an export folder's description; a SavedModel's is in assets/
_NAMES = {KERAS: "a Keras model", SAVED_MODEL: "a SavedModel folder", ONNX: "an ONNX model",
          OPENVINO: "an OpenVINO IR model", TFLITE: "a LiteRT (TFLite) model"}
_RUNTIMES = {ONNX: ("onnxruntime", "ONNX Runtime"), OPENVINO: ("openvino", "OpenVINO"),
             TFLITE: ("ai_edge_litert.interpreter", "LiteRT (ai-edge-litert)"), "onnx-parser": ("onnx", "onnx")}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_MAX_DESCRIPTION_BYTES = 16 << 20
EXPECTED = ("a .keras file, a SavedModel folder, an .onnx, OpenVINO .xml (+ .bin) or .tflite file, or an "
            "export folder holding one (cxr_export.json)")


class MissingRuntimeError(ModelLoadError):
    """The runtime a model's format needs is not installed."""


@dataclasses.dataclass
class PortableModel:
    """A non-Keras model: takes float32 [N, S, S, 1] pixels 0..255, gives float32 [N, 1] probabilities."""

    format: str  # portable_formats.FORMATS
    path: str  # the file (or SavedModel folder) that is run
    image_size: int
    contract: dict[str, Any] | None
    description: dict[str, Any] | None = None  # the export's cxr_export.json, when found
    _run: Callable[[np.ndarray], np.ndarray] | None = dataclasses.field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path

    def predict_on_batch(self, pixels) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(pixels, np.float32))
        if x.ndim == 3:
            x = x[..., None]
        size = self.image_size
        if x.ndim != 4 or x.shape[1:] != (size, size, 1):
            raise ValueError(f"{self.path} takes float32 [N, {size}, {size}, 1] pixels, got shape {x.shape}")
        if not len(x):
            return np.zeros((0, 1), np.float32)
        out = np.asarray(self._run(x), np.float32).reshape(-1, 1)
        if out.shape[0] != x.shape[0]:
            raise ValueError(f"{self.path} gave {out.shape[0]} probabilities for {x.shape[0]} images")
        return out


def is_keras(model) -> bool:
    return not isinstance(model, PortableModel)


def describe(model, path: str) -> dict[str, Any]:
    """What metrics.json and the model card say about the model run: its format, file and quantization."""
    if isinstance(model, PortableModel):
        quantization = (model.contract or {}).get("quantization")
        return {"format": model.format, "file": os.path.abspath(model.path), "given": os.path.abspath(path),
                "quantization": quantization if isinstance(quantization, dict) else None}
    return {"format": KERAS, "file": os.path.abspath(path), "given": os.path.abspath(path), "quantization": None}


def companion_files(path: str) -> list[str]:
    """Files a --model reads besides itself (an OpenVINO .xml's weights), so no output may replace them."""
    try:
        fmt, file = detect_format(path)
    except ModelLoadError:
        return []
    return [_weights_file(file)] if fmt == OPENVINO else []


def open_model(path: str, threads: int = DEFAULT_THREADS):
    """The model at `path`, opened by content: a keras.Model for .keras, else a PortableModel."""
    from cxr_tfdata.modeling import loading

    path = os.fspath(path)
    fmt, file = detect_format(path)
    if fmt == KERAS:
        return loading.load_model(file)
    description = _export_description(path, file, fmt)
    opener = {SAVED_MODEL: _open_saved_model, ONNX: _open_onnx, OPENVINO: _open_openvino, TFLITE: _open_tflite}[fmt]
    model = opener(file, threads)
    description = description or model.description  # beside the file, else in its own metadata
    if model.contract is None and isinstance((description or {}).get("contract"), dict):
        model.contract = description["contract"]
    model.description = description
    return model


# ---------------------------------------------------------------------------------------------
# Which format: by content


def detect_format(path: str) -> tuple[str, str]:
    """(format, the file or folder to open), by content; ModelLoadError naming the path otherwise."""
    if not os.path.exists(path):
        raise ModelLoadError(f"--model: {path} does not exist")
    if os.path.isdir(path):
        return _folder_format(path)
    fmt = _file_format(path)
    if fmt is None:
        raise ModelLoadError(f"--model: {path} is not a model file the readers take (expected {EXPECTED}); not loaded")
    return fmt, path


def _file_format(path: str) -> str | None:
    _check_regular(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[4:8] == b"TFL3":  # before the zip test: LiteRT metadata may append a zip of associated files
        return TFLITE
    if head.startswith(_HDF5_MAGIC) or zipfile.is_zipfile(path):
        return KERAS
    if b"<net" in head and head.lstrip().startswith(b"<"):
        return OPENVINO
    if head[:1] == b"\x08" and _parses_as_onnx(path):  # ModelProto's first field: ir_version (varint)
        return ONNX
    return None


def _parses_as_onnx(path: str) -> bool:
    onnx = _runtime("onnx-parser", path, "an ONNX model")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 -- not a protobuf ModelProto: not ONNX
        return False
    return bool(proto.graph.node)


def _folder_format(path: str) -> tuple[str, str]:
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return SAVED_MODEL, path
    if not os.path.isfile(os.path.join(path, EXPORT_DESCRIPTION)):
        raise ModelLoadError(f"--model: {path} is a folder without saved_model.pb or {EXPORT_DESCRIPTION}; "
                             f"expected {EXPECTED}")
    found = []
    for name in sorted(os.listdir(path)):
        entry = os.path.join(path, name)
        if name.startswith(".") or name.endswith((".json", ".bin")) or os.path.islink(entry):
            continue
        if os.path.isdir(entry):
            if os.path.isfile(os.path.join(entry, "saved_model.pb")):
                found.append((SAVED_MODEL, entry))
        elif os.path.isfile(entry) and (fmt := _file_format(entry)) is not None:
            found.append((fmt, entry))
    if len(found) != 1:
        what = "no model" if not found else f"{len(found)} models ({', '.join(os.path.basename(f) for _, f in found)})"
        raise ModelLoadError(f"--model: export folder {path} holds {what}; expected exactly one (or give the file)")
    return found[0]


# ---------------------------------------------------------------------------------------------
# Safety: the same limits as a .keras file's


def _check_regular(path: str, what: str = "--model") -> int:
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ModelLoadError(f"{what}: {path} is not a regular file (a FIFO, socket or device); not read")
    size = os.path.getsize(path)
    if size > MAX_UNPACKED_MODEL_BYTES:
        raise ModelLoadError(f"{what}: {path} holds {size >> 20} MB, more than the {MAX_UNPACKED_MODEL_BYTES >> 20} "
                             f"MB limit; not loaded")
    return size


def _check_saved_model_folder(folder: str) -> None:
    total = 0
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            entry = os.path.join(root, name)
            if os.path.islink(entry):
                raise ModelLoadError(f"--model: SavedModel {folder} holds a symbolic link ({entry}); not loaded")
        for name in files:
            total += _check_regular(os.path.join(root, name))
    if total > MAX_UNPACKED_MODEL_BYTES:
        raise ModelLoadError(f"--model: SavedModel {folder} holds {total >> 20} MB, more than the "
                             f"{MAX_UNPACKED_MODEL_BYTES >> 20} MB limit; not loaded")


def _runtime(fmt: str, path: str, what: str):
    module, name = _RUNTIMES[fmt]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingRuntimeError(f"--model: {path} is {what}, which needs {name} ({module} cannot be imported: "
                                  f"{e}); install it with: pip install '{SERVING_EXTRA}'") from None


def _json_object(text: str | bytes | None, where: str) -> dict | None:
    if text is None or text == "" or text == b"":
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ModelLoadError(f"--model: the contract stored in {where} is not JSON ({e})") from e
    if not isinstance(value, dict):
        raise ModelLoadError(f"--model: the contract stored in {where} is not a JSON object")
    return value


def _export_description(given: str, file: str, fmt: str) -> dict | None:
    """The export's cxr_export.json: in a SavedModel's assets/, or in the export folder, or beside the file."""
    candidates = [os.path.join(file, "assets", EXPORT_DESCRIPTION)] if fmt == SAVED_MODEL else []
    folder = given if os.path.isdir(given) else os.path.dirname(os.path.abspath(file))
    candidates.append(os.path.join(folder, EXPORT_DESCRIPTION))
    for candidate in candidates:
        if os.path.isfile(candidate) and os.path.getsize(candidate) <= _MAX_DESCRIPTION_BYTES:
            with open(candidate, "rb") as f:
                return _json_object(f.read(), candidate)
    return None


def _square_size(shape, path: str) -> int:
    dims = list(shape)
    if len(dims) != 4 or not isinstance(dims[1], int) or dims[1] != dims[2] or dims[3] != 1:
        raise ModelLoadError(f"--model: {path} takes input shape {dims}; expected [N, S, S, 1] grey pixels")
    return int(dims[1])


# ---------------------------------------------------------------------------------------------
# The runtimes


def _open_saved_model(folder: str, threads: int) -> PortableModel:
    _check_saved_model_folder(folder)
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already started: its thread pools stay as they are
        pass
    try:
        loaded = tf.saved_model.load(folder)
    except Exception as e:  # noqa: BLE001 -- TensorFlow raises many types for bad folders
        raise ModelLoadError(f"--model: cannot load SavedModel {folder} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no details'})") from e
    signature = loaded.signatures.get(portable_formats.SAVED_MODEL_PIXELS_SIGNATURE)
    if signature is None:
        raise ModelLoadError(f"--model: SavedModel {folder} has no {portable_formats.SAVED_MODEL_PIXELS_SIGNATURE!r} "
                             f"signature (signatures: {sorted(loaded.signatures)}); re-export it with cxr-export")
    inputs = signature.structured_input_signature[1]
    key = portable_formats.PIXELS_INPUT if portable_formats.PIXELS_INPUT in inputs else next(iter(inputs))
    size = _square_size(inputs[key].shape.as_list(), folder)
    outputs = list(signature.structured_outputs)
    out_key = portable_formats.PROBABILITY_OUTPUT if portable_formats.PROBABILITY_OUTPUT in outputs else outputs[0]
    description = _export_description(folder, folder, SAVED_MODEL) or {}
    contract = description.get("contract") if isinstance(description.get("contract"), dict) else None

    def run(x):
        return signature(**{key: tf.constant(x)})[out_key].numpy()

    return PortableModel(SAVED_MODEL, folder, size, contract, _run=run)


def _open_onnx(path: str, threads: int) -> PortableModel:
    onnx = _runtime("onnx-parser", path, _NAMES[ONNX])
    proto = onnx.load(path, load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ModelLoadError(f"--model: {path} keeps weights in external files; the readers take a self-contained "
                             f".onnx file (as cxr-export writes)")
    del proto
    ort = _runtime(ONNX, path, _NAMES[ONNX])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 -- ONNX Runtime's errors name no file
        raise ModelLoadError(f"--model: ONNX Runtime cannot load {path} ({str(e).splitlines()[0]})") from e
    (model_input,) = session.get_inputs()
    names = [o.name for o in session.get_outputs()]
    output = portable_formats.PROBABILITY_OUTPUT if portable_formats.PROBABILITY_OUTPUT in names else names[0]
    metadata = session.get_modelmeta().custom_metadata_map
    contract = _json_object(metadata.get(portable_formats.CONTRACT_KEY), path)
    description = _json_object(metadata.get(portable_formats.DESCRIPTION_KEY), path)

    def run(x):
        return session.run([output], {model_input.name: x})[0]

    return PortableModel(ONNX, path, _square_size(model_input.shape, path), contract, description, _run=run)


def _weights_file(xml: str) -> str:
    return os.path.splitext(xml)[0] + ".bin"


def _open_openvino(xml: str, threads: int) -> PortableModel:
    weights = _weights_file(xml)
    if not os.path.exists(weights):
        raise ModelLoadError(f"--model: {xml} is an OpenVINO IR whose weights file {weights} is missing")
    _check_regular(weights, "--model weights")
    ov = _runtime(OPENVINO, xml, _NAMES[OPENVINO])
    core = ov.Core()
    try:
        model = core.read_model(xml, weights)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"--model: OpenVINO cannot read {xml} ({str(e).splitlines()[0]})") from e
    found = {}
    for name in (portable_formats.CONTRACT_KEY, portable_formats.DESCRIPTION_KEY):
        for key in ([name], ["cxr", name]):
            if model.has_rt_info(key):
                found[name] = _json_object(model.get_rt_info(key).astype(str), xml)
                break
    contract, description = found.get(portable_formats.CONTRACT_KEY), found.get(portable_formats.DESCRIPTION_KEY)
    shape = model.inputs[0].get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape]
    size = _square_size(dims, xml)
    if dims[0] is not None:  # a fixed batch: made dynamic, as the readers batch as they please
        model.reshape([-1, size, size, 1])
    # f32: scores as the file holds them (OpenVINO would otherwise pick bf16 on CPUs that have it).
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    output = next((o for o in compiled.outputs if portable_formats.PROBABILITY_OUTPUT in o.get_names()),
                  compiled.outputs[0])
    request = compiled.create_infer_request()

    def run(x):
        return request.infer({0: x})[output].copy()

    return PortableModel(OPENVINO, xml, size, contract, description, _run=run)


def read_litert_metadata(path: str) -> dict[str, bytes]:
    """A .tflite file's named Model.metadata buffers, and the members of a zip of associated files."""
    schema = importlib.import_module("ai_edge_litert.schema_py_generated")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    model = schema.Model.GetRootAs(data, 0)
    found = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        found[entry.Name().decode()] = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.file_size <= _MAX_DESCRIPTION_BYTES:
                    found.setdefault(member.filename, archive.read(member))
    return found


def _open_tflite(path: str, threads: int) -> PortableModel:
    litert = _runtime(TFLITE, path, _NAMES[TFLITE])
    metadata = read_litert_metadata(path)
    key = portable_formats.CONTRACT_KEY
    contract = _json_object(metadata.get(key, metadata.get(key + ".json")), path)
    description = _json_object(metadata.get(portable_formats.DESCRIPTION_KEY), path)
    try:
        interpreter = litert.Interpreter(model_path=path, num_threads=threads)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"--model: LiteRT cannot load {path} ({str(e).splitlines()[0]})") from e
    model_input = interpreter.get_input_details()[0]
    outputs = interpreter.get_output_details()
    output = next((o for o in outputs if portable_formats.PROBABILITY_OUTPUT in o["name"]), outputs[0])
    size = _square_size([int(d) for d in model_input["shape"]], path)
    allocated = {"batch": None}

    def run(x):
        if allocated["batch"] != len(x):
            interpreter.resize_tensor_input(model_input["index"], list(x.shape))
            interpreter.allocate_tensors()
            allocated["batch"] = len(x)
        interpreter.set_tensor(model_input["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(output["index"]).copy()

    return PortableModel(TFLITE, path, size, contract, description, _run=run)
