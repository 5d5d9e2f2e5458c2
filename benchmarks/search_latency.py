"""Architecture search under a latency budget against uniform pruning at the same measured latency (issue 19's
second goal, on one machine).

For each pruning ratio, uniform L1 pruning (`model compress --prune-ratio R --prune-scope local`) is fine-tuned and
timed on this machine (`model bench`, batch 32 by default, float). `model search --latency-budget` then searches per-group
widths under exactly that latency, from a latency table measured once on this machine (kept in a file and reused
by every ratio), and gets the same fine-tuning. Both models are timed again, alternately, the same way, and judged by
onnxruntime on the 16,384 holdout images no step ever saw. The latency table's predictions are compared with the
end-to-end times the search measured (finalists, uniform and chosen architectures).

    swift build -c release --product coordinator
    python3 scripts/make_demo_data.py         # the train and holdout splits (git-ignored)
    python3 benchmarks/search_latency.py [--ratios 0.5 0.75] [--epochs 5] [--seed 0]

Writes benchmarks/last-search-latency.json.
"""
import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Tests" / "interop"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from rounds_support import MODEL, load_holdout_split, load_train_split, onnx_accuracy  # noqa: E402
from search import coordinator, prepare  # noqa: E402
import machine  # noqa: E402

GOAL_POINTS = 1.0
# Two models are at "the same latency" when their medians differ by at most this share.
SAME_LATENCY = 0.05
# model bench invocations per model (alternating) and passes per invocation.
BENCH_ROUNDS = 7
BENCH_ITERATIONS = 300


def bench(models, batch):
    """Median over BENCH_ROUNDS alternating `model bench` invocations of each model's milliseconds per pass."""
    times = {m: [] for m in models}
    for _ in range(BENCH_ROUNDS):
        for m in models:
            done, _ = coordinator("model", "bench", m, "--batch-size", batch, "--iterations", BENCH_ITERATIONS, "--warmup", 20, "--json")
            times[m].append(json.loads(done.stdout)["millisecondsPerBatch"])
    return {m: statistics.median(t) for m, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--candidates", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32, help="batch size the latency is measured at (the rounds' working batch)")
    parser.add_argument("--model", default=str(MODEL))
    args = parser.parse_args()
    print(machine.banner())
    x, y = load_train_split()
    hx, hy = load_holdout_split()
    results, errors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp)
        base_accuracy, finetune = prepare(d, args, x, y, hx, hy)
        table = d / "latency-table.json"
        for ratio in args.ratios:
            uniform_out, uniform_report = d / f"uniform_{ratio}.onnx", d / f"uniform_{ratio}.json"
            coordinator("model", "compress", args.model, "--calibration-data", d / "search_x.npy", "--labels", d / "search_y.npy",
                        "--prune-ratio", ratio, "--prune-scope", "local", "--importance", "l1", *finetune,
                        "--out", uniform_out, "--report", uniform_report)
            # The budget: uniform's share of the original's time, both timed together now; the search re-measures
            # the original when it starts and takes that share of it (the machine's speed may drift in between).
            first = bench([args.model, uniform_out], args.batch)
            share = first[uniform_out] / first[args.model]
            budget = first[uniform_out]
            search_out, search_report = d / f"search_{ratio}.onnx", d / f"search_{ratio}.json"
            _, search_seconds = coordinator(
                "model", "search", args.model, "--calibration-data", d / "search_x.npy", "--labels", d / "search_y.npy",
                "--latency-budget", f"{100 * share:.3f}%", "--latency-batch", args.batch, "--latency-table", table, "--candidates", args.candidates,
                "--val-data", d / "val_x.npy", "--val-labels", d / "val_y.npy", *finetune,
                "--out", search_out, "--report", search_report)
            searched = json.loads(search_report.read_text())
            lat = searched["latency"]
            for f in searched["finalists"]:
                errors.append(f["predictedMs"] / f["measuredMs"] - 1)
            errors.append(lat["chosenPredictedMs"] / lat["chosenMeasuredMs"] - 1)
            timed = bench([uniform_out, search_out], args.batch)
            lu, ls = timed[uniform_out], timed[search_out]
            ua, sa = onnx_accuracy(uniform_out, hx, hy), onnx_accuracy(search_out, hx, hy)
            same = abs(ls / lu - 1) <= SAME_LATENCY
            row = {
                "ratio": ratio, "budget_share": share, "budget_ms": searched["budget"]["latencyMs"],
                "uniform": {"accuracy": ua, "ms": lu, "macs": json.loads(uniform_report.read_text())["after"]["macs"]},
                "search": {"accuracy": sa, "ms": ls, "macs": searched["chosen"]["macs"], "predicted_ms": lat["chosenPredictedMs"],
                           "search_seconds": searched["seconds"]["search"], "seconds": search_seconds,
                           "table_seconds": lat["tableSeconds"], "table_cached": lat["cached"], "widths": searched["chosen"]["widths"]},
                "points": 100 * (sa - ua), "same_latency": same, "speedup": lu / ls,
            }
            results.append(row)
            print(f"ratio {ratio}: uniform L1 measured at {100 * share:.1f} % of the original's time ({budget:.4f} of "
                  f"{first[args.model]:.4f} ms) → latency budget {100 * share:.1f} % (the search's budget: {searched['budget']['latencyMs']:.4f} ms)")
            print(f"  uniform L1   {100 * ua:6.2f} %  {lu:.4f} ms  {row['uniform']['macs']} MACs")
            made = "reused" if lat["cached"] else f"measured in {lat['tableSeconds']:.1f} s"
            print(f"  search       {100 * sa:6.2f} %  {ls:.4f} ms  {searched['chosen']['macs']} MACs  "
                  f"(predicted {lat['chosenPredictedMs']:.4f} ms; table {made}; search {searched['seconds']['search']:.1f} s)")
            print(f"  difference   {row['points']:+.2f} points at {100 * (ls / lu - 1):+.1f} % latency "
                  f"({'same latency' if same else 'latency differs by more than 5 %'}; goal ≥ +{GOAL_POINTS:.1f} points)")
    abs_errors = [abs(e) for e in errors]
    print(f"latency prediction against end-to-end measurement ({len(errors)} models): median error "
          f"{100 * statistics.median(abs_errors):.1f} %, largest {100 * max(abs_errors):.1f} %")
    met = all(r["points"] >= GOAL_POINTS and r["same_latency"] for r in results)
    print("verdict:", "met" if met else "not met", f"(search ≥ uniform + {GOAL_POINTS} points at the same latency, every ratio)")
    (ROOT / "benchmarks" / "last-search-latency.json").write_text(json.dumps(
        {"machine": machine.describe(), "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs, "lr": args.lr,
         "seed": args.seed, "batch": args.batch, "candidates": args.candidates, "base_accuracy": base_accuracy,
         "prediction_errors": errors, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
