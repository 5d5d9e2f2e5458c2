"""Forward-pass speed of Whittle against onnxruntime on real model families at their real sizes (issue 16's goals):
an ImageNet ResNet-50 at 224x224 (goal: Whittle at least 1.0x onnxruntime's throughput) and a BERT-base encoder at
sequence length 128 (goal: at least 0.8x), batch 1, at 1 and 2 threads, on the same machine in the same run.

Run from the repository root after building Whittle in release mode:

    swift build -c release --product coordinator
    python3 benchmarks/families.py [--iterations 20] [--threads 1 2] [--layers 12]

The models are built here with onnx.helper (numpy and onnx only, no torch) with random weights and a fixed seed, and
written to benchmarks/models/ (git-ignored), as PyTorch's TorchScript exporter writes these families at opset 17:

    resnet50_224.onnx   ResNet-50 v1.5 (torchvision layout): 7x7 stem, max pool, bottleneck stages (3, 4, 6, 3) with
                        widths 64/128/256/512 x4, BatchNormalization kept, GlobalAveragePool, Gemm -> 1000.
    bert_base_128.onnx  BERT-base encoder: token, position and type embeddings (Gather on int64 ids), LayerNorm,
                        12 post-norm layers of 12 heads (Q, K, V MatMul + Add, Reshape/Transpose to heads,
                        scaled scores plus the additive mask built from attention_mask, Softmax, context, output
                        projection), GELU as Erf, feed-forward 3072; the [CLS] vector through a tanh pooler.
                        Inputs input_ids and attention_mask int64 [batch, 128]; output pooled [batch, 768].

For each model and thread count it prints samples per second for both engines and the ratio, the CPU the figures
come from (benchmarks/machine.py), and writes benchmarks/last-families.json. Both engines run the same number of
timed passes after the same warm-up; each measurement is repeated three times and the best kept.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "benchmarks" / "models"
SEQUENCE = 128


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.initializers, self.count = [], [], 0

    def fresh(self, prefix):
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, array, prefix="c"):
        name = self.fresh(prefix)
        # (np.ascontiguousarray would turn a scalar into a 1-element vector.)
        self.initializers.append(numpy_helper.from_array(np.asarray(array) if np.ndim(array) == 0 else np.ascontiguousarray(array), name))
        return name

    def op(self, op, inputs, outputs=1, **attrs):
        names = [self.fresh(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=self.fresh(op), **attrs))
        return names[0] if outputs == 1 else names

    def weight(self, *shape, fan_in):
        return self.rng.normal(0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)

    # ResNet pieces
    def conv_bn(self, x, c_in, c_out, k, stride=1, relu=True):
        w = self.const(self.weight(c_out, c_in, k, k, fan_in=c_in * k * k), "w")
        y = self.op("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        params = [self.const(self.rng.uniform(0.8, 1.2, c_out).astype(np.float32)),
                  self.const(self.rng.normal(0, 0.05, c_out).astype(np.float32)),
                  self.const(self.rng.normal(0, 0.05, c_out).astype(np.float32)),
                  self.const(self.rng.uniform(0.8, 1.2, c_out).astype(np.float32))]
        y = self.op("BatchNormalization", [y] + params, epsilon=1e-5)
        return self.op("Relu", [y]) if relu else y

    # Transformer pieces
    def linear(self, x, d_in, d_out):
        y = self.op("MatMul", [x, self.const(self.weight(d_in, d_out, fan_in=d_in) * 0.5, "w")])
        return self.op("Add", [self.const(np.zeros(d_out, np.float32), "b"), y])

    def layer_norm(self, x, d):
        return self.op("LayerNormalization", [x, self.const(np.ones(d, np.float32)), self.const(np.zeros(d, np.float32))],
                       axis=-1, epsilon=1e-12)

    def model(self, name, inputs, outputs, opset):
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="whittle-benchmarks")
        m.ir_version = 8
        return m


def resnet50():
    b = Builder(50)
    x = b.conv_bn("input", 3, 64, 7, 2)
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            y = b.conv_bn(x, c_in, width, 1)
            y = b.conv_bn(y, width, width, 3, s)
            y = b.conv_bn(y, width, width * 4, 1, relu=False)
            shortcut = b.conv_bn(x, c_in, width * 4, 1, s, relu=False) if (s != 1 or c_in != width * 4) else x
            x = b.op("Relu", [b.op("Add", [y, shortcut])])
            c_in = width * 4
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    w = b.const(b.weight(1000, 2048, fan_in=2048))
    b.nodes.append(helper.make_node("Gemm", [x, w, b.const(np.zeros(1000, np.float32))], ["logits"], transB=1))
    return b.model("resnet50_224", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])], 17)


def bert_base(layers, hidden=768, heads=12, ffn=3072, vocab=30522):
    b = Builder(110)
    head = hidden // heads
    emb = b.op("Gather", [b.const((b.rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float32), "word"), "input_ids"])
    positions = b.const(np.arange(SEQUENCE, dtype=np.int64)[None, :])
    emb = b.op("Add", [emb, b.op("Gather", [b.const((b.rng.standard_normal((512, hidden)) * 0.02).astype(np.float32), "pos"), positions])])
    types = b.const(np.zeros((1, SEQUENCE), np.int64))
    emb = b.op("Add", [emb, b.op("Gather", [b.const((b.rng.standard_normal((2, hidden)) * 0.02).astype(np.float32), "type"), types])])
    x = b.layer_norm(emb, hidden)
    # The additive mask [N, 1, 1, S]: (1 - mask) * -10000.
    m = b.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    m = b.op("Mul", [b.op("Sub", [b.const(np.array(1.0, np.float32)), m]), b.const(np.array(-10000.0, np.float32))])
    mask = b.op("Unsqueeze", [m, b.const(np.array([1, 2], np.int64))])
    split = b.const(np.array([0, 0, heads, head], np.int64))
    merge = b.const(np.array([0, 0, hidden], np.int64))
    scale = b.const(np.array(np.sqrt(head), np.float32))
    for _ in range(layers):
        def heads_of(t, perm):
            return b.op("Transpose", [b.op("Reshape", [t, split])], perm=perm)
        q = heads_of(b.linear(x, hidden, hidden), [0, 2, 1, 3])
        k = heads_of(b.linear(x, hidden, hidden), [0, 2, 3, 1])
        v = heads_of(b.linear(x, hidden, hidden), [0, 2, 1, 3])
        scores = b.op("Add", [b.op("Div", [b.op("MatMul", [q, k]), scale]), mask])
        context = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
        context = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]), merge])
        x = b.layer_norm(b.op("Add", [b.linear(context, hidden, hidden), x]), hidden)
        h = b.linear(x, hidden, ffn)
        gelu = b.op("Mul", [b.op("Mul", [h, b.op("Add", [b.op("Erf", [b.op("Div", [h, b.const(np.array(1.4142135, np.float32))])]),
                                                        b.const(np.array(1.0, np.float32))])]), b.const(np.array(0.5, np.float32))])
        x = b.layer_norm(b.op("Add", [b.linear(gelu, ffn, hidden), x]), hidden)
    cls = b.op("Gather", [x, b.const(np.array(0, np.int64))], axis=1)
    w = b.const(b.weight(hidden, hidden, fan_in=hidden) * 0.5)
    pooled = b.op("Add", [b.op("MatMul", [cls, w]), b.const(np.zeros(hidden, np.float32))])
    b.nodes.append(helper.make_node("Tanh", [pooled], ["pooled"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", SEQUENCE]) for n in ("input_ids", "attention_mask")]
    return b.model("bert_base_128", inputs, [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", hidden])], 17)


def decoder_upsampling():
    """A segmentation decoder's learned upsampling: ConvTranspose 64 -> 32 channels, 4x4 kernel, stride 2, pad 1, on a
    64x64 map (output 128x128), as torch exports ConvTranspose2d."""
    b = Builder(120)
    w = b.const((b.rng.standard_normal((64, 32, 4, 4)) * 0.05).astype(np.float32), "w")
    bias = b.const(np.zeros(32, np.float32), "b")
    b.nodes.append(helper.make_node("ConvTranspose", ["input", w, bias], ["output"], strides=[2, 2], pads=[1, 1, 1, 1]))
    return b.model("decoder_upsampling", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64, 64, 64])],
                   [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 32, 128, 128])], 17)


def feeds(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = {}
    for i in session.get_inputs():
        shape = [1 if not isinstance(d, int) else d for d in i.shape]
        out[i.name] = np.ones(shape, np.int64) if "int64" in i.type else \
            np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return out


def onnxruntime_rate(path, threads, iterations, warmup):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = feeds(path)
    best = 0.0
    for _ in range(3):
        for _ in range(warmup):
            session.run(None, x)
        start = time.perf_counter()
        for _ in range(iterations):
            session.run(None, x)
        best = max(best, iterations / (time.perf_counter() - start))
    return best


def whittle_rate(binary, path, threads, iterations, warmup):
    best = 0.0
    for _ in range(3):
        out = subprocess.run([str(binary), "model", "bench", str(path), "--batch-size", "1", "--threads", str(threads),
                              "--iterations", str(iterations), "--warmup", str(warmup), "--json"],
                             capture_output=True, text=True, check=True)
        best = max(best, json.loads(out.stdout)["imagesPerSecond"])
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=12, help="BERT encoder layers (12 for BERT-base)")
    parser.add_argument("--models", nargs="+", default=["resnet50", "bert", "decoder"],
                        help="which of resnet50, bert, decoder to time")
    args = parser.parse_args()
    binary = ROOT / ".build" / "release" / "coordinator"
    if not binary.exists():
        sys.exit("build Whittle first: swift build -c release --product coordinator")
    MODELS.mkdir(parents=True, exist_ok=True)
    models = [("ResNet-50 224x224", MODELS / "resnet50_224.onnx", resnet50, 1.0, "resnet50"),
              ("BERT-base encoder, sequence 128", MODELS / "bert_base_128.onnx", lambda: bert_base(args.layers), 0.8, "bert"),
              ("ConvTranspose upsampling 64x64", MODELS / "decoder_upsampling.onnx", decoder_upsampling, None, "decoder")]
    models = [m[:4] for m in models if m[4] in args.models]
    print(machine.banner())
    rows = []
    for title, path, build, goal in models:
        if not path.exists():
            onnx.save(build(), str(path))
        for threads in args.threads:
            theirs = onnxruntime_rate(path, threads, args.iterations, args.warmup)
            ours = whittle_rate(binary, path, threads, args.iterations, args.warmup)
            ratio = ours / theirs
            rows.append({"model": title, "threads": threads, "batch": 1, "whittle_per_second": ours,
                         "onnxruntime_per_second": theirs, "ratio": ratio, "goal": goal})
            print(f"{title:34s} {threads} thread(s): Whittle {ours:7.2f}/s  onnxruntime {theirs:7.2f}/s  "
                  f"ratio {ratio:.2f} (goal {goal if goal is not None else '–'})")
    if set(args.models) != {"resnet50", "bert", "decoder"}:
        return  # a partial run does not replace the recorded figures
    (ROOT / "benchmarks" / "last-families.json").write_text(json.dumps({"machine": machine.describe(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
