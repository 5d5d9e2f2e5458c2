"""What the coordinator spends on large models' reports, beside Flower's aggregation of the same arrays (issue 21).

For each model, a real coordinator and 4 real `worker run` processes (release builds, one compute thread each, mutual
TLS on loopback) run fine-tuning rounds without pruning or quantization (`--finetune-rounds R --quantize none`), each
worker on 8 samples, so that the reports (one weight delta per worker and round, the model's size) dominate. Measured:

  - coordinator CPU (utime + stime from /proc) over the whole round, per MB of report received: all in (TLS,
    decoding, folding, durability, the model upload and every download the round served);
  - the fold alone: report bytes over the seconds the round service spent folding them (`aggregationSeconds`: decoding
    the deltas, validating, the weighted sum in Double);
  - the coordinator's peak RSS (VmHWM), also as a multiple of the model's size;
  - Flower's `aggregate_arrayrecords` (flwr.serverapp.strategy.strategy_utils) on 4 ArrayRecords with the model's
    float parameters' shapes, and numpy's weighted sum, in GB/s of report arrays, best of 3, in the same run.

Models: the demo CNN (Tests/Fixtures/models), and torchvision's ResNet-18 and ResNet-50 at 32x32 exported by
benchmarks/export_torchvision.py (11.7 M and 25.6 M parameters, 47 and 102 MB):

    /path/to/torch-venv/bin/python benchmarks/export_torchvision.py resnet18 32
    /path/to/torch-venv/bin/python benchmarks/export_torchvision.py resnet50 32
    python3 -m venv /tmp/flwr && /tmp/flwr/bin/pip install flwr numpy
    swift build -c release --product coordinator && swift build -c release --product worker
    python3 benchmarks/large_models.py --flower-python /tmp/flwr/bin/python [--binaries DIR] [--rounds 2]

Prints a table and writes benchmarks/last-large-models.json.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Tests" / "interop"))
from rounds_support import MODEL, load_train_split, loopback_fleet  # noqa: E402
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402
from rounds import cpu_seconds, peak_rss_mib  # noqa: E402

WORKERS = 4
SAMPLES = 8

FLOWER = r"""
import json, sys, time
import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
shapes = json.load(open(sys.argv[1]))
rng = np.random.default_rng(0)
records = []
for k in range(int(sys.argv[2])):
    arrays = {name: rng.standard_normal(shape, dtype=np.float32) * 1e-3 for name, shape in shapes.items()}
    records.append(RecordDict({"arrays": ArrayRecord({n: Array(a) for n, a in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": 8 + k})}))
total = sum(a.numpy().nbytes for r in records for a in r.array_records["arrays"].values())
def best(f):
    times = []
    for _ in range(3):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return min(times)
flower = best(lambda: aggregate_arrayrecords(records, "num-examples"))
plain = [{n: a.numpy() for n, a in r.array_records["arrays"].items()} for r in records]
def numpy_sum():
    out = {n: np.zeros(a.shape, dtype=np.float64) for n, a in plain[0].items()}
    for k, r in enumerate(plain):
        for n, a in r.items():
            out[n] += (8 + k) * a
numpy_seconds = best(numpy_sum)
print(json.dumps({"bytes": total, "flowerGBps": total / flower / 1e9, "numpyGBps": total / numpy_seconds / 1e9}))
"""


def float_shapes(path):
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: list(i.dims) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 1 and int(np.prod(i.dims)) > 1}


def data_for(path):
    """Eight samples per worker: the demo's images for the demo model, random 3x32x32 images for the ResNets."""
    if path == MODEL:
        x, y = load_train_split()
        return [(x[k * SAMPLES:(k + 1) * SAMPLES], y[k * SAMPLES:(k + 1) * SAMPLES]) for k in range(WORKERS)]
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((SAMPLES, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, SAMPLES))
            for _ in range(WORKERS)]


def run(name, path, rounds, binaries, directory):
    directory = pathlib.Path(directory)
    size = path.stat().st_size
    with loopback_fleet(binaries, directory, heartbeat_seconds=1, report_body_limit=1 << 30,
                        model_body_limit=1 << 30) as fleet:
        server = fleet.server
        names = [f"board-{k}" for k in range(WORKERS)]
        fleet.enroll(names)
        for n, (x, y) in zip(names, data_for(path)):
            fleet.write_shard(n, x, y)
            fleet.start_worker(n)
        time.sleep(2)
        cpu0 = cpu_seconds(server.process.pid)
        began = time.monotonic()
        started = fleet.round("start", "--model", path, "--finetune-rounds", str(rounds), "--local-epochs", "1",
                              "--batch-size", str(SAMPLES), "--lr", "0.001", "--quantize", "none",
                              # Random weights on random images: no quality gate means anything here.
                              "--min-agreement", "0", "--max-accuracy-drop", "1",
                              "--min-workers", str(WORKERS), "--phase-deadline", "30m", "--json", timeout=600)
        round_id = json.loads(started.stdout)["id"]
        status = fleet.wait(round_id, timeout=7200)
        wall = time.monotonic() - began
        cpu = cpu_seconds(server.process.pid) - cpu0
        assert status["state"] == "succeeded", status
        report_path = directory / "report.json"
        fleet.round("fetch", round_id, "--out", directory / "out.onnx", "--report", report_path, timeout=600)
        report = json.loads(report_path.read_text())
        up = sum(p["bytesUp"] for p in report["phases"])
        finetune = [p for p in report["phases"] if p["kind"] == "finetune"]
        fold_bytes = sum(p["bytesUp"] for p in finetune)
        fold_seconds = sum(p["aggregationSeconds"] for p in finetune)
        rss = peak_rss_mib(server.process.pid)
        return {"name": name, "modelBytes": size, "rounds": rounds, "workers": WORKERS, "wallSeconds": wall,
                "reportBytes": up, "coordinatorCPUSeconds": cpu, "cpuMsPerMB": 1000 * cpu / (up / 1e6),
                "foldBytes": fold_bytes, "foldSeconds": fold_seconds,
                "foldMBps": fold_bytes / fold_seconds / 1e6 if fold_seconds > 0 else None,
                "coordinatorPeakRSSMiB": rss, "peakRSSOverModel": rss * 2**20 / size}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flower-python", help="a Python with flwr installed (omitted: no Flower figures)")
    parser.add_argument("--binaries", default=str(ROOT / ".build" / "release"), help="where coordinator and worker are")
    parser.add_argument("--rounds", type=int, default=2, help="fine-tuning rounds per model")
    parser.add_argument("--models", default="demo,resnet18_32,resnet50_32")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "last-large-models.json"))
    args = parser.parse_args()
    print(machine.banner())
    print(f"binaries: {args.binaries}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = MODEL if name == "demo" else ROOT / "benchmarks" / "models" / f"{name}.onnx"
            if not path.exists():
                print(f"== {name}: {path} is missing (benchmarks/export_torchvision.py makes it); skipped")
                continue
            print(f"== {name} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
            folder = pathlib.Path(tmp) / name
            folder.mkdir()
            r = run(name, path, args.rounds, pathlib.Path(args.binaries), folder)
            if args.flower_python:
                shapes = folder / "shapes.json"
                shapes.write_text(json.dumps(float_shapes(path)))
                flower = subprocess.run([args.flower_python, "-c", FLOWER, str(shapes), str(WORKERS)], capture_output=True,
                                        text=True, timeout=1800)
                if flower.returncode != 0:
                    raise SystemExit(f"Flower's aggregation failed:\n{flower.stderr}")
                r.update(json.loads(flower.stdout.strip().splitlines()[-1]))
            results.append(r)
            print(f"  {r['reportBytes'] / 1e6:8.1f} MB of reports; coordinator CPU {r['coordinatorCPUSeconds']:.2f} s = "
                  f"{r['cpuMsPerMB']:.2f} ms/MB all in; fold {r['foldMBps'] or 0:.0f} MB/s; peak RSS "
                  f"{r['coordinatorPeakRSSMiB']:.0f} MiB ({r['peakRSSOverModel']:.1f}x the model); wall {r['wallSeconds']:.1f} s"
                  + (f"; Flower {1000 * r['flowerGBps']:.0f} MB/s, numpy {1000 * r['numpyGBps']:.0f} MB/s"
                     if "flowerGBps" in r else ""), flush=True)
    pathlib.Path(args.out).write_text(json.dumps({"machine": machine.describe(), "binaries": args.binaries,
                                                  "results": results}, indent=2))


if __name__ == "__main__":
    main()
