import Testing
import WhittleTensor

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
}
