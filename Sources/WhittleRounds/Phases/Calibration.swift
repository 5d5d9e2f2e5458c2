import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Workers: per-tensor min, max and count of the activations the export quantizes. Closing it fixes the histogram
/// edges the next pass bins over, or calibrates at once when the method needs no histograms.
///
/// Under a public range (`--calibration-range R`) workers send a signed histogram over [−R, R] per tensor instead
/// (a sum, so it can be summed securely), and each range is the outermost non-empty bins' edges.
struct RangesPhase: PhaseHandler {
    var kind: PhaseKind { .ranges }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        var e = PhaseExpectation(kind: kind)
        e.tensors = try QDQExport.calibrationTensors(model, policy: engine.plan.quantizationPolicy)
        if let range = engine.plan.calibrationRange {
            e.histogramUpper = Dictionary(uniqueKeysWithValues: e.tensors.map { ($0, Float(range)) })
            e.histogramBins = engine.plan.quantizationPolicy.histogramBins
        }
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate {
        expectation.histogramUpper.isEmpty ? RangeAggregate() : HistogramAggregate()
    }

    func close(_ closing: inout PhaseClosing) throws {
        let acc = try closing.gathered()
        let ranges = closing.plan.calibrationRange == nil ? acc.ranges : acc.histograms.mapValues(Self.range(ofSigned:))
        closing.progress.rangeStatistics = ranges
        closing.progress.histogramUpper = ranges.mapValues(\.absMax)
        if !closing.plan.calibration.needsHistograms {
            try closing.engine.calibrate(ranges: ranges, histograms: [:], samples: acc.samples, progress: &closing.progress)
        }
    }

    /// The range a signed histogram shows: from the lower edge of its first non-empty bin to the upper edge of its
    /// last (so it holds every value counted, and each end is within one bin of the exact one; values beyond the
    /// histogram's edges were counted in its end bins).
    static func range(ofSigned h: Histogram) -> RangeStatistics {
        guard let first = h.counts.firstIndex(where: { $0 > 0 }), let last = h.counts.lastIndex(where: { $0 > 0 }) else {
            return RangeStatistics()
        }
        let edges = h.edges
        return RangeStatistics(min: Float(edges[first]), max: Float(edges[last + 1]), count: Int(clamping: h.total))
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        let collector = CalibrationCollector(session: try InferenceSession(model: job.model), tensors: Set(job.task.tensors))
        var report = Whittle_TaskReport()
        if job.task.histogramUpper.isEmpty {
            for (batch, _) in job.data.batches(job.batchSize) { try collector.collectRanges(batch) }
            report.calibration = Whittle_CalibrationReport(collector)
        } else {
            try collector.beginHistograms(upperBounds: job.task.histogramUpper, binCount: Int(job.task.histogramBins), signed: true)
            for (batch, _) in job.data.batches(job.batchSize) { try collector.collectHistograms(batch) }
            var calibration = Whittle_CalibrationReport()
            calibration.histograms = collector.histograms.mapValues(Whittle_Histogram.init)
            calibration.samples = UInt64(job.data.count)
            report.calibration = calibration
        }
        return report
    }
}

/// Workers: |x| histograms over the edges the coordinator derived from the merged ranges; closing it runs the
/// histogram calibrators (percentile, entropy, MSE) on the merged histograms.
struct HistogramsPhase: PhaseHandler {
    var kind: PhaseKind { .histograms }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        var e = PhaseExpectation(kind: kind)
        e.histogramUpper = progress.histogramUpper ?? [:]
        e.histogramBins = engine.plan.quantizationPolicy.histogramBins
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { HistogramAggregate() }

    func close(_ closing: inout PhaseClosing) throws {
        let acc = try closing.gathered()
        try closing.engine.calibrate(ranges: closing.progress.rangeStatistics ?? [:], histograms: acc.histograms, samples: acc.samples,
                                     progress: &closing.progress)
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        let collector = CalibrationCollector(session: try InferenceSession(model: job.model), tensors: Set(job.task.histogramUpper.keys))
        try collector.beginHistograms(upperBounds: job.task.histogramUpper, binCount: Int(job.task.histogramBins))
        for (batch, _) in job.data.batches(job.batchSize) { try collector.collectHistograms(batch) }
        var calibration = Whittle_CalibrationReport()
        calibration.histograms = collector.histograms.mapValues(Whittle_Histogram.init)
        calibration.samples = UInt64(job.data.count)
        var report = Whittle_TaskReport()
        report.calibration = calibration
        return report
    }
}

/// Merged per-tensor ranges over exactly the tensors the phase asked for.
struct RangeAggregate: PhaseAggregate {
    var ranges: [String: RangeStatistics] = [:]

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .calibration(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        let n = try PhaseAccumulator.checkSamples(message.samples, maximumSamples)
        guard message.histograms.isEmpty, Set(message.ranges.keys) == e.tensors else {
            throw PhaseAccumulator.refuse("the report covers tensors \(message.ranges.keys.sorted().prefix(4))…; the phase expects \(e.tensors.count) given tensors")
        }
        var next = ranges
        for (name, r) in message.ranges {
            let decoded = try r.decoded()
            guard decoded.count > 0 else { throw PhaseAccumulator.refuse("the range of '\(name)' covers no values") }
            next[name] = try (next[name] ?? RangeStatistics()).merged(with: decoded)
        }
        ranges = next
        return n
    }
}

/// Merged histograms over exactly the edges the phase broadcast: |x| over [0, upper], or in the range pass under a
/// public range, x over [−upper, upper].
struct HistogramAggregate: PhaseAggregate {
    var histograms: [String: Histogram] = [:]

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .calibration(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        let n = try PhaseAccumulator.checkSamples(message.samples, maximumSamples)
        guard message.ranges.isEmpty, Set(message.histograms.keys) == Set(e.histogramUpper.keys) else {
            throw PhaseAccumulator.refuse("the report's histograms cover other tensors than the phase's")
        }
        var next = histograms
        for (name, h) in message.histograms {
            let decoded = try h.decoded()
            _ = try decoded.checkedTotal()
            let signed = e.kind == .ranges, upper = e.histogramUpper[name]!, lower = signed ? -upper : 0
            guard decoded.isOverPhaseEdges(upper: upper, bins: e.histogramBins, signed: signed) else {
                throw PhaseAccumulator.refuse("the histogram of '\(name)' has edges [\(decoded.lower), \(decoded.upper)] × \(decoded.binCount)\(decoded.magnitudes ? " of |x|" : ""); the phase broadcast [\(lower), \(upper)] × \(e.histogramBins)\(signed ? "" : " of |x|")")
            }
            next[name] = try next[name].map { try $0.merged(with: decoded) } ?? decoded
        }
        histograms = next
        return n
    }
}

extension Histogram {
    /// Whether this is a histogram over a phase's edges: |x| over [0, `upper`] in `bins` bins, or (`signed`, the range
    /// pass under a public range) x over [−upper, upper].
    func isOverPhaseEdges(upper: Float, bins: Int, signed: Bool = false) -> Bool {
        lower == (signed ? -upper : 0) && self.upper == upper && binCount == bins && magnitudes == !signed
    }
}
