import WhittleONNX
import WhittleTensor

/// How batch normalization behaves during training.
public enum BatchNormMode: String, Sendable, CaseIterable {
    /// Normalize with batch statistics and update the running statistics (PyTorch's `model.train()`).
    case train
    /// Normalize with the stored running statistics and leave them unchanged (fine-tuning with frozen BN).
    case frozen
}

/// A model's graph prepared for training at one batch size: forward passes that record what backward passes need,
/// and backward passes that return ∂L/∂value for every value (parameters, activations, node outputs).
///
/// Parameters are the float initializers that feed a differentiable input of an op with a gradient definition
/// (Conv W and B, Gemm B and C, BatchNormalization scale and B, PRelu slope, constant operands of MatMul/Add/Mul…
/// other than scalars, embedding tables read by Gather, LayerNorm scale and B);
/// BatchNormalization's mean and variance are running statistics, updated by training-mode forward passes.
public final class TrainingGraph: @unchecked Sendable {
    public let model: Model
    public let opset: Int64
    public let inferred: InferredGraph
    public let parameterNames: [String]
    /// Per BatchNormalization node index: its running mean and variance initializers and ONNX momentum.
    public let runningStatistics: [Int: (mean: String, variance: String, momentum: Float)]
    /// The runtime inputs (images; token ids and attention masks), and the first of them.
    public let inputNames: [String]
    public var inputName: String { inputNames[0] }
    public let outputName: String
    let kernels: [(any NodeKernel)?]
    /// oneDNN training primitives per Conv node index (fast mode).
    let convolutionPlans: [Int: ConvTrainingPlan]
    /// oneDNN batch-normalization training primitives per BatchNormalization node index (fast mode).
    let batchNormPlans: [Int: BatchNormTrainingPlan]
    let fast: Bool
    /// Values that depend on a parameter or the input (those that carry gradients).
    let variable: Set<String>

    /// Activations (and their gradients) kept in oneDNN's blocked layout, with the block size. They have the same
    /// logical shape and element count as in NCHW — only the order differs; `plain(_:_:)` converts one back.
    public let blocked: [String: Int]

    static let elementwiseOps: Set<String> = ["Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Sum"]

    /// `plainValues` names values that must stay in NCHW order (tensors a caller reads during training, such as hint
    /// points or fake-quantized activations); `blockedLayouts` false keeps every value in NCHW.
    /// `batchNorm` is the mode forward passes will use: only training-mode batch norm runs on blocked data.
    public convenience init(model: Model, batchSize: Int, fast: Bool = true, blockedLayouts: Bool = true,
                            plainValues: Set<String> = [], batchNorm: BatchNormMode = .train) throws {
        try self.init(model: model, inputs: try ShapeInference.inputShapes(model, batchSize: batchSize), fast: fast,
                      blockedLayouts: blockedLayouts, plainValues: plainValues, batchNorm: batchNorm)
    }

    /// The graph for given element types and shapes of every runtime input (free dimensions such as a sequence
    /// length set).
    public init(model: Model, inputs shapes: [String: (DataType, [Int])], fast: Bool = true, blockedLayouts: Bool = true,
                plainValues: Set<String> = [], batchNorm: BatchNormMode = .train) throws {
        try ModelCoding.checkOpset(model)
        let opset = model.defaultOpset!
        self.model = model
        self.opset = opset
        self.fast = fast
        guard !model.graph.runtimeInputs.isEmpty else { throw ONNXError(.invalidGraph, "the model has no runtime inputs") }
        for input in model.graph.runtimeInputs where shapes[input.name] == nil {
            throw ONNXError(.invalidInput, "no shape for the model's input '\(input.name)'")
        }
        inputNames = model.graph.runtimeInputs.map(\.name)
        outputName = model.graph.outputs[0].name
        let (parameters, stats) = Self.trainables(model)
        parameterNames = parameters
        inferred = try ShapeInference.infer(model.graph, opset: opset, inputs: shapes, variables: Set(parameters))
        var running: [Int: (String, String, Float)] = [:]
        // Integer inputs (token ids, masks) carry no gradient.
        var variable = Set(parameters).union(inputNames.filter { shapes[$0]!.0.isFloatingPoint })
        var kernels: [(any NodeKernel)?] = []
        var plans: [Int: ConvTrainingPlan] = [:]
        var bnPlans: [Int: BatchNormTrainingPlan] = [:]
        for (i, ctx) in inferred.contexts.enumerated() {
            if fast, !inferred.folded[i], ctx.node.opType == "Conv" {
                let (x, window, _) = try Operators.convSetup(ctx)
                let w = try ctx.input(1)
                let g = window.geometry(batch: x.shape[0], channels: x.shape[1], spatial: Array(x.shape[2...]),
                                        outChannels: w.shape[0], groups: Int(try ctx.int("group", default: 1)))
                plans[i] = try ConvTrainingPlan(g, hasBias: ctx.optionalInput(2) != nil)
            }
            if let s = stats[ctx.node.outputs[0]] { running[i] = s }
            if ctx.node.inputs.contains(where: variable.contains) { variable.formUnion(ctx.node.outputs) }
            kernels.append(inferred.folded[i] ? nil : try inferred.definitions[i].compile(
                ctx, inferred.outputs[i], KernelOptions(fast: fast, fuse: false)))
        }
        convolutionPlans = plans
        blocked = fast && blockedLayouts
            ? Self.planLayouts(inferred, plans: plans, keepPlain: plainValues.union(model.graph.outputs.map(\.name)),
                               batchNormTies: batchNorm == .train) : [:]
        for (i, ctx) in inferred.contexts.enumerated() where fast && !inferred.folded[i] && ctx.node.opType == "BatchNormalization" {
            guard let x = ctx.optionalInput(0), x.rank >= 2, x.count > 0 else { continue }
            bnPlans[i] = try BatchNormTrainingPlan(batch: x.shape[0], channels: x.shape[1], spatial: x.shape[2...].reduce(1, *),
                                                   epsilon: try ctx.float("epsilon", default: 1e-5),
                                                   block: blocked[ctx.node.inputs[0]] ?? 0)
        }
        batchNormPlans = bnPlans
        runningStatistics = running
        self.variable = variable
        self.kernels = kernels
    }

    /// The model's parameters in graph order (see the type's comment) and, per BatchNormalization output, its
    /// running mean and variance initializers and ONNX momentum: what training changes, independent of input shapes.
    public static func trainables(_ model: Model) -> (parameters: [String], statistics: [String: (String, String, Float)]) {
        let initializers = model.graph.initializerIndex
        var parameters: [String] = []
        var seen = Set<String>()
        var stats: [String: (String, String, Float)] = [:]
        for node in model.graph.nodes {
            guard let definition = Gradients.registry[node.opType] else { continue }
            for (position, name) in node.inputs.enumerated() where definition.differentiable.contains(position) {
                guard let index = initializers[name], let tensor = model.graph.initializers[index].tensor,
                    tensor.dtype == .float, tensor.count > 0, !seen.contains(name) else { continue }
                if node.opType == "BatchNormalization" && position > 2 { continue }
                // An element-wise op's constant operand is a weight when it varies along one axis (a bias, a per-channel
                // scale such as ConvNeXt's layer scale). A scalar is a constant of the formula (GELU's ½ and √2, an
                // attention scale, a mask's fill value) and a table varying along several axes is a fixed buffer (a
                // detector's anchor grid, a sinusoidal position code): neither is trained, as PyTorch does not.
                if Self.elementwiseOps.contains(node.opType), tensor.count == 1 || tensor.shape.filter({ $0 > 1 }).count > 1 { continue }
                seen.insert(name)
                parameters.append(name)
            }
            if node.opType == "BatchNormalization", node.inputs.count == 5 {
                let momentum = node.attribute("momentum")?.value.float ?? 0.9
                stats[node.outputs[0]] = (node.inputs[3], node.inputs[4], momentum)
            }
        }
        return (parameters, stats)
    }

    /// The values of one forward pass, kept for the backward pass.
    public struct Tape: Sendable {
        public var values: [String: Tensor]
        var saved: [Int: [Tensor]] = [:]
        /// Fake-quantized values: the value before quantization (what its producer's backward needs) and the
        /// straight-through mask (1 inside the quantization range).
        var unquantized: [String: Tensor] = [:]
        var straightThrough: [String: [Float]] = [:]
        /// Per BatchNormalization node: batch mean and unbiased batch variance (for running statistics).
        public var batchStatistics: [Int: (mean: [Float], variance: [Float])] = [:]
        public func value(_ name: String) -> Tensor? { values[name] }
    }

    /// Runs forward on a batch. `training` switches BatchNormalization (per `batchNorm`) and Dropout to their
    /// training behaviour; `rng` draws dropout masks.
    ///
    /// `fakeQuantization` maps parameter or node-output names to fake quantizers (quantization-aware training):
    /// readers see the quantize–dequantize result, and backward passes apply the straight-through estimator.
    public func forward(_ input: Tensor, parameters: [String: Tensor], training: Bool, batchNorm: BatchNormMode = .train,
                        fakeQuantization: [String: FakeQuantization] = [:], rng: inout SplitMix64) throws -> Tape {
        try forward(inputs: [inputName: input], parameters: parameters, training: training, batchNorm: batchNorm,
                    fakeQuantization: fakeQuantization, rng: &rng)
    }

    /// Runs forward on a batch given for every runtime input by name (see the single-input `forward`).
    public func forward(inputs: [String: Tensor], parameters: [String: Tensor], training: Bool, batchNorm: BatchNormMode = .train,
                        fakeQuantization: [String: FakeQuantization] = [:], rng: inout SplitMix64) throws -> Tape {
        var values: [String: Tensor] = [:]
        for (name, meta) in inferred.values { if let c = meta.constant { values[name] = c } }
        for (name, value) in parameters { values[name] = value }
        for name in inputNames {
            guard var input = inputs[name] else { throw ONNXError(.invalidInput, "the model's input '\(name)' was not given") }
            if let meta = inferred.values[name] {
                guard input.shape == meta.shape else {
                    throw ONNXError(.shapeMismatch, "input '\(name)' has shape \(input.shape); this training graph was built for \(meta.shape)")
                }
                if meta.dtype.isInteger, input.dtype.isInteger { input.dtype = meta.dtype }
            }
            values[name] = input
        }
        var tape = Tape(values: [:])
        for (name, quantizer) in fakeQuantization {
            guard let value = values[name] else { continue }
            let (quantized, mask) = quantizer.apply(value)
            tape.unquantized[name] = value
            tape.straightThrough[name] = mask
            values[name] = quantized
        }
        for (i, ctx) in inferred.contexts.enumerated() {
            guard let kernel = kernels[i] else { continue }
            let args = ctx.node.inputs.map { $0.isEmpty ? nil : values[$0] }
            let outputs: [Tensor]
            if ctx.node.opType == "BatchNormalization", blocked[ctx.node.inputs[0]] != nil, !(training && batchNorm == .train) {
                throw ctx.error(.invalidInput,
                    "this training graph keeps batch norm in a blocked layout for training mode; build it with blockedLayouts: false (or batchNorm: .frozen) to run batch norm with running statistics")
            }
            switch ctx.node.opType {
            case "Conv" where convolutionPlans[i] != nil:
                let plan = convolutionPlans[i]!
                var layouts = ConvTrainingPlan.Layouts()
                layouts.source = blocked[ctx.node.inputs[0]] != nil
                layouts.destination = blocked[ctx.node.outputs[0]] != nil
                let y = try plan.forward(input: args[0]!.floats, weights: args[1]!.floats,
                                         bias: args.count > 2 ? args[2]?.floats : nil, layouts: layouts)
                outputs = [Tensor(shape: inferred.outputs[i][0].shape, floats: y)]
            case "BatchNormalization" where training && batchNorm == .train:
                if let plan = batchNormPlans[i] {
                    let x = args[0]!
                    let (y, mean, variance) = try plan.forward(x.floats, scale: args[1]!.floats, shift: args[2]!.floats)
                    let epsilon = try ctx.float("epsilon", default: 1e-5)
                    let m = Float(x.count / plan.channels)
                    outputs = [Tensor(shape: x.shape, floats: y)]
                    tape.saved[i] = [Tensor(shape: [plan.channels], floats: mean),
                                     Tensor(shape: [plan.channels], floats: variance.map { 1 / ($0 + epsilon).squareRoot() }),
                                     Tensor(shape: [plan.channels], floats: variance)]
                    tape.batchStatistics[i] = (mean, variance.map { m > 1 ? $0 * m / (m - 1) : $0 })
                } else {
                    let (y, mean, invStd, variance) = try batchNormTraining(ctx, args)
                    outputs = [y]
                    tape.saved[i] = [mean, invStd]
                    tape.batchStatistics[i] = (mean.floats, variance)
                }
            case "Dropout" where training:
                let ratio = try dropoutRatio(ctx, args)
                let x = args[0]!
                let scale = ratio < 1 ? 1 / (1 - ratio) : 0
                let mask = (0..<x.count).map { _ in rng.nextFloat() >= ratio ? scale : Float(0) }
                outputs = [Tensor(shape: x.shape, floats: zip(x.floats, mask).map(*))]
                tape.saved[i] = [Tensor(shape: x.shape, floats: mask)]
            default:
                outputs = try kernel.run(args)
            }
            for (name, value) in zip(ctx.node.outputs, outputs) where !name.isEmpty {
                if let quantizer = fakeQuantization[name] {
                    let (quantized, mask) = quantizer.apply(value)
                    tape.unquantized[name] = value
                    tape.straightThrough[name] = mask
                    values[name] = quantized
                } else {
                    values[name] = value
                }
            }
        }
        tape.values = values
        return tape
    }

    /// Back-propagates `seeds` (∂L/∂value for some values, typically the logits) through the recorded pass and
    /// returns ∂L/∂value for every value that depends on a parameter or the input, parameters included.
    public func backward(_ tape: Tape, seeds: [String: Tensor]) throws -> [String: Tensor] {
        var grads = seeds
        /// The straight-through estimator: a fake-quantized value's gradient passes only where it was not clipped.
        func straightThrough(_ name: String) {
            guard let mask = tape.straightThrough[name], let g = grads[name] else { return }
            grads[name] = Tensor(shape: g.shape, floats: zip(g.floats, mask).map(*))
        }
        for i in inferred.contexts.indices.reversed() where kernels[i] != nil {
            let ctx = inferred.contexts[i]
            for name in ctx.node.outputs where !name.isEmpty { straightThrough(name) }
            let dOutputs = ctx.node.outputs.map { $0.isEmpty ? nil : grads[$0] }
            guard dOutputs.contains(where: { $0 != nil }) else { continue }
            let inputs = ctx.node.inputs.map { $0.isEmpty ? nil : tape.values[$0] }
            guard let definition = Gradients.registry[ctx.node.opType] else {
                if ctx.node.inputs.contains(where: variable.contains) {
                    throw ctx.error(.unsupportedOperator, "has no backward pass in Whittle, and a gradient must flow through it")
                }
                continue
            }
            let needs = ctx.node.inputs.enumerated().map { position, name in
                definition.differentiable.contains(position) && !name.isEmpty && variable.contains(name)
            }
            guard needs.contains(true) else { continue }
            let outputs = ctx.node.outputs.map { tape.unquantized[$0] ?? tape.values[$0] ?? Tensor.zeros([]) }
            let dInputs = try definition.backward(GradientContext(
                ctx: ctx, inputs: inputs, outputs: outputs, dOutputs: dOutputs, saved: tape.saved[i] ?? [],
                needs: needs, fast: fast, convolutionPlan: convolutionPlans[i], batchNormPlan: batchNormPlans[i],
                convolutionLayouts: convolutionLayouts(ctx.node)))
            for (position, name) in ctx.node.inputs.enumerated() where position < dInputs.count && needs[position] {
                guard let d = dInputs[position] else { continue }
                if let existing = grads[name] {
                    grads[name] = Tensor(shape: existing.shape, floats: zip(existing.floats, d.floats).map(+))
                } else {
                    grads[name] = d
                }
            }
        }
        for name in parameterNames { straightThrough(name) }
        return grads
    }

    /// Which of a convolution's activation buffers are blocked.
    func convolutionLayouts(_ node: Node) -> ConvTrainingPlan.Layouts {
        var layouts = ConvTrainingPlan.Layouts()
        guard node.opType == "Conv" else { return layouts }
        layouts.source = blocked[node.inputs[0]] != nil
        layouts.sourceGradient = layouts.source
        layouts.destination = blocked[node.outputs[0]] != nil
        layouts.destinationGradient = layouts.destination
        return layouts
    }

    /// `value` (of `name`) in NCHW order: converted from the blocked order when `name` is blocked.
    public func plain(_ name: String, _ value: Tensor) -> Tensor {
        guard let b = blocked[name], value.rank == 4 else { return value }
        let (n, c, h, w) = (value.shape[0], value.shape[1], value.shape[2], value.shape[3])
        let hw = h * w
        var out = [Float](repeating: 0, count: value.count)
        for i in 0..<n { for ch in 0..<c { for s in 0..<hw {
            out[(i * c + ch) * hw + s] = value.floats[((i * (c / b) + ch / b) * hw + s) * b + ch % b]
        } } }
        return Tensor(shape: value.shape, floats: out)
    }

    /// Chooses the activations that stay blocked. Values tied by an op that computes element by element in one
    /// layout (BatchNormalization, activations, same-shape Add) form a class; a class is blocked when every member is
    /// a 4-D float activation that is not kept plain, every producer is a convolution whose output and output-gradient
    /// layouts are the same nChwXc (or a tying op), and every reader is a tying op or a convolution whose source,
    /// weights-source and source-gradient layouts are that same nChwXc.
    static func planLayouts(_ inferred: InferredGraph, plans: [Int: ConvTrainingPlan], keepPlain: Set<String>,
                            batchNormTies: Bool) -> [String: Int] {
        let elementwise: Set<String> = ["Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid"]
        var parent: [String: String] = [:]
        func find(_ v: String) -> String {
            var r = v
            while let p = parent[r], p != r { r = p }
            parent[v] = r
            return r
        }
        func union(_ a: String, _ b: String) { parent[find(a)] = find(b) }
        var producer: [String: Int] = [:]
        var readers: [String: [(node: Int, position: Int)]] = [:]
        for (i, ctx) in inferred.contexts.enumerated() where !inferred.folded[i] {
            for name in ctx.node.outputs where !name.isEmpty { producer[name] = i; parent[name] = parent[name] ?? name }
            for (position, name) in ctx.node.inputs.enumerated() where !name.isEmpty { readers[name, default: []].append((i, position)) }
        }
        func tying(_ i: Int) -> [String]? {
            let node = inferred.contexts[i].node
            if (node.opType == "BatchNormalization" && batchNormTies) || elementwise.contains(node.opType) {
                return [node.inputs[0], node.outputs[0]]
            }
            if node.opType == "Add", inferred.values[node.inputs[0]]?.shape == inferred.values[node.inputs[1]]?.shape,
                node.inputs[0] != node.inputs[1] {
                return [node.inputs[0], node.inputs[1], node.outputs[0]]
            }
            return nil
        }
        for i in inferred.contexts.indices where !inferred.folded[i] {
            if let tied = tying(i) { for v in tied.dropFirst() { parent[v] = parent[v] ?? v; parent[tied[0]] = parent[tied[0]] ?? tied[0]; union(v, tied[0]) } }
        }
        var classes: [String: [String]] = [:]
        for v in parent.keys { classes[find(v), default: []].append(v) }
        var result: [String: Int] = [:]
        for members in classes.values {
            var block: Int?
            var valid = true
            for v in members {
                guard let meta = inferred.values[v], meta.constant == nil, meta.dtype == .float, meta.rank == 4,
                    !keepPlain.contains(v), let p = producer[v] else { valid = false; break }
                let node = inferred.contexts[p].node
                if node.opType == "Conv" {
                    guard let plan = plans[p] else { valid = false; break }
                    let b = plan.block(.destination)
                    guard b > 0, meta.shape[1] % b == 0, plan.block(.dataGradientIn) == b, plan.block(.weightsGradientIn) == b,
                        block == nil || block == b else { valid = false; break }
                    block = b
                } else if tying(p) == nil {
                    valid = false
                    break
                }
                for reader in readers[v] ?? [] {
                    let r = inferred.contexts[reader.node].node
                    if let tied = tying(reader.node), tied.contains(v), reader.position < 2 { continue }
                    guard r.opType == "Conv", reader.position == 0, let plan = plans[reader.node] else { valid = false; break }
                    let b = plan.block(.source)
                    guard b > 0, plan.block(.weightsSource) == b, plan.block(.sourceGradient) == b, block == nil || block == b else {
                        valid = false
                        break
                    }
                    block = b
                }
                if !valid { break }
            }
            guard valid, let b = block else { continue }
            for v in members { result[v] = b }
        }
        return result
    }

    /// y = γ·(x − μ_B)/√(σ²_B + ε) + β with batch statistics over N and the spatial axes (biased variance);
    /// also returns the unbiased variance, which PyTorch folds into the running variance.
    func batchNormTraining(_ ctx: NodeContext, _ args: [Tensor?]) throws -> (Tensor, Tensor, Tensor, [Float]) {
        let x = args[0]!, gamma = args[1]!.floats, beta = args[2]!.floats
        let epsilon = try ctx.float("epsilon", default: 1e-5)
        let n = x.shape[0], c = x.shape[1], s = x.shape[2...].reduce(1, *)
        let m = n * s
        var mean = [Float](repeating: 0, count: c), invStd = mean, unbiased = mean
        var y = [Float](repeating: 0, count: x.count)
        for ch in 0..<c {
            var sum = 0.0, sumSquares = 0.0
            for b in 0..<n {
                let base = (b * c + ch) * s
                for i in 0..<s { sum += Double(x.floats[base + i]) }
            }
            let mu = sum / Double(m)
            for b in 0..<n {
                let base = (b * c + ch) * s
                for i in 0..<s { let d = Double(x.floats[base + i]) - mu; sumSquares += d * d }
            }
            let variance = sumSquares / Double(m)
            mean[ch] = Float(mu)
            invStd[ch] = Float(1 / (variance + Double(epsilon)).squareRoot())
            unbiased[ch] = Float(m > 1 ? sumSquares / Double(m - 1) : variance)
            for b in 0..<n {
                let base = (b * c + ch) * s
                for i in 0..<s { y[base + i] = gamma[ch] * (x.floats[base + i] - mean[ch]) * invStd[ch] + beta[ch] }
            }
        }
        return (Tensor(shape: x.shape, floats: y), Tensor(shape: [c], floats: mean), Tensor(shape: [c], floats: invStd), unbiased)
    }

    func dropoutRatio(_ ctx: NodeContext, _ args: [Tensor?]) throws -> Float {
        let ratio: Float
        if ctx.opset >= 12 {
            ratio = args.count > 1 ? args[1]?.asFloats.first ?? 0.5 : 0.5
        } else {
            ratio = try ctx.float("ratio", default: 0.5)
        }
        guard ratio >= 0, ratio < 1 else { throw ctx.error(.invalidAttribute, "dropout ratio \(ratio) must be in [0, 1)") }
        return ratio
    }
}

/// A small deterministic generator (SplitMix64): data order, dropout masks and initialisation are reproducible
/// for a given seed (and, as a `RandomNumberGenerator`, any draw a test needs repeatable).
public struct SplitMix64: Sendable, RandomNumberGenerator {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    public mutating func nextFloat() -> Float { Float(next() >> 40) / Float(1 << 24) }
    /// A permutation of 0..<n (Fisher–Yates).
    public mutating func permutation(_ n: Int) -> [Int] {
        var p = Array(0..<n)
        for i in stride(from: n - 1, to: 0, by: -1) { p.swapAt(i, Int(next() % UInt64(i + 1))) }
        return p
    }
}
