"""Build the benchmark models with onnx.helper (numpy + onnx only, no torch).

Run from the repository root:

    python3 benchmarks/make_models.py                 # writes benchmarks/models/
    python3 benchmarks/make_models.py /some/other/dir

Writes two full-width CIFAR-style models with random He-initialised weights
(fixed seed, so every run produces byte-identical files), opset 13, a dynamic
batch dimension, input "input" float32 [batch, 3, 32, 32] and output "logits"
float32 [batch, 10]. BatchNormalization nodes are kept (not folded):

    resnet18_cifar.onnx     ResNet-18: 3x3 stem conv 64 (stride 1, no max pool),
                            stages 64/128/256/512 with 2 BasicBlocks each
                            (1x1 conv + BN projection shortcut where the shape
                            changes), GlobalAveragePool, Flatten, Gemm -> 10.
    mobilenetv2_cifar.onnx  MobileNetV2, width 1.0, standard inverted-residual
                            settings (t, c, n, s) with the CIFAR strides (stem
                            and the first 24-channel stage use stride 1), ReLU6 as
                            Clip(0, 6), 1x1 conv to 1280, GlobalAveragePool,
                            Flatten, Gemm -> 10.

Each model is checked with onnx.checker (full check, shape inference) and, if
onnxruntime is installed, run once on a random batch.

benchmarks/models/ is git-ignored: the models are regenerated with this script.
It was written and first run by hand; benchmark scripts may call it themselves.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
SEED = 1234


class GraphBuilder:
    """Tiny helper that accumulates nodes and initializers with unique names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.counts: dict[str, int] = {}

    def name(self, prefix: str) -> str:
        n = self.counts.get(prefix, 0)
        self.counts[prefix] = n + 1
        return f"{prefix}_{n}"

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str | None = None, **attrs) -> str:
        node_name = self.name(prefix or op.lower())
        out = node_name + "_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=node_name, **attrs))
        return out

    # ---- layers ---------------------------------------------------------

    def conv(self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> str:
        name = self.name("conv")
        fan_in = (c_in // groups) * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(c_out, c_in // groups, k, k)).astype(np.float32)
        self.const(name + ".weight", w)
        pad = k // 2
        out = name + "_out"
        self.nodes.append(
            helper.make_node(
                "Conv", [x, name + ".weight"], [out], name=name,
                kernel_shape=[k, k], strides=[stride, stride], pads=[pad, pad, pad, pad],
                dilations=[1, 1], group=groups,
            )
        )
        return out

    def bn(self, x: str, c: int) -> str:
        name = self.name("bn")
        rng = self.rng
        self.const(name + ".scale", rng.uniform(0.8, 1.2, c).astype(np.float32))
        self.const(name + ".bias", rng.normal(0.0, 0.05, c).astype(np.float32))
        self.const(name + ".mean", rng.normal(0.0, 0.05, c).astype(np.float32))
        self.const(name + ".var", rng.uniform(0.8, 1.2, c).astype(np.float32))
        out = name + "_out"
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x, name + ".scale", name + ".bias", name + ".mean", name + ".var"],
                [out], name=name, epsilon=1e-5, momentum=0.9,
            )
        )
        return out

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def relu6(self, x: str) -> str:
        if "clip.min" not in self.counts:
            self.counts["clip.min"] = 1
            self.const("clip.min", np.array(0.0, np.float32))
            self.const("clip.max", np.array(6.0, np.float32))
        return self.node("Clip", [x, "clip.min", "clip.max"])

    def head(self, x: str, c: int, classes: int) -> str:
        x = self.node("GlobalAveragePool", [x])
        x = self.node("Flatten", [x], axis=1)
        w = self.rng.normal(0.0, np.sqrt(1.0 / c), size=(classes, c)).astype(np.float32)
        self.const("fc.weight", w)
        self.const("fc.bias", np.zeros(classes, np.float32))
        out = "logits"
        self.nodes.append(helper.make_node("Gemm", [x, "fc.weight", "fc.bias"], [out], name="fc", transB=1))
        return out

    def model(self, graph_name: str, output: str, classes: int) -> onnx.ModelProto:
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", classes])
        graph = helper.make_graph(self.nodes, graph_name, [inp], [out], self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="whittle-benchmarks")
        m.ir_version = 8  # readable by onnxruntime >= 1.11
        return m


def resnet18(classes: int = 10) -> onnx.ModelProto:
    g = GraphBuilder(SEED)
    x = g.relu(g.bn(g.conv("input", 3, 64, 3), 64))
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            y = g.relu(g.bn(g.conv(x, c_in, c_out, 3, s), c_out))
            y = g.bn(g.conv(y, c_out, c_out, 3, 1), c_out)
            if s != 1 or c_in != c_out:
                shortcut = g.bn(g.conv(x, c_in, c_out, 1, s), c_out)
            else:
                shortcut = x
            x = g.relu(g.node("Add", [y, shortcut]))
            c_in = c_out
    out = g.head(x, c_in, classes)
    return g.model("resnet18_cifar", out, classes)


# MobileNetV2 inverted-residual settings: expansion t, channels c, repeats n, stride s.
# The ImageNet network uses stride 2 for the 24-channel stage and the stem; on
# 32x32 CIFAR inputs both are stride 1 (as in the common CIFAR ports).
MOBILENETV2_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def mobilenetv2(classes: int = 10) -> onnx.ModelProto:
    g = GraphBuilder(SEED + 1)
    x = g.relu6(g.bn(g.conv("input", 3, 32, 3, 1), 32))
    c_in = 32
    for t, c, n, s in MOBILENETV2_SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = c_in * t
            y = x
            if t != 1:
                y = g.relu6(g.bn(g.conv(y, c_in, hidden, 1), hidden))
            y = g.relu6(g.bn(g.conv(y, hidden, hidden, 3, stride, groups=hidden), hidden))
            y = g.bn(g.conv(y, hidden, c, 1), c)
            if stride == 1 and c_in == c:
                y = g.node("Add", [x, y])
            x = y
            c_in = c
    x = g.relu6(g.bn(g.conv(x, c_in, 1280, 1), 1280))
    out = g.head(x, 1280, classes)
    return g.model("mobilenetv2_cifar", out, classes)


def check_and_run(path: str) -> None:
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    ops = sorted({n.op_type for n in model.graph.node})
    print(f"{path}: {os.path.getsize(path)} bytes, {n_params} parameters, {len(model.graph.node)} nodes, ops {ops}")
    try:
        import onnxruntime as ort
    except ImportError:
        print("  onnxruntime not installed: skipped the test run")
        return
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (y,) = sess.run(None, {"input": x})
    assert y.shape == (2, 10) and np.all(np.isfinite(y)), y
    print(f"  onnxruntime {ort.__version__}: output {y.shape}, |y| max {np.abs(y).max():.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for name, build in (("resnet18_cifar", resnet18), ("mobilenetv2_cifar", mobilenetv2)):
        path = os.path.join(args.out_dir, name + ".onnx")
        onnx.save_model(build(), path)
        check_and_run(path)


if __name__ == "__main__":
    main()
