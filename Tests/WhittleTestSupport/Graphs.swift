import WhittleONNX
import WhittleTensor

/// Small graphs built in code, for cases the PyTorch fixtures lack.
public enum Graphs {
    public static func weight(_ name: String, _ shape: [Int], seed: UInt64) -> Initializer {
        Initializer(name: name, tensor: Tensor(shape: shape, floats: TestSupport.randomFloats(shape.reduce(1, *), seed: seed)))
    }

    public static func conv(_ name: String, _ input: String, _ output: String, weight: String, bias: String? = nil,
                     kernel: Int = 1, group: Int = 1) -> Node {
        var attributes = [Attribute("kernel_shape", .ints([Int64(kernel), Int64(kernel)]))]
        if kernel > 1 { attributes.append(Attribute("pads", .ints([Int64(kernel / 2), Int64(kernel / 2), Int64(kernel / 2), Int64(kernel / 2)]))) }
        if group > 1 { attributes.append(Attribute("group", .int(Int64(group)))) }
        return Node(opType: "Conv", name: name, inputs: [input, weight] + (bias.map { [$0] } ?? []), outputs: [output],
                    attributes: attributes)
    }

    public static func model(_ nodes: [Node], _ initializers: [Initializer], input: [Int] = [3, 8, 8], classes: Int = 3) -> Model {
        let graph = Graph(name: "handbuilt", nodes: nodes,
                          inputs: [ValueInfo(name: "x", elementType: .float, shape: [.symbol("N")] + input.map { .value($0) })],
                          outputs: [ValueInfo(name: "logits", elementType: .float, shape: [.symbol("N"), .value(classes)])],
                          initializers: initializers)
        return Model(graph: graph, opset: 13, irVersion: 7)
    }

    /// conv A (3→4, 3×3) → Relu ┐
    ///                           Concat (10) → depthwise 3×3 → conv C (10→5) → GlobalAveragePool → Flatten → Gemm
    /// conv B (3→6, 1×1) ───────┘
    public static func concat() -> Model {
        model([
            conv("convA", "x", "a0", weight: "wA", bias: "bA", kernel: 3),
            Node(opType: "Relu", name: "reluA", inputs: ["a0"], outputs: ["a"]),
            conv("convB", "x", "b", weight: "wB", bias: "bB"),
            Node(opType: "Concat", name: "cat", inputs: ["a", "b"], outputs: ["c"], attributes: [Attribute("axis", .int(1))]),
            conv("dw", "c", "c2", weight: "wD", bias: "bD", kernel: 3, group: 10),
            conv("convC", "c2", "d", weight: "wC", bias: "bC"),
            Node(opType: "GlobalAveragePool", name: "gap", inputs: ["d"], outputs: ["e"]),
            Node(opType: "Flatten", name: "flat", inputs: ["e"], outputs: ["f"]),
            Node(opType: "Gemm", name: "fc", inputs: ["f", "wF", "bF"], outputs: ["logits"], attributes: [Attribute("transB", .int(1))]),
        ], [
            weight("wA", [4, 3, 3, 3], seed: 1), weight("bA", [4], seed: 2), weight("wB", [6, 3, 1, 1], seed: 3),
            weight("bB", [6], seed: 4), weight("wD", [10, 1, 3, 3], seed: 5), weight("bD", [10], seed: 6),
            weight("wC", [5, 10, 1, 1], seed: 7), weight("bC", [5], seed: 8), weight("wF", [3, 5], seed: 9), weight("bF", [3], seed: 10),
        ])
    }
}

extension Graphs {
    /// conv (3→16, 3×3, no bias: batch norm follows, as in real nets) → BN → Relu → conv (16→32, 3×3) → BN → Relu → GlobalAveragePool → Flatten → Gemm (32→3):
    /// widths that every oneDNN ISA can keep blocked (8- and 16-channel blocks), for tests of blocked layouts.
    public static func wideConvNet() -> Model {
        func bn(_ name: String, _ input: String, _ output: String) -> Node {
            Node(opType: "BatchNormalization", name: name, inputs: [input, name + ".scale", name + ".bias", name + ".mean", name + ".var"],
                 outputs: [output])
        }
        func bnParameters(_ name: String, _ c: Int, seed: UInt64) -> [Initializer] {
            [Initializer(name: name + ".scale", tensor: Tensor(shape: [c], floats: TestSupport.randomFloats(c, seed: seed).map { 1 + 0.1 * $0 })),
             weight(name + ".bias", [c], seed: seed + 1),
             Initializer(name: name + ".mean", tensor: Tensor(shape: [c], floats: [Float](repeating: 0, count: c))),
             Initializer(name: name + ".var", tensor: Tensor(shape: [c], floats: [Float](repeating: 1, count: c)))]
        }
        return model([
            conv("conv1", "x", "a0", weight: "w1", kernel: 3), bn("bn1", "a0", "a1"),
            Node(opType: "Relu", name: "relu1", inputs: ["a1"], outputs: ["a"]),
            conv("conv2", "a", "c0", weight: "w2", kernel: 3), bn("bn2", "c0", "c1"),
            Node(opType: "Relu", name: "relu2", inputs: ["c1"], outputs: ["c"]),
            Node(opType: "GlobalAveragePool", name: "gap", inputs: ["c"], outputs: ["e"]),
            Node(opType: "Flatten", name: "flat", inputs: ["e"], outputs: ["f"]),
            Node(opType: "Gemm", name: "fc", inputs: ["f", "wF", "bF"], outputs: ["logits"], attributes: [Attribute("transB", .int(1))]),
        ], [
            weight("w1", [16, 3, 3, 3], seed: 21), weight("w2", [32, 16, 3, 3], seed: 23), weight("wF", [3, 32], seed: 25), weight("bF", [3], seed: 26),
        ] + bnParameters("bn1", 16, seed: 27) + bnParameters("bn2", 32, seed: 29))
    }
}
