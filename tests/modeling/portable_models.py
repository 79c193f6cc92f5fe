"""The tiny model of eval_fixtures, with a contract, written in every format the readers take, built once
per test process with conversion code of its own (not cxr-export's), so the readers are checked against files
the exporter did not write.

Each format takes float32 [N, S, S, 1] pixels 0..255 and gives [N, 1] probabilities, with the contract in
its own metadata under portable_formats.CONTRACT_KEY (ONNX metadata_props, OpenVINO rt_info, LiteRT
Model.metadata), the SavedModel's in assets/cxr_export.json under "contract".
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from cxr_tfdata.modeling import portable_formats as pf
from tests import eval_fixtures
from tests.evaluation import recalibrate_inputs

QUANTIZATION = {"method": "none", "auc_drop": 0.0, "labels_flipped_fraction": 0.0}
_CACHE: dict[str, PortableSet] = {}


@dataclasses.dataclass(frozen=True)
class PortableSet:
    setup: eval_fixtures.TinySetup
    keras_path: Path
    contract: dict
    files: dict[str, Path]  # format -> the file (or SavedModel folder) to give as --model


def _serving_fn(model, size: int):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32, name=pf.PIXELS_INPUT)])
    def serve(pixels):
        return {pf.PROBABILITY_OUTPUT: tf.reshape(tf.cast(model(pixels, training=False), tf.float32), [-1, 1])}
    return serve


def write_saved_model(model, size: int, folder: Path, contract: dict) -> Path:
    import tensorflow as tf

    module = tf.Module(name="cxr_serving")
    module.serve = _serving_fn(model, size)
    module.captured_variables = list(module.serve.get_concrete_function().variables)
    tf.saved_model.save(module, str(folder), signatures={pf.SAVED_MODEL_PIXELS_SIGNATURE: module.serve})
    (folder / "assets").mkdir(exist_ok=True)
    (folder / "assets" / "cxr_export.json").write_text(json.dumps({"written_by": "test", "contract": contract}))
    return folder


def write_onnx(model, size: int, path: Path, contract: dict) -> Path:
    import onnx
    import tf2onnx

    fn = _serving_fn(model, size)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=17)
    onnx.helper.set_model_props(proto, {pf.CONTRACT_KEY: json.dumps(contract)})
    onnx.save(proto, str(path))
    return path


def write_openvino(onnx_path: Path, xml: Path, contract: dict) -> Path:
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(contract), [pf.CONTRACT_KEY])
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


def write_tflite(model, size: int, path: Path, contract: dict) -> Path:
    import tensorflow as tf
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = convert_variables_to_constants_v2(_serving_fn(model, size).get_concrete_function())
    flat = tf.lite.TFLiteConverter.from_concrete_functions([concrete]).convert()
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(flat))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(contract).encode(), np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = pf.CONTRACT_KEY
    entry.buffer = len(tree.buffers) - 1
    tree.metadata = (tree.metadata or []) + [entry]
    path.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(tree)))
    return path


def get_portable_set(tmp_path_factory) -> PortableSet:
    """The tiny model with a contract (and a quantization block), as .keras and in every other format."""
    if "set" not in _CACHE:
        from cxr_tfdata.modeling import contract as contract_lib
        from cxr_tfdata.modeling import loading

        setup = eval_fixtures.get_tiny_setup(tmp_path_factory)
        root = tmp_path_factory.mktemp("portable")
        keras_path = recalibrate_inputs.model_with_contract(setup, root / "model.keras", quantization=QUANTIZATION)
        model = loading.load_model(str(keras_path))
        contract = contract_lib.read(model)
        size = eval_fixtures.IMAGE_SIZE
        onnx_path = write_onnx(model, size, root / "model.onnx", contract)
        os.makedirs(root / "openvino")
        files = {
            "saved_model": write_saved_model(model, size, root / "saved_model", contract),
            "onnx": onnx_path,
            "openvino": write_openvino(onnx_path, root / "openvino" / "model.xml", contract),
            "tflite": write_tflite(model, size, root / "model.tflite", contract),
        }
        _CACHE["set"] = PortableSet(setup, keras_path, contract, files)
    return _CACHE["set"]
