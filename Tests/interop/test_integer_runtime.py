"""Whittle's integer runtime against onnxruntime's optimized CPU provider on the same QDQ files (issue 17): the QDQ
exports of the demo CNN (three activation policies, on the committed demo images) and of the zoo's single-input families give the same top-1 on
at least 99.9 % of the inputs and an output relative RMSE of at most 1e-3 against onnxruntime's."""
import json

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT

ZOO = ROOT / "Tests" / "Fixtures" / "zoo"
MANIFEST = json.loads((ZOO / "MANIFEST.json").read_text())
CNNS = [m for m in MANIFEST["models"] if len(m["inputs"]) == 1 and m["task"] in ("classification", "segmentation")]
DEMO = ROOT / "examples" / "models" / "defect_cnn.onnx"
# The committed demo images (the holdout set is written by scripts/demo, which runs after the tests): calibration on
# the first 256, comparison on the rest.
DEMO_IMAGES = ROOT / "examples" / "data" / "defects_test_x.npy"
# The bounds.
MAX_RELATIVE_RMSE = 1e-3
MIN_TOP1_AGREEMENT = 0.999


def relative_rmse(a, b):
    return float(np.sqrt(((a - b) ** 2).mean()) / np.sqrt((b ** 2).mean()))


def onnxruntime(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def whittle(coordinator, path, x, tmp_path):
    np.save(tmp_path / "x.npy", x)
    coordinator("model", "run", path, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    return np.load(tmp_path / "y.npy")


def top1_agreement(a, b):
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.mark.parametrize("policy", [(), ("--activation-type", "int8", "--symmetric-activations"), ("--per-tensor",)],
                         ids=["uint8", "int8-symmetric", "per-tensor"])
def test_demo_qdq_runs_as_onnxruntime_does(policy, coordinator, tmp_path):
    quantized = tmp_path / "q.onnx"
    images = np.load(DEMO_IMAGES)
    np.save(tmp_path / "calibration.npy", images[:256])
    coordinator("model", "compress", DEMO, "--calibration-data", tmp_path / "calibration.npy", "--quantize", "int8",
                *policy, "--out", quantized)
    x = images[256:]
    expected, got = onnxruntime(quantized, x), whittle(coordinator, quantized, x, tmp_path)
    assert top1_agreement(got, expected) >= MIN_TOP1_AGREEMENT
    assert relative_rmse(got, expected) <= MAX_RELATIVE_RMSE, relative_rmse(got, expected)
    profile = coordinator("model", "bench", quantized, "--batch-size", "4", "--iterations", "1", "--profile").stdout
    convolutions = [line for line in profile.splitlines() if "Conv" in line]
    assert len(convolutions) == 5 and all(" int8 " in line for line in convolutions), profile  # all on integer kernels
    assert any("Gemm" in line and " int8 " in line for line in profile.splitlines()), profile
    assert any("GlobalAveragePool" in line and " int8 global average pool" in line for line in profile.splitlines()), profile
    assert "7 QDQ groups on integer kernels" in profile, profile  # 5 Conv, the pool and the Gemm head
    timed = json.loads(coordinator("model", "bench", quantized, "--batch-size", "2", "--iterations", "1", "--json").stdout)
    assert timed["integerSteps"] == 7
    assert json.loads(coordinator("model", "bench", DEMO, "--batch-size", "2", "--iterations", "1", "--json").stdout)["integerSteps"] == 0


# Every single-input classification and segmentation family of the zoo (the CNNs and the vision transformers): measured
# equal to onnxruntime's optimized output (relative RMSE 0) on 2026-12-06, with Conv, Gemm, MatMul (constant right
# operand), Add, pooling and Resize as onnxruntime computes them.
@pytest.mark.parametrize("model", CNNS, ids=[m["file"][:-5] for m in CNNS])
def test_zoo_qdq_runs_as_onnxruntime_does(model, coordinator, tmp_path):
    shape = tuple(np.load(ZOO / model["file"].replace(".onnx", ".input.npy")).shape[1:])
    rng = np.random.default_rng(3)
    np.save(tmp_path / "cal.npy", rng.standard_normal((16,) + shape).astype(np.float32))
    quantized = tmp_path / "q.onnx"
    coordinator("model", "compress", ZOO / model["file"], "--calibration-data", tmp_path / "cal.npy", "--quantize", "int8",
                "--out", quantized)
    x = rng.standard_normal((16,) + shape).astype(np.float32)
    expected, got = onnxruntime(quantized, x), whittle(coordinator, quantized, x, tmp_path)
    assert top1_agreement(got, expected) >= MIN_TOP1_AGREEMENT
    assert relative_rmse(got, expected) <= MAX_RELATIVE_RMSE, relative_rmse(got, expected)
