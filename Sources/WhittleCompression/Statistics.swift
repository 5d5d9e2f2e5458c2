/// Statistics that merge exactly: `merge` is associative and commutative, so statistics collected on disjoint
/// parts of a data set (on different workers) combine into the statistics of the whole. Collection (over data) is
/// separate from computation (ranges, scores), as in onnxruntime's calibrators: workers collect, the coordinator
/// computes.

/// Per-tensor minimum, maximum and largest magnitude, with the number of values seen.
public struct RangeStatistics: Sendable, Equatable, Codable {
    public var min: Float = .infinity
    public var max: Float = -.infinity
    public var count: Int = 0

    public init() {}

    public init(min: Float, max: Float, count: Int) {
        self.min = min
        self.max = max
        self.count = count
    }

    /// max(|min|, |max|).
    public var absMax: Float { count == 0 ? 0 : Swift.max(abs(min), abs(max)) }

    /// Adds values; NaN or infinite values are refused (they would poison every range computed from them).
    public mutating func add(_ values: [Float]) throws {
        var low = min, high = max
        // Eight lanes at a time; `v − v` is 0 for finite values and NaN otherwise, so one sum finds them all.
        var lows = SIMD8<Float>(repeating: low), highs = SIMD8<Float>(repeating: high), poison = SIMD8<Float>()
        values.withUnsafeBufferPointer { buffer in
            let n = buffer.count, body = n - n % 8
            buffer.baseAddress.map { base in
                base.withMemoryRebound(to: SIMD8<Float>.self, capacity: body / 8) { lanes in
                    for i in 0..<(body / 8) {
                        let v = lanes[i]
                        lows.replace(with: v, where: v .< lows)
                        highs.replace(with: v, where: v .> highs)
                        poison += v - v
                    }
                }
            }
            for i in body..<n {
                let v = buffer[i]
                low = Swift.min(low, v)
                high = Swift.max(high, v)
                poison[0] += v - v
            }
        }
        guard !(0..<8).contains(where: { poison[$0] != 0 }) else {
            let bad = values.first { !$0.isFinite } ?? .nan
            throw CompressionError(.invalidStatistics, "a non-finite value (\(bad)) reached the range statistics")
        }
        min = Swift.min(low, lows.min())
        max = Swift.max(high, highs.max())
        count += values.count
    }

    /// Throws if the counts overflow (only forged counts can).
    public func merged(with other: RangeStatistics) throws -> RangeStatistics {
        RangeStatistics(min: Swift.min(min, other.min), max: Swift.max(max, other.max), count: try checkedSum(count, other.count))
    }
}

/// A histogram over fixed, given edges: `binCount` equal bins over [lower, upper]. Values outside fall into the
/// end bins (federated calibration broadcasts edges wide enough that none do). Counts merge by addition only
/// between histograms with identical edges.
public struct Histogram: Sendable, Equatable, Codable {
    public let lower: Float
    public let upper: Float
    public private(set) var counts: [UInt64]
    /// If true, the histogram holds |x| (the symmetric calibrators' convention).
    public let magnitudes: Bool

    public static let defaultBinCount = 2048

    public init(lower: Float, upper: Float, binCount: Int = Histogram.defaultBinCount, magnitudes: Bool) throws {
        guard lower.isFinite, upper.isFinite, lower < upper || (lower == 0 && upper == 0), binCount >= 1 else {
            throw CompressionError(.invalidArgument, "histogram edges [\(lower), \(upper)] with \(binCount) bins are not usable")
        }
        self.lower = lower
        self.upper = upper
        self.counts = [UInt64](repeating: 0, count: binCount)
        self.magnitudes = magnitudes
    }

    /// A histogram with given counts (for example received from a worker, or a committed fixture).
    public init(lower: Float, upper: Float, counts: [UInt64], magnitudes: Bool) throws {
        try self.init(lower: lower, upper: upper, binCount: counts.count, magnitudes: magnitudes)
        self.counts = counts
    }

    public var binCount: Int { counts.count }
    /// The number of values counted (saturating: only forged counts reach 2⁶⁴, and `checkedTotal` refuses them).
    public var total: UInt64 { counts.reduce(0) { $0.addingReportingOverflow($1).overflow ? .max : $0 + $1 } }
    /// The number of values counted; throws if the counts overflow.
    public func checkedTotal() throws -> UInt64 { try counts.reduce(0) { try checkedSum($0, $1) } }

    /// The `binCount + 1` edges, `lower + (upper − lower) · k / binCount` (computed as numpy's linspace does).
    public var edges: [Double] {
        let step = (Double(upper) - Double(lower)) / Double(binCount)
        return (0...binCount).map { $0 == binCount ? Double(upper) : Double(lower) + Double($0) * step }
    }

    public mutating func add(_ values: [Float]) throws {
        let width = Double(upper) - Double(lower)
        let n = counts.count, last = Double(n - 1), lower = Double(self.lower), magnitudes = self.magnitudes
        let scale = width > 0 ? Double(n) / width : 0
        var poison: Float = 0
        /// Adds every value to its bin (or, undoing, takes it away again).
        func pass(undo: Bool) {
            counts.withUnsafeMutableBufferPointer { counts in
                values.withUnsafeBufferPointer { values in
                    // ⌊(v − lower) · (n / width)⌋ in Double, clamped to the end bins: clamping to [0, n − 1] first makes
                    // the conversion's truncation the floor. Every worker runs this same arithmetic, so equal values land
                    // in equal bins everywhere. `v − v` is 0 for finite values and NaN otherwise; a NaN is binned at 0
                    // (its batch is refused below), so the loop has no exit.
                    func fill(_ magnitude: (Float) -> Float) {
                        for raw in values {
                            poison += raw - raw
                            let t = (Double(magnitude(raw)) - lower) * scale
                            let bin = Int(Swift.min(t >= 0 ? t : 0, last))
                            if undo { counts[bin] -= 1 } else { counts[bin] += 1 }
                        }
                    }
                    if magnitudes { fill { abs($0) } } else { fill { $0 } }
                }
            }
        }
        pass(undo: false)
        guard poison == 0 else {
            pass(undo: true)  // a refused batch leaves the histogram as it was
            let bad = values.first { !$0.isFinite } ?? .nan
            throw CompressionError(.invalidStatistics, "a non-finite value (\(bad)) reached the histogram")
        }
    }

    public func merged(with other: Histogram) throws -> Histogram {
        guard lower == other.lower, upper == other.upper, binCount == other.binCount, magnitudes == other.magnitudes else {
            throw CompressionError(.incompatibleStatistics,
                "histograms over [\(lower), \(upper)]×\(binCount) and [\(other.lower), \(other.upper)]×\(other.binCount) have different edges and cannot be merged")
        }
        var out = self
        for i in counts.indices { out.counts[i] = try checkedSum(counts[i], other.counts[i]) }
        _ = try out.checkedTotal()
        return out
    }
}

/// Per-channel activation statistics of a tensor `[N, C, …]`: sums of values and of absolute values, sums of
/// squares, counts of zeros (for APoZ), and the number of values per channel. Counts merge exactly; the Double sums
/// merge up to the rounding of adding partial sums in another order (a few ulps).
public struct ChannelStatistics: Sendable, Equatable, Codable {
    public private(set) var sums: [Double]
    public private(set) var absoluteSums: [Double]
    public private(set) var squaredSums: [Double]
    public private(set) var zeroCounts: [UInt64]
    public private(set) var valuesPerChannel: UInt64

    public init(channels: Int) {
        sums = [Double](repeating: 0, count: channels)
        absoluteSums = sums
        squaredSums = sums
        zeroCounts = [UInt64](repeating: 0, count: channels)
        valuesPerChannel = 0
    }

    /// Statistics from their parts (for example decoded from the wire); all per-channel arrays must agree in length.
    public init(sums: [Double], absoluteSums: [Double], squaredSums: [Double], zeroCounts: [UInt64],
                valuesPerChannel: UInt64) throws {
        guard absoluteSums.count == sums.count, squaredSums.count == sums.count, zeroCounts.count == sums.count else {
            throw CompressionError(.invalidStatistics, "channel statistics have per-channel arrays of different lengths")
        }
        guard (sums + absoluteSums + squaredSums).allSatisfy(\.isFinite) else {
            throw CompressionError(.invalidStatistics, "channel statistics contain a non-finite sum")
        }
        self.sums = sums
        self.absoluteSums = absoluteSums
        self.squaredSums = squaredSums
        self.zeroCounts = zeroCounts
        self.valuesPerChannel = valuesPerChannel
    }

    public var channels: Int { sums.count }

    /// Adds a batch laid out `[N, C, spatial…]` (`shape[1]` must equal `channels`).
    public mutating func add(_ values: [Float], shape: [Int]) throws {
        guard shape.count >= 2, shape[1] == channels else {
            throw CompressionError(.incompatibleStatistics, "a tensor of shape \(shape) does not have \(channels) channels")
        }
        let n = shape[0], inner = shape[2...].reduce(1, *)
        for b in 0..<n {
            for c in 0..<channels {
                let base = (b * channels + c) * inner
                var s = 0.0, a = 0.0, q = 0.0
                var zeros: UInt64 = 0
                for i in 0..<inner {
                    let v = values[base + i]
                    guard v.isFinite else {
                        throw CompressionError(.invalidStatistics, "a non-finite activation (\(v)) in channel \(c)")
                    }
                    let d = Double(v)
                    s += d
                    a += abs(d)
                    q += d * d
                    if v == 0 { zeros += 1 }
                }
                sums[c] += s
                absoluteSums[c] += a
                squaredSums[c] += q
                zeroCounts[c] += zeros
            }
        }
        valuesPerChannel += UInt64(n * inner)
    }

    public func merged(with other: ChannelStatistics) throws -> ChannelStatistics {
        guard channels == other.channels else {
            throw CompressionError(.incompatibleStatistics, "channel statistics for \(channels) and \(other.channels) channels cannot be merged")
        }
        var out = self
        for c in 0..<channels {
            out.sums[c] += other.sums[c]
            out.absoluteSums[c] += other.absoluteSums[c]
            out.squaredSums[c] += other.squaredSums[c]
            out.zeroCounts[c] = try checkedSum(zeroCounts[c], other.zeroCounts[c])
        }
        out.valuesPerChannel = try checkedSum(valuesPerChannel, other.valuesPerChannel)
        return out
    }

    /// Mean |a| per channel (activation importance).
    public var meanMagnitude: [Double] { absoluteSums.map { valuesPerChannel == 0 ? 0 : $0 / Double(valuesPerChannel) } }
    /// Average percentage of zeros per channel (APoZ), as a fraction.
    public var zeroFraction: [Double] { zeroCounts.map { valuesPerChannel == 0 ? 0 : Double($0) / Double(valuesPerChannel) } }
}

/// `a + b`, or an `invalidStatistics` error when the sum overflows: merged counts come from other machines, and a
/// forged count must be refused, never trap.
func checkedSum<T: FixedWidthInteger>(_ a: T, _ b: T) throws -> T {
    let (sum, overflow) = a.addingReportingOverflow(b)
    guard !overflow else { throw CompressionError(.invalidStatistics, "merged counts overflow (\(a) + \(b)); the statistics are not plausible") }
    return sum
}
