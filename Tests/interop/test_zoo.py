"""Real model families end to end with the release binaries and onnxruntime: every single-input model of the zoo
(scripts/make_zoo.py) pruned at 0.3 runs in onnxruntime with its output shape; int8 QDQ export runs in
onnxruntime with an error as small as onnxruntime's own quantizer gives on the same data (recorded in the zoo's
manifest); a pruned transformer (ViT) and segmenter (LR-ASPP) recover by label-free distillation, their error
against the base model falling by at least half."""
import json

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT

ZOO = ROOT / "Tests" / "Fixtures" / "zoo"
MANIFEST = json.loads((ZOO / "MANIFEST.json").read_text())
SINGLE = [m for m in MANIFEST["models"] if len(m["inputs"]) == 1]
# Whittle's QDQ export places quantizers as onnxruntime's quantizer does: its error may exceed onnxruntime's by this
# factor plus this margin (calibration sums differ in the last bits).
INT8_FACTOR, INT8_MARGIN = 1.25, 0.005


def relative_rmse(a, b):
    return float(np.sqrt(((a - b) ** 2).mean()) / np.sqrt((b ** 2).mean()))


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def images(model, count, seed):
    shape = np.load(ZOO / model["input_file"]).shape[1:] if "input_file" in model else \
        np.load(ZOO / model["file"].replace(".onnx", ".input.npy")).shape[1:]
    return np.random.default_rng(seed).standard_normal((count,) + shape).astype(np.float32)


@pytest.mark.parametrize("model", SINGLE, ids=[m["file"][:-5] for m in SINGLE])
def test_pruned_and_quantized_models_run_in_onnxruntime(model, release_models, tmp_path):
    source = ZOO / model["file"]
    calibration, test = images(model, 16, 1), images(model, 8, 2)
    np.save(tmp_path / "cal.npy", calibration)
    expected = run(source, test)
    pruned = tmp_path / "pruned.onnx"
    release_models("model", "compress", source, "--calibration-data", tmp_path / "cal.npy", "--prune-ratio", "0.3",
                   "--out", pruned)
    assert run(pruned, test).shape == expected.shape
    quantized = tmp_path / "int8.onnx"
    release_models("model", "compress", source, "--calibration-data", tmp_path / "cal.npy", "--quantize", "int8",
                   "--out", quantized)
    error = relative_rmse(run(quantized, test), expected)
    reference = model["ort_int8_rel_rmse"]
    assert error <= INT8_FACTOR * reference + INT8_MARGIN, f"int8 error {error:.4f}, onnxruntime's quantizer {reference:.4f}"


@pytest.mark.parametrize("name", ["vit_op17", "vit_dynamo"])
def test_vision_transformer_loses_whole_heads(name, release_models, tmp_path):
    """torchvision's nn.MultiheadAttention (fused in-projection, heads merged with the batch) pruned at 0.5: each
    layer keeps one of its two heads (Q, K and V thirds of 16 features, an output projection reading 16), and
    onnxruntime runs the result at batch 3 with the base model's output shape."""
    import onnx
    model = next(m for m in MANIFEST["models"] if m["file"] == f"{name}.onnx")
    np.save(tmp_path / "cal.npy", images(model, 8, 1))
    pruned = tmp_path / "pruned.onnx"
    release_models("model", "compress", ZOO / model["file"], "--calibration-data", tmp_path / "cal.npy",
                   "--prune-ratio", "0.5", "--out", pruned)
    test = images(model, 3, 2)
    assert run(pruned, test).shape == run(ZOO / model["file"], test).shape
    graph = onnx.load(str(pruned)).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    projections = [shapes[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in shapes]
    # Per layer: three thirds [32, 16], the output projection [16, 32], the MLP [32, 32] and [32, 32].
    assert projections.count([32, 16]) == 6 and projections.count([16, 32]) == 2, projections


# The goal is that the error at least halves. YOLO-style detectors fall short on these random-weight models
# fed noise: their error is dominated by rare images with extreme heads, which distillation on a few hundred images
# does not carry over to new ones (docs/architecture.md, "Recovery"); their floors guard the measured figures
# (YOLOv8 0.140 -> 0.091 relative RMSE, 0.65x, AMD EPYC 2026-12-06).
RECOVERY = [("vit_op17", 6, ("--lr", "0.05"), "logits", 0.5), ("lraspp_op17", 8, ("--lr", "0.1"), "pixels", 0.5),
            ("yolov8_op17", 20, ("--lr", "0.003", "--optimizer", "adam", "--batch-size", "16"), "logits", 0.75)]


@pytest.mark.parametrize("name,epochs,options,metric,goal", RECOVERY, ids=[r[0] for r in RECOVERY])
def test_pruned_models_recover_by_label_free_distillation(name, epochs, options, metric, goal, release_models, tmp_path):
    model = next(m for m in MANIFEST["models"] if m["file"] == f"{name}.onnx")
    source = ZOO / model["file"]
    np.save(tmp_path / "train.npy", images(model, 128, 7))
    test = images(model, 16, 6)
    expected = run(source, test)

    def error(path):
        y = run(path, test)
        if metric == "pixels":  # segmentation: the share of pixels whose class differs from the base model's
            return float((y.argmax(1) != expected.argmax(1)).mean())
        return relative_rmse(y, expected)

    results = {}
    for e in (0, epochs):
        out = tmp_path / f"recovered{e}.onnx"
        release_models("model", "compress", source, "--calibration-data", tmp_path / "train.npy", "--prune-ratio", "0.3",
                       "--finetune-epochs", e, "--train-data", tmp_path / "train.npy", "--distill", *options, "--out", out)
        results[e] = error(out)
    assert results[epochs] <= goal * results[0], f"{name}: error {results[0]:.3f} before fine-tuning, {results[epochs]:.3f} after"


MULTI = [m for m in MANIFEST["models"] if len(m["inputs"]) > 1]


@pytest.mark.parametrize("model", MULTI, ids=[m["file"][:-5] for m in MULTI])
def test_models_with_several_inputs_run_from_an_npz(model, coordinator, tmp_path):
    """`model run --input X.npz` feeds every input by name (BERT's int64 input_ids and attention_mask) and matches
    onnxruntime; one .npy, or an .npz missing an input, is refused naming what is missing."""
    name = model["file"][:-5]
    out = tmp_path / "out.npy"
    coordinator("model", "run", ZOO / model["file"], "--input", ZOO / f"{name}.inputs.npz", "--output", out)
    expected = np.load(ZOO / f"{name}.ort_output.npy")
    got = np.load(out)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    arrays = dict(np.load(ZOO / f"{name}.inputs.npz"))
    np.save(tmp_path / "ids.npy", arrays["input_ids"])
    refused = coordinator("model", "run", ZOO / model["file"], "--input", tmp_path / "ids.npy", "--output", out, check=False)
    assert refused.returncode == 1 and "input_ids=…, attention_mask=…" in refused.stderr, refused.stderr
    # `model inspect` counts MACs at a given sequence length, and says how to give one.
    seq = arrays["input_ids"].shape[1]
    shown = coordinator("model", "inspect", ZOO / model["file"], "--shape", f"input_ids=1x{seq}", "--shape",
                        f"attention_mask=1x{seq}", "--json")
    assert json.loads(shown.stdout)["summary"]["macs"] > 0
    refused = coordinator("model", "inspect", ZOO / model["file"], check=False)
    assert refused.returncode == 1 and "--shape" in refused.stderr, refused.stderr
    # `model bench` (forward and --train) feeds every input at a given sequence length, and says how to give one.
    for extra in ((), ("--train",)):
        timed = coordinator("model", "bench", ZOO / model["file"], "--batch-size", "4", "--iterations", "2", "--shape",
                            f"input_ids=1x{seq}", "--shape", f"attention_mask=1x{seq}", *extra, "--json")
        assert json.loads(timed.stdout)["imagesPerSecond"] > 0
    refused = coordinator("model", "bench", ZOO / model["file"], check=False)
    assert refused.returncode == 1 and "--shape input_ids" in refused.stderr, refused.stderr
    np.savez(tmp_path / "partial.npz", input_ids=arrays["input_ids"])
    refused = coordinator("model", "run", ZOO / model["file"], "--input", tmp_path / "partial.npz", "--output", out, check=False)
    assert refused.returncode == 1 and "no array for the model's input 'attention_mask'" in refused.stderr, refused.stderr


def token_batch(count, seed, seq=16, vocab=100):
    """Random token ids with random lengths, as scripts/make_zoo.py draws them (row 0 full, the others 4..seq valid
    tokens, id 1 first, 0 after the end)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(count, seq), dtype=np.int64)
    mask = np.ones((count, seq), dtype=np.int64)
    lengths = rng.integers(4, seq + 1, size=count)
    lengths[0] = seq
    for row, valid in enumerate(lengths):
        mask[row, valid:] = 0
        ids[row, valid:] = 0
    ids[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def run_named(path, inputs, optimized=True):
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, inputs)[0]


# Whittle keeps the attention mask's Add and its Softmax in float: onnxruntime's quantizer, with the same two nodes
# excluded, gives these errors on the zoo's encoders (MANIFEST "cause"); int8 must stay within the goal of 0.05.
ENCODER_INT8_GOAL = 0.05


@pytest.mark.parametrize("name,task", [("bert_cls_op17", "classification"), ("bert_embed_op17", "embedding")])
def test_encoders_compress_from_npz_token_data(name, task, release_models, tmp_path):
    """A BERT-style encoder compressed with int64 token ids and attention masks from .npz files: int8 QDQ runs in
    onnxruntime within the goal; heads and FFN neurons pruned at 0.5 recover by label-free distillation on the same
    kind of data (error against the base model at least halved), and the report gives the task's figures."""
    source = ZOO / f"{name}.onnx"
    np.savez(tmp_path / "cal.npz", **token_batch(64, 1))
    test = token_batch(16, 2)
    np.savez(tmp_path / "test.npz", **test)
    expected = run_named(source, test)
    quantized = tmp_path / "int8.onnx"
    release_models("model", "compress", source, "--calibration-data", tmp_path / "cal.npz", "--quantize", "int8",
                   "--task", task, "--out", quantized)
    error = relative_rmse(run_named(quantized, test), expected)
    assert error <= ENCODER_INT8_GOAL, f"{name}: int8 error {error:.4f}"

    reports = {}
    for epochs in (0, 20):
        out = tmp_path / f"pruned{epochs}.onnx"
        shown = release_models("model", "compress", source, "--calibration-data", tmp_path / "cal.npz",
                               "--val-data", tmp_path / "test.npz", "--prune-ratio", "0.5", "--train-data",
                               tmp_path / "cal.npz", "--finetune-epochs", epochs, "--distill", "--optimizer", "adam",
                               "--lr", "0.003", "--task", task, "--json", "--out", out)
        report = json.loads(shown.stdout)
        y = run_named(out, test)
        assert y.shape == expected.shape and report["after"]["macs"] * 1.3 <= report["before"]["macs"]
        assert report["task"] == task and report["after"]["samples"] == 16
        reports[epochs] = (report, y)
    before, after = reports[0], reports[20]
    if task == "classification":
        # KL at T = 4 matches the class distributions, not the logits' scale: the error is in the decisions.
        disagree = [float((y.argmax(1) != expected.argmax(1)).mean()) for _, y in (before, after)]
        assert disagree[1] <= 0.5 * disagree[0], f"{name}: top-1 disagreement {disagree}"
        assert after[0]["agreement"] == pytest.approx(1 - disagree[1], abs=1e-6)
    else:
        errors = [relative_rmse(y, expected) for _, y in (before, after)]
        assert errors[1] <= 0.5 * errors[0], f"{name}: error {errors}"
        assert after[0]["meanCosine"] > before[0]["meanCosine"]
        assert after[0]["relativeError"] == pytest.approx(errors[1], rel=1e-3)


# Whittle's output of a QDQ or MatMulNBits file agrees with onnxruntime's reference semantics (graph optimizations
# off) on the same file to this, relative to the output's largest magnitude: both dequantize the same codes exactly,
# only float summation order differs. (Optimized, onnxruntime fuses int4 DequantizeLinear → MatMul into MatMulNBits
# at accuracy level 4, which quantizes the activations to int8 on the fly: the errors below are measured that way,
# as the deployed model runs.)
SAME_FILE_TOLERANCE = 1e-4


def dequantized_weights(path):
    """Each int4 weight of a QDQ file dequantized by numpy from its codes, scales and zero points (per channel, or
    blocked along an axis), by the float weight's name."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_quantized") or init[node.input[0]].dtype == np.int32:
            continue
        q, s, z = (init[node.input[k]].astype(np.float32) for k in range(3))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
        if block:
            s, z = (np.take(np.repeat(t, block, axis=axis), range(q.shape[axis]), axis=axis) for t in (s, z))
        else:
            shape = [1] * q.ndim
            shape[axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        out[node.input[0][:-len("_quantized")]] = (q - z) * s
    return out


@pytest.mark.parametrize("name", ["bert_embed_op17", "vit_op17"])
def test_blockwise_int4_side_by_side_with_per_channel(name, release_models, tmp_path):
    """int4 weight-only quantization per output channel, and in blocks along K written as opset-21 blocked
    DequantizeLinear and as onnxruntime's MatMulNBits: each file runs in onnxruntime, Whittle runs it with the same
    output, smaller blocks reconstruct the weights more closely (measured by numpy from the files' codes and
    scales), and MatMulNBits holds exactly the blocked QDQ file's weights. Output errors against the float model are
    printed side by side: on these random-weight models they are dominated by how errors propagate, not by the
    weights' reconstruction."""
    import onnx
    from onnx import numpy_helper
    source = ZOO / f"{name}.onnx"
    if name.startswith("bert"):
        np.savez(tmp_path / "cal.npz", **token_batch(8, 1))
        calibration, test = tmp_path / "cal.npz", token_batch(16, 2)
    else:
        model = next(m for m in MANIFEST["models"] if m["file"] == f"{name}.onnx")
        np.save(tmp_path / "cal.npy", images(model, 8, 1))
        calibration, test = tmp_path / "cal.npy", {"input": images(model, 16, 2)}
    np.savez(tmp_path / "test.npz", **test)
    expected = run_named(source, test)
    floats = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(source)).graph.initializer}
    errors, deployed, weights = {}, {}, {}
    for label, args in [("per-channel", ()), ("qdq-32", ("--int4-block-size", "32")), ("qdq-16", ("--int4-block-size", "16")),
                        ("matmulnbits-32", ("--int4-format", "matmulnbits", "--int4-block-size", "32"))]:
        out = tmp_path / f"{label}.onnx"
        release_models("model", "compress", source, "--calibration-data", calibration, "--quantize", "int4-weights",
                       *args, "--out", out)
        ours = tmp_path / f"{label}.npy"
        release_models("model", "run", out, "--input", tmp_path / "test.npz", "--output", ours)
        reference = run_named(out, test, optimized=False)
        assert np.abs(np.load(ours) - reference).max() <= SAME_FILE_TOLERANCE * np.abs(reference).max(), label
        errors[label] = relative_rmse(reference, expected)
        deployed[label] = relative_rmse(run_named(out, test), expected)
        if label.startswith("matmulnbits"):
            ops = {n.op_type for n in onnx.load(str(out)).graph.node}
            assert "MatMulNBits" in ops and "DequantizeLinear" not in ops, ops
        else:
            d = dequantized_weights(out)
            assert d, label
            weights[label] = float(np.sqrt(sum(((d[k] - floats[k]) ** 2).sum() for k in d) / sum((floats[k] ** 2).sum() for k in d)))
    print(f"\n{name} int4, weight reconstruction error: " + ", ".join(f"{k} {v:.4f}" for k, v in weights.items())
          + "; output relative RMSE against float (onnxruntime reference): " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items())
          + "; optimized, as deployed: " + ", ".join(f"{k} {v:.4f}" for k, v in deployed.items()))
    assert weights["qdq-16"] < weights["qdq-32"] <= weights["per-channel"] * 1.0001
    assert errors["matmulnbits-32"] == pytest.approx(errors["qdq-32"], rel=1e-3)


def decoder_model(path):
    """A small segmentation decoder with transposed convolutions, as torch exports ConvTranspose2d (opset 17,
    weights [C_in, C_out, kH, kW]): Conv 3→16 stride 2 + Relu, ConvTranspose 16→12 stride 2 + Relu, ConvTranspose
    12→8 (3×3, pad 1) + Relu, Conv 8→3 (per-pixel logits)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(12)

    def weight(*shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", weight(16, 3, 3, 3, fan_in=27)), ("b1", np.zeros(16, np.float32)),
        ("w2", weight(16, 12, 2, 2, fan_in=16 * 4)), ("b2", (rng.standard_normal(12) * 0.1).astype(np.float32)),
        ("w3", weight(12, 8, 3, 3, fan_in=12 * 9)), ("b3", (rng.standard_normal(8) * 0.1).astype(np.float32)),
        ("w4", weight(3, 8, 1, 1, fan_in=8)), ("b4", np.zeros(3, np.float32))]]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("ConvTranspose", ["r1", "w2", "b2"], ["t2"], name="up1", strides=[2, 2]),
        helper.make_node("Relu", ["t2"], ["r2"], name="relu2"),
        helper.make_node("ConvTranspose", ["r2", "w3", "b3"], ["t3"], name="up2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t3"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 32, 32])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_transposed_convolutions_prune_and_quantize(release_models, tmp_path):
    """ConvTranspose layers prune (input channels on weight axis 0, outputs on axis 1, the bias with them) and quantize
    to int8 (per output channel on axis 1, int32 bias): both files run in onnxruntime with the float model's output
    shape; the pruned one has fewer MACs; the int8 one is as close to float as onnxruntime's quantizer gets."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    source = tmp_path / "decoder.onnx"
    decoder_model(source)
    calibration = np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32)
    test = np.random.default_rng(2).standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "cal.npy", calibration)
    expected = run(source, test)
    pruned = tmp_path / "pruned.onnx"
    shown = release_models("model", "compress", source, "--calibration-data", tmp_path / "cal.npy", "--prune-ratio", "0.3",
                           "--json", "--out", pruned)
    report = json.loads(shown.stdout)
    assert run(pruned, test).shape == expected.shape
    assert report["after"]["macs"] * 1.3 <= report["before"]["macs"], (report["before"]["macs"], report["after"]["macs"])
    assert not [f for f in report["pruning"]["frozen"] if f["group"] in ("up1", "up2")], report["pruning"]["frozen"]
    quantized = tmp_path / "int8.onnx"
    release_models("model", "compress", source, "--calibration-data", tmp_path / "cal.npy", "--quantize", "int8",
                   "--out", quantized)
    import onnx
    weights = {n.input[0] for n in onnx.load(str(quantized)).graph.node if n.op_type == "DequantizeLinear"}
    assert {"w2_quantized", "w3_quantized"} <= weights, weights
    ours = relative_rmse(run(quantized, test), expected)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.items, None)
    reference = tmp_path / "ort_int8.onnx"
    quantize_static(str(source), str(reference), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    theirs = relative_rmse(run(reference, test), expected)
    print(f"\ndecoder int8 relative RMSE: Whittle {ours:.4f}, onnxruntime's quantizer {theirs:.4f}; MACs at 0.3 "
          f"{report['before']['macs']} -> {report['after']['macs']}")
    assert ours <= INT8_FACTOR * theirs + INT8_MARGIN, (ours, theirs)
