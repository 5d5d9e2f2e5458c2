import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Workers: the base and the compressed model on their held-out data (accuracy or agreement, the task's figures,
/// latency at batch 1 and the working batch); the coordinator builds the per-site rows and fleet figures and
/// applies the quality gate, which fails the round before anything is distributed.
struct EvaluatePhase: PhaseHandler {
    var kind: PhaseKind { .evaluate }
    var overSelected: Bool { false }
    var carriesFinalModel: Bool { true }
    var timesModels: Bool { true }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { EvaluationAggregate() }

    func close(_ closing: inout PhaseClosing) throws {
        let progress = closing.progress
        let final = progress.finalModel ?? ""
        try closing.engine.evaluated(base: try closing.artifacts.model(progress.baseModel), final: try closing.artifacts.model(final),
                                     try closing.gathered(), baseBytes: closing.artifacts.size(progress.baseModel),
                                     finalBytes: closing.artifacts.size(final), progress: &closing.progress)
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        guard let teacher = job.teacher else { throw CompressionError(.invalidArgument, "evaluation needs the base model") }
        var report = Whittle_TaskReport()
        report.evaluation = try WorkerJobs.evaluate(base: teacher, compressed: job.model, data: job.data, batchSize: job.batchSize,
                                                    task: try WorkerJobs.taskKind(job.task, model: teacher, data: job.data),
                                                    latency: job.latency)
        return report
    }
}

/// Each site's evaluation, checked (counts against samples, latencies finite and non-negative).
struct EvaluationAggregate: PhaseAggregate {
    var evaluations: [String: Whittle_EvaluationReport] = [:]

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .evaluation(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        let n = try PhaseAccumulator.checkSamples(message.samples, maximumSamples)
        do {
            _ = try message.decoded()
            _ = try message.decodedLatency()
        } catch let error as CompressionError {
            throw PhaseAccumulator.refuse(error.message)
        }
        guard message.baseLatencyMs.isFinite, message.baseLatencyMs >= 0,
              message.compressedLatencyMs.isFinite, message.compressedLatencyMs >= 0 else {
            throw PhaseAccumulator.refuse("the evaluation's latencies are out of range")
        }
        evaluations[worker] = message
        return n
    }
}
