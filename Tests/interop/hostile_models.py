"""Hostile and malformed inputs for Whittle's model commands: ONNX models, raw model bytes and .npy files that a
release binary must refuse with a clear error and exit status 1 — never a trap, a signal, a hang or a huge
allocation.

Every file here is tiny: hostile sizes come from shape, attribute and header VALUES (a Reshape target of
[2**32, 2**32], an .npy header claiming 2**62 elements), never from large data. Nothing here is checked with
`onnx.checker`: most of these models are invalid on purpose.

A case is a `Case`; its first four fields are the (name, model, description, commands) the suite is built from:

- `model`: an `onnx.ModelProto` (serialized as is), raw `bytes` (written as is), a `pathlib.Path` (an existing file,
  copied) or a callable `write(path)` that creates the model file itself (e.g. a sparse file).
- `commands`: which of `inspect` (`coordinator model inspect MODEL`) and `run` (`coordinator model run MODEL
  --input X.npy --output Y.npy`) the case is run with; each must exit 1.
- `input`: for `run`, the input .npy — a numpy array (saved with numpy.save) or raw bytes; default `default_input()`,
  a valid batch for the declared input X [N, 1, 4, 4].
- `setup(folder)`: creates extra files next to the model (external-data files, symlinks, FIFOs).
- `expect`: substrings (case-insensitive) the error message must contain; `forbid`: text that must not appear in
  stdout or stderr (e.g. the contents of a file the model tried to read).
- `lenient`: the model is extreme but VALID per the ONNX spec (onnxruntime runs it), so computing it (exit 0) is as
  fine as a clean refusal (exit 1); a crash, hang or huge allocation still fails.

`baseline_cases()` are the same templates with harmless values: they must be accepted (exit 0), which shows that
each hostile case is refused for its hostile part and not because the template is broken.
"""
import os
import pathlib
import random
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
from onnx import AttributeProto, ModelProto, TensorProto, helper

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "Tests" / "Fixtures" / "models"
SMALLCNN = FIXTURES / "smallcnn_dynamo.onnx"
SMALLCNN_INPUT = FIXTURES / "smallcnn_dynamo.input.npy"

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
FLOAT, INT64, INT8 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT8
OPSET = 17
BOTH = ("inspect", "run")
INSPECT = ("inspect",)
RUN = ("run",)


class Case(NamedTuple):
    name: str
    model: Any
    description: str
    commands: tuple = BOTH
    input: Any = None
    setup: Optional[Callable[[pathlib.Path], None]] = None
    expect: tuple = ()
    forbid: tuple = ()
    lenient: bool = False


def default_input(shape=(1, 1, 4, 4)):
    """A valid, finite float32 batch for X."""
    count = int(np.prod(shape))
    return (np.arange(count, dtype=np.float32) / max(count, 1)).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------

def x_info(shape=("N", 1, 4, 4), name="X", elem=FLOAT):
    return helper.make_tensor_value_info(name, elem, list(shape) if shape is not None else None)


def y_info(name="Y", elem=FLOAT):
    return helper.make_tensor_value_info(name, elem, None)


def ints(name, values, dims=None):
    values = [int(v) for v in values]
    return helper.make_tensor(name, INT64, [len(values)] if dims is None else dims, values)


def floats(name, values, dims=None):
    values = [float(v) for v in values]
    return helper.make_tensor(name, FLOAT, [len(values)] if dims is None else dims, values)


def build(nodes, initializers=(), inputs=None, outputs=None, opset=OPSET, ir_version=8, opsets=None):
    """A model over X [N, 1, 4, 4] (by default) with output Y (by default)."""
    graph = helper.make_graph(list(nodes), "hostile", [x_info()] if inputs is None else list(inputs),
                              [y_info()] if outputs is None else list(outputs), list(initializers))
    imports = [helper.make_opsetid("", opset)] if opsets is None else list(opsets)
    model = helper.make_model(graph, opset_imports=imports, producer_name="whittle-hostile-tests")
    model.ir_version = ir_version
    return model


def single(op, extra_inputs=(), initializers=(), x="X", inputs=None, **attributes):
    """Y = op(X, *extra_inputs; attributes)."""
    node = helper.make_node(op, [x, *extra_inputs], ["Y"], name=f"hostile_{op.lower()}", **attributes)
    return build([node], initializers, inputs=inputs)


def conv(**attributes):
    """Conv of X [N, 1, 4, 4] with a 3x3 weight (or the attributes' kernel)."""
    weight = floats("W", [0.1] * 9, dims=[1, 1, 3, 3])
    return single("Conv", ["W"], [weight], **attributes)


def reshape(target, **attributes):
    return single("Reshape", ["shape"], [ints("shape", target)], **attributes)


def constant_of_shape(shape):
    """H = ConstantOfShape(shape) as a second output; Y = Relu(X)."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["H"], name="hostile_constantofshape"),
             helper.make_node("Relu", ["X"], ["Y"], name="relu")]
    return build(nodes, [ints("shape", shape)], outputs=[y_info(), y_info("H")])


def pool(op="MaxPool", **attributes):
    return single(op, **attributes)


def pad(pads, axes=None):
    extra, inits = ["pads"], [ints("pads", pads)]
    if axes is not None:
        extra += ["", "axes"]
        inits.append(ints("axes", axes))
    return single("Pad", extra, inits, mode="constant")


def slice_(starts, ends, axes=None, steps=None):
    extra, inits = ["starts", "ends"], [ints("starts", starts), ints("ends", ends)]
    if axes is not None or steps is not None:
        extra.append("axes")
        inits.append(ints("axes", axes if axes is not None else list(range(len(starts)))))
    if steps is not None:
        extra.append("steps")
        inits.append(ints("steps", steps))
    return single("Slice", extra, inits)


def resize_scales(scales, **attributes):
    return single("Resize", ["", "scales"], [floats("scales", scales)], mode="nearest", **attributes)


def resize_sizes(sizes, **attributes):
    return single("Resize", ["", "", "sizes"], [ints("sizes", sizes)], mode="nearest", **attributes)


def shape_chain(factor, consumer):
    """Y = consumer(X, Shape(X) * factor): a target computed from the input's shape (folded statically)."""
    nodes = [helper.make_node("Shape", ["X"], ["s"], name="shape"),
             helper.make_node("Mul", ["s", "factor"], ["target"], name="scale_shape")]
    if consumer == "Reshape":
        nodes.append(helper.make_node("Reshape", ["X", "target"], ["Y"], name="hostile_reshape"))
        outputs = [y_info()]
    else:
        nodes += [helper.make_node("ConstantOfShape", ["target"], ["H"], name="hostile_constantofshape"),
                  helper.make_node("Relu", ["X"], ["Y"], name="relu")]
        outputs = [y_info(), y_info("H")]
    return build(nodes, [ints("factor", [factor])], outputs=outputs)


def from_input_data(consumer):
    """X [N, 2] float → Cast(int64) → consumer: a shape or index that only the input data determines."""
    cast = helper.make_node("Cast", ["X"], ["v"], name="cast", to=INT64)
    inputs = [x_info(("N", 2))]
    if consumer == "Reshape":
        nodes = [cast, helper.make_node("Reshape", ["data", "v"], ["Y"], name="hostile_reshape")]
        return build(nodes, [floats("data", [1, 2, 3, 4])], inputs=inputs)
    nodes = [cast, helper.make_node("ConstantOfShape", ["v"], ["Y"], name="hostile_constantofshape")]
    return build(nodes, inputs=inputs)


def gather_from_input():
    """X [N, 1] float → Cast(int64) → Gather(data[4], indices): out-of-range indices appear only at run time."""
    nodes = [helper.make_node("Cast", ["X"], ["indices"], name="cast", to=INT64),
             helper.make_node("Gather", ["data", "indices"], ["Y"], name="hostile_gather", axis=0)]
    return build(nodes, [floats("data", [1, 2, 3, 4])], inputs=[x_info(("N", 1))])


def with_second_output(nodes, initializers=(), opset=OPSET):
    """Y = Relu(X) plus the hostile nodes' output H as a second graph output."""
    return build([helper.make_node("Relu", ["X"], ["Y"], name="relu"), *nodes], initializers,
                 outputs=[y_info(), y_info("H")], opset=opset)


def raw_tensor(name, data_type, dims, raw=b"", **fields):
    t = TensorProto()
    t.name = name
    t.data_type = data_type
    t.dims.extend(dims)
    if raw is not None:
        t.raw_data = raw
    for key, value in fields.items():
        getattr(t, key).extend(value)
    return t


def add_initializer(tensor):
    """Y = Add(X, tensor) with tensor an initializer (broadcast over X)."""
    return build([helper.make_node("Add", ["X", tensor.name], ["Y"], name="add_initializer")], [tensor])


def external(entries, dims=(4,), in_attribute=False):
    """A float tensor stored externally with the given external_data entries (key → value)."""
    t = TensorProto()
    t.name = "W"
    t.data_type = FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        entry = t.external_data.add()
        entry.key = key
        entry.value = str(value)
    if in_attribute:
        t.name = "value"
        nodes = [helper.make_node("Constant", [], ["W"], name="external_constant", value=t),
                 helper.make_node("Add", ["X", "W"], ["Y"], name="add_external")]
        return build(nodes)
    return add_initializer(t)


def data_file(name="w.bin", size=64):
    def setup(folder):
        (folder / name).write_bytes(bytes(range(size)))
    return setup


def symlink(target, name="w.bin"):
    def setup(folder):
        os.symlink(target, folder / name)
    return setup


def fifo(name="w.bin"):
    def setup(folder):
        os.mkfifo(folder / name)
    return setup


def directory(name="w.bin"):
    def setup(folder):
        (folder / name).mkdir()
    return setup


# Protobuf wire format, for byte-level cases.

def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def field_int(number, value):
    return varint(number << 3) + varint(value)


MODEL_PREFIX = field_int(1, 8) + field(8, field_int(2, OPSET))  # ir_version 8, opset_import { version 17 }


def deeply_nested(levels=4000):
    """graph → node → attribute(GRAPH) → graph → …, `levels` deep."""
    graph = b""
    for _ in range(levels):
        attribute = field(1, b"body") + field_int(20, AttributeProto.GRAPH) + field(6, graph)
        node = field(4, b"If") + field(5, attribute)
        graph = field(1, node)
    return MODEL_PREFIX + field(7, graph)


def sparse_file(size):
    def write(path):
        with open(path, "wb") as f:
            f.truncate(size)
    return write


# .npy building.

NPY_MAGIC = b"\x93NUMPY"


def npy(header, body=b"", version=(1, 0), magic=NPY_MAGIC, header_length=None):
    """An .npy file with the given header text (padded like numpy does) and body."""
    text = header.encode() if isinstance(header, str) else header
    prefix = 10 if version[0] == 1 else 12
    text += b" " * ((64 - (prefix + len(text) + 1) % 64) % 64) + b"\n"
    length = len(text) if header_length is None else header_length
    size = length.to_bytes(2 if version[0] == 1 else 4, "little")
    return magic + bytes(version) + size + text + body


def npy_header(descr="<f4", shape=(4, 3, 32, 32), fortran="False"):
    if isinstance(shape, str):
        shape_text = shape
    elif len(shape) == 1:
        shape_text = f"({shape[0]},)"
    else:
        shape_text = "(" + ", ".join(str(d) for d in shape) + ")"
    return f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape_text}, }}"


def saved(array):
    import io
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


SMALLCNN_BODY = 4 * 3 * 32 * 32 * 4


# ---------------------------------------------------------------------------------------------------------------
# Model cases
# ---------------------------------------------------------------------------------------------------------------

def reshape_cases():
    return [
        Case("reshape_2p32_by_2p32", reshape([2**32, 2**32]),
             "Reshape target [2**32, 2**32]: the element count overflows Int64"),
        Case("reshape_minus1_and_2p40", reshape([-1, 2**40]),
             "Reshape target [-1, 2**40] of a 16-element tensor"),
        Case("reshape_minus1_and_product_overflow", reshape([-1, 2**62, 4]),
             "Reshape target [-1, 2**62, 4]: the known dimensions' product overflows"),
        Case("reshape_two_minus1", reshape([-1, -1]), "Reshape target with two -1"),
        Case("reshape_allowzero_zero_and_minus1", reshape([0, -1], allowzero=1),
             "allowzero=1 with a 0 and a -1: the -1 cannot be inferred (division by zero)"),
        Case("reshape_zero_copies_missing_dim", reshape([1, 1, 1, 1, 0]),
             "allowzero=0: a 0 at index 4 copies a dimension the rank-4 input does not have"),
        Case("reshape_int64_min", reshape([INT64_MIN, 1]), "Reshape target containing INT64_MIN"),
        Case("reshape_shape_chain_overflow", shape_chain(2**32, "Reshape"),
             "Reshape to Shape(X) * 2**32, computed from the input's shape: product overflows"),
        Case("reshape_shape_from_input_data", from_input_data("Reshape"),
             "Reshape whose target is the input's data (2**32, 2**32) cast to int64",
             input=np.array([[2.0**32, 2.0**32]], dtype=np.float32)),
    ]


def constant_of_shape_cases():
    fill2 = helper.make_tensor("value", FLOAT, [2], [1.0, 2.0])
    two_values = with_second_output([helper.make_node("ConstantOfShape", ["shape"], ["H"],
                                                      name="hostile_constantofshape", value=fill2)],
                                    [ints("shape", [2, 2])])
    return [
        Case("constantofshape_2p32_by_2p32", constant_of_shape([2**32, 2**32]),
             "ConstantOfShape [2**32, 2**32]: element count overflows"),
        Case("constantofshape_2p36_floats", constant_of_shape([2**36]),
             "ConstantOfShape [2**36]: 256 GiB of float32"),
        Case("constantofshape_negative_dim", constant_of_shape([-1, 4]), "ConstantOfShape with a negative dimension"),
        Case("constantofshape_int64_min", constant_of_shape([INT64_MIN, INT64_MIN]),
             "ConstantOfShape [INT64_MIN, INT64_MIN]"),
        Case("constantofshape_from_shape_chain_2p40", shape_chain(2**9, "ConstantOfShape"),
             "ConstantOfShape(Shape(X) * 512) = [512, 512, 2048, 2048]: 2**40 floats (4 TiB)"),
        Case("constantofshape_from_shape_chain_overflow", shape_chain(2**20, "ConstantOfShape"),
             "ConstantOfShape(Shape(X) * 2**20): element count overflows"),
        Case("constantofshape_from_input_data", from_input_data("ConstantOfShape"),
             "ConstantOfShape fed by the input's data (2**32, 2**32) cast to int64",
             input=np.array([[2.0**32, 2.0**32]], dtype=np.float32)),
        Case("constantofshape_value_two_elements", two_values, "ConstantOfShape whose value holds two elements"),
    ]


def expand_tile_split_cases():
    return [
        Case("expand_2p32_by_2p32", single("Expand", ["shape"], [ints("shape", [2**32, 2**32, 4, 4])]),
             "Expand to [2**32, 2**32, 4, 4]"),
        Case("tile_huge_repeats", single("Tile", ["repeats"], [ints("repeats", [1, 1, 2**40, 2**40])]),
             "Tile with repeats [1, 1, 2**40, 2**40]"),
        Case("split_sizes_not_summing",
             build([helper.make_node("Split", ["X", "split"], ["Y", "Z"], name="hostile_split", axis=3)],
                   [ints("split", [1, 1])], outputs=[y_info(), y_info("Z")]),
             "Split of an axis of size 4 into sizes [1, 1]"),
    ]


def conv_cases():
    huge = ("N", 1, 2**40, 2**40)
    huge_conv = build([helper.make_node("Conv", ["X", "W"], ["Y"], name="hostile_conv")],
                      [floats("W", [1.0], dims=[1, 1, 1, 1])], inputs=[x_info(huge)])
    return [
        Case("conv_dilations_2p40", conv(dilations=[2**40, 2**40]), "Conv with dilations [2**40, 2**40]"),
        Case("conv_dilations_2p62_overflow", conv(dilations=[2**62, 2**62]),
             "Conv with dilations [2**62, 2**62]: (kernel - 1) * dilation overflows"),
        Case("conv_pads_2p62", conv(pads=[2**62] * 4), "Conv with pads [2**62] * 4: the padded size overflows"),
        Case("conv_pads_2p40", conv(pads=[2**40] * 4),
             "Conv with pads [2**40] * 4: output [1, 1, 2**41, 2**41], MACs and sizes overflow"),
        Case("conv_pads_int64_max", conv(pads=[INT64_MAX] * 4), "Conv with pads INT64_MAX"),
        Case("conv_strides_zero", conv(strides=[0, 0]), "Conv with strides [0, 0]"),
        Case("conv_strides_negative", conv(strides=[-1, -1]), "Conv with strides [-1, -1]"),
        Case("conv_strides_2p63_ceil", conv(strides=[INT64_MAX, INT64_MAX], auto_pad="SAME_UPPER"),
             "Conv with strides INT64_MAX and auto_pad SAME_UPPER (size + stride - 1 overflows)",
             lenient=True),
        Case("conv_kernel_shape_mismatch", conv(kernel_shape=[5, 5]), "Conv kernel_shape [5, 5] with a 3x3 weight"),
        Case("conv_kernel_shape_wrong_rank", conv(kernel_shape=[3]), "Conv kernel_shape [3] for a 2-D convolution"),
        Case("conv_group_zero", conv(group=0), "Conv with group 0"),
        Case("conv_group_negative", conv(group=-1), "Conv with group -1"),
        Case("conv_group_not_dividing",
             build([helper.make_node("Conv", ["X", "W"], ["Y"], name="hostile_conv", group=3)],
                   [floats("W", [0.1] * 18, dims=[6, 1, 3, 1])], inputs=[x_info(("N", 4, 4, 4))]),
             "Conv with group 3 over 4 input channels", input=default_input((1, 4, 4, 4))),
        Case("conv_negative_pads", conv(pads=[-2, -2, -2, -2]), "Conv with negative pads"),
        Case("conv_pads_wrong_count", conv(pads=[1, 1, 1]), "Conv with 3 pads for 2 spatial axes"),
        Case("conv_auto_pad_bogus", conv(auto_pad="EVERYWHERE"), "Conv with an unknown auto_pad"),
        Case("conv_declared_input_2p40", huge_conv,
             "Conv over an input declared [N, 1, 2**40, 2**40]: output and MAC counts overflow",
             input=default_input((1, 1, 4, 4))),
        Case("conv_weight_rank_mismatch",
             build([helper.make_node("Conv", ["X", "W"], ["Y"], name="hostile_conv")],
                   [floats("W", [0.1] * 3, dims=[1, 1, 3])]),
             "Conv with a rank-3 weight for a rank-4 input"),
        Case("conv_missing_weight", single("Conv"), "Conv with no weight input"),
    ]


def pool_cases():
    return [
        Case("maxpool_kernel_2p62", pool(kernel_shape=[2**62, 2**62]), "MaxPool with kernel_shape [2**62, 2**62]"),
        Case("maxpool_kernel_int64max_dilation2", pool(kernel_shape=[INT64_MAX, INT64_MAX], dilations=[2, 2]),
             "MaxPool kernel INT64_MAX with dilations 2: the effective kernel overflows"),
        Case("maxpool_strides_zero", pool(kernel_shape=[2, 2], strides=[0, 0]), "MaxPool with strides 0"),
        Case("maxpool_pads_2p62", pool(kernel_shape=[2, 2], pads=[2**62] * 4), "MaxPool with pads 2**62"),
        Case("maxpool_ceil_mode_overflow", pool(kernel_shape=[2, 2], strides=[INT64_MAX, INT64_MAX], ceil_mode=1),
             "MaxPool ceil_mode with strides INT64_MAX: span + stride - 1 overflows",
             lenient=True),
        Case("maxpool_kernel_zero", pool(kernel_shape=[0, 0]), "MaxPool with kernel_shape [0, 0]"),
        Case("maxpool_no_kernel_shape", pool(), "MaxPool without kernel_shape"),
        Case("averagepool_kernel_and_pads_huge",
             pool("AveragePool", kernel_shape=[2**62, 2**62], pads=[2**62] * 4),
             "AveragePool with kernel 2**62 and pads 2**62"),
        Case("averagepool_pads_2p40", pool("AveragePool", kernel_shape=[1, 1], pads=[2**40] * 4),
             "AveragePool with pads 2**40: output [1, 1, 2**41, 2**41] overflows", commands=BOTH),
    ]


def pad_slice_gather_cases():
    gather_const = with_second_output(
        [helper.make_node("Gather", ["data", "indices"], ["H"], name="hostile_gather", axis=0)],
        [floats("data", [1, 2, 3, 4]), ints("indices", [10])])
    gather_const_min = with_second_output(
        [helper.make_node("Gather", ["data", "indices"], ["H"], name="hostile_gather", axis=0)],
        [floats("data", [1, 2, 3, 4]), ints("indices", [INT64_MIN])])
    return [
        Case("pad_2p62", pad([0, 0, 0, 2**62, 0, 0, 0, 2**62]), "Pad by 2**62 on both sides: size overflows"),
        Case("pad_negative_beyond_size", pad([0, 0, 0, -3, 0, 0, 0, -3]),
             "Pad by -3 on both sides of an axis of size 4"),
        Case("pad_int64_min", pad([0, 0, 0, INT64_MIN, 0, 0, 0, INT64_MIN]), "Pad by INT64_MIN on both sides"),
        Case("pad_wrong_count", pad([1, 1, 1]), "Pad with 3 pads for a rank-4 input"),
        Case("pad_axes_out_of_range", pad([1, 1], axes=[9]), "Pad with axes [9] on a rank-4 input"),
        Case("pad_huge_output_2p42", pad([0, 0, 2**20, 2**20, 0, 0, 2**20, 2**20]),
             "Pad to [1, 1, 2**21 + 4, 2**21 + 4]: ~4.4e12 floats at run time", commands=RUN),
        Case("slice_step_int64_max", slice_([0], [4], axes=[3], steps=[INT64_MAX]),
             "Slice step INT64_MAX: (end - start + step - 1) overflows",
             lenient=True),
        Case("slice_step_minus_int64_max", slice_([-1], [INT64_MIN], axes=[3], steps=[-INT64_MAX]),
             "Slice step -INT64_MAX from the end",
             lenient=True),
        Case("slice_step_int64_min", slice_([-1], [INT64_MIN], axes=[3], steps=[INT64_MIN]),
             "Slice step INT64_MIN: -step overflows",
             lenient=True),
        Case("slice_step_zero", slice_([0], [4], axes=[3], steps=[0]), "Slice step 0"),
        Case("slice_axes_int64_min", slice_([INT64_MIN], [INT64_MAX], axes=[INT64_MIN], steps=[1]),
             "Slice starts INT64_MIN, ends INT64_MAX on axis INT64_MIN"),
        Case("slice_starts_ends_length_mismatch", slice_([0, 0], [4]), "Slice with 2 starts and 1 end"),
        Case("gather_const_index_out_of_range", gather_const, "Gather of constants with index 10 into 4 values"),
        Case("gather_const_index_int64_min", gather_const_min, "Gather of constants with index INT64_MIN"),
        Case("gather_input_index_out_of_range", gather_from_input(),
             "Gather whose index (1e9) comes from the input data", commands=RUN,
             input=np.array([[1e9]], dtype=np.float32)),
        Case("gather_input_index_int64_min", gather_from_input(),
             "Gather whose index (-2**63) comes from the input data", commands=RUN,
             input=np.array([[-(2.0**63)]], dtype=np.float32)),
        Case("gather_axis_out_of_range", single("Gather", ["indices"], [ints("indices", [0])], axis=9),
             "Gather on axis 9 of a rank-4 input"),
    ]


def layout_cases():
    return [
        Case("concat_axis_out_of_range", single("Concat", ["X"], axis=4), "Concat along axis 4 of rank-4 inputs"),
        Case("concat_axis_int64_min", single("Concat", ["X"], axis=INT64_MIN), "Concat along axis INT64_MIN"),
        Case("concat_shape_mismatch", single("Concat", ["C"], [floats("C", [0] * 9, dims=[1, 1, 3, 3])], axis=1),
             "Concat of [N, 1, 4, 4] and [1, 1, 3, 3] along axis 1"),
        Case("concat_no_axis", single("Concat", ["X"]), "Concat without its required axis"),
        Case("transpose_perm_duplicate", single("Transpose", perm=[0, 0, 1, 2]), "Transpose perm [0, 0, 1, 2]"),
        Case("transpose_perm_out_of_range", single("Transpose", perm=[0, 1, 2, 2**62]),
             "Transpose perm [0, 1, 2, 2**62]"),
        Case("transpose_perm_short", single("Transpose", perm=[1, 0]), "Transpose perm of rank 2 for a rank-4 input"),
        Case("flatten_axis_out_of_range", single("Flatten", axis=9), "Flatten axis 9 of a rank-4 input"),
        Case("flatten_axis_negative_out_of_range", single("Flatten", axis=-9), "Flatten axis -9 of a rank-4 input"),
        Case("squeeze_axis_out_of_range", single("Squeeze", ["axes"], [ints("axes", [7])]), "Squeeze axis 7"),
        Case("squeeze_axis_not_one", single("Squeeze", ["axes"], [ints("axes", [3])]),
             "Squeeze axis 3, whose size is 4"),
        Case("unsqueeze_axes_duplicate", single("Unsqueeze", ["axes"], [ints("axes", [0, 0])]),
             "Unsqueeze axes [0, 0]"),
        Case("unsqueeze_axis_out_of_range", single("Unsqueeze", ["axes"], [ints("axes", [2**62])]),
             "Unsqueeze axis 2**62"),
    ]


def resize_cases():
    return [
        Case("resize_scales_3e38", resize_scales([1, 1, 3e38, 3e38]),
             "Resize scales 3e38: 4 * 3e38 is infinite in float32"),
        Case("resize_scales_1e12", resize_scales([1, 1, 1e12, 1e12]),
             "Resize scales 1e12: output [1, 1, 4e12, 4e12] (1.6e25 elements) overflows"),
        Case("resize_scales_nan", resize_scales([1, 1, float("nan"), float("nan")]), "Resize scales NaN"),
        Case("resize_scales_negative", resize_scales([1, 1, -2, -2]), "Resize scales -2"),
        Case("resize_scales_zero", resize_scales([1, 1, 0, 0]), "Resize scales 0"),
        Case("resize_scales_infinite", resize_scales([1, 1, float("inf"), float("inf")]), "Resize scales +inf"),
        Case("resize_scales_wrong_count", resize_scales([2, 2]), "Resize with 2 scales for a rank-4 input"),
        Case("resize_sizes_2p40", resize_sizes([1, 1, 2**40, 2**40]), "Resize sizes [1, 1, 2**40, 2**40]"),
        Case("resize_sizes_int64_max", resize_sizes([1, 1, INT64_MAX, INT64_MAX]), "Resize sizes INT64_MAX"),
        Case("resize_sizes_negative", resize_sizes([1, 1, -8, -8]), "Resize sizes -8"),
        Case("resize_sizes_2p34_elements", resize_sizes([1, 1, 2**17, 2**17]),
             "Resize sizes [1, 1, 2**17, 2**17]: 64 GiB of float32 at run time", commands=RUN),
    ]


def linear_algebra_cases():
    matmul_huge = build([helper.make_node("MatMul", ["X", "B"], ["Y"], name="hostile_matmul")],
                        inputs=[x_info(("N", 2**40)), x_info((2**40, 2**40), name="B")])
    bn = single("BatchNormalization", ["scale", "bias", "mean", "var"],
                [floats("scale", [1, 1]), floats("bias", [0]), floats("mean", [0]), floats("var", [1])])
    return [
        Case("gemm_k_mismatch",
             build([helper.make_node("Flatten", ["X"], ["f"], name="flatten"),
                    helper.make_node("Gemm", ["f", "B"], ["Y"], name="hostile_gemm")],
                   [floats("B", [0.1] * 30, dims=[15, 2])]),
             "Gemm of [N, 16] with B [15, 2]"),
        Case("gemm_rank_4", single("Gemm", ["B"], [floats("B", [0.1] * 8, dims=[4, 2])]),
             "Gemm with a rank-4 A"),
        Case("matmul_inner_mismatch", single("MatMul", ["B"], [floats("B", [0.1] * 15, dims=[3, 5])]),
             "MatMul [N, 1, 4, 4] x [3, 5]"),
        Case("matmul_batch_not_broadcastable",
             build([helper.make_node("MatMul", ["X", "B"], ["Y"], name="hostile_matmul")],
                   [floats("B", [0.1] * 48, dims=[3, 4, 4])], inputs=[x_info(("N", 2, 4, 4))]),
             "MatMul [N, 2, 4, 4] x [3, 4, 4]: batch axes 2 and 3", input=default_input((1, 2, 4, 4))),
        Case("matmul_scalar_operand", single("MatMul", ["B"], [floats("B", [1.0], dims=[])]),
             "MatMul with a rank-0 operand"),
        Case("matmul_declared_2p40", matmul_huge,
             "MatMul of inputs declared [N, 2**40] and [2**40, 2**40]: MACs overflow",
             input=default_input((1, 4))),
        Case("batchnorm_wrong_parameter_lengths", bn, "BatchNormalization with scale [2] for 1 channel"),
        Case("batchnorm_missing_parameters", single("BatchNormalization", ["scale"], [floats("scale", [1])]),
             "BatchNormalization with only a scale"),
        Case("softmax_axis_out_of_range", single("Softmax", axis=7), "Softmax axis 7 of a rank-4 input"),
        Case("softmax_axis_int64_min", single("Softmax", axis=INT64_MIN), "Softmax axis INT64_MIN"),
        Case("reducemean_axes_out_of_range", single("ReduceMean", axes=[9]), "ReduceMean axes [9]"),
        Case("reducemean_axes_duplicate", single("ReduceMean", axes=[1, 1]), "ReduceMean axes [1, 1]",
             lenient=True),
        Case("prelu_slope_not_broadcastable", single("PRelu", ["slope"], [floats("slope", [0.1] * 3)]),
             "PRelu with a slope of 3 values over width 4"),
        Case("add_not_broadcastable", single("Add", ["C"], [floats("C", [0.1] * 3)]),
             "Add of [N, 1, 4, 4] and [3]"),
    ]


def arithmetic_cases():
    dequantize = build(
        [helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["d"], name="hostile_dequantize"),
         helper.make_node("Add", ["X", "d"], ["Y"], name="add")],
        [helper.make_tensor("q", INT8, [1], [1]), floats("scale", [1.0], dims=[]), ints("zero", [INT64_MIN], dims=[])])
    division = with_second_output(
        [helper.make_node("Div", ["a", "b"], ["H"], name="hostile_div")],
        [ints("a", [INT64_MIN]), ints("b", [-1])])
    division_zero = with_second_output(
        [helper.make_node("Div", ["a", "b"], ["H"], name="hostile_div")], [ints("a", [1]), ints("b", [0])])
    return [
        Case("dequantize_zero_point_int64_min", dequantize,
             "DequantizeLinear of int8 1 with an int64 zero point INT64_MIN: q - z overflows"),
        Case("div_int64_min_by_minus_one", division, "Integer Div INT64_MIN / -1 of constants (overflows)"),
        Case("div_int_by_zero", division_zero, "Integer Div 1 / 0 of constants"),
        Case("cast_to_unknown_type", single("Cast", to=999), "Cast to element type 999"),
        Case("cast_to_2p40", single("Cast", to=2**40), "Cast to element type 2**40"),
        Case("quantize_zero_scale",
             single("QuantizeLinear", ["scale", "zero"],
                    [floats("scale", [0.0], dims=[]), helper.make_tensor("zero", INT8, [], [0])]),
             "QuantizeLinear with scale 0", commands=RUN),
    ]


def graph_structure_cases():
    cycle = build([helper.make_node("Relu", ["b"], ["a"], name="node_a"),
                   helper.make_node("Relu", ["a"], ["b"], name="node_b"),
                   helper.make_node("Add", ["X", "a"], ["Y"], name="add")])
    self_loop = build([helper.make_node("Add", ["X", "Y"], ["Y"], name="self_loop")])
    duplicate = build([helper.make_node("Relu", ["X"], ["Y"], name="first"),
                       helper.make_node("Sigmoid", ["X"], ["Y"], name="second")])
    no_outputs = build([helper.make_node("Relu", ["X"], ["Y"], name="relu")], outputs=[])
    sequence_input = helper.make_tensor_sequence_value_info("X", FLOAT, ["N", 1, 4, 4])
    constant_overflow = raw_tensor("value", FLOAT, [2**32, 2**32], b"\0\0\0\0")
    constant_bad_type = raw_tensor("value", 999, [1], b"\0\0\0\0")
    return [
        Case("undefined_input_tensor", single("Relu", x="nobody_makes_this"), "A node reads an undefined tensor"),
        Case("cycle_two_nodes", cycle, "Two nodes reading each other's outputs"),
        Case("cycle_self_loop", self_loop, "A node reading its own output"),
        Case("duplicate_output_names", duplicate, "Two nodes both produce 'Y' (not SSA)"),
        Case("no_graph_outputs", no_outputs, "A graph with no outputs"),
        Case("graph_output_never_produced",
             build([helper.make_node("Relu", ["X"], ["Y"], name="relu")], outputs=[y_info("Z")]),
             "The graph output 'Z' is produced by no node"),
        Case("initializer_raw_data_short", add_initializer(raw_tensor("W", FLOAT, [4], b"\0\0\0")),
             "float initializer [4] with 3 bytes of raw_data"),
        Case("initializer_raw_data_long", add_initializer(raw_tensor("W", FLOAT, [4], b"\0" * 17)),
             "float initializer [4] with 17 bytes of raw_data"),
        Case("initializer_negative_dims", add_initializer(raw_tensor("W", FLOAT, [-1, 4], b"\0" * 16)),
             "initializer with dims [-1, 4]"),
        Case("initializer_dims_overflow", add_initializer(raw_tensor("W", FLOAT, [2**32, 2**32], b"\0" * 4)),
             "initializer with dims [2**32, 2**32] and 4 bytes"),
        Case("initializer_dims_int64_min", add_initializer(raw_tensor("W", FLOAT, [INT64_MIN], b"\0" * 4)),
             "initializer with dims [INT64_MIN]"),
        Case("initializer_2p31_elements_tiny_data", add_initializer(raw_tensor("W", FLOAT, [2**31], b"\0" * 4)),
             "initializer with dims [2**31] and 4 bytes"),
        Case("initializer_unknown_data_type", add_initializer(raw_tensor("W", 999, [4], b"\0" * 16)),
             "initializer with data_type 999"),
        Case("initializer_undefined_data_type", add_initializer(raw_tensor("W", 0, [4], b"\0" * 16)),
             "initializer with data_type 0 (UNDEFINED)"),
        Case("initializer_float_data_count_mismatch",
             add_initializer(raw_tensor("W", FLOAT, [4], None, float_data=[1.0, 2.0, 3.0])),
             "float initializer [4] with 3 float_data values"),
        Case("initializer_int64_data_count_mismatch",
             reshape_with_initializer(raw_tensor("shape", INT64, [2], None, int64_data=[16]))[0],
             "int64 Reshape target [2] with 1 int64_data value"),
        Case("constant_value_dims_overflow",
             build([helper.make_node("Constant", [], ["C"], name="hostile_constant", value=constant_overflow),
                    helper.make_node("Add", ["X", "C"], ["Y"], name="add")]),
             "Constant node holding a [2**32, 2**32] tensor with 4 bytes"),
        Case("constant_value_unknown_type",
             build([helper.make_node("Constant", [], ["C"], name="hostile_constant", value=constant_bad_type),
                    helper.make_node("Add", ["X", "C"], ["Y"], name="add")]),
             "Constant node holding a tensor of data_type 999"),
        Case("constant_without_value",
             build([helper.make_node("Constant", [], ["C"], name="hostile_constant"),
                    helper.make_node("Add", ["X", "C"], ["Y"], name="add")]),
             "Constant node without any value attribute"),
        Case("graph_input_sequence_type",
             build([helper.make_node("Identity", ["X"], ["Y"], name="identity")], inputs=[sequence_input]),
             "graph input X is a sequence, not a tensor"),
        # Without data, nothing gives these inputs their sizes: `inspect` refuses. `run` takes every size from the
        # data it is given (as onnxruntime does, and as a transformer's free sequence length needs), so it runs them.
        Case("graph_input_without_shape", single("Relu", inputs=[x_info(None)]), "graph input X declares no shape",
             commands=("inspect",)),
        Case("graph_input_free_inner_dim", single("Relu", inputs=[x_info(("N", "C", 4, 4))]),
             "graph input X [N, C, 4, 4]: a free non-batch dimension", commands=("inspect",)),
        Case("graph_input_negative_dim", single("Relu", inputs=[x_info(("N", -5, 4, 4))]),
             "graph input X [N, -5, 4, 4]"),
        Case("node_missing_required_input", single("Add"), "Add with a single input"),
        Case("node_empty_op_type", single(""), "a node with an empty op_type"),
    ]


def reshape_with_initializer(tensor):
    return single("Reshape", [tensor.name], [tensor]), tensor


def external_data_cases():
    ok = {"location": "w.bin", "offset": 0, "length": 16}
    return [
        Case("external_offset_2p63", external({**ok, "offset": 2**63}), "external data offset 2**63 (not an Int64)",
             setup=data_file()),
        Case("external_offset_int64_max_plus_length", external({**ok, "offset": INT64_MAX}),
             "external data offset INT64_MAX with length 16: offset + length overflows", setup=data_file()),
        Case("external_offset_plus_length_overflow", external({**ok, "offset": 2**62, "length": 2**62}),
             "external data offset 2**62 + length 2**62 overflows", setup=data_file()),
        Case("external_length_beyond_file", external({**ok, "length": 2**62}),
             "external data length 2**62 from a 64-byte file", setup=data_file()),
        Case("external_offset_beyond_file", external({"location": "w.bin", "offset": 4096}),
             "external data offset 4096 of a 64-byte file", setup=data_file()),
        Case("external_negative_offset", external({**ok, "offset": -16}), "external data offset -16",
             setup=data_file()),
        Case("external_negative_length", external({**ok, "length": -16}), "external data length -16",
             setup=data_file()),
        Case("external_length_not_matching_dims", external({**ok, "length": 8}),
             "external data of 8 bytes for a float [4]", setup=data_file()),
        Case("external_relative_etc_passwd", external({**ok, "location": "../../../../../../../../etc/passwd"}),
             "external data location ../../…/etc/passwd must be refused, not read", forbid=("root:",)),
        Case("external_absolute_etc_passwd", external({**ok, "location": "/etc/passwd"}),
             "external data location /etc/passwd must be refused, not read", forbid=("root:",)),
        Case("external_dotdot_in_middle", external({**ok, "location": "sub/../../../../../../etc/passwd"}),
             "external data location sub/../../…/etc/passwd", forbid=("root:",), setup=directory("sub")),
        Case("external_symlink_to_etc_passwd", external(ok),
             "external data file w.bin is a symlink to /etc/passwd: must be refused, not read",
             setup=symlink("/etc/passwd"), forbid=("root:",)),
        Case("external_symlink_to_dev_zero", external({"location": "w.bin"}),
             "external data file w.bin is a symlink to /dev/zero (endless)", setup=symlink("/dev/zero")),
        Case("external_location_fifo", external(ok), "external data file w.bin is a FIFO nobody writes (hang)",
             setup=fifo()),
        Case("external_location_missing_file", external({**ok, "location": "nope.bin"}),
             "external data file does not exist"),
        Case("external_location_directory", external(ok), "external data location is a directory",
             setup=directory()),
        Case("external_no_location", external({"offset": 0, "length": 16}), "external data without a location",
             setup=data_file()),
        Case("external_attribute_absolute_etc_passwd",
             external({**ok, "location": "/etc/passwd"}, in_attribute=True),
             "Constant attribute tensor with external data at /etc/passwd", forbid=("root:",)),
    ]


def opset_cases():
    opset99 = build([helper.make_node("Relu", ["X"], ["Y"], name="relu")], opset=99)
    no_opset = build([helper.make_node("Relu", ["X"], ["Y"], name="relu")], opsets=[])
    other_domain_only = build([helper.make_node("Relu", ["X"], ["Y"], name="relu")],
                              opsets=[helper.make_opsetid("com.microsoft", 1)])
    negative_opset = build([helper.make_node("Relu", ["X"], ["Y"], name="relu")], opset=-1)
    ir0 = build([helper.make_node("Relu", ["X"], ["Y"], name="relu")], ir_version=0)
    unknown_domain = build([helper.make_node("Relu", ["X"], ["Y"], name="evil_relu", domain="evil.example")])
    unsupported = build([helper.make_node("LpNormalization", ["X"], ["Y"], name="my_lpnorm_node")])
    old_slice = build([helper.make_node("Slice", ["X"], ["Y"], name="old_slice", starts=[0], ends=[1])], opset=9)
    undefined_attribute = build([helper.make_node("LeakyRelu", ["X"], ["Y"], name="leaky")])
    undefined_attribute.graph.node[0].attribute.add().name = "alpha"  # type UNDEFINED
    wrong_kind = conv()
    wrong_kind.graph.node[0].attribute.append(helper.make_attribute("kernel_shape", [3.0, 3.0]))
    return [
        Case("opset_99", opset99, "default-domain opset 99"),
        Case("opset_negative", negative_opset, "default-domain opset -1"),
        Case("opset_import_missing", no_opset, "no opset_import at all"),
        Case("opset_only_foreign_domain", other_domain_only, "only a com.microsoft opset import"),
        Case("ir_version_0", ir0, "ir_version 0"),
        Case("old_opset_slice_attributes", old_slice, "opset 9 (Slice with attributes)"),
        Case("unknown_domain_operator", unknown_domain, "Relu from domain evil.example",
             expect=("evil.example",)),
        Case("unsupported_operator", unsupported, "LpNormalization: the error must name op, node and opset",
             expect=("LpNormalization", "my_lpnorm_node", "opset")),
        Case("attribute_type_undefined", undefined_attribute, "LeakyRelu alpha attribute of type UNDEFINED"),
        Case("attribute_wrong_kind", wrong_kind, "Conv kernel_shape given as FLOATS"),
    ]


def raw_byte_cases():
    smallcnn = SMALLCNN.read_bytes()
    length_2p62 = MODEL_PREFIX + varint(7 << 3 | 2) + varint(2**62) + b"\x0a\x00"
    inner_2p62 = MODEL_PREFIX + field(7, field(5, field_int(2, FLOAT) + varint(9 << 3 | 2) + varint(2**62) + b"\0" * 8))
    overlong_varint = b"\x08" + b"\xff" * 11 + b"\x01" + field(7, b"")
    wrong_wire_type = MODEL_PREFIX + bytes([7 << 3 | 7]) + b"\x00" * 8
    return [
        Case("truncated_smallcnn_half", smallcnn[: len(smallcnn) // 2], "smallcnn_dynamo.onnx cut at 50 %"),
        Case("truncated_smallcnn_one_byte_short", smallcnn[:-1], "smallcnn_dynamo.onnx missing its last byte"),
        Case("length_prefix_2p62", length_2p62, "a graph field whose length prefix is 2**62"),
        Case("inner_length_prefix_2p62", inner_2p62, "an initializer's raw_data whose length prefix is 2**62"),
        Case("overlong_varint", overlong_varint, "a varint of 12 bytes"),
        Case("invalid_wire_type", wrong_wire_type, "a field with wire type 7"),
        Case("deeply_nested_graphs", deeply_nested(), "graph → node → attribute → graph … 4000 levels deep"),
        Case("empty_file", b"", "a zero-byte model file"),
        Case("garbage_bytes", random.Random(1234).randbytes(4096), "4 KiB of random bytes"),
        Case("npy_file_as_model", SMALLCNN_INPUT.read_bytes(), "an .npy file given as the model"),
        Case("model_without_graph", MODEL_PREFIX, "a ModelProto with no graph"),
        Case("sparse_4gib_model_file", sparse_file((4 << 30) + 1),
             "a sparse model file of 4 GiB + 1 byte (must be refused by size, not read into memory)"),
    ]


def qdq_conv(x_scale=0.05, x_zero=None, w_scales=(0.02, 0.03), w_zero=None):
    """Y = Conv(DQ(Q(X)), DQ(W int8)): a QDQ convolution as Whittle and onnxruntime export it, with the given scales
    and zero points (zero points as raw TensorProtos, so a value outside the type's range can be written)."""
    x_zero = raw_tensor("x_zero", TensorProto.UINT8, [], raw=None, int32_data=[128]) if x_zero is None else x_zero
    w_zero = raw_tensor("w_zero", INT8, [2], raw=None, int32_data=[0, 0]) if w_zero is None else w_zero
    nodes = [helper.make_node("QuantizeLinear", ["X", "x_scale", "x_zero"], ["Xq"], name="hostile_quantize"),
             helper.make_node("DequantizeLinear", ["Xq", "x_scale", "x_zero"], ["Xf"], name="hostile_dequantize"),
             helper.make_node("DequantizeLinear", ["Wq", "w_scales", "w_zero"], ["Wf"], name="hostile_weights", axis=0),
             helper.make_node("Conv", ["Xf", "Wf"], ["Y"], name="conv")]
    weights = raw_tensor("Wq", INT8, [2, 1, 3, 3], raw=None, int32_data=[(i % 7) - 3 for i in range(18)])
    return build(nodes, [floats("x_scale", [x_scale], dims=[]), x_zero, weights, floats("w_scales", list(w_scales)),
                         w_zero])


def quantization_cases():
    uint8_zero = lambda v: raw_tensor("x_zero", TensorProto.UINT8, [], raw=None, int32_data=[v])
    return [
        Case(f"qdq_activation_scale_{label}", qdq_conv(x_scale=value),
             f"QuantizeLinear/DequantizeLinear of the input with scale {value}", expect=("scale", "hostile_quantize"))
        for label, value in [("zero", 0.0), ("negative", -0.05), ("nan", float("nan")), ("inf", float("inf"))]
    ] + [
        Case(f"qdq_weight_scale_{label}", qdq_conv(w_scales=(0.02, value)),
             f"per-channel weight scales (0.02, {value})", expect=("scale", "hostile_weights"))
        for label, value in [("zero", 0.0), ("negative", -0.03), ("nan", float("nan"))]
    ] + [
        Case("qdq_uint8_zero_point_300", qdq_conv(x_zero=uint8_zero(300)),
             "uint8 zero point 300 written in int32_data (a truncating reader would take 44)", expect=("300", "uint8")),
        Case("qdq_int8_weight_zero_point_200",
             qdq_conv(w_zero=raw_tensor("w_zero", INT8, [2], raw=None, int32_data=[0, 200])),
             "int8 weight zero point 200 written in int32_data", expect=("200", "int8")),
        Case("qdq_int32_zero_point_of_uint8_input",
             qdq_conv(x_zero=raw_tensor("x_zero", TensorProto.INT32, [], raw=None, int32_data=[300])),
             "an int32 zero point for the input's codes: QuantizeLinear would write int32", expect=("int32",)),
    ]


def model_cases():
    return (reshape_cases() + constant_of_shape_cases() + expand_tile_split_cases() + conv_cases() + pool_cases()
            + pad_slice_gather_cases() + layout_cases() + resize_cases() + linear_algebra_cases()
            + arithmetic_cases() + graph_structure_cases() + external_data_cases() + opset_cases()
            + quantization_cases() + raw_byte_cases())


# ---------------------------------------------------------------------------------------------------------------
# .npy cases: run through the known-good smallcnn_dynamo.onnx (input [batch, 3, 32, 32] float32)
# ---------------------------------------------------------------------------------------------------------------

def npy_cases():
    body = b"\0" * SMALLCNN_BODY
    good = np.load(SMALLCNN_INPUT)

    def case(name, data, description, **kw):
        return Case(f"npy_{name}", SMALLCNN, description, commands=RUN, input=data, **kw)

    nan = good.copy()
    nan[0, 0, 0, 0] = np.nan
    return [
        case("shape_2p62_tiny_body", npy(npy_header(shape=(2**62,)), b"\0" * 16),
             "shape (2**62,) with 16 bytes of data: shape * itemsize overflows"),
        case("shape_2p61_int64_tiny_body", npy(npy_header("<i8", shape=(2**61,)), b"\0" * 16),
             "int64 shape (2**61,) with 16 bytes"),
        case("shape_product_overflow", npy(npy_header(shape=(2**32, 2**32)), b"\0" * 16),
             "shape (2**32, 2**32): element count overflows"),
        case("shape_2p40_uint8_tiny_body", npy(npy_header("|u1", shape=(2**40,)), b"\0" * 16),
             "uint8 shape (2**40,) with 16 bytes"),
        case("negative_dims", npy(npy_header(shape=(-1, 3, 32, 32)), body), "shape (-1, 3, 32, 32)"),
        case("dim_too_big_for_int64", npy(npy_header(shape="(99999999999999999999999,)"), body),
             "a shape entry beyond Int64"),
        case("header_length_huge_v2", npy(npy_header(), body, version=(2, 0), header_length=0xFFFFFFFF),
             "format 2.0 header length 0xFFFFFFFF"),
        case("header_length_beyond_file_v1", npy(npy_header(), b"", header_length=0xFFFF),
             "format 1.0 header length 65535 in a shorter file"),
        case("truncated_data", npy(npy_header(), body[: len(body) // 2]), "half of the data missing"),
        case("truncated_header", npy(npy_header(), body)[:20], "the file cut inside the header"),
        case("descr_float128", npy(npy_header("<f16"), body * 4), "descr '<f16' (float128)"),
        case("descr_float16", npy(npy_header("<f2"), body[: len(body) // 2]), "descr '<f2' (float16)"),
        case("descr_object", npy(npy_header("|O"), body * 2), "descr '|O' (pickled Python objects)"),
        case("descr_big_endian", npy(npy_header(">f4"), body), "descr '>f4' (big-endian)"),
        case("descr_structured", npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (4, 3, 32, 32), }",
                                     body), "a structured descr (a list, not a string)"),
        case("fortran_order", npy(npy_header(fortran="True"), body), "fortran_order True"),
        case("fortran_order_garbage", npy(npy_header(fortran="Maybe"), body), "fortran_order Maybe"),
        case("header_not_a_dict", npy("[1, 2, 3]", body), "a header that is a list, not a dict"),
        case("header_not_utf8", npy(b"{'descr': '<f4', \xff\xfe\xfd}", body), "a header that is not UTF-8"),
        case("shape_unclosed", npy(npy_header(shape="(4, 3, 32, 32"), body), "shape without its closing paren"),
        case("magic_wrong", b"\x93NUMPZ" + npy(npy_header(), body)[6:], "magic \\x93NUMPZ"),
        case("version_9", npy(npy_header(), body, version=(9, 0)), "format version 9.0"),
        case("empty_file", b"", "a zero-byte .npy"),
        case("onnx_file_as_npy", SMALLCNN.read_bytes(), "an ONNX file given as the input"),
        case("wrong_shape", saved(np.zeros((4, 3, 16, 16), np.float32)), "a valid (4, 3, 16, 16) array",
             expect=("shape",)),
        case("wrong_rank", saved(np.zeros((3, 32, 32), np.float32)), "a valid (3, 32, 32) array (no batch axis)"),
        # Integer arrays (uint8 images, int64) are converted to float32 by design (README: data files); a type
        # Whittle cannot convert is refused.
        case("wrong_dtype_complex64", saved(np.zeros((4, 3, 32, 32), np.complex64)),
             "a valid complex64 array of the right shape (the model takes float32)"),
        case("zero_batch", saved(np.zeros((0, 3, 32, 32), np.float32)), "a valid (0, 3, 32, 32) array"),
        case("scalar", saved(np.float32(1.0)), "a valid 0-d array"),
        case("nan_values", saved(nan), "the fixture input with one NaN"),
    ]


def all_cases():
    cases = model_cases() + npy_cases()
    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"duplicate case names: {duplicates}"
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Baselines: the templates above with harmless values; each must be accepted (exit 0)
# ---------------------------------------------------------------------------------------------------------------

def baseline_cases():
    return [
        Case("baseline_reshape", reshape([-1, 16]), "Reshape to [-1, 16]"),
        Case("baseline_constantofshape", constant_of_shape([2, 3]), "ConstantOfShape [2, 3]"),
        Case("baseline_shape_chain_reshape", shape_chain(1, "Reshape"), "Reshape to Shape(X) * 1"),
        Case("baseline_conv", conv(pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1]), "Conv 3x3, pads 1"),
        Case("baseline_maxpool", pool(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), "MaxPool 2x2"),
        Case("baseline_pad", pad([0, 0, 1, 1, 0, 0, 1, 1]), "Pad by 1"),
        Case("baseline_slice", slice_([0], [4], axes=[3], steps=[2]), "Slice step 2"),
        Case("baseline_slice_negative_step", slice_([-1], [INT64_MIN], axes=[3], steps=[-1]), "Slice step -1"),
        Case("baseline_gather_from_input", gather_from_input(), "Gather index 2 from the input", commands=RUN,
             input=np.array([[2.0]], dtype=np.float32)),
        Case("baseline_resize_scales", resize_scales([1, 1, 2, 2]), "Resize scales 2"),
        Case("baseline_resize_sizes", resize_sizes([1, 1, 8, 8]), "Resize sizes 8"),
        Case("baseline_softmax", single("Softmax", axis=1), "Softmax axis 1"),
        Case("baseline_reducemean", single("ReduceMean", axes=[2, 3]), "ReduceMean axes [2, 3]"),
        Case("baseline_transpose", single("Transpose", perm=[0, 1, 3, 2]), "Transpose"),
        Case("baseline_external_data", external({"location": "w.bin", "offset": 0, "length": 16}),
             "external data w.bin bytes 0..<16", setup=data_file()),
        Case("baseline_qdq_conv", qdq_conv(), "a QDQ convolution with valid scales and zero points"),
        Case("baseline_smallcnn", SMALLCNN, "the fixture with its input", commands=RUN,
             input=SMALLCNN_INPUT.read_bytes()),
    ]
