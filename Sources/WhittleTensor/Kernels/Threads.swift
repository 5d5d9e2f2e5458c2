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

    /// Returns the heap's free memory to the system (glibc's malloc_trim; `wk_tune_allocator` keeps freed buffers
    /// for reuse otherwise).
    public static func releaseFreeMemory() { wk_release_free_memory() }

    /// Runs `body` with the compute threads pinned one to a core (thread i on the i-th CPU this process may use), so
    /// the operating system does not move them between cores while it is timed; afterwards they run anywhere again.
    /// `pinned` tells `body` whether pinning took (it does not where affinities cannot be set).
    public static func pinned<R>(_ body: (_ pinned: Bool) throws -> R) rethrows -> R {
        let pinned = wk_pin_threads(1) > 0
        defer { if pinned { _ = wk_pin_threads(0) } }
        return try body(pinned)
    }
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
    /// `x · (1 + erf(x / √2)) / 2` (GELU, exact form).
    case geluErf
    /// `x · (1 + tanh(√(2/π) · (x + 0.044715 x³))) / 2` (GELU, tanh approximation).
    case geluTanh
    case exp
    /// Natural logarithm.
    case log
    case sqrt
    case abs
    case square
    /// `x · sigmoid(alpha · x)` (SiLU / Swish-1 with alpha 1).
    case swish(alpha: Float)

    var c: wk_postop_t {
        switch self {
        case .none: wk_postop_t(kind: WK_ELTWISE_NONE, alpha: 0, beta: 0)
        case .relu(let alpha): wk_postop_t(kind: WK_ELTWISE_RELU, alpha: alpha, beta: 0)
        case .clip(let low, let high): wk_postop_t(kind: WK_ELTWISE_CLIP, alpha: low, beta: high)
        case .sigmoid: wk_postop_t(kind: WK_ELTWISE_LOGISTIC, alpha: 0, beta: 0)
        case .tanh: wk_postop_t(kind: WK_ELTWISE_TANH, alpha: 0, beta: 0)
        case .hardSwish: wk_postop_t(kind: WK_ELTWISE_HARDSWISH, alpha: 0, beta: 0)
        case .linear(let alpha, let beta): wk_postop_t(kind: WK_ELTWISE_LINEAR, alpha: alpha, beta: beta)
        case .geluErf: wk_postop_t(kind: WK_ELTWISE_GELU_ERF, alpha: 0, beta: 0)
        case .geluTanh: wk_postop_t(kind: WK_ELTWISE_GELU_TANH, alpha: 0, beta: 0)
        case .exp: wk_postop_t(kind: WK_ELTWISE_EXP, alpha: 0, beta: 0)
        case .log: wk_postop_t(kind: WK_ELTWISE_LOG, alpha: 0, beta: 0)
        case .sqrt: wk_postop_t(kind: WK_ELTWISE_SQRT, alpha: 0, beta: 0)
        case .abs: wk_postop_t(kind: WK_ELTWISE_ABS, alpha: 0, beta: 0)
        case .square: wk_postop_t(kind: WK_ELTWISE_SQUARE, alpha: 0, beta: 0)
        case .swish(let alpha): wk_postop_t(kind: WK_ELTWISE_SWISH, alpha: alpha, beta: 0)
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
        case .geluErf: return 0.5 * x * (1 + erff(x * 0.70710678118654752))
        case .geluTanh:
            return 0.5 * x * (1 + tanhf(0.79788456080286536 * (x + 0.044715 * x * x * x)))
        case .exp: return expf(x)
        case .log: return logf(x)
        case .sqrt: return sqrtf(x)
        case .abs: return Swift.abs(x)
        case .square: return x * x
        case .swish(let alpha): return x / (1 + expf(-alpha * x))
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
