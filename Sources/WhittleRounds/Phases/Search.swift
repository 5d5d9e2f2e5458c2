import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Workers: one generation of the architecture search. The coordinator proposes the generation's candidates (the
/// evolutionary search replayed from the fitness of the generations already closed, so it is the same after a
/// restart); each worker cuts every candidate from the task's model (each group keeps its strongest channels by L1,
/// as the coordinator's `pick` will), re-estimates its batch-norm statistics on local data, and reports its loss
/// and task figures as sums; the coordinator merges them per candidate and records the generation.
struct SearchPhase: PhaseHandler {
    var kind: PhaseKind { .search }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        guard let plan = engine.plan.search else { throw CompressionError(.invalidArgument, "a search phase in a round that searches nothing") }
        let local = try engine.plan.localSearch(model)
        let known = (progress.search?.generations ?? []).map { $0.map(\.fitness) }
        let batch = try plan.strategy(seed: engine.plan.seed).generation(known.count, space: local.space, cost: local.cost,
                                                                          budget: plan.budget, known: known)
        var e = PhaseExpectation(kind: kind)
        e.candidates = batch.map(local.space.describe)
        e.adaptationBatches = plan.adaptationBatches
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate {
        SearchAggregate(count: expectation.candidates.count)
    }

    func close(_ closing: inout PhaseClosing) throws {
        let gathered = try closing.gathered()
        let local = try closing.plan.localSearch(try closing.artifacts.model(closing.progress.currentModel))
        let scores = gathered.searchScores
        var search = closing.progress.search ?? SearchProgress()
        search.generations.append(try gathered.expectation.candidates.enumerated().map { k, widths in
            SearchProgress.Candidate(widths: widths, cost: try local.cost(try local.space.architecture(widths: widths)),
                                     score: k < scores.count ? scores[k] : nil)
        })
        closing.progress.search = search
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        let task = try WorkerJobs.taskKind(job.task, model: job.model, data: job.data)
        let groups = try ChannelGroups(model: job.model)
        let strength = try Pruning.scores(groups, model: job.model, criterion: .l1)
        let byName = Dictionary(groups.prunable.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var local = LocalCompression()
        local.batchSize = job.batchSize
        let reference = try local.logits(try InferenceSession(model: job.model), job.data)
        var out = Whittle_SearchScores()
        for candidate in job.task.candidates {
            var kept: [Int: [Int]] = [:]
            for (name, width) in candidate.widths {
                guard let g = byName[name], let s = strength[g.id] else {
                    throw CompressionError(.invalidArgument, "the search task names group '\(name)', which the model has no prunable group of")
                }
                let w = Int(width)
                guard w >= 1, w <= g.channels, w % max(g.unit, 1) == 0 else {
                    throw CompressionError(.invalidArgument, "the search task keeps \(w) of group \(name)'s \(g.channels) channels (in units of \(g.unit))")
                }
                kept[g.id] = Pruning.strongest(g, scores: s, keeping: w)
            }
            let adapted = try CandidateEvaluation.adaptBatchNorm(try Pruning.prune(job.model, groups: groups, kept: kept), data: job.data,
                                                                 batchSize: job.batchSize, batches: max(Int(job.task.adaptationBatches), 1))
            out.scores.append(Whittle_CandidateScore(try CandidateEvaluation.score(adapted, data: job.data, baseOutputs: reference,
                                                                                  task: task, batchSize: job.batchSize)))
        }
        out.samples = UInt64(job.data.count)
        var report = Whittle_TaskReport()
        report.search = out
        return report
    }
}

/// Every candidate's score summed over the workers' reports: one score per candidate, each for the samples the
/// report claims.
struct SearchAggregate: PhaseAggregate {
    let count: Int
    var scores: [CandidateScore] = []

    init(count: Int) { self.count = count }

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .search(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        let samples = try PhaseAccumulator.checkSamples(message.samples, maximumSamples)
        guard message.scores.count == count else {
            throw PhaseAccumulator.refuse("the report scores \(message.scores.count) candidates; the generation has \(count)")
        }
        let decoded = try message.scores.map { try $0.decoded() }
        for (k, s) in decoded.enumerated() where s.samples != samples {
            throw PhaseAccumulator.refuse("candidate \(k + 1) is scored on \(s.samples) samples; the report claims \(samples)")
        }
        if scores.isEmpty {
            scores = decoded
        } else {
            var merged = scores
            for k in merged.indices { try merged[k].merge(decoded[k]) }
            scores = merged
        }
        return samples
    }
}

/// Coordinator: the search's fittest candidate (the lowest mean loss over the fleet's samples) within the budget is
/// cut from the model, each group keeping its strongest channels by L1, and recorded as the round's one pruning
/// step; fine-tuning follows as after any pruning.
struct PickPhase: PhaseHandler {
    var kind: PhaseKind { .pick }
    var onWorkers: Bool { false }
    var overSelected: Bool { false }

    func close(_ closing: inout PhaseClosing) throws {
        guard let plan = closing.plan.search, var search = closing.progress.search, let best = search.fittest, best.samples > 0 else {
            throw CompressionError(.invalidStatistics, "the search scored no candidate on any sample; there is nothing to pick")
        }
        let model = try closing.artifacts.model(closing.progress.currentModel)
        let local = try closing.plan.localSearch(model)
        let architecture = try local.space.architecture(widths: best.widths)
        let cost = try local.cost(architecture)
        guard plan.budget.admits(cost) else {
            throw CompressionError(.invalidStatistics, "the fittest candidate (\(cost.macs) MACs, \(cost.parameterBytes) bytes) is over the budget")
        }
        let kept = try local.space.kept(architecture, groups: local.groups, scores: local.scores)
        let before = local.groups.prunable.reduce(0) { $0 + $1.channels }
        let remaining = before - local.groups.prunable.reduce(0) { sum, g in sum + g.channels - (kept[g.id]?.count ?? g.channels) }
        let ratio = 1 - Double(remaining) / Double(max(before, 1))
        var options = closing.plan.pruningOptions
        options.criterion = .l1
        options.ratio = ratio
        var schedule = PruningSchedule(groups: local.groups, options: options, steps: [ratio],
                                       finetuneEpochs: closing.plan.localEpochs * closing.plan.finetuneRounds, distill: closing.plan.distill)
        let pruned = try schedule.apply(kept, to: model, groups: local.groups, ratio: ratio)
        try schedule.decide(pruned)
        closing.progress.originalChannels = schedule.originalChannels
        closing.progress.originalIndex = schedule.originalIndex
        closing.progress.pruning = schedule.section
        search.chosen = best
        closing.progress.search = search
        closing.progress.currentModel = try closing.artifacts.store(pruned)
    }
}
