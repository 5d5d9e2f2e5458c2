import Testing
import WhittleTensor
import WhittleTestSupport

/// oneDNN's integer convolution against its reference twin (`Kernels.quantizedConv2dReference`).
@Suite struct QuantizedKernelTests {
    /// Integer outputs may differ from the reference by one step where oneDNN's JIT rounds the float product of
    /// accumulator and scale differently (fused multiply-add, bias added in float); never by more.
    static let integerStepTolerance: Float = 1
    /// …and on at most this share of the elements.
    static let offByOneShare = 0.01
    /// Float outputs: the accumulator is exact, only the final product rounds.
    static let floatTolerance: Float = 1e-5

    struct Case: Sendable, CustomStringConvertible {
        var source: QuantizedType, sourceZero: Int32, destination: QuantizedType, destinationZero: Int32
        var description: String { "\(source) zero \(sourceZero) → \(destination) zero \(destinationZero)" }
    }

    static let cases = [
        Case(source: .uint8, sourceZero: 7, destination: .uint8, destinationZero: 3),
        Case(source: .uint8, sourceZero: 0, destination: .uint8, destinationZero: 0),
        Case(source: .int8, sourceZero: 0, destination: .int8, destinationZero: 0),
        Case(source: .int8, sourceZero: -5, destination: .int8, destinationZero: 4),
        Case(source: .uint8, sourceZero: 128, destination: .float, destinationZero: 0),
    ]

    static func integers(_ count: Int, in range: ClosedRange<Int32>, seed: UInt64) -> [Int32] {
        TestSupport.randomFloats(count, seed: seed).map { u in
            let span = Float(range.upperBound - range.lowerBound + 1)
            return min(range.lowerBound + Int32(((u + 1) / 2 * span).rounded(.down)), range.upperBound)
        }
    }

    @Test(arguments: KernelTests.convCases, cases)
    func integerConvolutionMatchesReference(_ g: Conv2DGeometry, _ c: Case) throws {
        let sourceRange: ClosedRange<Int32> = c.source == .uint8 ? 0...255 : -128...127
        let x = Self.integers(g.inputShape.reduce(1, *), in: sourceRange, seed: 1)
        // 7-bit weights are exact on every CPU; the full range only where dot products accumulate in int32.
        let limit = Int32(Kernels.integerDotProductsAreExact ? 127 : Int(Kernels.sevenBitWeightLimit))
        let w = Self.integers(g.weightShape.reduce(1, *), in: -limit...limit, seed: 2).map { Int8($0) }
        let bias = Self.integers(g.outChannels, in: -3000...3000, seed: 3)
        let fanIn = Float(g.inChannels / g.groups * g.kernelH * g.kernelW)
        // Scales that spread the accumulator over the output range: per channel, and one for all.
        let perChannel = (0..<g.outChannels).map { 1 / (Float(40 + 3 * $0) * fanIn.squareRoot()) }
        for scales in [perChannel, [perChannel[0]]] {
            for post in [PostOp.none, .relu(alpha: 0), .clip(low: 0, high: 40)] {
                let r = Requantization(scales: scales, sourceZero: c.sourceZero, destinationZero: c.destinationZero, post: post)
                let plan = try QuantizedConvPlan(g, source: c.source, destination: c.destination, weights: w, bias: bias,
                                                 requantization: r)
                let y = try Self.run(plan, x)
                let expected = Kernels.quantizedConv2dReference(g, input: x, weights: w, bias: bias, requantization: r,
                                                                 destination: c.destination)
                if c.destination == .float {
                    #expect(TestSupport.relativeError(y, expected) < Self.floatTolerance, "\(c) \(post) \(plan.implementation)")
                } else {
                    let differences = zip(y, expected).map { abs($0 - $1) }
                    let off = differences.filter { $0 > 0 }.count
                    #expect(differences.max() ?? 0 <= Self.integerStepTolerance, "\(c) \(post) \(plan.implementation)")
                    #expect(Double(off) <= Self.offByOneShare * Double(y.count), "\(c) \(post): \(off) of \(y.count) differ")
                    #expect(Set(expected).count > 8, "the scales spread the outputs: \(Set(expected).count) distinct values")
                }
            }
        }
    }

    /// Runs `plan` on integer values (held as Int32) and returns its outputs as Float.
    static func run(_ plan: QuantizedConvPlan, _ x: [Int32]) throws -> [Float] {
        let g = plan.geometry, count = g.outputShape.reduce(1, *)
        let input: [UInt8] = plan.source == .uint8 ? x.map { UInt8($0) } : x.map { UInt8(bitPattern: Int8($0)) }
        switch plan.destination {
        case .float:
            var y = [Float](repeating: 0, count: count)
            try input.withUnsafeBytes { src in try y.withUnsafeMutableBytes { try plan.run(src.baseAddress!, $0.baseAddress!) } }
            return y
        case .uint8, .int8:
            var y = [UInt8](repeating: 0, count: count)
            try input.withUnsafeBytes { src in try y.withUnsafeMutableBytes { try plan.run(src.baseAddress!, $0.baseAddress!) } }
            return plan.destination == .uint8 ? y.map { Float($0) } : y.map { Float(Int8(bitPattern: $0)) }
        }
    }

    /// A hand-computed case: one 2×2 window over a 2×2 u8 image with zero point 10, weights (1, −2, 3, −4), bias 5:
    /// a = 5 + (12−10)·1 + (10−10)·(−2) + (14−10)·3 + (6−10)·(−4) = 35; scale 0.4 → 14, plus zero point 3 → 17.
    /// At a tie (scale 0.5: 17.5) ONNX and onnxruntime round before adding the zero point (18 + 3 = 21); oneDNN adds
    /// it first (20.5 → 20), and in float32 a value just below a half can become one (−17.499994 + 146 = 128.5), so a
    /// plan with a zero point rounds in a post-op and adds the zero point after: every case gives the formula's value.
    @Test func integerConvolutionHandComputed() throws {
        let g = Conv2DGeometry(batch: 1, inChannels: 1, height: 2, width: 2, outChannels: 1, kernelH: 2, kernelW: 2)
        let x: [Int32] = [12, 10, 14, 6], w: [Int8] = [1, -2, 3, -4]
        for (scale, zero, expected) in [(Float(0.4), Int32(3), Float(17)), (0.5, 3, 21), (0.5, 4, 22), (0.5, -3, 15)] {
            let r = Requantization(scales: [scale], sourceZero: 10, destinationZero: zero)
            let type: QuantizedType = zero < 0 ? .int8 : .uint8
            #expect(Kernels.quantizedConv2dReference(g, input: x, weights: w, bias: [5], requantization: r, destination: type) == [expected])
            let plan = try QuantizedConvPlan(g, source: .uint8, destination: type, weights: w, bias: [5], requantization: r)
            #expect(try Self.run(plan, x) == [expected], "scale \(scale), zero point \(zero)")
        }
    }

    @Test func refusesBadRequantization() {
        let g = Conv2DGeometry(batch: 1, inChannels: 2, height: 3, width: 3, outChannels: 2, kernelH: 1, kernelW: 1)
        let w = [Int8](repeating: 1, count: 4)
        for scales in [[Float](), [1, 2, 3], [0, 1], [-1, 1], [.nan, 1], [.infinity, 1]] {
            #expect(throws: TensorError.self) {
                try QuantizedConvPlan(g, source: .uint8, destination: .uint8, weights: w, bias: nil,
                                      requantization: Requantization(scales: scales, sourceZero: 0, destinationZero: 0))
            }
        }
        #expect(throws: TensorError.self) {
            try QuantizedConvPlan(g, source: .float, destination: .uint8, weights: w, bias: nil,
                                  requantization: Requantization(scales: [1], sourceZero: 0, destinationZero: 0))
        }
    }
}
