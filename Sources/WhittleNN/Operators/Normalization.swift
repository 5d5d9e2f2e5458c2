import WhittleONNX
import WhittleTensor

/// BatchNormalization(X, scale, B, input_mean, input_var; epsilon) in inference mode:
/// `Y = scale · (X − mean) / √(var + ε) + B` per channel (axis 1). Training mode belongs to the training engine.
/// LayerNormalization (the axes from `axis` on; oneDNN when its scale and bias are constants of the normalized
/// size), InstanceNormalization (per sample and channel) and GroupNormalization (per sample and group of channels;
/// scale and bias per group at opset 18, per channel from 21) normalize with their own statistics.
extension Operators {
    static func registerNormalization(_ r: inout [String: OperatorDefinition]) {
        r["BatchNormalization"] = OperatorDefinition(
            infer: { ctx in
                let x = try ctx.floatInput(0)
                guard x.rank >= 2 else { throw ctx.error(.shapeMismatch, "input X has shape \(x.shape); rank ≥ 2 is required") }
                for i in 1...4 {
                    let p = try ctx.floatInput(i)
                    guard p.shape == [x.shape[1]] else {
                        throw ctx.error(.shapeMismatch, "parameter input \(i) has shape \(p.shape), expected [\(x.shape[1])]")
                    }
                }
                if try ctx.int("training_mode", default: 0) != 0 {
                    throw ctx.error(.invalidAttribute, "training_mode = 1 is not supported for inference")
                }
                if ctx.node.outputs.dropFirst().contains(where: { !$0.isEmpty }) {
                    throw ctx.error(.invalidGraph, "running mean/variance outputs are only produced in training mode")
                }
                return [ValueMeta(dtype: x.dtype, shape: x.shape)]
            },
            compile: { ctx, outputs, options in
                let shape = outputs[0].shape
                let epsilon = try ctx.float("epsilon", default: 1e-5)
                let params = (1...4).map { ctx.optionalInput($0)?.constant?.asFloats }
                let batch = shape[0], channels = shape[1], spatial = shape[2...].reduce(1, *)
                var plan: BatchNormPlan?
                if options.fast, params.allSatisfy({ $0 != nil }), shape.reduce(1, *) > 0 {
                    plan = try BatchNormPlan(batch: batch, channels: channels, spatial: spatial, epsilon: epsilon,
                                             scale: params[0]!, bias: params[1]!, mean: params[2]!, variance: params[3]!)
                }
                return ClosureKernel { [plan] inputs in
                    let x = inputs[0]!
                    if let plan {
                        let y = try x.floats.withUnsafeBufferPointer { src in
                            try makeFloats(x.count) { try plan.run(src.baseAddress!, $0) }
                        }
                        return [Tensor(shape: shape, floats: y)]
                    }
                    let p = (1...4).map { inputs[$0]!.asFloats }
                    return [Tensor(shape: shape, floats: Kernels.batchNormReference(
                        batch: batch, channels: channels, spatial: spatial, epsilon: epsilon, scale: p[0], bias: p[1],
                        mean: p[2], variance: p[3], input: x.floats))]
                }
            })

        r["LayerNormalization"] = OperatorDefinition(minimumOpset: 17, infer: { ctx in
            let x = try ctx.floatInput(0)
            let (axis, inner) = try layerNormAxis(ctx, x.shape)
            for i in 1...2 {
                guard let p = ctx.optionalInput(i) else {
                    if i == 1 { throw ctx.error(.invalidGraph, "input 1 (Scale) is required") }
                    continue
                }
                guard p.dtype.isFloatingPoint, (try? broadcastShape(p.shape, Array(x.shape[axis...]))) == Array(x.shape[axis...]) else {
                    throw ctx.error(.shapeMismatch, "input \(i) has shape \(p.shape); it must broadcast to the normalized shape \(Array(x.shape[axis...]))")
                }
            }
            _ = inner
            let statistics = Array(x.shape[..<axis]) + [Int](repeating: 1, count: x.rank - axis)
            return [ValueMeta(dtype: x.dtype, shape: x.shape), ValueMeta(dtype: .float, shape: statistics),
                    ValueMeta(dtype: .float, shape: statistics)]
        }, compile: { ctx, outputs, options in
            let shape = outputs[0].shape
            let (axis, inner) = try layerNormAxis(ctx, shape)
            let outer = shape[..<axis].reduce(1, *)
            let epsilon = try ctx.float("epsilon", default: 1e-5)
            let normalized = Array(shape[axis...])
            /// A parameter spread over the normalized shape (it may be given broadcastable, e.g. [1, C]).
            func spread(_ t: Tensor?) -> [Float]? {
                guard let t else { return nil }
                let v = t.asFloats
                return t.count == inner ? v : Kernels.broadcastIndices(t.shape, to: normalized).map { v[$0] }
            }
            let wantsStatistics = ctx.node.outputs.dropFirst().contains { !$0.isEmpty }
            let constants = (1...2).map { ctx.optionalInput($0)?.constant }
            var plan: LayerNormPlan?
            if options.fast, !wantsStatistics, outer * inner > 0, constants[0] != nil,
               ctx.optionalInput(2) == nil || constants[1] != nil {
                plan = try LayerNormPlan(outer: outer, inner: inner, epsilon: epsilon, scale: spread(constants[0]), bias: spread(constants[1]))
            }
            return ClosureKernel { [plan] inputs in
                let x = inputs[0]!
                if let plan {
                    let y = try x.floats.withUnsafeBufferPointer { src in try makeFloats(x.count) { try plan.run(src.baseAddress!, $0) } }
                    return [Tensor(shape: shape, floats: y)]
                }
                let (y, mean, inverse) = Kernels.layerNormReference(outer: outer, inner: inner, epsilon: epsilon,
                                                                      scale: spread(inputs[1]), bias: spread(inputs.count > 2 ? inputs[2] : nil),
                                                                      input: x.floats)
                return [Tensor(shape: shape, floats: y), Tensor(shape: outputs[1].shape, floats: mean),
                        Tensor(shape: outputs[2].shape, floats: inverse)]
            }
        })

        r["InstanceNormalization"] = OperatorDefinition(minimumOpset: 6, infer: { ctx in
            let x = try ctx.floatInput(0)
            guard x.rank >= 3 else { throw ctx.error(.shapeMismatch, "input has shape \(x.shape); rank ≥ 3 is required") }
            for i in 1...2 where try ctx.floatInput(i).shape != [x.shape[1]] {
                throw ctx.error(.shapeMismatch, "input \(i) has shape \(try ctx.input(i).shape), expected [\(x.shape[1])]")
            }
            return [ValueMeta(dtype: x.dtype, shape: x.shape)]
        }, compile: { ctx, _, options in
            try groupNormKernel(ctx, groups: { $0[1] }, perChannel: true, fast: options.fast)
        })

        r["GroupNormalization"] = OperatorDefinition(minimumOpset: 18, infer: { ctx in
            let x = try ctx.floatInput(0)
            let groups = try groupCount(ctx, x.shape)
            let expected = ctx.opset >= 21 ? x.shape[1] : groups
            for i in 1...2 where try ctx.floatInput(i).shape != [expected] {
                throw ctx.error(.shapeMismatch, "input \(i) has shape \(try ctx.input(i).shape), expected [\(expected)] (per \(ctx.opset >= 21 ? "channel" : "group") at opset \(ctx.opset))")
            }
            return [ValueMeta(dtype: x.dtype, shape: x.shape)]
        }, compile: { ctx, _, options in
            try groupNormKernel(ctx, groups: { try groupCount(ctx, $0) }, perChannel: ctx.opset >= 21, fast: options.fast)
        })
    }

    /// Group (G = C: instance) normalization, by `Kernels.groupNorm` or, without `fast`, its reference twin.
    static func groupNormKernel(_ ctx: NodeContext, groups: @escaping @Sendable ([Int]) throws -> Int, perChannel: Bool,
                                fast: Bool) throws -> any NodeKernel {
        let epsilon = try ctx.float("epsilon", default: 1e-5)
        return ClosureKernel { inputs in
            let x = inputs[0]!
            let g = try groups(x.shape)
            let run = fast ? Kernels.groupNorm : Kernels.groupNormReference
            return [Tensor(shape: x.shape, floats: run(x.shape[0], x.shape[1], g, x.shape[2...].reduce(1, *), epsilon,
                                                       inputs[1]!.asFloats, inputs[2]!.asFloats, perChannel, x.floats))]
        }
    }

    /// LayerNormalization's first normalized axis and the number of elements it normalizes together.
    static func layerNormAxis(_ ctx: NodeContext, _ shape: [Int]) throws -> (Int, Int) {
        guard !shape.isEmpty else { throw ctx.error(.shapeMismatch, "input must have rank ≥ 1") }
        let axis = try ctx.axis(Int(try ctx.int("axis", default: -1)), rank: shape.count)
        return (axis, shape[axis...].reduce(1, *))
    }

    static func groupCount(_ ctx: NodeContext, _ shape: [Int]) throws -> Int {
        guard shape.count >= 3 else { throw ctx.error(.shapeMismatch, "input has shape \(shape); rank ≥ 3 is required") }
        guard let g = try ctx.int("num_groups"), g >= 1, shape[1] % Int(g) == 0 else {
            throw ctx.error(.invalidAttribute, "num_groups must be a positive divisor of the \(shape[1]) channels")
        }
        return Int(g)
    }
}

extension Kernels {
    /// Group normalization of `[N, C, S]` data: each sample's groups of C/G channels normalized with their own mean
    /// and biased variance, then scaled and shifted per channel (`perChannel`, `scale` has C values) or per group
    /// (G values). G = C is instance normalization.
    public static func groupNormReference(batch: Int, channels: Int, groups: Int, spatial: Int, epsilon: Float,
                                          scale: [Float], bias: [Float], perChannel: Bool, input x: [Float]) -> [Float] {
        let per = channels / groups
        let (normalized, _, _) = layerNormReference(outer: batch * groups, inner: per * spatial, epsilon: epsilon,
                                                    scale: nil, bias: nil, input: x)
        var y = normalized
        for n in 0..<batch {
            for c in 0..<channels {
                let k = perChannel ? c : c / per
                let base = (n * channels + c) * spatial
                for s in 0..<spatial { y[base + s] = scale[k] * y[base + s] + bias[k] }
            }
        }
        return y
    }

    /// The fast twin of `groupNormReference`: each sample's group is one contiguous run of (C/G)·S values in NCHW,
    /// summed in Double through unsafe pointers (mean, then the biased variance about it), normalized, scaled and
    /// shifted in one pass.
    public static func groupNorm(batch: Int, channels: Int, groups: Int, spatial: Int, epsilon: Float,
                                 scale: [Float], bias: [Float], perChannel: Bool, input x: [Float]) -> [Float] {
        let per = channels / groups, run = per * spatial
        var y = [Float](repeating: 0, count: x.count)
        x.withUnsafeBufferPointer { px in
            y.withUnsafeMutableBufferPointer { py in
                for chunk in 0..<(batch * groups) {
                    let start = chunk * run
                    var sum = 0.0
                    for i in start..<(start + run) { sum += Double(px[i]) }
                    let mean = sum / Double(max(run, 1))
                    var squares = 0.0
                    for i in start..<(start + run) { let d = Double(px[i]) - mean; squares += d * d }
                    let inverse = Float(1 / (squares / Double(max(run, 1)) + Double(epsilon)).squareRoot())
                    let m = Float(mean), group = chunk % groups
                    for c in 0..<per {
                        let k = perChannel ? group * per + c : group
                        let a = scale[k] * inverse, b = bias[k] - m * scale[k] * inverse
                        let base = start + c * spatial
                        for i in base..<(base + spatial) { py[i] = px[i] * a + b }
                    }
                }
            }
        }
        return y
    }
}