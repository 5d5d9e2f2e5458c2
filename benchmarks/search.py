"""Architecture search against uniform pruning at the same MACs (issue 19's first goal), on one machine.

For each pruning ratio (0.75 and 0.85 by default), uniform L1 pruning (`model compress --prune-ratio R --prune-scope
local`, every group keeping the same share of its channels) sets a MACs budget; `model search --macs-budget` then
searches channel widths per group under exactly that budget. Both get the same fine-tuning (epochs, learning rate,
optimizer, data, seed), and both are judged by onnxruntime on the 16,384 holdout images no step ever saw.

    swift build -c release --product coordinator
    python3 scripts/make_demo_data.py         # the train and holdout splits (git-ignored)
    python3 benchmarks/search.py [--ratios 0.75 0.85] [--epochs 5] [--candidates 160] [--seed 0] [--spread 0]
                                 [--model examples/models/resnet18_demo.onnx] [--skip-blocks]

Prints one line per method and ratio, the accuracy difference, and how long the search took against the
fine-tuning that follows it; writes benchmarks/last-search.json (last-search-<model>.json for another model than
the demo CNN; `--skip-blocks` lets the search skip residual blocks).
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from rounds_support import MODEL, load_holdout_split, load_test_split, load_train_split, onnx_accuracy  # noqa: E402
import machine  # noqa: E402

COORDINATOR = ROOT / ".build" / "release" / "coordinator"
GOAL_POINTS = 1.0
# Images that score candidates (and re-estimate batch norm) in the search, from the training split.
SEARCH_IMAGES = 1024


def coordinator(*args, timeout=7200):
    began = time.monotonic()
    done = subprocess.run([str(COORDINATOR), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"coordinator {' '.join(map(str, args[:3]))} … failed:\n{done.stderr[-3000:]}")
    return done, time.monotonic() - began


def prepare(d, args, x, y, hx, hy):
    """Writes the training images, SEARCH_IMAGES of them (drawn with --seed) that score candidates, and the 512 test
    images the finalists are compared on (not the holdout) into `d`; returns the base model's holdout accuracy and the
    fine-tuning flags both methods share."""
    np.save(d / "train_x.npy", x)
    np.save(d / "train_y.npy", y)
    pick = np.random.default_rng(args.seed).permutation(len(x))[:SEARCH_IMAGES]
    np.save(d / "search_x.npy", x[pick])
    np.save(d / "search_y.npy", y[pick])
    tx, ty = load_test_split()
    np.save(d / "val_x.npy", tx)
    np.save(d / "val_y.npy", ty)
    base_accuracy = onnx_accuracy(args.model, hx, hy)
    print(f"base model {pathlib.Path(args.model).name}: {100 * base_accuracy:.2f} % on {len(hx)} holdout images")
    return base_accuracy, ["--finetune-epochs", args.epochs, "--train-data", d / "train_x.npy", "--train-labels",
                           d / "train_y.npy", "--lr", args.lr, "--seed", args.seed, "--batch-size", 32]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.85])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--candidates", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spread", type=float, default=0.0, help="model search --spread (0: no bound)")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--skip-blocks", action="store_true", help="model search --skip-blocks")
    parser.add_argument("--finalists", type=int, default=None, help="model search --finalists (default: its default)")
    parser.add_argument("--finalist-epochs", type=int, default=None, help="model search --finalist-epochs (default: its default)")
    args = parser.parse_args()
    print(machine.banner())
    x, y = load_train_split()
    hx, hy = load_holdout_split()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp)
        base_accuracy, finetune = prepare(d, args, x, y, hx, hy)
        for ratio in args.ratios:
            uniform_out, uniform_report = d / f"uniform_{ratio}.onnx", d / f"uniform_{ratio}.json"
            _, uniform_seconds = coordinator(
                "model", "compress", args.model, "--calibration-data", d / "search_x.npy", "--labels", d / "search_y.npy",
                "--prune-ratio", ratio, "--prune-scope", "local", "--importance", "l1", *finetune,
                "--out", uniform_out, "--report", uniform_report)
            uniform = json.loads(uniform_report.read_text())
            macs = uniform["after"]["macs"]
            search_out, search_report = d / f"search_{ratio}.onnx", d / f"search_{ratio}.json"
            _, search_seconds = coordinator(
                "model", "search", args.model, "--calibration-data", d / "search_x.npy", "--labels", d / "search_y.npy",
                "--macs-budget", macs, "--candidates", args.candidates, "--spread", args.spread,
                *(["--skip-blocks"] if args.skip_blocks else []),
                *(["--finalists", args.finalists] if args.finalists is not None else []),
                *(["--finalist-epochs", args.finalist_epochs] if args.finalist_epochs is not None else []),
                "--val-data", d / "val_x.npy", "--val-labels", d / "val_y.npy", *finetune,
                "--out", search_out, "--report", search_report)
            searched = json.loads(search_report.read_text())
            ua, sa = onnx_accuracy(uniform_out, hx, hy), onnx_accuracy(search_out, hx, hy)
            row = {
                "ratio": ratio, "budget_macs": macs, "base_macs": searched["base"]["macs"],
                "uniform": {"accuracy": ua, "macs": macs, "seconds": uniform_seconds},
                "search": {"accuracy": sa, "macs": searched["chosen"]["macs"], "seconds": search_seconds,
                           "search_seconds": searched["seconds"]["search"], "candidates": searched["evaluations"],
                           "widths": searched["chosen"]["widths"], "front": len(searched["front"]),
                           "finalists": [{"macs": f["macs"], "accuracy": f.get("accuracy"), "loss": f.get("loss")}
                                         for f in searched.get("finalists", [])]},
                "points": 100 * (sa - ua),
            }
            results.append(row)
            finetune_seconds = search_seconds - searched["seconds"]["search"]
            print(f"ratio {ratio}: budget {macs} MACs ({100 * macs / searched['base']['macs']:.1f} % of the base)")
            print(f"  uniform L1   {100 * ua:6.2f} %  {macs} MACs")
            skipped = sorted(k for k, v in searched["chosen"]["widths"].items() if v == 0)
            if skipped:
                print(f"  search skips {len(skipped)} residual block(s): {', '.join(skipped)}")
            print(f"  search       {100 * sa:6.2f} %  {searched['chosen']['macs']} MACs  "
                  f"({searched['evaluations']} candidates, search {searched['seconds']['search']:.1f} s, "
                  f"then fine-tuning and the rest {finetune_seconds:.1f} s)")
            print(f"  difference   {row['points']:+.2f} points (goal ≥ +{GOAL_POINTS:.1f})")
    met = all(r["points"] >= GOAL_POINTS for r in results)
    print("verdict:", "met" if met else "not met", f"(search ≥ uniform + {GOAL_POINTS} points at every ratio)")
    stem = pathlib.Path(args.model).stem
    out = "last-search.json" if pathlib.Path(args.model).resolve() == MODEL.resolve() else f"last-search-{stem}.json"
    (ROOT / "benchmarks" / out).write_text(json.dumps(
        {"machine": machine.describe(), "date": time.strftime("%Y-%m-%d"), "model": stem, "skip_blocks": args.skip_blocks,
         "finalists": args.finalists, "finalist_epochs": args.finalist_epochs, "epochs": args.epochs, "lr": args.lr,
         "seed": args.seed, "spread": args.spread, "candidates": args.candidates, "base_accuracy": base_accuracy, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
