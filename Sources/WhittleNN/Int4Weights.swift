import WhittleONNX
import WhittleTensor

/// 4-bit weights stay 4-bit at run time: a MatMul or Gemm whose weight is a constant int4 or uint4 through a
/// DequantizeLinear (opset 21, per block along K, per output channel or per tensor), and MatMulNBits with a constant
/// weight, run as `Kernels.matMulInt4`, which unpacks a panel of rows at a time. Without this the weight would be
/// folded into floats at planning, 8 times its packed size.
final class Int4MatMulKernel: NodeKernel, @unchecked Sendable {
    let weights: PackedInt4Weights
    /// Added to every row (`[N]`), or nil.
    let bias: [Float]?
    /// Computes in Double through the reference twin (`KernelOptions.fast` off).
    let reference: Bool

    init(weights: PackedInt4Weights, bias: [Float]?, reference: Bool) {
        self.weights = weights
        self.bias = bias
        self.reference = reference
    }

    var implementation: String { "int4 packed, blocks of \(weights.blockSize)" }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        guard let a = inputs[0], a.dtype == .float, a.rank >= 1, a.shape.last == weights.k else {
            throw ONNXError(.invalidInput, "int4 MatMul: the input must be float […, \(weights.k)], got \(inputs[0].map { "\($0.dtype) \($0.shape)" } ?? "nothing")")
        }
        let m = a.count / weights.k, n = weights.n
        var y: [Float]
        if reference {
            y = Kernels.matMulInt4Reference(m: m, a: a.floats, weights: weights)
        } else {
            y = try makeFloats(m * n) { out in
                try a.floats.withUnsafeBufferPointer { try Kernels.matMulInt4(m: m, a: $0.baseAddress!, weights: weights, y: out) }
            }
        }
        if let bias {
            for row in 0..<m { for j in 0..<n { y[row * n + j] += bias[j] } }
        }
        return [Tensor(shape: Array(a.shape.dropLast()) + [n], floats: y)]
    }
}

extension Operators {
    /// MatMulNBits' constant weight (`BlockwiseInt4` bytes, scales, optional packed uint8 zero points) kept packed.
    static func packedNBits(_ ctx: NodeContext, _ s: NBitsSizes, _ b: Tensor, _ scales: Tensor, _ zeros: Tensor?) throws -> PackedInt4Weights {
        let blocks = BlockwiseInt4.blocks(k: s.k, blockSize: s.block), zpBytes = (blocks + 1) / 2
        var zeroPoints = [UInt8](repeating: 8, count: s.n * blocks)
        if let zeros {
            let packed = zeros.ints
            for row in 0..<s.n {
                for block in 0..<blocks {
                    let byte = UInt8(truncatingIfNeeded: packed[row * zpBytes + block / 2])
                    zeroPoints[row * blocks + block] = block % 2 == 0 ? byte & 0x0F : byte >> 4
                }
            }
        }
        do {
            return try PackedInt4Weights(n: s.n, k: s.k, blockSize: s.block, bytes: b.ints.map { UInt8(truncatingIfNeeded: $0) },
                                         scales: scales.floats, zeroPoints: zeroPoints)
        } catch let error as TensorError {
            throw ctx.error(.invalidInput, error.message)
        }
    }
}

extension StepPlanner {
    /// The MatMul (`A[…, K] · B[K, N]`) or Gemm (`A[M, K] · op(B) + C`, no transA, alpha and beta 1, C constant
    /// `[N]` or absent) at `i` whose B is a constant int4 or uint4 weight through a DequantizeLinear, as a step that
    /// keeps B packed; nil when the node is anything else (the float path folds B as before).
    static func fuseInt4MatMul(_ i: Int, _ inferred: InferredGraph, producer: [String: Int], options: KernelOptions) throws -> PlannedStep? {
        let contexts = inferred.contexts
        let ctx = contexts[i]
        guard ctx.node.inputs.count >= 2, let a = ctx.optionalInput(0), a.dtype == .float, a.rank >= 2,
              let dq = producer[ctx.node.inputs[1]], contexts[dq].node.opType == "DequantizeLinear",
              let codes = contexts[dq].optionalInput(0)?.constant, codes.dtype == .int4 || codes.dtype == .uint4, codes.rank == 2
        else { return nil }
        var kAxis = 0
        var bias: [Float]?
        if ctx.node.opType == "Gemm" {
            guard a.rank == 2, try ctx.int("transA", default: 0) == 0, try ctx.float("alpha", default: 1) == 1 else { return nil }
            kAxis = try ctx.int("transB", default: 0) != 0 ? 1 : 0
            if ctx.node.inputs.count > 2, !ctx.node.inputs[2].isEmpty {
                guard try ctx.float("beta", default: 1) == 1, let c = ctx.optionalInput(2)?.constant, c.dtype == .float,
                      c.count == codes.shape[1 - kAxis], c.rank == 1 || (c.rank == 2 && c.shape[0] == 1) else { return nil }
                bias = c.floats
            }
        }
        let (k, n) = (codes.shape[kAxis], codes.shape[1 - kAxis])
        guard a.shape.last == k, let blocked = try int4Blocks(contexts[dq], kAxis: kAxis, k: k, n: n) else { return nil }
        // Codes as unsigned nibbles of the transposed weight [N, K]: int4 c ↦ c + 8 (the zero point too).
        let offset: Int64 = codes.dtype == .int4 ? 8 : 0
        let values = codes.ints
        let nibbles = (0..<(n * k)).map { index -> UInt8 in
            let (row, j) = (index / k, index % k)
            return UInt8(truncatingIfNeeded: values[kAxis == 0 ? j * n + row : row * k + j] + offset)
        }
        let weights = try PackedInt4Weights(n: n, k: k, blockSize: blocked.size, codes: nibbles, scales: blocked.scales,
                                            zeroPoints: blocked.zeros.map { UInt8(truncatingIfNeeded: $0 + offset) })
        return PlannedStep(position: i, nodes: [i], inputs: [ctx.node.inputs[0]], outputs: [ctx.node.outputs[0]],
                           kernel: Int4MatMulKernel(weights: weights, bias: bias, reference: !options.fast))
    }

    /// The block size along K and the scales and zero points `[N, blocks]` of a DequantizeLinear of a 2-D weight
    /// whose reduction axis is `kAxis`: blocked along K (opset 21's block_size), per output channel or per tensor
    /// (one block spanning K). Nil for any other layout (blocks along N, scales per input channel).
    static func int4Blocks(_ dq: NodeContext, kAxis: Int, k: Int, n: Int) throws -> (size: Int, scales: [Float], zeros: [Int64])? {
        guard let scale = dq.optionalInput(1)?.constant, scale.dtype == .float else { return nil }
        let zeroPoint = dq.optionalInput(2)
        guard zeroPoint == nil || zeroPoint?.constant != nil else { return nil }
        let scales = scale.floats, zeros = zeroPoint?.constant?.ints ?? [Int64](repeating: 0, count: scales.count)
        guard zeros.count == scales.count else { return nil }
        var axis = Int(try dq.int("axis", default: 1))
        if axis < 0 { axis += 2 }
        let block = Int(try dq.int("block_size", default: 0))
        let whole = k + k % 2  // one block spanning K (an even size, as the packing needs)
        if scales.count == 1 {
            return (whole, [Float](repeating: scales[0], count: n), [Int64](repeating: zeros[0], count: n))
        }
        if block == 0 {
            guard scale.rank == 1, axis == 1 - kAxis, scales.count == n else { return nil }
            return (whole, scales, zeros)
        }
        let blocks = BlockwiseInt4.blocks(k: k, blockSize: block)
        // One block spanning K however large the attribute says it is: the packed weight is sized by K, never by
        // block_size (a model cannot make the planner allocate by an attribute alone).
        let size = blocks == 1 ? whole : block
        guard axis == kAxis, size % 2 == 0, scales.count == n * blocks else { return nil }
        // The scale tensor is [blocks, N] when K is axis 0, [N, blocks] when it is axis 1.
        let index = { (row: Int, b: Int) in kAxis == 0 ? b * n + row : row * blocks + b }
        let ordered = (0..<(n * blocks)).map { index($0 / blocks, $0 % blocks) }
        return (size, ordered.map { scales[$0] }, ordered.map { zeros[$0] })
    }
}
