"""Benchmark: CPU serving paths for a cxr-tfdata model, all on the package's own exporters and readers.

Run:
  .venv/bin/python benchmarks/bench_serving.py --model=M.keras --data_dir=RECORDS --json=FILE \
      [--split=test] [--num_images=128] [--paths=keras,savedmodel,...]

The same N preprocessed images (the first N of --data_dir's --split, read by
cxr_tfdata.data.input_pipeline with training=False: float32 [N, S, S, 1], grey values 0..255) go through
every path, at batch 32 (throughput: best of --passes passes over the N images) and at batch 1
(p50/p99 latency over --latency_runs single-image calls), with --threads intra-op threads (default 2)
and one inter-op thread. Decoding is not timed.

Stages, each in its own subprocess (so one path's failure or memory never touches another, and peak
RSS is the measuring process's own):
  prepare   loads the model (safe mode), its operating threshold (the stored one, else 0.5) and the N
            images with their labels;
  export    one per artifact the chosen paths need: cxr_tfdata.serving.export.export with an
            ExportConfig, exactly what cxr-export runs (--format, --quantize). Quantized exports pass
            cxr-export's guard on --data_dir's val split, with the looser limits --guard_max_auc_drop and
            --guard_max_label_flips (the benchmark wants figures, not a release); the guard's figures are
            recorded, and a refused export is reported with its reason instead of being dropped;
  measure   one per path: opens the artifact with cxr_tfdata.modeling.runtimes.open_model (the readers
            cxr-predict and cxr-evaluate use), except where a path is a runtime setting the readers do not
            offer (see PATHS), and times it.

Paths (PATHS):
  keras             the .keras model, Keras `predict` (float32): the reference for agreement
  savedmodel        cxr-export's SavedModel as exported today, its serving_pixels signature
  savedmodel_bf16   the same SavedModel with TensorFlow's oneDNN bfloat16 auto-mixed-precision graph rewrite
                    (tf.config.optimizer.set_experimental_options auto_mixed_precision_onednn_bfloat16)
  savedmodel_xla    the same signature called inside tf.function(jit_compile=True)
  onnxruntime[_int8]                  --format=onnx, --quantize=none|int8; ONNX Runtime
  litert_fp32|litert_fp16|litert_int8 --format=tflite, --quantize=none|float16|int8; LiteRT (XNNPACK)
  openvino          --format=openvino (float32 weights), read as the readers do: INFERENCE_PRECISION_HINT=f32
  openvino_bf16     the same IR compiled with INFERENCE_PRECISION_HINT=bf16 (what OpenVINO picks by default
                    on a CPU with AVX512-BF16 or AMX; the readers pin f32)
  openvino_int8     --format=openvino --quantize=int8 (NNCF)

Per path (--json: one entry per path, keyed by its name): batch32_images_per_second, batch1_p50_ms,
batch1_p99_ms, peak_rss_mb (ru_maxrss of the measuring process; it includes TensorFlow, which
cxr_tfdata.modeling.runtimes imports, so import_rss_mb is given too), max_abs_diff (probability, against
`keras` on the same images), labels_flipped (at the model's threshold), roc_auc (on the split's labels),
the ratios to `savedmodel` in the same run (throughput_vs_savedmodel, p50_vs_savedmodel), and for an
export its size and guard figures. The printed table has the same columns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PATHS = ("keras", "savedmodel", "savedmodel_bf16", "savedmodel_xla", "onnxruntime", "onnxruntime_int8",
         "litert_fp32", "litert_fp16", "litert_int8", "openvino", "openvino_bf16", "openvino_int8")
# The export (cxr-export --format, --quantize) each path runs; None: the .keras file itself.
EXPORT_OF = {
    "keras": None,
    "savedmodel": ("saved_model", "none"), "savedmodel_bf16": ("saved_model", "none"),
    "savedmodel_xla": ("saved_model", "none"),
    "onnxruntime": ("onnx", "none"), "onnxruntime_int8": ("onnx", "int8"),
    "litert_fp32": ("tflite", "none"), "litert_fp16": ("tflite", "float16"), "litert_int8": ("tflite", "int8"),
    "openvino": ("openvino", "none"), "openvino_bf16": ("openvino", "none"), "openvino_int8": ("openvino", "int8"),
}
BASELINE = "savedmodel"
REFERENCE = "keras"
BATCH = 32
KEYS = ("batch32_images_per_second", "batch1_p50_ms", "batch1_p99_ms", "peak_rss_mb", "max_abs_diff",
        "labels_flipped", "roc_auc")


def export_name(fmt: str, quantize: str) -> str:
    return fmt if quantize == "none" else f"{fmt}_{quantize}"


def cpu_flags() -> list[str]:
    """The /proc/cpuinfo flags that matter for these runtimes (AVX-512, BF16, VNNI, AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma"))


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tf_threads(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


# ---------------------------------------------------------------------------------------------
# Child stages


def stage_prepare(args) -> dict:
    """The model's threshold and image size, and the first N images of the split with their labels."""
    _tf_threads(args.threads)
    from cxr_tfdata.core import config as config_lib
    from cxr_tfdata.data import input_pipeline
    from cxr_tfdata.modeling import feeding, loading, runtimes

    model = runtimes.open_model(args.model)
    if not runtimes.is_keras(model):
        raise ValueError(f"--model: {args.model} is not a .keras model (the benchmark exports from one)")
    image_size = loading.model_image_size(model, args.model)
    reading = feeding.resolve_reading(model, args.model, args.data_dir)
    data_config = config_lib.DataConfig(data_dir=args.data_dir, image_size=image_size, cache="off",
                                        deterministic=True)
    pixels, labels, count = [], [], 0
    for images, batch_labels in input_pipeline.create_dataset(data_config, args.split, BATCH, training=False):
        pixels.append(np.asarray(images, np.float32))
        labels.append(np.rint(np.asarray(batch_labels)).astype(np.int64).reshape(-1))
        count += len(pixels[-1])
        if count >= args.num_images:
            break
    if not pixels:
        raise ValueError(f"--data_dir: the {args.split} split of {args.data_dir} holds no images")
    x, y = np.concatenate(pixels)[:args.num_images], np.concatenate(labels)[:args.num_images]
    np.savez(os.path.join(args.workdir, "images.npz"), pixels=x, labels=y)
    return {"image_size": image_size, "threshold": float(reading.threshold),
            "threshold_source": reading.threshold_source, "num_images": int(len(x)),
            "positives": int(y.sum())}


def stage_export(args) -> dict:
    """One export, as cxr-export writes it: its folder, size and (quantized) the guard's figures, or why
    the guard refused it."""
    from cxr_tfdata.serving import export, quantization_guard

    fmt, quantize = args.format, args.quantize
    out = os.path.join(args.workdir, "exports", export_name(fmt, quantize))
    config = export.ExportConfig(model_path=args.model, output_dir=out, overwrite=True, data_dir=args.data_dir,
                                 format=fmt, quantize=quantize, calibration_images=args.calibration_images,
                                 max_auc_drop=args.guard_max_auc_drop, max_label_flips=args.guard_max_label_flips)
    start = time.perf_counter()
    try:
        path = export.export(config)
    except quantization_guard.QuantizationRefused as e:
        return {"refused": str(e), "export_seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)
    guard = None
    described = os.path.join(path, "cxr_export.json")
    if os.path.isfile(described):
        with open(described, encoding="utf-8") as f:
            guard = json.load(f).get("quantization")
    return {"dir": path, "size_mb": size / 2**20, "export_seconds": seconds, "guard": guard}


def _opener(path: str, artifact: str | None, model_path: str, threads: int):
    """(predict(pixels float32 [B, S, S, 1]) -> probabilities float32 [B], what runs it)."""
    from cxr_tfdata.modeling import portable_formats as pf
    from cxr_tfdata.modeling import runtimes

    if path == REFERENCE:
        _tf_threads(threads)
        model = runtimes.open_model(model_path, threads)
        return (lambda x: model.predict(x, batch_size=len(x), verbose=0).reshape(-1)), "keras.Model.predict"
    if path.startswith("savedmodel"):
        import tensorflow as tf

        _tf_threads(threads)
        if path == "savedmodel_bf16":  # before the graph is first run: the rewrite happens at that time
            tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
        if path == "savedmodel_xla":  # the readers have no XLA switch: the same signature, XLA-compiled
            loaded = tf.saved_model.load(runtimes.detect_format(artifact)[1])  # kept: it owns the variables
            signature = loaded.signatures[pf.SAVED_MODEL_PIXELS_SIGNATURE]
            compiled = tf.function(lambda x: signature(**{pf.PIXELS_INPUT: x})[pf.PROBABILITY_OUTPUT],
                                   jit_compile=True)
            compiled.loaded = loaded
            return (lambda x: compiled(tf.constant(x)).numpy().reshape(-1)), "serving_pixels in jit_compile=True"
        model = runtimes.open_model(artifact, threads)
        how = "runtimes.open_model" + (" + auto_mixed_precision_onednn_bfloat16" if path == "savedmodel_bf16" else "")
        return (lambda x: model.predict_on_batch(x).reshape(-1)), how
    if path == "openvino_bf16":  # the readers pin f32; a server left at OpenVINO's default gets bf16 here
        import openvino as ov

        core = ov.Core()
        ir = core.read_model(runtimes.detect_format(artifact)[1])  # the IR the readers would open
        ir.reshape([-1, ir.inputs[0].get_partial_shape()[1].get_length(),
                    ir.inputs[0].get_partial_shape()[2].get_length(), 1])
        compiled = core.compile_model(ir, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16",
                                                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
        request = compiled.create_infer_request()
        return (lambda x: np.array(request.infer({0: x})[compiled.outputs[0]]).reshape(-1)), \
            f"OpenVINO {compiled.get_property('INFERENCE_PRECISION_HINT')}"
    model = runtimes.open_model(artifact, threads)
    return (lambda x: model.predict_on_batch(x).reshape(-1)), f"runtimes.open_model ({model.format})"


def stage_measure(args) -> dict:
    """Times one path on the prepared images: best-of-passes batch-32 throughput, batch-1 latencies."""
    data = np.load(os.path.join(args.workdir, "images.npz"))
    images = np.ascontiguousarray(data["pixels"], np.float32)
    load_start = load_average()
    import_rss = None
    start = time.perf_counter()
    from cxr_tfdata.modeling import runtimes  # noqa: F401  (imports TensorFlow and Keras)

    import_rss = rss_mb()
    predict, how = _opener(args.path, args.artifact or None, args.model, args.threads)
    for _ in range(2):  # warm-up: XLA compiles, oneDNN primitive caches, first inference of each runtime
        predict(images[:BATCH])
    for i in range(3):
        predict(images[i:i + 1])
    ready = time.perf_counter() - start
    rates, probabilities = [], None
    for _ in range(args.passes):
        t = time.perf_counter()
        probabilities = np.concatenate([predict(images[i:i + BATCH]) for i in range(0, len(images), BATCH)])
        rates.append(len(images) / (time.perf_counter() - t))
    latencies = []
    for i in range(args.latency_runs):
        x = images[i % len(images)][None]
        t = time.perf_counter()
        predict(x)
        latencies.append((time.perf_counter() - t) * 1000)
    return {"batch32_images_per_second": max(rates), "batch32_passes_images_per_second": rates,
            "batch1_p50_ms": float(np.percentile(latencies, 50)), "batch1_p99_ms": float(np.percentile(latencies, 99)),
            "peak_rss_mb": rss_mb(), "import_rss_mb": import_rss, "load_and_warmup_seconds": ready, "runs_as": how,
            "load_average_start": load_start, "load_average_end": load_average(),
            "probabilities": np.asarray(probabilities, np.float64).tolist()}


STAGES = {"prepare": stage_prepare, "export": stage_export, "measure": stage_measure}


def run_stage(args) -> int:
    out = os.path.join(args.workdir, f"{args._stage}_{args._tag}.json")
    try:
        result = STAGES[args._stage](args)
    except Exception as e:  # noqa: BLE001 -- reported per path, never fatal to the run
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:2000]}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


# ---------------------------------------------------------------------------------------------
# Parent


def child(args, stage: str, tag: str, extra: list[str]) -> dict:
    """Runs one stage in a fresh interpreter; its JSON result (or why there is none)."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--_stage={stage}", f"--_tag={tag}", f"--model={args.model}",
           f"--data_dir={args.data_dir}", f"--workdir={args.workdir}", f"--split={args.split}",
           f"--num_images={args.num_images}", f"--threads={args.threads}", f"--passes={args.passes}",
           f"--latency_runs={args.latency_runs}", f"--calibration_images={args.calibration_images}",
           f"--guard_max_auc_drop={args.guard_max_auc_drop}",
           f"--guard_max_label_flips={args.guard_max_label_flips}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = os.path.join(args.workdir, f"{stage}_{tag}.json")
    if os.path.exists(out):
        os.remove(out)
    with open(os.path.join(args.workdir, f"{stage}_{tag}.log"), "w", encoding="utf-8") as log:
        try:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            return {"error": f"{stage} timed out after {args.timeout}s"}
    if not os.path.exists(out):
        return {"error": f"{stage} exited {rc} without a result (see {log.name})"}
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def agreement(entry: dict, reference: np.ndarray | None, labels: np.ndarray, threshold: float) -> None:
    p = np.asarray(entry.pop("probabilities"), np.float64)
    entry["roc_auc"] = roc_auc(labels, p)
    entry["labels_at_threshold"] = int(np.sum(p >= threshold))
    if reference is not None:
        entry["max_abs_diff"] = float(np.max(np.abs(p - reference)))
        entry["labels_flipped"] = int(np.sum((p >= threshold) != (reference >= threshold)))


def summarise(results: dict, context: dict) -> dict:
    base = results.get(BASELINE, {})
    for entry in results.values():
        for key in KEYS:
            entry.setdefault(key, None)
        ok = entry.get("batch32_images_per_second") and base.get("batch32_images_per_second")
        entry["throughput_vs_savedmodel"] = (entry["batch32_images_per_second"] / base["batch32_images_per_second"]
                                             if ok else None)
        ok = entry.get("batch1_p50_ms") and base.get("batch1_p50_ms")
        entry["p50_vs_savedmodel"] = entry["batch1_p50_ms"] / base["batch1_p50_ms"] if ok else None
        entry["run"] = context
    return results


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(results: dict) -> str:
    lines = ["| path | b32 img/s | × savedmodel | b1 p50 ms | p50 / savedmodel | b1 p99 ms | peak RSS MB | "
             "max abs Δp | flips | ROC-AUC | guard (val): AUC drop, flips | size MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results.items():
        guard = e.get("guard") or {}
        if e.get("refused"):
            guard_text = "refused: " + e["refused"].split("refused, ", 1)[-1].split("; nothing", 1)[0]
        elif guard:
            guard_text = f"{guard['auc_drop']:+.4f}, {guard['label_flips']}/{guard['val_images']}"
        else:
            guard_text = ""
        if e.get("error"):
            guard_text = (guard_text + " " if guard_text else "") + "error: " + e["error"][:160]
        lines.append(
            f"| {name} | {_fmt(e['batch32_images_per_second'], '.1f')} | {_fmt(e['throughput_vs_savedmodel'], '.2f')} | "
            f"{_fmt(e['batch1_p50_ms'], '.1f')} | {_fmt(e['p50_vs_savedmodel'], '.2f')} | "
            f"{_fmt(e['batch1_p99_ms'], '.1f')} | {_fmt(e['peak_rss_mb'], '.0f')} | {_fmt(e['max_abs_diff'], '.2g')} | "
            f"{_fmt(e['labels_flipped'], 'd')} | {_fmt(e['roc_auc'], '.4f')} | {guard_text} | "
            f"{_fmt(e.get('size_mb'), '.0f')} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the .keras model")
    parser.add_argument("--data_dir", required=True, help="records written by cxr-build-tfrecords")
    parser.add_argument("--json", default="", help="write one entry per path here")
    parser.add_argument("--split", default="test", help="the labelled split the images come from")
    parser.add_argument("--num_images", type=int, default=128)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime")
    parser.add_argument("--passes", type=int, default=3, help="batch-32 passes over the images (best is kept)")
    parser.add_argument("--latency_runs", type=int, default=100, help="single-image calls for p50/p99")
    parser.add_argument("--calibration_images", type=int, default=200, help="int8: cxr-export --calibration_images")
    parser.add_argument("--guard_max_auc_drop", type=float, default=0.05,
                        help="cxr-export --max_auc_drop for the benchmark's exports (cxr-export's default: 0.005)")
    parser.add_argument("--guard_max_label_flips", type=float, default=0.10,
                        help="cxr-export --max_label_flips for the benchmark's exports (cxr-export's default: 0.01)")
    parser.add_argument("--workdir", default="", help="exports and logs (default: a new temporary folder)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    # Internal: one stage of the run in a child process.
    parser.add_argument("--_stage", choices=sorted(STAGES), default="", help=argparse.SUPPRESS)
    parser.add_argument("--_tag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", default="", help=argparse.SUPPRESS)
    parser.add_argument("--format", default="", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._stage:
        return run_stage(args)
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in EXPORT_OF]
    if unknown:
        raise SystemExit(f"--paths: unknown {unknown}; known: {', '.join(PATHS)}")
    if REFERENCE not in paths:
        paths.insert(0, REFERENCE)  # the reference for agreement
    args.model = os.path.abspath(args.model)
    args.data_dir = os.path.abspath(args.data_dir)
    if not args.workdir:
        import tempfile

        args.workdir = tempfile.mkdtemp(prefix="bench_serving_")
    os.makedirs(args.workdir, exist_ok=True)
    context = {"command": " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]) if argv is None else argv,
               "cpu_flags": cpu_flags(), "cpus": os.cpu_count(), "machine": platform.machine(),
               "load_average_start": load_average(), "split": args.split, "threads": args.threads}
    print(f"workdir {args.workdir}; load average {context['load_average_start']}; CPU flags {context['cpu_flags']}",
          flush=True)

    prepared = child(args, "prepare", "images", [])
    if "error" in prepared:
        raise SystemExit(f"preparing the images failed: {prepared['error']}")
    context.update(prepared)
    data = np.load(os.path.join(args.workdir, "images.npz"))
    labels = data["labels"]
    print(f"{prepared['num_images']} images of {args.split} ({prepared['positives']} PNEUMONIA); threshold "
          f"{prepared['threshold']:.4g} ({prepared['threshold_source']})", flush=True)

    exports = {}
    for fmt, quantize in dict.fromkeys(EXPORT_OF[p] for p in paths if EXPORT_OF[p]):
        name = export_name(fmt, quantize)
        exports[(fmt, quantize)] = child(args, "export", name, [f"--format={fmt}", f"--quantize={quantize}"])
        done = exports[(fmt, quantize)]
        status = ("refused" if "refused" in done else "error: " + done["error"] if "error" in done
                  else f"{done['size_mb']:.0f} MB")
        print(f"export {name}: {status} ({done.get('export_seconds', 0):.0f} s)", flush=True)

    results = {}
    for path in paths:
        entry: dict = {}
        made = exports.get(EXPORT_OF[path], {}) if EXPORT_OF[path] else {"dir": ""}
        for key in ("size_mb", "guard", "refused", "export_seconds"):
            if made.get(key) is not None:
                entry[key] = made[key]
        if "refused" in made or "error" in made:
            if "error" in made:
                entry["error"] = "export: " + made["error"]
        else:
            measured = child(args, "measure", path, [f"--path={path}", f"--artifact={made['dir']}"])
            entry.update(measured)
        results[path] = entry
        shown = entry.get("batch32_images_per_second")
        print(f"{path}: " + (f"{shown:.1f} img/s at batch 32, p50 {entry['batch1_p50_ms']:.1f} ms" if shown else
                             entry.get("error") or "refused: " + entry.get("refused", "")), flush=True)

    reference = results.get(REFERENCE, {}).get("probabilities")
    reference = None if reference is None else np.asarray(reference, np.float64)
    for entry in results.values():
        if "probabilities" in entry:
            agreement(entry, reference, labels, prepared["threshold"])
    context["load_average_end"] = load_average()
    summarise(results, context)
    print(table(results))
    print(f"load average at the start {context['load_average_start']}, at the end {context['load_average_end']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
