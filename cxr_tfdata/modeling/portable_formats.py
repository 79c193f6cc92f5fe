"""The names every exported format shares, so cxr-export writes what cxr-predict and cxr-evaluate read.

Formats other than the SavedModel's `serving_default` take preprocessed pixels: float32 [N, S, S, 1]
holding the 0..255 grey values the converter's decode and resize (and the records' JPEG round trip)
give, exactly what a .keras model takes; the model's own first layers do the rest. Each file carries
the model's contract (JSON) in its own metadata under CONTRACT_KEY, and the export's description
(the JSON of assets/cxr_export.json) under DESCRIPTION_KEY.
"""

from __future__ import annotations

FORMATS = ("saved_model", "onnx", "openvino", "tflite")
QUANTIZATIONS = ("none", "float16", "int8")
CONTRACT_KEY = "cxr_contract"  # ONNX metadata_props, OpenVINO rt_info, LiteRT metadata name
DESCRIPTION_KEY = "cxr_export"
PIXELS_INPUT = "pixels"  # float32 [N, S, S, 1], grey values 0..255
PROBABILITY_OUTPUT = "probability"  # float32 [N, 1]: P(PNEUMONIA), the raw sigmoid output
SAVED_MODEL_PIXELS_SIGNATURE = "serving_pixels"  # the SavedModel's second signature, for the same pixels
# Which --quantize each --format supports (cxr-export refuses the other combinations).
SUPPORTED_QUANTIZATIONS = {"saved_model": ("none",), "onnx": ("none", "int8"),
                           "openvino": ("none", "float16", "int8"), "tflite": ("none", "float16", "int8")}
# The file(s) of each non-SavedModel format in its export folder, beside DESCRIPTION_FILE.
MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin"), "tflite": ("model.tflite",)}
DESCRIPTION_FILE = "cxr_export.json"  # the description again, readable without any runtime
QUANTIZATION_KEY = "quantization"  # in the contract and the description of a quantized export: the guard's figures
