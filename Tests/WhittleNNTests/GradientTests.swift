import Testing
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// Every backward pass against central finite differences of `L = Σ r · y` (r fixed random), evaluated in
/// float32 forward passes with the loss summed in Double.
@Suite struct GradientTests {
    /// Finite-difference step. Inputs are kept at least `kinkMargin` away from points where an op is not
    /// differentiable, so the two evaluations stay on one linear piece.
    static let step: Float = 1e-2
    static let kinkMargin: Float = 0.05
    /// Allowed |analytic − numeric| / max(1, |numeric|): float32 rounding of L (≈ 1.2e-7 · Σ|r·y| ≈ 1e-5) divided
    /// by 2h gives ≈ 1e-3, plus O(h²) truncation for curved ops.
    static let tolerance: Double = 1e-2

    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var node: Node
        var x: Tensor
        var initializers: [(String, Tensor)]
        var opset: Int64 = 13
        var testDescription: String { name }
    }

    static func random(_ shape: [Int], seed: UInt64, scale: Float = 1, kinks: [Float] = []) -> Tensor {
        var v = TestSupport.randomFloats(shape.reduce(1, *), seed: seed).map { $0 * scale }
        for i in v.indices { for k in kinks where abs(v[i] - k) < kinkMargin { v[i] = k + 2 * kinkMargin } }
        return Tensor(shape: shape, floats: v)
    }

    static func node(_ op: String, _ inputs: [String], _ attributes: [Attribute] = []) -> Node {
        Node(opType: op, name: op.lowercased(), inputs: inputs, outputs: ["y"], attributes: attributes)
    }

    static let cases: [Case] = {
        var c: [Case] = []
        let x4 = random([2, 4, 6, 5], seed: 1)
        c.append(Case(name: "Conv 3x3 pad", node: node("Conv", ["x", "w", "b"], [Attribute("pads", .ints([1, 1, 1, 1]))]),
                      x: x4, initializers: [("w", random([3, 4, 3, 3], seed: 2)), ("b", random([3], seed: 3))]))
        c.append(Case(name: "Conv grouped strided dilated", node: node("Conv", ["x", "w"], [
            Attribute("group", .int(2)), Attribute("strides", .ints([2, 1])), Attribute("dilations", .ints([1, 2])),
            Attribute("pads", .ints([1, 0, 0, 2]))]), x: x4, initializers: [("w", random([6, 2, 3, 2], seed: 4))]))
        c.append(Case(name: "Conv depthwise", node: node("Conv", ["x", "w", "b"], [Attribute("group", .int(4)),
            Attribute("pads", .ints([1, 1, 1, 1]))]), x: x4, initializers: [("w", random([4, 1, 3, 3], seed: 5)), ("b", random([4], seed: 6))]))
        let x2 = random([3, 5], seed: 7)
        for (ta, tb) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let a = ta == 1 ? random([5, 3], seed: 8) : x2
            c.append(Case(name: "Gemm transA \(ta) transB \(tb)", node: node("Gemm", ["x", "w", "c"], [
                Attribute("transA", .int(Int64(ta))), Attribute("transB", .int(Int64(tb))), Attribute("alpha", .float(0.7)),
                Attribute("beta", .float(1.3))]), x: a,
                initializers: [("w", random(tb == 1 ? [4, 5] : [5, 4], seed: 9)), ("c", random([4], seed: 10))]))
        }
        c.append(Case(name: "MatMul batched", node: node("MatMul", ["x", "w"]), x: random([2, 3, 4], seed: 11),
                      initializers: [("w", random([4, 5], seed: 12))]))
        c.append(Case(name: "BatchNormalization training", node: node("BatchNormalization", ["x", "s", "b", "m", "v"]),
                      x: x4, initializers: [("s", random([4], seed: 13)), ("b", random([4], seed: 14)),
                                            ("m", random([4], seed: 15)), ("v", Tensor(shape: [4], floats: [1, 2, 0.5, 1.5]))]))
        let xa = random([2, 3, 4, 4], seed: 16, scale: 5, kinks: [-3, 0, 3, 6, -2.5, 2.5])
        for (op, attributes) in [("Relu", [Attribute]()), ("LeakyRelu", [Attribute("alpha", .float(0.1))]), ("Sigmoid", []),
                                 ("Tanh", []), ("HardSwish", []), ("HardSigmoid", [Attribute("alpha", .float(0.2))])] {
            c.append(Case(name: op, node: node(op, ["x"], attributes), x: xa, initializers: [], opset: 14))
        }
        c.append(Case(name: "Clip (ReLU6)", node: node("Clip", ["x", "lo", "hi"]), x: xa,
                      initializers: [("lo", .scalar(0)), ("hi", .scalar(6))]))
        c.append(Case(name: "PRelu per channel", node: node("PRelu", ["x", "slope"]), x: xa,
                      initializers: [("slope", random([3, 1, 1], seed: 17))]))
        c.append(Case(name: "MaxPool", node: node("MaxPool", ["x"], [Attribute("kernel_shape", .ints([2, 2])),
            Attribute("strides", .ints([2, 2]))]), x: random([2, 3, 6, 6], seed: 18), initializers: []))
        c.append(Case(name: "AveragePool include pad", node: node("AveragePool", ["x"], [Attribute("kernel_shape", .ints([3, 3])),
            Attribute("pads", .ints([1, 1, 1, 1])), Attribute("count_include_pad", .int(1)), Attribute("strides", .ints([2, 2]))]),
            x: random([2, 3, 5, 5], seed: 19), initializers: []))
        c.append(Case(name: "AveragePool exclude pad", node: node("AveragePool", ["x"], [Attribute("kernel_shape", .ints([3, 3])),
            Attribute("pads", .ints([1, 1, 1, 1]))]), x: random([2, 3, 5, 5], seed: 20), initializers: []))
        c.append(Case(name: "GlobalAveragePool", node: node("GlobalAveragePool", ["x"]), x: x4, initializers: []))
        c.append(Case(name: "ReduceMean", node: node("ReduceMean", ["x"], [Attribute("axes", .ints([2, 3])),
            Attribute("keepdims", .int(0))]), x: x4, initializers: []))
        for op in ["Add", "Sub", "Mul", "Div"] {
            let operand = op == "Div" ? Tensor(shape: [4, 1, 1], floats: [1.5, -2, 0.8, 3]) : random([4, 1, 1], seed: 21)
            c.append(Case(name: "\(op) broadcast", node: node(op, ["x", "k"]), x: x4, initializers: [("k", operand)]))
        }
        c.append(Case(name: "Concat", node: node("Concat", ["x", "k"], [Attribute("axis", .int(1))]), x: x4,
                      initializers: [("k", random([2, 2, 6, 5], seed: 22))]))
        c.append(Case(name: "Flatten", node: node("Flatten", ["x"]), x: x4, initializers: []))
        c.append(Case(name: "Reshape", node: node("Reshape", ["x", "shape"]), x: x4,
                      initializers: [("shape", Tensor(shape: [2], ints: [2, -1], dtype: .int64))]))
        c.append(Case(name: "Transpose", node: node("Transpose", ["x"], [Attribute("perm", .ints([0, 2, 3, 1]))]), x: x4, initializers: []))
        c.append(Case(name: "Softmax", node: node("Softmax", ["x"], [Attribute("axis", .int(1))]), x: x2, initializers: []))
        c.append(Case(name: "Identity", node: node("Identity", ["x"]), x: x2, initializers: []))
        c.append(Case(name: "Dropout training", node: node("Dropout", ["x", "ratio"]), x: x4, initializers: [("ratio", .scalar(0.3))]))
        c += transformerCases()
        return c
    }()

    /// The ops on the gradient's path in transformers, detectors and segmenters.
    static func transformerCases() -> [Case] {
        var c: [Case] = []
        let x3 = random([2, 3, 6], seed: 31, scale: 2)
        let positive = Tensor(shape: [2, 3, 6], floats: random([2, 3, 6], seed: 32).floats.map { abs($0) + 0.5 })
        let ints = { (shape: [Int], values: [Int64]) in Tensor(shape: shape, ints: values, dtype: .int64) }
        for op in ["Erf", "Exp", "Neg"] { c.append(Case(name: op, node: node(op, ["x"]), x: x3, initializers: [])) }
        for op in ["Sqrt", "Log", "Reciprocal"] { c.append(Case(name: op, node: node(op, ["x"]), x: positive, initializers: [])) }
        c.append(Case(name: "Abs", node: node("Abs", ["x"]), x: random([2, 3, 6], seed: 33, kinks: [0]), initializers: []))
        c.append(Case(name: "Gelu erf", node: node("Gelu", ["x"]), x: x3, initializers: [], opset: 20))
        c.append(Case(name: "Gelu tanh", node: node("Gelu", ["x"], [Attribute("approximate", .string(Array("tanh".utf8)))]), x: x3,
                      initializers: [], opset: 20))
        c.append(Case(name: "Pow square", node: node("Pow", ["x", "p"]), x: x3, initializers: [("p", .scalar(2))]))
        c.append(Case(name: "Pow per feature", node: node("Pow", ["x", "p"]), x: positive,
                      initializers: [("p", Tensor(shape: [6], floats: [0.5, 1.5, 2, 3, -1, 1]))]))
        for op in ["Max", "Min", "Sum"] {
            c.append(Case(name: "\(op) broadcast", node: node(op, ["x", "k"]), x: x3, initializers: [("k", random([3, 1], seed: 34))]))
        }
        c.append(Case(name: "Where", node: node("Where", ["c", "x", "k"]), x: x3,
                      initializers: [("c", Tensor(shape: [1, 6], ints: [1, 0, 1, 1, 0, 0], dtype: .bool)), ("k", random([3, 1], seed: 35))]))
        c.append(Case(name: "ReduceSum axes input", node: node("ReduceSum", ["x", "axes"], [Attribute("keepdims", .int(0))]),
                      x: x3, initializers: [("axes", ints([1], [1]))]))
        c.append(Case(name: "ReduceMax", node: node("ReduceMax", ["x"], [Attribute("axes", .ints([2]))]), x: x3, initializers: []))
        c.append(Case(name: "ReduceL2", node: node("ReduceL2", ["x"], [Attribute("axes", .ints([1, 2]))]), x: x3, initializers: []))
        c.append(Case(name: "ReduceSumSquare", node: node("ReduceSumSquare", ["x"], [Attribute("axes", .ints([0]))]), x: x3, initializers: []))
        c.append(Case(name: "LayerNormalization", node: node("LayerNormalization", ["x", "g", "b"], [Attribute("epsilon", .float(1e-5))]),
                      x: x3, initializers: [("g", random([6], seed: 36)), ("b", random([6], seed: 37))], opset: 17))
        c.append(Case(name: "LayerNormalization axis 1", node: node("LayerNormalization", ["x", "g"], [Attribute("axis", .int(1))]),
                      x: x3, initializers: [("g", random([3, 6], seed: 38))], opset: 17))
        let x4 = random([2, 4, 3, 3], seed: 39, scale: 2)
        c.append(Case(name: "InstanceNormalization", node: node("InstanceNormalization", ["x", "g", "b"]), x: x4,
                      initializers: [("g", random([4], seed: 40)), ("b", random([4], seed: 41))]))
        c.append(Case(name: "GroupNormalization opset 18", node: node("GroupNormalization", ["x", "g", "b"], [Attribute("num_groups", .int(2))]),
                      x: x4, initializers: [("g", random([2], seed: 42)), ("b", random([2], seed: 43))], opset: 18))
        c.append(Case(name: "GroupNormalization opset 21", node: node("GroupNormalization", ["x", "g", "b"], [Attribute("num_groups", .int(2))]),
                      x: x4, initializers: [("g", random([4], seed: 44)), ("b", random([4], seed: 45))], opset: 21))
        c.append(Case(name: "Slice", node: node("Slice", ["x", "s", "e", "a", "st"]), x: x3,
                      initializers: [("s", ints([2], [0, 5])), ("e", ints([2], [2, 0])), ("a", ints([2], [1, 2])), ("st", ints([2], [1, -2]))]))
        c.append(Case(name: "Pad reflect", node: node("Pad", ["x", "pads"], [Attribute("mode", .string(Array("reflect".utf8)))]), x: x3,
                      initializers: [("pads", ints([6], [0, 1, 2, 0, 1, 1]))]))
        c.append(Case(name: "Gather (embedding rows)", node: node("Gather", ["x", "i"], [Attribute("axis", .int(1))]), x: x3,
                      initializers: [("i", ints([2, 2], [2, 0, 2, -1]))]))
        c.append(Case(name: "GatherElements", node: node("GatherElements", ["x", "i"], [Attribute("axis", .int(2))]), x: x3,
                      initializers: [("i", ints([2, 3, 2], [0, 5, 1, 1, 2, 3, 4, 0, 0, 0, 5, 4]))]))
        c.append(Case(name: "Expand", node: node("Expand", ["x", "shape"]), x: random([2, 1, 6], seed: 46),
                      initializers: [("shape", ints([3], [2, 4, 6]))]))
        c.append(Case(name: "Tile", node: node("Tile", ["x", "r"]), x: x3, initializers: [("r", ints([3], [1, 2, 1]))]))
        c.append(Case(name: "Split (one output used)", node: Node(opType: "Split", name: "split", inputs: ["x", "sizes"],
                                                                 outputs: ["y", "unused"], attributes: [Attribute("axis", .int(2))]),
                      x: x3, initializers: [("sizes", ints([2], [4, 2]))]))
        c.append(Case(name: "Resize nearest", node: node("Resize", ["x", "", "scales"], [Attribute("mode", .string(Array("nearest".utf8))),
            Attribute("coordinate_transformation_mode", .string(Array("asymmetric".utf8))), Attribute("nearest_mode", .string(Array("floor".utf8)))]),
                      x: x4, initializers: [("scales", Tensor(shape: [4], floats: [1, 1, 2, 2]))]))
        c.append(Case(name: "Resize linear", node: node("Resize", ["x", "", "", "sizes"], [Attribute("mode", .string(Array("linear".utf8)))]),
                      x: x4, initializers: [("sizes", ints([4], [2, 4, 5, 7]))]))
        c.append(Case(name: "Cast float", node: node("Cast", ["x"], [Attribute("to", .int(1))]), x: x3, initializers: []))
        func einsum(_ equation: String) -> [Attribute] { [Attribute("equation", .string(Array(equation.utf8)))] }
        c.append(Case(name: "Einsum attention scores", node: node("Einsum", ["x", "w"], einsum("bhid,bhjd->bhij")),
                      x: random([2, 2, 3, 4], seed: 60), initializers: [("w", random([2, 2, 5, 4], seed: 61))]))
        c.append(Case(name: "Einsum projection with ellipsis", node: node("Einsum", ["x", "w"], einsum("...d,de->...e")),
                      x: random([2, 3, 4], seed: 62), initializers: [("w", random([4, 5], seed: 63))]))
        c.append(Case(name: "Einsum broadcast batch", node: node("Einsum", ["x", "w"], einsum("bij,bjk->bik")),
                      x: random([2, 3, 4], seed: 64), initializers: [("w", random([1, 4, 5], seed: 65))]))
        c.append(Case(name: "Einsum index only in one operand", node: node("Einsum", ["x", "w"], einsum("ij,k->ik")),
                      x: random([3, 4], seed: 66), initializers: [("w", random([5], seed: 67))]))
        c.append(Case(name: "Einsum reduction", node: node("Einsum", ["x"], einsum("ij->i")), x: random([4, 5], seed: 68), initializers: []))
        c.append(Case(name: "Einsum diagonal", node: node("Einsum", ["x"], einsum("bii->bi")), x: random([2, 4, 4], seed: 69), initializers: []))
        c.append(Case(name: "ConvTranspose strided grouped", node: node("ConvTranspose", ["x", "w", "b"], [
            Attribute("strides", .ints([2, 1])), Attribute("pads", .ints([1, 0, 0, 1])), Attribute("group", .int(2))]),
                      x: random([2, 4, 3, 4], seed: 47), initializers: [("w", random([4, 2, 3, 2], seed: 48)), ("b", random([4], seed: 49))]))
        return c
    }

    func model(_ c: Case) -> Model {
        var x = ValueInfo(name: "x", elementType: .float, shape: [.symbol("N")] + c.x.shape.dropFirst().map { .value($0) })
        x.docString = ""
        let graph = Graph(name: "g", nodes: [c.node], inputs: [x],
                          outputs: [ValueInfo(name: "y", elementType: .float, shape: nil)],
                          initializers: c.initializers.map { Initializer(name: $0.0, tensor: $0.1) })
        return Model(graph: graph, opset: c.opset)
    }

    @Test(arguments: cases)
    func backwardMatchesFiniteDifferences(_ c: Case) throws {
        for fast in [true, false] {
            let graph = try TrainingGraph(model: model(c), batchSize: c.x.shape[0], fast: fast)
            var parameters: [String: Tensor] = [:]
            for (name, value) in c.initializers where value.dtype == .float { parameters[name] = value }
            func run(_ x: Tensor, _ p: [String: Tensor]) throws -> GraphRun {
                var rng = SplitMix64(seed: 5)
                return GraphRun(tape: try graph.forward(x, parameters: p, training: true, rng: &rng))
            }
            let base = try run(c.x, parameters)
            let y = base.tape.value("y")!
            let r = TestSupport.randomFloats(y.count, seed: 99)
            let grads = try graph.backward(base.tape, seeds: ["y": Tensor(shape: y.shape, floats: r)])
            func loss(_ x: Tensor, _ p: [String: Tensor]) throws -> Double {
                let out = try run(x, p).tape.value("y")!.floats
                return zip(out, r).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
            }
            var targets: [(String, Tensor)] = [("x", c.x)]
            for name in graph.parameterNames { targets.append((name, parameters[name]!)) }
            for (name, value) in targets {
                let analytic = try #require(grads[name], "no gradient for \(name)")
                #expect(analytic.shape == value.shape)
                for i in Array(stride(from: 0, to: value.count, by: max(1, value.count / 24))) {
                    var plus = value, minus = value
                    plus.floats[i] += Self.step
                    minus.floats[i] -= Self.step
                    let numeric: Double
                    if name == "x" {
                        numeric = (try loss(plus, parameters) - loss(minus, parameters)) / Double(2 * Self.step)
                    } else {
                        var pp = parameters, pm = parameters
                        pp[name] = plus
                        pm[name] = minus
                        numeric = (try loss(c.x, pp) - loss(c.x, pm)) / Double(2 * Self.step)
                    }
                    let error = abs(Double(analytic.floats[i]) - numeric) / max(1, abs(numeric))
                    #expect(error < Self.tolerance, "\(c.name) fast=\(fast): d\(name)[\(i)] analytic \(analytic.floats[i]) numeric \(numeric)")
                }
            }
        }
    }

    struct GraphRun { var tape: TrainingGraph.Tape }

    @Test func convolutionBackwardFastMatchesReference() throws {
        let g = Conv2DGeometry(batch: 2, inChannels: 6, height: 7, width: 9, outChannels: 4, kernelH: 3, kernelW: 3,
                               groups: 2, strides: (2, 1), dilations: (1, 2), pads: (1, 2, 0, 1))
        let x = TestSupport.randomFloats(g.inputShape.reduce(1, *), seed: 40)
        let w = TestSupport.randomFloats(g.weightShape.reduce(1, *), seed: 41)
        let dy = TestSupport.randomFloats(g.outputShape.reduce(1, *), seed: 42)
        let fast = try Kernels.conv2dBackward(g, input: x, weights: w, dY: dy)
        let reference = Kernels.conv2dBackwardReference(g, input: x, weights: w, dY: dy)
        #expect(TestSupport.relativeError(fast.dX!, reference.dX) < 1e-5)
        #expect(TestSupport.relativeError(fast.dW!, reference.dW) < 1e-5)
        #expect(TestSupport.relativeError(fast.dB, reference.dB) < 1e-5)
        // oneDNN's training primitives (forward-training, backward-data, backward-weights) against the same twins.
        let b = TestSupport.randomFloats(g.outChannels, seed: 43)
        let plan = try ConvTrainingPlan(g, hasBias: true)
        let y = try plan.forward(input: x, weights: w, bias: b)
        #expect(TestSupport.relativeError(y, Kernels.conv2dReference(g, input: x, weights: w, bias: b)) < 1e-5)
        let r = try plan.backward(input: x, weights: w, dY: dy, needInput: true, needWeights: true, needBias: true)
        #expect(TestSupport.relativeError(r.dX!, reference.dX) < 1e-5)
        #expect(TestSupport.relativeError(r.dW!, reference.dW) < 1e-5)
        #expect(TestSupport.relativeError(r.dB!, reference.dB) < 1e-5)
        let onlyWeights = try plan.backward(input: x, weights: w, dY: dy, needInput: false, needWeights: true, needBias: false)
        #expect(onlyWeights.dX == nil && onlyWeights.dB == nil)
        #expect(TestSupport.relativeError(onlyWeights.dW!, reference.dW) < 1e-5)
    }
}
