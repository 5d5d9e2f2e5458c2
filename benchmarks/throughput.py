"""Forward-pass throughput of Whittle against onnxruntime on the same models, batch and machine.

Run from the repository root after building Whittle in release mode:

    swift build -c release --product coordinator
    python3 benchmarks/throughput.py [--batch-size 32] [--iterations 30] [--threads 1 2]

It builds the benchmark models if they are missing (benchmarks/make_models.py: full-width CIFAR ResNet-18 and
MobileNetV2, BatchNormalization kept, random weights), then for each model and thread count runs onnxruntime
(CPUExecutionProvider, all graph optimizations, intra-op threads = N) and `coordinator model bench` on the same input
shape, and prints images/s for both and the ratio Whittle / onnxruntime. The goal is a ratio of at least 0.8.
Both engines are timed over the same number of batches after the same number of warm-up batches; each measurement
is repeated and the best repetition is kept, to damp noise from other work on the machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402


ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "benchmarks" / "models"
NAMES = ["resnet18_cifar.onnx", "mobilenetv2_cifar.onnx"]


def onnxruntime_images_per_second(path, batch, threads, iterations, warmup, repeats):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(42).uniform(-1, 1, size=(batch, 3, 32, 32)).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: x})
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            session.run(None, {name: x})
        best = max(best, batch * iterations / (time.perf_counter() - start))
    return best


def whittle_images_per_second(binary, path, batch, threads, iterations, warmup, repeats):
    best = 0.0
    for _ in range(repeats):
        result = subprocess.run([str(binary), "model", "bench", str(path), "--batch-size", str(batch), "--threads",
                                 str(threads), "--iterations", str(iterations), "--warmup", str(warmup), "--json"],
                                capture_output=True, text=True, check=True)
        best = max(best, json.loads(result.stdout)["imagesPerSecond"])
    return best


def main():
    print(machine.banner())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--binary", default=str(ROOT / ".build" / "release" / "coordinator"))
    args = parser.parse_args()

    binary = pathlib.Path(args.binary)
    if not binary.exists():
        sys.exit(f"{binary} is missing: run `swift build -c release --product coordinator` first")
    if not all((MODELS / n).exists() for n in NAMES):
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_models.py"), str(MODELS)], check=True)

    print(f"onnxruntime {ort.__version__}, batch {args.batch_size}, {args.iterations} batches x best of {args.repeats}")
    print(f"{'model':<24}{'threads':>8}{'onnxruntime img/s':>20}{'whittle img/s':>16}{'ratio':>8}")
    rows = []
    for name in NAMES:
        for threads in args.threads:
            theirs = onnxruntime_images_per_second(MODELS / name, args.batch_size, threads, args.iterations,
                                                   args.warmup, args.repeats)
            ours = whittle_images_per_second(binary, MODELS / name, args.batch_size, threads, args.iterations,
                                             args.warmup, args.repeats)
            rows.append({"model": name, "threads": threads, "onnxruntime": theirs, "whittle": ours,
                         "ratio": ours / theirs})
            print(f"{name:<24}{threads:>8}{theirs:>20.1f}{ours:>16.1f}{ours / theirs:>8.2f}")
    (ROOT / "benchmarks" / "last-throughput.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
