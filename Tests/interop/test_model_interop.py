"""Whittle against onnxruntime on the same files: rewritten models load and give identical outputs, Whittle's
forward pass matches within tolerance, and `model eval` reports the accuracy onnxruntime measures."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import FIXTURES, ROOT

# Whittle's outputs must match onnxruntime's within this error relative to the output's magnitude.
ORT_TOLERANCE = 1e-4
# For QDQ models: float32 results that differ in the last bit (a different summation order in the convolution
# library) can fall on either side of a rounding boundary in QuantizeLinear, moving that value by one quantization
# step; a few such flips through a network move the logits by up to about 1 % of their range.
QDQ_TOLERANCE = 2e-2

MODELS = sorted(p.name for p in FIXTURES.glob("*.onnx")) + ["external/resnet_ext.onnx"]


def ort_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", MODELS)
def test_rewritten_model_is_lossless(coordinator, tmp_path, name):
    source = FIXTURES / name
    out = tmp_path / "rewritten.onnx"
    coordinator("model", "convert", source, "--out", out)
    original, rewritten = onnx.load(str(source)), onnx.load(str(out))
    onnx.checker.check_model(rewritten)
    assert [n.name for n in rewritten.graph.node] == [n.name for n in original.graph.node]
    assert [(o.domain, o.version) for o in rewritten.opset_import] == [(o.domain, o.version) for o in original.opset_import]
    assert {p.key: p.value for p in rewritten.metadata_props} == {p.key: p.value for p in original.metadata_props}
    assert rewritten.doc_string == original.doc_string
    assert rewritten.producer_name == original.producer_name
    stem = name.split("/")[-1].removesuffix(".onnx")
    x = np.load(FIXTURES / (name.removesuffix(".onnx") + ".input.npy"))
    np.testing.assert_array_equal(ort_run(out, x), ort_run(source, x), err_msg=f"{stem}: outputs differ after rewrite")


@pytest.mark.parametrize("name", MODELS)
def test_forward_pass_matches_onnxruntime(coordinator, tmp_path, name):
    source = FIXTURES / name
    x = np.load(FIXTURES / (name.removesuffix(".onnx") + ".input.npy"))
    out = tmp_path / "y.npy"
    coordinator("model", "run", source, "--input", FIXTURES / (name.removesuffix(".onnx") + ".input.npy"),
                "--output", out, "--batch-size", "2")
    ours, theirs = np.load(out), ort_run(source, x)
    assert ours.shape == theirs.shape
    error = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-6)
    assert error < ORT_TOLERANCE, f"{name}: relative error {error}"


def test_eval_accuracy_equals_onnxruntime(coordinator):
    model = ROOT / "examples" / "models" / "defect_cnn.onnx"
    x = np.load(ROOT / "examples" / "data" / "defects_test_x.npy")
    y = np.load(ROOT / "examples" / "data" / "defects_test_y.npy")
    logits = ort_run(model, x)
    expected = float((logits.argmax(1) == y).mean())
    shifted = logits - logits.max(1, keepdims=True)
    ce = float((np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(y)), y]).mean())
    report = json.loads(coordinator("model", "eval", model, "--data", ROOT / "examples/data/defects_test_x.npy",
                                    "--labels", ROOT / "examples/data/defects_test_y.npy", "--json").stdout)
    assert report["samples"] == len(y)
    assert report["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert report["meanCrossEntropy"] == pytest.approx(ce, rel=1e-4)


def test_qdq_model_from_onnxruntime_quantizer_runs(coordinator, tmp_path):
    """A model quantized by onnxruntime's own QDQ quantizer runs in Whittle with onnxruntime's outputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    source = FIXTURES / "resnet_folded_op17.onnx"
    x = np.load(FIXTURES / "resnet_folded_op17.input.npy")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.batches, None)

    for per_channel in (False, True):
        quantized = tmp_path / f"qdq_{per_channel}.onnx"
        quantize_static(str(source), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        out = tmp_path / "y.npy"
        np.save(tmp_path / "x.npy", x)
        coordinator("model", "run", quantized, "--input", tmp_path / "x.npy", "--output", out)
        ours = np.load(out)
        # Reference: the same QDQ graph in onnxruntime with graph optimizations off, so it runs QDQ as written
        # (optimized onnxruntime fuses into integer kernels whose rounding differs slightly).
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
        theirs = session.run(None, {"input": x})[0]
        error = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-6)
        assert error < QDQ_TOLERANCE, f"per_channel={per_channel}: relative error {error}"
        assert (ours.argmax(1) == theirs.argmax(1)).all()


@pytest.mark.parametrize("content", [b"", b"garbage bytes that are not protobuf", b"\x08\x07" * 50])
def test_malformed_models_are_refused_cleanly(coordinator, tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    result = coordinator("model", "inspect", bad, check=False)
    assert result.returncode == 1, result.stderr
    assert "model" in result.stderr.lower()
