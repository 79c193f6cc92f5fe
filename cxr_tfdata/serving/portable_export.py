"""cxr-export --format=onnx|openvino|tflite: the model on preprocessed pixels, for runtimes other than TensorFlow.

Every format takes portable_formats.PIXELS_INPUT, float32 [N, S, S, 1] grey values 0..255, exactly what
the .keras model takes, and returns PROBABILITY_OUTPUT, float32 [N, 1]. The decode and resize the pixels
need (and the refusals: unreadable, too large, near-constant) are cxr_tfdata.modeling.image_scoring's,
shared with cxr-predict: `load_image` gives one image's pixels. Each file carries the model's contract
(JSON) under CONTRACT_KEY and the export's description under DESCRIPTION_KEY in its own metadata: ONNX
metadata_props, OpenVINO rt_info (top-level keys), LiteRT Model.metadata entries (UTF-8 JSON buffers).
The folder also holds the description as cxr_export.json.

Recipes (measured in BUILD_NOTES): ONNX by tf2onnx from the pixels tf.function at opset 17, int8 by ONNX
Runtime's static QDQ quantization; OpenVINO by ov.convert_model from the same function (float16:
compressed weights; int8: NNCF); LiteRT from the function frozen with convert_variables_to_constants_v2
(from the live function Keras 3's variables stay unresolved reads), float16 weights or full-integer
int8 with float32 input and output. A quantized model is scored against the float model on the val
split first (quantization_guard) and written only when it passes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from cxr_tfdata.files import folder_swap, locking, output_safety
from cxr_tfdata.modeling import feeding, loading
from cxr_tfdata.modeling import portable_formats as pf
from cxr_tfdata.serving import export as export_lib
from cxr_tfdata.serving import quantization_guard

ONNX_OPSET = 17
THREADS = 2  # for the guard's scoring only
_RUNS_AS = {
    ("openvino", "none"): "float32 weights; OpenVINO's CPU plugin computes in bfloat16 by default where the CPU "
                          "has AVX512-BF16 or AMX (set INFERENCE_PRECISION_HINT=f32 for float32), else in float32",
    ("openvino", "float16"): "float16-compressed weights, decompressed at load; compute as for none",
    ("openvino", "int8"): "int8 (NNCF post-training quantization)",
    ("onnx", "none"): "float32", ("onnx", "int8"): "int8 QDQ (ONNX Runtime static quantization)",
    ("tflite", "none"): "float32", ("tflite", "float16"): "float16 weights, float32 compute",
    ("tflite", "int8"): "full-integer int8 kernels, float32 input and output"}


class Converted:
    """A converted model in memory: scores pixels (for the guard) and writes itself with its metadata."""

    def __init__(self, fmt: str, payload):
        self.format, self.payload, self._runner = fmt, payload, None

    def score(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, np.float32)
        if self.format == "onnx":
            import onnxruntime as ort

            if self._runner is None:
                options = ort.SessionOptions()
                options.intra_op_num_threads = THREADS
                self._runner = ort.InferenceSession(self.payload.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])
            return self._runner.run([pf.PROBABILITY_OUTPUT], {pf.PIXELS_INPUT: pixels})[0].reshape(-1)
        if self.format == "openvino":
            import openvino as ov

            if self._runner is None:
                self._runner = ov.Core().compile_model(self.payload, "CPU", {"INFERENCE_NUM_THREADS": THREADS})
            return np.asarray(self._runner(pixels)[self._runner.output(0)]).reshape(-1)
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=self.payload, num_threads=THREADS)
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, list(pixels.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(index, pixels)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])).reshape(-1)

    def write(self, folder: str, metadata: dict[str, str]) -> None:
        """The model file(s) of pf.MODEL_FILES[format] in `folder`, `metadata` inside."""
        if self.format == "onnx":
            import onnx

            onnx.helper.set_model_props(self.payload, metadata)
            onnx.save(self.payload, os.path.join(folder, pf.MODEL_FILES["onnx"][0]))
        elif self.format == "openvino":
            import openvino as ov

            for key, value in metadata.items():
                self.payload.set_rt_info(value, [key])
            # compress_to_fp16=False: float16 models were compressed when converted; the others stay as they are.
            ov.save_model(self.payload, os.path.join(folder, pf.MODEL_FILES["openvino"][0]), compress_to_fp16=False)
        else:
            with open(os.path.join(folder, pf.MODEL_FILES["tflite"][0]), "wb") as f:
                f.write(with_litert_metadata(self.payload, metadata))


def with_litert_metadata(flatbuffer: bytes, entries: dict[str, str]) -> bytes:
    """The .tflite flatbuffer with named Model.metadata buffers added and its output named PROBABILITY_OUTPUT."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    subgraph = model.subgraphs[0]
    subgraph.tensors[subgraph.outputs[0]].name = pf.PROBABILITY_OUTPUT.encode()
    for name, text in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(text.encode("utf-8"), np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(model.buffers) - 1
        model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _to_onnx(function, quantize: str, calibration: np.ndarray | None, work: str):
    import onnx
    import tf2onnx

    proto, _ = tf2onnx.convert.from_function(function, input_signature=function.input_signature, opset=ONNX_OPSET)
    if quantize == "none":
        return proto
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{pf.PIXELS_INPUT: calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    float_path, pre, out = (os.path.join(work, name) for name in ("float.onnx", "pre.onnx", "int8.onnx"))
    onnx.save(proto, float_path)
    quant_pre_process(float_path, pre, skip_symbolic_shape=True)  # symbolic inference needs sympy; shapes are static
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(out)


def _to_openvino(function, quantize: str, calibration: np.ndarray | None, work: str):
    import openvino as ov

    model = ov.convert_model(function)
    if quantize == "float16":  # compressed in memory, so the guard scores what is written
        path = os.path.join(work, "float16.xml")
        ov.save_model(model, path, compress_to_fp16=True)
        model = ov.Core().read_model(path)
    elif quantize == "int8":
        import nncf

        dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
        model = nncf.quantize(model, dataset, subset_size=len(calibration))
    return model


def _to_tflite(function, quantize: str, calibration: np.ndarray | None, work: str) -> bytes:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # Frozen, without trackable_obj: TensorFlow warns of a "deprecated conversion path"; with one, its
    # newer path logs a NodeDef error on the frozen graph. from_saved_model is the other way (not tried).
    frozen = convert_variables_to_constants_v2(function.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


_CONVERTERS = {"onnx": _to_onnx, "openvino": _to_openvino, "tflite": _to_tflite}


def convert(model: keras.Model, fmt: str, quantize: str = "none", calibration: np.ndarray | None = None,
            work: str = "") -> Converted:
    """The model converted to `fmt` (with `quantize`; int8 calibrates on `calibration` pixels); `work` is
    a scratch folder."""
    function = export_lib.pixels_function(model, loading.model_image_size(model))
    return Converted(fmt, _CONVERTERS[fmt](function, quantize, calibration, work))


def description(model: keras.Model, reading: feeding.Reading, fmt: str, quantize: str, model_path: str,
                quantization: dict | None) -> dict:
    """cxr_export.json of a non-SavedModel export: the SavedModel's description with this format's input,
    output and files."""
    base = export_lib.description(loading.model_image_size(model), reading, model_path)
    for key in ("signature", "outputs", "pixels_signature"):
        base.pop(key, None)
    size = base["image_size"]
    return {**base, "format": fmt, "files": list(pf.MODEL_FILES[fmt]), "quantize": quantize,
            "computes_in": _RUNS_AS[(fmt, quantize)],
            "input": {pf.PIXELS_INPUT: (
                f"float32 [N, {size}, {size}, 1]: grey values 0..255, one image's pixels as "
                f"cxr_tfdata.modeling.image_scoring.load_image(path, {size}, pad={reading.records.resize == 'pad'}, "
                f"record_encoding={reading.records.record_encoding!r}, jpeg_quality="
                f"{reading.records.jpeg_quality}) returns them (the converter's decode and resize, then the "
                f"records' round trip), cast to float32; refuse what it refuses (ImageError) and near-constant "
                f"images (pixel standard deviation < cxr_tfdata.core.imaging.NEAR_CONSTANT_STD), as cxr-predict does")},
            "output": {pf.PROBABILITY_OUTPUT: (
                "float32 [N, 1]: probability of PNEUMONIA (raw sigmoid); label PNEUMONIA when >= "
                "operating_threshold; calibrated = sigmoid(logit(p) / temperature + logit_shift + prevalence_shift)")},
            "metadata": {"contract": pf.CONTRACT_KEY, "description": pf.DESCRIPTION_KEY},
            pf.QUANTIZATION_KEY: quantization}


def _check(config) -> None:
    export_lib.check_output(config.output_dir, config.overwrite, {"--model": config.model_path,
                                                                  "--data_dir": config.data_dir})


def export_portable(model: keras.Model, config, reading: feeding.Reading) -> str:
    """Writes config.output_dir as an export of config.format: converted, guarded when quantized, then
    renamed into place whole (the SavedModel's rules for claiming and replacing the folder)."""
    output_dir = output_safety.canonical(config.output_dir)
    config = dataclasses.replace(config, output_dir=output_dir)
    inputs = {"--model": config.model_path, "--data_dir": config.data_dir}
    _check(config)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    with locking.exclusive_lock(locking.lock_path_beside(output_dir), f"--output_dir={output_dir}",
                                export_lib.PROGRAM):
        folder_swap.recover(output_dir, output_safety.export_problems, export_lib.STAGING_ENTRIES, inputs)
        _check(config)  # again, now that no other export can change it
        staging = folder_swap.staging_path(output_dir)
        out, work = os.path.join(staging, "export"), os.path.join(staging, "work")
        os.makedirs(out)
        os.makedirs(work)
        try:
            _write(model, config, reading, out, work)
            folder_swap.swap_into_place(out, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _write(model: keras.Model, config, reading: feeding.Reading, out: str, work: str) -> None:
    image_size = loading.model_image_size(model)
    calibration = None
    if config.quantize == "int8":
        calibration = quantization_guard.calibration_pixels(config.data_dir, image_size, config.calibration_images)
        logging.info("calibrating int8 on %d images of the train split of %s", len(calibration), config.data_dir)
    converted = convert(model, config.format, config.quantize, calibration, work)
    quantization = None
    if config.quantize != "none":
        method = quantization_guard.METHODS[(config.format, config.quantize)]
        result = quantization_guard.check(
            lambda x: model.predict_on_batch(x), converted.score, config.data_dir, image_size, reading.threshold,
            method=method, calibration_images=0 if calibration is None else len(calibration),
            max_auc_drop=config.max_auc_drop, max_label_flips=config.max_label_flips,
            what=f"{config.format} model ({config.quantize})")
        quantization = result.as_dict()
        logging.info("quantization guard passed: val ROC-AUC %.4f (float %.4f), %d of %d labels flipped",
                     result.auc_quantized, result.auc_float, result.label_flips, result.val_images)
    contract = reading.contract
    if contract is not None and quantization is not None:
        contract = {**contract, pf.QUANTIZATION_KEY: quantization}
    described = description(model, reading, config.format, config.quantize, config.model_path, quantization)
    converted.write(out, {pf.CONTRACT_KEY: json.dumps(contract, sort_keys=True),
                          pf.DESCRIPTION_KEY: json.dumps(described, sort_keys=True)})
    with open(os.path.join(out, pf.DESCRIPTION_FILE), "w", encoding="utf-8") as f:
        json.dump(described, f, indent=2, sort_keys=True)
