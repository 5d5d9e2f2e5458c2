import COpenBLAS
import CWhittleDNNL

/// Which library runs a general matrix multiply.
public enum GemmBackend: Sendable, CaseIterable {
    /// oneDNN's `dnnl_sgemm` (the default).
    case oneDNN
    /// OpenBLAS `cblas_sgemm`, the fallback.
    case openBLAS
}

extension Kernels {
    /// Row-major `C[M, N] = alpha · op(A) · op(B) + beta · C`, where `op(A)` is `[M, K]` (A stored `[K, M]` when
    /// `transA`) and `op(B)` is `[K, N]` (B stored `[N, K]` when `transB`).
    public static func gemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
                            a: UnsafePointer<Float>, b: UnsafePointer<Float>, beta: Float = 0,
                            c: UnsafeMutablePointer<Float>, ldc: Int? = nil, backend: GemmBackend = .oneDNN) throws {
        let lda = transA ? m : k, ldb = transB ? k : n, ldc = ldc ?? n
        switch backend {
        case .oneDNN:
            let status = wk_sgemm(transA ? 84 : 78, transB ? 84 : 78, Int64(m), Int64(n), Int64(k), alpha, a,
                                  Int64(lda), b, Int64(ldb), beta, c, Int64(ldc))
            if status != 0 { throw TensorError(.kernelFailure, "oneDNN sgemm failed for \(m)x\(n)x\(k)") }
        case .openBLAS:
            cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                        blasint(m), blasint(n), blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c,
                        blasint(ldc))
        }
    }

    /// Output columns of `matMulInt4` per unpacked panel: 64 rows of the weight, 64 · K floats of scratch.
    public static let int4PanelRows = 64

    /// `y[M, N] = a[M, K] · Wᵀ` with `W` the packed int4 weight `[N, K]`, unpacked `panelRows` rows at a time into
    /// a scratch of `panelRows · K` floats and multiplied by sgemm into the panel's columns of `y`: the weight
    /// stays 4-bit in memory.
    public static func matMulInt4(m: Int, a: UnsafePointer<Float>, weights w: PackedInt4Weights, y: UnsafeMutablePointer<Float>,
                                  panelRows: Int = int4PanelRows) throws {
        guard m > 0 else { return }
        let rows = Swift.max(1, Swift.min(panelRows, w.n))
        var panel = [Float](repeating: 0, count: rows * w.k)
        try panel.withUnsafeMutableBufferPointer { scratch in
            for first in stride(from: 0, to: w.n, by: rows) {
                let span = first..<Swift.min(first + rows, w.n)
                w.dequantize(rows: span, into: scratch.baseAddress!)
                try gemm(transA: false, transB: true, m: m, n: span.count, k: w.k, a: a, b: scratch.baseAddress!,
                         c: y + first, ldc: w.n)
            }
        }
    }

    /// Reference twin of `matMulInt4`: the whole weight dequantized, multiplied in Double.
    public static func matMulInt4Reference(m: Int, a: [Float], weights w: PackedInt4Weights) -> [Float] {
        gemmReference(transA: false, transB: true, m: m, n: w.n, k: w.k, a: a, b: w.dequantized(),
                      c: [Float](repeating: 0, count: m * w.n))
    }

    /// Reference twin of `gemm`, accumulating in Double.
    public static func gemmReference(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
                                     a: [Float], b: [Float], beta: Float = 0, c: [Float]) -> [Float] {
        var out = c
        for i in 0..<m {
            for j in 0..<n {
                var acc = 0.0
                for p in 0..<k {
                    let av = transA ? a[p * m + i] : a[i * k + p]
                    let bv = transB ? b[j * k + p] : b[p * n + j]
                    acc += Double(av) * Double(bv)
                }
                out[i * n + j] = Float(Double(alpha) * acc + (beta == 0 ? 0 : Double(beta) * Double(c[i * n + j])))
            }
        }
        return out
    }
}

/// A oneDNN inner product for fixed sizes: `y[M, N] = x[M, K] · Wᵀ + b`, weights stored `[N, K]` (ONNX Gemm with
/// transB = 1, as PyTorch's Linear exports), reordered once into oneDNN's preferred layout.
public final class InnerProductPlan: @unchecked Sendable {
    public let m: Int, k: Int, n: Int
    private let handle: OpaquePointer

    public init(m: Int, k: Int, n: Int, weights: [Float], bias: [Float]?, post: PostOp = .none) throws {
        guard m >= 1, k >= 1, n >= 1 else { throw TensorError(.invalidArgument, "inner product needs positive sizes") }
        guard weights.count == n * k else {
            throw TensorError(.shapeMismatch, "inner product weight has \(weights.count) values, expected \(n)x\(k)")
        }
        if let bias, bias.count != n {
            throw TensorError(.shapeMismatch, "inner product bias has \(bias.count) values, expected \(n)")
        }
        self.m = m
        self.k = k
        self.n = n
        handle = try withErrorBuffer { err, len in
            weights.withUnsafeBufferPointer { w in
                withOptionalPointer(bias) { b in
                    wk_inner_create(Int64(m), Int64(k), Int64(n), w.baseAddress, b, post.c, err, len)
                }
            }
        }
    }

    deinit { wk_inner_destroy(handle) }

    public func run(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>) throws {
        try runChecked { err, len in wk_inner_run(handle, src, dst, err, len) }
    }
}
