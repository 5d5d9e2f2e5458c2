/// Quantization arithmetic as onnxruntime computes it (`compute_scale_zp`, QuantizeLinear): `r = s · (q − z)`.
/// Every rounding is half-to-even. See ALGORITHMS.md.
public struct QuantizationParameters: Sendable, Equatable {
    public var scale: Float
    public var zeroPoint: Int64

    public init(scale: Float, zeroPoint: Int64) {
        self.scale = scale
        self.zeroPoint = zeroPoint
    }

    /// The integer range of a quantized type: normal, symmetric (int8 [−127, 127]) or reduced-range, as
    /// onnxruntime's `get_qmin_qmax_for_qType` gives them. onnxruntime (1.32) has no symmetric range for uint8 and
    /// returns [0, 255]; ALGORITHMS.md's table lists [0, 254] — Whittle follows the tool.
    public static func range(_ type: DataType, symmetric: Bool = false, reduceRange: Bool = false) throws -> ClosedRange<Int64> {
        switch (type, symmetric, reduceRange) {
        case (.int8, _, true): return -64...64
        case (.int8, true, false): return -127...127
        case (.int8, false, false): return -128...127
        case (.uint8, _, true): return 0...127
        case (.uint8, _, false): return 0...255
        case (.int4, _, true): return -4...3
        case (.int4, _, false): return -8...7
        case (.uint4, _, true): return 0...7
        case (.uint4, _, false): return 0...15
        default: throw TensorError(.unsupportedDataType, "no quantization range for \(type)")
        }
    }

    /// onnxruntime's `compute_scale_zp`: the range is widened to include 0; symmetric ranges become ±max|r|;
    /// `s = (rmax − rmin)/(qmax − qmin)` in Double (1 when that is below Float's least normal, with z = 0);
    /// symmetric `z = round((qmin + qmax)/2)`, asymmetric `z = round(qmin − rmin/s)`.
    public static func compute(min rmin: Float, max rmax: Float, range q: ClosedRange<Int64>, symmetric: Bool) throws
        -> QuantizationParameters {
        guard rmin.isFinite, rmax.isFinite, rmin <= rmax else {
            throw TensorError(.invalidArgument, "quantization range [\(rmin), \(rmax)] is not a finite interval")
        }
        var low = Double(Swift.min(rmin, 0)), high = Double(Swift.max(rmax, 0))
        if symmetric {
            let a = Swift.max(abs(low), abs(high))
            low = -a
            high = a
        }
        let qmin = Double(q.lowerBound), qmax = Double(q.upperBound)
        // As onnxruntime: the scale is computed in Double and stored as Float32; the zero point is computed in
        // Float32 from that stored scale.
        let scale = Float((high - low) / (qmax - qmin))
        if scale < Float.leastNormalMagnitude { return QuantizationParameters(scale: 1, zeroPoint: 0) }
        let zero: Float = symmetric ? (Float(qmin + qmax) / 2).rounded(.toNearestOrEven)
            : (Float(qmin) - Float(low) / scale).rounded(.toNearestOrEven)
        return QuantizationParameters(scale: scale, zeroPoint: Int64(zero))
    }

    /// `clamp(round_half_even(x / s) + z, qmin, qmax)`.
    @inlinable
    public func quantize(_ x: Float, range q: ClosedRange<Int64>) -> Int64 {
        let v = (x / scale).rounded(.toNearestOrEven) + Float(zeroPoint)
        return Int64(Swift.min(Swift.max(v, Float(q.lowerBound)), Float(q.upperBound)))
    }

    @inlinable
    public func dequantize(_ q: Int64) -> Float { Float(q - zeroPoint) * scale }
}

/// Fake quantization of one tensor (quantize then dequantize), per tensor or along one axis.
public struct FakeQuantization: Sendable, Equatable {
    /// One entry (per tensor) or one per index along `axis`.
    public var parameters: [QuantizationParameters]
    public var axis: Int?
    public var range: ClosedRange<Int64>

    public init(parameters: [QuantizationParameters], axis: Int?, range: ClosedRange<Int64>) {
        self.parameters = parameters
        self.axis = axis
        self.range = range
    }

    /// Symmetric or asymmetric parameters from the tensor's own min/max (per channel along `axis` when given).
    public static func fromRange(of x: Tensor, type: DataType, symmetric: Bool, axis: Int?, reduceRange: Bool = false) throws
        -> FakeQuantization {
        let range = try QuantizationParameters.range(type, symmetric: symmetric, reduceRange: reduceRange)
        guard let axis else {
            let p = try QuantizationParameters.compute(min: x.floats.min() ?? 0, max: x.floats.max() ?? 0, range: range,
                                                       symmetric: symmetric)
            return FakeQuantization(parameters: [p], axis: nil, range: range)
        }
        let size = x.shape[axis], inner = x.shape[(axis + 1)...].reduce(1, *)
        var lows = [Float](repeating: .infinity, count: size), highs = [Float](repeating: -.infinity, count: size)
        for (i, v) in x.floats.enumerated() {
            let c = (i / inner) % size
            lows[c] = Swift.min(lows[c], v)
            highs[c] = Swift.max(highs[c], v)
        }
        let parameters = try (0..<size).map {
            try QuantizationParameters.compute(min: lows[$0], max: highs[$0], range: range, symmetric: symmetric)
        }
        return FakeQuantization(parameters: parameters, axis: axis, range: range)
    }

    /// `(dequantize(quantize(x)), mask)`: the mask is 1 where `round(x/s) + z` falls inside the integer range, 0
    /// where it was clipped — the straight-through estimator passes gradients only through the 1s.
    public func apply(_ x: Tensor) -> (Tensor, [Float]) {
        var y = [Float](repeating: 0, count: x.count), mask = y
        let inner = axis.map { x.shape[($0 + 1)...].reduce(1, *) } ?? 1
        let size = axis.map { x.shape[$0] } ?? 1
        let low = Float(range.lowerBound), high = Float(range.upperBound)
        for i in 0..<x.count {
            let p = parameters[axis == nil ? 0 : (i / inner) % size]
            let v = (x.floats[i] / p.scale).rounded(.toNearestOrEven) + Float(p.zeroPoint)
            mask[i] = v >= low && v <= high ? 1 : 0
            y[i] = (Swift.min(Swift.max(v, low), high) - Float(p.zeroPoint)) * p.scale
        }
        var out = Tensor(shape: x.shape, floats: y)
        out.dtype = x.dtype
        return (out, mask)
    }
}
