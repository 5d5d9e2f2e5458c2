import WhittleCompression
import WhittlePrivacy
import WhittleProtocol
import WhittleTensor

/// The additive content of one phase's reports laid out as one vector of the secure-aggregation ring (integers
/// modulo 2⁶⁴), and the ring sum of such vectors turned back into one report that the phase's aggregate folds like
/// any other (issue 20). Public: the layout follows from the phase's expectation and the plan's bounds alone, so
/// every worker and the coordinator derive the same one, and nothing in it depends on a worker's data.
public struct SecureLayout: Sendable, Equatable {
    public struct Segment: Sendable, Equatable {
        public var name: String
        public var count: Int
        public var code: FixedPoint
    }

    public enum Content: Sendable, Equatable {
        /// Training updates: per parameter Σ n·Δ (Δ clipped to `clipNorm` on the worker), then Σ n and Σ n·loss. With
        /// `noise` (differential privacy), unweighted: Σ of each worker's rounded, noised Δ / granularity, then the
        /// number of workers, and no loss (0).
        case update(shapes: [String: [Int]], clipNorm: Double, noise: NoiseParameters?)
        /// Histograms over the phase's edges: per tensor the bin counts, then the samples. |x| over [0, upper], or
        /// (`signed`, the range pass under a public range) x over [−upper, upper].
        case histograms(upper: [String: Float], bins: Int, signed: Bool)
        /// Per-channel statistics (activation and APoZ importance, batch-norm statistics): per tensor the sums, sums
        /// of absolute values and of squares, the zero counts and the values per channel; then the samples.
        case channels([String: Int])
        /// Taylor importance: per parameter the gradient sums; then the samples.
        case gradients([String: [Int]])
        /// The Fisher phase: per parameter the sums of squared gradients; then the samples.
        case fisher([String: [Int]])
    }

    /// Public bounds on one report's sums of statistics that have no natural bound: a value beyond is refused on the
    /// worker (the round fails saying which), never wrapped. Generous: activation sums over 10⁷ values of magnitude
    /// 10⁵, gradient sums of 10⁷, Fisher sums of 4·10⁹.
    public static let channelSumBound = 0x1p50
    public static let gradientSumBound = 0x1p24
    public static let fisherSumBound = 0x1p32

    public let content: Content
    public let segments: [Segment]
    public var length: Int { segments.reduce(0) { $0 + $1.count } }

    /// The largest loss a report's mean may carry into the sum (a loss beyond it is clipped: it is a figure for
    /// people, not an input of the model).
    public static let lossBound = 1e6

    /// Training updates of `shapes`, each clipped to `clipNorm`, from at most `summands` workers with at most
    /// `maximumSamples` samples each.
    public static func update(shapes: [String: [Int]], clipNorm: Double, maximumSamples: Int, summands: Int,
                              noise: NoiseParameters? = nil) throws -> SecureLayout {
        guard clipNorm.isFinite, clipNorm > 0 else {
            throw CompressionError(.invalidArgument, "secure aggregation of training updates needs a positive, finite clip norm (the ring's scale follows from it)")
        }
        let samples = Double(max(maximumSamples, 1))
        let deltas: FixedPoint
        if let noise {
            // Integers (the rounded, noised steps): exact in the ring as long as the summands' bounds fit.
            let bound = DifferentialPrivacy.coordinateBound(noise)
            guard noise.granularity > 0, noise.sigma > 0, Double(summands) * bound < 0x1p62 else {
                throw CompressionError(.invalidArgument, "\(summands) noisy updates of coordinates up to \(bound) steps do not fit the 64-bit ring")
            }
            deltas = FixedPoint(fractionBits: 0, bound: bound)
        } else {
            deltas = try Self.wrap { try FixedPoint(bound: clipNorm * samples, summands: summands) }
        }
        var segments = shapes.keys.sorted().map { Segment(name: $0, count: shapes[$0]!.reduce(1, *), code: deltas) }
        segments.append(Segment(name: "samples", count: 1, code: .counts(bound: noise == nil ? samples : 1)))
        segments.append(Segment(name: "loss", count: 1, code: try Self.wrap { try FixedPoint(bound: lossBound * samples, summands: summands) }))
        return SecureLayout(content: .update(shapes: shapes, clipNorm: clipNorm, noise: noise), segments: segments)
    }

    /// Histograms of `bins` bins per tensor, |x| over [0, upper] (or `signed`, x over [−upper, upper]), from reports
    /// of at most `maximumSamples` samples with at most `maximumValues` values binned per tensor.
    public static func histograms(upper: [String: Float], bins: Int, signed: Bool = false, maximumSamples: Int,
                                  maximumValues: Int) -> SecureLayout {
        var segments = upper.keys.sorted().map { Segment(name: $0, count: bins, code: .counts(bound: Double(maximumValues))) }
        segments.append(Segment(name: "samples", count: 1, code: .counts(bound: Double(max(maximumSamples, 1)))))
        return SecureLayout(content: .histograms(upper: upper, bins: bins, signed: signed), segments: segments)
    }

    /// Per-channel statistics of `channels` (tensor → channel count), from reports of at most `maximumSamples`
    /// samples and `maximumValues` values per channel.
    public static func channels(_ channels: [String: Int], maximumSamples: Int, maximumValues: Int, summands: Int) throws -> SecureLayout {
        let real = try Self.wrap { try FixedPoint(bound: channelSumBound, summands: summands) }
        let count = FixedPoint.counts(bound: Double(max(maximumValues, 1)))
        var segments: [Segment] = []
        for name in channels.keys.sorted() {
            let c = channels[name]!
            segments += [Segment(name: name + "/sums", count: c, code: real), Segment(name: name + "/absolute", count: c, code: real),
                         Segment(name: name + "/squares", count: c, code: real), Segment(name: name + "/zeros", count: c, code: count),
                         Segment(name: name + "/values", count: 1, code: count)]
        }
        segments.append(Segment(name: "samples", count: 1, code: .counts(bound: Double(max(maximumSamples, 1)))))
        return SecureLayout(content: .channels(channels), segments: segments)
    }

    /// Per-parameter sums of `shapes` (Taylor's gradient sums, or the Fisher's squared-gradient sums).
    public static func parameterSums(_ shapes: [String: [Int]], fisher: Bool, maximumSamples: Int, summands: Int) throws -> SecureLayout {
        let real = try Self.wrap { try FixedPoint(bound: fisher ? fisherSumBound : gradientSumBound, summands: summands) }
        var segments = shapes.keys.sorted().map { Segment(name: $0, count: shapes[$0]!.reduce(1, *), code: real) }
        segments.append(Segment(name: "samples", count: 1, code: .counts(bound: Double(max(maximumSamples, 1)))))
        return SecureLayout(content: fisher ? .fisher(shapes) : .gradients(shapes), segments: segments)
    }

    /// Encodes a real statistic, refusing one beyond its segment's public bound with the statistic's name.
    func real(_ value: Double, _ s: Segment) throws -> UInt64 {
        guard value.isFinite, abs(value) <= s.code.bound else {
            throw CompressionError(.invalidStatistics, "the statistic '\(s.name)' (\(value)) is beyond the public bound of secure aggregation (±\(s.code.bound))")
        }
        return try Self.wrap { try s.code.encode(value) }
    }

    static func wrap<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let error as PrivacyError { throw CompressionError(.invalidArgument, error.message) }
    }

    /// A worker's report as its ring vector (what it then masks).
    public func encode(_ report: Whittle_TaskReport) throws -> [UInt64] {
        var random = SystemRandomNumberGenerator()
        return try encode(report, using: &random)
    }

    /// As above; `random` rounds and noises a differentially private update.
    public func encode<R: RandomNumberGenerator>(_ report: Whittle_TaskReport, using random: inout R) throws -> [UInt64] {
        var out: [UInt64] = []
        out.reserveCapacity(length)
        switch (content, report.result) {
        case (.update(_, let clipNorm, let noise?), .update(let message)?):
            guard message.compressedDeltas.isEmpty, message.samples >= 1 else {
                throw CompressionError(.invalidArgument, "a private update needs float deltas and at least one sample")
            }
            let update = clipped(ModelUpdate(deltas: try message.deltas.mapValues { try $0.decoded() }, samples: Int(message.samples)), to: clipNorm)
            guard update.deltas.count == segments.count - 2 else {
                throw CompressionError(.invalidArgument, "the update carries parameters the round does not train")
            }
            var values: [Double] = []
            values.reserveCapacity(length)
            for s in segments.dropLast(2) {
                guard let t = update.deltas[s.name], t.count == s.count else {
                    throw CompressionError(.invalidArgument, "the update lacks parameter '\(s.name)' or has another shape")
                }
                values += t.floats.map(Double.init)
            }
            out = try DifferentialPrivacy.noisy(values, noise, using: &random).map { UInt64(bitPattern: $0) }
            out += [1, 0]  // one worker; no loss leaves a private round
        case (.update(_, let clipNorm, nil), .update(let message)?):
            guard message.compressedDeltas.isEmpty else {
                throw CompressionError(.invalidArgument, "int8-compressed deltas cannot be summed securely; send float deltas")
            }
            let deltas = try message.deltas.mapValues { try $0.decoded() }
            let n = Double(message.samples)
            guard message.samples >= 1, n <= segments[segments.count - 2].code.bound, message.loss.isFinite else {
                throw CompressionError(.invalidArgument, "the update claims \(message.samples) samples (1 to \(Int(segments[segments.count - 2].code.bound))) or a non-finite loss")
            }
            let update = clipped(ModelUpdate(deltas: deltas, samples: Int(message.samples)), to: clipNorm)
            for s in segments.dropLast(2) {
                guard let t = update.deltas[s.name], t.count == s.count else {
                    throw CompressionError(.invalidArgument, "the update lacks parameter '\(s.name)' or has another shape")
                }
                // |n·δ| ≤ n·‖Δ‖ ≤ n·clipNorm, the segment's bound (up to the rounding of the clipped floats).
                for v in t.floats { out.append(try Self.wrap { try s.code.encode(max(-s.code.bound, min(s.code.bound, n * Double(v)))) }) }
            }
            guard update.deltas.count == segments.count - 2 else {
                throw CompressionError(.invalidArgument, "the update carries parameters the round does not train")
            }
            out.append(try Self.wrap { try segments[segments.count - 2].code.encode(count: message.samples) })
            out.append(try Self.wrap { try segments[segments.count - 1].code.encode(n * min(message.loss, Self.lossBound)) })
        case (.histograms(let upper, let bins, let signed), .calibration(let message)?):
            guard message.ranges.isEmpty, Set(message.histograms.keys) == Set(upper.keys) else {
                throw CompressionError(.invalidArgument, "the report's histograms cover other tensors than the phase's")
            }
            for s in segments.dropLast() {
                let h = try message.histograms[s.name]!.decoded()
                guard h.isOverPhaseEdges(upper: upper[s.name]!, bins: bins, signed: signed) else {
                    throw CompressionError(.invalidArgument, "the histogram of '\(s.name)' is not over the phase's edges")
                }
                for c in h.counts { out.append(try Self.wrap { try s.code.encode(count: c) }) }
            }
            out.append(try Self.wrap { try segments[segments.count - 1].code.encode(count: message.samples) })
        case (.channels(let channels), .importance(let message)?):
            guard message.gradientSums.isEmpty, Set(message.channels.keys) == Set(channels.keys) else {
                throw CompressionError(.invalidArgument, "the report's channel statistics cover other tensors than the phase's")
            }
            var k = 0
            for name in channels.keys.sorted() {
                let c = try message.channels[name]!.decoded()
                guard c.sums.count == channels[name]! else {
                    throw CompressionError(.invalidArgument, "the statistics of '\(name)' have \(c.sums.count) channels, the phase \(channels[name]!)")
                }
                for v in c.sums { out.append(try real(v, segments[k])) }
                for v in c.absoluteSums { out.append(try real(v, segments[k + 1])) }
                for v in c.squaredSums { out.append(try real(v, segments[k + 2])) }
                for z in c.zeroCounts { out.append(try Self.wrap { try segments[k + 3].code.encode(count: z) }) }
                out.append(try Self.wrap { try segments[k + 4].code.encode(count: c.valuesPerChannel) })
                k += 5
            }
            out.append(try Self.wrap { try segments[k].code.encode(count: message.samples) })
        case (.gradients, .importance(let message)?):
            guard message.channels.isEmpty else { throw CompressionError(.invalidArgument, "a Taylor report carries channel statistics") }
            out = try parameterSums(message.gradientSums, samples: message.samples)
        case (.fisher, .fisher(let message)?):
            out = try parameterSums(message.sums, samples: message.samples)
        default:
            throw CompressionError(.invalidArgument, "the report is not of the kind this secure layout sums")
        }
        return out
    }

    /// Per-parameter sums in the layout's order, then the samples.
    func parameterSums(_ sums: [String: Whittle_FloatTensor], samples: UInt64) throws -> [UInt64] {
        guard Set(sums.keys) == Set(segments.dropLast().map(\.name)) else {
            throw CompressionError(.invalidArgument, "the report's sums cover other parameters than the phase's")
        }
        var out: [UInt64] = []
        out.reserveCapacity(length)
        for s in segments.dropLast() {
            let t = try sums[s.name]!.decoded()
            guard t.count == s.count else { throw CompressionError(.invalidArgument, "the sums of '\(s.name)' have another shape") }
            for v in t.floats { out.append(try real(Double(v), s)) }
        }
        out.append(try Self.wrap { try segments[segments.count - 1].code.encode(count: samples) })
        return out
    }

    /// The ring sum of `contributors` workers' vectors as one report: for updates the sample-weighted mean delta
    /// with the summed samples (folding it into FedAvg gives Σ n·Δ / Σ n, as folding each report would), for
    /// histograms the summed counts.
    public func decode(_ sum: [UInt64]) throws -> Whittle_TaskReport {
        guard sum.count == length else { throw CompressionError(.invalidArgument, "a secure sum of \(sum.count) words; the layout has \(length)") }
        var report = Whittle_TaskReport()
        var offset = 0
        func take(_ s: Segment) -> ArraySlice<UInt64> {
            defer { offset += s.count }
            return sum[offset..<(offset + s.count)]
        }
        switch content {
        case .update(let shapes, _, let noise):
            let samples = try Self.wrap { try segments[segments.count - 2].code.decode(count: sum[length - 2]) }
            guard samples >= 1 else { throw CompressionError(.invalidStatistics, "the secure sum counts no samples") }
            let n = Double(samples)
            // A private sum is in rounding steps, one per worker: the mean of the workers' noised updates.
            let step = noise?.granularity ?? 1
            var message = Whittle_WeightUpdate()
            for s in segments.dropLast(2) {
                let values = take(s).map { Float(s.code.decode($0) * step / n) }
                message.deltas[s.name] = Whittle_FloatTensor(Tensor(shape: shapes[s.name]!, floats: values))
            }
            message.samples = samples
            message.loss = segments[segments.count - 1].code.decode(sum[length - 1]) / n
            report.update = message
        case .histograms(let upper, let bins, let signed):
            var calibration = Whittle_CalibrationReport()
            for s in segments.dropLast() {
                let counts = try take(s).map { word in try Self.wrap { try s.code.decode(count: word) } }
                guard counts.count == bins else { throw CompressionError(.invalidStatistics, "a histogram of \(counts.count) bins") }
                let u = upper[s.name]!
                calibration.histograms[s.name] = Whittle_Histogram(try Histogram(lower: signed ? -u : 0, upper: u, counts: counts, magnitudes: !signed))
            }
            calibration.samples = try Self.wrap { try segments[segments.count - 1].code.decode(count: sum[length - 1]) }
            report.calibration = calibration
        case .channels(let channels):
            var message = Whittle_ImportanceReport()
            var k = 0
            for name in channels.keys.sorted() {
                let sums = take(segments[k]).map { segments[k].code.decode($0) }
                let absolute = take(segments[k + 1]).map { segments[k + 1].code.decode($0) }
                let squares = take(segments[k + 2]).map { segments[k + 2].code.decode($0) }
                let zeros = try take(segments[k + 3]).map { w in try Self.wrap { try segments[k + 3].code.decode(count: w) } }
                let values = try Self.wrap { try segments[k + 4].code.decode(count: take(segments[k + 4]).first!) }
                message.channels[name] = Whittle_ChannelStatistics(try ChannelStatistics(
                    sums: sums, absoluteSums: absolute, squaredSums: squares, zeroCounts: zeros, valuesPerChannel: values))
                k += 5
            }
            message.samples = try Self.wrap { try segments[k].code.decode(count: sum[length - 1]) }
            report.importance = message
        case .gradients(let shapes), .fisher(let shapes):
            var sums: [String: Whittle_FloatTensor] = [:]
            for s in segments.dropLast() {
                sums[s.name] = Whittle_FloatTensor(Tensor(shape: shapes[s.name]!, floats: take(s).map { Float(s.code.decode($0)) }))
            }
            let samples = try Self.wrap { try segments[segments.count - 1].code.decode(count: sum[length - 1]) }
            if case .fisher = content {
                var message = Whittle_FisherReport()
                // Rounding may leave a sum of squares a hair below zero.
                message.sums = sums.mapValues { t in var c = t; c.values = t.values.map { max($0, 0) }; return c }
                message.samples = samples
                report.fisher = message
            } else {
                var message = Whittle_ImportanceReport()
                message.gradientSums = sums
                message.samples = samples
                report.importance = message
            }
        }
        return report
    }
}
