import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Workers: download the final model, verify its SHA-256 and keep it (the agent's download: no job computes it);
/// closing it marks the sites that hold it.
struct DistributePhase: PhaseHandler {
    var kind: PhaseKind { .distribute }
    var overSelected: Bool { false }
    var carriesFinalModel: Bool { true }
    var downloadsModel: Bool { true }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        var e = PhaseExpectation(kind: kind)
        e.artifact = progress.finalModel ?? ""
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { DistributionAggregate() }

    func close(_ closing: inout PhaseClosing) throws {
        for w in try closing.gathered().workers {
            closing.progress.sites[w, default: .init(worker: w, samples: 0, labels: false)].received = true
        }
    }
}

/// Distribution reports name the artifact the worker holds: it must be the one the round distributes.
struct DistributionAggregate: PhaseAggregate {
    func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .distribution(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        guard message.sha256 == e.artifact else {
            throw PhaseAccumulator.refuse("the worker reports artifact \(message.sha256.prefix(12))…; the round distributes \(e.artifact.prefix(12))…")
        }
        return 0
    }
}
