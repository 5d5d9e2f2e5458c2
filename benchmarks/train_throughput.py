"""Training throughput (forward + backward) of Whittle against PyTorch on the same architectures, batch and machine.

This script imports torch: run it by hand in an environment that has torch installed, for example a throwaway venv
(torch is NOT a dependency of the project, and this script is never run by CI):

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy onnx onnxruntime
    swift build -c release --product coordinator
    /tmp/torchvenv/bin/python benchmarks/train_throughput.py [--batch-size 32] [--iterations 10] [--threads 1 2]

It builds the benchmark models if they are missing (benchmarks/make_models.py: full-width CIFAR ResNet-18 and
MobileNetV2, BatchNormalization kept, random weights), then for each model and thread count measures images/s of one
training step without the optimizer update:

  PyTorch  the same architecture defined in torch below (same layers, channels, strides and CIFAR changes as
           make_models.py; ReLU6 as clamp(0, 6); weights differ, which does not matter for speed), with
           torch.set_num_threads(N), timing `model.train(); loss = F.cross_entropy(model(x), y); opt.zero_grad();
           loss.backward()` per batch;
  Whittle  `coordinator model bench MODEL --train --batch-size B --threads N --iterations K --warmup W --json`,
           reading "imagesPerSecond" from its JSON output.

Both run on a random batch (3x32x32, 10 classes) after the same number of warm-up batches; each measurement is
repeated and the best repetition is kept, to damp noise from other work on the machine. The table shows images/s for
both and the ratio Whittle / PyTorch; the rows are also written to benchmarks/last-train-throughput.json. If the
Whittle binary is missing or the command fails, the script says so and reports PyTorch alone (--pytorch-only skips
Whittle on purpose).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402


ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "benchmarks" / "models"
NAMES = ["resnet18_cifar.onnx", "mobilenetv2_cifar.onnx"]
CLASSES = 10


# ---------------------------------------------------------------------------
# the benchmark architectures in torch, mirroring benchmarks/make_models.py
# (modules are registered in the order make_models.py creates initializers, so
# the parameter shapes line up one to one with the ONNX files; see check_shapes)
# ---------------------------------------------------------------------------

def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


class ReLU6(nn.Module):
    def forward(self, x):
        return torch.clamp(x, 0.0, 6.0)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c_in, c_out, 3, stride)
        self.conv2, self.bn2 = conv_bn(c_out, c_out, 3, 1)
        self.shortcut = nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet18(nn.Module):
    """3x3 stem conv 64 (stride 1, no max pool), stages 64/128/256/512 x 2 BasicBlocks, GAP, Linear."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 64, 3), nn.ReLU())
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for block in range(2):
                blocks.append(BasicBlock(c_in, c_out, stride if block == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# (t, c, n, s) as in make_models.MOBILENETV2_SETTINGS: CIFAR strides (stem and the 24-channel stage at stride 1).
MOBILENETV2_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, t: int, stride: int):
        super().__init__()
        hidden = c_in * t
        layers: list[nn.Module] = []
        if t != 1:
            layers += [*conv_bn(c_in, hidden, 1), ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), ReLU6()]
        layers += conv_bn(hidden, c_out, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """Width 1.0, stem conv 32 stride 1, inverted residuals, 1x1 conv to 1280, ReLU6, GAP, Linear."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(3, 32, 3, 1), ReLU6()]
        c_in = 32
        for t, c, n, s in MOBILENETV2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, t, s if i == 0 else 1))
                c_in = c
        layers += [*conv_bn(c_in, 1280, 1), ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


TORCH_MODELS = {"resnet18_cifar.onnx": ResNet18, "mobilenetv2_cifar.onnx": MobileNetV2}


def check_shapes(model: nn.Module, path: pathlib.Path) -> None:
    """Parameter shapes of the torch model must equal the ONNX file's trainable initializers, in order."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        print(f"  onnx not installed: did not check {path.name} against the torch architecture")
        return
    graph = onnx.load(str(path)).graph
    theirs = [tuple(numpy_helper.to_array(t).shape) for t in graph.initializer
              if not t.name.endswith((".mean", ".var")) and not t.name.startswith("clip.")]
    ours = [tuple(p.shape) for p in model.parameters()]
    if ours != theirs:
        sys.exit(f"the torch model for {path.name} does not mirror make_models.py: "
                 f"{len(ours)} parameters vs {len(theirs)} initializers")


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------

def pytorch_images_per_second(name, batch, threads, iterations, warmup, repeats):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TORCH_MODELS[name]()
    check_shapes(model, MODELS / name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.empty(batch, 3, 32, 32).uniform_(-1, 1)
    y = torch.randint(0, CLASSES, (batch,))

    def step():
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()

    for _ in range(warmup):
        step()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        best = max(best, batch * iterations / (time.perf_counter() - start))
    return best


def whittle_images_per_second(binary, path, batch, threads, iterations, warmup, repeats):
    """Best of `repeats` runs of `coordinator model bench --train`, or None (with a message) if it fails."""
    command = [str(binary), "model", "bench", str(path), "--train", "--batch-size", str(batch), "--threads",
               str(threads), "--iterations", str(iterations), "--warmup", str(warmup), "--json"]
    best = 0.0
    for _ in range(repeats):
        result = subprocess.run(command, capture_output=True, text=True)
        try:
            if result.returncode != 0:
                raise ValueError(f"exit status {result.returncode}")
            best = max(best, float(json.loads(result.stdout)["imagesPerSecond"]))
        except (ValueError, KeyError, TypeError) as error:
            print(f"  Whittle failed ({error}): {' '.join(command)}", file=sys.stderr)
            for line in (result.stderr.strip() or result.stdout.strip()).splitlines()[-5:]:
                print(f"    {line}", file=sys.stderr)
            return None
    return best


def main():
    print(machine.banner())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--binary", default=str(ROOT / ".build" / "release" / "coordinator"))
    parser.add_argument("--pytorch-only", action="store_true", help="do not run Whittle")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # keep the table and the messages on stderr in order

    binary = pathlib.Path(args.binary)
    run_whittle = not args.pytorch_only
    if run_whittle and not binary.exists():
        print(f"{binary} is missing: run `swift build -c release --product coordinator` first; "
              "reporting PyTorch only", file=sys.stderr)
        run_whittle = False
    if not all((MODELS / n).exists() for n in NAMES):
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_models.py"), str(MODELS)], check=True)
    torch.set_num_interop_threads(1)

    print(f"PyTorch {torch.__version__}, batch {args.batch_size}, forward + backward, "
          f"{args.iterations} batches x best of {args.repeats}")
    print(f"{'model':<24}{'threads':>8}{'pytorch img/s':>16}{'whittle img/s':>16}{'ratio':>8}")
    rows = []
    for name in NAMES:
        for threads in args.threads:
            theirs = pytorch_images_per_second(name, args.batch_size, threads, args.iterations, args.warmup,
                                               args.repeats)
            ours = None
            if run_whittle:
                ours = whittle_images_per_second(binary, MODELS / name, args.batch_size, threads, args.iterations,
                                                 args.warmup, args.repeats)
                if ours is None:
                    print("  `coordinator model bench --train` failed (see above); reporting PyTorch only",
                          file=sys.stderr)
                    run_whittle = False
            ratio = ours / theirs if ours is not None else None
            rows.append({"model": name, "threads": threads, "batch": args.batch_size, "pytorch": theirs,
                         "whittle": ours, "ratio": ratio})
            ours_text = f"{ours:>16.1f}" if ours is not None else f"{'-':>16}"
            ratio_text = f"{ratio:>8.2f}" if ratio is not None else f"{'-':>8}"
            print(f"{name:<24}{threads:>8}{theirs:>16.1f}{ours_text}{ratio_text}", flush=True)
    (ROOT / "benchmarks" / "last-train-throughput.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
