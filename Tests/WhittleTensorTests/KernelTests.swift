import Testing
import WhittleTensor
import WhittleTestSupport

/// Fast (oneDNN / OpenBLAS) kernels against their naive reference twins.
@Suite struct KernelTests {
    /// Relative error allowed between a library kernel and its reference: float32 sums over at most a few
    /// thousand terms in a different order.
    static let kernelTolerance: Float = 2e-5

    static let convCases: [Conv2DGeometry] = [
        Conv2DGeometry(batch: 2, inChannels: 3, height: 9, width: 7, outChannels: 5, kernelH: 3, kernelW: 3,
                       pads: (1, 1, 1, 1)),
        Conv2DGeometry(batch: 1, inChannels: 8, height: 10, width: 10, outChannels: 8, kernelH: 3, kernelW: 3,
                       groups: 8, strides: (2, 2), pads: (1, 1, 1, 1)),  // depthwise, stride 2
        Conv2DGeometry(batch: 3, inChannels: 4, height: 11, width: 8, outChannels: 6, kernelH: 3, kernelW: 2,
                       groups: 2, strides: (1, 2), dilations: (2, 1), pads: (2, 0, 1, 1)),  // grouped, dilated, asymmetric
        Conv2DGeometry(batch: 2, inChannels: 16, height: 4, width: 4, outChannels: 32, kernelH: 1, kernelW: 1),
    ]

    @Test(arguments: convCases)
    func convolutionMatchesReference(_ g: Conv2DGeometry) throws {
        let x = TestSupport.randomFloats(g.inputShape.reduce(1, *), seed: 1)
        let w = TestSupport.randomFloats(g.weightShape.reduce(1, *), seed: 2)
        let b = TestSupport.randomFloats(g.outChannels, seed: 3)
        for post in [PostOp.none, .relu(alpha: 0), .clip(low: 0, high: 6)] {
            let plan = try ConvPlan(g, weights: w, bias: b, post: post)
            let y = try TestSupport.apply(x, count: g.outputShape.reduce(1, *)) { try plan.run($0, $1) }
            let expected = Kernels.conv2dReference(g, input: x, weights: w, bias: b, post: post)
            #expect(TestSupport.relativeError(y, expected) < Self.kernelTolerance)
        }
    }

    @Test func convolutionFusesResidualSum() throws {
        let g = Self.convCases[0]
        let x = TestSupport.randomFloats(g.inputShape.reduce(1, *), seed: 4)
        let w = TestSupport.randomFloats(g.weightShape.reduce(1, *), seed: 5)
        let residual = TestSupport.randomFloats(g.outputShape.reduce(1, *), seed: 6)
        let plan = try ConvPlan(g, weights: w, bias: nil, post: .relu(alpha: 0), fuseSum: true)
        let y = try TestSupport.apply(x, count: residual.count, initial: residual) { try plan.run($0, $1) }
        let conv = Kernels.conv2dReference(g, input: x, weights: w, bias: nil)
        let expected = zip(conv, residual).map { max($0 + $1, 0) }
        #expect(TestSupport.relativeError(y, expected) < Self.kernelTolerance)
    }

    /// Two convolutions chained in oneDNN's blocked layout (no NCHW conversion between them), the second
    /// accumulating into a blocked residual, equal the reference computed in NCHW.
    @Test func blockedLayoutChain() throws {
        let a = Conv2DGeometry(batch: 2, inChannels: 8, height: 8, width: 8, outChannels: 16, kernelH: 3, kernelW: 3,
                               pads: (1, 1, 1, 1))
        let b = Conv2DGeometry(batch: 2, inChannels: 16, height: 8, width: 8, outChannels: 16, kernelH: 3, kernelW: 3,
                               groups: 16, pads: (1, 1, 1, 1))
        let x = TestSupport.randomFloats(a.inputShape.reduce(1, *), seed: 30)
        let wa = TestSupport.randomFloats(a.weightShape.reduce(1, *), seed: 31)
        let wb = TestSupport.randomFloats(b.weightShape.reduce(1, *), seed: 32)
        let first = try ConvPlan(a, weights: wa, bias: nil, post: .relu(alpha: 0))
        let second = try ConvPlan(b, weights: wb, bias: nil, fuseSum: true)
        try #require(first.blockedDestinationBytes > 0 && first.layoutMatches(second, asSummand: false))
        try #require(first.layoutMatches(second, asSummand: true))
        let hidden = try TestSupport.apply(x, count: first.blockedDestinationBytes / 4) {
            try first.run($0, $1, sourceBlocked: false, destinationBlocked: true)
        }
        // The second convolution reads the blocked hidden tensor and accumulates into a blocked copy of it.
        let y = try TestSupport.apply(hidden, count: hidden.count, initial: hidden) {
            try second.run($0, $1, sourceBlocked: true, destinationBlocked: true)
        }
        // Back to NCHW with a third plan step: a 1x1 identity convolution reading blocked input.
        let c = Conv2DGeometry(batch: 2, inChannels: 16, height: 8, width: 8, outChannels: 16, kernelH: 1, kernelW: 1)
        var identity = [Float](repeating: 0, count: 256)
        for i in 0..<16 { identity[i * 16 + i] = 1 }
        let back = try ConvPlan(c, weights: identity, bias: nil)
        let plain: [Float]
        if back.blockedSourceBytes > 0 && first.layoutMatches(back, asSummand: false) {
            plain = try TestSupport.apply(y, count: c.outputShape.reduce(1, *)) {
                try back.run($0, $1, sourceBlocked: true, destinationBlocked: false)
            }
        } else {
            Issue.record("the 1x1 plan does not read the blocked layout; cannot convert back")
            return
        }
        let h = Kernels.conv2dReference(a, input: x, weights: wa, bias: nil, post: .relu(alpha: 0))
        let expected = zip(Kernels.conv2dReference(b, input: h, weights: wb, bias: nil), h).map { $0 + $1 }
        #expect(TestSupport.relativeError(plain, expected) < Self.kernelTolerance)
    }

    @Test func convolutionHandComputed() {
        // 1×1×3×3 input, 2×2 kernel of ones, no padding: each output sums a 2×2 window.
        let g = Conv2DGeometry(batch: 1, inChannels: 1, height: 3, width: 3, outChannels: 1, kernelH: 2, kernelW: 2)
        let y = Kernels.conv2dReference(g, input: [1, 2, 3, 4, 5, 6, 7, 8, 9], weights: [1, 1, 1, 1], bias: [0.5])
        #expect(y == [12.5, 16.5, 24.5, 28.5])
    }

    @Test func refusesInconsistentGeometry() {
        let bad = Conv2DGeometry(batch: 1, inChannels: 3, height: 2, width: 2, outChannels: 4, kernelH: 5, kernelW: 5)
        #expect(throws: TensorError.self) { try ConvPlan(bad, weights: [Float](repeating: 0, count: 300), bias: nil) }
        let groups = Conv2DGeometry(batch: 1, inChannels: 3, height: 4, width: 4, outChannels: 4, kernelH: 1, kernelW: 1, groups: 2)
        #expect(throws: TensorError.self) { try ConvPlan(groups, weights: [Float](repeating: 0, count: 8), bias: nil) }
    }

    @Test(arguments: [PoolKind.max, .averageIncludingPad, .averageExcludingPad])
    func poolingMatchesReference(_ kind: PoolKind) throws {
        let g = Conv2DGeometry(batch: 2, inChannels: 3, height: 9, width: 8, outChannels: 3, kernelH: 3, kernelW: 3,
                               strides: (2, 2), pads: (1, 1, 1, 1))
        let x = TestSupport.randomFloats(g.inputShape.reduce(1, *), seed: 7)
        for (oh, ow) in [(g.outHeight, g.outWidth), (g.outHeight, g.outWidth + 1)] {  // floor, and ceil_mode along W (span 7, stride 2)
            guard PoolPlan.supports(kind, g, outHeight: oh, outWidth: ow) else {
                #expect(kind == .averageIncludingPad && ow > g.outWidth)
                continue
            }
            let plan = try PoolPlan(kind, g, outHeight: oh, outWidth: ow)
            let y = try TestSupport.apply(x, count: 2 * 3 * oh * ow) { try plan.run($0, $1) }
            let expected = Kernels.pool2dReference(kind, g, input: x, outHeight: oh, outWidth: ow)
            #expect(TestSupport.relativeError(y, expected) < Self.kernelTolerance)
        }
    }

    @Test func batchNormMatchesReference() throws {
        let (n, c, s) = (3, 5, 7)
        let x = TestSupport.randomFloats(n * c * s, seed: 8)
        let scale = TestSupport.randomFloats(c, seed: 9), bias = TestSupport.randomFloats(c, seed: 10)
        let mean = TestSupport.randomFloats(c, seed: 11), variance = TestSupport.randomFloats(c, seed: 12).map { $0 + 1.5 }
        let plan = try BatchNormPlan(batch: n, channels: c, spatial: s, epsilon: 1e-5, scale: scale, bias: bias,
                                     mean: mean, variance: variance)
        let y = try TestSupport.apply(x, count: x.count) { try plan.run($0, $1) }
        let expected = Kernels.batchNormReference(batch: n, channels: c, spatial: s, epsilon: 1e-5, scale: scale,
                                                  bias: bias, mean: mean, variance: variance, input: x)
        #expect(TestSupport.relativeError(y, expected) < Self.kernelTolerance)
    }

    @Test(arguments: GemmBackend.allCases)
    func gemmMatchesReference(_ backend: GemmBackend) throws {
        let (m, n, k) = (7, 9, 13)
        for (transA, transB) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = TestSupport.randomFloats(m * k, seed: 13), b = TestSupport.randomFloats(k * n, seed: 14)
            let c0 = TestSupport.randomFloats(m * n, seed: 15)
            var c = c0
            try a.withUnsafeBufferPointer { pa in
                try b.withUnsafeBufferPointer { pb in
                    try c.withUnsafeMutableBufferPointer { pc in
                        try Kernels.gemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: 0.5,
                                          a: pa.baseAddress!, b: pb.baseAddress!, beta: 2, c: pc.baseAddress!,
                                          backend: backend)
                    }
                }
            }
            let expected = Kernels.gemmReference(transA: transA, transB: transB, m: m, n: n, k: k, alpha: 0.5,
                                                 a: a, b: b, beta: 2, c: c0)
            #expect(TestSupport.relativeError(c, expected) < Self.kernelTolerance)
        }
    }

    /// int4 weights unpacked a panel at a time: panels of 4 rows over N = 10 (a short last panel), K = 37 in blocks of
    /// 8 (a short last block), zero points 0…15, equal to the whole weight dequantized and multiplied in Double.
    @Test(arguments: [4, 64])
    func matMulInt4MatchesReference(_ panelRows: Int) throws {
        let (m, n, k, block) = (5, 10, 37, 8)
        let blocks = BlockwiseInt4.blocks(k: k, blockSize: block)
        let codes = (0..<(n * k)).map { UInt8(($0 * 7 + 3) % 16) }
        let zeros = (0..<(n * blocks)).map { UInt8(($0 * 5) % 16) }
        let scales = TestSupport.randomFloats(n * blocks, seed: 21)
        let w = try PackedInt4Weights(n: n, k: k, blockSize: block, codes: codes, scales: scales, zeroPoints: zeros)
        #expect(w.bytes.count == n * blocks * block / 2)
        let dense = w.dequantized()
        #expect(dense[0] == Float(Int(codes[0]) - Int(zeros[0])) * scales[0])
        #expect(dense[k + 36] == Float(Int(codes[k + 36]) - Int(zeros[blocks + 4])) * scales[blocks + 4])
        let a = TestSupport.randomFloats(m * k, seed: 22)
        let y = try TestSupport.apply(a, count: m * n) { try Kernels.matMulInt4(m: m, a: $0, weights: w, y: $1, panelRows: panelRows) }
        #expect(TestSupport.relativeError(y, Kernels.matMulInt4Reference(m: m, a: a, weights: w)) < Self.kernelTolerance)
        #expect(throws: TensorError.self) {
            _ = try PackedInt4Weights(n: n, k: k, blockSize: block, codes: codes, scales: scales, zeroPoints: zeros.map { $0 | 16 })
        }
        #expect(throws: TensorError.self) {
            _ = try PackedInt4Weights(n: n, k: k, blockSize: 7, codes: codes, scales: scales, zeroPoints: zeros)
        }
    }

    @Test func innerProductMatchesReference() throws {
        let (m, k, n) = (4, 20, 6)
        let x = TestSupport.randomFloats(m * k, seed: 16), w = TestSupport.randomFloats(n * k, seed: 17)
        let b = TestSupport.randomFloats(n, seed: 18)
        let plan = try InnerProductPlan(m: m, k: k, n: n, weights: w, bias: b)
        let y = try TestSupport.apply(x, count: m * n) { try plan.run($0, $1) }
        var expected = Kernels.gemmReference(transA: false, transB: true, m: m, n: n, k: k, a: x, b: w,
                                             c: [Float](repeating: 0, count: m * n))
        for i in 0..<m { for j in 0..<n { expected[i * n + j] += b[j] } }
        #expect(TestSupport.relativeError(y, expected) < Self.kernelTolerance)
    }

    @Test(arguments: [PostOp.relu(alpha: 0), .relu(alpha: 0.1), .clip(low: -0.5, high: 0.25), .sigmoid, .tanh,
                      .hardSwish, .linear(alpha: 2, beta: -1), .geluErf, .geluTanh, .exp, .log, .sqrt, .abs, .square,
                      .swish(alpha: 1), .swish(alpha: 1.702)])
    func eltwiseMatchesReference(_ op: PostOp) throws {
        // log and sqrt are checked on their domain (positive inputs); the others on both signs.
        let positive = op == .log || op == .sqrt
        let x = TestSupport.randomFloats(1000, seed: 19).map { positive ? abs($0) * 5 + 0.01 : $0 * 5 }
        let plan = try EltwisePlan(op, count: x.count)
        let y = try TestSupport.apply(x, count: x.count) { try plan.run($0, $1) }
        #expect(TestSupport.relativeError(y, Kernels.eltwiseReference(op, x)) < Self.kernelTolerance)
    }

    /// oneDNN's binary primitive against the broadcasting reference, for the shapes models use: same shape, a bias
    /// along the last axis, an attention mask [N, 1, 1, S] over [N, H, S, S], a per-channel scale.
    @Test(arguments: [([2, 3, 4, 5], [2, 3, 4, 5]), ([2, 128, 64], [1, 1, 64]), ([2, 4, 16, 16], [2, 1, 1, 16]), ([2, 8, 6, 6], [1, 8, 1, 1])])
    func binaryMatchesReference(_ shape: [Int], _ operand: [Int]) throws {
        let a = TestSupport.randomFloats(shape.reduce(1, *), seed: 41), b = TestSupport.randomFloats(operand.reduce(1, *), seed: 42).map { $0 + 2 }
        for (kind, f) in [(BinaryPlan.Kind.add, { (x: Float, y: Float) in x + y }), (.sub, { $0 - $1 }), (.mul, { $0 * $1 }), (.div, { $0 / $1 })] {
            let plan = try BinaryPlan(kind, shape: shape, operandShape: operand)
            let y = try b.withUnsafeBufferPointer { pb in
                try TestSupport.apply(a, count: a.count) { try plan.run($0, pb.baseAddress!, $1) }
            }
            let expected = try Kernels.broadcastFloat(a, shape, b, operand, f).0
            #expect(TestSupport.relativeError(y, expected) < Self.kernelTolerance, "\(kind) \(shape) ∘ \(operand)")
        }
        #expect(throws: TensorError.self) { try BinaryPlan(.add, shape: [2, 3], operandShape: [3, 2]) }
    }

    /// The transpose fast path (last axis kept) against the general one.
    @Test func transposeKeepingTheLastAxisCopiesRuns() {
        let x = (0..<(2 * 3 * 4 * 5)).map(Float.init)
        let fast = Kernels.transpose(x, shape: [2, 3, 4, 5], perm: [0, 2, 1, 3])
        var expected = [Float]()
        for n in 0..<2 { for h in 0..<4 { for s in 0..<3 { for d in 0..<5 { expected.append(x[((n * 3 + s) * 4 + h) * 5 + d]) } } } }
        #expect(fast == expected)
    }

    @Test func softmaxMatchesReferenceAndSumsToOne() throws {
        let (outer, axis, inner) = (3, 10, 4)
        let x = TestSupport.randomFloats(outer * axis * inner, seed: 20).map { $0 * 20 }
        let plan = try SoftmaxPlan(outer: outer, axis: axis, inner: inner)
        let y = try TestSupport.apply(x, count: x.count) { try plan.run($0, $1) }
        let expected = Kernels.softmaxReference(outer: outer, axis: axis, inner: inner, x)
        #expect(TestSupport.relativeError(y, expected) < Self.kernelTolerance)
        let total = (0..<axis).reduce(Float(0)) { $0 + expected[$1 * inner] }
        #expect(abs(total - 1) < 1e-6)
    }

    @Test func broadcasting() throws {
        #expect(try broadcastShape([2, 1, 4], [3, 1]) == [2, 3, 4])
        #expect(throws: TensorError.self) { try broadcastShape([2, 3], [4]) }
        let (v, shape) = try Kernels.broadcastFloat([1, 2, 3, 4, 5, 6], [2, 3], [10, 20, 30], [3], +)
        #expect(shape == [2, 3])
        #expect(v == [11, 22, 33, 14, 25, 36])
        let (w, _) = try Kernels.broadcastFloat([1, 2], [2, 1], [10, 20, 30], [1, 3], *)
        #expect(w == [10, 20, 30, 20, 40, 60])
        #expect(Kernels.transpose([1, 2, 3, 4, 5, 6], shape: [2, 3], perm: [1, 0]) == [1, 4, 2, 5, 3, 6])
    }
}

extension Conv2DGeometry: CustomTestStringConvertible {
    public var testDescription: String {
        "\(inputShape) * \(weightShape) g\(groups) s\(strideH)x\(strideW) d\(dilationH)x\(dilationW)"
    }
}
