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

/// 4-bit block-wise weights: each run of `blockSize` consecutive weights along the reduction axis K of one output
/// has its own scale, chosen as onnxruntime's block-wise quantizer (MLAS `MlasQuantizeBlockwise`, symmetric) chooses
/// it: the block's value of largest magnitude `m` maps exactly to code −8, `scale = m / −8` (negative when `m` is
/// positive), and the other values round to `clamp(round(v / scale), −8, 7)`. All 16 levels are used and the largest
/// weight of every block is exact; a symmetric ±7 scheme would clamp it (systematically shrinking the block's most
/// important weight) or waste a level. Stored the way onnxruntime's `MatMulNBits` reads them: rows of the transposed
/// weight `[N, K]`, K split into `ceil(K / blockSize)` blocks of `blockSize / 2` bytes, two codes per byte low
/// nibble first, each code plus 8 (unsigned, the operator's default zero point); a last partial block is padded with
/// zeros.
public enum BlockwiseInt4 {
    /// Block sizes Whittle writes (powers of two, onnxruntime's MatMulNBits needs at least 16).
    public static let blockSizes = [16, 32, 64, 128, 256]

    public static func blocks(k: Int, blockSize: Int) -> Int { (k + blockSize - 1) / blockSize }

    /// The signed codes `[N, K]` and one scale per (row, block) `[N, blocks]` of `rows` (`[N, K]`, row-major).
    public static func quantize(rows: [Float], n: Int, k: Int, blockSize: Int) throws -> (codes: [Int64], scales: [Float]) {
        precondition(rows.count == n * k && blockSize > 0)
        guard rows.allSatisfy(\.isFinite) else { throw TensorError(.invalidArgument, "int4 blocks of non-finite weights") }
        let kBlocks = blocks(k: k, blockSize: blockSize)
        var codes = [Int64](repeating: 0, count: n * k), scales = [Float](repeating: 1, count: n * kBlocks)
        for row in 0..<n {
            for b in 0..<kBlocks {
                let span = (row * k + b * blockSize)..<(row * k + Swift.min((b + 1) * blockSize, k))
                var largest: Float = 0
                for i in span where abs(rows[i]) > abs(largest) { largest = rows[i] }
                guard largest != 0 else { continue }  // all zero: scale 1, codes 0
                let scale = largest / -8
                scales[row * kBlocks + b] = scale
                for i in span { codes[i] = Int64(Swift.min(Swift.max((rows[i] / scale).rounded(.toNearestOrEven), -8), 7)) }
            }
        }
        return (codes, scales)
    }

    /// Signed codes `[N, K]` packed as MatMulNBits' `B` `[N, blocks, blockSize / 2]` bytes.
    public static func pack(codes: [Int64], n: Int, k: Int, blockSize: Int) -> [UInt8] {
        let kBlocks = blocks(k: k, blockSize: blockSize), blob = blockSize / 2
        var packed = [UInt8](repeating: 0x88, count: n * kBlocks * blob)  // padding: code 0 (+8) in both nibbles
        for row in 0..<n {
            for j in 0..<k {
                let byte = row * kBlocks * blob + j / 2
                let nibble = UInt8(codes[row * k + j] + 8)
                packed[byte] = j % 2 == 0 ? (packed[byte] & 0xF0) | nibble : (packed[byte] & 0x0F) | (nibble << 4)
            }
        }
        return packed
    }

    /// The dequantized transposed weight `[N, K]` from MatMulNBits' packed bytes, scales `[N · blocks]` and optional
    /// packed zero points (two per byte per row, low nibble first; 8 when absent).
    public static func dequantize(packed: [Int64], scales: [Float], zeroPoints: [Int64]?, n: Int, k: Int, blockSize: Int) -> [Float] {
        let kBlocks = blocks(k: k, blockSize: blockSize), blob = blockSize / 2, zpBytes = (kBlocks + 1) / 2
        var out = [Float](repeating: 0, count: n * k)
        for row in 0..<n {
            for b in 0..<kBlocks {
                let scale = scales[row * kBlocks + b]
                var zero: Int64 = 8
                if let zeroPoints {
                    let byte = zeroPoints[row * zpBytes + b / 2]
                    zero = b % 2 == 0 ? byte & 0x0F : (byte >> 4) & 0x0F
                }
                for j in (b * blockSize)..<Swift.min((b + 1) * blockSize, k) {
                    let byte = packed[(row * kBlocks + b) * blob + (j - b * blockSize) / 2]
                    let code = j % 2 == 0 ? byte & 0x0F : (byte >> 4) & 0x0F
                    out[row * k + j] = Float(code - zero) * scale
                }
            }
        }
        return out
    }
}

/// 4-bit weights kept packed in memory, as MatMulNBits stores them: the transposed weight `[N, K]` in blocks of
/// `blockSize` along K, two unsigned codes per byte (low nibble first, `BlockwiseInt4`'s layout), one scale and one
/// zero point (0…15) per (row, block). A weight is `(code − zero) · scale`. The resident size is K · N / 2 bytes
/// plus the block parameters; `Kernels.matMulInt4` unpacks a few rows at a time while it multiplies.
public struct PackedInt4Weights: Sendable {
    public let n: Int, k: Int, blockSize: Int
    /// `[N, blocks, blockSize / 2]` bytes.
    public let bytes: [UInt8]
    /// `[N, blocks]`, finite.
    public let scales: [Float]
    /// `[N, blocks]`, each 0…15.
    public let zeroPoints: [UInt8]

    public var blocks: Int { BlockwiseInt4.blocks(k: k, blockSize: blockSize) }
    /// Bytes held: the codes, the scales and the zero points.
    public var residentBytes: Int { bytes.count + scales.count * 4 + zeroPoints.count }

    public init(n: Int, k: Int, blockSize: Int, bytes: [UInt8], scales: [Float], zeroPoints: [UInt8]) throws {
        guard n > 0, k > 0, blockSize >= 2, blockSize % 2 == 0 else {
            throw TensorError(.invalidArgument, "int4 weights need positive N and K and an even block size, got N \(n), K \(k), block \(blockSize)")
        }
        let blocks = BlockwiseInt4.blocks(k: k, blockSize: blockSize)
        guard bytes.count == n * blocks * blockSize / 2, scales.count == n * blocks, zeroPoints.count == n * blocks else {
            throw TensorError(.shapeMismatch, "int4 weights [\(n), \(k)] in blocks of \(blockSize) need \(n * blocks * blockSize / 2) bytes and \(n * blocks) scales and zero points, got \(bytes.count), \(scales.count) and \(zeroPoints.count)")
        }
        guard scales.allSatisfy(\.isFinite) else { throw TensorError(.invalidArgument, "int4 weight scales must be finite") }
        guard zeroPoints.allSatisfy({ $0 < 16 }) else { throw TensorError(.invalidArgument, "int4 zero points must lie in 0…15") }
        (self.n, self.k, self.blockSize, self.bytes, self.scales, self.zeroPoints) = (n, k, blockSize, bytes, scales, zeroPoints)
    }

    /// From one code per weight (`codes[row · K + j]` of the transposed weight `[N, K]`, each 0…15), packed here.
    public init(n: Int, k: Int, blockSize: Int, codes: [UInt8], scales: [Float], zeroPoints: [UInt8]) throws {
        guard n > 0, k > 0, blockSize >= 2, blockSize % 2 == 0 else {
            throw TensorError(.invalidArgument, "int4 weights need positive N and K and an even block size, got N \(n), K \(k), block \(blockSize)")
        }
        guard codes.count == n * k, codes.allSatisfy({ $0 < 16 }) else {
            throw TensorError(.invalidArgument, "int4 weights [\(n), \(k)] need \(n * k) codes in 0…15, got \(codes.count)")
        }
        let blocks = BlockwiseInt4.blocks(k: k, blockSize: blockSize), blob = blockSize / 2
        var packed = [UInt8](repeating: 0, count: n * blocks * blob)
        for row in 0..<n {
            for j in 0..<k {
                let byte = (row * blocks + j / blockSize) * blob + (j % blockSize) / 2
                packed[byte] |= j % 2 == 0 ? codes[row * k + j] : codes[row * k + j] << 4
            }
        }
        try self.init(n: n, k: k, blockSize: blockSize, bytes: packed, scales: scales, zeroPoints: zeroPoints)
    }

    /// Rows `rows` of the dequantized transposed weight, `[rows.count, K]` row-major, into `out`.
    public func dequantize(rows: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        let blocks = self.blocks, blob = blockSize / 2
        bytes.withUnsafeBufferPointer { packed in
            for (r, row) in rows.enumerated() {
                let target = out + r * k
                for b in 0..<blocks {
                    let scale = scales[row * blocks + b], zero = Int32(zeroPoints[row * blocks + b])
                    let source = packed.baseAddress! + (row * blocks + b) * blob
                    let first = b * blockSize, count = Swift.min(blockSize, k - first)
                    for j in 0..<count {
                        let byte = source[j >> 1]
                        let code = Int32(j & 1 == 0 ? byte & 0x0F : byte >> 4)
                        target[first + j] = Float(code - zero) * scale
                    }
                }
            }
        }
    }

    /// The whole dequantized transposed weight `[N, K]`.
    public func dequantized() -> [Float] {
        [Float](unsafeUninitializedCapacity: n * k) { buffer, initialized in
            dequantize(rows: 0..<n, into: buffer.baseAddress!)
            initialized = n * k
        }
    }
}
