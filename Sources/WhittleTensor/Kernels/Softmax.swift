import CWhittleDNNL

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A oneDNN softmax over the middle dimension of data viewed as `[outer, axis, inner]`:
/// `y = exp(x − max) / Σ exp(x − max)`.
public final class SoftmaxPlan: @unchecked Sendable {
    public let outer: Int, axis: Int, inner: Int
    private let handle: OpaquePointer

    public init(outer: Int, axis: Int, inner: Int) throws {
        guard outer >= 1, axis >= 1, inner >= 1 else { throw TensorError(.invalidArgument, "softmax needs positive sizes") }
        self.outer = outer
        self.axis = axis
        self.inner = inner
        handle = try withErrorBuffer { err, len in wk_softmax_create(Int64(outer), Int64(axis), Int64(inner), err, len) }
    }

    deinit { wk_softmax_destroy(handle) }

    public func run(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>) throws {
        try runChecked { err, len in wk_softmax_run(handle, src, dst, err, len) }
    }
}

extension Kernels {
    /// Reference twin of `SoftmaxPlan`, computed in Double.
    public static func softmaxReference(outer: Int, axis: Int, inner: Int, _ x: [Float]) -> [Float] {
        var y = [Float](repeating: 0, count: x.count)
        for o in 0..<outer {
            for i in 0..<inner {
                var peak = -Float.infinity
                for a in 0..<axis { peak = max(peak, x[(o * axis + a) * inner + i]) }
                var total = 0.0
                for a in 0..<axis { total += exp(Double(x[(o * axis + a) * inner + i] - peak)) }
                for a in 0..<axis {
                    y[(o * axis + a) * inner + i] = Float(exp(Double(x[(o * axis + a) * inner + i] - peak)) / total)
                }
            }
        }
        return y
    }
}
