"""int4 weight-only quantization of a BERT-base encoder (issue 16): per-channel int4 side by side with block-wise
int4 (blocks of 32, 64 and 128 along K) written as opset-21 blocked DequantizeLinear and as onnxruntime's
MatMulNBits, and onnxruntime's own block-wise quantizer (MatMulNBitsQuantizer, block 32, symmetric) on the same
model, on the same machine in the same run.

Run from the repository root after building Whittle in release mode:

    swift build -c release --product coordinator
    python3 benchmarks/int4_blocks.py [--layers 12] [--samples 8]

The model is benchmarks/models/bert_base_128.onnx, built by benchmarks/families.py (random weights, seed 110) if it
is missing. For each variant it prints the file size, the output's relative RMSE against the float model on
`--samples` random token sequences with random lengths (onnxruntime with graph optimizations off, the file's exact
semantics, and optimized, as it is deployed: onnxruntime turns int4 DequantizeLinear -> MatMul into MatMulNBits,
whose default accuracy level 4 quantizes activations to int8), the weights' reconstruction error (numpy, from the
QDQ files' codes and scales), onnxruntime's latency at batch 1, 1 thread, and the resident memory (VmRSS) of a
Whittle `model bench` process holding the file (int4 weights stay packed in it). Writes benchmarks/last-int4.json.
onnxruntime's quantizer needs the onnx-ir package (`python3 -m pip install onnx-ir`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import families  # noqa: E402
import machine  # noqa: E402
from integer import resident_kib  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "Tests" / "interop"))
from test_zoo import dequantized_weights  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tokens(count, seed, seq=families.SEQUENCE, vocab=30522):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(count, seq), dtype=np.int64)
    mask = np.ones((count, seq), dtype=np.int64)
    for row, valid in enumerate(rng.integers(16, seq + 1, size=count)):
        mask[row, valid:] = 0
        ids[row, valid:] = 0
    ids[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def session(path, optimized=True, threads=1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs(path, inputs, optimized):
    s = session(path, optimized)
    return np.concatenate([s.run(None, {k: v[i:i + 1] for k, v in inputs.items()})[0] for i in range(len(inputs["input_ids"]))])


def relative_rmse(a, b):
    return float(np.sqrt(((a - b) ** 2).mean()) / np.sqrt((b ** 2).mean()))


def latency_ms(path, inputs, iterations=20):
    s = session(path)
    x = {k: v[:1] for k, v in inputs.items()}
    for _ in range(3):
        s.run(None, x)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iterations):
            s.run(None, x)
        best = min(best, (time.perf_counter() - start) / iterations * 1000)
    return best


def weight_error(path, floats):
    """Relative reconstruction error of the int4 weights of a QDQ file, dequantized by numpy (the interop tests'
    `dequantized_weights`)."""
    weights = dequantized_weights(path)
    err = sum(float(((w - floats[name]) ** 2).sum()) for name, w in weights.items() if name in floats)
    total = sum(float((floats[name] ** 2).sum()) for name in weights if name in floats)
    return (err / total) ** 0.5 if total else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    binary = ROOT / ".build" / "release" / "coordinator"
    if not binary.exists():
        sys.exit("build Whittle first: swift build -c release --product coordinator")
    source = families.MODELS / "bert_base_128.onnx"
    if not source.exists():
        families.MODELS.mkdir(parents=True, exist_ok=True)
        onnx.save(families.bert_base(args.layers), str(source))
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as error:
        sys.exit(f"onnxruntime's block-wise quantizer is not importable ({error}): python3 -m pip install onnx-ir")
    print(machine.banner())
    print(f"{'variant':44s} {'size MB':>8s} {'error (exact)':>14s} {'error (deployed)':>17s} {'weights':>8s} {'ms (ORT, 1 thr)':>16s}"
          f" {'Whittle MiB':>12s}")

    def show(r):
        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "–"
        print(f"{r['variant']:44s} {r['bytes'] / 1e6:8.1f} {f('error_reference', '14.4f')} {f('error_deployed', '17.4f')} "
              f"{f('weight_error', '8.4f')} {r['latency_ms']:16.2f} {f('whittle_resident_mib', '12.0f')}", flush=True)
    floats = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(source)).graph.initializer}
    test = tokens(args.samples, 2)
    expected = outputs(source, test, optimized=True)
    rows = [{"variant": "float", "bytes": source.stat().st_size, "latency_ms": latency_ms(source, test),
             "whittle_resident_mib": resident_kib(binary, source, 8.0) / 1024}]
    show(rows[0])
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        np.savez(folder / "cal.npz", **tokens(2, 1))
        variants = [("Whittle per-channel (qdq)", ())]
        for block in (32, 64, 128):
            variants.append((f"Whittle block {block} (qdq)", ("--int4-block-size", str(block))))
            variants.append((f"Whittle block {block} (MatMulNBits)", ("--int4-format", "matmulnbits", "--int4-block-size", str(block))))
        for label, extra in variants:
            out = folder / "q.onnx"
            start = time.perf_counter()
            subprocess.run([str(binary), "model", "compress", str(source), "--calibration-data", str(folder / "cal.npz"),
                            "--quantize", "int4-weights", *extra, "--out", str(out)], check=True, capture_output=True)
            seconds = time.perf_counter() - start
            rows.append({"variant": label, "bytes": out.stat().st_size, "compress_seconds": seconds,
                         "error_reference": relative_rmse(outputs(out, test, optimized=False), expected),
                         "error_deployed": relative_rmse(outputs(out, test, optimized=True), expected),
                         "weight_error": weight_error(out, floats) if "qdq" in label else None,
                         "latency_ms": latency_ms(out, test), "whittle_resident_mib": resident_kib(binary, out, 8.0) / 1024})
            show(rows[-1])
        # onnxruntime's own block-wise quantizer on the same model.
        out = folder / "ort.onnx"
        start = time.perf_counter()
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=32, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
        rows.append({"variant": "onnxruntime MatMulNBitsQuantizer block 32", "bytes": out.stat().st_size,
                     "compress_seconds": time.perf_counter() - start,
                     "error_reference": relative_rmse(outputs(out, test, optimized=False), expected),
                     "error_deployed": relative_rmse(outputs(out, test, optimized=True), expected),
                     "weight_error": None, "latency_ms": latency_ms(out, test)})
        show(rows[-1])
    (ROOT / "benchmarks" / "last-int4.json").write_text(json.dumps({"machine": machine.describe(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
