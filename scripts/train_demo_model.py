"""Train the small defect-classifier CNN and export it to ONNX.

Run once by hand from the repository root, in the throwaway torch virtualenv
(see scripts/make_fixtures.py; torch is not a project or CI dependency):

    python3 scripts/make_demo_data.py                      # numpy only
    /tmp/torchvenv/bin/python scripts/train_demo_model.py

Reads examples/data/defects_{train,test}_{x,y}.npy, trains a ~70k-parameter
CNN (conv-BN-ReLU blocks, global average pool, linear head) on CPU for a few
epochs (about a minute on 2 cores), exports it with the TorchScript exporter
(opset 13, BatchNormalization kept, dynamic batch, input "input" float32
[batch, 3, 32, 32] in [0, 1], output "logits" [batch, 4]) to
examples/models/defect_cnn.onnx, measures the test accuracy with onnxruntime
on the exported file and writes examples/models/README.md.

Seeds are fixed; CPU training with the same torch version is reproducible
in practice, but byte-identical results across torch versions or machines
are not guaranteed. The committed model is the one from the recorded run.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import defects  # noqa: E402

DATA = os.path.join("examples", "data")
OUT = os.path.join("examples", "models")
EPOCHS = 25
BATCH = 64
LR = 3e-3


def block(c_in, c_out, stride=1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DefectCNN(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(
            block(3, 16),          # 32x32
            block(16, 32, 2),      # 16x16
            block(32, 32),
            block(32, 64, 2),      # 8x8
            block(64, 64),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations: defects have no orientation."""
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(3)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(2)
    k = int(torch.randint(0, 4, (1,), generator=gen).item())
    return torch.rot90(x, k, (2, 3)) if k else x


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)

    x_train = torch.from_numpy(np.load(os.path.join(DATA, "defects_train_x.npy")))
    y_train = torch.from_numpy(np.load(os.path.join(DATA, "defects_train_y.npy")))
    x_test = np.load(os.path.join(DATA, "defects_test_x.npy"))
    y_test = np.load(os.path.join(DATA, "defects_test_y.npy"))

    model = DefectCNN()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"DefectCNN: {n_params} parameters, train {tuple(x_train.shape)}, test {x_test.shape}")

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    steps = EPOCHS * ((len(x_train) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    start = time.time()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(perm), BATCH):
            idx = perm[i:i + BATCH]
            xb, yb = augment(x_train[idx], gen), y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            total += len(idx)
        model.eval()
        with torch.no_grad():
            test_acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
        print(f"epoch {epoch + 1:2d}: loss {loss_sum / total:.4f}  train acc {correct / total:.4f}  "
              f"test acc {test_acc:.4f}  ({time.time() - start:.0f} s)")
    train_seconds = time.time() - start

    # ---- export --------------------------------------------------------
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "defect_cnn.onnx")
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.from_numpy(x_test[:2]),), path,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=13, dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        )
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    ops = sorted({n.op_type for n in m.graph.node})

    # ---- evaluate the exported file with onnxruntime --------------------
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x_test})[0]
    pred = logits.argmax(1)
    acc = float((pred == y_test).mean())
    k = len(defects.CLASS_NAMES)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_test, pred), 1)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    diff = float(np.abs(torch_logits - logits).max())
    print(f"onnxruntime {ort.__version__} test accuracy on {path}: {acc:.4f}  (max |torch - ort| {diff:.2g})")
    print("confusion (rows true, cols predicted):\n", confusion)

    write_readme(path, n_params, ops, acc, confusion, train_seconds, len(x_train), len(x_test))


def write_readme(path, n_params, ops, acc, confusion, train_seconds, n_train, n_test) -> None:
    names = defects.CLASS_NAMES
    header = "| true \\ predicted | " + " | ".join(names) + " |"
    sep = "|---" * (len(names) + 1) + "|"
    rows = [f"| {names[i]} | " + " | ".join(str(v) for v in confusion[i]) + " |" for i in range(len(names))]
    per_class = ", ".join(f"{names[i]} {confusion[i, i] / confusion[i].sum():.1%}" for i in range(len(names)))
    text = f"""# Demo model: defect_cnn.onnx

A small CNN that classifies 3x32x32 surface-inspection crops
(see `examples/data/README.md`) into 0 ok, 1 scratch, 2 spot, 3 crack.

- File: `defect_cnn.onnx` ({os.path.getsize(path)} bytes), opset 13,
  exported by PyTorch {torch.__version__} (TorchScript exporter, BatchNormalization kept).
- Input: `input`, float32 `[batch, 3, 32, 32]`, values in [0, 1] (no extra normalisation).
- Output: `logits`, float32 `[batch, 4]` (no softmax).
- Architecture: five conv3x3-BN-ReLU blocks (16, 32/s2, 32, 64/s2, 64 channels),
  GlobalAveragePool, Flatten, Gemm; {n_params} parameters.
- ONNX op types: {", ".join(ops)}.
- Training: {n_train} generated training images, {EPOCHS} epochs, AdamW + one-cycle LR,
  batch {BATCH}, flips/rot90 augmentation, CPU; this run took {train_seconds:.0f} s wall-clock
  on a 2-core machine (about 100 s when the machine is otherwise idle).

## Test accuracy

Measured with onnxruntime {ort.__version__} (CPU) on the exported file, on the
{n_test} committed test images (`examples/data/defects_test_*.npy`):

**{acc:.2%}** ({int(np.trace(confusion))}/{n_test}); per class: {per_class}.

{header}
{sep}
{chr(10).join(rows)}

## Reproducing

```
python3 scripts/make_demo_data.py                       # numpy only
/tmp/torchvenv/bin/python scripts/train_demo_model.py   # needs torch, onnx, onnxruntime
```

This was run once by hand; the model file is committed. torch is not a
dependency of the project or of CI.
"""
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(text)
    print("wrote", os.path.join(OUT, "README.md"))


if __name__ == "__main__":
    main()
