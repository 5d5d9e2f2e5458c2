import WhittleONNX
import WhittleTensor

/// One unit of work of a compiled graph: a kernel reading and writing named values. Usually one node; a fused step
/// covers a Conv with the BatchNormalization, residual Add and activation that follow it.
struct PlannedStep {
    /// Where the step runs in the node order (a fused residual Add runs where the Add was).
    var position: Int
    /// The nodes this step computes (the last one's outputs are the step's outputs).
    var nodes: [Int]
    var inputs: [String]
    var outputs: [String]
    var kernel: any NodeKernel
}

/// Plans the steps of a graph, fusing — when `options.fuse` is on and the kernels are fast — the patterns
/// onnxruntime's graph optimizer also fuses:
/// - Conv → BatchNormalization: the normalization is folded into the convolution's weights and bias,
///   `W' = W · γ/√(σ²+ε)`, `b' = (b − μ) · γ/√(σ²+ε) + β`, per output channel;
/// - Conv → Add(residual): oneDNN's sum post-op accumulates into the residual;
/// - … → Relu / LeakyRelu / Clip (constant bounds) / HardSwish / Sigmoid / Tanh: an eltwise post-op;
/// - the TorchScript exporter's erf GELU (Div, Erf, Add, Mul, Mul): one oneDNN gelu_erf pass.
/// A value is fused away only when its one reader is the next op of the pattern and it is not a graph output.
enum StepPlanner {
    static func plan(_ inferred: InferredGraph, graphOutputs: Set<String>, options: KernelOptions) throws -> [PlannedStep] {
        let contexts = inferred.contexts
        var readers: [String: [Int]] = [:]
        var producer: [String: Int] = [:]
        // Folded nodes too (the DequantizeLinear of a constant weight).
        var anyProducer: [String: Int] = [:]
        for (i, ctx) in contexts.enumerated() { for name in ctx.node.outputs where !name.isEmpty { anyProducer[name] = i } }
        for (i, ctx) in contexts.enumerated() where !inferred.folded[i] {
            for name in ctx.node.inputs where !name.isEmpty { readers[name, default: []].append(i) }
            for name in ctx.node.outputs where !name.isEmpty { producer[name] = i }
        }
        /// The single node reading `name`, when fusing it away is allowed.
        func soleReader(_ name: String) -> Int? {
            guard !graphOutputs.contains(name), let r = readers[name], r.count == 1 else { return nil }
            return r[0]
        }

        var steps: [PlannedStep] = []
        var absorbed = Set<Int>()
        /// `soleReader`, unless a fused step already took that node.
        func freeReader(_ name: String) -> Int? { soleReader(name).flatMap { absorbed.contains($0) ? nil : $0 } }
        for (i, ctx) in contexts.enumerated() where !inferred.folded[i] && !absorbed.contains(i) {
            if options.fuse && options.fast && options.integer && ["Conv", "Gemm", "MatMul"].contains(ctx.node.opType),
               let fused = try fuseQuantizedConvolution(i, inferred, soleReader: freeReader, producer: anyProducer) {
                absorbed.formUnion(fused.nodes)
                steps.append(fused)
                continue
            }
            if options.integer && (ctx.node.opType == "MatMul" || ctx.node.opType == "Gemm"),
               let step = try fuseInt4MatMul(i, inferred, producer: anyProducer, options: options) {
                steps.append(step)
                continue
            }
            if options.fuse && options.fast && options.integer && ctx.node.opType == "Add",
               let fused = fuseQuantizedAdd(i, inferred, soleReader: freeReader, producer: anyProducer) {
                absorbed.formUnion(fused.nodes)
                steps.append(fused)
                continue
            }
            if options.fuse && options.fast && options.integer && ctx.node.opType == "GlobalAveragePool",
               let fused = fuseQuantizedGlobalAveragePool(i, inferred, soleReader: freeReader, producer: anyProducer) {
                absorbed.formUnion(fused.nodes)
                steps.append(fused)
                continue
            }
            if options.fuse && options.fast && options.integer && ctx.node.opType == "MaxPool",
               let fused = try fuseQuantizedMaxPool(i, inferred, soleReader: freeReader, producer: anyProducer) {
                absorbed.formUnion(fused.nodes)
                steps.append(fused)
                continue
            }
            if options.fuse && options.fast && options.integer && ctx.node.opType == "AveragePool",
               let fused = try fuseQuantizedAveragePool(i, inferred, soleReader: freeReader, producer: anyProducer) {
                absorbed.formUnion(fused.nodes)
                steps.append(fused)
                continue
            }
            if options.fuse && options.fast && options.integer && ctx.node.opType == "QuantizeLinear",
               let step = quantizeStep(i, inferred) {
                steps.append(step)
                continue
            }
            if options.fuse && options.fast && ctx.node.opType == "Conv",
                let fused = try fuseConvolution(i, inferred, soleReader: freeReader, producer: producer) {
                absorbed.formUnion(fused.nodes)
                steps.append(fused)
                continue
            }
            if options.fuse && options.fast && ctx.node.opType == "Div",
               let fused = try fuseGelu(i, inferred, soleReader: freeReader) {
                absorbed.formUnion(fused.nodes)
                steps.append(fused)
                continue
            }
            let kernel = try inferred.definitions[i].compile(ctx, inferred.outputs[i], options)
            // A kernel holding its packed int4 weight reads only the activation: the weight's tensors are not kept.
            let inputs = kernel is Int4MatMulKernel ? [ctx.node.inputs[0]] : ctx.node.inputs
            steps.append(PlannedStep(position: i, nodes: [i], inputs: inputs, outputs: ctx.node.outputs, kernel: kernel))
        }
        var ordered = steps.sorted { $0.position < $1.position }
        if options.fuse && options.fast && options.integer {
            ordered = withoutUnreadSteps(ordered, graphOutputs: graphOutputs)
            packIntegerValues(ordered, graphOutputs: graphOutputs)
        }
        if options.fuse && options.fast { propagateLayouts(ordered, graphOutputs: graphOutputs) }
        return ordered
    }

    /// Drops steps whose outputs no step reads and that are not graph outputs (a DequantizeLinear whose only reader
    /// became an integer step), repeatedly.
    static func withoutUnreadSteps(_ steps: [PlannedStep], graphOutputs: Set<String>) -> [PlannedStep] {
        var kept = steps
        while true {
            let read = Set(kept.flatMap(\.inputs)).union(graphOutputs)
            let before = kept.count
            kept.removeAll { step in step.outputs.allSatisfy { $0.isEmpty || !read.contains($0) } }
            if kept.count == before { return kept }
        }
    }

    /// GELU as PyTorch's TorchScript exporter writes it, `x · ½ · (1 + erf(x / √2))`: Div(x, √2) → Erf → Add(1) →
    /// Mul(x, ·) → Mul(½) (either operand order) becomes one oneDNN gelu_erf pass, as onnxruntime's GeluFusion does.
    static func fuseGelu(_ i: Int, _ inferred: InferredGraph, soleReader: (String) -> Int?) throws -> PlannedStep? {
        let contexts = inferred.contexts
        func node(_ k: Int) -> Node { contexts[k].node }
        /// The scalar constant among a binary node's inputs, and the other input's name.
        func scalarOperand(_ k: Int) -> (Float, String)? {
            let n = node(k)
            guard n.inputs.count == 2 else { return nil }
            for (c, other) in [(1, 0), (0, 1)] {
                if let t = contexts[k].inputs[c]?.constant, t.count == 1, t.dtype.isFloatingPoint, contexts[k].inputs[other]?.constant == nil {
                    return (t.asFloats[0], n.inputs[other])
                }
            }
            return nil
        }
        func near(_ a: Float, _ b: Float) -> Bool { abs(a - b) <= 1e-4 * abs(b) }
        let div = node(i)
        guard div.inputs.count == 2, let c = contexts[i].inputs[1]?.constant, c.count == 1, near(c.asFloats[0], 1.4142135),
              let x = contexts[i].inputs[0], x.dtype == .float, x.count > 0 else { return nil }
        let h = div.inputs[0]
        guard let erf = soleReader(div.outputs[0]), node(erf).opType == "Erf",
              let add = soleReader(node(erf).outputs[0]), node(add).opType == "Add",
              let (one, _) = scalarOperand(add), near(one, 1),
              let mul = soleReader(node(add).outputs[0]), node(mul).opType == "Mul",
              Set(node(mul).inputs) == [h, node(add).outputs[0]],
              let half = soleReader(node(mul).outputs[0]), node(half).opType == "Mul",
              let (scale, _) = scalarOperand(half), near(scale, 0.5) else { return nil }
        let out = inferred.outputs[half][0]
        guard out.shape == x.shape else { return nil }
        let kernel = try EltwiseKernel(op: .geluErf, count: out.count, shape: out.shape, fast: true)
        return PlannedStep(position: i, nodes: [i, erf, add, mul, half], inputs: [h], outputs: node(half).outputs, kernel: kernel)
    }

    /// Lets convolution outputs stay in oneDNN's blocked layout (nChw8c, nChw16c…) when every reader is a
    /// convolution that computes in that same layout — as its source, or as the summand it accumulates into — so
    /// chains of convolutions convert to and from NCHW only at their ends (onnxruntime's NCHWc transformer does the
    /// same). A summand and the output written over it share one buffer, so both are blocked or neither is.
    static func propagateLayouts(_ steps: [PlannedStep], graphOutputs: Set<String>) {
        var producer: [String: Int] = [:]
        var readers: [String: [(step: Int, position: Int)]] = [:]
        for (i, step) in steps.enumerated() {
            for name in step.outputs where !name.isEmpty { producer[name] = i }
            for (position, name) in step.inputs.enumerated() where !name.isEmpty {
                readers[name, default: []].append((i, position))
            }
        }
        func plan(_ i: Int) -> ConvPlan? { (steps[i].kernel as? ConvKernel)?.plan }
        var blocked = Set(producer.compactMap { name, i -> String? in
            guard !graphOutputs.contains(name), let p = plan(i), p.blockedDestinationBytes > 0 else { return nil }
            return name
        })
        var changed = true
        while changed {
            changed = false
            for name in blocked {
                let p = plan(producer[name]!)!
                let accepted = (readers[name] ?? []).allSatisfy { reader in
                    guard let r = plan(reader.step) else { return false }
                    switch reader.position {
                    case 0: return r.blockedSourceBytes > 0 && p.layoutMatches(r, asSummand: false)
                    case 3: return r.blockedDestinationBytes > 0 && p.layoutMatches(r, asSummand: true)
                    default: return false
                    }
                }
                if !accepted {
                    blocked.remove(name)
                    changed = true
                }
            }
            for (i, step) in steps.enumerated() where step.inputs.count > 3 && plan(i) != nil {
                let summand = step.inputs[3], output = step.outputs[0]
                if blocked.contains(summand) != blocked.contains(output) {
                    blocked.remove(summand)
                    blocked.remove(output)
                    changed = true
                }
            }
        }
        for name in blocked {
            (steps[producer[name]!].kernel as! ConvKernel).keepDestinationBlocked = true
            for reader in readers[name] ?? [] where reader.position == 0 {
                (steps[reader.step].kernel as! ConvKernel).sourceBlocked = true
            }
        }
    }

    /// The activation a node computes, as a post-op, when it is one oneDNN can fuse.
    static func postOp(_ ctx: NodeContext) throws -> PostOp? {
        switch ctx.node.opType {
        case "Relu": return .relu(alpha: 0)
        case "LeakyRelu": return .relu(alpha: try ctx.float("alpha", default: 0.01))
        case "Sigmoid": return .sigmoid
        case "Tanh": return .tanh
        case "HardSwish": return .hardSwish
        case "Clip": return try Operators.clipBounds(ctx, nil).map { .clip(low: $0.0, high: $0.1) }
        default: return nil
        }
    }

    static func fuseConvolution(_ i: Int, _ inferred: InferredGraph, soleReader: (String) -> Int?,
                                producer: [String: Int]) throws -> PlannedStep? {
        let ctx = inferred.contexts[i]
        guard let w = ctx.optionalInput(1)?.constant, ctx.optionalInput(2).map({ $0.constant != nil }) ?? true else { return nil }
        let (x, window, outShape) = try Operators.convSetup(ctx)
        var weights = w.asFloats
        let channels = w.shape[0]
        var bias = ctx.optionalInput(2)?.constant?.asFloats ?? [Float](repeating: 0, count: channels)
        var nodes = [i]
        var output = ctx.node.outputs[0]
        var position = i
        var summand: String?
        var post = PostOp.none

        // Conv → BatchNormalization (inference, constant parameters).
        if let j = soleReader(output), inferred.contexts[j].node.opType == "BatchNormalization" {
            let bn = inferred.contexts[j]
            let params = (1...4).map { bn.inputs[$0]?.constant?.asFloats }
            if bn.node.inputs[0] == output, params.allSatisfy({ $0 != nil }), bn.node.outputs.count == 1 || bn.node.outputs.dropFirst().allSatisfy(\.isEmpty) {
                let epsilon = try bn.float("epsilon", default: 1e-5)
                let perChannel = weights.count / channels
                for c in 0..<channels {
                    let k = params[0]![c] / (params[3]![c] + epsilon).squareRoot()
                    for t in 0..<perChannel { weights[c * perChannel + t] *= k }
                    bias[c] = (bias[c] - params[2]![c]) * k + params[1]![c]
                }
                nodes.append(j)
                output = bn.node.outputs[0]
            }
        }
        // Conv → Add(residual) when the other summand is ready by the Add and has the output's shape.
        if let j = soleReader(output), inferred.contexts[j].node.opType == "Add" {
            let add = inferred.contexts[j]
            let other = add.node.inputs[0] == output ? add.node.inputs[1] : add.node.inputs[0]
            if add.node.inputs.filter({ $0 == output }).count == 1, inferred.values[other]?.shape == outShape,
                inferred.values[other]?.dtype == .float, inferred.values[other]?.constant == nil,
                producer[other].map({ $0 < j }) ?? true {
                summand = other
                nodes.append(j)
                output = add.node.outputs[0]
                position = j
            }
        }
        // … → activation.
        if let j = soleReader(output), let op = try postOp(inferred.contexts[j]), inferred.contexts[j].node.inputs[0] == output {
            post = op
            nodes.append(j)
            output = inferred.contexts[j].node.outputs[0]
            position = max(position, j)
        }
        guard nodes.count > 1 else { return nil }
        let groups = Int(try ctx.int("group", default: 1))
        let g = window.geometry(batch: x.shape[0], channels: x.shape[1], spatial: Array(x.shape[2...]),
                                outChannels: channels, groups: groups)
        let kernel = try ConvKernel(geometry: g, weights: weights, bias: bias, post: post, fast: true,
                                    outShape: outShape, ctx: ctx, fuseSum: summand != nil)
        var inputs = [ctx.node.inputs[0], "", ""]
        if let summand { inputs.append(summand) }
        return PlannedStep(position: position, nodes: nodes, inputs: inputs, outputs: [output], kernel: kernel)
    }
}
