"""How much `--prune-ratio 0.3` removes from torchvision's transformers at their real sizes (issue 16: at least 1.3x
fewer MACs), where the zoo's shrunk copies cannot say: the zoo's ViT has two heads per layer, and one head is
50 %, so at 0.3 it can only lose feed-forward neurons.

Run from the repository root after building Whittle in release mode, with a Python that has torch and torchvision
(a throwaway venv; the models are exported once into benchmarks/models/, git-ignored):

    swift build -c release --product coordinator
    /path/to/venv/bin/python benchmarks/full_size_pruning.py [--models vit_b_16 convnext_tiny] [--ratio 0.3]

Each model is exported by torch.onnx.export (TorchScript exporter, opset 17, eval mode, random weights, dynamic
batch), compressed with `coordinator model compress --prune-ratio R` (l1 importance, local scope; calibration on
four random images), and checked in onnxruntime (same output shape). Prints MACs before and after, the ratio, the
parameters, and which groups were kept whole; writes benchmarks/last-full-size-pruning.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "benchmarks" / "models"
COORDINATOR = ROOT / ".build" / "release" / "coordinator"


def export(name: str) -> pathlib.Path:
    path = MODELS / f"{name}_224.onnx"
    if path.exists():
        return path
    import torch
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    MODELS.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(path), opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["vit_b_16", "convnext_tiny"])
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()
    print(machine.banner())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = pathlib.Path(tmp) / "calibration.npy"
        np.save(calibration, np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32))
        for name in args.models:
            source = export(name)
            out, report = pathlib.Path(tmp) / f"{name}.onnx", pathlib.Path(tmp) / f"{name}.json"
            subprocess.run([str(COORDINATOR), "model", "compress", str(source), "--calibration-data", str(calibration),
                            "--prune-ratio", str(args.ratio), "--out", str(out), "--report", str(report)],
                           check=True, stdout=subprocess.DEVNULL)
            r = json.loads(report.read_text())
            import onnxruntime as ort
            x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
            shape = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].shape
            before, after = r["before"]["macs"], r["after"]["macs"]
            frozen = [f"{g['group']}: {g['reason']}" for g in (r.get("pruning") or {}).get("frozen", [])]
            row = {"model": name, "ratio": args.ratio, "macsBefore": before, "macsAfter": after,
                   "macsRatio": round(before / after, 3), "parametersBefore": r["before"]["parameters"],
                   "parametersAfter": r["after"]["parameters"], "onnxruntimeOutputShape": list(shape),
                   "keptWhole": len(frozen)}
            results.append(row)
            print(f"{name}: MACs {before / 1e9:.2f} G -> {after / 1e9:.2f} G ({before / after:.2f}x), parameters "
                  f"{r['before']['parameters'] / 1e6:.1f} M -> {r['after']['parameters'] / 1e6:.1f} M, onnxruntime output {shape}, "
                  f"{len(frozen)} groups kept whole")
    (ROOT / "benchmarks" / "last-full-size-pruning.json").write_text(
        json.dumps({"machine": machine.describe(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
