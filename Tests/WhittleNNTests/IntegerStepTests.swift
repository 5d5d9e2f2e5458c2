import Testing
import WhittleNN
import WhittleONNX
import WhittleTensor

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
}
