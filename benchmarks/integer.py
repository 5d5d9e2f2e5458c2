"""The integer runtime (issue 17): how much faster a QDQ model runs than its float base in Whittle's own engine, and
Whittle's integer path against onnxruntime on the same QDQ files, at batch 1 and 32, 1 and 2 threads.

Run from the repository root after building Whittle in release mode:

    swift build -c release --product coordinator
    python3 benchmarks/integer.py [--iterations 200] [--threads 1 2] [--batches 1 32]

Models: the demo CNN (examples/models/defect_cnn.onnx), and benchmarks/make_models.py's full-width CIFAR ResNet-18
and MobileNetV2 (random weights). Each is quantized by Whittle (`model compress --quantize int8`: per-channel int8
weights, uint8 activations, minmax on 64 images: the demo's test images, random ones for the others); ResNet-18 is
also pruned at 0.5 and quantized, for the combined speed-up. For every file, batch and thread count it times
`coordinator model bench` and onnxruntime (CPUExecutionProvider, all optimizations), best of three, and prints
images/s, Whittle's speed-up of each compressed file over its float base, and Whittle / onnxruntime on the same
file. Then the resident memory (VmRSS) of a `model bench` process holding each float and compressed file. Writes
benchmarks/last-integer.json. Goals: the demo's QDQ file at least 2x its float base at batch 1 and 32
on 1 thread; Whittle at least 1.0x onnxruntime on the QDQ files; pruned + quantized ResNet-18 at least 4x its float
base at batch 1 on 1 thread.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402
from throughput import onnxruntime_images_per_second  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "benchmarks" / "models"


def whittle(binary, path, batch, threads, iterations, repeats):
    best = 0.0
    for _ in range(repeats):
        out = subprocess.run([str(binary), "model", "bench", str(path), "--batch-size", str(batch), "--threads",
                              str(threads), "--iterations", str(iterations), "--warmup", str(max(5, iterations // 10)),
                              "--json"], capture_output=True, text=True, check=True)
        best = max(best, json.loads(out.stdout)["imagesPerSecond"])
    return best


def resident_kib(binary, path, seconds=4.0):
    """Resident memory of a `model bench` process holding the model (batch 1, 1 thread), read from /proc after it
    has compiled and run for a few seconds: what a worker holding that model keeps."""
    import time
    process = subprocess.Popen([str(binary), "model", "bench", str(path), "--batch-size", "1", "--threads", "1",
                                "--iterations", "100000000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(seconds)
        status = pathlib.Path(f"/proc/{process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    finally:
        process.kill()
        process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200, help="batches of 1 per measurement (batches of 32: /16)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--binary", default=str(ROOT / ".build" / "release" / "coordinator"))
    args = parser.parse_args()
    print(machine.banner())
    binary = pathlib.Path(args.binary)
    if not binary.exists():
        sys.exit(f"{binary} is missing: run `swift build -c release --product coordinator` first")
    if not (MODELS / "resnet18_cifar.onnx").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_models.py"), str(MODELS)], check=True)
    print(f"onnxruntime {ort.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        random = tmp / "random.npy"
        np.save(random, np.random.default_rng(0).uniform(-1, 1, (64, 3, 32, 32)).astype(np.float32))
        demo_data = ROOT / "examples" / "data" / "defects_test_x.npy"
        variants = []  # (label, base path, compressed path)
        for label, base, data, extra in [
            ("demo CNN int8", ROOT / "examples" / "models" / "defect_cnn.onnx", demo_data, []),
            ("ResNet-18 int8", MODELS / "resnet18_cifar.onnx", random, []),
            ("MobileNetV2 int8", MODELS / "mobilenetv2_cifar.onnx", random, []),
            ("ResNet-18 pruned 0.5 + int8", MODELS / "resnet18_cifar.onnx", random, ["--prune-ratio", "0.5"]),
        ]:
            out = tmp / (label.replace(" ", "_").replace("+", "") + ".onnx")
            subprocess.run([str(binary), "model", "compress", str(base), "--calibration-data", str(data), "--quantize",
                            "int8", *extra, "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
            variants.append((label, base, out))
        print(f"{'model':<30}{'batch':>6}{'thr':>4}{'float img/s':>13}{'int8 img/s':>12}{'speed-up':>9}"
              f"{'ort int8 img/s':>16}{'vs ort':>8}")
        for label, base, compressed in variants:
            for batch in args.batches:
                iterations = max(10, args.iterations // (1 if batch == 1 else 16))
                for threads in args.threads:
                    floats = whittle(binary, base, batch, threads, iterations, args.repeats)
                    ours = whittle(binary, compressed, batch, threads, iterations, args.repeats)
                    theirs = onnxruntime_images_per_second(compressed, batch, threads, iterations, 5, args.repeats)
                    row = {"model": label, "batch": batch, "threads": threads, "whittleFloat": floats,
                           "whittleCompressed": ours, "speedup": ours / floats, "onnxruntimeCompressed": theirs,
                           "ratioToOnnxruntime": ours / theirs}
                    rows.append(row)
                    print(f"{label:<30}{batch:>6}{threads:>4}{floats:>13.0f}{ours:>12.0f}{ours / floats:>8.2f}x"
                          f"{theirs:>16.0f}{ours / theirs:>7.2f}x")
        print(f"\n{'model':<30}{'float MiB':>11}{'int8 MiB':>10}{'ratio':>8}   (resident memory while running, batch 1)")
        memory = []
        for label, base, compressed in variants:
            floats, ours = resident_kib(binary, base), resident_kib(binary, compressed)
            memory.append({"model": label, "floatKiB": floats, "compressedKiB": ours})
            print(f"{label:<30}{floats / 1024:>11.1f}{ours / 1024:>10.1f}{floats / ours:>7.2f}x")
    (ROOT / "benchmarks" / "last-integer.json").write_text(
        json.dumps({"machine": machine.describe(), "rows": rows, "residentMemory": memory}, indent=2) + "\n")


if __name__ == "__main__":
    main()
