"""Train a small-width CIFAR-style ResNet-18 on the demo data and export it to ONNX.

A fixture for the architecture-search benchmarks: a deeper network with
residual adds and projection shortcuts than examples/models/defect_cnn.onnx,
trained on the same defect images.

Run once by hand from the repository root, in the throwaway torch virtualenv
(see scripts/make_fixtures.py; torch is not a project or CI dependency):

    python3 scripts/make_demo_data.py                      # numpy only
    /tmp/torchvenv/bin/python scripts/train_resnet18_demo.py

Reads examples/data/defects_{train,test}_{x,y}.npy, trains a ~0.7M-parameter
ResNet-18 (CIFAR-style: 3x3 stem conv, stride 1, no max pool, BN, ReLU; four
stages of two BasicBlocks, conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU; stage
widths 16/32/64/128, stride 2 at the start of stages 2-4 with 1x1 conv + BN
projection shortcuts; global average pool, linear head) on CPU with the same
recipe as scripts/train_demo_model.py (AdamW + one-cycle LR, flips/rot90
augmentation; a few minutes on 2 cores), exports it with the TorchScript
exporter (opset 13, BatchNormalization kept, dynamic batch, input "input"
float32 [batch, 3, 32, 32] in [0, 1], output "logits" [batch, 4]) to
examples/models/resnet18_demo.onnx, measures the test accuracy with
onnxruntime on the exported file and writes its section of
examples/models/README.md (everything from the heading
"# Fixture model: resnet18_demo.onnx" to the end of the file is replaced; the
defect_cnn section above it is left alone).

Seeds are fixed; CPU training with the same torch version is reproducible
in practice, but byte-identical results across torch versions or machines
are not guaranteed. The committed model is the one from the recorded run.
"""

from __future__ import annotations

import datetime
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
NAME = "resnet18_demo.onnx"
SECTION = "# Fixture model: resnet18_demo.onnx"
WIDTH = 16
EPOCHS = 30
BATCH = 64
LR = 3e-3


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes=4, width=WIDTH):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),   # 32x32, no max pool
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks, c = [], widths[0]
        for stage, w in enumerate(widths):                   # 32, 16, 8, 4
            for i in range(2):
                blocks.append(BasicBlock(c, w, 2 if stage > 0 and i == 0 else 1))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of the Conv and Linear layers for one 3x32x32 sample."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += out.numel() * k
        else:
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return total


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

    model = ResNet18()
    n_params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model)
    print(f"ResNet18 (width {WIDTH}): {n_params} parameters, {macs} MACs/sample, "
          f"train {tuple(x_train.shape)}, test {x_test.shape}")

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
              f"test acc {test_acc:.4f}  ({time.time() - start:.0f} s)", flush=True)
    train_seconds = time.time() - start

    # ---- export --------------------------------------------------------
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, NAME)
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
    n_stored = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    op_counts = {op: sum(1 for n in m.graph.node if n.op_type == op) for op in ops}
    print("ONNX ops:", op_counts)

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

    holdout = None
    hx, hy = (os.path.join(DATA, f"defects_holdout_{s}.npy") for s in "xy")
    if os.path.exists(hx) and os.path.exists(hy):
        x_hold, y_hold = np.load(hx), np.load(hy)
        correct = sum(int((sess.run(None, {"input": x_hold[i:i + 1024]})[0].argmax(1)
                           == y_hold[i:i + 1024]).sum()) for i in range(0, len(x_hold), 1024))
        holdout = (correct, len(x_hold))
        print(f"onnxruntime holdout accuracy: {correct / len(x_hold):.4f} ({correct}/{len(x_hold)})")

    write_readme(path, n_params, n_stored, macs, op_counts, acc, confusion, holdout,
                 train_seconds, len(x_train), len(x_test))


def write_readme(path, n_params, n_stored, macs, op_counts, acc, confusion, holdout,
                 train_seconds, n_train, n_test) -> None:
    names = defects.CLASS_NAMES
    header = "| true \\ predicted | " + " | ".join(names) + " |"
    sep = "|---" * (len(names) + 1) + "|"
    rows = [f"| {names[i]} | " + " | ".join(str(v) for v in confusion[i]) + " |" for i in range(len(names))]
    per_class = ", ".join(f"{names[i]} {confusion[i, i] / confusion[i].sum():.1%}" for i in range(len(names)))
    ops = ", ".join(f"{op} ({n})" for op, n in op_counts.items())
    holdout_text = ""
    if holdout is not None:
        c, n = holdout
        holdout_text = (f"\nOn the {n:,} holdout images (`python3 scripts/make_demo_data.py` writes them,\n"
                        f"git-ignored): **{c / n:.2%}** ({c:,}/{n:,}), onnxruntime {ort.__version__}.\n")
    text = f"""{SECTION}

A CIFAR-style ResNet-18 of small width, trained on the same defect images, as
a fixture for the architecture-search benchmarks (residual adds, projection
shortcuts and four stages give the search more structure than `defect_cnn`).

- File: `{NAME}` ({os.path.getsize(path)} bytes), opset 13,
  exported by PyTorch {torch.__version__} (TorchScript exporter, BatchNormalization kept),
  {datetime.date.today().isoformat()}.
- Input: `input`, float32 `[batch, 3, 32, 32]`, values in [0, 1] (no extra normalisation).
- Output: `logits`, float32 `[batch, 4]` (no softmax).
- Architecture: 3x3 stem conv ({WIDTH} channels, stride 1, no max pool) + BN + ReLU;
  four stages of two BasicBlocks (conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU)
  with {WIDTH}/{2 * WIDTH}/{4 * WIDTH}/{8 * WIDTH} channels at 32/16/8/4 px, stride 2 and a
  1x1 conv + BN projection shortcut at the start of stages 2-4;
  GlobalAveragePool, Flatten, Gemm; {n_params} trainable parameters,
  {macs:,} MACs per sample (Conv + Gemm multiply-accumulates).
- ONNX op types (node counts): {ops}.
  The Identity nodes are the exporter's: it stores equal initializers once, and
  each projection-shortcut BatchNorm's bias equals its block's bn2 bias (both
  start at zero and get the same gradient through the Add), so the shortcut
  BatchNorm reads it through an Identity. `coordinator model inspect` counts
  {n_stored:,} stored parameters (BatchNorm running statistics included, the
  shared biases once).
- Training: {n_train} generated training images, {EPOCHS} epochs, AdamW + one-cycle LR
  (max {LR:g}), batch {BATCH}, flips/rot90 augmentation, CPU; this run took
  {train_seconds:.0f} s wall-clock on a 2-core machine (about 8 s per epoch, 4 minutes
  in all, when the machine is otherwise idle).

## Test accuracy

Measured with onnxruntime {ort.__version__} (CPU) on the exported file, on the
{n_test} committed test images (`examples/data/defects_test_*.npy`):

**{acc:.2%}** ({int(np.trace(confusion))}/{n_test}); per class: {per_class}.

{header}
{sep}
{chr(10).join(rows)}
{holdout_text}
## Reproducing

```
python3 scripts/make_demo_data.py                         # numpy only
/tmp/torchvenv/bin/python scripts/train_resnet18_demo.py  # needs torch, onnx, onnxruntime
```

This was run once by hand; the model file is committed. torch is not a
dependency of the project or of CI.
"""
    readme = os.path.join(OUT, "README.md")
    old = open(readme).read() if os.path.exists(readme) else ""
    cut = old.find(SECTION)
    head = (old if cut < 0 else old[:cut]).rstrip("\n")
    with open(readme, "w") as f:
        f.write((head + "\n\n" if head else "") + text)
    print("wrote", readme)


if __name__ == "__main__":
    main()
