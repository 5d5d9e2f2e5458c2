"""`coordinator model compress` against onnxruntime: every compressed file passes onnx's checker and runs in
onnxruntime with the accuracy Whittle predicted, the quantization parameters Whittle reports are the ones stored in
the file and the ones onnxruntime's own quantizer would compute, pruned models keep their output shape with fewer
parameters, and bad input is refused with a clear message."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import quant_utils

from conftest import FIXTURES, ROOT

# Whittle's predicted accuracy (the report's `after.accuracy`) must match what onnxruntime measures on the written
# file within this many percentage points. On the 512-sample demo set one sample is 0.195 points, so this allows a
# single prediction to flip (a float32 value on a QuantizeLinear rounding boundary, summed in a different order).
ACCURACY_TOLERANCE_POINTS = 0.2

# The pruned model sums fewer terms than the masked one; only the rounding of those sums may differ.
SURGERY_RTOL = 1e-5
DEMO_MODEL = ROOT / "examples" / "models" / "defect_cnn.onnx"
DEMO_X = ROOT / "examples" / "data" / "defects_test_x.npy"
DEMO_Y = ROOT / "examples" / "data" / "defects_test_y.npy"
CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
PRUNING_FIXTURES = ("resnet_bn_op13", "mobilenetv2_bn_op13", "resnet_folded_op17")
QUANT_TYPES = {"uint8": np.uint8, "int8": np.int8, "int32": np.int32}


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def load_checked(path):
    """The written model, after onnx's full checker (types and shapes included)."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def session(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized_path=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(path, x, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    s = session(path, level)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def ort_accuracy(path, x, y, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    return float((ort_logits(path, x, level).argmax(1) == y).mean())


def assert_accuracy_matches(measured, predicted, what):
    difference = abs(measured - predicted) * 100
    assert difference <= ACCURACY_TOLERANCE_POINTS, (
        f"{what}: onnxruntime measures {measured:.4%}, Whittle predicted {predicted:.4%} "
        f"({difference:.3f} points apart, tolerance {ACCURACY_TOLERANCE_POINTS})")


def parameter_count(model):
    """Elements over all initializers, the way Whittle's report counts `parameters`."""
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


def initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def weight_input_producer(model, node):
    """The node that produces `node`'s weight (input 1), or None when the weight is an initializer."""
    producers = {out: n for n in model.graph.node for out in n.output}
    return producers.get(node.input[1])


def compress(runner, tmp_path, model, *args, calibration=DEMO_X, labels=DEMO_Y, name="out"):
    """Runs `model compress`; returns (written model path, parsed report)."""
    out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
    extra = ("--labels", labels) if labels is not None else ()
    runner("model", "compress", model, "--calibration-data", calibration, *extra, *args, "--out", out,
           "--report", report)
    return out, json.loads(report.read_text())


def demo_data():
    return np.load(DEMO_X), np.load(DEMO_Y)


def folded_float_weight(float_model, weight_name):
    """The float weight as Whittle quantizes it: a BatchNormalization right after the Conv folded in,
    W' = W * gamma / sqrt(var + eps) per output channel (what onnxruntime's quant_pre_process does first)."""
    inits = initializers(float_model)
    w = inits[weight_name]
    node = next(n for n in float_model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] == weight_name)
    readers = [n for n in float_model.graph.node if node.output[0] in n.input]
    if len(readers) == 1 and readers[0].op_type == "BatchNormalization":
        bn = readers[0]
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, _, _, var = (inits[i] for i in bn.input[1:])
        w = w * (gamma / np.sqrt(var + np.float32(eps))).astype(np.float32).reshape(-1, *([1] * (w.ndim - 1)))
    return w


def assert_weight_scales_match_onnxruntime(report, float_model):
    """Per-output-channel symmetric int8 weight scales as onnxruntime's quantizer computes them (quantize_data:
    channel min/max, compute_scale_zp(symmetric=True) with get_qmin_qmax_for_qType(INT8, reduce_range, symmetric))."""
    reduce_range = report["quantization"]["reduceRange"]
    qmin, qmax = quant_utils.get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=reduce_range, symmetric=True)
    weights = [t for t in report["quantization"]["tensors"] if t["role"] == "weight"]
    assert weights
    for entry in weights:
        assert entry["type"] == "int8" and entry["axis"] == 0, entry["name"]
        w = folded_float_weight(float_model, entry["name"])
        assert len(entry["scales"]) == w.shape[0], entry["name"]
        for c in range(w.shape[0]):
            zero_point, scale = quant_utils.compute_scale_zp(
                np.array(w[c].min(), np.float32), np.array(w[c].max(), np.float32), qmin, qmax, symmetric=True)
            assert entry["scales"][c] == pytest.approx(float(scale), rel=1e-6), f"{entry['name']} channel {c}"
            assert entry["zeroPoints"][c] == int(zero_point), f"{entry['name']} channel {c}"


def assert_clean_failure(result, *phrases):
    """A refused run: an ordinary non-zero exit (not a signal), the key phrase(s) in stderr, no crash output."""
    assert result.returncode > 0, f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    for phrase in phrases:
        assert phrase in result.stderr, f"expected {phrase!r} in stderr:\n{result.stderr}"
    for crash in ("Traceback", "Fatal error", "Stack dump", "Segmentation fault"):
        assert crash not in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------------------------
# 1-2. int8 accuracy as predicted, with and without reduce_range


def test_int8_reduce_range_accuracy_matches_prediction_and_fuses(release_models, tmp_path):
    out, report = compress(release_models, tmp_path, DEMO_MODEL, "--quantize", "int8", "--reduce-range")
    model = load_checked(out)
    x, y = demo_data()
    predicted = report["after"]["accuracy"]
    assert report["after"]["samples"] == len(y)
    assert report["quantization"]["reduceRange"] is True
    assert report["before"]["accuracy"] == ort_accuracy(DEMO_MODEL, x, y)
    assert report["after"]["parameters"] == parameter_count(model)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        assert_accuracy_matches(ort_accuracy(out, x, y, level), predicted, f"int8 reduce-range, {level}")

    # 7-bit weights: onnxruntime's reduce_range range for int8 weights is [-64, 64].
    qmin, qmax = quant_utils.get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=True, symmetric=True)
    for name, values in initializers(model).items():
        if name.endswith("weight_quantized"):
            assert qmin <= values.min() and values.max() <= qmax, name
    assert_weight_scales_match_onnxruntime(report, onnx.load(str(DEMO_MODEL)))

    # onnxruntime's QDQ fusion recognises every Conv's Q/DQ pattern and replaces it by QLinearConv, which it only
    # does when the QDQ nodes sit where its own quantizer would put them.
    optimized = tmp_path / "optimized.onnx"
    session(out, optimized_path=optimized)
    fused = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(DEMO_MODEL)).graph.node)
    assert fused.count("QLinearConv") == convs, fused
    assert "Conv" not in fused, fused
    # With asymmetric uint8 activations onnxruntime's quantizer removes every Relu after a quantized Conv (the
    # output range [0, max] clips for it); so must Whittle.
    assert "Relu" not in [n.op_type for n in model.graph.node]
    assert len(report["quantization"]["removedNodes"]) == sum(
        n.op_type == "Relu" for n in onnx.load(str(DEMO_MODEL)).graph.node)


def test_compact_names_keep_outputs_and_shrink_the_file(release_models, tmp_path):
    """--compact-names renames every internal value and node: the same outputs in onnxruntime, QLinearConv fusion
    intact, a smaller file, and the report maps each old name to its new one."""
    plain_dir, compact_dir = tmp_path / "plain", tmp_path / "compact"
    plain_dir.mkdir()
    compact_dir.mkdir()
    plain, _ = compress(release_models, plain_dir, DEMO_MODEL, "--quantize", "int8", "--reduce-range")
    compact, report = compress(release_models, compact_dir, DEMO_MODEL, "--quantize", "int8", "--reduce-range",
                               "--compact-names")
    x, _ = demo_data()
    a, b = session(plain), session(compact)
    np.testing.assert_array_equal(a.run(None, {"input": x[:64]})[0], b.run(None, {"input": x[:64]})[0])
    assert compact.stat().st_size < 0.9 * plain.stat().st_size, (compact.stat().st_size, plain.stat().st_size)
    model = load_checked(compact)
    renamed = report["renamedValues"]
    assert renamed and all(n.name.startswith("n") for n in model.graph.node)
    inits = {i.name for i in model.graph.initializer}
    assert renamed["features.0.0.weight_quantized"] in inits
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    optimized = tmp_path / "optimized.onnx"
    session(compact, optimized_path=optimized)
    assert "Conv" not in [n.op_type for n in onnx.load(str(optimized)).graph.node]


def test_int8_full_range_unoptimized_accuracy_matches_prediction(release_models, tmp_path):
    out, report = compress(release_models, tmp_path, DEMO_MODEL, "--quantize", "int8")
    load_checked(out)
    assert report["quantization"]["reduceRange"] is False
    x, y = demo_data()
    # Full-range (8-bit) int8 weights: onnxruntime's fused u8xs8 kernels on x86 without AVX-VNNI saturate their
    # 16-bit intermediate sums (the reason onnxruntime offers reduce_range), so the optimized session legitimately
    # differs from the QDQ graph's arithmetic; only the graph as written (ORT_DISABLE_ALL) is compared.
    measured = ort_accuracy(out, x, y, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert_accuracy_matches(measured, report["after"]["accuracy"], "int8 full range, ORT_DISABLE_ALL")


# ----------------------------------------------------------------------------------------------------------------
# 3-4. Calibration methods: reported parameters are the stored ones and onnxruntime's own


@pytest.fixture(scope="module", params=CALIBRATION_METHODS)
def calibrated(request, release_models, tmp_path_factory):
    """(method, written model path, report) for an int8 run with each calibration method (run once per module)."""
    method = request.param
    tmp = tmp_path_factory.mktemp(f"calibration_{method}")
    out, report = compress(release_models, tmp, DEMO_MODEL, "--quantize", "int8", "--calibration", method,
                           labels=None)
    return method, out, report


def test_calibration_report_matches_stored_scales(calibrated):
    method, out, report = calibrated
    model = load_checked(out)
    x, _ = demo_data()
    assert ort_logits(out, x[:8]).shape == (8, 4)
    assert report["quantization"]["calibration"] == method
    inits = initializers(model)
    entries = {t["name"]: t for t in report["quantization"]["tensors"]}
    matched = set()
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        # Which report entry this node carries: a weight/bias DQ reads `<name>_quantized`; an activation Q reads
        # `<name>` itself (a shared activation, e.g. Flatten's output, reuses its source's scale initializer); any
        # other Q/DQ (an activation DQ, a graph output's renamed Q) is known by its scale `<name>_scale`.
        scale_name, zero_point_name = node.input[1], node.input[2]
        keys = (node.input[0], node.input[0].removesuffix("_quantized"),
                scale_name.removesuffix("_scale").removesuffix("_quantized"))
        entry = next((entries[k] for k in keys if k in entries), None)
        assert entry is not None, f"{node.op_type} {node.name}: no report entry for any of {keys}"
        matched.add(entry["name"])
        scale, zero_point = inits[scale_name], inits[zero_point_name]
        np.testing.assert_array_equal(scale.reshape(-1), np.array(entry["scales"], np.float32),
                                      err_msg=f"{node.name}: stored scale differs from the report's")
        np.testing.assert_array_equal(zero_point.reshape(-1), np.array(entry["zeroPoints"]),
                                      err_msg=f"{node.name}: stored zero point differs from the report's")
        assert zero_point.dtype == QUANT_TYPES[entry["type"]], f"{node.name}: {zero_point.dtype} vs {entry['type']}"
        if scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            assert axis == entry["axis"], node.name
        if entry["role"] in ("weight", "bias"):
            assert node.op_type == "DequantizeLinear" and node.input[0] == entry["name"] + "_quantized"
            assert inits[node.input[0]].dtype == QUANT_TYPES[entry["type"]], node.name
        if entry["role"] == "weight":
            assert scale_name == entry["name"] + "_scale", node.name
        if entry["role"] == "activation":
            assert scale_name == entry.get("sharedWith", entry["name"]) + "_scale", node.name
    assert matched == set(entries), f"report entries with no Q/DQ node in the file: {set(entries) - matched}"


def test_scales_equal_onnxruntime_compute_scale_zp(calibrated):
    _, _, report = calibrated
    activation_type = report["quantization"]["activationType"]
    assert activation_type == "uint8" and report["quantization"]["symmetricActivations"] is False
    qmin, qmax = quant_utils.get_qmin_qmax_for_qType(TensorProto.UINT8)
    activations = [t for t in report["quantization"]["tensors"] if t["role"] == "activation" and "min" in t]
    assert len(activations) >= 8
    for entry in activations:
        zero_point, scale = quant_utils.compute_scale_zp(
            np.array(entry["min"], np.float32), np.array(entry["max"], np.float32), qmin, qmax)
        assert entry["scales"] == [pytest.approx(float(scale), rel=1e-6)], entry["name"]
        assert entry["zeroPoints"] == [int(zero_point)], entry["name"]
    assert_weight_scales_match_onnxruntime(report, onnx.load(str(DEMO_MODEL)))


# ----------------------------------------------------------------------------------------------------------------
# 5-6. int4 weights and mixed precision


def test_int4_weights(release_models, tmp_path):
    out, report = compress(release_models, tmp_path, DEMO_MODEL, "--quantize", "int4-weights")
    model = load_checked(out)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 21)]
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    dq = weight_input_producer(model, gemm)
    assert dq is not None and dq.op_type == "DequantizeLinear", "the Gemm weight is not dequantized"
    stored = next(i for i in model.graph.initializer if i.name == dq.input[0])
    assert stored.data_type == TensorProto.INT4, TensorProto.DataType.Name(stored.data_type)
    values = numpy_helper.to_array(stored)
    assert -8 <= values.min() and values.max() <= 7
    assert {l["node"]: l["precision"] for l in report["quantization"]["layers"]}[gemm.name] == "int4-weights"
    x, y = demo_data()
    assert_accuracy_matches(ort_accuracy(out, x, y), report["after"]["accuracy"], "int4-weights")


def test_mixed_keeps_first_and_last_layers_float(release_models, tmp_path):
    out, report = compress(release_models, tmp_path, DEMO_MODEL, "--quantize", "mixed")
    model = load_checked(out)
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    first, last = weighted[0], weighted[-1]
    for node in (first, last):
        producer = weight_input_producer(model, node)
        assert producer is None or producer.op_type != "DequantizeLinear", f"{node.name} weight is quantized"
        assert node.input[1] in initializers(model), node.name
    for node in weighted[1:-1]:
        assert weight_input_producer(model, node).op_type == "DequantizeLinear", f"{node.name} stayed float"
    precision = {l["node"]: l["precision"] for l in report["quantization"]["layers"]}
    assert precision[first.name] == precision[last.name] == "float"
    x, y = demo_data()
    assert_accuracy_matches(ort_accuracy(out, x, y), report["after"]["accuracy"], "mixed")


# ----------------------------------------------------------------------------------------------------------------
# 7. Pruning


@pytest.fixture(scope="module")
def random_calibration(tmp_path_factory):
    """The fixtures have no labels: calibrate (and score importance) on standard normal samples."""
    path = tmp_path_factory.mktemp("pruning") / "calibration.npy"
    np.save(path, np.random.default_rng(0).standard_normal((16, 3, 32, 32), np.float32))
    return path


def concat_model(path):
    """conv A (3→4, 3×3) → Relu and conv B (3→6, 1×1) → Concat (10) → depthwise 3×3 → conv C (10→8) → Relu →
    GlobalAveragePool → Flatten → Gemm (8→3): Concat maps channels by offset, the depthwise conv joins both groups."""
    rng = np.random.default_rng(1)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)

    def conv(name, x, y, weight, bias, k=1, group=1):
        return helper.make_node("Conv", [x, weight, bias], [y], name=name, kernel_shape=[k, k],
                                pads=[k // 2] * 4, group=group)

    nodes = [conv("convA", "x", "a0", "wA", "bA", 3), helper.make_node("Relu", ["a0"], ["a"], name="reluA"),
             conv("convB", "x", "b", "wB", "bB"),
             helper.make_node("Concat", ["a", "b"], ["c"], name="cat", axis=1),
             conv("dw", "c", "c2", "wD", "bD", 3, 10), conv("convC", "c2", "d0", "wC", "bC"),
             helper.make_node("Relu", ["d0"], ["d"], name="reluC"),
             helper.make_node("GlobalAveragePool", ["d"], ["e"], name="gap"),
             helper.make_node("Flatten", ["e"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wF", "bF"], ["logits"], name="fc", transB=1)]
    inits = [w("wA", 4, 3, 3, 3), w("bA", 4), w("wB", 6, 3, 1, 1), w("bB", 6), w("wD", 10, 1, 3, 3), w("bD", 10),
             w("wC", 8, 10, 1, 1), w("bC", 8), w("wF", 3, 8), w("bF", 3)]
    graph = helper.make_graph(nodes, "concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


@pytest.mark.parametrize("scope", ["local", "global"])
def test_concat_pruning_equals_masking_in_onnxruntime(coordinator, tmp_path, random_calibration, scope):
    """An independent check of surgery: zero, in the original model, every parameter slice of the channels the report
    says were removed (rows and biases of producers and the depthwise conv, Concat-offset columns of conv C, Gemm
    columns); onnxruntime must give the same outputs for that masked model and for Whittle's pruned one."""
    original = concat_model(tmp_path / "concat.onnx")
    out, report = compress(coordinator, tmp_path, tmp_path / "concat.onnx", "--prune-ratio", "0.5", "--prune-scope",
                           scope, calibration=random_calibration, labels=None)
    kept = {g["group"]: g["keptIndices"] for g in report["pruning"]["groups"]}
    assert set(kept) == {"convA", "convB", "convC"}, kept
    weights = {t.name: numpy_helper.to_array(t).copy() for t in original.graph.initializer}
    for group, offset, producer in (("convA", 0, "A"), ("convB", 4, "B"), ("convC", None, "C")):
        removed = sorted(set(range(len(weights["w" + producer]))) - set(kept[group]))
        assert removed, f"{group} lost no channel"
        weights["w" + producer][removed] = 0
        weights["b" + producer][removed] = 0
        if offset is not None:
            positions = [offset + k for k in removed]
            weights["wD"][positions] = 0
            weights["bD"][positions] = 0
            weights["wC"][:, positions] = 0
        else:
            weights["wF"][:, removed] = 0
    masked = onnx.ModelProto()
    masked.CopyFrom(original)
    del masked.graph.initializer[:]
    masked.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.save(masked, str(tmp_path / "masked.onnx"))
    pruned = load_checked(out)
    assert parameter_count(pruned) < parameter_count(original)
    x = np.load(random_calibration)
    expected = ort_logits(tmp_path / "masked.onnx", x)
    np.testing.assert_allclose(ort_logits(out, x), expected, rtol=SURGERY_RTOL, atol=SURGERY_RTOL * np.abs(expected).max())


@pytest.mark.parametrize("scope", ["local", "global-round8"])
@pytest.mark.parametrize("name", PRUNING_FIXTURES)
def test_pruned_fixture_runs_with_fewer_parameters(coordinator, tmp_path, random_calibration, name, scope):
    source = FIXTURES / f"{name}.onnx"
    extra = ("--prune-scope", "global", "--round-to", "8") if scope == "global-round8" else ()
    out, report = compress(coordinator, tmp_path, source, "--prune-ratio", "0.3", "--importance", "l1", *extra,
                           calibration=random_calibration, labels=None)
    original, pruned = onnx.load(str(source)), load_checked(out)

    x = np.load(FIXTURES / f"{name}.input.npy")
    assert x.shape[0] == 4
    assert ort_logits(out, x).shape == ort_logits(source, x).shape

    assert parameter_count(pruned) < parameter_count(original)
    assert report["before"]["parameters"] == parameter_count(original)
    assert report["after"]["parameters"] == parameter_count(pruned)

    # Whittle's top-1 agreement with the original, on the calibration samples, as onnxruntime measures it (within
    # one sample of 16, for near-ties in these randomly initialised networks).
    calibration = np.load(random_calibration)
    agreement = float((ort_logits(out, calibration).argmax(1) == ort_logits(source, calibration).argmax(1)).mean())
    assert abs(report["agreement"] - agreement) <= 1 / 16 + 1e-9

    if scope == "global-round8":
        before = {i.name: list(i.dims) for i in original.graph.initializer}
        after = {i.name: list(i.dims) for i in pruned.graph.initializer}
        for node in pruned.graph.node:
            if node.op_type in ("Conv", "Gemm") and after[node.input[1]][0] != before[node.input[1]][0]:
                assert after[node.input[1]][0] % 8 == 0, f"{node.name}: {after[node.input[1]][0]} channels kept"


@pytest.mark.parametrize("importance", ["taylor", "apoz"])
def test_data_driven_importance_accuracy_matches_prediction(release_models, tmp_path, importance):
    out, report = compress(release_models, tmp_path, DEMO_MODEL, "--prune-ratio", "0.3",
                           "--importance", importance)
    pruned = load_checked(out)
    assert report["pruning"]["criterion"] == importance
    assert report["after"]["parameters"] == parameter_count(pruned) < report["before"]["parameters"]
    x, y = demo_data()
    assert_accuracy_matches(ort_accuracy(out, x, y), report["after"]["accuracy"], f"pruned by {importance}")


def test_pruning_report_lists_kept_channel_indices(coordinator, tmp_path, random_calibration):
    _, report = compress(coordinator, tmp_path, FIXTURES / "resnet_bn_op13.onnx", "--prune-ratio", "0.3",
                         calibration=random_calibration, labels=None)
    groups = report["pruning"]["groups"]
    assert groups
    for g in groups:
        kept = g["keptIndices"]
        assert len(kept) == g["kept"], f"{g['group']}: kept {g['kept']}, keptIndices {kept}"
        assert kept == sorted(set(kept)) and all(0 <= i < g["channels"] for i in kept), g["group"]


# ----------------------------------------------------------------------------------------------------------------
# 8. Bad input


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files for the refusal tests, keyed by name."""
    tmp = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    model = onnx.load(str(DEMO_MODEL))
    channels, height, width = (d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    assert (channels, height, width) == (3, 32, 32)  # the demo model's input, batch first
    files = {}

    def save(name, array):
        files[name] = tmp / f"{name}.npy"
        np.save(files[name], array)

    save("good", rng.standard_normal((8, channels, height, width), np.float32))
    save("mismatch", rng.standard_normal((4, channels, 16, 16), np.float32))
    save("empty", np.zeros((0, channels, height, width), np.float32))
    nan = rng.standard_normal((8, channels, height, width), np.float32)
    nan[3, 1, 2, 3] = np.nan
    save("nan", nan)
    save("three_labels", np.array([0, 1, 2], np.int64))
    save("small", rng.standard_normal((4, 3, 8, 8), np.float32))

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])
    w_value = rng.standard_normal((4, 3, 3, 3), np.float32)

    def save_model(name, nodes, inputs, outputs, inits=()):
        m = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits)),
                              opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        files[name] = tmp / f"{name}.onnx"
        onnx.save(m, str(files[name]))

    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4, 6, 6])
    # The Conv weight W is a second graph input, not an initializer.
    save_model("weight_input", [helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")],
               [x, helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3, 3, 3])], [y])
    # One graph input; the first Conv's weight is computed (Identity of an initializer), the second's reaches the
    # graph output: no channel group can be pruned.
    z = helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 4, 4, 4])
    save_model("weight_computed",
               # Neg, not Identity: an Identity (or Constant) of an initializer becomes an initializer itself.
               [helper.make_node("Neg", ["W0"], ["W"], name="negate"),
                helper.make_node("Conv", ["X", "W"], ["Y"], name="conv"),
                helper.make_node("Conv", ["Y", "W2"], ["Z"], name="conv2")],
               [x], [z], [numpy_helper.from_array(w_value, "W0"),
                          numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3), np.float32), "W2")])
    # One Conv whose weight comes from a Constant node.
    save_model("weight_constant",
               [helper.make_node("Constant", [], ["W"], name="w", value=numpy_helper.from_array(w_value, "Wc")),
                helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")], [x], [y])
    files["random_bytes"] = tmp / "random_bytes.onnx"
    files["random_bytes"].write_bytes(np.random.default_rng(1).bytes(4096))
    return files


# (id, model, calibration data, extra arguments, key phrases of the error message)
BAD_INPUT_CASES = [
    ("prune_ratio_one", "demo", "good", ("--prune-ratio", "1.0"), ("--prune-ratio must be in [0, 1)", "1.0")),
    # `--prune-ratio -0.1` as two words is taken by the argument parser for an option ("Missing value"); the
    # attached form reaches Whittle's own range check.
    ("prune_ratio_negative", "demo", "good", ("--prune-ratio=-0.1",), ("--prune-ratio must be in [0, 1)", "-0.1")),
    ("shape_mismatch", "demo", "mismatch", ("--quantize", "int8"), ("expects shape [batch, 3, 32, 32]", "axis 2 differs")),
    ("empty_calibration", "demo", "empty", ("--quantize", "int8"), ("has shape [0, 3, 32, 32]", "N ≥ 1")),
    ("nan_calibration", "demo", "nan", ("--quantize", "int8"), ("non-finite",)),
    ("label_count", "demo", "good", ("--labels", "three_labels", "--quantize", "int8"),
     ("three_labels.npy has shape [3]; expected [8], one label per sample",)),
    # Whittle refuses this model before pruning: it feeds one graph input and W is a second one.
    ("weight_is_graph_input", "weight_input", "small", ("--prune-ratio", "0.5"), ("the model has 2 inputs",)),
    ("weight_not_initializer", "weight_computed", "small", ("--prune-ratio", "0.5"),
     ("no channel group of this model can be pruned", "has weights that are not an initializer")),
    ("keep_float_unknown_node", "demo", "good", ("--quantize", "int8", "--keep-float", "NO_SUCH_NODE"),
     ("no node is called 'NO_SUCH_NODE'",)),
    ("malformed_model", "random_bytes", "good", ("--quantize", "int8"), ("not a valid ONNX model",)),
    # A single Conv whose weight comes from a Constant node: the Constant becomes an initializer, and the message
    # still gives the reason its only group stays (rather than end at the colon).
    ("weight_constant_node", "weight_constant", "small", ("--prune-ratio", "0.5"),
     ("no channel group of this model can be pruned", "conv: they reach graph output 'Y'")),
]


@pytest.mark.parametrize("case, model, data, args, phrases",
                         [pytest.param(*case, id=case[0]) for case in BAD_INPUT_CASES])
def test_bad_input_is_refused_cleanly(coordinator, tmp_path, bad_inputs, case, model, data, args, phrases):
    model_path = DEMO_MODEL if model == "demo" else bad_inputs[model]
    args = [bad_inputs[a] if a in bad_inputs else a for a in args]
    out = tmp_path / "out.onnx"
    result = coordinator("model", "compress", model_path, "--calibration-data", bad_inputs[data], *args,
                         "--out", out, check=False)
    assert_clean_failure(result, *phrases)
    assert not out.exists(), f"{case}: a model was written although the run failed"


def test_shape_mismatch_message_names_the_data_shape(coordinator, tmp_path, bad_inputs):
    result = coordinator("model", "compress", DEMO_MODEL, "--calibration-data", bad_inputs["mismatch"],
                         "--quantize", "int8", "--out", tmp_path / "out.onnx", check=False)
    assert_clean_failure(result, "expects shape [batch, 3, 32, 32]")
    assert "[4, 3, 16, 16]" in result.stderr, result.stderr
