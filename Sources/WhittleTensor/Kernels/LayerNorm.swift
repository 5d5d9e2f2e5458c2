import CWhittleDNNL

/// Layer normalization on oneDNN, over the last axis of data `[OUTER, INNER]` (ONNX LayerNormalization with its
/// normalized axes flattened into INNER): `y[o, i] = γ[i] · (x[o, i] − μ[o]) / √(σ²[o] + ε) + β[i]`, with the mean
/// and biased variance of each row.
public final class LayerNormPlan: @unchecked Sendable {
    public let outer: Int, inner: Int
    private let handle: OpaquePointer

    public init(outer: Int, inner: Int, epsilon: Float, scale: [Float]?, bias: [Float]?) throws {
        guard outer >= 1, inner >= 1 else { throw TensorError(.invalidArgument, "layer normalization needs positive dimensions") }
        for (name, values) in [("scale", scale), ("B", bias)] {
            if let values, values.count != inner {
                throw TensorError(.shapeMismatch, "LayerNormalization \(name) has \(values.count) values, expected \(inner)")
            }
        }
        self.outer = outer
        self.inner = inner
        handle = try withErrorBuffer { err, len in
            wk_lnorm_create(Int64(outer), Int64(inner), epsilon, scale, bias, err, len)
        }
    }

    deinit { wk_lnorm_destroy(handle) }

    public func run(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>) throws {
        try runChecked { err, len in wk_lnorm_run(handle, src, dst, err, len) }
    }
}

extension Kernels {
    /// Reference twin of `LayerNormPlan`, statistics in Double. `scale` and `bias` have `inner` values, or one
    /// (broadcast), or are nil. Also returns each row's mean and 1/√(σ² + ε).
    public static func layerNormReference(outer: Int, inner: Int, epsilon: Float, scale: [Float]?, bias: [Float]?,
                                          input x: [Float]) -> (y: [Float], mean: [Float], invStdDev: [Float]) {
        var y = [Float](repeating: 0, count: x.count)
        var means = [Float](repeating: 0, count: outer), inverse = means
        for o in 0..<outer {
            let row = x[(o * inner)..<((o + 1) * inner)]
            let mean = row.reduce(0.0) { $0 + Double($1) } / Double(max(inner, 1))
            let variance = row.reduce(0.0) { $0 + (Double($1) - mean) * (Double($1) - mean) } / Double(max(inner, 1))
            let k = 1 / (variance + Double(epsilon)).squareRoot()
            means[o] = Float(mean)
            inverse[o] = Float(k)
            for i in 0..<inner {
                let g = scale.map { Double($0.count == 1 ? $0[0] : $0[i]) } ?? 1
                let b = bias.map { Double($0.count == 1 ? $0[0] : $0[i]) } ?? 0
                y[o * inner + i] = Float(g * (Double(x[o * inner + i]) - mean) * k + b)
            }
        }
        return (y, means, inverse)
    }
}
