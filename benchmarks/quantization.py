"""Post-training int8 quantization of Whittle against onnxruntime's quantize_static, on the same model and data.

Run from the repository root after building Whittle in release mode:

    swift build -c release --product coordinator
    python3 benchmarks/quantization.py [--calibration-samples 256] [--reduce-range [on|off]] [--repeats 3]

Both tools quantize the same float model (default: the demo defect CNN) on the same calibration samples (the first
N of the training images) into QDQ models with uint8 activations and per-channel int8 weights, once per calibration
method and per reduce_range setting (7-bit weights; both settings unless --reduce-range picks one):

- onnxruntime: `quant_pre_process` (skip_symbolic_shape=True, not timed), then `quantize_static` (QDQ, per channel,
  QUInt8 activations, QInt8 weights) with MinMax, Percentile (99.999) and Entropy. Histograms get 2048 bins like
  Whittle's: quantize_static's extra_options cannot set the bin count (only the CalibTensorRangeSymmetric,
  CalibMovingAverage(Constant), CalibMaxIntermediateOutputs and CalibPercentile keys reach the calibrator), so the
  calibrator factory it calls is wrapped to add num_bins=2048 (Percentile's default already; Entropy's is 128). The
  symmetric flag is left at each method's default (Percentile: |x| histogram, Entropy: two-sided). Timed: the whole
  quantize_static call (calibration and export), with onnxruntime's default thread count.
- Whittle: `coordinator model compress --quantize int8 --calibration M [--reduce-range] --threads 2` with minmax,
  percentile, entropy and mse (no onnxruntime counterpart). Timed: calibration and export from the report's
  `timings`, and the wall time of the whole process (model loading and Whittle's own evaluation included).

Every exported model, and the float model, is then evaluated by onnxruntime (CPU provider) on the evaluation set
with all graph optimizations (ORT_ENABLE_ALL: QDQ groups fused into integer kernels) and with none (ORT_DISABLE_ALL:
the QDQ graph as written, in float). Whittle's predicted accuracy (its own engine on the QDQ graph) is listed beside.
On x86 CPUs without AVX-VNNI onnxruntime's u8×s8 kernels add pairs of products in 16 bits, which saturate with
full-range weights: the ENABLE_ALL accuracy of models quantized without reduce_range drops there, for both tools.

Each quantization runs --repeats times and the fastest run is kept (every run writes the same model), to damp noise
from other work on the machine. The script prints a timing table (with the ratio onnxruntime seconds / Whittle
seconds: above 1, Whittle is faster) and an accuracy table (with Whittle − onnxruntime in percentage points), and
writes benchmarks/last-quantization.json (last-quantization-MODEL.json for another --model).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
DEFAULT_CALIBRATION = DATA / "defects_train_x.npy"
# The module, not the package's function of the same name: quantize_static looks create_calibrator up in it.
ORT_QUANTIZE = importlib.import_module("onnxruntime.quantization.quantize")
CREATE_CALIBRATOR = ORT_QUANTIZE.create_calibrator
HISTOGRAM_BINS = 2048
PERCENTILE = 99.999
WHITTLE_THREADS = 2
ORT_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
WHITTLE_METHODS = ["minmax", "percentile", "entropy", "mse"]
OPTIMIZATION_LEVELS = {"enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                       "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


class BatchReader(CalibrationDataReader):
    """Feeds the calibration samples to onnxruntime's calibrator in batches."""

    def __init__(self, input_name, samples, batch_size):
        self.batches = iter([{input_name: samples[i:i + batch_size]} for i in range(0, len(samples), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def make_demo_training_data():
    """Generates the git-ignored training split with scripts/make_demo_data.py, leaving the committed test split."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", scratch], check=True,
                       capture_output=True)
        for name in ["defects_train_x.npy", "defects_train_y.npy"]:
            shutil.copy(pathlib.Path(scratch) / name, DATA / name)


def cpu_description():
    flags, model = set(), platform.processor()
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {"model": model, "avx2": "avx2" in flags, "vnni": bool({"avx_vnni", "avx512_vnni"} & flags)}


def accuracy(path, x, y, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def accuracies(path, x, y):
    return {name: accuracy(path, x, y, level) for name, level in OPTIMIZATION_LEVELS.items()}


def create_calibrator_with_bins(*args, extra_options=None, **kwargs):
    """onnxruntime's create_calibrator, with the histogram bin count Whittle uses."""
    return CREATE_CALIBRATOR(*args, extra_options={**(extra_options or {}), "num_bins": HISTOGRAM_BINS}, **kwargs)


def onnxruntime_quantize(preprocessed, out, samples, batch_size, method, reduce_range):
    """Runs quantize_static and returns its duration in seconds (its progress prints are swallowed)."""
    input_name = onnx.load(str(preprocessed), load_external_data=False).graph.input[0].name
    reader = BatchReader(input_name, samples, batch_size)
    with mock.patch.object(ORT_QUANTIZE, "create_calibrator", create_calibrator_with_bins), \
            contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        quantize_static(str(preprocessed), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=ORT_METHODS[method], extra_options={"CalibPercentile": PERCENTILE})
        return time.perf_counter() - start


def whittle_quantize(args, calibration, out, method, reduce_range):
    """Runs `coordinator model compress` and returns its report with the process's wall time added."""
    report = out.with_suffix(".json")
    command = [str(args.binary), "model", "compress", str(args.model), "--calibration-data", str(calibration),
               "--out", str(out), "--quantize", "int8", "--calibration", method, "--percentile", str(PERCENTILE),
               "--report", str(report), "--val-data", str(args.eval_data), "--val-labels", str(args.eval_labels),
               "--batch-size", str(args.batch_size), "--threads", str(WHITTLE_THREADS), "--json"]
    if reduce_range:
        command.append("--reduce-range")
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    return {**json.loads(report.read_text()), "wall": wall}


def onnxruntime_row(args, preprocessed, samples, out, method, reduce_range, x, y):
    seconds = min(onnxruntime_quantize(preprocessed, out, samples, args.batch_size, method, reduce_range)
                  for _ in range(args.repeats))
    return {"seconds": seconds, "accuracy": accuracies(out, x, y)}


def whittle_row(args, calibration, out, method, reduce_range, x, y):
    reports = [whittle_quantize(args, calibration, out, method, reduce_range) for _ in range(args.repeats)]
    best = min(reports, key=lambda r: r["timings"]["calibration"] + r["timings"]["export"])
    timings = best["timings"]
    return {"seconds": timings["calibration"] + timings["export"],
            "calibration_seconds": best["calibration"]["seconds"], "export_seconds": timings["export"],
            "total_seconds": timings["total"], "wall_seconds": min(r["wall"] for r in reports),
            "predicted_accuracy": best["after"]["accuracy"], "accuracy": accuracies(out, x, y)}


def benchmark(args, scratch):
    """Quantizes with both tools for every method and reduce_range setting; returns one row per pair."""
    samples = np.ascontiguousarray(np.load(args.calibration_data)[:args.calibration_samples], dtype=np.float32)
    calibration = scratch / "calibration.npy"
    np.save(calibration, samples)
    x = np.load(args.eval_data).astype(np.float32)
    y = np.load(args.eval_labels)
    preprocessed = scratch / "preprocessed.onnx"
    quant_pre_process(str(args.model), str(preprocessed), skip_symbolic_shape=True)
    rows = []
    for reduce_range in args.reduce_range:
        for method in WHITTLE_METHODS:
            tag = f"{method}-{'rr' if reduce_range else 'full'}"
            theirs = onnxruntime_row(args, preprocessed, samples, scratch / f"ort-{tag}.onnx", method, reduce_range,
                                     x, y) if method in ORT_METHODS else None
            ours = whittle_row(args, calibration, scratch / f"whittle-{tag}.onnx", method, reduce_range, x, y)
            rows.append({"method": method, "reduce_range": reduce_range, "onnxruntime": theirs, "whittle": ours})
            print(f"  {tag}: done", file=sys.stderr)
    return {"float_accuracy": accuracies(args.model, x, y), "eval_samples": len(y), "rows": rows}


def setting(row):
    return "7-bit" if row["reduce_range"] else "8-bit"


def print_timings(rows):
    print("\nCalibration + export, seconds, best of the repetitions (onnxruntime: the quantize_static call; Whittle: "
          "the report's timings; wall: the whole coordinator process)")
    print(f"{'weights':<8}{'method':<12}{'onnxruntime':>12}{'whittle':>9}{'ratio':>8}{'whittle wall':>14}")
    for row in rows:
        ours = row["whittle"]
        theirs = row["onnxruntime"]
        ort_seconds, ratio = (f"{theirs['seconds']:.2f}", f"{theirs['seconds'] / ours['seconds']:.1f}") \
            if theirs else ("-", "-")
        print(f"{setting(row):<8}{row['method']:<12}{ort_seconds:>12}{ours['seconds']:>9.2f}{ratio:>8}"
              f"{ours['wall_seconds']:>14.2f}")


def percent(value):
    return f"{100 * value:.1f}" if value is not None else "-"


def print_accuracies(result):
    floats = result["float_accuracy"]
    print(f"\nTop-1 accuracy, % of {result['eval_samples']} samples, in onnxruntime with all / no graph optimizations; "
          f"float model {percent(floats['enable_all'])} / {percent(floats['disable_all'])}")
    print(f"{'weights':<8}{'method':<12}{'ort all':>9}{'ort none':>10}{'whittle all':>13}{'whittle none':>14}"
          f"{'predicted':>11}{'diff all':>10}{'diff none':>11}")
    for row in result["rows"]:
        ours, theirs = row["whittle"]["accuracy"], (row["onnxruntime"] or {}).get("accuracy", {})
        diffs = [f"{100 * (ours[k] - theirs[k]):+.1f}" if theirs else "-" for k in OPTIMIZATION_LEVELS]
        print(f"{setting(row):<8}{row['method']:<12}{percent(theirs.get('enable_all')):>9}"
              f"{percent(theirs.get('disable_all')):>10}{percent(ours['enable_all']):>13}"
              f"{percent(ours['disable_all']):>14}{percent(row['whittle']['predicted_accuracy']):>11}"
              f"{diffs[0]:>10}{diffs[1]:>11}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=ROOT / "examples" / "models" / "defect_cnn.onnx")
    parser.add_argument("--calibration-data", type=pathlib.Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--eval-data", type=pathlib.Path, default=DATA / "defects_test_x.npy")
    parser.add_argument("--eval-labels", type=pathlib.Path, default=DATA / "defects_test_y.npy")
    parser.add_argument("--batch-size", type=int, default=32, help="calibration batch size, both tools")
    parser.add_argument("--repeats", type=int, default=3, help="quantize this many times, keep the fastest")
    parser.add_argument("--reduce-range", nargs="?", const="on", choices=["on", "off"],
                        help="run only with (on, the default value) or without (off) 7-bit weights; absent: both")
    parser.add_argument("--binary", type=pathlib.Path, default=ROOT / ".build" / "release" / "coordinator")
    args = parser.parse_args()
    args.reduce_range = [False, True] if args.reduce_range is None else [args.reduce_range == "on"]

    if not args.binary.exists():
        sys.exit(f"{args.binary} is missing: run `swift build -c release --product coordinator` first")
    if not args.calibration_data.exists() and args.calibration_data == DEFAULT_CALIBRATION:
        make_demo_training_data()

    cpu = cpu_description()
    print(f"onnxruntime {ort.__version__}, {cpu['model']} (AVX2: {cpu['avx2']}, VNNI: {cpu['vnni']}), "
          f"{args.calibration_samples} calibration samples, {HISTOGRAM_BINS} histogram bins")
    with tempfile.TemporaryDirectory() as scratch:
        result = benchmark(args, pathlib.Path(scratch))
    print_timings(result["rows"])
    print_accuracies(result)
    summary = {"onnxruntime_version": ort.__version__, "cpu": cpu, "model": str(args.model),
               "calibration_samples": args.calibration_samples, "histogram_bins": HISTOGRAM_BINS,
               "whittle_threads": WHITTLE_THREADS, "repeats": args.repeats, **result}
    default_model = args.model.resolve() == (ROOT / "examples" / "models" / "defect_cnn.onnx").resolve()
    out = ROOT / "benchmarks" / ("last-quantization.json" if default_model else f"last-quantization-{args.model.stem}.json")
    out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
