import Synchronization
import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleRounds
import WhittleTensor
import WhittleTestSupport

/// Latency on the boards: how a probe times two models (with a scripted clock), what an evaluation report carries,
/// what the coordinator refuses, and the fleet's speed-up.
@Suite struct LatencyTests {
    /// A clock that advances `step` each time it is read.
    static func scripted(step: Duration) -> @Sendable () -> Duration {
        final class Ticks: Sendable { let count = Mutex(0) }
        let ticks = Ticks()
        return { step * ticks.count.withLock { t in t += 1; return t } }
    }

    /// Nearest rank: of 1…10 ms the median is the 5th, the 90th percentile the 9th; of one value, that value.
    @Test func percentilesTakeTheNearestRank() {
        let p = LatencyPercentiles([10, 3, 7, 1, 9, 2, 8, 4, 6, 5])
        #expect(p.p50Ms == 5 && p.p90Ms == 9)
        #expect(LatencyPercentiles([0.25]) == LatencyPercentiles(p50Ms: 0.25, p90Ms: 0.25))
        #expect(LatencyPercentiles([4, 1, 3]).p50Ms == 3)  // ⌈1.5⌉ = 2nd of 1, 3, 4
    }

    /// Every run reads the clock twice, one step apart: each run times one step. Without a budget the probe stops at
    /// `runs`; with a spent budget, at `minimumRuns`. The batch is capped by the samples there are.
    @Test func probeStopsAtItsRunsOrItsBudget() throws {
        let session = try InferenceSession(model: RoundTests.model)
        let samples = try RoundTests.shards().parts[0].samples  // 7 samples
        var probe = LatencyProbe(now: Self.scripted(step: .milliseconds(2)))
        probe.runs = 12
        probe.budget = .seconds(3600)
        let full = try probe.compare(session, session, samples: samples, batch: 32)
        #expect(full.batch == 7 && full.runs == 12)
        #expect(full.base == LatencyPercentiles(p50Ms: 2, p90Ms: 2) && full.compressed == full.base && full.speedup == 1)
        probe.budget = .zero
        #expect(try probe.compare(session, session, samples: samples, batch: 1).runs == probe.minimumRuns)
        // Linux lets a process pin its own threads to the CPUs it may use.
        #expect(ComputeThreads.pinned { $0 })
    }

    /// The evaluate phase on real sessions: each site reports batch 1 and its working batch (4), both models timed
    /// the same number of runs, medians within their 90th percentiles, with threads and instruction set; the
    /// coordinator's sites and report carry them and the fleet's speed-up.
    @Test func evaluationTimesBothModelsAtBatchOneAndTheWorkingBatch() throws {
        let plan = RoundTests.plan()
        var progress = RoundProgress(plan: plan, baseModel: "b", startModel: "c")
        let parts = try RoundTests.shards().parts
        let engine = RoundEngine(plan: plan)
        let expectation = try engine.expectation(Phase(.evaluate), model: RoundTests.model, progress: progress)
        let task = engine.task(Phase(.evaluate), index: 0, round: "r", progress: progress, expectation: expectation, deadline: 0,
                               artifactBytes: { _ in 0 })
        var accumulator = PhaseAccumulator(expectation: expectation, aggregation: plan.aggregation)
        let origin = ContinuousClock.now
        var probe = LatencyProbe(now: { ContinuousClock.now - origin })
        probe.runs = 6
        var forged: Whittle_TaskReport?
        for (k, part) in parts.enumerated() {
            var compressor = DeltaCompressor()
            let report = try WorkerJobs.run(task, model: RoundTests.model, teacher: RoundTests.model, data: part, batchSize: 4,
                                            compressor: &compressor, latency: probe)
            #expect(report.evaluation.latency.map(\.batch) == [1, 4])
            #expect(report.evaluation.threads == UInt32(ComputeThreads.current) && report.evaluation.cpu == Kernels.cpuInstructionSet)
            try accumulator.add(report, worker: "w\(k)", maximumSamples: part.count)
            forged = report
        }
        try engine.evaluated(base: RoundTests.model, final: RoundTests.model, accumulator, baseBytes: 1, finalBytes: 1,
                             progress: &progress)
        let sites = progress.sites.values.sorted { $0.worker < $1.worker }
        for site in sites {
            let latency = try #require(site.latency)
            #expect(latency.map(\.batch) == [1, 4] && latency.allSatisfy { $0.runs == 6 })
            #expect(latency.allSatisfy { $0.base.p50Ms <= $0.base.p90Ms && $0.compressed.p50Ms <= $0.compressed.p90Ms })
            #expect(site.latencyBeforeMs == latency[0].base.p50Ms && site.workingSpeedup?.batch == 4)
        }
        let report = try #require(engine.report(round: "r", progress: progress, output: "o"))
        #expect(report.speedup?.sites == 3 && report.speedup?.workingBatch != nil)

        // Forged latencies are refused: not finite, a median above its 90th percentile, a batch of 0, too many entries.
        let valid = try #require(forged)
        let forgeries: [(String, (inout Whittle_EvaluationReport) -> Void)] = [
            ("nan", { $0.latency[0].baseP50Ms = .nan }),
            ("median above p90", { $0.latency[1].compressedP50Ms = $0.latency[1].compressedP90Ms * 2 }),
            ("batch 0", { $0.latency[0].batch = 0 }),
            ("too many", { e in e.latency = (1...9).map { b in var f = e.latency[0]; f.batch = UInt32(b); return f } }),
            ("long cpu name", { $0.cpu = String(repeating: "x", count: 65) }),
        ]
        for (name, forge) in forgeries {
            var report = valid
            forge(&report.evaluation)
            var fresh = PhaseAccumulator(expectation: expectation, aggregation: plan.aggregation)
            #expect(throws: (any Error).self, "\(name)") { try fresh.add(report, worker: "w9", maximumSamples: 13) }
        }
    }

    /// The fleet's speed-up is the geometric mean of the sites': 2× and 8× at batch 1 give 4×; only the first site
    /// timed a working batch (3× at 32). A site without latency (an older worker) is left out.
    @Test func fleetSpeedupIsTheGeometricMeanOfTheSites() throws {
        func timed(_ base: Double, _ compressed: Double, batch: Int = 1) -> LatencyComparison {
            LatencyComparison(batch: batch, runs: 5, base: LatencyPercentiles(p50Ms: base, p90Ms: base),
                              compressed: LatencyPercentiles(p50Ms: compressed, p90Ms: compressed))
        }
        var a = CompressionReport.Site(worker: "a", samples: 1, labels: false)
        a.latency = [timed(2, 1), timed(30, 10, batch: 32)]
        var b = CompressionReport.Site(worker: "b", samples: 1, labels: false)
        b.latency = [timed(8, 1)]
        let older = CompressionReport.Site(worker: "c", samples: 1, labels: false)
        let fleet = try #require(CompressionReport.FleetSpeedup([a, b, older]))
        #expect(abs(fleet.batchOne - 4) < 1e-12 && fleet.sites == 2)
        #expect(abs(try #require(fleet.workingBatch) - 3) < 1e-12)
        #expect(CompressionReport.FleetSpeedup([older]) == nil)
    }
}
