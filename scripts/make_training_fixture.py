"""PyTorch reference data for Whittle's training engine (backward, loss, SGD).

Run once by hand from the repository root, in a throwaway virtualenv that has
torch, onnx, onnxruntime and numpy (torch is NOT a dependency of the project or
its CI; the outputs of this script are committed):

    python -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch onnx onnxscript onnxruntime numpy
    /tmp/torchvenv/bin/python scripts/make_training_fixture.py

Everything is written to Tests/Fixtures/training/:

    fixture.onnx        the fixture network below, eval mode, legacy TorchScript
                        exporter (dynamo=False), opset 13, constant folding off,
                        BatchNormalization kept, dynamic batch, input "input"
                        float32 [batch, 3, 16, 16], output "logits" [batch, 5];
                        initializers keep the torch state_dict names
    x.npy               float32 [8, 3, 16, 16], the fixed training batch
    y.npy               int64 [8], its labels in 0..4
    eval_logits_ort.npy float32 [8, 5], onnxruntime (CPU) on fixture.onnx with
                        the ORIGINAL weights; checked against torch eval logits
    reference/*.npy       torch training-step reference (names below)
    reference.json      hyperparameters, conventions, name mapping, versions

The fixture network (3x16x16 -> 5 classes):

    Conv 3->8 3x3 pad 1 (no bias) + BatchNorm + ReLU
    Conv 8->8 depthwise 3x3 groups 8 pad 1 (no bias) + BatchNorm + ReLU6 (Clip 0..6)
    MaxPool 2                                                      -> 8x8
    Conv 8->16 1x1 with bias + LeakyReLU(0.1)
    residual: x + Conv 16->16 3x3 groups 4 pad 1 with bias
    AvgPool 2                                                      -> 4x4
    sigmoid gate: x * sigmoid(x)
    GlobalAveragePool + Flatten + Linear 16->5 (Gemm)

reference/*.npy, all float32 unless noted, keyed by ONNX initializer name:

    loss                     0-d, mean cross-entropy of the train-mode forward
    logits_train             [8, 5], train-mode logits (BN uses batch statistics)
    dlogits                  [8, 5], d loss / d logits = (softmax - onehot) / 8
    grad/<name>              gradient of every trainable parameter
    updated/<name>           every trainable parameter after ONE SGD step
    running_mean/<name>      BN running mean after the train-mode forward
    running_var/<name>       BN running var after the train-mode forward
                             (PyTorch convention: UNBIASED batch variance)
    grad64/<name>            float64 gradients from a double copy of the model
                             (same weights and data), for tight comparisons
    loss64, dlogits64        float64 loss and d loss / d logits of that copy

Deterministic (torch.manual_seed(0) for the weights, 1 for the batch; reruns
give byte-identical files). BN affine parameters and running statistics are
random and non-trivial; bn2 has scale 1.5..2.5 and a +1.5 shift so that about
2 % of the ReLU6 inputs exceed 6 in the training forward (both Clip bounds get
exercised). The exporter emits Clip's min/max as Constant nodes, not
initializers. The Add and the Mul each read one tensor twice (fan-out), so
their backward passes must accumulate gradients.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "Tests" / "Fixtures" / "training"

OPSET = 13
BATCH = 8
CLASSES = 5
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
BN_MOMENTUM = 0.1
BN_EPS = 1e-5


class FixtureNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.relu6 = nn.ReLU6()
        self.maxpool = nn.MaxPool2d(2)
        self.pw = nn.Conv2d(8, 16, 1, bias=True)
        self.leaky = nn.LeakyReLU(0.1)
        self.res = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=True)
        self.avgpool = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu6(self.bn2(self.dw(x)))
        x = self.maxpool(x)
        x = self.leaky(self.pw(x))
        x = x + self.res(x)
        x = self.avgpool(x)
        x = x * torch.sigmoid(x)
        x = self.flatten(self.gap(x))
        return self.fc(x)


def build_model() -> FixtureNet:
    torch.manual_seed(0)
    model = FixtureNet()
    with torch.no_grad():
        # bn2 gets a larger scale and a positive shift so that some ReLU6 inputs exceed 6 in the training
        # forward (the Clip upper bound is exercised, not only the lower one).
        for bn, (lo, hi), shift in ((model.bn1, (0.5, 1.5), 0.0), (model.bn2, (1.5, 2.5), 1.5)):
            c = bn.num_features
            bn.weight.copy_(torch.empty(c).uniform_(lo, hi))
            bn.bias.copy_(torch.randn(c) * 0.3 + shift)
            bn.running_mean.copy_(torch.randn(c) * 0.2)
            bn.running_var.copy_(torch.empty(c).uniform_(0.5, 1.5))
        # Non-zero biases everywhere so that bias gradients and updates are not trivial.
        model.pw.bias.copy_(torch.randn(16) * 0.1)
        model.res.bias.copy_(torch.randn(16) * 0.1)
        model.fc.bias.copy_(torch.randn(CLASSES) * 0.1)
    return model


def export(model: FixtureNet, path: pathlib.Path, x: torch.Tensor) -> tuple[str, list[str]]:
    """Export in eval mode with BN kept; returns the training mode used and the op types."""
    model.eval()
    for mode in (torch.onnx.TrainingMode.EVAL, torch.onnx.TrainingMode.PRESERVE):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x[:2],), str(path),
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET, training=mode, do_constant_folding=False, dynamo=False,
            )
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        if ops.count("BatchNormalization") == 2:
            return mode.name, ops
        print(f"training={mode.name} folded BatchNormalization (ops {ops}); trying the next mode")
    raise SystemExit("could not export with the BatchNormalization nodes kept")


def bn_input_names(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """ONNX BatchNormalization node name -> [scale, bias, mean, var] initializer names."""
    return {n.name: list(n.input[1:5]) for n in graph.node if n.op_type == "BatchNormalization"}


def name_mapping(model: FixtureNet, graph: onnx.GraphProto) -> dict[str, str]:
    """torch state_dict name -> ONNX initializer name, matched by value (and checked to be unique)."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    mapping = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        value = tensor.detach().cpu().numpy()
        if name in inits and inits[name].shape == value.shape and np.array_equal(inits[name], value):
            mapping[name] = name
            continue
        hits = [k for k, v in inits.items() if v.shape == value.shape and np.array_equal(v, value)]
        if len(hits) != 1:
            raise SystemExit(f"cannot map {name} to one ONNX initializer (candidates {hits})")
        mapping[name] = hits[0]
    return mapping


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One train-mode forward/backward; returns loss, logits, dlogits (gradients stay on the params)."""
    model.train()
    logits = model(x)
    logits.retain_grad()
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.detach(), logits.detach(), logits.grad.detach()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model = build_model()

    torch.manual_seed(1)
    x = torch.randn(BATCH, 3, 16, 16)
    y = torch.randint(0, CLASSES, (BATCH,), dtype=torch.int64)
    np.save(OUT / "x.npy", x.numpy().astype(np.float32))
    np.save(OUT / "y.npy", y.numpy().astype(np.int64))

    original = copy.deepcopy(model)  # original weights and running stats

    # -- ONNX export and the tie between the file and the torch model -------
    onnx_path = OUT / "fixture.onnx"
    export_mode, ops = export(model, onnx_path, x)
    onnx_model = onnx.load(str(onnx_path))
    onnx.checker.check_model(onnx_model, full_check=True)
    graph = onnx_model.graph
    mapping = name_mapping(original, graph)
    bn_nodes = bn_input_names(graph)

    with torch.no_grad():
        original.eval()
        eval_torch = original(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (eval_ort,) = session.run(None, {"input": x.numpy()})
    eval_diff = float(np.abs(eval_ort - eval_torch).max())
    assert eval_diff <= 1e-5, f"onnxruntime and torch eval logits differ by {eval_diff}"
    np.save(OUT / "eval_logits_ort.npy", eval_ort.astype(np.float32))

    # -- float32 training step ----------------------------------------------
    model = copy.deepcopy(original)
    params = dict(model.named_parameters())
    loss, logits, dlogits = train_step(model, x, y)
    expected_dlogits = (torch.softmax(logits, 1) - F.one_hot(y, CLASSES).float()) / BATCH
    assert torch.allclose(dlogits, expected_dlogits, atol=1e-7)

    ref: dict[str, np.ndarray] = {
        "loss": np.array(loss.item(), dtype=np.float32),
        "logits_train": logits.numpy().astype(np.float32),
        "dlogits": dlogits.numpy().astype(np.float32),
    }
    grads = {name: p.grad.detach().clone() for name, p in params.items()}
    for name, g in grads.items():
        ref[f"grad/{mapping[name]}"] = g.numpy().astype(np.float32)

    # BN running statistics after the train-mode forward (before the optimizer step; it does not touch them).
    for module_name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            ref[f"running_mean/{mapping[module_name + '.running_mean']}"] = module.running_mean.numpy().copy()
            ref[f"running_var/{mapping[module_name + '.running_var']}"] = module.running_var.numpy().copy()

    # Check the running-statistics convention independently of nn.BatchNorm2d.
    with torch.no_grad():
        original.train()
        h = original.conv1(x)
        n = h.numel() // h.shape[1]
        mean = h.mean((0, 2, 3))
        var_unbiased = h.var((0, 2, 3), unbiased=True)
        exp_rm = (1 - BN_MOMENTUM) * original.bn1.running_mean + BN_MOMENTUM * mean
        exp_rv = (1 - BN_MOMENTUM) * original.bn1.running_var + BN_MOMENTUM * var_unbiased
        assert torch.allclose(model.bn1.running_mean, exp_rm, atol=1e-6)
        assert torch.allclose(model.bn1.running_var, exp_rv, atol=1e-6)
        original.eval()

    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer.step()
    for name, p in params.items():
        ref[f"updated/{mapping[name]}"] = p.detach().numpy().astype(np.float32).copy()
        expected = before[name] - LR * (grads[name] + WEIGHT_DECAY * before[name])
        assert torch.allclose(p.detach(), expected, atol=1e-7), name

    # -- float64 reference ----------------------------------------------------
    model64 = copy.deepcopy(original).double()
    loss64, _, dlogits64 = train_step(model64, x.double(), y)
    ref["loss64"] = np.array(loss64.item(), dtype=np.float64)
    ref["dlogits64"] = dlogits64.numpy()
    for name, p in model64.named_parameters():
        g64 = p.grad.detach().numpy()
        ref[f"grad64/{mapping[name]}"] = g64
        rel = np.abs(g64 - grads[name].double().numpy()).max() / max(np.abs(g64).max(), 1e-30)
        assert rel < 1e-4, f"float32 and float64 gradients of {name} differ (relative {rel})"

    # One .npy per array (Swift reads .npy, not .npz archives): reference/<key with "/" as "__">.npy
    (OUT / "reference").mkdir(exist_ok=True)
    for key, value in ref.items():
        np.save(OUT / "reference" / (key.replace("/", "__") + ".npy"), np.ascontiguousarray(value))

    initializers = [t.name for t in graph.initializer]
    trainable = [mapping[name] for name in params]
    info = {
        "description": "PyTorch reference for one training step of fixture.onnx on x.npy / y.npy "
                       "(written by scripts/make_training_fixture.py)",
        "model": {
            "onnx": "fixture.onnx",
            "opset": OPSET,
            "exporter": f"torch.onnx.export(dynamo=False, training={export_mode}, do_constant_folding=False), "
                        "model in eval mode",
            "input": {"name": "input", "shape": ["batch", 3, 16, 16], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["batch", CLASSES], "dtype": "float32"},
            "op_types": ops,
            "initializers": initializers,
            "trainable_initializers": trainable,
            "batchnorm_nodes": {k: dict(zip(["scale", "bias", "mean", "var"], v)) for k, v in bn_nodes.items()},
        },
        "torch_to_onnx_names": mapping,
        "data": {"x": "x.npy float32 [8,3,16,16], torch.manual_seed(1) randn",
                 "y": "y.npy int64 [8], torch.randint(0, 5) after x", "labels": y.tolist()},
        "hyperparameters": {
            "optimizer": "torch.optim.SGD",
            "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "dampening": 0.0, "nesterov": False,
            "steps": 1,
            "batchnorm_momentum_torch": BN_MOMENTUM,
            "batchnorm_momentum_onnx_attribute_equivalent": 1 - BN_MOMENTUM,
            "batchnorm_epsilon": BN_EPS,
        },
        "conventions": {
            "loss": "cross-entropy, mean over the batch: loss = mean_i(logsumexp(z_i) - z_i[y_i]); "
                    "no label smoothing, no class weights",
            "dlogits": "d loss / d logits = (softmax(z) - onehot(y)) / batch",
            "forward_mode": "training mode: BatchNormalization normalizes with the batch mean and the BIASED "
                            "batch variance (divide by N*H*W) over axes (0, 2, 3)",
            "sgd_update": "PyTorch SGD, first step: g = grad + weight_decay * w; buf = g (the momentum buffer "
                          "starts at g, no dampening); w_new = w - lr * buf. Later steps: buf = momentum * buf + g. "
                          "Weight decay applies to EVERY trainable parameter, including biases and BN scale/bias.",
            "trainable": "Conv/Gemm weights and biases and BatchNormalization scale/bias; BN mean/var are "
                         "buffers, not trained",
            "batchnorm_running_stats": "PyTorch convention: running_mean = (1 - 0.1) * running_mean + 0.1 * "
                                       "batch_mean; running_var = (1 - 0.1) * running_var + 0.1 * "
                                       "batch_var_UNBIASED, where batch_var_unbiased = biased_var * n / (n - 1) "
                                       "and n = N*H*W (2048 for both BN layers here). This differs from the ONNX "
                                       "BatchNormalization training-mode spec (opset 14+), which updates the running "
                                       "variance with the biased (population) batch variance; with momentum 0.9 in "
                                       "ONNX's convention (ONNX momentum = 1 - torch momentum). The normalization "
                                       "itself always uses the biased variance.",
            "running_stats_timing": "recorded after the train-mode forward (the optimizer step does not change them)",
            "names": "reference/*.npy keys use ONNX initializer names; torch_to_onnx_names maps state_dict names",
            "clip": "ReLU6 is Clip(min=0, max=6) with min/max from Constant nodes; about 2 % of bn2's train-mode "
                    "outputs exceed 6 and get zero gradient (torch: gradient passes only where 0 < x < 6)",
            "grad64": "grad64/*, loss64, dlogits64: same weights and data in float64 (model.double()); grad/* "
                      "and updated/* are float32 as PyTorch computes by default",
        },
        "checks": {
            "eval_logits_max_abs_diff_ort_vs_torch": eval_diff,
            "loss": loss.item(),
            "loss64": loss64.item(),
        },
        "reference_npz_keys": sorted(ref),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "numpy": np.__version__},
    }
    (OUT / "reference.json").write_text(json.dumps(info, indent=2) + "\n")

    print(f"op types: {ops}")
    print(f"initializers: {initializers}")
    print(f"export mode {export_mode}; loss {loss.item():.8f} (float64 {loss64.item():.8f}); "
          f"eval logits ort vs torch {eval_diff:.2e}")
    for path in sorted(OUT.iterdir()):
        print(f"  {path.relative_to(ROOT)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
