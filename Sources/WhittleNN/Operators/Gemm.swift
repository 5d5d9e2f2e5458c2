import WhittleONNX
import WhittleTensor

/// Gemm(A, B, C; alpha, beta, transA, transB): `Y[M, N] = alpha · op(A) · op(B) + beta · C`, C broadcast to [M, N].
/// MatMul(A, B): NumPy matmul, batch dimensions broadcast; rank-1 operands are promoted and the added axis removed.
extension Operators {
    static func registerGemm(_ r: inout [String: OperatorDefinition]) {
        r["Gemm"] = OperatorDefinition(
            infer: { ctx in
                let (m, _, n) = try gemmSizes(ctx)
                return [ValueMeta(dtype: .float, shape: [m, n])]
            },
            compile: { ctx, outputs, options in try GemmKernel(ctx, options: options) },
            macs: { ctx, outputs in
                guard let a = ctx.optionalInput(0), let y = outputs.first else { return 0 }
                let transA = (try? ctx.int("transA", default: 0)) ?? 0
                return y.count * (transA != 0 ? a.shape[0] : a.shape[1])
            })

        r["MatMul"] = OperatorDefinition(
            infer: { ctx in [ValueMeta(dtype: .float, shape: try matMulShapes(ctx).output)] },
            compile: { ctx, outputs, options in
                let shapes = try matMulShapes(ctx)
                let b = ctx.optionalInput(1)?.constant?.asFloats
                return ClosureKernel { inputs in
                    [try matMul(inputs[0]!.asFloats, inputs[1].map(\.asFloats) ?? b!, shapes, options: options, ctx: ctx)]
                }
            },
            macs: { ctx, outputs in
                guard let a = ctx.optionalInput(0), let y = outputs.first else { return 0 }
                return y.count * (a.shape.last ?? 1)
            })
    }

    static func gemmSizes(_ ctx: NodeContext) throws -> (m: Int, k: Int, n: Int) {
        let a = try ctx.floatInput(0, rank: 2)
        let b = try ctx.floatInput(1, rank: 2)
        let transA = try ctx.int("transA", default: 0) != 0
        let transB = try ctx.int("transB", default: 0) != 0
        let (m, k) = transA ? (a.shape[1], a.shape[0]) : (a.shape[0], a.shape[1])
        let (kb, n) = transB ? (b.shape[1], b.shape[0]) : (b.shape[0], b.shape[1])
        guard k == kb else {
            throw ctx.error(.shapeMismatch, "A \(a.shape) (transA \(transA ? 1 : 0)) and B \(b.shape) (transB \(transB ? 1 : 0)) have inner sizes \(k) and \(kb)")
        }
        if let c = ctx.optionalInput(2) {
            guard (try? broadcastShape(c.shape, [m, n])) == [m, n] else {
                throw ctx.error(.shapeMismatch, "C \(c.shape) cannot be broadcast to [\(m), \(n)]")
            }
        }
        return (m, k, n)
    }

    struct MatMulShapes {
        var a: [Int], b: [Int], output: [Int]
        var batch: [Int], m: Int, k: Int, n: Int
    }

    static func matMulShapes(_ ctx: NodeContext) throws -> MatMulShapes {
        let a = try ctx.floatInput(0).shape
        let b = try ctx.floatInput(1).shape
        guard !a.isEmpty, !b.isEmpty else { throw ctx.error(.shapeMismatch, "MatMul operands must have rank ≥ 1") }
        let a2 = a.count == 1 ? [1, a[0]] : a
        let b2 = b.count == 1 ? [b[0], 1] : b
        let (m, k) = (a2[a2.count - 2], a2[a2.count - 1])
        let (kb, n) = (b2[b2.count - 2], b2[b2.count - 1])
        guard k == kb else { throw ctx.error(.shapeMismatch, "A \(a) and B \(b) have inner sizes \(k) and \(kb)") }
        let batch: [Int]
        do {
            batch = try broadcastShape(Array(a2.dropLast(2)), Array(b2.dropLast(2)))
        } catch {
            throw ctx.error(.shapeMismatch, "batch dimensions of A \(a) and B \(b) cannot be broadcast")
        }
        var output = batch
        if a.count > 1 { output.append(m) }
        if b.count > 1 { output.append(n) }
        return MatMulShapes(a: a2, b: b2, output: output, batch: batch, m: m, k: k, n: n)
    }

    static func matMul(_ a: [Float], _ b: [Float], _ s: MatMulShapes, options: KernelOptions,
                       ctx: NodeContext) throws -> Tensor {
        let batchCount = s.batch.reduce(1, *)
        let aBatch = Array(s.a.dropLast(2)), bBatch = Array(s.b.dropLast(2))
        var out = [Float](repeating: 0, count: batchCount * s.m * s.n)
        // Offsets of each batch's matrices in A and B (broadcast batch axes repeat the same matrix).
        let aOffsets = Kernels.broadcastLoop(count: batchCount, shape: s.batch.isEmpty ? [1] : s.batch,
            aStrides: s.batch.isEmpty ? [0] : broadcastStrides(aBatch, to: s.batch),
            bStrides: s.batch.isEmpty ? [0] : broadcastStrides(bBatch, to: s.batch)) { ia, ib in (ia, ib) }
        if bBatch.reduce(1, *) == 1 && aBatch.reduce(1, *) == batchCount && options.fast {
            // One GEMM: all of A's rows against the single B.
            try a.withUnsafeBufferPointer { pa in
                try b.withUnsafeBufferPointer { pb in
                    try out.withUnsafeMutableBufferPointer { pc in
                        try Kernels.gemm(transA: false, transB: false, m: batchCount * s.m, n: s.n, k: s.k,
                                         a: pa.baseAddress!, b: pb.baseAddress!, c: pc.baseAddress!,
                                         backend: options.gemmBackend)
                    }
                }
            }
        } else {
            for (index, (ia, ib)) in aOffsets.enumerated() {
                let aStart = ia * s.m * s.k, bStart = ib * s.k * s.n, cStart = index * s.m * s.n
                if options.fast {
                    try a.withUnsafeBufferPointer { pa in
                        try b.withUnsafeBufferPointer { pb in
                            try out.withUnsafeMutableBufferPointer { pc in
                                try Kernels.gemm(transA: false, transB: false, m: s.m, n: s.n, k: s.k,
                                                 a: pa.baseAddress! + aStart, b: pb.baseAddress! + bStart,
                                                 c: pc.baseAddress! + cStart, backend: options.gemmBackend)
                            }
                        }
                    }
                } else {
                    let c = Kernels.gemmReference(transA: false, transB: false, m: s.m, n: s.n, k: s.k,
                        a: Array(a[aStart..<(aStart + s.m * s.k)]), b: Array(b[bStart..<(bStart + s.k * s.n)]),
                        c: [Float](repeating: 0, count: s.m * s.n))
                    out.replaceSubrange(cStart..<(cStart + s.m * s.n), with: c)
                }
            }
        }
        return Tensor(shape: s.output, floats: out)
    }
}

/// A compiled Gemm: oneDNN inner product when B and C are constant and the call is `A · op(B) + C`; a general GEMM
/// with broadcast C otherwise.
final class GemmKernel: NodeKernel, @unchecked Sendable {
    let m: Int, k: Int, n: Int
    let transA: Bool, transB: Bool
    let alpha: Float, beta: Float
    let plan: InnerProductPlan?
    let options: KernelOptions
    let cShape: [Int]?

    init(_ ctx: NodeContext, options: KernelOptions) throws {
        (m, k, n) = try Operators.gemmSizes(ctx)
        transA = try ctx.int("transA", default: 0) != 0
        transB = try ctx.int("transB", default: 0) != 0
        alpha = try ctx.float("alpha", default: 1)
        beta = try ctx.float("beta", default: 1)
        self.options = options
        cShape = ctx.optionalInput(2)?.shape
        let c = ctx.optionalInput(2)
        if options.fast, !transA, alpha == 1, let b = ctx.optionalInput(1)?.constant,
            c == nil || (c?.constant != nil && c!.count == n && beta == 1) {
            let weights = transB ? b.asFloats : Kernels.transpose(b.asFloats, shape: b.shape, perm: [1, 0])
            plan = try InnerProductPlan(m: m, k: k, n: n, weights: weights, bias: c?.constant?.asFloats)
        } else {
            plan = nil
        }
    }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        let a = inputs[0]!.asFloats
        if let plan {
            let out = try a.withUnsafeBufferPointer { src in try makeFloats(m * n) { try plan.run(src.baseAddress!, $0) } }
            return [Tensor(shape: [m, n], floats: out)]
        }
        let b = inputs[1]!.asFloats
        let c = inputs.count > 2 ? inputs[2] : nil
        var out = [Float](repeating: 0, count: m * n)
        if let c, beta != 0 {
            let (broadcast, _) = try Kernels.broadcastFloat(c.asFloats, c.shape, out, [m, n]) { cv, _ in cv }
            out = broadcast
        }
        if options.fast {
            try a.withUnsafeBufferPointer { pa in
                try b.withUnsafeBufferPointer { pb in
                    try out.withUnsafeMutableBufferPointer { pc in
                        try Kernels.gemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha,
                                         a: pa.baseAddress!, b: pb.baseAddress!, beta: c == nil ? 0 : beta,
                                         c: pc.baseAddress!, backend: options.gemmBackend)
                    }
                }
            }
        } else {
            out = Kernels.gemmReference(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha, a: a, b: b,
                                        beta: c == nil ? 0 : beta, c: out)
        }
        return [Tensor(shape: [m, n], floats: out)]
    }
}
