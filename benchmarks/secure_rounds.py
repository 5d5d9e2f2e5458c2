"""Secure aggregation and differential privacy in federated rounds (issue 20), on loopback with real processes.

Runs the same 8-worker round (50 % Taylor pruning, fine-tuning rounds with distillation, int8 entropy calibration under
a public range, a fixed clip norm) four times on fresh fleets of a real coordinator and real `worker run` processes
(release builds, one compute thread each, mutual TLS):
  clear    the round in the clear;
  secure   --secure-aggregation (the coordinator sees only sums);
  dp-8     --secure-aggregation --dp-epsilon 8 (δ = 1e-5, per site, over the round's training sums);
  dp-1     --secure-aggregation --dp-epsilon 1.
and prints wall time, coordinator and worker CPU, bytes per report, and accuracy on the 16,384 holdout images, with
the ratios of the secure round to the clear one (issue 20's goal: at most 2x wall time and coordinator CPU).

    swift build -c release --product coordinator && swift build -c release --product worker
    python3 benchmarks/secure_rounds.py [--finetune-rounds 10] [--clip-norm 1]

Writes benchmarks/last-secure-rounds.json.
"""
import argparse
import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402
from rounds import ROOT, run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--samples", type=int, default=500, help="training images per worker")
    parser.add_argument("--finetune-rounds", default="10")
    parser.add_argument("--clip-norm", default="1")
    parser.add_argument("--only", nargs="*", help="run only these of clear, secure, dp-8, dp-1")
    args = parser.parse_args()
    print(machine.banner())
    recipe = ["--prune-ratio", "0.5", "--prune-scope", "local", "--importance", "taylor", "--finetune-rounds",
              args.finetune_rounds, "--local-epochs", "1", "--lr", "0.005", "--distill", "--quantize", "int8",
              "--calibration", "entropy", "--reduce-range", "--calibration-range", "64", "--clip-norm", args.clip_norm]
    secure = ["--secure-aggregation"]
    # The private rounds' models may fail the quality gate (user-level noise over few workers): it is opened so their
    # accuracy is measured rather than the round refused.
    gate = ["--min-agreement", "0", "--max-accuracy-drop", "1"]
    runs = [("clear", recipe), ("secure", recipe + secure), ("dp-8", recipe + secure + ["--dp-epsilon", "8"] + gate),
            ("dp-1", recipe + secure + ["--dp-epsilon", "1"] + gate)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in runs:
            if args.only and name not in args.only:
                continue
            folder = pathlib.Path(tmp) / name
            folder.mkdir()
            print(f"== {name}", flush=True)
            r = run(name, args.workers, args.samples, plan, folder, holdout=True)
            results[name] = r
            summed = [p for p in r["phases"] if p["label"].startswith(("finetune", "qat", "ranges", "histograms"))]
            per_report = sum(p["bytesUp"] for p in summed) / max(sum(p["reports"] for p in summed), 1)
            r["summedBytesPerReport"] = per_report
            privacy = r.get("privacy") or {}
            print(f"  wall {r['wallSeconds']:.1f} s; coordinator CPU {r['coordinatorCPUSeconds']:.2f} s "
                  f"({r['coordinatorCPUPerReportMs']:.1f} ms/report over {r['reports']} reports); worker CPU "
                  f"{r['workerCPUSeconds']:.1f} s; {per_report / 1024:.1f} KiB per summed report; holdout accuracy "
                  f"{100 * r['holdoutBefore']:.2f} % -> {100 * r['holdoutAfter']:.2f} %"
                  + (f"; epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:g}, noise multiplier "
                     f"{privacy['noiseMultiplier']:.3f}" if privacy else ""), flush=True)
    if "clear" in results and "secure" in results:
        a, b = results["clear"], results["secure"]
        print(f"secure against clear: wall {b['wallSeconds'] / a['wallSeconds']:.2f}x, coordinator CPU "
              f"{b['coordinatorCPUSeconds'] / a['coordinatorCPUSeconds']:.2f}x, worker CPU "
              f"{b['workerCPUSeconds'] / a['workerCPUSeconds']:.2f}x, bytes per summed report "
              f"{b['summedBytesPerReport'] / a['summedBytesPerReport']:.2f}x, holdout accuracy "
              f"{100 * (b['holdoutAfter'] - a['holdoutAfter']):+.2f} points")
    for name in ("dp-8", "dp-1"):
        if name in results and "clear" in results:
            print(f"{name}: holdout accuracy {100 * results[name]['holdoutAfter']:.2f} % "
                  f"({100 * (results[name]['holdoutAfter'] - results['clear']['holdoutAfter']):+.2f} points against the clear round)")
    (ROOT / "benchmarks" / "last-secure-rounds.json").write_text(json.dumps({"machine": machine.describe(), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
