"""Single-operator ONNX fixtures with onnxruntime's outputs, for Whittle's per-operator parity tests.

Run once by hand from the repository root with onnx, onnxruntime and numpy (the system Python that runs the interop
tests has them); the outputs are committed:

    python3 scripts/make_op_fixtures.py

Each case is one node built with onnx.helper at the opset it names: NAME.onnx, NAME.inputs.npz (every runtime
input, by name) and NAME.outputs.npz (every output, by name, from onnxruntime's CPU provider). Attributes and
constant inputs (axes, split sizes, target shapes) are initializers or attributes, as exporters write them; data
inputs are runtime inputs with fixed shapes. Inputs are random with fixed seeds, chosen in each operator's domain
(positive values for Log and Sqrt, integers with both signs for Mod). Written to Tests/Fixtures/ops/, with a
MANIFEST.json listing every case, its op type and opset, and the tool versions.
"""
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OUT = os.path.join("Tests", "Fixtures", "ops")
CASES = []

DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
          np.dtype(np.bool_): TensorProto.BOOL, np.dtype(np.int32): TensorProto.INT32}


def rng(seed):
    return np.random.default_rng(seed)


def case(name, op, inputs, attributes=None, opset=17, initializers=None, outputs=1, input_names=None, domain="",
         check=True):
    """`inputs`: runtime inputs (name -> array); `initializers`: constant inputs (name -> array), in the node's
    input order given by `input_names` (default: runtime inputs, then initializers); "" skips an optional input."""
    initializers = initializers or {}
    names = input_names or (list(inputs) + list(initializers))
    out_names = [f"y{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
    node = helper.make_node(op, names, out_names, name=f"{op}_0", domain=domain, **(attributes or {}))
    graph_inputs = [helper.make_tensor_value_info(k, DTYPES[v.dtype], list(v.shape)) for k, v in inputs.items()]
    graph_outputs = [helper.make_value_info(k, onnx.TypeProto()) for k in out_names]  # types filled in below
    graph = helper.make_graph([node], name, graph_inputs, graph_outputs,
                              initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="make_op_fixtures")
    model.ir_version = 8 if opset <= 17 else 10
    # Infer the output types so the file declares them (onnxruntime reports them too).
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for output in model.graph.output:
        if not output.type.HasField("tensor_type"):
            # onnx infers nothing for a few function ops (GroupNormalization-18): the output is shaped like input 0.
            output.type.CopyFrom(graph_inputs[0].type)
    try:
        if check:  # (GroupNormalization-18 is deprecated since opset 21, and the checker refuses it)
            onnx.checker.check_model(model, full_check=True)
    except Exception as error:
        raise SystemExit(f"{name}: {error}")
    path = os.path.join(OUT, f"{name}.onnx")
    onnx.save(model, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    results = session.run(None, inputs)
    np.savez(os.path.join(OUT, f"{name}.inputs.npz"), **inputs)
    np.savez(os.path.join(OUT, f"{name}.outputs.npz"), **dict(zip(out_names, results)))
    CASES.append({"name": name, "op_type": op, "opset": opset, "inputs": {k: list(v.shape) for k, v in inputs.items()},
                  "outputs": {k: [list(r.shape), str(r.dtype)] for k, r in zip(out_names, results)}})


def f32(seed, *shape, scale=1.0, positive=False):
    x = rng(seed).standard_normal(shape).astype(np.float32) * scale
    return np.abs(x) + np.float32(0.05) if positive else x


def i64(seed, *shape, low=-10, high=10):
    return rng(seed).integers(low, high, size=shape).astype(np.int64)


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    x = f32(1, 2, 3, 4)
    # Unary math.
    for op in ["Sqrt", "Log"]:
        case(f"{op.lower()}", op, {"x": f32(2, 2, 3, 4, positive=True)})
    for op in ["Exp", "Abs", "Neg", "Reciprocal", "Erf", "Floor", "Ceil"]:
        case(f"{op.lower()}", op, {"x": f32(3, 2, 3, 4, scale=2.0)})
    case("abs_int64", "Abs", {"x": i64(4, 3, 5)})
    case("neg_int64", "Neg", {"x": i64(5, 3, 5)})
    case("gelu_erf_op20", "Gelu", {"x": f32(6, 2, 8, scale=3.0)}, opset=20)
    case("gelu_tanh_op20", "Gelu", {"x": f32(7, 2, 8, scale=3.0)}, {"approximate": "tanh"}, opset=20)
    # Binary and variadic math.
    case("pow_square", "Pow", {"x": x}, initializers={"p": np.array(2.0, np.float32)})
    case("pow_sqrt", "Pow", {"x": f32(8, 2, 3, 4, positive=True)}, initializers={"p": np.array(0.5, np.float32)})
    case("pow_cube", "Pow", {"x": x}, initializers={"p": np.array(3.0, np.float32)})
    case("pow_broadcast", "Pow", {"x": f32(9, 2, 3, 4, positive=True), "p": f32(10, 4)})
    case("mod_int64", "Mod", {"a": i64(11, 4, 5, low=-20, high=20), "b": np.array([3, -3, 7, -7, 5], np.int64)})
    case("mod_int64_fmod", "Mod", {"a": i64(12, 4, 5, low=-20, high=20), "b": np.array([3, -3, 7, -7, 5], np.int64)},
         {"fmod": 1})
    case("mod_float_fmod", "Mod", {"a": f32(13, 3, 4, scale=5.0), "b": np.array([1.5, -2.0, 0.7, 3.0], np.float32)},
         {"fmod": 1})
    for op in ["Max", "Min", "Sum"]:
        case(f"{op.lower()}_3", op, {"a": f32(14, 2, 3, 4), "b": f32(15, 3, 1), "c": f32(16, 4)})
    case("max_int64", "Max", {"a": i64(17, 3, 4), "b": i64(18, 4)})
    # Comparisons, logic, Where.
    for op in ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"]:
        a = np.round(f32(19, 3, 4)).astype(np.float32)
        case(f"{op.lower()}_float", op, {"a": a, "b": np.round(f32(20, 4)).astype(np.float32)})
        case(f"{op.lower()}_int64", op, {"a": i64(21, 3, 4, low=-2, high=2), "b": i64(22, 1, 4, low=-2, high=2)})
    bools = {"a": rng(23).integers(0, 2, size=(3, 4)).astype(np.bool_), "b": rng(24).integers(0, 2, size=(4,)).astype(np.bool_)}
    for op in ["And", "Or", "Xor"]:
        case(op.lower(), op, bools)
    case("not", "Not", {"a": bools["a"]})
    case("where_float", "Where", {"c": bools["a"], "x": f32(25, 1, 4), "y": f32(26, 3, 1)})
    case("where_int64", "Where", {"c": bools["b"], "x": i64(27, 3, 4), "y": i64(28, 4)})
    case("where_mask_constants", "Where", {"c": rng(29).integers(0, 2, size=(2, 1, 1, 5)).astype(np.bool_)},
         initializers={"x": np.array(-3.4028234663852886e38, np.float32), "y": np.array(0.0, np.float32)},
         input_names=["c", "x", "y"])
    # Indexing.
    case("expand", "Expand", {"x": f32(30, 3, 1)}, initializers={"shape": np.array([2, 1, 4], np.int64)})
    case("expand_bidirectional", "Expand", {"x": f32(31, 2, 1, 4)}, initializers={"shape": np.array([3, 1], np.int64)})
    case("expand_int64", "Expand", {"x": i64(32, 2, 1, 1, 5)}, initializers={"shape": np.array([2, 1, 5, 5], np.int64)})
    case("tile", "Tile", {"x": f32(33, 2, 3)}, initializers={"repeats": np.array([2, 3], np.int64)})
    case("split_sizes", "Split", {"x": f32(34, 2, 8, 3)}, {"axis": 1},
         initializers={"split": np.array([2, 2, 4], np.int64)}, outputs=3)
    case("split_equal", "Split", {"x": f32(35, 2, 6)}, {"axis": -1}, outputs=3)
    case("split_num_outputs_op18", "Split", {"x": f32(36, 7, 2)}, {"axis": 0, "num_outputs": 3}, opset=18, outputs=3)
    case("split_attribute_op11", "Split", {"x": f32(37, 5, 2)}, {"axis": 0, "split": [1, 4]}, opset=11, outputs=2)
    idx = rng(38).integers(-3, 3, size=(2, 3, 2)).astype(np.int64)
    case("gather_elements", "GatherElements", {"x": f32(39, 2, 3, 3), "i": idx}, {"axis": 2})
    case("gather_elements_axis0", "GatherElements", {"x": f32(40, 3, 4), "i": rng(41).integers(0, 3, size=(2, 4)).astype(np.int64)})
    # Range needs no runtime input (its length must be known before running): hand-computed cases in Swift.
    case("gather_embedding", "Gather", {"ids": i64(42, 2, 5, low=0, high=10)},
         initializers={"table": f32(43, 10, 4)}, input_names=["table", "ids"])
    # Reductions.
    r = f32(44, 2, 3, 4, scale=2.0)
    case("reduce_sum_op13", "ReduceSum", {"x": r}, {"keepdims": 0}, initializers={"axes": np.array([1], np.int64)})
    case("reduce_sum_all_op13", "ReduceSum", {"x": r})
    case("reduce_sum_int64_op13", "ReduceSum", {"x": i64(45, 3, 4)}, initializers={"axes": np.array([-1], np.int64)})
    for op in ["ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare", "ReduceMean"]:
        case(f"{op[6:].lower()}_op13", op, {"x": r}, {"axes": [0, 2], "keepdims": 1}, opset=13)
        case(f"{op[6:].lower()}_op18", op, {"x": r}, {"keepdims": 0}, opset=18,
             initializers={"axes": np.array([-2], np.int64)})
    ties = np.array([[1, 3, 3, 0], [2, 2, 1, 2], [0, 0, 0, 0]], np.float32)
    case("argmax", "ArgMax", {"x": r}, {"axis": 1})
    case("argmax_last_nokeep", "ArgMax", {"x": ties}, {"axis": 1, "keepdims": 0, "select_last_index": 1})
    case("argmin", "ArgMin", {"x": ties}, {"axis": 0})
    # Normalization.
    case("layer_norm", "LayerNormalization", {"x": f32(46, 2, 5, 8, scale=3.0)}, {"epsilon": 1e-12},
         initializers={"g": f32(47, 8), "b": f32(48, 8)})
    case("layer_norm_axis1_no_bias", "LayerNormalization", {"x": f32(49, 2, 3, 4)}, {"axis": 1},
         initializers={"g": f32(50, 3, 4)})
    case("layer_norm_statistics", "LayerNormalization", {"x": f32(51, 2, 3, 6)}, {"epsilon": 1e-5},
         initializers={"g": f32(52, 6), "b": f32(53, 6)}, outputs=["y", "mean", "inv_std_dev"])
    case("layer_norm_runtime_scale", "LayerNormalization", {"x": f32(54, 4, 6), "g": f32(55, 6)})
    case("instance_norm", "InstanceNormalization", {"x": f32(56, 2, 3, 4, 5)},
         initializers={"g": f32(57, 3), "b": f32(58, 3)})
    case("group_norm_op18", "GroupNormalization", {"x": f32(59, 2, 6, 3, 3)}, {"num_groups": 3}, opset=18,
         initializers={"g": f32(60, 3), "b": f32(61, 3)}, check=False)
    case("group_norm_op21", "GroupNormalization", {"x": f32(62, 2, 6, 3, 3)}, {"num_groups": 2}, opset=21,
         initializers={"g": f32(63, 6), "b": f32(64, 6)})
    # Transposed convolutions (segmentation decoders, upsampling heads).
    case("conv_transpose_stride2", "ConvTranspose", {"x": f32(68, 2, 4, 5, 6)}, {"strides": [2, 2], "pads": [1, 1, 1, 1]},
         initializers={"w": f32(69, 4, 3, 3, 3), "b": f32(70, 3)})
    case("conv_transpose_output_padding", "ConvTranspose", {"x": f32(71, 1, 4, 5, 5)},
         {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1], "dilations": [1, 1]},
         initializers={"w": f32(72, 4, 2, 3, 3)})
    case("conv_transpose_grouped_dilated", "ConvTranspose", {"x": f32(73, 2, 4, 6, 4)},
         {"group": 2, "dilations": [2, 1], "strides": [1, 2]}, initializers={"w": f32(74, 4, 3, 2, 3), "b": f32(75, 6)})
    case("conv_transpose_output_shape", "ConvTranspose", {"x": f32(76, 1, 3, 4, 4)},
         {"strides": [2, 2], "output_shape": [8, 8]}, initializers={"w": f32(77, 3, 2, 3, 3)})
    case("conv_transpose_1d", "ConvTranspose", {"x": f32(78, 2, 3, 7)}, {"strides": [3], "pads": [1, 2]},
         initializers={"w": f32(79, 3, 2, 4)})
    # Einsum: attention's forms, a batched transpose-contract, a reduction, an ellipsis, three operands.
    case("einsum_scores", "Einsum", {"q": f32(80, 2, 3, 5, 4), "k": f32(81, 2, 3, 6, 4)}, {"equation": "bhid,bhjd->bhij"})
    case("einsum_context", "Einsum", {"p": f32(82, 2, 3, 5, 6), "v": f32(83, 2, 3, 6, 4)}, {"equation": "bhij,bhjd->bhid"})
    case("einsum_batched", "Einsum", {"a": f32(84, 3, 5, 4), "b": f32(85, 3, 6, 4)}, {"equation": "bid,bjd->bij"})
    case("einsum_transposed_output", "Einsum", {"a": f32(86, 4, 5), "b": f32(87, 5, 3)}, {"equation": "ij,jk->ki"})
    case("einsum_reduce", "Einsum", {"a": f32(88, 3, 4, 5)}, {"equation": "ijk->ik"})
    case("einsum_ellipsis", "Einsum", {"a": f32(89, 2, 3, 4, 5), "b": f32(90, 5, 6)}, {"equation": "...ij,jk->...ik"})
    case("einsum_three", "Einsum", {"a": f32(91, 3, 4), "b": f32(92, 4, 5), "c": f32(93, 5, 2)}, {"equation": "ij,jk,kl->il"})
    case("einsum_implicit", "Einsum", {"a": f32(94, 3, 4), "b": f32(95, 4, 5)}, {"equation": "ij,jk"})
    # An archive as np.savez_compressed writes it (deflated members), for the .npz reader's tests.
    np.savez_compressed(os.path.join(OUT, "compressed.npz"), ids=i64(65, 3, 7, low=0, high=100),
                        mask=rng(66).integers(0, 2, size=(3, 7)).astype(np.bool_), x=f32(67, 2, 5))
    manifest = {"generated_by": "scripts/make_op_fixtures.py", "onnx_version": onnx.__version__,
                "onnxruntime_version": ort.__version__, "numpy_version": np.__version__, "cases": CASES}
    with open(os.path.join(OUT, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"{len(CASES)} cases in {OUT}")


if __name__ == "__main__":
    main()
