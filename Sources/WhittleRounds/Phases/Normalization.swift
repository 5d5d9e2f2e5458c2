import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Workers: per-channel sums and sums of squares of every BatchNormalization input, under the averaged model; the
/// coordinator sets the running statistics from them (FedAvg averages each worker's running statistics, which
/// describe that worker's own weights, not the averaged ones).
struct NormalizationPhase: PhaseHandler {
    var kind: PhaseKind { .normalization }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        var e = PhaseExpectation(kind: kind)
        e.channels = RoundEngine.normalizationInputs(model)
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { ImportanceAggregate() }

    func close(_ closing: inout PhaseClosing) throws {
        let model = try closing.artifacts.model(closing.progress.currentModel)
        closing.progress.currentModel = try closing.artifacts.store(try closing.engine.renormalized(model, try closing.gathered()))
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        let wanted = RoundEngine.normalizationInputs(job.model)
        let session = try InferenceSession(model: job.model)
        var statistics = ImportanceStatistics()
        for (batch, _) in job.data.batches(job.batchSize) {
            try ChannelStatistics.collect(session, batch, tensors: Set(wanted.keys), into: &statistics.channels)
            statistics.samples += batch.count
        }
        var report = Whittle_TaskReport()
        report.importance = Whittle_ImportanceReport(statistics)
        return report
    }
}
