import WhittleONNX
import WhittleTensor

/// Conv(X, W, B; auto_pad, dilations, group, kernel_shape, pads, strides) for 1-D and 2-D inputs.
/// X `[N, C, (H,) W]`, W `[M, C/group, (kH,) kW]`, B `[M]`, Y `[N, M, (OH,) OW]`.
extension Operators {
    static func registerConvolution(_ r: inout [String: OperatorDefinition]) {
        r["Conv"] = OperatorDefinition(
            infer: { ctx in
                let (_, window, outShape) = try convSetup(ctx)
                _ = window
                return [ValueMeta(dtype: .float, shape: outShape)]
            },
            compile: { ctx, _, options in
                let (x, window, _) = try convSetup(ctx)
                let w = try ctx.input(1)
                let groups = Int(try ctx.int("group", default: 1))
                let g = window.geometry(batch: x.shape[0], channels: x.shape[1], spatial: Array(x.shape[2...]),
                                        outChannels: w.shape[0], groups: groups)
                let bias = ctx.optionalInput(2)?.constant?.asFloats
                return try ConvKernel(geometry: g, weights: w.constant?.asFloats, bias: bias, post: .none,
                                      fast: options.fast, outShape: [x.shape[0], w.shape[0]] + window.output, ctx: ctx)
            },
            macs: { ctx, outputs in
                guard let w = ctx.optionalInput(1), let y = outputs.first else { return 0 }
                return y.count * w.shape.dropFirst().reduce(1, *)
            })
    }

    /// Validates a Conv node's inputs and computes its window and output shape.
    static func convSetup(_ ctx: NodeContext) throws -> (ValueMeta, Window, [Int]) {
        let x = try ctx.floatInput(0)
        let w = try ctx.floatInput(1)
        guard x.rank == 3 || x.rank == 4 else {
            throw ctx.error(.shapeMismatch, "input X has shape \(x.shape); Whittle supports 1-D and 2-D convolutions (rank 3 or 4)")
        }
        guard w.rank == x.rank else {
            throw ctx.error(.shapeMismatch, "weight W has shape \(w.shape), which does not match input rank \(x.rank)")
        }
        let groups = Int(try ctx.int("group", default: 1))
        guard groups >= 1, x.shape[1] % groups == 0, w.shape[0] % groups == 0 else {
            throw ctx.error(.invalidAttribute, "group \(groups) must divide input channels \(x.shape[1]) and output channels \(w.shape[0])")
        }
        guard w.shape[1] * groups == x.shape[1] else {
            throw ctx.error(.shapeMismatch, "weight W \(w.shape) expects \(w.shape[1] * groups) input channels, X has \(x.shape[1])")
        }
        if let b = ctx.optionalInput(2), b.shape != [w.shape[0]] {
            throw ctx.error(.shapeMismatch, "bias B has shape \(b.shape), expected [\(w.shape[0])]")
        }
        let kernel = try ctx.ints("kernel_shape") ?? Array(w.shape[2...])
        guard kernel == Array(w.shape[2...]) else {
            throw ctx.error(.shapeMismatch, "kernel_shape \(kernel) does not match weight W \(w.shape)")
        }
        let window = try Window.resolve(ctx, spatial: Array(x.shape[2...]), kernel: kernel)
        return (x, window, [x.shape[0], w.shape[0]] + window.output)
    }
}

/// A compiled convolution: a oneDNN plan when the weights are constant, the reference kernel otherwise (or when
/// `fast` is off). Optionally fuses a residual summand (second input) and an element-wise post-op.
final class ConvKernel: NodeKernel, @unchecked Sendable {
    let geometry: Conv2DGeometry
    let plan: ConvPlan?
    let weights: [Float]?
    let bias: [Float]?
    let post: PostOp
    let outShape: [Int]
    let fast: Bool
    /// Set by the step planner: the source arrives in the plan's blocked layout.
    var sourceBlocked = false
    /// Set by the step planner: the output (and a fused summand) stays in the plan's blocked layout.
    var keepDestinationBlocked = false

    init(geometry: Conv2DGeometry, weights: [Float]?, bias: [Float]?, post: PostOp, fast: Bool, outShape: [Int],
         ctx: NodeContext, fuseSum: Bool = false) throws {
        self.geometry = geometry
        self.weights = weights
        self.bias = bias
        self.post = post
        self.outShape = outShape
        self.fast = fast
        do {
            try geometry.validate()
            plan = fast && weights != nil
                ? try ConvPlan(geometry, weights: weights!, bias: bias, post: post, fuseSum: fuseSum) : nil
        } catch let error as TensorError {
            throw ctx.error(.shapeMismatch, error.message)
        }
    }

    /// Inputs: X, W, B (as in ONNX); a fused summand, when present, is passed as input 3.
    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        guard let x = inputs[0] else { throw ONNXError(.invalidInput, "Conv: missing input") }
        let count = outShape.reduce(1, *)
        if let plan {
            let out: [Float]
            let (srcBlocked, dstBlocked) = (sourceBlocked, keepDestinationBlocked)
            if inputs.count > 3, let summand = inputs[3] {
                var y = summand.floats
                try x.floats.withUnsafeBufferPointer { src in
                    try y.withUnsafeMutableBufferPointer {
                        try plan.run(src.baseAddress!, $0.baseAddress!, sourceBlocked: srcBlocked, destinationBlocked: dstBlocked)
                    }
                }
                out = y
            } else {
                let size = dstBlocked ? plan.blockedDestinationBytes / 4 : count
                out = try x.floats.withUnsafeBufferPointer { src in
                    try makeFloats(size) {
                        try plan.run(src.baseAddress!, $0, sourceBlocked: srcBlocked, destinationBlocked: dstBlocked)
                    }
                }
            }
            // A blocked result is an opaque buffer only the next convolution reads (see StepPlanner.propagateLayouts).
            return [Tensor(shape: dstBlocked ? [out.count] : outShape, floats: out)]
        }
        guard let w = weights ?? inputs[1]?.floats else { throw ONNXError(.invalidInput, "Conv: missing weights") }
        let b = bias ?? (inputs.count > 2 ? inputs[2]?.floats : nil)
        if fast {
            let plan = try ConvPlan(geometry, weights: w, bias: b, post: post)
            let out = try x.floats.withUnsafeBufferPointer { src in
                try makeFloats(count) { try plan.run(src.baseAddress!, $0) }
            }
            return [Tensor(shape: outShape, floats: out)]
        }
        var y = Kernels.conv2dReference(geometry, input: x.floats, weights: w, bias: b)
        if inputs.count > 3, let summand = inputs[3] { for i in y.indices { y[i] += summand.floats[i] } }
        if post != .none { y = y.map(post.apply) }
        return [Tensor(shape: outShape, floats: y)]
    }
}
