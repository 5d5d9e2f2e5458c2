import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Workers: the diagonal Fisher (sums of squared gradients) of the starting model on their data; the coordinator
/// turns the merged sums into EWC's state (the Fisher and the reference parameters), which fine-tuning tasks carry.
struct FisherPhase: PhaseHandler {
    var kind: PhaseKind { .fisher }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        var e = PhaseExpectation(kind: kind)
        e.shapes = updateShapes(model)
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { FisherAggregate() }

    func close(_ closing: inout PhaseClosing) throws {
        let model = try closing.artifacts.model(closing.progress.currentModel)
        closing.progress.ewcState = try closing.artifacts.store(try closing.engine.ewcState(model, try closing.gathered()))
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        let trainer = try Trainer(model: job.model, configuration: TrainingConfiguration())
        let labels = try job.data.labels ?? WorkerJobs.pseudoLabels(model: job.teacher ?? job.model, data: job.data, batchSize: job.batchSize)
        let (sums, samples) = try trainer.fisherSums(data: job.data.samples, labels: labels)
        var fisher = Whittle_FisherReport()
        fisher.sums = sums.mapValues(Whittle_FloatTensor.init)
        fisher.samples = UInt64(samples)
        var report = Whittle_TaskReport()
        report.fisher = fisher
        return report
    }

    func backpropagates(_ task: Whittle_Task) -> Bool { true }
}

/// Per-parameter sums of squared gradients, in Double.
struct FisherAggregate: PhaseAggregate {
    var sums: [String: [Double]] = [:]
    var samples = 0

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .fisher(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        let n = try PhaseAccumulator.checkSamples(message.samples, maximumSamples)
        var next = sums
        for (name, t) in message.sums {
            let tensor = try t.decoded()
            guard e.shapes[name] == tensor.shape else { throw PhaseAccumulator.refuse("Fisher sums for '\(name)' have shape \(tensor.shape)") }
            guard tensor.floats.allSatisfy({ $0 >= 0 }) else { throw PhaseAccumulator.refuse("Fisher sums for '\(name)' are negative") }
            var s = next[name] ?? [Double](repeating: 0, count: tensor.count)
            for i in s.indices { s[i] += Double(tensor.floats[i]) }
            next[name] = s
        }
        sums = next
        samples += n
        return n
    }

    /// The diagonal Fisher: the mean squared gradient per parameter.
    func fisher(shapes: [String: [Int]]) throws -> [String: Tensor] {
        guard samples > 0 else { throw AggregationError(.empty, "no Fisher report was accepted") }
        var out: [String: Tensor] = [:]
        for (name, s) in sums { out[name] = Tensor(shape: shapes[name]!, floats: s.map { Float($0 / Double(samples)) }) }
        return out
    }
}
