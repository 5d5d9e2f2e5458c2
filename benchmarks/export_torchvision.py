"""Export a torchvision classifier (random weights, eval mode) to benchmarks/models/NAME_SIZE.onnx for the benchmarks
that take a --model, with a Python that has torch and torchvision (a throwaway venv):

    /path/to/venv/bin/python benchmarks/export_torchvision.py mobilenet_v2 32    # benchmarks/models/mobilenet_v2_32.onnx

TorchScript exporter, opset 17, input "input" [batch, 3, SIZE, SIZE], output "logits" [batch, 1000], dynamic batch.
"""

import pathlib
import sys

import torch
import torchvision

ROOT = pathlib.Path(__file__).resolve().parents[1]

name, size = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = getattr(torchvision.models, name)(weights=None).eval()
path = ROOT / "benchmarks" / "models" / f"{name}_{size}.onnx"
path.parent.mkdir(parents=True, exist_ok=True)
torch.onnx.export(model, torch.randn(1, 3, size, size), str(path), opset_version=17, input_names=["input"],
                  output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
print(path)
