import Testing
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// The integer steps other than convolutions, by hand: QuantizeLinear (rounding half to even before the zero point,
/// saturation) and the integer residual sum, each equal on the integer path and the float simulation.
@Suite struct IntegerStepTests {
    static func scalar(_ name: String, _ value: Float) -> Initializer { Initializer(name: name, tensor: Tensor(shape: [], floats: [value])) }
    static func zero(_ name: String, _ value: Int64) -> Initializer { Initializer(name: name, tensor: Tensor(shape: [], ints: [value], dtype: .uint8)) }

    static func both(_ model: Model, _ inputs: [String: Tensor]) throws -> (Tensor, Tensor) {
        let output = model.graph.outputs[0].name
        let integer = try InferenceSession(model: model).run(inputs: inputs)[output]!
        let simulated = try InferenceSession(model: model, options: KernelOptions(integer: false)).run(inputs: inputs)[output]!
        return (integer, simulated)
    }

    /// s = 0.5, z = 3: x / s = 0.5, 1.5, 2.5, −0.5 round to 0, 2, 2, −0 (half to even), then + 3; ±10⁹ and 252 + 3
    /// saturate.
    @Test func quantizeRoundsHalfToEvenBeforeTheZeroPoint() throws {
        let graph = Graph(name: "q", nodes: [Node(opType: "QuantizeLinear", name: "q", inputs: ["x", "s", "z"], outputs: ["y"])],
                          inputs: [ValueInfo(name: "x", elementType: .float, shape: [.value(1), .value(7)])],
                          outputs: [ValueInfo(name: "y", elementType: .uint8, shape: nil)],
                          initializers: [Self.scalar("s", 0.5), Self.zero("z", 3)])
        let x = Tensor(shape: [1, 7], floats: [0.25, 0.75, 1.25, -0.25, 1e9, -1e9, 126])
        let (a, b) = try Self.both(Model(graph: graph, opset: 13), ["x": x])
        #expect(a.ints == [3, 5, 5, 3, 255, 0, 255])
        #expect(a == b)
    }

    /// Opset 21's `output_dtype` without a zero point: int8, zero point 0 (−1.5 and −0.5 round to −2 and −0).
    @Test func quantizeFollowsOutputDataType() throws {
        let graph = Graph(name: "q", nodes: [Node(opType: "QuantizeLinear", name: "q", inputs: ["x", "s"], outputs: ["y"],
                                                  attributes: [Attribute("output_dtype", .int(Int64(DataType.int8.rawValue)))])],
                          inputs: [ValueInfo(name: "x", elementType: .float, shape: [.value(1), .value(4)])],
                          outputs: [ValueInfo(name: "y", elementType: .int8, shape: nil)],
                          initializers: [Self.scalar("s", 0.5)])
        let x = Tensor(shape: [1, 4], floats: [-0.75, -0.25, 100, -100])
        let (a, b) = try Self.both(Model(graph: graph, opset: 21), ["x": x])
        #expect(a.dtype == .int8 && a.ints == [-2, 0, 127, -128])
        #expect(a == b)
    }

    /// (a − 10) · 0.1 + b · 0.2 requantized at scale 0.25, zero point 5: sums 4, 25, 50, 24.5 → 21, 105, 205, 103.
    @Test func residualSumRequantizes() throws {
        let nodes = [
            Node(opType: "DequantizeLinear", name: "da", inputs: ["a", "sa", "za"], outputs: ["fa"]),
            Node(opType: "DequantizeLinear", name: "db", inputs: ["b", "sb", "zb"], outputs: ["fb"]),
            Node(opType: "Add", name: "add", inputs: ["fa", "fb"], outputs: ["sum"]),
            Node(opType: "QuantizeLinear", name: "q", inputs: ["sum", "sy", "zy"], outputs: ["y"]),
        ]
        let shape: [Dimension] = [.value(1), .value(4)]
        let graph = Graph(name: "add", nodes: nodes,
                          inputs: [ValueInfo(name: "a", elementType: .uint8, shape: shape), ValueInfo(name: "b", elementType: .uint8, shape: shape)],
                          outputs: [ValueInfo(name: "y", elementType: .uint8, shape: nil)],
                          initializers: [Self.scalar("sa", 0.1), Self.zero("za", 10), Self.scalar("sb", 0.2), Self.zero("zb", 0),
                                         Self.scalar("sy", 0.25), Self.zero("zy", 5)])
        let model = Model(graph: graph, opset: 13)
        let inputs = ["a": Tensor(shape: [1, 4], ints: [10, 200, 0, 255], dtype: .uint8),
                      "b": Tensor(shape: [1, 4], ints: [20, 30, 255, 0], dtype: .uint8)]
        #expect(try InferenceSession(model: model).compiled(shapes: ["a": (.uint8, [1, 4]), "b": (.uint8, [1, 4])]).integerSteps == 1)
        let (a, b) = try Self.both(model, inputs)
        #expect(a.ints == [21, 105, 205, 103])
        #expect(a == b)
    }

    /// Constant scales that are zero, negative or not finite, and zero points outside the type, are refused with
    /// the node and the value named, on the integer path and the float simulation alike.
    @Test(arguments: [(Float(0), Int64(3), "scale 0.0"), (-0.5, 3, "scale -0.5"), (.nan, 3, "scale nan"),
                      (.infinity, 3, "scale inf"), (0.5, 256, "zero point 256")])
    func refusesInvalidQuantizationParameters(_ scale: Float, _ zero: Int64, _ named: String) {
        let graph = Graph(name: "q", nodes: [Node(opType: "QuantizeLinear", name: "q", inputs: ["x", "s", "z"], outputs: ["y"])],
                          inputs: [ValueInfo(name: "x", elementType: .float, shape: [.value(1), .value(2)])],
                          outputs: [ValueInfo(name: "y", elementType: .uint8, shape: nil)],
                          initializers: [Self.scalar("s", scale), Self.zero("z", zero)])
        for integer in [true, false] {
            #expect { try InferenceSession(model: Model(graph: graph, opset: 13), options: KernelOptions(integer: integer))
                .run(inputs: ["x": Tensor(shape: [1, 2], floats: [1, 2])]) } throws: { error in
                "\(error)".contains(named) && "\(error)".contains("'q'")
            }
        }
    }

    /// A DequantizeLinear whose zero point is a float tensor (the fuzzer found one: the scale passed as the zero
    /// point too) is refused with the node and the type named, not read as an empty list of integers.
    @Test func refusesAFloatZeroPoint() {
        let graph = Graph(name: "dq", nodes: [Node(opType: "DequantizeLinear", name: "dq", inputs: ["x", "s", "s"], outputs: ["y"])],
                          inputs: [ValueInfo(name: "x", elementType: .uint8, shape: [.value(1), .value(2)])],
                          outputs: [ValueInfo(name: "y", elementType: .float, shape: nil)],
                          initializers: [Self.scalar("s", 0.5)])
        for integer in [true, false] {
            #expect { try InferenceSession(model: Model(graph: graph, opset: 13), options: KernelOptions(integer: integer))
                .run(inputs: ["x": Tensor(shape: [1, 2], ints: [1, 2], dtype: .uint8)]) } throws: { error in
                "\(error)".contains("must be an integer tensor") && "\(error)".contains("'dq'")
            }
        }
    }

    static func tensor(_ name: String, _ shape: [Int], floats: [Float]) -> Initializer { Initializer(name: name, tensor: Tensor(shape: shape, floats: floats)) }
    static func codes(_ name: String, _ shape: [Int], _ values: [Int64], _ type: DataType) -> Initializer {
        Initializer(name: name, tensor: Tensor(shape: shape, ints: values, dtype: type))
    }
    static func pooled(_ op: Node, zeros: (Int64, Int64), scales: (Float, Float), x: [Int64], shape: [Int]) throws -> (Tensor, Tensor, Int) {
        let nodes = [Node(opType: "DequantizeLinear", name: "dx", inputs: ["x", "sx", "zx"], outputs: ["fx"]), op,
                     Node(opType: "QuantizeLinear", name: "q", inputs: ["pooled", "sy", "zy"], outputs: ["y"])]
        let graph = Graph(name: "pool", nodes: nodes, inputs: [ValueInfo(name: "x", elementType: .uint8, shape: shape.map { .value($0) })],
                          outputs: [ValueInfo(name: "y", elementType: .uint8, shape: nil)],
                          initializers: [Self.scalar("sx", scales.0), Self.zero("zx", zeros.0), Self.scalar("sy", scales.1), Self.zero("zy", zeros.1)])
        let model = Model(graph: graph, opset: 13)
        let steps = try InferenceSession(model: model).compiled(shapes: ["x": (.uint8, shape)]).integerSteps
        let (a, b) = try Self.both(model, ["x": Tensor(shape: shape, ints: x, dtype: .uint8)])
        return (a, b, steps)
    }

    /// QLinearGlobalAveragePool's arithmetic: s_x 0.5, z_x 10, s_y 0.25, z_y 3. Channel 0: Σ(10, 12, 14, 17) − 4·10 = 13,
    /// 13 · 0.5 / (0.25 · 4) = 6.5 → 6 (half to even) + 3 = 9; channel 1: (1 − 40) · 0.5 = −19.5 → clamped to −3 → 0.
    /// The float simulation agrees.
    @Test func globalAveragePoolSumsCodes() throws {
        let (a, b, steps) = try Self.pooled(Node(opType: "GlobalAveragePool", name: "gap", inputs: ["fx"], outputs: ["pooled"]),
                                            zeros: (10, 3), scales: (0.5, 0.25), x: [10, 12, 14, 17, 0, 0, 0, 1], shape: [1, 2, 2, 2])
        #expect(steps == 1)
        #expect(a.ints == [9, 0] && a.shape == [1, 2, 1, 1])
        #expect(a == b)
    }

    /// QLinearAveragePool adds the output zero point before rounding: codes (10, 11, 12, 12), s_x 1, z_x 10 dequantize
    /// to (0, 1, 2, 2); their mean 1.25 / s_y 0.5 = 2.5, + z_y 3 = 5.5 → 6 as onnxruntime computes it, where the float
    /// simulation's QuantizeLinear rounds 2.5 to 2 first: 5.
    @Test func averagePoolRoundsAsOnnxRuntime() throws {
        let pool = Node(opType: "AveragePool", name: "pool", inputs: ["fx"], outputs: ["pooled"],
                        attributes: [Attribute("kernel_shape", .ints([2, 2])), Attribute("strides", .ints([2, 2]))])
        let (a, b, steps) = try Self.pooled(pool, zeros: (10, 3), scales: (1, 0.5), x: [10, 11, 12, 12], shape: [1, 1, 2, 2])
        #expect(steps == 1)
        #expect(a.ints == [6] && b.ints == [5])
    }

    /// A QDQ Gemm as a 1 × 1 integer convolution: x codes (12, 8) with z_x 10 and s_x 0.5, W (1, 2; 3, −1; 0, 4) with
    /// per-row scales (0.1, 0.2, 0.05), int32 bias (6, −3, 0) of scale s_x · s_w: accumulators (4, 5, −8), times
    /// (0.05, 0.1, 0.025) / s_y 0.1 = (2, 5, −2), + z_y 128 = (130, 133, 126), as the float simulation computes.
    @Test func gemmRunsAsAnIntegerConvolution() throws {
        let nodes = [
            Node(opType: "DequantizeLinear", name: "dx", inputs: ["x", "sx", "zx"], outputs: ["fx"]),
            Node(opType: "DequantizeLinear", name: "dw", inputs: ["w", "sw", "zw"], outputs: ["fw"], attributes: [Attribute("axis", .int(0))]),
            Node(opType: "DequantizeLinear", name: "db", inputs: ["b", "sb", "zb"], outputs: ["fb"], attributes: [Attribute("axis", .int(0))]),
            Node(opType: "Gemm", name: "gemm", inputs: ["fx", "fw", "fb"], outputs: ["z"], attributes: [Attribute("transB", .int(1))]),
            Node(opType: "QuantizeLinear", name: "q", inputs: ["z", "sy", "zy"], outputs: ["y"]),
        ]
        let graph = Graph(name: "gemm", nodes: nodes, inputs: [ValueInfo(name: "x", elementType: .uint8, shape: [.value(1), .value(2)])],
                          outputs: [ValueInfo(name: "y", elementType: .uint8, shape: nil)],
                          initializers: [Self.scalar("sx", 0.5), Self.zero("zx", 10),
                                         Self.codes("w", [3, 2], [1, 2, 3, -1, 0, 4], .int8), Self.tensor("sw", [3], floats: [0.1, 0.2, 0.05]),
                                         Self.codes("zw", [3], [0, 0, 0], .int8),
                                         Self.codes("b", [3], [6, -3, 0], .int32), Self.tensor("sb", [3], floats: [0.5 * 0.1, 0.5 * 0.2, 0.5 * 0.05]),
                                         Self.codes("zb", [3], [0, 0, 0], .int32),
                                         Self.scalar("sy", 0.1), Self.zero("zy", 128)])
        let model = Model(graph: graph, opset: 13)
        #expect(try InferenceSession(model: model).compiled(shapes: ["x": (.uint8, [1, 2])]).integerSteps == 1)
        let (a, b) = try Self.both(model, ["x": Tensor(shape: [1, 2], ints: [12, 8], dtype: .uint8)])
        #expect(a.ints == [130, 133, 126])
        #expect(a == b)
    }

    /// A QDQ MatMul with a constant right operand as a 1 × 1 integer convolution over the leading dimensions: x codes
    /// ((12, 8), (10, 14)) with z_x 10 and s_x 0.5, W [K 2, N 3] = (1, 3, 0; 2, −1, 4) with per-column scales
    /// (0.1, 0.2, 0.05): accumulators (−2, 8, −8; 8, −4, 16), times (0.05, 0.1, 0.025) / s_y 0.1 = (−1, 8, −2; 4, −4,
    /// 4), + z_y 128.
    @Test func matMulRunsAsAnIntegerConvolution() throws {
        let nodes = [
            Node(opType: "DequantizeLinear", name: "dx", inputs: ["x", "sx", "zx"], outputs: ["fx"]),
            Node(opType: "DequantizeLinear", name: "dw", inputs: ["w", "sw", "zw"], outputs: ["fw"], attributes: [Attribute("axis", .int(1))]),
            Node(opType: "MatMul", name: "matmul", inputs: ["fx", "fw"], outputs: ["z"]),
            Node(opType: "QuantizeLinear", name: "q", inputs: ["z", "sy", "zy"], outputs: ["y"]),
        ]
        let graph = Graph(name: "matmul", nodes: nodes, inputs: [ValueInfo(name: "x", elementType: .uint8, shape: [.value(1), .value(2), .value(2)])],
                          outputs: [ValueInfo(name: "y", elementType: .uint8, shape: nil)],
                          initializers: [Self.scalar("sx", 0.5), Self.zero("zx", 10),
                                         Self.codes("w", [2, 3], [1, 3, 0, 2, -1, 4], .int8), Self.tensor("sw", [3], floats: [0.1, 0.2, 0.05]),
                                         Self.codes("zw", [3], [0, 0, 0], .int8), Self.scalar("sy", 0.1), Self.zero("zy", 128)])
        let model = Model(graph: graph, opset: 13)
        #expect(try InferenceSession(model: model).compiled(shapes: ["x": (.uint8, [1, 2, 2])]).integerSteps == 1)
        let (a, b) = try Self.both(model, ["x": Tensor(shape: [1, 2, 2], ints: [12, 8, 10, 14], dtype: .uint8)])
        #expect(a.shape == [1, 2, 3])
        #expect(a.ints == [127, 136, 126, 132, 124, 132])
        #expect(a == b)
    }

    /// An int4 weight through an opset-21 DequantizeLinear (blocks of 2 along K, zero points) stays packed: MatMul
    /// and Gemm (transB, bias) run from the 4-bit codes, the folded float weight is not kept, and the outputs equal
    /// the float simulation's. W [K 4, N 3] codes (1, −2, 3; −4, 5, −6; 7, −8, 0; 2, 2, −1), block scales
    /// (0.5, 0.25, 1; 2, 0.5, 0.125), zero points (1, 0, −1; 0, 2, 0): x (1, 0, 0, 0) picks (1 − 1) · 0.5 = 0,
    /// −2 · 0.25 = −0.5 and (3 + 1) · 1 = 4.
    @Test(arguments: ["MatMul", "Gemm"])
    func int4WeightsStayPacked(_ op: String) throws {
        let kn: [Int64] = [1, -2, 3, -4, 5, -6, 7, -8, 0, 2, 2, -1]
        let transposed = op == "Gemm"  // Gemm's B as [N, K], blocks along axis 1
        let codes = transposed ? (0..<12).map { kn[($0 % 4) * 3 + $0 / 4] } : kn
        let scales: [Float] = [0.5, 0.25, 1, 2, 0.5, 0.125], zeros: [Int64] = [1, 0, -1, 0, 2, 0]
        let blockScales = transposed ? [0, 3, 1, 4, 2, 5].map { scales[$0] } : scales
        let blockZeros = transposed ? [0, 3, 1, 4, 2, 5].map { zeros[$0] } : zeros
        var nodes = [Node(opType: "DequantizeLinear", name: "dw", inputs: ["w", "sw", "zw"], outputs: ["fw"],
                          attributes: [Attribute("axis", .int(transposed ? 1 : 0)), Attribute("block_size", .int(2))])]
        var initializers = [Self.codes("w", transposed ? [3, 4] : [4, 3], codes, .int4),
                            Self.tensor("sw", transposed ? [3, 2] : [2, 3], floats: blockScales),
                            Self.codes("zw", transposed ? [3, 2] : [2, 3], blockZeros, .int4)]
        if transposed {
            nodes.append(Node(opType: "Gemm", name: "gemm", inputs: ["x", "fw", "c"], outputs: ["y"], attributes: [Attribute("transB", .int(1))]))
            initializers.append(Self.tensor("c", [3], floats: [0.5, 0, -1]))
        } else {
            nodes.append(Node(opType: "MatMul", name: "matmul", inputs: ["x", "fw"], outputs: ["y"]))
        }
        let graph = Graph(name: "int4", nodes: nodes, inputs: [ValueInfo(name: "x", elementType: .float, shape: [.value(2), .value(4)])],
                          outputs: [ValueInfo(name: "y", elementType: .float, shape: nil)], initializers: initializers)
        let model = Model(graph: graph, opset: 21)
        let compiled = try InferenceSession(model: model).compiled(shapes: ["x": (.float, [2, 4])])
        #expect(compiled.inferred.values["fw"]?.constant == nil)  // the float copy is gone
        let x = Tensor(shape: [2, 4], floats: [1, 0, 0, 0, 0.5, -1, 2, 0.25])
        #expect(try compiled.profile(["x": x]).contains { $0.implementation == "int4 packed, blocks of 2" })
        let (a, b) = try Self.both(model, ["x": x])
        let bias: [Float] = transposed ? [0.5, 0, -1] : [0, 0, 0]
        #expect(Array(a.floats.prefix(3)) == zip([0, -0.5, 4], bias).map { $0 + $1 })
        #expect(TestSupport.relativeError(a.floats, b.floats) < Self.int4Tolerance)
    }

    /// A block_size far larger than K (one block spanning K, as opset 21 allows) runs packed, and the packed weight
    /// is sized by K: an attribute alone cannot make the planner allocate (2⁴⁰ here would be a terabyte).
    @Test func aHugeBlockSizeIsOneBlockSizedByK() throws {
        let nodes = [Node(opType: "DequantizeLinear", name: "dw", inputs: ["w", "sw"], outputs: ["fw"],
                          attributes: [Attribute("axis", .int(0)), Attribute("block_size", .int(1 << 40))]),
                     Node(opType: "MatMul", name: "matmul", inputs: ["x", "fw"], outputs: ["y"])]
        let graph = Graph(name: "int4", nodes: nodes, inputs: [ValueInfo(name: "x", elementType: .float, shape: [.value(1), .value(3)])],
                          outputs: [ValueInfo(name: "y", elementType: .float, shape: nil)],
                          initializers: [Self.codes("w", [3, 2], [1, -2, 3, -4, 5, -6], .int4), Self.tensor("sw", [1, 2], floats: [0.5, 0.25])])
        let model = Model(graph: graph, opset: 21)
        let compiled = try InferenceSession(model: model).compiled(shapes: ["x": (.float, [1, 3])])
        let x = Tensor(shape: [1, 3], floats: [1, 2, 3])
        #expect(try compiled.profile(["x": x]).contains { $0.implementation == "int4 packed, blocks of 4" })
        let (a, b) = try Self.both(model, ["x": x])
        // (1 + 6 + 15) · 0.5 = 11 and (−2 − 8 − 18) · 0.25 = −7.
        #expect(a.floats == [11, -7])
        #expect(TestSupport.relativeError(a.floats, b.floats) < Self.int4Tolerance)
    }

    /// Float sums in another order (sgemm against the simulation's one node at a time).
    static let int4Tolerance: Float = 1e-6

    /// MaxPool between QDQ pairs of the same parameters takes the largest code: 2 × 2 windows, stride 1, padded at the
    /// bottom and right, over codes (10, 250; 3, 7) give (250, 250; 7, 7), as the float simulation does.
    @Test func maxPoolTakesTheLargestCode() throws {
        let pool = Node(opType: "MaxPool", name: "pool", inputs: ["fx"], outputs: ["pooled"],
                        attributes: [Attribute("kernel_shape", .ints([2, 2])), Attribute("pads", .ints([0, 0, 1, 1]))])
        let (a, b, steps) = try Self.pooled(pool, zeros: (3, 3), scales: (0.5, 0.5), x: [10, 250, 3, 7], shape: [1, 1, 2, 2])
        #expect(steps == 1)
        #expect(a.ints == [250, 250, 7, 7])
        #expect(a == b)
    }
}
