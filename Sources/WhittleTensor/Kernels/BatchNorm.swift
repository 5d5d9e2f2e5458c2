import CWhittleDNNL

/// Inference batch normalization with stored statistics, on oneDNN:
/// `y[n, c, s] = γ[c] · (x[n, c, s] − μ[c]) / √(σ²[c] + ε) + β[c]` over data `[N, C, S]` (S = product of spatial dims).
public final class BatchNormPlan: @unchecked Sendable {
    public let batch: Int, channels: Int, spatial: Int
    private let handle: OpaquePointer

    public init(batch: Int, channels: Int, spatial: Int, epsilon: Float, scale: [Float], bias: [Float],
                mean: [Float], variance: [Float], post: PostOp = .none) throws {
        guard batch >= 1, channels >= 1, spatial >= 1 else {
            throw TensorError(.invalidArgument, "batch normalization needs positive dimensions")
        }
        for (name, values) in [("scale", scale), ("B", bias), ("mean", mean), ("var", variance)]
        where values.count != channels {
            throw TensorError(.shapeMismatch, "BatchNormalization \(name) has \(values.count) values, expected \(channels)")
        }
        self.batch = batch
        self.channels = channels
        self.spatial = spatial
        handle = try withErrorBuffer { err, len in
            wk_bnorm_create(Int64(batch), Int64(channels), Int64(spatial), epsilon, scale, bias, mean, variance,
                            post.c, err, len)
        }
    }

    deinit { wk_bnorm_destroy(handle) }

    public func run(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>) throws {
        try runChecked { err, len in wk_bnorm_run(handle, src, dst, err, len) }
    }
}

extension Kernels {
    /// Reference twin of `BatchNormPlan`.
    public static func batchNormReference(batch: Int, channels: Int, spatial: Int, epsilon: Float, scale: [Float],
                                          bias: [Float], mean: [Float], variance: [Float], input x: [Float],
                                          post: PostOp = .none) -> [Float] {
        var y = [Float](repeating: 0, count: x.count)
        for n in 0..<batch {
            for c in 0..<channels {
                let k = scale[c] / (variance[c] + epsilon).squareRoot()
                let base = (n * channels + c) * spatial
                for s in 0..<spatial { y[base + s] = post.apply(k * (x[base + s] - mean[c]) + bias[c]) }
            }
        }
        return y
    }
}

/// oneDNN's batch-normalization forward-training and backward primitives for data `[N, C, S]`: batch statistics,
/// `y = γ·(x − μ_B)/√(σ²_B + ε) + β` (σ²_B biased), and the gradients w.r.t. x, γ and β. The reference twin is the
/// training engine's scalar implementation.
public final class BatchNormTrainingPlan: @unchecked Sendable {
    public let batch: Int, channels: Int, spatial: Int
    private let handle: OpaquePointer

    /// `block` 8 or 16: the data is in nChw8c / nChw16c order (as convolution primitives produce it); 0: NCHW.
    public init(batch: Int, channels: Int, spatial: Int, epsilon: Float, block: Int = 0) throws {
        guard batch >= 1, channels >= 1, spatial >= 1, [0, 8, 16].contains(block), block == 0 || channels % block == 0 else {
            throw TensorError(.invalidArgument, "batch normalization needs positive dimensions and a block dividing the channels")
        }
        self.batch = batch
        self.channels = channels
        self.spatial = spatial
        handle = try withErrorBuffer { err, len in
            wk_bnorm_train_create(Int64(batch), Int64(channels), Int64(spatial), epsilon, Int32(block), err, len)
        }
    }

    deinit { wk_bnorm_train_destroy(handle) }

    /// Returns y, the batch mean and the biased batch variance.
    public func forward(_ x: [Float], scale: [Float], shift: [Float]) throws -> (y: [Float], mean: [Float], variance: [Float]) {
        var y = [Float](repeating: 0, count: x.count)
        var mean = [Float](repeating: 0, count: channels), variance = mean
        try runChecked { err, len in
            wk_bnorm_train_forward(handle, x, scale, shift, &y, &mean, &variance, err, len)
        }
        return (y, mean, variance)
    }

    /// Returns ∂L/∂x, ∂L/∂γ, ∂L/∂β given the forward's batch mean and variance.
    public func backward(_ x: [Float], dY: [Float], scale: [Float], shift: [Float], mean: [Float], variance: [Float]) throws
        -> (dX: [Float], dScale: [Float], dShift: [Float]) {
        var dx = [Float](repeating: 0, count: x.count)
        var dScale = [Float](repeating: 0, count: channels), dShift = dScale
        try runChecked { err, len in
            wk_bnorm_train_backward(handle, x, dY, scale, shift, mean, variance, &dx, &dScale, &dShift, err, len)
        }
        return (dx, dScale, dShift)
    }
}
