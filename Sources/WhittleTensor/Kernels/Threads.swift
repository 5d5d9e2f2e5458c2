import COpenBLAS
import CWhittleDNNL

/// Thread count of the numeric libraries (oneDNN through OpenMP, and OpenBLAS).
public enum ComputeThreads {
    /// Sets the number of threads both libraries use for later calls. `n` must be at least 1.
    public static func set(_ n: Int) {
        precondition(n >= 1, "thread count must be positive")
        wk_set_num_threads(Int32(n))
        openblas_set_num_threads(Int32(n))
    }

    /// The number of threads OpenMP (and so oneDNN) will use.
    public static var current: Int { Int(wk_get_max_threads()) }
}

/// Calls a oneDNN plan function that writes an error message into a buffer, and turns a failure into a TensorError.
func withErrorBuffer<R>(_ body: (UnsafeMutablePointer<CChar>, Int) -> R?) throws -> R {
    let capacity = 512
    let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: capacity)
    buffer.initialize(repeating: 0, count: capacity)
    defer { buffer.deallocate() }
    if let result = body(buffer, capacity) { return result }
    throw TensorError(.kernelFailure, String(cString: buffer))
}

/// Runs a plan's `run` function, which returns 0 on success.
func runChecked(_ body: (UnsafeMutablePointer<CChar>, Int) -> Int32) throws {
    _ = try withErrorBuffer { buffer, capacity in body(buffer, capacity) == 0 ? () : nil }
}

/// An element-wise operation fused after a primitive or run alone.
public enum PostOp: Sendable, Equatable {
    case none
    /// `x < 0 ? alpha · x : x` (alpha 0 is plain ReLU).
    case relu(alpha: Float)
    /// `min(max(x, low), high)`.
    case clip(low: Float, high: Float)
    case sigmoid
    case tanh
    /// `x · min(max(x + 3, 0), 6) / 6`.
    case hardSwish
    /// `alpha · x + beta`.
    case linear(alpha: Float, beta: Float)

    var c: wk_postop_t {
        switch self {
        case .none: wk_postop_t(kind: WK_ELTWISE_NONE, alpha: 0, beta: 0)
        case .relu(let alpha): wk_postop_t(kind: WK_ELTWISE_RELU, alpha: alpha, beta: 0)
        case .clip(let low, let high): wk_postop_t(kind: WK_ELTWISE_CLIP, alpha: low, beta: high)
        case .sigmoid: wk_postop_t(kind: WK_ELTWISE_LOGISTIC, alpha: 0, beta: 0)
        case .tanh: wk_postop_t(kind: WK_ELTWISE_TANH, alpha: 0, beta: 0)
        case .hardSwish: wk_postop_t(kind: WK_ELTWISE_HARDSWISH, alpha: 0, beta: 0)
        case .linear(let alpha, let beta): wk_postop_t(kind: WK_ELTWISE_LINEAR, alpha: alpha, beta: beta)
        }
    }

    /// The scalar function, used by reference kernels.
    @inlinable
    public func apply(_ x: Float) -> Float {
        switch self {
        case .none: return x
        case .relu(let alpha): return x < 0 ? alpha * x : x
        case .clip(let low, let high): return Swift.min(Swift.max(x, low), high)
        case .sigmoid: return 1 / (1 + expf(-x))
        case .tanh: return tanhf(x)
        case .hardSwish: return x * Swift.min(Swift.max(x + 3, 0), 6) / 6
        case .linear(let alpha, let beta): return alpha * x + beta
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
