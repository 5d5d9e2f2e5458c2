import Foundation
import SwiftProtobuf
import WhittleCompression
import WhittleNN
import WhittleProtocol
import WhittleTensor

/// Wire encodings of the mergeable statistics (proto/whittle.proto). Decoding validates: what a worker sends is
/// untrusted input, so non-finite or inconsistent statistics are refused, never merged.
extension Whittle_RangeStatistics {
    public init(_ r: RangeStatistics) {
        self.init()
        min = r.min
        max = r.max
        count = UInt64(r.count)
    }

    public func decoded() throws -> RangeStatistics {
        guard count == 0 || (min.isFinite && max.isFinite && min <= max) else {
            throw CompressionError(.invalidStatistics, "range statistics [\(min), \(max)] over \(count) values are not a finite interval")
        }
        guard count <= UInt64(Int.max) else { throw CompressionError(.invalidStatistics, "range statistics count overflows") }
        return count == 0 ? RangeStatistics() : RangeStatistics(min: min, max: max, count: Int(count))
    }
}

extension Whittle_Histogram {
    public init(_ h: Histogram) {
        self.init()
        lower = h.lower
        upper = h.upper
        counts = h.counts
        magnitudes = h.magnitudes
    }

    /// Refuses histograms with more than `maximumBins` bins (a guard against oversized uploads).
    public func decoded(maximumBins: Int = 1 << 16) throws -> Histogram {
        guard !counts.isEmpty, counts.count <= maximumBins else {
            throw CompressionError(.invalidStatistics, "a histogram with \(counts.count) bins is refused (1…\(maximumBins))")
        }
        return try Histogram(lower: lower, upper: upper, counts: counts, magnitudes: magnitudes)
    }
}

extension Whittle_ChannelStatistics {
    public init(_ c: ChannelStatistics) {
        self.init()
        sums = c.sums
        absoluteSums = c.absoluteSums
        squaredSums = c.squaredSums
        zeroCounts = c.zeroCounts
        valuesPerChannel = c.valuesPerChannel
    }

    public func decoded() throws -> ChannelStatistics {
        try ChannelStatistics(sums: sums, absoluteSums: absoluteSums, squaredSums: squaredSums, zeroCounts: zeroCounts,
                              valuesPerChannel: valuesPerChannel)
    }
}

extension Whittle_CalibrationReport {
    /// The report of a `CalibrationCollector`: its ranges, its histograms (when pass 2 ran) and its sample count.
    public init(_ collector: CalibrationCollector) {
        self.init()
        ranges = collector.ranges.mapValues(Whittle_RangeStatistics.init)
        histograms = collector.histograms.mapValues(Whittle_Histogram.init)
        samples = UInt64(collector.samples)
    }

    /// Parses and validates a serialized report.
    public static func decode(_ bytes: [UInt8]) throws -> (ranges: [String: RangeStatistics], histograms: [String: Histogram], samples: Int) {
        let report: Whittle_CalibrationReport
        do {
            report = try Whittle_CalibrationReport(serializedBytes: bytes)
        } catch {
            throw CompressionError(.invalidStatistics, "not a valid calibration report (protobuf decoding failed: \(error))")
        }
        return (try report.ranges.mapValues { try $0.decoded() }, try report.histograms.mapValues { try $0.decoded() },
                Int(clamping: report.samples))
    }
}

extension Whittle_FloatTensor {
    public init(_ t: Tensor) {
        self.init()
        shape = t.shape.map { Int64($0) }
        values = t.asFloats
    }

    /// Refuses negative dimensions, element counts that do not match, more than `maximumElements` values, and
    /// non-finite values.
    public func decoded(maximumElements: Int = 1 << 28) throws -> Tensor {
        guard shape.allSatisfy({ $0 >= 0 && $0 <= Int64(maximumElements) }) else {
            throw CompressionError(.invalidStatistics, "a tensor of shape \(shape) is refused")
        }
        let dims = shape.map { Int($0) }
        var count = 1
        for d in dims {
            let (product, overflow) = count.multipliedReportingOverflow(by: d)
            guard !overflow, product <= maximumElements else {
                throw CompressionError(.invalidStatistics, "a tensor of shape \(shape) is too large")
            }
            count = product
        }
        guard values.count == count else {
            throw CompressionError(.invalidStatistics, "a tensor of shape \(shape) carries \(values.count) values")
        }
        guard values.allSatisfy(\.isFinite) else {
            throw CompressionError(.invalidStatistics, "a tensor of shape \(shape) contains non-finite values")
        }
        return Tensor(shape: dims, floats: values)
    }
}

extension Whittle_ImportanceReport {
    public init(_ s: ImportanceStatistics) {
        self.init()
        channels = s.channels.mapValues(Whittle_ChannelStatistics.init)
        gradientSums = s.gradientSums.mapValues(Whittle_FloatTensor.init)
        samples = UInt64(s.samples)
    }

    /// Parses and validates a serialized report.
    public static func decode(_ bytes: [UInt8]) throws -> ImportanceStatistics {
        let report: Whittle_ImportanceReport
        do {
            report = try Whittle_ImportanceReport(serializedBytes: bytes)
        } catch {
            throw CompressionError(.invalidStatistics, "not a valid importance report (protobuf decoding failed: \(error))")
        }
        var out = ImportanceStatistics()
        out.channels = try report.channels.mapValues { try $0.decoded() }
        out.gradientSums = try report.gradientSums.mapValues { try $0.decoded() }
        out.samples = Int(clamping: report.samples)
        return out
    }
}

extension Whittle_LatencyFigures {
    public init(_ c: LatencyComparison) {
        self.init()
        batch = UInt32(clamping: c.batch)
        runs = UInt32(clamping: c.runs)
        baseP50Ms = c.base.p50Ms
        baseP90Ms = c.base.p90Ms
        compressedP50Ms = c.compressed.p50Ms
        compressedP90Ms = c.compressed.p90Ms
    }

    /// The figures, checked: a batch and runs, latencies finite, positive and each median at most its 90th
    /// percentile.
    public func decoded() throws -> LatencyComparison {
        let values = [baseP50Ms, baseP90Ms, compressedP50Ms, compressedP90Ms]
        guard batch >= 1, runs >= 1, values.allSatisfy({ $0.isFinite && $0 > 0 }),
              baseP50Ms <= baseP90Ms, compressedP50Ms <= compressedP90Ms else {
            throw CompressionError(.invalidStatistics, "latency figures are out of range (batch \(batch), \(runs) runs, \(values) ms)")
        }
        return LatencyComparison(batch: Int(batch), runs: Int(runs), base: LatencyPercentiles(p50Ms: baseP50Ms, p90Ms: baseP90Ms),
                                 compressed: LatencyPercentiles(p50Ms: compressedP50Ms, p90Ms: compressedP90Ms))
    }
}

extension Whittle_EvaluationReport {
    /// Latency entries a report may carry (batch 1 and the working batch, with room for more batch sizes).
    public static let maximumLatencyEntries = 8
    /// Longest instruction-set name kept.
    public static let maximumCPUNameLength = 64

    /// The latency figures, checked (see `Whittle_LatencyFigures.decoded`), at most `maximumLatencyEntries`, with
    /// distinct batch sizes.
    public func decodedLatency() throws -> [LatencyComparison] {
        guard latency.count <= Self.maximumLatencyEntries, Set(latency.map(\.batch)).count == latency.count else {
            throw CompressionError(.invalidStatistics, "evaluation report: \(latency.count) latency entries (at most \(Self.maximumLatencyEntries), one per batch size)")
        }
        guard cpu.utf8.count <= Self.maximumCPUNameLength, threads <= 1 << 16 else {
            throw CompressionError(.invalidStatistics, "evaluation report: the CPU name or thread count is out of range")
        }
        return try latency.map { try $0.decoded() }
    }

    /// The task's sums (latencies are set by the caller).
    public init(_ e: TaskEvaluation) {
        self.init()
        samples = UInt64(e.samples)
        taskKind = e.task.rawValue
        units = UInt64(e.units)
        agreement = UInt64(e.agreement)
        labels = e.labelled
        baseCorrect = UInt64(e.baseCorrect)
        compressedCorrect = UInt64(e.compressedCorrect)
        baseIntersection = e.baseIntersection.map { UInt64($0) }
        baseUnion = e.baseUnion.map { UInt64($0) }
        compressedIntersection = e.compressedIntersection.map { UInt64($0) }
        compressedUnion = e.compressedUnion.map { UInt64($0) }
        squaredError = e.squaredError
        squaredReference = e.squaredReference
        cosineSum = e.cosineSum
    }

    /// The sums, checked: counts within the units (samples, or for segmentation at most `maximumPixels` per
    /// sample), per-class counts consistent, sums finite and non-negative. A report from an older worker (no task)
    /// is classification counted in samples.
    public func decoded(maximumUnitsPerSample: UInt64 = 1 << 24) throws -> TaskEvaluation {
        func refuse(_ why: String) -> CompressionError { CompressionError(.invalidStatistics, "evaluation report: \(why)") }
        guard let task = taskKind.isEmpty ? .classification : TaskKind(rawValue: taskKind) else {
            throw refuse("unknown task '\(taskKind)'")
        }
        let units = taskKind.isEmpty ? samples : self.units
        let (most, overflow) = samples.multipliedReportingOverflow(by: maximumUnitsPerSample)
        guard samples <= UInt64(Int.max), units <= UInt64(Int.max), overflow || units <= most,
              task == .segmentation || units == samples else {
            throw refuse("\(units) units for \(samples) samples")
        }
        guard agreement <= units, baseCorrect <= units, compressedCorrect <= units,
              labels || (baseCorrect == 0 && compressedCorrect == 0) else {
            throw refuse("counts exceed the \(units) units compared")
        }
        let perClass = [baseIntersection, baseUnion, compressedIntersection, compressedUnion]
        guard perClass.allSatisfy({ $0.count == baseIntersection.count }), baseIntersection.count <= 1 << 16,
              baseIntersection.isEmpty || (task == .segmentation && labels),
              zip(baseIntersection, baseUnion).allSatisfy({ $0 <= $1 && $1 <= units }),
              zip(compressedIntersection, compressedUnion).allSatisfy({ $0 <= $1 && $1 <= units }) else {
            throw refuse("per-class intersections and unions are inconsistent")
        }
        guard squaredError.isFinite, squaredError >= 0, squaredReference.isFinite, squaredReference >= 0,
              cosineSum.isFinite, abs(cosineSum) <= Double(samples) * (1 + 1e-6) else {
            throw refuse("error sums are not finite or out of range")
        }
        var e = TaskEvaluation(task: task)
        e.samples = Int(samples)
        e.units = Int(units)
        e.agreement = Int(agreement)
        e.labelled = labels
        e.baseCorrect = Int(baseCorrect)
        e.compressedCorrect = Int(compressedCorrect)
        e.baseIntersection = baseIntersection.map { Int($0) }
        e.baseUnion = baseUnion.map { Int($0) }
        e.compressedIntersection = compressedIntersection.map { Int($0) }
        e.compressedUnion = compressedUnion.map { Int($0) }
        e.squaredError = squaredError
        e.squaredReference = squaredReference
        e.cosineSum = cosineSum
        return e
    }
}

extension Whittle_CandidateScore {
    public init(_ s: CandidateScore) {
        self.init()
        lossSum = s.lossSum
        evaluation = Whittle_EvaluationReport(s.evaluation)
    }

    /// The score, refused when the loss is negative or not finite, or its figures are impossible.
    public func decoded() throws -> CandidateScore {
        guard lossSum.isFinite, lossSum >= 0 else {
            throw CompressionError(.invalidStatistics, "a candidate's loss sum is \(lossSum); it must be finite and not negative")
        }
        let e = try evaluation.decoded()
        var s = CandidateScore(task: e.task)
        s.evaluation = e
        s.samples = e.samples
        s.lossSum = lossSum
        return s
    }
}
