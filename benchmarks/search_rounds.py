"""Architecture search on the fleet against uniform L1 pruning at the same latency (issue 19's second goal).

A real coordinator and 4 real `worker run` processes over mutual TLS (non-IID shards of the demo's training images,
as Tests/interop/test_rounds.py). For each ratio R:

1. uniform: a round that prunes every group at R (L1, local scope), then F FedAvg rounds;
2. its latency on the fleet, measured by the workers in the round's evaluation (the compressed against the base
   model at the working batch, medians, geometric mean over the sites) sets the budget: that share of the original's
   latency;
3. search: a round with `--latency-budget SHARE% --latency-batch B`: every worker builds its latency table, the
   search scores the candidates on the fleet, the fittest within the budget is cut, then the same F FedAvg rounds.
   With `--budget macs` the search round gets uniform L1's exact MACs as its budget instead (the fleet's scoring
   without the latency table); `--round-to N` keeps the search's widths multiples of N.

Both exported float models are judged by onnxruntime on the 16,384 holdout images, and their latencies as the fleet
measured them in each round's evaluation (on the same boards, minutes apart) are compared.

    swift build -c release --product coordinator && swift build -c release --product worker
    python3 scripts/make_demo_data.py
    python3 benchmarks/search_rounds.py [--ratios 0.5 0.75] [--rounds 20] [--candidates 96] [--seed 0]
                                        [--model examples/models/resnet18_demo.onnx] [--skip-blocks]
                                        [--budget latency|macs] [--round-to N]

Writes benchmarks/last-search-rounds.json (last-search-rounds-<model>.json for another model than the demo CNN).
"""
import argparse
import json
import math
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Tests" / "interop"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from rounds_support import (MODEL, load_holdout_split, load_test_split, load_train_split, loopback_fleet,  # noqa: E402
                            non_iid_shards, onnx_accuracy)
import machine  # noqa: E402

RELEASE = ROOT / ".build" / "release"
WORKERS = 4
GOAL_POINTS = 1.0
SAME_LATENCY = 0.05


def fleet_latency(report, batch):
    """Geometric means over the sites of the base's and the compressed model's median at `batch` (milliseconds)."""
    base, compressed = [], []
    for site in report["sites"]:
        for t in site.get("latency") or []:
            if t["batch"] == batch:
                base.append(t["base"]["p50Ms"])
                compressed.append(t["compressed"]["p50Ms"])
    if not base:
        raise SystemExit(f"no site timed batch {batch}")
    geo = lambda v: math.exp(sum(map(math.log, v)) / len(v))  # noqa: E731
    return geo(base), geo(compressed)


def phase_seconds(report):
    """Wall seconds of the search's phases (latency tables, generations, finalists, pick) and of the fine-tuning rounds,
    from the round report's phase timings."""
    timings = report.get("timings") or {}
    search = sum(v for k, v in timings.items() if k in ("latency", "finalists", "pick") or k.startswith("search"))
    finetune = sum(v for k, v in timings.items() if k.startswith("finetune"))
    return search, finetune


def run_round(fleet, d, model, name, *flags):
    began = time.monotonic()
    started = fleet.round("start", "--model", model, *map(str, flags), "--json", timeout=120)
    round_id = json.loads(started.stdout)["id"]
    status = fleet.wait(round_id, timeout=7200)
    if status["state"] != "succeeded":
        raise SystemExit(f"the {name} round ended {status['state']}: {status.get('message')}")
    out, report_path = d / f"{name}.onnx", d / f"{name}.json"
    fleet.round("fetch", round_id, "--out", out, "--report", report_path, timeout=120)
    return out, json.loads(report_path.read_text()), time.monotonic() - began


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=96)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="the working batch the latency is compared at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--skip-blocks", action="store_true", help="round start --skip-blocks for the search round")
    parser.add_argument("--round-to", type=int, default=1,
                        help="the search round's --round-to: kept channel counts multiples of this (the kernels' vector width)")
    parser.add_argument("--budget", choices=["latency", "macs"], default="latency",
                        help="the search round's budget: uniform L1's fleet latency share (the goal's comparison) or its exact MACs")
    args = parser.parse_args()
    print(machine.banner())
    hx, hy = load_holdout_split()
    base_accuracy = onnx_accuracy(args.model, hx, hy)
    print(f"base model: {100 * base_accuracy:.2f} % on {len(hy)} holdout images")
    common = ["--finetune-rounds", args.rounds, "--local-epochs", 1, "--lr", 0.01, "--batch-size", args.batch,
              "--quantize", "none", "--min-workers", WORKERS, "--phase-deadline", "10m", "--seed", args.seed,
              "--max-accuracy-drop", 1, "--min-agreement", 0]
    results = []
    with tempfile.TemporaryDirectory() as tmp, loopback_fleet(RELEASE, tmp, heartbeat_seconds=1) as fleet:
        d = pathlib.Path(tmp)
        names = [f"camera-{k}" for k in range(WORKERS)]
        fleet.enroll(names)
        x, y = load_train_split()
        tx, ty = load_test_split()
        for k, (part, test) in enumerate(zip(non_iid_shards(y, WORKERS), non_iid_shards(ty, WORKERS, seed=1))):
            fleet.write_shard(names[k], x[part], y[part], tx[test], ty[test])
            fleet.start_worker(names[k])
        for ratio in args.ratios:
            uniform_out, uniform, uniform_seconds = run_round(
                fleet, d, args.model, f"uniform-{ratio}", "--prune-ratio", ratio, "--prune-scope", "local", "--importance", "l1", *common)
            ub, uc = fleet_latency(uniform, args.batch)
            share = uc / ub
            search_out, searched, search_seconds = run_round(
                fleet, d, args.model, f"search-{ratio}",
                *(["--latency-budget", f"{100 * share:.3f}%", "--latency-batch", args.batch] if args.budget == "latency"
                  else ["--macs-budget", uniform["after"]["macs"]]),
                "--candidates", args.candidates, "--population", args.population,
                *(["--skip-blocks"] if args.skip_blocks else []), *(["--round-to", args.round_to] if args.round_to > 1 else []), *common)
            sb, sc = fleet_latency(searched, args.batch)
            search_phases, finetune_phases = phase_seconds(searched)
            ua, sa = onnx_accuracy(uniform_out, hx, hy), onnx_accuracy(search_out, hx, hy)
            s = searched["search"]
            # Latency against the original timed in the same evaluation: the two rounds' shares compare even if the
            # machine's speed drifted between them.
            row = {
                "ratio": ratio, "budget_share": share, "budget": args.budget, "budget_ms": s["budget"].get("latencyMs"), "budget_macs": s["budget"].get("macs"),
                "uniform": {"accuracy": ua, "macs": uniform["after"]["macs"], "fleet_ms": uc, "fleet_base_ms": ub,
                            "seconds": uniform_seconds},
                "search": {"accuracy": sa, "macs": searched["after"]["macs"], "fleet_ms": sc, "fleet_base_ms": sb,
                           "predicted_ms": s["chosen"].get("latencyMs"), "seconds": search_seconds,
                           "search_phases_seconds": search_phases, "finetune_phases_seconds": finetune_phases,
                           "widths": s["chosen"]["widths"], "board_kinds": s.get("boardKinds"),
                           "front": [{"latencyMs": p.get("latencyMs"), "macs": p["macs"], "loss": p.get("loss"),
                                      "accuracy": p.get("accuracy")} for p in s["front"]],
                           "uniform_candidate": {"latencyMs": s["uniform"].get("latencyMs"), "loss": s["uniform"].get("loss"),
                                                 "accuracy": s["uniform"].get("accuracy")}},
                "points": 100 * (sa - ua),
                "latency_ratio": (sc / sb) / (uc / ub),
            }
            row["same_latency"] = abs(row["latency_ratio"] - 1) <= SAME_LATENCY
            results.append(row)
            budget = (f"latency budget {100 * share:.1f} % ({s['budget']['latencyMs']:.4f} ms on {s['boardKinds']})" if args.budget == "latency"
                      else f"MACs budget {uniform['after']['macs']} (uniform L1's)")
            print(f"ratio {ratio}: uniform L1 runs at {100 * share:.1f} % of the original's time on the fleet "
                  f"(batch {args.batch}) → {budget}")
            print(f"  uniform L1   {100 * ua:6.2f} %  {uc:.4f} ms of {ub:.4f} ms on the fleet  {uniform['after']['macs']} MACs  "
                  f"(round {uniform_seconds:.0f} s)")
            print(f"  search       {100 * sa:6.2f} %  {sc:.4f} ms of {sb:.4f} ms on the fleet  {searched['after']['macs']} MACs  "
                  f"(predicted {s['chosen'].get('latencyMs') or 0:.4f} ms; round {search_seconds:.0f} s: search phases "
                  f"{search_phases:.0f} s, fine-tuning rounds {finetune_phases:.0f} s)")
            print(f"  difference   {row['points']:+.2f} points at {100 * (row['latency_ratio'] - 1):+.1f} % latency "
                  f"(as shares of the original timed in the same evaluation; goal ≥ +{GOAL_POINTS} at the same latency ±5 %)")
            print("  search front (predicted ms, fleet loss, fleet accuracy after adaptive batch norm): " + "; ".join(
                f"{p['latencyMs'] or 0:.3f} ms {p['macs']} MACs {p['loss']:.3f} {100 * (p['accuracy'] or 0):.1f} %" for p in row["search"]["front"]), flush=True)
    met = all(r["points"] >= GOAL_POINTS and r["same_latency"] for r in results)
    print("verdict:", "met" if met else "not met")
    stem = pathlib.Path(args.model).stem
    out = "last-search-rounds.json" if pathlib.Path(args.model).resolve() == MODEL.resolve() else f"last-search-rounds-{stem}.json"
    (ROOT / "benchmarks" / out).write_text(json.dumps(
        {"machine": machine.describe(), "date": time.strftime("%Y-%m-%d"), "model": stem, "skip_blocks": args.skip_blocks,
         "budget": args.budget, "round_to": args.round_to,
         "rounds": args.rounds, "batch": args.batch,
         "candidates": args.candidates, "seed": args.seed, "base_accuracy": base_accuracy, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
