import Foundation
import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleRounds
import WhittleTensor
import WhittleTestSupport

/// A round's architecture search, phase by phase, in process: the fleet's scores are the sums of each worker's own
/// (adaptive batch norm on its data), the generations replay after a restart, and `pick` cuts the fittest candidate
/// within the budget.
@Suite struct SearchRoundTests {
    /// A round's artifacts in memory.
    final class Artifacts: RoundArtifacts {
        var blobs: [String: [UInt8]] = [:]
        func model(_ sha: String) throws -> Model { try ModelCoding.read(try bytes(sha)) }
        func store(_ model: Model) throws -> String { try store(try ModelCoding.write(model)) }
        func store(_ bytes: [UInt8]) throws -> String {
            if let known = blobs.first(where: { $0.value == bytes })?.key { return known }
            let sha = String(repeating: "0", count: 63 - String(blobs.count).count) + "a" + String(blobs.count)
            blobs[sha] = bytes
            return sha
        }
        func bytes(_ sha: String) throws -> [UInt8] {
            guard let b = blobs[sha] else { throw CompressionError(.invalidArgument, "no artifact \(sha)") }
            return b
        }
        func size(_ sha: String) -> Int { blobs[sha]?.count ?? 0 }
    }

    static func plan() -> RoundPlan {
        var p = RoundTests.plan {
            $0.finetuneRounds = 1
            $0.quantize = .none
        }
        var search = SearchPlan()
        search.candidates = 8
        search.population = 4
        search.adaptationBatches = 2
        search.budget = SearchBudget(macs: try! CostModel.measured(RoundTests.model).macs * 2 / 5)
        p.search = search
        return p
    }

    @Test func theFleetScoresEachGenerationAndPickCutsTheFittest() throws {
        let plan = Self.plan()
        let model = RoundTests.model
        try plan.validate(model: model)
        #expect(plan.phases.map(\.kind) == [.search, .search, .finalists, .pick, .finetune, .export, .evaluate, .distribute])
        #expect(plan.phases[1].label == "search (generation 2)")
        let artifacts = Artifacts()
        let start = try artifacts.store(model)
        var progress = RoundProgress(plan: plan, baseModel: start, startModel: start)
        let engine = RoundEngine(plan: plan)
        let (parts, _) = try RoundTests.shards()
        let local = try plan.localSearch(model)
        let budget = plan.search!.budget

        for g in 0..<2 {
            let accumulator = try RoundTests.federated(.search, plan: plan, model: model, progress: progress, parts: parts)
            let candidates = accumulator.expectation.candidates
            #expect(candidates.count == 4)
            if g == 0 {
                // The first candidate is the uniform architecture that fills the budget.
                let uniform = try EvolutionarySearch.uniform(space: local.space, cost: local.cost, budget: budget)
                #expect(candidates[0] == local.space.describe(uniform))
            }
            // Each candidate's fleet score is the sum of what each worker computes on its own shard.
            let merged = accumulator.searchScores
            for (k, widths) in candidates.enumerated() {
                let a = try local.space.architecture(widths: widths)
                #expect(budget.admits(try local.cost(a)))
                var expected = 0.0
                for part in parts {
                    var compression = LocalCompression()
                    compression.batchSize = 4
                    let reference = try compression.logits(try InferenceSession(model: model), part)
                    let adapted = try CandidateEvaluation.adaptBatchNorm(try local.model(a), data: part, batchSize: 4, batches: 2)
                    expected += try CandidateEvaluation.score(adapted, data: part, baseOutputs: reference, task: .classification, batchSize: 4).lossSum
                }
                #expect(merged[k].samples == parts.reduce(0) { $0 + $1.count })
                #expect(abs(merged[k].lossSum - expected) <= mergedSumTolerance * max(1, expected), "candidate \(k)")
            }
            var closing = PhaseClosing(engine: engine, phase: Phase(.search, iteration: g), accumulator: accumulator,
                                       progress: progress, artifacts: artifacts)
            try PhaseHandlers.handler(.search).close(&closing)
            progress = closing.progress
            #expect(progress.search?.generations.count == g + 1)
            // A restart rebuilds the same generation from the stored progress (JSON and back).
            let restored = try RoundProgress.stored(try JSONEncoder().encode(progress))
            #expect(restored.search == progress.search)
        }
        // The third generation is past the search: it would be empty.
        #expect(try engine.expectation(Phase(.search, iteration: 2), model: model, progress: progress).candidates.isEmpty)

        // The finalists: the uniform architecture and the 3 fittest others, each fine-tuned on four fifths of each
        // worker's shard and scored on the last fifth.
        let finalists = try RoundTests.federated(.finalists, plan: plan, model: model, progress: progress, parts: parts)
        let fittest = try #require(progress.search).finalistCandidates(4)
        #expect(finalists.expectation.candidates == fittest.map(\.widths))
        #expect(fittest.first == progress.search?.candidates.first)
        var finalClosing = PhaseClosing(engine: engine, phase: Phase(.finalists), accumulator: finalists, progress: progress, artifacts: artifacts)
        try PhaseHandlers.handler(.finalists).close(&finalClosing)
        progress = finalClosing.progress
        let held = parts.reduce(0) { $0 + $1.count / 5 }  // every fifth sample: 1 + 2 + 2
        #expect(progress.search?.finalists.count == 4 && progress.search?.finalists.allSatisfy { $0.samples == held && $0.accuracy != nil } == true)

        var closing = PhaseClosing(engine: engine, phase: Phase(.pick), accumulator: nil, progress: progress, artifacts: artifacts)
        try PhaseHandlers.handler(.pick).close(&closing)
        progress = closing.progress
        let search = try #require(progress.search)
        let chosen = try #require(search.chosen)
        // The best finalist on the held-out samples (the earliest among equals).
        let best = search.finalists.enumerated().max { a, b in
            a.element.accuracy! != b.element.accuracy! ? a.element.accuracy! < b.element.accuracy! : a.offset > b.offset
        }!.element
        #expect(chosen == best)
        let pruned = try artifacts.model(progress.currentModel)
        #expect(try CostModel.measured(pruned).macs == chosen.macs && chosen.macs <= budget.macs!)
        let section = try #require(progress.pruning)
        #expect(section.steps.count == 1 && section.criterion == .l1)
        for decision in section.groups where chosen.widths[decision.group] != nil {
            #expect(decision.kept == chosen.widths[decision.group], "\(decision.group)")
        }
        // The round's report carries the search: the uniform reference, the choice, the front.
        progress.before = CompressionReport.Figures(bytes: 1, parameters: 1, macs: 1, accuracy: nil, samples: nil)
        progress.after = progress.before
        let report = try #require(engine.report(round: "r", progress: progress, output: "o"))
        #expect(report.search?.evaluated == 8 && report.search?.chosen == chosen && report.search?.uniform == search.candidates.first)
        #expect(report.search?.finalists == search.finalists && report.search?.candidates.count == 8)
    }

    /// `--skip-blocks` in a round, on a ResNet under a budget below its narrowest architecture that keeps every block:
    /// every candidate skips blocks, the workers cut and score them (a width of 0 on the wire), and pick cuts a model
    /// without those blocks' Adds, at the MACs the cost model gave.
    @Test func aRoundSkipsResidualBlocksOnTheFleet() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        var plan = Self.plan()
        plan.search!.skipBlocks = true
        plan.search!.finalists = 1
        let local = try plan.localSearch(model)
        let keepingEvery = try local.cost(Architecture(levels: local.space.dimensions.map(\.narrowestKept))).macs
        plan.search!.budget = SearchBudget(macs: keepingEvery - 1)
        try plan.validate(model: model)
        #expect(plan.phases.map(\.kind) == [.search, .search, .pick, .finetune, .export, .evaluate, .distribute])
        let artifacts = Artifacts()
        let start = try artifacts.store(model)
        var progress = RoundProgress(plan: plan, baseModel: start, startModel: start)
        let engine = RoundEngine(plan: plan)
        let (parts, _) = try RoundTests.shards()
        for g in 0..<2 {
            let accumulator = try RoundTests.federated(.search, plan: plan, model: model, progress: progress, parts: parts)
            #expect(!accumulator.expectation.candidates.isEmpty)
            for widths in accumulator.expectation.candidates { #expect(widths.values.contains(0), "\(widths)") }
            #expect(accumulator.searchScores.allSatisfy { $0.samples == parts.reduce(0) { $0 + $1.count } && $0.lossSum.isFinite })
            var closing = PhaseClosing(engine: engine, phase: Phase(.search, iteration: g), accumulator: accumulator,
                                       progress: progress, artifacts: artifacts)
            try PhaseHandlers.handler(.search).close(&closing)
            progress = closing.progress
        }
        var closing = PhaseClosing(engine: engine, phase: Phase(.pick), accumulator: nil, progress: progress, artifacts: artifacts)
        try PhaseHandlers.handler(.pick).close(&closing)
        progress = closing.progress
        let chosen = try #require(progress.search?.chosen)
        let skipped = chosen.widths.filter { $0.value == 0 }.count
        #expect(skipped > 0)
        let pruned = try artifacts.model(progress.currentModel)
        #expect(pruned.graph.nodes.filter { $0.opType == "Add" }.count == model.graph.nodes.filter { $0.opType == "Add" }.count - skipped)
        #expect(try CostModel.measured(pruned).macs == chosen.macs && chosen.macs < keepingEvery)

        // A task that keeps 0 channels of a group in no residual branch (a residual stream) is refused by the worker,
        // which names the group and the reason (the generations above computed widths of 0 of branch groups).
        let expectation = try engine.expectation(Phase(.search, iteration: 0), model: model, progress: RoundProgress(plan: plan, baseModel: start, startModel: start))
        var task = engine.task(Phase(.search), index: 0, round: "r", progress: progress, expectation: expectation, deadline: 0,
                               artifactBytes: { _ in 0 })
        let groups = try ChannelGroups(model: model)
        let stream = try #require(groups.prunable.first { groups.branches[$0.id] == nil && task.candidates[0].widths[$0.name] != nil })
        task.candidates[0].widths[stream.name] = 0
        var compressor = DeltaCompressor()
        #expect { _ = try WorkerJobs.run(task, model: model, teacher: model, data: parts[0], batchSize: 4, compressor: &compressor) } throws: {
            "\($0)".contains("cannot be skipped") && "\($0)".contains(stream.name)
        }
    }

    @Test func badSearchReportsAndPlansAreRefused() throws {
        let plan = Self.plan()
        let model = RoundTests.model
        let progress = RoundProgress(plan: plan, baseModel: "b", startModel: "c")
        let engine = RoundEngine(plan: plan)
        let expectation = try engine.expectation(Phase(.search), model: model, progress: progress)
        let task = engine.task(Phase(.search), index: 0, round: "r", progress: progress, expectation: expectation, deadline: 0,
                               artifactBytes: { _ in 0 })
        #expect(task.candidates.count == 4 && task.adaptationBatches == 2)
        let (parts, _) = try RoundTests.shards()
        var compressor = DeltaCompressor()
        let good = try WorkerJobs.run(task, model: model, teacher: model, data: parts[0], batchSize: 4, compressor: &compressor)
        func refused(_ edit: (inout Whittle_TaskReport) -> Void) -> Bool {
            var report = good
            edit(&report)
            var accumulator = PhaseAccumulator(expectation: expectation)
            do {
                try accumulator.add(report, worker: "w", maximumSamples: parts[0].count)
                return false
            } catch {
                return accumulator.reports == 0
            }
        }
        #expect(!refused { _ in })
        #expect(refused { $0.search.scores.removeLast() })
        #expect(refused { $0.search.scores[1].lossSum = .nan })
        #expect(refused { $0.search.scores[2].lossSum = -1 })
        #expect(refused { $0.search.scores[0].evaluation.samples += 1 })
        #expect(refused { $0.search.samples = UInt64(parts[0].count + 1) })
        #expect(refused { $0.importance = Whittle_ImportanceReport() })
        // A worker refuses a task whose widths the model cannot take.
        var bad = task
        bad.candidates[0].widths[bad.candidates[0].widths.keys.first!] = 10_000
        #expect(throws: CompressionError.self) {
            try WorkerJobs.run(bad, model: model, teacher: model, data: parts[0], batchSize: 4, compressor: &compressor)
        }
        // A finalists task asking for more local epochs than any plan may is refused before it trains.
        var endless = task
        endless.kind = PhaseKind.finalists.rawValue
        endless.localEpochs = 5000
        #expect { try WorkerJobs.run(endless, model: model, teacher: model, data: parts[0], batchSize: 4, compressor: &compressor) }
            throws: { "\($0)".contains("5000 local epochs") }
        // Plans: a search with a pruning ratio, without fine-tuning, with a latency budget, or a budget below the
        // smallest architecture.
        for (edit, needle) in [({ (p: inout RoundPlan) in p.pruneRatio = 0.5 }, "not both"),
                               ({ (p: inout RoundPlan) in p.finetuneRounds = 0 }, "--finetune-rounds"),
                               ({ (p: inout RoundPlan) in p.search!.latencyShare = 1.5 }, "share"),
                               ({ (p: inout RoundPlan) in p.search!.latencyGrid = 1 }, "--latency-grid"),
                               ({ (p: inout RoundPlan) in p.search!.budget = SearchBudget() }, "budget")] {
            var p = plan
            edit(&p)
            #expect(throws: CompressionError.self, "\(needle)") { try p.check() }
            do { try p.check() } catch let error as CompressionError { #expect(error.message.contains(needle), "\(error.message)") }
        }
        var tiny = plan
        tiny.search!.budget = SearchBudget(macs: 10)
        #expect { try tiny.validate(model: model) } throws: { "\($0)".contains("below the smallest architecture") }
    }

    /// A latency budget on the fleet: every worker times the model's layers and anchors on its hardware (a real
    /// clock here, for the tables' structure and the worker's cache only: the times are then replaced by scripted
    /// ones, so no assertion depends on this machine's speed), the tables merge per kind of board, the budget's share
    /// becomes milliseconds of the original on the slowest kind, and every candidate is predicted within it. Tables
    /// that do not fit the phase are refused.
    @Test func theFleetsLatencyTablesBoundTheSearch() throws {
        var plan = Self.plan()
        plan.search!.budget = SearchBudget()
        plan.search!.latencyShare = 0.9
        plan.search!.latencyGrid = 2
        let model = RoundTests.model
        try plan.validate(model: model)
        #expect(Array(plan.phases.map(\.kind).prefix(3)) == [.latency, .search, .search])
        let artifacts = Artifacts()
        let start = try artifacts.store(model)
        var progress = RoundProgress(plan: plan, baseModel: start, startModel: start)
        let engine = RoundEngine(plan: plan)
        let expectation = try engine.expectation(Phase(.latency), model: model, progress: progress)
        #expect(expectation.candidates.count == 2 && expectation.anchorFractions == [0, 1] && expectation.latencyBatch == 1)
        let task = engine.task(Phase(.latency), index: 0, round: "r", progress: progress, expectation: expectation, deadline: 0,
                               artifactBytes: { _ in 0 })
        let (parts, _) = try RoundTests.shards()
        let origin = ContinuousClock.now
        var probe = LatencyProbe(now: { ContinuousClock.now - origin })
        probe.warmup = 1
        probe.runs = 3
        probe.minimumRuns = 1
        probe.pinThreads = false
        var accumulator = PhaseAccumulator(expectation: expectation)
        var reports: [Whittle_TaskReport] = []
        for k in 0..<2 {
            var compressor = DeltaCompressor()
            let report = try WorkerJobs.run(task, model: model, teacher: model, data: parts[k], batchSize: 4, compressor: &compressor,
                                            latency: probe)
            reports.append(try Whittle_TaskReport(serializedBytes: try report.serializedBytes() as [UInt8]))
        }
        // Both "workers" are this process: the second task over the same model reuses the table the first measured.
        #expect(reports[0].latencyTable == reports[1].latencyTable)
        // A kept table that is not this task's (damaged, or another grid) is measured again and replaced.
        final class Stale: LatencyTableKeeping, @unchecked Sendable {
            var kept: LatencyTable?
            func table(_ key: String) -> LatencyTable? {
                LatencyTable(machine: Kernels.cpuInstructionSet, threads: ComputeThreads.current, batch: 1, layers: [],
                             anchors: [.init(fraction: 0, milliseconds: 1), .init(fraction: 1, milliseconds: 2)])
            }
            func keep(_ table: LatencyTable, _ key: String) { kept = table }
        }
        let stale = Stale()
        var staleCompressor = DeltaCompressor()
        let remeasured = try WorkerJobs.run(task, model: model, teacher: model, data: parts[0], batchSize: 4, compressor: &staleCompressor,
                                            latency: probe, latencyTables: stale)
        #expect(remeasured.latencyTable.layers.map(\.node) == reports[0].latencyTable.layers.map(\.node) && stale.kept != nil)
        // Scripted times: worker k's board is k + 1 times slower; each layer costs 0.001 · outputs · inputs + 0.01 ms,
        // the narrowest anchor 1 ms and the original 2 ms.
        for k in reports.indices {
            for (l, entry) in reports[k].latencyTable.layers.enumerated() {
                reports[k].latencyTable.layers[l].milliseconds = entry.outputs.flatMap { o in
                    entry.inputs.map { i in (0.001 * Double(o) * Double(i) + 0.01) * Double(k + 1) }
                }
            }
            reports[k].latencyTable.anchorMilliseconds = [1.0 * Double(k + 1), 2.0 * Double(k + 1)]
            try accumulator.add(reports[k], worker: "w\(k)", maximumSamples: parts[k].count)
        }
        let tables = accumulator.latencyTables
        #expect(tables.count == 2 && tables.allSatisfy { $0.layers.map(\.node) == expectation.latencyGrid.map(\.node) })
        var closing = PhaseClosing(engine: engine, phase: Phase(.latency), accumulator: accumulator, progress: progress, artifacts: artifacts)
        try PhaseHandlers.handler(.latency).close(&closing)
        progress = closing.progress
        // One kind of board (both workers are this machine): each point the median (here the mean) of the two.
        let merged = try #require(progress.search?.latencyTables.first)
        #expect(progress.search?.latencyTables.count == 1)
        let a = tables[0].anchors.last!.milliseconds, b = tables[1].anchors.last!.milliseconds
        #expect(abs(merged.fullMilliseconds - (a + b) / 2) <= 1e-12 * max(a, b))
        let budget = plan.searchBudget(progress)
        #expect(abs(try #require(budget.latencyMs) - 0.9 * merged.fullMilliseconds) <= 1e-12 * merged.fullMilliseconds)
        // The first generation: every candidate predicted within the budget on the fleet's table.
        let local = try plan.localSearch(model, progress: progress)
        let generation = try engine.expectation(Phase(.search), model: model, progress: progress)
        #expect(!generation.candidates.isEmpty)
        for widths in generation.candidates {
            let cost = try local.cost(try local.space.architecture(widths: widths))
            #expect(cost.latencyMs != nil && budget.admits(cost))
        }
        // Tables that do not fit the phase are refused and change nothing.
        func refused(_ edit: (inout Whittle_TaskReport) -> Void) -> Bool {
            var report = reports[0]
            edit(&report)
            var fresh = PhaseAccumulator(expectation: expectation)
            do {
                try fresh.add(report, worker: "w", maximumSamples: 10)
                return false
            } catch {
                return fresh.reports == 0
            }
        }
        #expect(!refused { _ in })
        #expect(refused { $0.latencyTable.layers[0].milliseconds[0] = .nan })
        #expect(refused { $0.latencyTable.layers[0].milliseconds[0] = -1 })
        #expect(refused { $0.latencyTable.layers[0].milliseconds.removeLast() })
        #expect(refused { $0.latencyTable.layers[0].outputs[0] += 1 })
        #expect(refused { $0.latencyTable.layers.removeLast() })
        #expect(refused { $0.latencyTable.anchorMilliseconds.removeLast() })
        #expect(refused { $0.latencyTable.batch = 8 })
        #expect(refused { $0.latencyTable.machine = "" })
        #expect(refused { $0.search = Whittle_SearchScores() })
        // Without the worker's clock the task fails.
        var compressor = DeltaCompressor()
        #expect(throws: CompressionError.self) {
            try WorkerJobs.run(task, model: model, teacher: model, data: parts[0], batchSize: 4, compressor: &compressor)
        }
    }

    /// A fleet of two kinds of board (scripted tables: the second kind three times slower): each generation holds a
    /// population per kind, each within the budget on its own kind; `pick` gives each kind the best candidate within
    /// its budget; this round makes the slowest kind's model and evaluates and distributes only to kinds no other
    /// round serves; the follow-up round cuts the other kind's architecture and serves only that kind.
    @Test func eachKindOfBoardGetsItsOwnModel() throws {
        var plan = Self.plan()
        plan.search!.budget = SearchBudget()
        plan.search!.latencyShare = 0.7
        plan.search!.latencyGrid = 2
        plan.search!.finalists = 1
        let model = RoundTests.model
        try plan.validate(model: model)
        let artifacts = Artifacts()
        let start = try artifacts.store(model)
        var progress = RoundProgress(plan: plan, baseModel: start, startModel: start)
        let engine = RoundEngine(plan: plan)
        let grid = try engine.expectation(Phase(.latency), model: model, progress: progress)
        // Each layer costs 0.001 · outputs · inputs + 0.01 ms, the narrowest anchor 1 ms and the original 2 ms, on
        // the fast kind; three times that on the slow one.
        func table(_ machine: String, _ slower: Double) -> LatencyTable { Self.scriptedTable(grid, machine: machine, threads: 1, slower: slower) }
        let fast = table("fast_isa", 1), slow = table("slow_isa", 3)
        var search = SearchProgress()
        search.latencyTables = [fast, slow]
        progress.search = search
        #expect(progress.search?.searchKinds == [fast.kind, slow.kind])
        let budget = plan.searchBudget(progress)
        #expect(abs(try #require(budget.latencyMs) - 0.7 * slow.fullMilliseconds) <= 1e-12 * slow.fullMilliseconds)
        let (parts, _) = try RoundTests.shards()
        for g in 0..<2 {
            let accumulator = try RoundTests.federated(.search, plan: plan, model: model, progress: progress, parts: parts)
            let e = accumulator.expectation
            #expect(e.candidateKinds.count == e.candidates.count && e.candidateKinds.allSatisfy { $0 == fast.kind || $0 == slow.kind })
            #expect(e.candidateKinds == e.candidateKinds.sorted { ($0 == fast.kind ? 0 : 1) < ($1 == fast.kind ? 0 : 1) })
            for (widths, kind) in zip(e.candidates, e.candidateKinds) {
                let local = try plan.localSearch(model, progress: progress, kinds: [kind!])
                #expect(budget.admits(try local.cost(try local.space.architecture(widths: widths))), "\(kind!)")
            }
            var closing = PhaseClosing(engine: engine, phase: Phase(.search, iteration: g), accumulator: accumulator,
                                       progress: progress, artifacts: artifacts)
            try PhaseHandlers.handler(.search).close(&closing)
            progress = closing.progress
        }
        // The fast kind's original runs within the budget (2 ms of the slow kind's 4.2): every architecture proposed
        // for it widens to the whole model, so its search ends after one; the slow kind's population is full.
        var candidates = try #require(progress.search).candidates
        #expect(candidates.filter { $0.kind == fast.kind }.map(\.macs) == [try CostModel.measured(model).macs])
        #expect(candidates.filter { $0.kind == slow.kind }.count == 8)
        // Scripted fitness (random data ranks architectures at random): the more MACs, the fitter.
        for g in progress.search!.generations.indices {
            for k in progress.search!.generations[g].indices { progress.search!.generations[g][k].fitness = Double(progress.search!.generations[g][k].macs) }
        }
        candidates = progress.search!.candidates
        // Under --pick operator the round waits at pick until every kind has the operator's pick (or the operator
        // lets it pick the rest); a pick need not be the fittest.
        var byOperator = plan
        byOperator.search!.pick = .operator
        var waiting = progress
        #expect(!PhaseHandlers.handler(.pick).ready(byOperator, progress: waiting))
        let slowCandidates = candidates.filter { $0.kind == slow.kind }
        let picked = try #require(slowCandidates.min { $0.fitness < $1.fitness })
        waiting.search!.picked[slow.kind] = picked.widths
        #expect(!PhaseHandlers.handler(.pick).ready(byOperator, progress: waiting))
        waiting.search!.pickRest = true
        #expect(PhaseHandlers.handler(.pick).ready(byOperator, progress: waiting) && PhaseHandlers.handler(.pick).ready(plan, progress: progress))
        var operatorClosing = PhaseClosing(engine: RoundEngine(plan: byOperator), phase: Phase(.pick), accumulator: nil, progress: waiting,
                                           artifacts: artifacts)
        try PhaseHandlers.handler(.pick).close(&operatorClosing)
        #expect(operatorClosing.progress.search?.models.first?.widths == picked.widths)
        #expect(operatorClosing.progress.search?.chosen == picked)

        var closing = PhaseClosing(engine: engine, phase: Phase(.pick), accumulator: nil, progress: progress, artifacts: artifacts)
        try PhaseHandlers.handler(.pick).close(&closing)
        progress = closing.progress
        let chosen = try #require(progress.search)
        #expect(chosen.models.count == 2)
        #expect(chosen.models[0].widths != picked.widths)
        #expect(chosen.models.map(\.kinds) == [[slow.kind], [fast.kind]])
        for m in chosen.models {
            for kind in m.kinds {
                let local = try plan.localSearch(model, progress: progress, kinds: [kind])
                let cost = try local.cost(try local.space.architecture(widths: m.widths))
                #expect(budget.admits(cost) && cost.latencyMs == m.latencyMs[kind])
                // The best scored candidate within this kind's budget.
                let best = candidates.filter { (try? budget.admits(local.cost(local.space.architecture(widths: $0.widths)))) == true }
                    .max { $0.fitness < $1.fitness }!
                #expect(m.widths == best.widths, "\(kind)")
            }
        }
        #expect(chosen.chosen?.widths == chosen.models[0].widths)
        #expect(try CostModel.measured(try artifacts.model(progress.currentModel)).macs == chosen.models[0].macs)
        #expect(chosen.models[1].macs > chosen.models[0].macs)
        #expect(progress.audience == BoardAudience(excluded: [fast.kind]))

        // This round evaluates on and distributes to slow boards and boards that did not say their kind, not fast ones.
        func worker(_ name: String, _ kind: String?) -> WorkerStatus {
            var w = WorkerStatus(name: name, lastContact: Date(timeIntervalSince1970: 0), revoked: false,
                                 certificateExpiresAt: Date(timeIntervalSince1970: 86400), samples: 10, labels: true)
            w.boardKind = kind
            return w
        }
        let evaluate = plan.phases.firstIndex { $0.kind == .evaluate }!
        func handsOut(_ plan: RoundPlan, _ phase: Int, _ audience: BoardAudience?, _ w: WorkerStatus) -> Bool {
            var machine = RoundMachine(id: "r", plan: plan, state: .running, phase: phase, phaseStartedAt: Date(timeIntervalSince1970: 0),
                                       assignments: [], reported: [], pollSeconds: 5, audience: audience)
            return machine.taskRequested(by: w, now: Date(timeIntervalSince1970: 1)).handOut
        }
        #expect(handsOut(plan, evaluate, progress.audience, worker("s", slow.kind)))
        #expect(handsOut(plan, evaluate, progress.audience, worker("u", nil)))
        #expect(!handsOut(plan, evaluate, progress.audience, worker("f", fast.kind)))
        // Every board fine-tunes, whatever its kind.
        let finetune = plan.phases.firstIndex { $0.kind == .finetune }!
        #expect(handsOut(plan, finetune, progress.audience, worker("f", fast.kind)))
        // A board that cannot time models takes no latency task.
        var untimed = worker("n", slow.kind)
        untimed.timesModels = false
        #expect(!handsOut(plan, 0, nil, untimed) && handsOut(plan, 0, nil, worker("t", slow.kind)))

        // The follow-up round: the fast kind's architecture, cut from the same base model, for fast boards only.
        let (next, nextStart) = try #require(engine.followUp(progress))
        #expect(next.phases.map(\.kind) == [.pick, .finetune, .export, .evaluate, .distribute])
        #expect(nextStart.audience == BoardAudience(kinds: [fast.kind]) && nextStart.currentModel == start)
        var followUp = nextStart
        var nextClosing = PhaseClosing(engine: RoundEngine(plan: next), phase: Phase(.pick), accumulator: nil, progress: followUp, artifacts: artifacts)
        try PhaseHandlers.handler(.pick).close(&nextClosing)
        followUp = nextClosing.progress
        #expect(followUp.search?.chosen?.widths == chosen.models[1].widths)
        #expect(try CostModel.measured(try artifacts.model(followUp.currentModel)).macs == chosen.models[1].macs)
        let nextEvaluate = next.phases.firstIndex { $0.kind == .evaluate }!
        #expect(handsOut(next, nextEvaluate, followUp.audience, worker("f", fast.kind)))
        #expect(!handsOut(next, nextEvaluate, followUp.audience, worker("s", slow.kind)))
        #expect(!handsOut(next, nextEvaluate, followUp.audience, worker("u", nil)))
        // …and none after it.
        #expect(RoundEngine(plan: next).followUp(followUp) == nil)
        // A progress stored before the per-kind fields existed still reads.
        #expect(try JSONDecoder().decode(SearchProgress.self, from: Data(#"{"generations": [], "finalists": [], "latencyTables": []}"#.utf8)) == SearchProgress())
    }
}

extension SearchRoundTests {
    /// A latency table over a latency phase's grid with scripted times: each layer 0.001 · outputs · inputs + 0.01 ms,
    /// the narrowest anchor 1 ms and the original 2 ms, all `slower` times that.
    static func scriptedTable(_ grid: PhaseExpectation, machine: String, threads: Int, slower: Double = 1) -> LatencyTable {
        LatencyTable(machine: machine, threads: threads, batch: 1, layers: grid.latencyGrid.map { l in
            var l = l
            l.milliseconds = l.outputs.map { o in l.inputs.map { i in (0.001 * Double(o) * Double(i) + 0.01) * slower } }
            return l
        }, anchors: zip(grid.anchorFractions, [1.0, 2.0]).map { LatencyTable.Anchor(fraction: $0, milliseconds: $1 * slower) })
    }

    /// Under a latency budget the boards time each finalist end to end at the latency batch (with the worker's
    /// clock); the coordinator keeps each finalist's median per kind of board, refuses times that do not fit, and
    /// `pick` passes over a finalist measured over the budget however accurate it is.
    @Test func finalistsAreTimedOnTheFleetAndOneMeasuredOverTheBudgetIsNotPicked() throws {
        var plan = Self.plan()
        plan.search!.budget = SearchBudget()
        plan.search!.latencyShare = 0.9
        plan.search!.latencyGrid = 2
        plan.search!.candidates = 4
        plan.search!.finalists = 2
        let model = RoundTests.model
        try plan.validate(model: model)
        let artifacts = Artifacts()
        let start = try artifacts.store(model)
        var progress = RoundProgress(plan: plan, baseModel: start, startModel: start)
        let engine = RoundEngine(plan: plan)
        let grid = try engine.expectation(Phase(.latency), model: model, progress: progress)
        let kind = LatencyTable.kind(machine: Kernels.cpuInstructionSet, threads: ComputeThreads.current)
        var search = SearchProgress()
        search.latencyTables = [Self.scriptedTable(grid, machine: Kernels.cpuInstructionSet, threads: ComputeThreads.current)]
        progress.search = search
        let budget = try #require(plan.searchBudget(progress).latencyMs)
        let (parts, _) = try RoundTests.shards()
        let generation = try RoundTests.federated(.search, plan: plan, model: model, progress: progress, parts: parts)
        var closing = PhaseClosing(engine: engine, phase: Phase(.search), accumulator: generation, progress: progress, artifacts: artifacts)
        try PhaseHandlers.handler(.search).close(&closing)
        progress = closing.progress

        let expectation = try engine.expectation(Phase(.finalists), model: model, progress: progress)
        #expect(expectation.candidates.count == 2 && expectation.latencyBatch == 1)
        let task = engine.task(Phase(.finalists), index: 0, round: "r", progress: progress, expectation: expectation, deadline: 0,
                               artifactBytes: { _ in 0 })
        let origin = ContinuousClock.now
        var probe = LatencyProbe(now: { ContinuousClock.now - origin })
        probe.warmup = 1
        probe.runs = 3
        probe.minimumRuns = 1
        probe.pinThreads = false
        var reports: [Whittle_TaskReport] = []
        for part in parts {
            var compressor = DeltaCompressor()
            let report = try WorkerJobs.run(task, model: model, teacher: model, data: part, batchSize: 4, compressor: &compressor, latency: probe)
            reports.append(try Whittle_TaskReport(serializedBytes: try report.serializedBytes() as [UInt8]))
        }
        // Measured here (the structure only): a time per finalist and this machine's kind; without a clock, none.
        #expect(reports.allSatisfy { $0.search.milliseconds.count == 2 && $0.search.milliseconds.allSatisfy { $0 > 0 } })
        #expect(LatencyTable.kind(machine: reports[0].search.machine, threads: Int(reports[0].search.threads)) == kind)
        var untimed = DeltaCompressor()
        #expect(try WorkerJobs.run(task, model: model, teacher: model, data: parts[0], batchSize: 4, compressor: &untimed).search.milliseconds.isEmpty)
        // Scripted times: the first finalist (the uniform architecture) well within the budget on every board, the
        // second far over it.
        var accumulator = PhaseAccumulator(expectation: expectation)
        for k in reports.indices {
            reports[k].search.milliseconds = [budget * (0.5 + 0.1 * Double(k)), budget * 3]
            try accumulator.add(reports[k], worker: "w\(k)", maximumSamples: parts[k].count)
        }
        func refused(_ edit: (inout Whittle_TaskReport) -> Void) -> Bool {
            var report = reports[0]
            edit(&report)
            var fresh = PhaseAccumulator(expectation: expectation)
            do { try fresh.add(report, worker: "w", maximumSamples: 100); return false } catch { return fresh.reports == 0 }
        }
        #expect(!refused { _ in })
        #expect(refused { $0.search.milliseconds.removeLast() })
        #expect(refused { $0.search.milliseconds[0] = .nan })
        #expect(refused { $0.search.milliseconds[0] = 0 })
        #expect(refused { $0.search.machine = "" })
        var finalClosing = PhaseClosing(engine: engine, phase: Phase(.finalists), accumulator: accumulator, progress: progress, artifacts: artifacts)
        try PhaseHandlers.handler(.finalists).close(&finalClosing)
        progress = finalClosing.progress
        let finalists = try #require(progress.search?.finalists)
        // The median of the three boards.
        #expect(abs(try #require(finalists[0].measuredMs?[kind]) - budget * 0.6) <= 1e-12 * budget)
        #expect(finalists[1].measuredMs?[kind] == budget * 3)
        // However accurate, the finalist measured over the budget is not picked.
        progress.search!.finalists[1].accuracy = 1
        progress.search!.finalists[0].accuracy = 0
        var pick = PhaseClosing(engine: engine, phase: Phase(.pick), accumulator: nil, progress: progress, artifacts: artifacts)
        try PhaseHandlers.handler(.pick).close(&pick)
        #expect(pick.progress.search?.chosen?.widths == finalists[0].widths)
    }
}
