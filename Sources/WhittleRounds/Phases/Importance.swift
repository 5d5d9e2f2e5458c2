import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Workers: data-driven channel importance statistics of the current model (activation, APoZ: per-channel sums
/// of the prunable groups' statistics tensors; Taylor: gradient sums of the parameters), merged as sums; the
/// pruning step after it scores channels from them.
struct ImportancePhase: PhaseHandler {
    var kind: PhaseKind { .importance }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        var e = PhaseExpectation(kind: kind)
        e.criterion = engine.plan.importance
        if engine.plan.importance == .taylor {
            e.shapes = updateShapes(model)
        } else {
            for g in try ChannelGroups(model: model).prunable {
                if let t = g.statisticsTensor { e.channels[t] = g.channels }
            }
        }
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { ImportanceAggregate() }

    /// The statistics stay in the accumulator, which the pruning step after it reads.
    func close(_ closing: inout PhaseClosing) throws {}

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        guard let criterion = ImportanceCriterion(rawValue: job.task.criterion), criterion.needsData else {
            throw CompressionError(.invalidArgument, "importance criterion '\(job.task.criterion)' is not one workers compute")
        }
        let groups = try ChannelGroups(model: job.model)
        let collector = try ImportanceCollector(model: job.model, groups: groups, criterion: criterion, teacher: job.teacher,
                                                batchSize: job.batchSize,
                                                task: try WorkerJobs.taskKind(job.task, model: job.model, data: job.data))
        try collector.collect(data: job.data)
        var report = Whittle_TaskReport()
        report.importance = Whittle_ImportanceReport(collector.statistics)
        return report
    }

    func backpropagates(_ task: Whittle_Task) -> Bool { task.criterion == ImportanceCriterion.taylor.rawValue }
}

/// Merged channel statistics (importance and batch-norm statistics passes), checked against the tensors and channel
/// counts the phase expects (or, for Taylor, the parameters' shapes).
struct ImportanceAggregate: PhaseAggregate {
    var statistics = ImportanceStatistics()

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .importance(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        var s = ImportanceStatistics()
        s.channels = try message.channels.mapValues { try $0.decoded() }
        s.gradientSums = try message.gradientSums.mapValues { try $0.decoded() }
        s.samples = try PhaseAccumulator.checkSamples(message.samples, maximumSamples)
        if e.kind == .importance, e.criterion == .taylor {
            guard !s.gradientSums.isEmpty else { throw PhaseAccumulator.refuse("a Taylor importance report needs gradient sums") }
            for (name, g) in s.gradientSums where e.shapes[name] != g.shape {
                throw PhaseAccumulator.refuse("gradient sums for '\(name)' have shape \(g.shape); the model's parameter is \(e.shapes[name].map { "\($0)" } ?? "unknown")")
            }
        } else {
            guard Set(s.channels.keys) == Set(e.channels.keys) else {
                throw PhaseAccumulator.refuse("the report covers tensors \(s.channels.keys.sorted()); the phase expects \(e.channels.keys.sorted())")
            }
            for (name, c) in s.channels {
                guard c.channels == e.channels[name]!, c.valuesPerChannel > 0, c.zeroCounts.allSatisfy({ $0 <= c.valuesPerChannel }) else {
                    throw PhaseAccumulator.refuse("channel statistics of '\(name)' are out of range (\(c.channels) channels, \(c.valuesPerChannel) values each)")
                }
            }
        }
        statistics = try statistics.merged(with: s)
        return s.samples
    }
}
