import Foundation
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittlePrivacy
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
    /// search: the generation's candidates (widths per group name) and the adaptive batch norm's batches.
    public var candidates: [[String: Int]] = []
    /// search: the kind of board each candidate was proposed for (nil: every kind).
    public var candidateKinds: [String?] = []
    public var adaptationBatches = 0
    /// latency: the batch, the anchors' ladder fractions (the candidates are the anchors) and the grid expected.
    public var latencyBatch = 0
    public var anchorFractions: [Double] = []
    public var latencyGrid: [LayerLatency] = []
    /// A phase of a secure round: the session, and for a secure sum its partners and layout.
    public var secure: SecureExpectation?

    public init(kind: PhaseKind) {
        self.kind = kind
    }
}

/// What one report adds to a phase, by kind: each phase kind's handler (`PhaseHandler.aggregate`) gives its own.
/// `fold` validates the whole report before it changes anything, and returns the samples it counts.
public protocol PhaseAggregate: Sendable {
    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation: PhaseExpectation) throws -> Int
    /// True when `fold` makes every check before its first change, so it may fold into the aggregate itself rather
    /// than into a copy (a model-sized copy per report, for training updates). Default: false.
    var foldsInPlace: Bool { get }
}

extension PhaseAggregate {
    public var foldsInPlace: Bool { false }
}

/// One phase's aggregate, folded report by report as they are accepted (streaming: memory grows with the model,
/// not with the number of workers, except for the robust aggregators, which need every update at once). `add`
/// validates first and changes nothing when it refuses. What is folded, and how, is the phase kind's
/// (`PhaseHandler.aggregate`); the accessors below read the kinds' aggregates.
public struct PhaseAccumulator: Sendable {
    public let expectation: PhaseExpectation
    public let aggregation: AggregationMethod
    public let clipNorm: Double?
    public let trimFraction: Double
    public private(set) var aggregate: any PhaseAggregate
    public private(set) var workers: Set<String> = []
    public private(set) var samples = 0

    public init(expectation: PhaseExpectation, aggregation: AggregationMethod = .fedavg, clipNorm: Double? = nil,
                trimFraction: Double = 0.2) {
        self.expectation = expectation
        self.aggregation = aggregation
        self.clipNorm = clipNorm
        self.trimFraction = trimFraction
        if expectation.secure?.layout != nil, RoundPlan.securelySummed.contains(expectation.kind) {
            aggregate = MaskedAggregate()
        } else {
            aggregate = PhaseHandlers.handler(expectation.kind).aggregate(
                expectation, options: AggregationOptions(method: aggregation, clipNorm: clipNorm, trimFraction: trimFraction))
        }
    }

    public var reports: Int { workers.count }

    static func refuse(_ message: String) -> AggregationError { AggregationError(.invalidUpdate, message) }

    /// The most samples one report may claim, whatever the worker declared: sums over any plausible fleet stay far
    /// from overflowing.
    public static let maximumReportSamples: UInt64 = 1 << 40

    /// The samples a report claims, refused beyond what its worker declared (`maximum`) or any report may.
    public static func checkSamples(_ n: UInt64, _ maximum: Int) throws -> Int {
        guard n <= Self.maximumReportSamples else {
            throw refuse("the report claims \(n) samples, more than any report may (\(Self.maximumReportSamples)); this worker declared \(maximum)")
        }
        guard n >= 1, n <= UInt64(max(maximum, 0)) else {
            throw refuse("the report claims \(n) samples; this worker declared \(maximum)")
        }
        return Int(n)
    }

    /// The refusal of a report that carries another kind's result.
    static func wrongKind(_ report: Whittle_TaskReport, _ kind: PhaseKind) -> AggregationError {
        refuse("a \(kind.rawValue) phase takes \(kind.rawValue) reports; this one carries \(report.result.map { "\($0)".split(separator: "(").first.map(String.init) ?? "?" } ?? "nothing")")
    }

    /// Validates and folds in one worker's report. Throws (and changes nothing) for a report of another kind, with
    /// non-finite values, wrong shapes or tensors, other histogram edges, impossible counts, or a second report
    /// from the same worker.
    public mutating func add(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int) throws {
        guard !workers.contains(worker) else { throw Self.refuse("worker '\(worker)' already reported for this phase") }
        let counted: Int
        do {
            if aggregate.foldsInPlace {
                counted = try aggregate.fold(report, worker: worker, maximumSamples: maximumSamples, expectation: expectation)
            } else {
                var next = aggregate
                counted = try next.fold(report, worker: worker, maximumSamples: maximumSamples, expectation: expectation)
                aggregate = next
            }
        } catch let error as CompressionError {
            throw Self.refuse(error.message)
        }
        samples += counted
        workers.insert(worker)
    }

    // MARK: the kinds' aggregates

    /// importance, normalization: the merged channel statistics (and Taylor sums).
    public var importance: ImportanceStatistics { (aggregate as? ImportanceAggregate)?.statistics ?? ImportanceStatistics() }
    /// ranges: the merged per-tensor ranges.
    public var ranges: [String: RangeStatistics] { (aggregate as? RangeAggregate)?.ranges ?? [:] }
    /// histograms: the merged histograms.
    public var histograms: [String: Histogram] { (aggregate as? HistogramAggregate)?.histograms ?? [:] }
    /// evaluate: each site's evaluation.
    public var evaluations: [String: Whittle_EvaluationReport] { (aggregate as? EvaluationAggregate)?.evaluations ?? [:] }
    /// latency: the tables the workers measured.
    public var latencyTables: [LatencyTable] { (aggregate as? LatencyAggregate)?.tables ?? [] }
    /// search: each candidate's merged score, in the generation's order.
    public var searchScores: [CandidateScore] { (aggregate as? SearchAggregate)?.scores ?? [] }
    /// The finalists' end-to-end milliseconds: per kind of board, each timing board's time per finalist.
    public var searchTimings: [String: [[Double]]] { (aggregate as? SearchAggregate)?.timings ?? [:] }
    /// finetune, qat: the local losses reported.
    public var losses: [Double] { (aggregate as? UpdateAggregate)?.losses ?? [] }
    /// finetune, qat: the L2 norm of each accepted training update, before clipping.
    public var updateNorms: [Double] { (aggregate as? UpdateAggregate)?.updateNorms ?? [] }

    /// The median of `updateNorms` (the mean of the middle two for an even count); nil when there is none.
    public var medianUpdateNorm: Double? {
        let norms = updateNorms
        guard !norms.isEmpty else { return nil }
        let sorted = norms.sorted(), m = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[m] : (sorted[m - 1] + sorted[m]) / 2
    }

    /// The phase's aggregated weight delta (fine-tuning).
    public func delta() throws -> [String: Tensor] {
        guard let updates = aggregate as? UpdateAggregate else { throw AggregationError(.empty, "a \(expectation.kind.rawValue) phase has no weight deltas") }
        return try updates.delta()
    }

    /// The diagonal Fisher: mean squared gradient per parameter.
    public func fisher() throws -> [String: Tensor] {
        guard let fisher = aggregate as? FisherAggregate else { throw AggregationError(.empty, "a \(expectation.kind.rawValue) phase has no Fisher sums") }
        return try fisher.fisher(shapes: expectation.shapes)
    }
}

/// How training updates merge: the plan's aggregation method and clipping.
public struct AggregationOptions: Sendable {
    public var method: AggregationMethod
    public var clipNorm: Double?
    public var trimFraction: Double

    public init(method: AggregationMethod = .fedavg, clipNorm: Double? = nil, trimFraction: Double = 0.2) {
        self.method = method
        self.clipNorm = clipNorm
        self.trimFraction = trimFraction
    }
}

/// A phase whose reports carry nothing to merge (distribution: the worker says it holds the artifact).
struct NoAggregate: PhaseAggregate {
    func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation: PhaseExpectation) throws -> Int {
        throw PhaseAccumulator.refuse("a \(expectation.kind.rawValue) phase takes no reports")
    }
}
