import Foundation
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
        let search = progress.search ?? SearchProgress()
        var e = PhaseExpectation(kind: kind)
        // One population per kind of board when the fleet holds several, each under the budget on its own hardware
        // and replayed from the fitness of its own candidates.
        for boardKind in search.searchKinds {
            let local = try engine.plan.localSearch(model, progress: progress, kinds: boardKind.map { [$0] })
            let known = search.generations.map { $0.filter { $0.kind == boardKind }.map(\.fitness) }
            let batch = try plan.strategy(seed: engine.plan.seed).generation(known.count, space: local.space, cost: local.cost,
                                                                              budget: engine.plan.searchBudget(progress), known: known)
            e.candidates += batch.map(local.space.describe)
            e.candidateKinds += batch.map { _ in boardKind }
        }
        e.adaptationBatches = plan.adaptationBatches
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate {
        SearchAggregate(count: expectation.candidates.count)
    }

    func close(_ closing: inout PhaseClosing) throws {
        var search = closing.progress.search ?? SearchProgress()
        search.generations.append(try Self.scored(closing))
        closing.progress.search = search
    }

    /// The closing phase's candidates with their costs and the fleet's merged scores (search and finalists alike).
    static func scored(_ closing: PhaseClosing) throws -> [SearchProgress.Candidate] {
        let gathered = try closing.gathered()
        let model = try closing.artifacts.model(closing.progress.currentModel)
        let kinds = gathered.expectation.candidateKinds
        var locals: [String?: LocalSearch] = [:]
        for boardKind in Array(Set(kinds)) + [nil] where locals[boardKind] == nil {
            locals[boardKind] = try closing.plan.localSearch(model, progress: closing.progress, kinds: boardKind.map { [$0] })
        }
        let scores = gathered.searchScores
        return try gathered.expectation.candidates.enumerated().map { k, widths in
            let boardKind = k < kinds.count ? kinds[k] : nil
            let local = locals[boardKind]!
            return SearchProgress.Candidate(widths: widths, cost: try local.cost(try local.space.architecture(widths: widths)),
                                            score: k < scores.count ? scores[k] : nil, kind: boardKind)
        }
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        let task = try WorkerJobs.taskKind(job.task, model: job.model, data: job.data)
        let cutter = try CandidateCutter(job.model)
        var local = LocalCompression()
        local.batchSize = job.batchSize
        let reference = try local.logits(try InferenceSession(model: job.model), job.data)
        var out = Whittle_SearchScores()
        for candidate in job.task.candidates {
            let adapted = try CandidateEvaluation.adaptBatchNorm(try cutter.model(candidate), data: job.data,
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

/// A worker's side of a candidate: the task's model cut to the widths a task names, each group keeping its strongest
/// channels by L1 norm (as the coordinator's `pick` does).
struct CandidateCutter {
    let model: Model
    let groups: ChannelGroups
    let strength: [Int: [Double]]
    let byName: [String: ChannelGroup]

    init(_ model: Model) throws {
        self.model = model
        groups = try ChannelGroups(model: model)
        strength = try Pruning.scores(groups, model: model, criterion: .l1)
        byName = Dictionary(groups.prunable.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
    }

    func model(_ candidate: Whittle_ArchitectureWidths) throws -> Model {
        var kept: [Int: [Int]] = [:]
        for (name, width) in candidate.widths {
            guard let g = byName[name], let s = strength[g.id] else {
                throw CompressionError(.invalidArgument, "the task names group '\(name)', which the model has no prunable group of")
            }
            let w = Int(width)
            guard w >= 1 || (w == 0 && groups.branches[g.id] != nil), w <= g.channels, w % max(g.unit, 1) == 0 else {
                throw CompressionError(.invalidArgument, "the task keeps \(w) of group \(name)'s \(g.channels) channels (in units of \(g.unit)\(w == 0 ? "; the group is not inside a residual block's branch, so its block cannot be skipped" : ""))")
            }
            kept[g.id] = Pruning.strongest(g, scores: s, keeping: w)
        }
        return try Pruning.prune(model, groups: groups, kept: kept)
    }
}

/// Every candidate's score summed over the workers' reports: one score per candidate, each for the samples the
/// report claims; and the finalists' end-to-end times, per kind of board.
struct SearchAggregate: PhaseAggregate {
    let count: Int
    var scores: [CandidateScore] = []
    /// Per kind of board, each timing board's milliseconds per candidate.
    var timings: [String: [[Double]]] = [:]

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
        if !message.milliseconds.isEmpty {
            guard e.kind == .finalists, e.latencyBatch > 0, message.milliseconds.count == count,
                  message.milliseconds.allSatisfy({ $0.isFinite && $0 > 0 && $0 <= LatencyAggregate.maximumMilliseconds }) else {
                throw PhaseAccumulator.refuse("the report's end-to-end times are not one positive, finite time per finalist of a timed phase")
            }
            guard !message.machine.isEmpty, message.machine.utf8.count <= 64, message.threads >= 1, message.threads <= 1 << 16 else {
                throw PhaseAccumulator.refuse("the timed report names machine '\(message.machine.prefix(64))' with \(message.threads) threads")
            }
        }
        if scores.isEmpty {
            scores = decoded
        } else {
            var merged = scores
            for k in merged.indices { try merged[k].merge(decoded[k]) }
            scores = merged
        }
        if !message.milliseconds.isEmpty {
            timings[LatencyTable.kind(machine: message.machine, threads: Int(message.threads)), default: []].append(message.milliseconds)
        }
        return samples
    }
}

/// Coordinator: the search's fittest candidate (the lowest mean loss over the fleet's samples) within the budget is
/// cut from the model, each group keeping its strongest channels by L1, and recorded as the round's one pruning
/// step; fine-tuning follows as after any pruning. After finalists, their held-out figures decide instead.
///
/// A fleet of several kinds of board gets one model per kind: for each kind, the best candidate within the budget on
/// that kind's hardware; kinds whose choices coincide share one model. This round makes the slowest kind's model
/// (and serves boards whose kind has no table); each other architecture is made by a follow-up round that starts
/// when this one succeeds (`SearchPlan.architecture`), and each round evaluates on and distributes to its own kinds.
struct PickPhase: PhaseHandler {
    var kind: PhaseKind { .pick }
    var onWorkers: Bool { false }
    var overSelected: Bool { false }

    /// Under `--pick operator` the round waits here until the operator has picked (`coordinator round pick`).
    func ready(_ plan: RoundPlan, progress: RoundProgress) -> Bool {
        guard let search = plan.search, search.architecture == nil else { return true }
        return (progress.search ?? SearchProgress()).picksReady(search.pick)
    }

    func close(_ closing: inout PhaseClosing) throws {
        guard let plan = closing.plan.search, var search = closing.progress.search else {
            throw CompressionError(.invalidStatistics, "the search scored no candidate on any sample; there is nothing to pick")
        }
        let model = try closing.artifacts.model(closing.progress.currentModel)
        let budget = closing.plan.searchBudget(closing.progress)
        let best: SearchProgress.Candidate
        var served: [String]? = nil
        if let widths = plan.architecture {
            // A follow-up round: the architecture the search chose for this round's kinds.
            guard search.serving < search.models.count, search.models[search.serving].widths == widths else {
                throw CompressionError(.invalidArgument, "the follow-up round's architecture is not one its search chose")
            }
            served = search.models[search.serving].kinds
            let local = try closing.plan.localSearch(model, progress: closing.progress, kinds: served)
            if let scored = (search.finalists + search.candidates).first(where: { $0.widths == widths }) {
                best = scored
            } else {
                best = SearchProgress.Candidate(widths: widths, cost: try local.cost(try local.space.architecture(widths: widths)), score: nil)
            }
        } else if search.searchKinds.count > 1 {
            // Slowest kind first: it is this round's.
            var models: [CompressionReport.SearchSection.KindModel] = []
            var first: SearchProgress.Candidate?
            for table in search.latencyTables.sorted(by: { $0.fullMilliseconds > $1.fullMilliseconds }) {
                let local = try closing.plan.localSearch(model, progress: closing.progress, kinds: [table.kind])
                let chosen = try Self.chosen(search, kind: table.kind) {
                    budget.admits(try local.cost(try local.space.architecture(widths: $0.widths))) && Self.measuredWithin($0, budget, kind: table.kind)
                }
                let predicted = try local.cost(try local.space.architecture(widths: chosen.widths)).latencyMs
                first = first ?? chosen
                if let k = models.firstIndex(where: { $0.widths == chosen.widths }) {
                    models[k].kinds.append(table.kind)
                    models[k].latencyMs[table.kind] = predicted
                } else {
                    models.append(.init(kinds: [table.kind], widths: chosen.widths, macs: chosen.macs, parameterBytes: chosen.parameterBytes,
                                        latencyMs: predicted.map { [table.kind: $0] } ?? [:]))
                }
            }
            search.models = models
            search.serving = 0
            served = models[0].kinds
            best = first!
            closing.progress.audience = models.count > 1 ? BoardAudience(excluded: models.dropFirst().flatMap(\.kinds)) : nil
        } else {
            best = try Self.chosen(search, kind: nil) { Self.measuredWithin($0, budget, kind: nil) }
        }
        let local = try closing.plan.localSearch(model, progress: closing.progress, kinds: served)
        let architecture = try local.space.architecture(widths: best.widths)
        let cost = try local.cost(architecture)
        guard budget.admits(cost) else {
            throw CompressionError(.invalidStatistics, "the fittest candidate (\(cost.macs) MACs, \(cost.parameterBytes) bytes\(cost.latencyMs.map { String(format: ", %.3g ms", $0) } ?? "")) is over the budget")
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

    /// How far over a latency budget a finalist measured on the fleet may be and still be picked: the timing noise
    /// of a board (a 10–25 % drift over minutes is seen on shared machines; a median of medians narrows it).
    static let measuredTolerance = 0.05

    /// Whether `c`'s end-to-end times on the fleet (finalists under a latency budget; on `kind`, or on every kind
    /// measured) are within the budget, up to `measuredTolerance`. A candidate not measured passes.
    static func measuredWithin(_ c: SearchProgress.Candidate, _ budget: SearchBudget, kind: String?) -> Bool {
        guard let limit = budget.latencyMs, let measured = c.measuredMs else { return true }
        let times = kind.map { measured[$0].map { [$0] } ?? [] } ?? Array(measured.values)
        return times.allSatisfy { $0 <= limit * (1 + measuredTolerance) }
    }

    /// The operator's pick for `kind` (`round pick`), else the best candidate `admitted` lets through.
    static func chosen(_ search: SearchProgress, kind: String?, admitted: (SearchProgress.Candidate) throws -> Bool) throws -> SearchProgress.Candidate {
        if let widths = search.picked[SearchProgress.pickKey(kind)],
           let picked = (search.finalists + search.candidates).first(where: { $0.widths == widths }) {
            return picked
        }
        return try best(search, admitted: admitted)
    }

    /// The best candidate `admitted` lets through: after finalists, the best held-out figure among them (accuracy
    /// with labels, else agreement with the original, else the loss); else the fittest candidate. The earliest
    /// among equals (the uniform architecture first).
    static func best(_ search: SearchProgress, admitted: (SearchProgress.Candidate) throws -> Bool) throws -> SearchProgress.Candidate {
        func figure(_ c: SearchProgress.Candidate) -> Double { c.accuracy ?? c.agreement ?? c.fitness }
        func earliestMax(_ list: [SearchProgress.Candidate], _ value: (SearchProgress.Candidate) -> Double) -> SearchProgress.Candidate? {
            list.enumerated().max { a, b in
                value(a.element) != value(b.element) ? value(a.element) < value(b.element) : a.offset > b.offset
            }?.element
        }
        func within(_ list: [SearchProgress.Candidate]) throws -> [SearchProgress.Candidate] {
            var out: [SearchProgress.Candidate] = []
            for c in list where c.samples > 0 { if try admitted(c) { out.append(c) } }
            return out
        }
        if let decided = earliestMax(try within(search.finalists), figure) { return decided }
        // No finalist passed (measured over the budget): the fittest candidate that was not one of them.
        let rejected = Set(search.finalists.map(\.widths))
        guard let fittest = earliestMax(try within(search.candidates).filter { !rejected.contains($0.widths) }, \.fitness) else {
            throw CompressionError(.invalidStatistics, "the search scored no candidate within the budget on any sample; there is nothing to pick")
        }
        return fittest
    }
}

/// Workers: the task's model's latency table on the worker's hardware (`LatencyTableBuilder`, timed with the agent's
/// clock, one worker per machine at a time like evaluation). The task's candidates are the anchors (the uniform
/// architectures at the grid's ladder fractions). The coordinator merges the tables per kind of board (instruction
/// set and threads; each point the median of the kind's boards), then checks the latency budget is reachable.
struct LatencyPhase: PhaseHandler {
    var kind: PhaseKind { .latency }
    var timesModels: Bool { true }

    /// What a kept table is filed under: the model, batch, kind of board and anchors it was measured for.
    static func key(_ task: Whittle_Task, machine: String, threads: Int) -> String {
        [task.modelSha256, "\(task.latencyBatch)", machine, "\(threads)"].joined(separator: "|") + "|"
            + task.candidates.map { $0.widths.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",") }.joined(separator: ";")
    }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        guard let plan = engine.plan.search else { throw CompressionError(.invalidArgument, "a latency phase in a round that searches nothing") }
        let local = try engine.plan.localSearch(model)
        var builder = LatencyTableBuilder(machine: "", threads: 0) { _, _ in 0 }
        builder.batch = plan.latencyBatch
        builder.points = plan.latencyGrid
        var e = PhaseExpectation(kind: kind)
        let anchors = builder.anchors(costs: local.costs)
        e.candidates = anchors.map(\.widths)
        e.anchorFractions = anchors.map(\.fraction)
        e.latencyBatch = plan.latencyBatch
        e.latencyGrid = try builder.grid(base: model, costs: local.costs)
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { LatencyAggregate() }

    func close(_ closing: inout PhaseClosing) throws {
        let gathered = try closing.gathered()
        let kinds = Dictionary(grouping: gathered.latencyTables, by: \.kind)
        var search = closing.progress.search ?? SearchProgress()
        search.latencyTables = try kinds.keys.sorted().compactMap { try LatencyTable.merged(kinds[$0]!) }
        closing.progress.search = search
        let local = try closing.plan.localSearch(try closing.artifacts.model(closing.progress.currentModel), progress: closing.progress)
        try closing.plan.searchBudget(closing.progress).check(smallest: try local.cost(local.space.narrowest))
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        guard let probe = job.latency else { throw CompressionError(.invalidArgument, "a latency task needs the worker's clock") }
        guard job.task.latencyBatch >= 1, job.task.latencyBatch <= 4096, job.task.candidates.count >= 2, job.task.candidates.count <= 16 else {
            throw CompressionError(.invalidArgument, "the latency task asks for batch \(job.task.latencyBatch) and \(job.task.candidates.count) anchors")
        }
        let cutter = try CandidateCutter(job.model)
        var builder = LatencyTableBuilder(machine: Kernels.cpuInstructionSet, threads: ComputeThreads.current) { session, inputs in
            try probe.median(session, inputs: inputs)
        }
        builder.batch = Int(job.task.latencyBatch)
        // The anchors' fractions are the coordinator's to pair with the times; here only their order matters.
        let key = Self.key(job.task, machine: builder.machine, threads: builder.threads)
        let table: LatencyTable
        let anchors = try job.task.candidates.map { try cutter.model($0) }
        // A kept table must still be the one this task asks for (a file can be damaged or edited).
        if !job.task.modelSha256.isEmpty, let kept = job.latencyTables.table(key),
           builder.fits(kept, grid: try builder.grid(base: job.model, anchors: anchors), anchors: anchors.count) {
            table = kept
        } else {
            table = try builder.build(base: job.model, anchors: anchors.enumerated().map { (Double($0.offset), $0.element) })
            if !job.task.modelSha256.isEmpty { job.latencyTables.keep(table, key) }
        }
        var out = Whittle_LatencyTableReport()
        out.machine = table.machine
        out.threads = UInt32(clamping: table.threads)
        out.batch = UInt32(clamping: table.batch)
        out.layers = table.layers.map { l in
            var e = Whittle_LayerLatencyEntry()
            e.node = l.node
            e.opType = l.opType
            e.outputs = l.outputs.map { UInt32(clamping: $0) }
            e.inputs = l.inputs.map { UInt32(clamping: $0) }
            e.milliseconds = l.milliseconds.flatMap { $0 }
            return e
        }
        out.anchorMilliseconds = table.anchors.map(\.milliseconds)
        var report = Whittle_TaskReport()
        report.latencyTable = out
        return report
    }
}

/// Where a worker keeps the latency tables it measured, by `LatencyPhase.key` (the agent's keeps them on disk).
public protocol LatencyTableKeeping: Sendable {
    func table(_ key: String) -> LatencyTable?
    func keep(_ table: LatencyTable, _ key: String)
}

/// Latency tables in memory: by default, the tables this worker process measured, so a later round over the same
/// model reuses its table instead of timing every layer again (the agent keeps them on disk as well).
public final class LatencyTableCache: LatencyTableKeeping, @unchecked Sendable {
    public static let process = LatencyTableCache()
    private let lock = NSLock()
    private var tables: [String: LatencyTable] = [:]
    public init() {}
    public func table(_ key: String) -> LatencyTable? { lock.lock(); defer { lock.unlock() }; return tables[key] }
    public func keep(_ table: LatencyTable, _ key: String) { lock.lock(); tables[key] = table; lock.unlock() }
}

/// The workers' latency tables, each checked against the grid the phase expects.
struct LatencyAggregate: PhaseAggregate {
    var tables: [LatencyTable] = []
    /// The most milliseconds a point may claim (an hour).
    static let maximumMilliseconds = 3.6e6

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .latencyTable(let m)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        guard !m.machine.isEmpty, m.machine.utf8.count <= 64, m.threads >= 1, m.threads <= 1 << 16 else {
            throw PhaseAccumulator.refuse("the latency table names machine '\(m.machine.prefix(64))' with \(m.threads) threads")
        }
        guard Int(m.batch) == e.latencyBatch else { throw PhaseAccumulator.refuse("the latency table is for batch \(m.batch), not \(e.latencyBatch)") }
        guard m.layers.count == e.latencyGrid.count, m.anchorMilliseconds.count == e.anchorFractions.count else {
            throw PhaseAccumulator.refuse("the latency table has \(m.layers.count) layers and \(m.anchorMilliseconds.count) anchors; the phase expects \(e.latencyGrid.count) and \(e.anchorFractions.count)")
        }
        func plausible(_ v: Double) -> Bool { v.isFinite && v > 0 && v <= Self.maximumMilliseconds }
        var layers: [LayerLatency] = []
        for (entry, expected) in zip(m.layers, e.latencyGrid) {
            guard entry.node == expected.node, entry.opType == expected.opType,
                  entry.outputs.map(Int.init) == expected.outputs, entry.inputs.map(Int.init) == expected.inputs else {
                throw PhaseAccumulator.refuse("the latency table's entry for '\(entry.node.prefix(80))' is not the grid the phase expects")
            }
            guard entry.milliseconds.count == expected.outputs.count * expected.inputs.count, entry.milliseconds.allSatisfy(plausible) else {
                throw PhaseAccumulator.refuse("the latency table's times for '\(entry.node.prefix(80))' are missing, not positive or not finite")
            }
            let width = expected.inputs.count
            layers.append(LayerLatency(node: expected.node, opType: expected.opType, outputs: expected.outputs, inputs: expected.inputs,
                                       milliseconds: (0..<expected.outputs.count).map { Array(entry.milliseconds[($0 * width)..<(($0 + 1) * width)]) }).monotone)
        }
        guard m.anchorMilliseconds.allSatisfy(plausible) else { throw PhaseAccumulator.refuse("the latency table's end-to-end times are not positive and finite") }
        tables.append(LatencyTable(machine: m.machine, threads: Int(m.threads), batch: Int(m.batch), layers: layers,
                                   anchors: zip(e.anchorFractions, m.anchorMilliseconds).map { LatencyTable.Anchor(fraction: $0, milliseconds: $1) }))
        return 1
    }
}

/// Workers: the search's finalists (the uniform architecture and the fittest others), each cut, its batch norm
/// re-estimated and fine-tuned for the task's local epochs on four fifths of the worker's data (distilled from the
/// task's model without labels or with --distill), then scored on the other fifth (every fifth sample) against the
/// task's model; the
/// coordinator sums the scores per finalist and `pick` takes the best. The loss after adaptive batch norm alone
/// ranks architectures before training, not after it (benchmarks/README.md, "Architecture search").
struct FinalistsPhase: PhaseHandler {
    var kind: PhaseKind { .finalists }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        guard let plan = engine.plan.search, let search = progress.search else {
            throw CompressionError(.invalidArgument, "a finalists phase before any search generation")
        }
        var e = PhaseExpectation(kind: kind)
        e.candidates = search.finalistCandidates(plan.finalists).map(\.widths)
        e.adaptationBatches = plan.adaptationBatches
        // Under a latency budget the boards that can also time each finalist end to end.
        e.latencyBatch = plan.measuresLatency ? plan.latencyBatch : 0
        return e
    }

    func configure(_ task: inout Whittle_Task, _ engine: RoundEngine, phase: Phase, progress: RoundProgress) {
        task.localEpochs = UInt32(clamping: engine.plan.search?.finalistEpochs ?? 1)
        task.learningRate = engine.plan.learningRate
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate {
        SearchAggregate(count: expectation.candidates.count)
    }

    func close(_ closing: inout PhaseClosing) throws {
        var search = closing.progress.search ?? SearchProgress()
        search.finalists = try SearchPhase.scored(closing)
        // Per kind of board, each finalist's median over the kind's boards.
        for (boardKind, boards) in try closing.gathered().searchTimings {
            for k in search.finalists.indices {
                search.finalists[k].measuredMs = (search.finalists[k].measuredMs ?? [:])
                    .merging([boardKind: LatencyTable.median(boards.map { $0[k] })]) { $1 }
            }
        }
        closing.progress.search = search
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        // Every fifth sample held out (local data is often ordered by class or time; a tail would not be a sample).
        guard job.task.localEpochs <= 1000 else {
            throw CompressionError(.invalidArgument, "the finalists task asks for \(job.task.localEpochs) local epochs (at most 1000)")
        }
        let n = job.data.count
        let heldIndices = (0..<n).filter { $0 % 5 == 4 }, trainIndices = (0..<n).filter { $0 % 5 != 4 }
        guard !heldIndices.isEmpty, trainIndices.count >= 2 else {
            throw CompressionError(.invalidArgument, "comparing finalists needs at least 5 local samples (\(n) here)")
        }
        let train = try job.data.subset(trainIndices), heldOut = try job.data.subset(heldIndices)
        let task = try WorkerJobs.taskKind(job.task, model: job.model, data: job.data)
        let cutter = try CandidateCutter(job.model)
        var local = LocalCompression()
        local.batchSize = job.batchSize
        local.seed = job.task.seed
        local.finetuneLearningRate = job.task.learningRate > 0 && job.task.learningRate.isFinite ? job.task.learningRate : 0.01
        if let optimizer = LocalOptimizer(rawValue: job.task.optimizer) { local.finetuneOptimizer = optimizer.kind }
        let reference = try local.logits(try InferenceSession(model: job.model), heldOut)
        let teacher = job.task.distill || train.labels == nil ? try InferenceSession(model: job.teacher ?? job.model) : nil
        var out = Whittle_SearchScores()
        // Under a latency budget a board with a clock also times each finalist end to end at the latency batch.
        let timed = job.task.latencyBatch > 0 ? job.latency : nil
        guard job.task.latencyBatch <= 4096 else { throw CompressionError(.invalidArgument, "the finalists task asks for latency batch \(job.task.latencyBatch)") }
        for candidate in job.task.candidates {
            var m = try CandidateEvaluation.adaptBatchNorm(try cutter.model(candidate), data: train, batchSize: job.batchSize,
                                                           batches: max(Int(job.task.adaptationBatches), 1))
            (m, _) = try local.finetune(m, teacher: teacher, data: train, epochs: max(Int(job.task.localEpochs), 1), task: task)
            out.scores.append(Whittle_CandidateScore(try CandidateEvaluation.score(m, data: heldOut, baseOutputs: reference,
                                                                                  task: task, batchSize: job.batchSize)))
            if let timed {
                out.milliseconds.append(try LatencyTableBuilder.endToEnd(m, batch: Int(job.task.latencyBatch), probe: timed))
            }
        }
        if timed != nil {
            out.machine = Kernels.cpuInstructionSet
            out.threads = UInt32(ComputeThreads.current)
        }
        out.samples = UInt64(heldOut.count)
        var report = Whittle_TaskReport()
        report.search = out
        return report
    }

    func backpropagates(_ task: Whittle_Task) -> Bool { true }
}
