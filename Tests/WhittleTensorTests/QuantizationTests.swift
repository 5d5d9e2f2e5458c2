import Testing
import WhittleTensor
import WhittleTestSupport

/// onnxruntime's conventions, checked on hand-computed cases.
@Suite struct QuantizationTests {
    @Test func rangesMatchOnnxRuntimeTables() throws {
        #expect(try QuantizationParameters.range(.int8) == -128...127)
        #expect(try QuantizationParameters.range(.int8, symmetric: true) == -127...127)
        #expect(try QuantizationParameters.range(.uint8, symmetric: true) == 0...255)  // onnxruntime 1.32's table
        #expect(try QuantizationParameters.range(.int8, reduceRange: true) == -64...64)
        #expect(try QuantizationParameters.range(.int4) == -8...7)
        #expect(try QuantizationParameters.range(.uint4, reduceRange: true) == 0...7)
    }

    @Test func scaleAndZeroPoint() throws {
        // Symmetric int8 on [−1, 2]: a = 2, s = 4 / 254, z = 0.
        let s = try QuantizationParameters.compute(min: -1, max: 2, range: -127...127, symmetric: true)
        #expect(s == QuantizationParameters(scale: Float(4.0 / 254.0), zeroPoint: 0))
        // Asymmetric uint8 on [−1, 2]: s = 3 / 255, z = round(0 + 1 / s) = 85.
        let a = try QuantizationParameters.compute(min: -1, max: 2, range: 0...255, symmetric: false)
        #expect(a.scale == Float(3.0 / 255.0) && a.zeroPoint == 85)
        // The range always includes zero: [0.5, 2] behaves as [0, 2].
        let b = try QuantizationParameters.compute(min: 0.5, max: 2, range: 0...255, symmetric: false)
        #expect(b.zeroPoint == 0 && b.scale == Float(2.0 / 255.0))
        // Symmetric uint8 centres at 127 (round half to even of 127).
        #expect(try QuantizationParameters.compute(min: -1, max: 1, range: 0...254, symmetric: true).zeroPoint == 127)
        // A zero range gives scale 1, zero point 0.
        #expect(try QuantizationParameters.compute(min: 0, max: 0, range: -128...127, symmetric: false)
            == QuantizationParameters(scale: 1, zeroPoint: 0))
        #expect(throws: TensorError.self) { try QuantizationParameters.compute(min: .nan, max: 1, range: 0...255, symmetric: false) }
    }

    @Test func roundingIsHalfToEven() {
        let p = QuantizationParameters(scale: 1, zeroPoint: 0)
        #expect([0.5, 1.5, 2.5, -0.5, -1.5].map { p.quantize(Float($0), range: -128...127) } == [0, 2, 2, 0, -2])
    }

    @Test func fakeQuantizationPerChannelAndMask() throws {
        let x = Tensor(shape: [2, 3], floats: [-1, 0.5, 1, 10, -20, 5])
        let fq = try FakeQuantization.fromRange(of: x, type: .int8, symmetric: true, axis: 0)
        #expect(fq.parameters.map(\.scale) == [Float(1.0 / 127.0), Float(20.0 / 127.0)])
        let (y, mask) = fq.apply(x)
        #expect(mask == [1, 1, 1, 1, 1, 1])
        for (a, b) in zip(y.floats, x.floats) { #expect(abs(a - b) <= fq.parameters[1].scale / 2 + 1e-6) }
        // Fixed ranges clip values outside them; the straight-through mask marks them 0.
        let fixed = FakeQuantization(parameters: [QuantizationParameters(scale: 0.1, zeroPoint: 0)], axis: nil, range: -10...10)
        let (clipped, m) = fixed.apply(Tensor(shape: [3], floats: [0.26, 1.0, -5]))
        #expect(clipped.floats.map { ($0 * 100).rounded() / 100 } == [0.3, 1.0, -1.0])
        #expect(m == [1, 1, 0])
    }

    /// One output, K = 5 in blocks of 4 (the second padded). Block 0 [1, −2, 0.5, 4]: its largest value 4 maps to −8,
    /// scale −0.5, codes −2, 4, −1, −8; block 1 [1]: scale −0.125, code −8. Packed low nibble first, each code + 8:
    /// 0xC6 0x07 | 0x80 0x88 (padding is code 0). These weights dequantize exactly.
    @Test func blockwiseInt4QuantizesPacksAndDequantizesHandComputedValues() throws {
        let (codes, scales) = try BlockwiseInt4.quantize(rows: [1, -2, 0.5, 4, 1], n: 1, k: 5, blockSize: 4)
        #expect(codes == [-2, 4, -1, -8, -8])
        #expect(scales == [-0.5, -0.125])
        let packed = BlockwiseInt4.pack(codes: codes, n: 1, k: 5, blockSize: 4)
        #expect(packed == [0xC6, 0x07, 0x80, 0x88])
        let w = BlockwiseInt4.dequantize(packed: packed.map { Int64($0) }, scales: scales, zeroPoints: nil, n: 1, k: 5, blockSize: 4)
        #expect(w == [1, -2, 0.5, 4, 1])
        // Packed zero points (low nibble: block 0, high: block 1) replace the default 8.
        let shifted = BlockwiseInt4.dequantize(packed: packed.map { Int64($0) }, scales: scales, zeroPoints: [0x79], n: 1, k: 5, blockSize: 4)
        #expect(shifted[0] == Float(6 - 9) * scales[0] && shifted[4] == Float(0 - 7) * scales[1])
        // A negative largest value gives a positive scale; an all-zero block scale 1 and codes 0.
        let (c2, s2) = try BlockwiseInt4.quantize(rows: [-4, 2, 0, 0], n: 1, k: 4, blockSize: 2)
        #expect(c2 == [-8, 4, 0, 0] && s2 == [0.5, 1])
    }

    /// Smaller blocks follow the weights more closely: each run of 32 weights along K has its own magnitude, so
    /// blocks of 32 fit each run, blocks of 64 mix two, one block of the whole row mixes all.
    @Test func smallerBlocksReconstructBetter() throws {
        let (n, k) = (8, 256)
        var w = TestSupport.randomFloats(n * k, seed: 5)
        for i in w.indices { w[i] *= Float(1 << ((i % k) / 32 % 4)) }
        func error(_ block: Int) throws -> Double {
            let (codes, scales) = try BlockwiseInt4.quantize(rows: w, n: n, k: k, blockSize: block)
            let back = BlockwiseInt4.dequantize(packed: BlockwiseInt4.pack(codes: codes, n: n, k: k, blockSize: block).map { Int64($0) },
                                                scales: scales, zeroPoints: nil, n: n, k: k, blockSize: block)
            return zip(w, back).reduce(0.0) { $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1) }
        }
        let e32 = try error(32), e64 = try error(64), e256 = try error(256)
        #expect(e32 < e64 && e64 < e256, "\(e32) \(e64) \(e256)")
    }
}
