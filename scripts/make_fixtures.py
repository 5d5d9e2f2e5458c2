"""Export Whittle's ONNX test fixtures with real PyTorch exporters.

Run once by hand from the repository root, in a throwaway virtualenv that has
torch, onnx, onnxscript, onnxruntime and numpy (torch is NOT a dependency of
the project or its CI; the outputs of this script are committed):

    python -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch onnx onnxscript onnxruntime numpy
    /tmp/torchvenv/bin/python scripts/make_fixtures.py

Everything is written to Tests/Fixtures/models/:

    resnet_bn_op13.onnx          small ResNet (16/32/64), legacy TorchScript
                                 exporter, opset 13, constant folding off so the
                                 BatchNormalization nodes are kept
    resnet_folded_op17.onnx      same weights, legacy exporter, opset 17, default
                                 constant folding (BN folded into Conv)
    mobilenetv2_bn_op13.onnx     small MobileNetV2 (inverted residuals, ReLU6,
                                 depthwise convs, Hardswish stem, Dropout), BN kept;
                                 at opset 13 Hardswish becomes HardSigmoid + Mul
    mobilenetv2_folded_op17.onnx same weights, BN folded, native HardSwish
    smallcnn_dynamo.onnx         small CNN exported with torch.onnx.export(...,
                                 dynamo=True); head is x.mean((2, 3)) + view +
                                 Linear, i.e. ReduceMean + Reshape
    shapechain_op11.onnx         legacy exporter, opset 11: x.view(x.size(0), -1)
                                 gives a Shape -> Gather -> Unsqueeze -> Concat ->
                                 Reshape chain
    opzoo_a_op13.onnx            Sub/Div input normalisation, LeakyRelu, MaxPool,
                                 AveragePool, Tanh, PRelu, channel Concat, zero Pad,
                                 Clip (ReLU6), nearest Resize, squeeze-excitation
                                 (Sigmoid, Mul), reflect Pad, HardSigmoid, bilinear
                                 Resize, Gemm, Softmax
    opzoo_b_op17.onnx            QuantizeLinear/DequantizeLinear (fake-quantised
                                 input and per-channel weights), HardSwish, token
                                 MLP (Transpose, MatMul), Squeeze, Unsqueeze,
                                 ReduceMean, Softmax
    handbuilt_dropout_identity_op13.onnx
                                 NOT from an exporter: built with onnx.helper,
                                 because no torch exporter emits Dropout for an
                                 eval-mode model (covers Dropout and Identity)
    external/resnet_ext.onnx     copy of resnet_bn_op13 with all weights in
                                 external/resnet_ext.onnx.data

Known exporter artefacts kept on purpose (they are what real files contain):
the legacy exporter turns every nn.ZeroPad2d / F.pad at opset >= 11 into a
constant subgraph (ConstantOfShape, Concat, Reshape, Slice, Transpose, Cast)
that computes the Pad "pads" input, so opzoo_a_op13 contains Cast,
ConstantOfShape and Slice on constants only; the dynamo exporter (opset 20
here) folds BatchNorm into Conv and gives ReduceMean its axes as an input.

For every NAME.onnx there is NAME.input.npy (float32, batch 4, fixed seed) and
NAME.ort_output.npy (first output from onnxruntime's CPU provider run on the
file as written). MANIFEST.json lists opset, input/output names and shapes,
the op types in each graph and the tool versions used.

All models use torch.manual_seed(0)-style fixed seeds; BatchNorm layers get
non-trivial random gamma/beta/running statistics so that a wrong BN folding
would show up in the outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

OUT_DIR = os.path.join("Tests", "Fixtures", "models")
BATCH = 4

# The op set Whittle supports; anything else found in a fixture is reported.
SUPPORTED_OPS = {
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "BatchNormalization",
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softmax", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Flatten", "Reshape", "Transpose", "Concat", "Identity", "Dropout", "Pad",
    "Squeeze", "Unsqueeze", "Constant", "Shape", "Gather", "Resize",
    "QuantizeLinear", "DequantizeLinear",
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def randomize_bn(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial affine parameters and running stats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 1.0 + 0.5)          # gamma in [0.5, 1.5]
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)                 # beta
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)     # var in [0.5, 2.0]


def he_init(model: nn.Module) -> None:
    """He (Kaiming) normal init for Conv/Linear weights and small random biases.

    PyTorch's default init shrinks activations layer by layer, which would
    leave the fixtures with tiny outputs; this keeps them of order one.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1)


def conv_bn(c_in, c_out, k=3, stride=1, groups=1, act: nn.Module | None = None) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def make_input(seed: int, shape=(BATCH, 3, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # 1x1 projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-style CNN, widths 16/32/64, for 3x32x32 inputs."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, act=nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers = []
        if expand != 1:
            layers.append(conv_bn(c_in, hidden, 1, act=nn.ReLU6()))                     # expand
        layers.append(conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6()))  # depthwise
        layers.append(conv_bn(hidden, c_out, 1))                                          # project (linear)
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_residual else y


class SmallMobileNetV2(nn.Module):
    """MobileNetV2-style CNN, width shrunk, Hardswish stem, for 3x32x32 inputs."""

    SETTINGS = [  # expansion, channels, repeats, stride
        (1, 16, 1, 1),
        (4, 24, 2, 2),
        (4, 32, 2, 2),
        (4, 48, 1, 1),
    ]

    def __init__(self, classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 1, act=nn.Hardswish())
        blocks, c_in = [], 16
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.last = conv_bn(c_in, 128, 1, act=nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))


class SmallCNNMeanHead(nn.Module):
    """conv-BN-ReLU x3, head = x.mean((2, 3)) -> view -> Linear."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, act=nn.ReLU()),
            conv_bn(16, 32, stride=2, act=nn.ReLU()),
            conv_bn(32, 32, stride=2, act=nn.ReLU()),
        )
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.features(x)
        x = x.mean(dim=(2, 3), keepdim=True)
        x = x.view(x.shape[0], -1)
        return self.fc(x)


class ShapeChainNet(nn.Module):
    """Conv + MaxPool, then x.view(x.size(0), -1) into a Linear layer (no GAP)."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 8 * 8, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))   # 16x16
        x = self.pool(F.relu(self.conv2(x)))   # 8x8
        x = x.view(x.size(0), -1)
        return self.fc(x)


class OpZooA(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.1)
        self.branch_max = nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.Conv2d(16, 12, 1), nn.Tanh())
        self.branch_avg = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(16, 12, 1), nn.PReLU(12))
        self.pad = nn.ZeroPad2d(1)
        self.conv_pad = nn.Conv2d(24, 24, 3, padding=0)
        self.relu6 = nn.ReLU6()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.down = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.se_reduce = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.conv_reflect = nn.Conv2d(32, 32, 3, padding=0)
        self.hsig = nn.Hardsigmoid()
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = (x - self.mean) / self.std                                 # Sub, Div
        x = self.lrelu(self.stem(x))                                   # 32x32
        x = torch.cat([self.branch_max(x), self.branch_avg(x)], 1)     # 24 x 16x16
        x = self.relu6(self.conv_pad(self.pad(x)))                     # 16x16
        x = self.down(self.up(x))                                      # 32x32 -> 16x16
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s                                                      # squeeze-excitation
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        x = self.hsig(self.conv_reflect(x))                            # 16x16
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)  # 8x8
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return torch.softmax(self.fc(x), dim=1)


class OpZooB(nn.Module):
    """Fake-quantised (QDQ) convs, HardSwish, a token MLP and a channel gate."""

    C, H, W = 16, 16, 16

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, self.C, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(self.C, self.C, 3, padding=1)
        self.act = nn.Hardswish()
        self.token_mlp = nn.Linear(self.C, self.C)
        self.gate = nn.Linear(self.C, self.C)
        self.fc = nn.Linear(self.C, classes)
        # per-output-channel symmetric int8 weight scales, fixed like a
        # calibrated QAT observer would leave them
        self.register_buffer("conv1_scale", torch.ones(self.C))
        self.register_buffer("conv2_scale", torch.ones(self.C))
        self.register_buffer("zero_point", torch.zeros(self.C, dtype=torch.int32))
        self.calibrate()

    def calibrate(self):
        with torch.no_grad():
            for name in ("conv1", "conv2"):
                w = getattr(self, name).weight
                getattr(self, name + "_scale").copy_((w.abs().amax(dim=(1, 2, 3)) / 127.0).clamp(min=1e-8))

    @staticmethod
    def fq_act(x):
        # uint8 activation fake-quant -> QuantizeLinear/DequantizeLinear
        return torch.fake_quantize_per_tensor_affine(x, 0.05, 128, 0, 255)

    def fq_weight(self, w, scale):
        # int8 per-channel (axis 0) weight fake-quant -> QuantizeLinear/DequantizeLinear with axis
        return torch.fake_quantize_per_channel_affine(w, scale, self.zero_point, 0, -128, 127)

    def forward(self, x):
        x = self.fq_act(x)
        x = self.act(F.conv2d(x, self.fq_weight(self.conv1.weight, self.conv1_scale), self.conv1.bias,
                              stride=2, padding=1))
        x = self.fq_act(x)
        x = self.act(F.conv2d(x, self.fq_weight(self.conv2.weight, self.conv2_scale), self.conv2.bias,
                              padding=1))                               # N,16,16,16
        n = x.size(0)
        t = x.reshape(n, self.C, self.H * self.W).transpose(1, 2)     # N, HW, C
        t = t + F.relu(self.token_mlp(t))                             # MatMul + Add on a 3-D tensor
        x = t.transpose(1, 2).reshape(n, self.C, self.H, self.W)
        g = torch.sigmoid(self.gate(x.mean(dim=(2, 3))))              # ReduceMean, N x C
        x = x * g.unsqueeze(-1).unsqueeze(-1)
        x = F.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1)
        return torch.softmax(self.fc(x), dim=-1)


def build_handbuilt_dropout_identity() -> onnx.ModelProto:
    """Hand-built with onnx.helper, NOT a PyTorch export.

    Neither of torch's exporters emits Dropout or Identity for an eval-mode
    model (both are dropped), yet both appear in ONNX files from other tools
    (older exporters, converters, model zoos). This tiny graph covers them:
    Conv -> Identity -> Relu -> Dropout(ratio input) -> GlobalAveragePool ->
    Flatten -> Dropout(no ratio, mask output) -> Gemm -> Identity -> logits.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "conv.bias"),
        numpy_helper.from_array(np.array(0.25, np.float32), "dropout.ratio"),
        numpy_helper.from_array(rng.normal(0, 0.5, (10, 8)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv"], name="conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["conv"], ["conv_id"], name="identity_0"),
        helper.make_node("Relu", ["conv_id"], ["relu"], name="relu"),
        helper.make_node("Dropout", ["relu", "dropout.ratio"], ["drop0"], name="dropout_0"),
        helper.make_node("GlobalAveragePool", ["drop0"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Dropout", ["flat"], ["drop1", "drop1_mask"], name="dropout_1"),
        helper.make_node("Gemm", ["drop1", "fc.weight", "fc.bias"], ["fc"], name="fc", transB=1),
        helper.make_node("Identity", ["fc"], ["logits"], name="identity_1"),
    ]
    graph = helper.make_graph(
        nodes, "handbuilt_dropout_identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="whittle make_fixtures.py (onnx.helper)")
    model.ir_version = 8
    return model


# ---------------------------------------------------------------------------
# exporting
# ---------------------------------------------------------------------------

def legacy_export(model, path, opset, keep_bn: bool) -> None:
    """TorchScript-based exporter (dynamo=False), dynamic batch dimension."""
    model.eval()
    example = torch.from_numpy(make_input(999, (2, 3, 32, 32)))
    kwargs = dict(
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    if keep_bn:
        # PRESERVE keeps the model's (eval) mode and, with folding off, the
        # BatchNormalization nodes survive instead of being fused into Conv.
        kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, **kwargs)


def dynamo_export(model, path) -> None:
    model.eval()
    example = torch.from_numpy(make_input(999, (2, 3, 32, 32)))
    batch = torch.export.Dim("batch", min=1, max=1024)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        program = torch.onnx.export(
            model, (example,), dynamo=True,
            input_names=["input"], output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
        )
        program.save(tmp_path)
        # Make sure the result is one self-contained file.
        m = onnx.load(tmp_path, load_external_data=True)
    onnx.save_model(m, path, save_as_external_data=False)


def shape_of(value_info) -> list:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    return dims


def all_op_types(model: onnx.ModelProto) -> list[str]:
    ops = set()

    def visit(graph):
        for node in graph.node:
            ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    for fn in model.functions:  # local functions would hide ops
        for node in fn.node:
            ops.add(node.op_type)
    return sorted(ops)


def record(name: str, exporter: str, seed: int, manifest: list) -> None:
    """Validate NAME.onnx, write its input/output .npy files, add a manifest entry."""
    path = os.path.join(OUT_DIR, name + ".onnx")
    model = onnx.load(path)  # loads external data too, if any
    onnx.checker.check_model(path, full_check=True)
    size = os.path.getsize(path)
    assert size < 2 * 1024 * 1024, f"{path} is {size} bytes"

    x = make_input(seed)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    y = sess.run(None, {inp.name: x})[0]
    assert np.all(np.isfinite(y))
    np.save(os.path.join(OUT_DIR, name + ".input.npy"), np.ascontiguousarray(x, dtype="<f4"))
    np.save(os.path.join(OUT_DIR, name + ".ort_output.npy"), np.ascontiguousarray(y, dtype="<f4"))

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    ops = all_op_types(model)
    shallow = onnx.load(path, load_external_data=False)
    external = sorted({e.value for t in shallow.graph.initializer for e in t.external_data if e.key == "location"})
    entry = {
        "file": name + ".onnx",
        "exporter": exporter,
        "opset": opset,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "input": {"name": model.graph.input[0].name, "shape": shape_of(model.graph.input[0])},
        "output": {"name": model.graph.output[0].name, "shape": shape_of(model.graph.output[0])},
        "op_types": ops,
        "unsupported_op_types": [o for o in ops if o not in SUPPORTED_OPS],
        "node_count": len(model.graph.node),
        "parameter_count": int(sum(np.prod(t.dims) for t in model.graph.initializer)),
        "bytes": size,
        "input_file": name + ".input.npy",
        "input_shape": list(x.shape),
        "ort_output_file": name + ".ort_output.npy",
        "ort_output_shape": list(y.shape),
    }
    if external:
        entry["external_data"] = external
    manifest.append(entry)
    print(f"{name}: opset {opset}, {size} bytes, ops {ops}")
    if entry["unsupported_op_types"]:
        print(f"  !! ops outside Whittle's list: {entry['unsupported_op_types']}")


def main() -> None:
    if not os.path.isdir(".git") or not os.path.isdir("scripts"):
        sys.exit("run from the repository root")
    torch.set_num_threads(2)
    if os.path.isdir(OUT_DIR):
        shutil.rmtree(OUT_DIR)
    os.makedirs(os.path.join(OUT_DIR, "external"))
    manifest: list = []

    def fixture(name, build, exporter, seed, export):
        torch.manual_seed(seed)
        model = build()
        he_init(model)
        randomize_bn(model, seed + 1000)
        if hasattr(model, "calibrate"):
            model.calibrate()
        export(model, os.path.join(OUT_DIR, name + ".onnx"))
        record(name, exporter, seed, manifest)
        # sanity check: onnxruntime on the exported file agrees with PyTorch
        with torch.no_grad():
            expected = model.eval()(torch.from_numpy(make_input(seed))).numpy()
        got = np.load(os.path.join(OUT_DIR, name + ".ort_output.npy"))
        diff = float(np.abs(expected - got).max())
        manifest[-1]["max_abs_diff_vs_torch"] = diff
        print(f"  max |torch - onnxruntime| = {diff:.3g}  (output range {got.min():.3g} .. {got.max():.3g})")
        assert diff < 1e-3 * max(1.0, float(np.abs(expected).max())), diff
        return model

    legacy = "torch.onnx.export(dynamo=False) TorchScript exporter"
    fixture("resnet_bn_op13", SmallResNet, legacy + ", BN kept (PRESERVE, no constant folding)", 0,
            lambda m, p: legacy_export(m, p, 13, keep_bn=True))
    fixture("resnet_folded_op17", SmallResNet, legacy + ", default (BN folded)", 0,
            lambda m, p: legacy_export(m, p, 17, keep_bn=False))
    fixture("mobilenetv2_bn_op13", SmallMobileNetV2, legacy + ", BN kept (PRESERVE, no constant folding)", 1,
            lambda m, p: legacy_export(m, p, 13, keep_bn=True))
    fixture("mobilenetv2_folded_op17", SmallMobileNetV2, legacy + ", default (BN folded)", 1,
            lambda m, p: legacy_export(m, p, 17, keep_bn=False))
    fixture("smallcnn_dynamo", SmallCNNMeanHead, "torch.onnx.export(dynamo=True), default opset", 2,
            dynamo_export)
    fixture("shapechain_op11", ShapeChainNet, legacy + ", opset 11", 3,
            lambda m, p: legacy_export(m, p, 11, keep_bn=False))
    fixture("opzoo_a_op13", OpZooA, legacy + ", opset 13", 4,
            lambda m, p: legacy_export(m, p, 13, keep_bn=False))
    fixture("opzoo_b_op17", OpZooB, legacy + ", opset 17", 5,
            lambda m, p: legacy_export(m, p, 17, keep_bn=False))

    onnx.save_model(build_handbuilt_dropout_identity(), os.path.join(OUT_DIR, "handbuilt_dropout_identity_op13.onnx"))
    record("handbuilt_dropout_identity_op13", "hand-built with onnx.helper (no torch exporter emits these ops)", 6, manifest)

    # External-data copy of resnet_bn_op13.
    m = onnx.load(os.path.join(OUT_DIR, "resnet_bn_op13.onnx"))
    onnx.save_model(
        m, os.path.join(OUT_DIR, "external", "resnet_ext.onnx"),
        save_as_external_data=True, all_tensors_to_one_file=True,
        location="resnet_ext.onnx.data", size_threshold=0,
    )
    os.chmod(os.path.join(OUT_DIR, "external", "resnet_ext.onnx.data"), 0o644)
    record("external/resnet_ext", "copy of resnet_bn_op13.onnx re-saved by onnx with external data", 0, manifest)
    ext_out = np.load(os.path.join(OUT_DIR, "external", "resnet_ext.ort_output.npy"))
    ref_in = np.load(os.path.join(OUT_DIR, "resnet_bn_op13.input.npy"))
    ext_in = np.load(os.path.join(OUT_DIR, "external", "resnet_ext.input.npy"))
    assert np.array_equal(ref_in, ext_in)
    assert np.array_equal(ext_out, np.load(os.path.join(OUT_DIR, "resnet_bn_op13.ort_output.npy")))

    covered = set().union(*(e["op_types"] for e in manifest))
    summary = {
        "generated_by": "scripts/make_fixtures.py",
        "onnxruntime_version": ort.__version__,
        "onnx_version": onnx.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "inputs": "float32 standard normal, batch 4, numpy default_rng(seed); C order, little-endian",
        "ort_output": "first graph output from onnxruntime CPUExecutionProvider on the file as written",
        "supported_ops_not_covered": sorted(SUPPORTED_OPS - covered),
        "models": manifest,
    }
    with open(os.path.join(OUT_DIR, "MANIFEST.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print("supported ops not covered by any fixture:", summary["supported_ops_not_covered"])


if __name__ == "__main__":
    main()
