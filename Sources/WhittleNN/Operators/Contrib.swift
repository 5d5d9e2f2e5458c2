import WhittleONNX
import WhittleTensor

/// onnxruntime's contrib operators (domain `com.microsoft`) that Whittle writes and so must run.
///
/// MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?; K, N, bits, block_size):
/// `Y[…, N] = A[…, K] · dequantize(B)ᵀ (+ bias)`, B the transposed weight `[N, K]` in 4-bit blocks along K
/// (`BlockwiseInt4`: `[N, ceil(K / block_size), block_size / 2]` bytes, scales `[N · blocks]` or `[N, blocks]`,
/// optional packed uint8 zero points, 8 when absent).
extension Operators {
    static func registerContrib(_ r: inout [String: OperatorDefinition]) {
        r["MatMulNBits"] = OperatorDefinition(
            infer: { ctx in
                let s = try matMulNBitsSizes(ctx)
                return [ValueMeta(dtype: .float, shape: Array(s.a.shape.dropLast()) + [s.n])]
            },
            compile: { ctx, _, options in
                let s = try matMulNBitsSizes(ctx)
                let bias = ctx.optionalInput(5)?.constant?.floats
                // A constant weight stays packed, unpacked a panel at a time as it multiplies (`Kernels.matMulInt4`);
                // others are dequantized at every run.
                if let b = ctx.optionalInput(1)?.constant, let scales = ctx.optionalInput(2)?.constant,
                   ctx.node.inputs.count <= 3 || ctx.node.inputs[3].isEmpty || ctx.optionalInput(3)?.constant != nil,
                   ctx.node.inputs.count <= 5 || ctx.node.inputs[5].isEmpty || bias != nil {
                    let weights = try packedNBits(ctx, s, b, scales, ctx.optionalInput(3)?.constant)
                    return Int4MatMulKernel(weights: weights, bias: bias, reference: !options.fast)
                }
                return ClosureKernel { inputs in
                    let w = try dequantizeNBits(ctx, s, inputs[1]!, inputs[2]!, inputs.count > 3 ? inputs[3] : nil)
                    let a = inputs[0]!.floats
                    let m = a.count / s.k
                    var y = [Float](repeating: 0, count: m * s.n)
                    if m > 0 {
                        try a.withUnsafeBufferPointer { pa in
                            try w.withUnsafeBufferPointer { pw in
                                try y.withUnsafeMutableBufferPointer { py in
                                    if options.fast {
                                        try Kernels.gemm(transA: false, transB: true, m: m, n: s.n, k: s.k, a: pa.baseAddress!,
                                                         b: pw.baseAddress!, c: py.baseAddress!)
                                    } else {
                                        let ref = Kernels.gemmReference(transA: false, transB: true, m: m, n: s.n, k: s.k, a: a, b: w,
                                                                        c: [Float](repeating: 0, count: m * s.n))
                                        for i in ref.indices { py[i] = ref[i] }
                                    }
                                }
                            }
                        }
                    }
                    if let b = bias ?? (inputs.count > 5 ? inputs[5]?.floats : nil) {
                        for row in 0..<m { for j in 0..<s.n { y[row * s.n + j] += b[j] } }
                    }
                    return [Tensor(shape: Array(inputs[0]!.shape.dropLast()) + [s.n], floats: y)]
                }
            },
            macs: { ctx, outputs in
                guard let y = outputs.first, let k = try? ctx.int("K") else { return 0 }
                return y.count * Int(k)
            })
    }

    struct NBitsSizes { var a: ValueMeta; var k: Int; var n: Int; var block: Int }

    static func matMulNBitsSizes(_ ctx: NodeContext) throws -> NBitsSizes {
        let a = try ctx.floatInput(0)
        guard let k64 = try ctx.int("K"), let n64 = try ctx.int("N"), k64 > 0, n64 > 0 else {
            throw ctx.error(.invalidInput, "needs positive attributes K and N")
        }
        let bits = try ctx.int("bits", default: 4), block = Int(try ctx.int("block_size", default: 0))
        guard bits == 4 else { throw ctx.error(.unsupportedOperator, "bits = \(bits): Whittle runs 4-bit MatMulNBits only") }
        guard block >= 16, block & (block - 1) == 0 else {
            throw ctx.error(.invalidInput, "block_size \(block) must be a power of two of at least 16")
        }
        let (k, n) = (Int(k64), Int(n64)), blocks = BlockwiseInt4.blocks(k: k, blockSize: block)
        guard a.rank >= 1, a.shape.last == k else { throw ctx.error(.shapeMismatch, "A \(a.shape) must end in K = \(k)") }
        let b = try ctx.input(1)
        guard b.dtype == .uint8, b.shape == [n, blocks, block / 2] else {
            throw ctx.error(.shapeMismatch, "B must be uint8 [N, ceil(K / block_size), block_size / 2] = [\(n), \(blocks), \(block / 2)], got \(b.dtype) \(b.shape)")
        }
        let scales = try ctx.floatInput(2)
        guard scales.count == n * blocks, scales.rank <= 2 else {
            throw ctx.error(.shapeMismatch, "scales must hold N · blocks = \(n * blocks) values, got \(scales.shape)")
        }
        if let zp = ctx.optionalInput(3) {
            guard zp.dtype == .uint8, zp.count == n * ((blocks + 1) / 2) else {
                throw ctx.error(.unsupportedDataType, "zero points must be packed uint8 [N · ceil(blocks / 2)] = \(n * ((blocks + 1) / 2)); got \(zp.dtype) \(zp.shape)")
            }
        }
        if let g = ctx.optionalInput(4), g.count > 0 { throw ctx.error(.unsupportedOperator, "g_idx (act-order) is not supported") }
        if let bias = ctx.optionalInput(5) {
            guard bias.dtype == .float, bias.count == n else { throw ctx.error(.shapeMismatch, "bias must be float [\(n)], got \(bias.shape)") }
        }
        return NBitsSizes(a: a, k: k, n: n, block: block)
    }

    static func dequantizeNBits(_ ctx: NodeContext, _ s: NBitsSizes, _ b: Tensor, _ scales: Tensor?, _ zeros: Tensor?) throws -> [Float] {
        guard let scales else { throw ctx.error(.invalidInput, "the scales are missing") }
        guard scales.floats.allSatisfy(\.isFinite) else { throw ctx.error(.invalidInput, "scales must be finite") }
        return BlockwiseInt4.dequantize(packed: b.ints, scales: scales.floats, zeroPoints: zeros?.ints, n: s.n, k: s.k, blockSize: s.block)
    }
}
