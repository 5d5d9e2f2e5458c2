"""Federated rounds on loopback: wall time per phase, coordinator CPU per report, bytes on the wire per worker,
coordinator memory with 8 and 64 workers, and what int8 delta compression saves and costs.

Starts a real coordinator (release build) and real `worker run` processes (release build, one compute thread each)
over mutual TLS, each with its own non-IID shard of the shipped defect-inspection images, and runs:
  A. 8 workers: 50 % Taylor pruning (local), 3 fine-tuning rounds with distillation, int8 entropy calibration;
  B. the same round with --delta-compression int8 (bytes up, accuracy against A);
  C. 64 light workers (16 images each; real processes, real protocol): 30 % l1 pruning, 1 fine-tuning round, int8.

    swift build -c release --product coordinator && swift build -c release --product worker
    python3 benchmarks/rounds.py

Prints tables and writes benchmarks/last-rounds.json.
"""
import json
import pathlib
import sys
import tempfile
import time


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Tests" / "interop"))
from rounds_support import (MODEL, load_holdout_split, load_test_split, load_train_split, loopback_fleet,  # noqa: E402
                            non_iid_shards, onnx_accuracy)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402

RELEASE = ROOT / ".build" / "release"


def cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks


def peak_rss_mib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(name, workers, per_worker, plan, directory, holdout=False, settings=None, database_cpu=None):
    """One round of `plan` on a fresh loopback fleet; its figures (and with `holdout`, the accuracy of the fetched model
    on the 16,384 holdout images). `settings`: more coordinator.conf settings (database_url); `database_cpu`: a
    function returning the database server's CPU seconds so far, measured over the round too."""
    directory = pathlib.Path(directory)
    with loopback_fleet(RELEASE, directory, heartbeat_seconds=1, enroll_rate_per_second=1000.0,
                        enroll_burst=1000, **(settings or {})) as fleet:
        server = fleet.server
        names = [f"board-{k:02d}" for k in range(workers)]
        fleet.enroll(names)
        x, y = load_train_split()
        tx, ty = load_test_split()
        shards, tests = non_iid_shards(y, workers), non_iid_shards(ty, min(workers, 8), seed=1)
        for k, n in enumerate(names):
            part = shards[k][:per_worker]
            test = tests[k % len(tests)]
            fleet.write_shard(n, x[part], y[part], tx[test], ty[test])
            fleet.start_worker(n)
        time.sleep(2)
        cpu0 = cpu_seconds(server.process.pid)
        database0 = database_cpu() if database_cpu else 0.0
        worker_cpu0 = sum(cpu_seconds(p.pid) for p in fleet.processes.values())
        began = time.monotonic()
        started = fleet.round("start", "--model", MODEL, *plan, "--min-workers", str(workers), "--json", timeout=120)
        round_id = json.loads(started.stdout)["id"]
        status = fleet.wait(round_id, timeout=3600)
        wall = time.monotonic() - began
        cpu = cpu_seconds(server.process.pid) - cpu0
        database = database_cpu() - database0 if database_cpu else None
        worker_cpu = sum(cpu_seconds(p.pid) for p in fleet.processes.values()) - worker_cpu0
        assert status["state"] == "succeeded", status
        out, report_path = directory / f"{name}.onnx", directory / f"{name}.json"
        fleet.round("fetch", round_id, "--out", out, "--report", report_path, timeout=120)
        report = json.loads(report_path.read_text())
        reports = sum(p["reports"] for p in report["phases"])
        sites = report["sites"]
        result = {
            "name": name, "workers": workers, "samplesPerWorker": per_worker, "plan": plan, "wallSeconds": wall,
            "phases": [{"label": p["label"], "seconds": p["endedAt"] - p["startedAt"], "reports": p["reports"],
                        "bytesUp": p["bytesUp"], "aggregationSeconds": p["aggregationSeconds"]} for p in report["phases"]],
            "coordinatorCPUSeconds": cpu, "reports": reports, "workerCPUSeconds": worker_cpu, "databaseCPUSeconds": database,
            "coordinatorCPUPerReportMs": 1000 * cpu / max(reports, 1),
            "aggregationPerReportMs": 1000 * sum(p["aggregationSeconds"] for p in report["phases"]) / max(reports, 1),
            "coordinatorPeakRSSMiB": peak_rss_mib(server.process.pid),
            "bytesUpPerWorker": sum(s["bytesUp"] for s in sites) / len(sites),
            "bytesDownPerWorker": sum(s["bytesDown"] for s in sites) / len(sites),
            "finetuneBytesUp": sum(p["bytesUp"] for p in report["phases"] if p["kind"] == "finetune"),
            "accuracyBefore": onnx_accuracy(MODEL, tx, ty), "accuracyAfter": onnx_accuracy(out, tx, ty),
            "bytesBefore": report["before"]["bytes"], "bytesAfter": report["after"]["bytes"],
            "privacy": report.get("privacy"), "secureAggregation": report.get("secureAggregation"),
        }
        if holdout:
            hx, hy = load_holdout_split()
            result["holdoutBefore"], result["holdoutAfter"] = onnx_accuracy(MODEL, hx, hy), onnx_accuracy(out, hx, hy)
        return result


def main():
    print(machine.banner())
    pruned = ["--prune-ratio", "0.5", "--prune-scope", "local", "--importance", "taylor", "--finetune-rounds", "3",
              "--local-epochs", "1", "--lr", "0.005", "--distill", "--quantize", "int8", "--calibration", "entropy",
              "--reduce-range", "--compact-names"]
    light = ["--prune-ratio", "0.3", "--importance", "l1", "--finetune-rounds", "1", "--quantize", "int8",
             "--calibration", "minmax", "--reduce-range"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, workers, per_worker, plan in [("A-8-workers", 8, 500, pruned),
                                                ("B-8-workers-int8-deltas", 8, 500, pruned + ["--delta-compression", "int8"]),
                                                ("C-64-light-workers", 64, 16, light)]:
            folder = pathlib.Path(tmp) / name
            folder.mkdir()
            print(f"== {name}", flush=True)
            r = run(name, workers, per_worker, plan, folder)
            results.append(r)
            for p in r["phases"]:
                print(f"  {p['label']:<32} {p['seconds']:7.1f} s  {p['reports']:3d} reports  "
                      f"{p['bytesUp'] / 1024:9.1f} KiB up  {1000 * p['aggregationSeconds']:8.1f} ms aggregation")
            print(f"  wall {r['wallSeconds']:.1f} s; coordinator CPU {r['coordinatorCPUSeconds']:.2f} s over {r['reports']} "
                  f"reports = {r['coordinatorCPUPerReportMs']:.1f} ms/report (aggregation alone "
                  f"{r['aggregationPerReportMs']:.1f} ms); peak RSS {r['coordinatorPeakRSSMiB']:.0f} MiB")
            print(f"  per worker: {r['bytesUpPerWorker'] / 1024:.1f} KiB up, {r['bytesDownPerWorker'] / 1024:.1f} KiB down; "
                  f"accuracy {r['accuracyBefore']:.4f} -> {r['accuracyAfter']:.4f}; "
                  f"{r['bytesBefore']} -> {r['bytesAfter']} bytes", flush=True)
    a, b = results[0], results[1]
    print(f"int8 deltas: fine-tuning uplink {a['finetuneBytesUp'] / 1024:.0f} -> {b['finetuneBytesUp'] / 1024:.0f} KiB "
          f"({a['finetuneBytesUp'] / max(b['finetuneBytesUp'], 1):.2f}x less), accuracy {a['accuracyAfter']:.4f} -> "
          f"{b['accuracyAfter']:.4f}")
    (ROOT / "benchmarks" / "last-rounds.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
