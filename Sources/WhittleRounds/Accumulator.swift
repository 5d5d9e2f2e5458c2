import Foundation
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// What a phase accepts: derived from the phase's model and task, so a report of the wrong shape, with the wrong
/// tensors or the wrong edges is refused before anything is counted.
public struct PhaseExpectation: Sendable {
    public var kind: PhaseKind
    /// importance (activation, APoZ): channels per statistics tensor.
    public var channels: [String: Int] = [:]
    /// importance (Taylor), fisher, finetune: the parameter shapes.
    public var shapes: [String: [Int]] = [:]
    /// importance: the criterion.
    public var criterion: ImportanceCriterion = .l1
    /// ranges: the tensors observed; histograms: the edges.
    public var tensors: Set<String> = []
    public var histogramUpper: [String: Float] = [:]
    public var histogramBins = Histogram.defaultBinCount
    /// distribute: the final artifact.
    public var artifact = ""

    public init(kind: PhaseKind) {
        self.kind = kind
    }
}

/// One phase's aggregate, folded report by report as they are accepted (streaming: memory grows with the model,
/// not with the number of workers, except for the robust aggregators, which need every update at once). `add`
/// validates first and changes nothing when it refuses.
public struct PhaseAccumulator: Sendable {
    public let expectation: PhaseExpectation
    public let aggregation: AggregationMethod
    public let clipNorm: Double?
    public let trimFraction: Double
    public private(set) var importance = ImportanceStatistics()
    var fedavg: FedAvgAccumulator
    var updates: [ModelUpdate] = []
    var fisherSums: [String: [Double]] = [:]
    public private(set) var ranges: [String: RangeStatistics] = [:]
    public private(set) var histograms: [String: Histogram] = [:]
    public private(set) var evaluations: [String: Whittle_EvaluationReport] = [:]
    public private(set) var losses: [Double] = []
    /// The L2 norm of each accepted training update, before clipping.
    public private(set) var updateNorms: [Double] = []
    public private(set) var workers: Set<String> = []
    public private(set) var samples = 0

    public init(expectation: PhaseExpectation, aggregation: AggregationMethod = .fedavg, clipNorm: Double? = nil,
                trimFraction: Double = 0.2) {
        self.expectation = expectation
        self.aggregation = aggregation
        self.clipNorm = clipNorm
        self.trimFraction = trimFraction
        fedavg = FedAvgAccumulator(validator: UpdateValidator(shapes: expectation.kind.trains ? expectation.shapes : [:]),
                                   clipNorm: clipNorm)
    }

    public var reports: Int { workers.count }

    func refuse(_ message: String) -> AggregationError { AggregationError(.invalidUpdate, message) }

    /// The most samples one report may claim, whatever the worker declared: sums over any plausible fleet stay far
    /// from overflowing.
    public static let maximumReportSamples: UInt64 = 1 << 40

    func checkSamples(_ n: UInt64, _ maximum: Int) throws -> Int {
        guard n <= Self.maximumReportSamples else {
            throw refuse("the report claims \(n) samples, more than any report may (\(Self.maximumReportSamples)); this worker declared \(maximum)")
        }
        guard n >= 1, n <= UInt64(max(maximum, 0)) else {
            throw refuse("the report claims \(n) samples; this worker declared \(maximum)")
        }
        return Int(n)
    }

    /// Validates and folds in one worker's report. Throws (and changes nothing) for a report of another kind, with
    /// non-finite values, wrong shapes or tensors, other histogram edges, impossible counts, or a second report
    /// from the same worker.
    public mutating func add(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int) throws {
        guard !workers.contains(worker) else { throw refuse("worker '\(worker)' already reported for this phase") }
        do {
            try fold(report, worker: worker, maximumSamples: maximumSamples)
        } catch let error as CompressionError {
            throw refuse(error.message)
        }
        workers.insert(worker)
    }

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int) throws {
        let e = expectation
        switch (e.kind, report.result) {
        case (.importance, .importance(let message)), (.normalization, .importance(let message)):
            var s = ImportanceStatistics()
            s.channels = try message.channels.mapValues { try $0.decoded() }
            s.gradientSums = try message.gradientSums.mapValues { try $0.decoded() }
            s.samples = try checkSamples(message.samples, maximumSamples)
            if e.kind == .importance, e.criterion == .taylor {
                guard !s.gradientSums.isEmpty else { throw refuse("a Taylor importance report needs gradient sums") }
                for (name, g) in s.gradientSums where e.shapes[name] != g.shape {
                    throw refuse("gradient sums for '\(name)' have shape \(g.shape); the model's parameter is \(e.shapes[name].map { "\($0)" } ?? "unknown")")
                }
            } else {
                guard Set(s.channels.keys) == Set(e.channels.keys) else {
                    throw refuse("the report covers tensors \(s.channels.keys.sorted()); the phase expects \(e.channels.keys.sorted())")
                }
                for (name, c) in s.channels {
                    guard c.channels == e.channels[name]!, c.valuesPerChannel > 0, c.zeroCounts.allSatisfy({ $0 <= c.valuesPerChannel }) else {
                        throw refuse("channel statistics of '\(name)' are out of range (\(c.channels) channels, \(c.valuesPerChannel) values each)")
                    }
                }
            }
            importance = try importance.merged(with: s)
            samples += s.samples
        case (.finetune, .update(let message)), (.qat, .update(let message)):
            var deltas = try message.deltas.mapValues { try $0.decoded() }
            for (name, q) in message.compressedDeltas {
                guard deltas[name] == nil else { throw refuse("parameter '\(name)' is sent both as float and as int8") }
                let shape = q.shape.map { Int($0) }
                // The shape is checked against the model's before anything multiplies its dimensions.
                guard e.shapes.isEmpty || e.shapes[name] == shape else {
                    throw refuse("the int8 delta of '\(name)' has shape \(q.shape); the model's parameter is \(e.shapes[name].map { "\($0)" } ?? "unknown")")
                }
                guard TensorLimits.elementCount(shape) == q.values.count, q.scale.isFinite, q.scale > 0 else {
                    throw refuse("the int8 delta of '\(name)' is malformed (shape \(q.shape), \(q.values.count) values, scale \(q.scale))")
                }
                deltas[name] = Tensor(shape: shape, floats: q.values.map { Float(Int8(bitPattern: $0)) * q.scale })
            }
            let update = ModelUpdate(deltas: deltas, samples: try checkSamples(message.samples, maximumSamples))
            guard message.loss.isFinite else { throw refuse("the reported loss is not finite") }
            switch aggregation {
            case .fedavg:
                try fedavg.add(update)
            case .trimmedMean, .median:
                try UpdateValidator(shapes: e.shapes).validate(update)
                updates.append(update)
            }
            losses.append(message.loss)
            updateNorms.append(update.norm)
            samples += update.samples
        case (.fisher, .fisher(let message)):
            let n = try checkSamples(message.samples, maximumSamples)
            var next = fisherSums
            for (name, t) in message.sums {
                let tensor = try t.decoded()
                guard e.shapes[name] == tensor.shape else { throw refuse("Fisher sums for '\(name)' have shape \(tensor.shape)") }
                guard tensor.floats.allSatisfy({ $0 >= 0 }) else { throw refuse("Fisher sums for '\(name)' are negative") }
                var s = next[name] ?? [Double](repeating: 0, count: tensor.count)
                for i in s.indices { s[i] += Double(tensor.floats[i]) }
                next[name] = s
            }
            fisherSums = next
            samples += n
        case (.ranges, .calibration(let message)):
            let n = try checkSamples(message.samples, maximumSamples)
            guard message.histograms.isEmpty, Set(message.ranges.keys) == e.tensors else {
                throw refuse("the report covers tensors \(message.ranges.keys.sorted().prefix(4))…; the phase expects \(e.tensors.count) given tensors")
            }
            var next = ranges
            for (name, r) in message.ranges {
                let decoded = try r.decoded()
                guard decoded.count > 0 else { throw refuse("the range of '\(name)' covers no values") }
                next[name] = try (next[name] ?? RangeStatistics()).merged(with: decoded)
            }
            ranges = next
            samples += n
        case (.histograms, .calibration(let message)):
            let n = try checkSamples(message.samples, maximumSamples)
            guard message.ranges.isEmpty, Set(message.histograms.keys) == Set(e.histogramUpper.keys) else {
                throw refuse("the report's histograms cover other tensors than the phase's")
            }
            var next = histograms
            for (name, h) in message.histograms {
                let decoded = try h.decoded()
                _ = try decoded.checkedTotal()
                guard decoded.lower == 0, decoded.upper == e.histogramUpper[name]!, decoded.binCount == e.histogramBins, decoded.magnitudes else {
                    throw refuse("the histogram of '\(name)' has edges [\(decoded.lower), \(decoded.upper)] × \(decoded.binCount); the phase broadcast [0, \(e.histogramUpper[name]!)] × \(e.histogramBins)")
                }
                next[name] = try next[name].map { try $0.merged(with: decoded) } ?? decoded
            }
            histograms = next
            samples += n
        case (.evaluate, .evaluation(let message)):
            let n = try checkSamples(message.samples, maximumSamples)
            do {
                _ = try message.decoded()
                _ = try message.decodedLatency()
            } catch let error as CompressionError {
                throw refuse(error.message)
            }
            guard message.baseLatencyMs.isFinite, message.baseLatencyMs >= 0,
                message.compressedLatencyMs.isFinite, message.compressedLatencyMs >= 0 else {
                throw refuse("the evaluation's latencies are out of range")
            }
            evaluations[worker] = message
            samples += n
        case (.distribute, .distribution(let message)):
            guard message.sha256 == e.artifact else {
                throw refuse("the worker reports artifact \(message.sha256.prefix(12))…; the round distributes \(e.artifact.prefix(12))…")
            }
        default:
            throw refuse("a \(e.kind.rawValue) phase takes \(e.kind.rawValue) reports; this one carries \(report.result.map { "\($0)".split(separator: "(").first.map(String.init) ?? "?" } ?? "nothing")")
        }
    }

    /// The median of `updateNorms` (the mean of the middle two for an even count); nil when there is none.
    public var medianUpdateNorm: Double? {
        guard !updateNorms.isEmpty else { return nil }
        let sorted = updateNorms.sorted(), m = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[m] : (sorted[m - 1] + sorted[m]) / 2
    }

    /// The phase's aggregated weight delta (fine-tuning).
    public func delta() throws -> [String: Tensor] {
        switch aggregation {
        case .fedavg: return try fedavg.result()
        case .median: return try RobustAggregation.median.aggregate(updates, validator: UpdateValidator(shapes: expectation.shapes), clipNorm: clipNorm)
        case .trimmedMean:
            return try RobustAggregation.trimmedMean(fraction: trimFraction).aggregate(
                updates, validator: UpdateValidator(shapes: expectation.shapes), clipNorm: clipNorm)
        }
    }

    /// The diagonal Fisher: mean squared gradient per parameter.
    public func fisher() throws -> [String: Tensor] {
        guard samples > 0 else { throw AggregationError(.empty, "no Fisher report was accepted") }
        var out: [String: Tensor] = [:]
        for (name, s) in fisherSums { out[name] = Tensor(shape: expectation.shapes[name]!, floats: s.map { Float($0 / Double(samples)) }) }
        return out
    }
}
