import Foundation
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittlePrivacy
import WhittleProtocol
import WhittleTensor

/// A round's durable progress (stored as JSON with the round after every transition): which models the round
/// is at, the pruning decisions composed so far, calibration results, per-phase and per-worker rows.
public struct RoundProgress: Codable, Sendable {
    /// The round's starting model: teacher, pseudo-labeller and evaluation baseline (artifact SHA-256).
    public var baseModel: String
    /// The float model the next phase works on.
    public var currentModel: String
    /// The fine-tuned float model before quantization (a later round can start from it).
    public var floatModel: String?
    /// The exported model the fleet receives.
    public var finalModel: String?
    /// EWC's Fisher and reference parameters (an EWCState artifact).
    public var ewcState: String?
    /// FedAvgM's velocity (a WeightUpdate artifact holding it as `deltas`), while fine-tuning rounds run.
    public var serverVelocity: String?
    public var originalChannels: [String: Int] = [:]
    public var originalIndex: [String: [Int]] = [:]
    public var pruning: CompressionReport.PruningSection?
    /// The merged pass-1 ranges (kept for the export after the histogram pass).
    public var rangeStatistics: [String: RangeStatistics]?
    public var histogramUpper: [String: Float]?
    /// The calibrated activation ranges ([min, max] per tensor), fixed once the calibration phases close.
    public var calibrated: [String: [Float]]?
    public var calibration: CompressionReport.CalibrationSection?
    public var quantization: QuantizationSummary?
    public var phases: [CompressionReport.PhaseRow]
    public var sites: [String: CompressionReport.Site] = [:]
    public var before: CompressionReport.Figures?
    public var after: CompressionReport.Figures?
    public var agreement: Double?
    /// The evaluation's task (as the workers reported it), relative error and mean cosine (embeddings).
    public var task: TaskKind?
    public var relativeError: Double?
    public var meanCosine: Double?
    public var renamedValues: [String: String]?
    /// The median L2 norm of the updates of the last training phase closed (the next phase's clipping bound is a
    /// multiple of it).
    public var updateNormMedian: Double?
    /// An architecture search's generations and choice.
    public var search: SearchProgress?
    /// The boards this round's final model is for (a search that made one model per kind of board); nil: every
    /// board.
    public var audience: BoardAudience?
    /// The round's secure-aggregation session (`RoundPlan.secureAggregation`), from its key phase on.
    public var secure: SecureProgress?
    /// A private round's noise and accounting (`RoundPlan.privacy`), fixed when it starts.
    public var privacy: PrivacyProgress?

    public init(plan: RoundPlan, baseModel: String, startModel: String) {
        self.baseModel = baseModel
        currentModel = startModel
        phases = plan.phases.enumerated().map { CompressionReport.PhaseRow(index: $0, kind: $1.kind.rawValue, label: $1.label) }
    }
}

/// An architecture search's durable state: every generation's candidates with the fleet's merged scores (the search
/// replays from their fitness, so the next generation is the same after a restart), and the candidate `pick` chose.
public struct SearchProgress: Codable, Sendable, Equatable {
    public typealias Candidate = CompressionReport.SearchSection.Candidate

    /// The candidates of each closed generation, in the order they were scored; the first of the first generation is
    /// the uniform architecture that fills the budget (the reference).
    public var generations: [[Candidate]] = []
    public var chosen: Candidate?
    /// The finalists after their short fine-tuning on the fleet (scored on the workers' held-out samples).
    public var finalists: [Candidate] = []
    /// The fleet's latency tables, one per kind of board (each the median of its boards' tables), by kind.
    public var latencyTables: [LatencyTable] = []
    /// One model per kind of board when the fleet holds several (`pick`): the first is this search's round's, each
    /// other a follow-up round's.
    public var models: [CompressionReport.SearchSection.KindModel] = []
    /// Which of `models` this round makes (0 in the round that searched).
    public var serving = 0
    /// Boards left out of the latency tables because they cannot time models.
    public var untimed: [String] = []
    /// The operator's picks (`round pick`), by kind of board ("" with one search for every board): the widths.
    public var picked: [String: [String: Int]] = [:]
    /// The operator let the round pick for the kinds it did not pick for.
    public var pickRest = false

    public init() {}

    enum CodingKeys: String, CodingKey {
        case generations, chosen, finalists, latencyTables, models, serving, untimed, picked, pickRest
    }

    /// Fields added later default when a stored progress lacks them.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        generations = try c.decodeIfPresent([[Candidate]].self, forKey: .generations) ?? []
        chosen = try c.decodeIfPresent(Candidate.self, forKey: .chosen)
        finalists = try c.decodeIfPresent([Candidate].self, forKey: .finalists) ?? []
        latencyTables = try c.decodeIfPresent([LatencyTable].self, forKey: .latencyTables) ?? []
        models = try c.decodeIfPresent([CompressionReport.SearchSection.KindModel].self, forKey: .models) ?? []
        serving = try c.decodeIfPresent(Int.self, forKey: .serving) ?? 0
        untimed = try c.decodeIfPresent([String].self, forKey: .untimed) ?? []
        picked = try c.decodeIfPresent([String: [String: Int]].self, forKey: .picked) ?? [:]
        pickRest = try c.decodeIfPresent(Bool.self, forKey: .pickRest) ?? false
    }

    /// The key of `picked` for a kind searched for (`searchKinds`).
    public static func pickKey(_ kind: String?) -> String { kind ?? "" }

    /// Whether `pick` can run under `rule`: the round picks, or the operator has picked for every kind searched for
    /// (or let the round pick the rest).
    public func picksReady(_ rule: PickRule?) -> Bool {
        rule != .operator || pickRest || searchKinds.allSatisfy { picked[Self.pickKey($0)] != nil }
    }

    /// Every candidate, in evaluation order.
    public var candidates: [Candidate] { generations.flatMap { $0 } }

    /// The kinds of board searched for separately: each kind in the latency tables when there are several (each
    /// generation then holds a population per kind, under the budget on that kind's hardware); else one search for
    /// every board.
    public var searchKinds: [String?] { latencyTables.count > 1 ? latencyTables.map(\.kind) : [nil] }

    /// The finalists a short fine-tuning decides between: per kind searched for, its first candidate (the uniform
    /// architecture under its budget) and its `count − 1` fittest others; an architecture proposed for several
    /// kinds once.
    public func finalistCandidates(_ count: Int) -> [Candidate] {
        var out: [Candidate] = []
        for kind in searchKinds {
            let all = candidates.filter { $0.kind == kind }
            guard let first = all.first else { continue }
            let ranked = all.dropFirst().enumerated().sorted { a, b in
                a.element.fitness != b.element.fitness ? a.element.fitness > b.element.fitness : a.offset < b.offset
            }.map(\.element)
            for c in [first] + ranked.filter({ $0.widths != first.widths }).prefix(max(count - 1, 0))
            where !out.contains(where: { $0.widths == c.widths }) {
                out.append(c)
            }
        }
        return out
    }

    /// The fittest candidate (the earliest among equals).
    public var fittest: Candidate? {
        candidates.enumerated().max { a, b in a.element.fitness != b.element.fitness ? a.element.fitness < b.element.fitness : a.offset > b.offset }?.element
    }
}

/// The boards a round's final model is for: a search over several kinds of board makes one model per architecture
/// it chose, each evaluated on and distributed to the boards of its kinds only.
public struct BoardAudience: Codable, Sendable, Equatable {
    /// The kinds served (nil: every kind not in `excluded`, and boards that did not say their kind).
    public var kinds: [String]?
    /// Kinds another round's model serves.
    public var excluded: [String] = []

    public init(kinds: [String]? = nil, excluded: [String] = []) {
        self.kinds = kinds
        self.excluded = excluded
    }

    public func includes(_ kind: String?) -> Bool {
        if let kinds { return kind.map(kinds.contains) ?? false }
        return !(kind.map(excluded.contains) ?? false)
    }
}

/// The coordinator's side of a round's phases. Pure: models and aggregates in, models and progress out; the
/// service stores artifacts and state.
public struct RoundEngine: Sendable {
    public let plan: RoundPlan
    /// The round's id (a secure round's session is derived from it).
    public var round: String

    public init(plan: RoundPlan, round: String = "") {
        self.plan = plan
        self.round = round
    }

    /// The round that makes the next model of a search over several kinds of board, once `progress`'s round has
    /// made its own: the same plan with the chosen architecture instead of a search (`SearchPlan.architecture`),
    /// from the same base model, evaluated on and distributed to the next model's kinds only. Nil when every model
    /// is made.
    public func followUp(_ progress: RoundProgress) -> (plan: RoundPlan, progress: RoundProgress)? {
        guard var search = progress.search, search.serving + 1 < search.models.count, var next = plan.search else { return nil }
        search.serving += 1
        search.chosen = nil
        next.architecture = search.models[search.serving].widths
        var followUp = plan
        followUp.search = next
        followUp.modelSHA256 = progress.baseModel
        followUp.fromRound = nil
        var start = RoundProgress(plan: followUp, baseModel: progress.baseModel, startModel: progress.baseModel)
        start.search = search
        start.audience = BoardAudience(kinds: search.models[search.serving].kinds)
        return (followUp, start)
    }

    /// What a worker phase accepts, from the model its tasks carry (the phase kind's handler says).
    public func expectation(_ phase: Phase, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        var e = try PhaseHandlers.handler(phase.kind).expectation(self, model: model, progress: progress)
        if plan.secureAggregation == true, RoundPlan.securelySummed.contains(phase.kind) {
            try SecurePhases.sumExpectation(&e, self, phase: phase, model: model, progress: progress)
        }
        return e
    }

    /// The workers a phase is for, when not every worker that can do it: a secure round's parties, sums' partners
    /// and contributors. Nil: any worker.
    public func eligible(_ phase: Phase, progress: RoundProgress) -> Set<String>? {
        guard plan.secureAggregation == true else { return nil }
        let secure = progress.secure
        switch phase.kind {
        case .secureKeys: return nil
        case .secureShares: return Set(secure?.parties ?? [])
        case .unmask: return Set(secure?.pending?.contributors ?? [])
        case let kind where RoundPlan.securelySummed.contains(kind):
            guard let secure, let j = plan.secureSum(of: phase) else { return [] }
            return secure.partners(sum: j)
        default: return nil
        }
    }

    /// The task as one worker receives it: the phase's task (`task`) with what is the worker's own in a secure
    /// round (its party name, its neighbours' keys, its envelopes, its partners, the shares asked of it).
    public func personalize(_ task: inout Whittle_Task, worker: String, phase: Phase, progress: RoundProgress,
                            artifacts: any RoundArtifacts) throws {
        guard task.hasSecure else { return }
        task.secure.party = worker
        guard phase.kind != .secureKeys, let secure = progress.secure else { return }
        let setup = try secure.setup()
        let neighbours = setup.neighbours(of: worker)
        switch phase.kind {
        case .secureShares:
            let all = try SecurePhases.advertisements(secure, artifacts)
            task.secure.advertisements = Dictionary(uniqueKeysWithValues: neighbours.compactMap { v in all[v].map { (v, SecurePhases.message($0)) } })
        case .unmask:
            guard let pending = secure.pending else { return }
            let partners = neighbours.filter(Set(pending.partners).contains)
            task.secure.partners = partners
            task.secure.survivors = partners.filter(Set(pending.contributors).contains)
            task.secure.dropped = partners.filter { !pending.contributors.contains($0) }
        default:
            guard let j = plan.secureSum(of: phase) else { return }
            task.secure.partners = neighbours.filter(secure.partners(sum: j).contains)
            if let sha = secure.envelopes[worker] {
                task.secure.envelopes = try Whittle_SecureEnvelopes(serializedBytes: try artifacts.bytes(sha)).envelopes
            }
        }
    }

    /// Closes a worker phase with what it gathered (a secure sum keeps its masked total for the unmask phase).
    public func close(_ closing: inout PhaseClosing) throws {
        if let masked = closing.accumulator?.aggregate as? MaskedAggregate {
            try SecurePhases.closeMasked(&closing, masked)
        } else {
            try PhaseHandlers.handler(closing.phase.kind).close(&closing)
        }
    }

    /// The model a phase's tasks carry: the exported one for evaluation and distribution, else the current one.
    public func taskModel(_ phase: Phase, progress: RoundProgress) -> String {
        PhaseHandlers.handler(phase.kind).carriesFinalModel ? (progress.finalModel ?? "") : progress.currentModel
    }

    /// The task a worker phase hands out (the same for every worker): the round's fields, then the kind's own.
    public func task(_ phase: Phase, index: Int, round: String, progress: RoundProgress, expectation: PhaseExpectation,
                     deadline: Double, artifactBytes: (String) -> Int) -> Whittle_Task {
        var t = Whittle_Task()
        t.roundID = round
        t.phase = UInt32(index)
        t.kind = phase.kind.rawValue
        let model = taskModel(phase, progress: progress)
        t.modelSha256 = model
        t.modelBytes = UInt64(artifactBytes(model))
        t.teacherSha256 = progress.baseModel
        t.teacherBytes = UInt64(artifactBytes(progress.baseModel))
        t.criterion = plan.importance.rawValue
        t.localEpochs = UInt32(plan.localEpochs)
        // Counted without secure aggregation's own phases, so a secure round shuffles as the same round in the clear.
        t.seed = plan.seed &+ UInt64(plan.phases[..<min(index, plan.phases.count)].filter { !RoundPlan.secureProtocol.contains($0.kind) }.count)
        t.distill = plan.distill
        t.taskKind = plan.task?.rawValue ?? ""
        t.compressDeltas = plan.deltaCompression == .int8
        t.tensors = expectation.tensors.sorted()
        t.histogramUpper = expectation.histogramUpper
        t.histogramBins = UInt32(expectation.histogramBins)
        t.candidates = expectation.candidates.map { widths in
            var w = Whittle_ArchitectureWidths()
            w.widths = widths.mapValues { UInt32(clamping: $0) }
            return w
        }
        t.adaptationBatches = UInt32(clamping: expectation.adaptationBatches)
        t.latencyBatch = UInt32(clamping: expectation.latencyBatch)
        t.deadline = deadline
        t.batchSize = UInt32(plan.batchSize)
        t.optimizer = plan.optimizer.rawValue
        PhaseHandlers.handler(phase.kind).configure(&t, self, phase: phase, progress: progress)
        if let secure = expectation.secure { t.secure = SecurePhases.task(secure) }
        return t
    }

    /// Prunes step `step` of the schedule: scores from the model (data-free criteria) or from the merged
    /// importance statistics, the plan's selection against the original channel counts, surgery. Records the
    /// decisions in `progress`.
    public func prune(step: Int, model: Model, importance: ImportanceStatistics?, progress: inout RoundProgress) throws -> Model {
        let groups = try ChannelGroups(model: model)
        var schedule = progress.pruning.map {
            PruningSchedule(originalChannels: progress.originalChannels, originalIndex: progress.originalIndex, section: $0)
        } ?? PruningSchedule(groups: groups, options: plan.pruningOptions, steps: plan.steps,
                             finetuneEpochs: plan.localEpochs * plan.finetuneRounds, distill: plan.distill)
        if plan.importance.needsData, (importance?.samples ?? 0) == 0 {
            throw CompressionError(.invalidStatistics, "no importance statistics were gathered for pruning step \(step + 1)")
        }
        let kept = try schedule.select(model, groups: groups, ratio: plan.steps[step], statistics: plan.importance.needsData ? importance : nil)
        let pruned = try schedule.apply(kept, to: model, groups: groups, ratio: plan.steps[step])
        try schedule.decide(pruned)
        progress.originalChannels = schedule.originalChannels
        progress.originalIndex = schedule.originalIndex
        progress.pruning = schedule.section
        return pruned
    }

    /// Closes a fine-tuning phase: the aggregated delta (with server momentum: the updated velocity `velocity`,
    /// scaled by the server learning rate) applied to the model; the mean local loss recorded. Returns the model and
    /// the new velocity (nil without server momentum).
    public func finetuned(_ model: Model, _ accumulator: PhaseAccumulator, velocity: [String: Tensor]?,
                          progress: inout RoundProgress) throws -> (Model, [String: Tensor]?) {
        var step = try accumulator.delta()
        var next: [String: Tensor]?
        if plan.serverMomentum > 0 || plan.serverLearningRate != 1 {
            // The server optimizer steps the parameters only: running statistics are estimates, not descent
            // directions; extrapolating a variance's delta (or carrying momentum on it) can drive it negative.
            let statistics = Self.runningStatistics(model)
            var v: [String: Tensor] = [:]
            let beta = Float(plan.serverMomentum), eta = Float(plan.serverLearningRate)
            for (name, d) in step where !statistics.contains(name) {
                let previous = velocity?[name].flatMap { $0.shape == d.shape ? $0 : nil }
                v[name] = Tensor(shape: d.shape, floats: previous.map { zip($0.floats, d.floats).map { beta * $0 + $1 } } ?? d.floats)
            }
            next = plan.serverMomentum > 0 ? v : nil
            for (name, velocity) in v {
                step[name] = Tensor(shape: velocity.shape, floats: velocity.floats.map { eta * $0 })
            }
        }
        var out = try applying(step, to: model)
        // A running variance stays a variance: the mean of the workers' is never negative, but a private round's noise
        // (or a server step) can push it below zero, which would make the folded weights NaN.
        let index = out.graph.initializerIndex
        for node in out.graph.nodes where node.opType == "BatchNormalization" && node.inputs.count == 5 {
            guard let k = index[node.inputs[4]], let v = out.graph.initializers[k].tensor, v.floats.contains(where: { $0 < 0 }) else { continue }
            out.graph.initializers[k].setTensor(Tensor(shape: v.shape, floats: v.floats.map { max($0, 0) }))
        }
        for initializer in out.graph.initializers {
            if let t = initializer.tensor, t.dtype.isFloatingPoint, !t.floats.allSatisfy(\.isFinite) {
                throw CompressionError(.invalidStatistics,
                    "the aggregated update makes parameter '\(initializer.name)' non-finite; the model was not changed")
            }
        }
        progress.updateNormMedian = accumulator.medianUpdateNorm
        let losses = accumulator.losses
        // A private round's sums carry no loss.
        if !losses.isEmpty, plan.privacy == nil, var section = progress.pruning, !section.steps.isEmpty {
            section.steps[section.steps.count - 1].finetuneLoss.append(losses.reduce(0, +) / Double(losses.count))
            progress.pruning = section
        }
        return (out, next)
    }

    /// The running mean and variance initializers of every BatchNormalization.
    public static func runningStatistics(_ model: Model) -> Set<String> {
        Set(model.graph.nodes.filter { $0.opType == "BatchNormalization" && $0.inputs.count == 5 }.flatMap { $0.inputs[3...4] })
    }

    /// Each BatchNormalization input and its channel count.
    public static func normalizationInputs(_ model: Model) -> [String: Int] {
        var out: [String: Int] = [:]
        for node in model.graph.nodes where node.opType == "BatchNormalization" && node.inputs.count == 5 {
            if let scale = model.graph.initializer(named: node.inputs[1]) { out[node.inputs[0]] = scale.shape.first ?? 0 }
        }
        return out
    }

    /// Closes a batch-norm statistics pass: every BatchNormalization's running mean and (population) variance set to
    /// the merged per-channel moments of its input over the fleet's data.
    public func renormalized(_ model: Model, _ accumulator: PhaseAccumulator) throws -> Model {
        var out = model
        let index = model.graph.initializerIndex
        for node in model.graph.nodes where node.opType == "BatchNormalization" && node.inputs.count == 5 {
            guard let s = accumulator.importance.channels[node.inputs[0]], s.valuesPerChannel > 0,
                let m = index[node.inputs[3]], let v = index[node.inputs[4]] else { continue }
            let n = Double(s.valuesPerChannel)
            let mean = s.sums.map { $0 / n }
            let variance = zip(s.squaredSums, mean).map { max($0 / n - $1 * $1, 0) }
            out.graph.initializers[m].setTensor(Tensor(shape: [mean.count], floats: mean.map { Float($0) }))
            out.graph.initializers[v].setTensor(Tensor(shape: [variance.count], floats: variance.map { Float($0) }))
        }
        return out
    }

    /// The EWC artifact from a closed Fisher phase: the diagonal Fisher and the reference parameters.
    public func ewcState(_ model: Model, _ accumulator: PhaseAccumulator) throws -> [UInt8] {
        var state = Whittle_EWCState()
        let fisher = try accumulator.fisher()
        state.fisher = fisher.mapValues(Whittle_FloatTensor.init)
        for name in fisher.keys {
            if let t = model.graph.initializer(named: name)?.tensor { state.reference[name] = Whittle_FloatTensor(t) }
        }
        return try state.serializedBytes()
    }

    /// Closes the range pass: the histogram edges everyone bins over, [0, merged absMax] per tensor.
    public func histogramEdges(_ accumulator: PhaseAccumulator) -> [String: Float] {
        accumulator.ranges.mapValues(\.absMax)
    }

    /// Closes the calibration: the calibrators on the merged pass-1 ranges and (histogram methods) pass-2
    /// histograms; the ranges stay fixed through QAT and the export.
    public func calibrate(ranges: [String: RangeStatistics], histograms: [String: Histogram], samples: Int,
                          progress: inout RoundProgress) throws {
        let calibrated = try LocalCompression.calibratedRanges(ranges: ranges, histograms: histograms, policy: plan.quantizationPolicy)
        progress.calibrated = calibrated.mapValues { [$0.min, $0.max] }
        progress.calibration = CompressionReport.CalibrationSection(method: plan.calibration, samples: samples,
                                                                    tensors: calibrated.count, seconds: 0)
    }

    /// The export: QDQ with the calibrated ranges. Without quantization, the float model as it is.
    public func export(_ model: Model, progress: inout RoundProgress) throws -> Model {
        var out = model
        if plan.quantize != .none {
            guard let calibrated = progress.calibrated else {
                throw CompressionError(.invalidStatistics, "the export has no calibrated ranges")
            }
            let (quantized, summary) = try QDQExport.export(model, ranges: calibrated.mapValues { ($0[0], $0[1]) },
                                                            policy: plan.quantizationPolicy)
            progress.quantization = summary
            out = quantized
        }
        if plan.compactNames { (out, progress.renamedValues) = GraphEditing.compactNames(out) }
        return out
    }

    /// Closes the evaluation: per-site rows and fleet-wide figures, the task's sums added over the sites (accuracy
    /// and mean IoU over the labelled sites' samples, agreement and relative error over every site's).
    public func evaluated(base: Model, final: Model, _ accumulator: PhaseAccumulator, baseBytes: Int, finalBytes: Int,
                          progress: inout RoundProgress) throws {
        var fleet: TaskEvaluation?, labelled: TaskEvaluation?
        for (worker, message) in accumulator.evaluations.sorted(by: { $0.key < $1.key }) {
            let e = try message.decoded()
            var site = progress.sites[worker] ?? CompressionReport.Site(worker: worker, samples: e.samples, labels: e.labelled)
            site.samples = e.samples
            site.labels = e.labelled
            site.agreement = e.agreementRate
            site.accuracyBefore = e.baseAccuracy
            site.accuracyAfter = e.compressedAccuracy
            site.meanIoUBefore = e.baseMeanIoU
            site.meanIoUAfter = e.compressedMeanIoU
            site.relativeError = e.relativeError
            site.meanCosine = e.meanCosine
            site.latencyBeforeMs = message.baseLatencyMs
            site.latencyAfterMs = message.compressedLatencyMs
            let latency = try message.decodedLatency()
            site.latency = latency.isEmpty ? nil : latency
            site.threads = message.threads > 0 ? Int(message.threads) : nil
            site.cpu = message.cpu.isEmpty ? nil : message.cpu
            progress.sites[worker] = site
            if fleet == nil { fleet = e } else { try fleet!.merge(e) }
            if e.labelled {
                if labelled == nil { labelled = e } else { try labelled!.merge(e) }
            }
        }
        let shapes = try ShapeInference.sampleShapes(base, sizes: plan.inputSizes ?? [:])
        let baseSummary = try ModelSummary(model: base, inputShapes: shapes), finalSummary = try ModelSummary(model: final, inputShapes: shapes)
        let samples = labelled?.samples ?? fleet?.samples ?? 0
        progress.before = CompressionReport.Figures(bytes: baseBytes, parameters: baseSummary.parameters, macs: baseSummary.macs,
                                                    accuracy: labelled?.baseAccuracy, samples: samples)
        progress.before?.meanIoU = labelled?.baseMeanIoU
        progress.after = CompressionReport.Figures(bytes: finalBytes, parameters: finalSummary.parameters, macs: finalSummary.macs,
                                                   accuracy: labelled?.compressedAccuracy, samples: samples)
        progress.after?.meanIoU = labelled?.compressedMeanIoU
        progress.task = fleet?.task
        progress.agreement = fleet?.agreementRate
        progress.relativeError = fleet?.relativeError
        progress.meanCosine = fleet?.meanCosine
        try checkQuality(progress)
    }

    /// The quality gate before distribution: throws (so the round fails, saying why, and nothing is distributed)
    /// when the compressed model's fleet agreement with the base model is below `minAgreement` or its labelled
    /// accuracy fell by more than `maxAccuracyDrop`.
    public func checkQuality(_ progress: RoundProgress) throws {
        if let agreement = progress.agreement, agreement < plan.minAgreement {
            throw CompressionError(.invalidStatistics, String(format:
                "quality gate: the compressed model agrees with the base model on %.1f %% of the fleet's evaluation samples (--min-agreement %.1f %%); it was not distributed",
                100 * agreement, 100 * plan.minAgreement))
        }
        if let before = progress.before?.accuracy, let after = progress.after?.accuracy, before - after > plan.maxAccuracyDrop {
            throw CompressionError(.invalidStatistics, String(format:
                "quality gate: labelled accuracy fell from %.2f %% to %.2f %% (more than --max-accuracy-drop %.1f points); the model was not distributed",
                100 * before, 100 * after, 100 * plan.maxAccuracyDrop))
        }
    }

    /// The clipping bound of a training phase: `--clip-norm` when given; else `clipMultiple` times the median
    /// update norm of the previous training phase, or for the first one the norm of `model`'s trainable parameters
    /// (`trainable`); nil when clipping is off.
    public func clipBound(model: Model, trainable: Set<String>, progress: RoundProgress) -> Double? {
        if let fixed = plan.clipNorm { return fixed }
        guard plan.clipMultiple > 0 else { return nil }
        // Under secure aggregation no update norm is seen, only the sum's: every phase keeps the first one's rule.
        if plan.secureAggregation != true, let median = progress.updateNormMedian, median > 0 { return plan.clipMultiple * median }
        var squares = 0.0
        for initializer in model.graph.initializers where trainable.contains(initializer.name) {
            for v in initializer.tensor?.floats ?? [] { squares += Double(v) * Double(v) }
        }
        return squares > 0 ? squares.squareRoot() : nil
    }

    /// The round's report, in `coordinator model compress`'s schema plus phases and sites.
    /// The search so far as the report shows it (nil for a round that searches nothing, or before its first phase).
    public func searchSection(_ progress: RoundProgress) -> CompressionReport.SearchSection? {
        guard let search = progress.search, plan.search != nil else { return nil }
        var section = CompressionReport.SearchSection(budget: plan.searchBudget(progress), candidates: search.candidates, chosen: search.chosen)
        section.boardKinds = search.latencyTables.map(\.kind)
        section.finalists = search.finalists
        section.models = search.models
        section.untimed = search.untimed
        return section
    }

    public func report(round: String, progress: RoundProgress, output: String) -> CompressionReport? {
        guard let before = progress.before, let after = progress.after else { return nil }
        var r = CompressionReport(model: plan.modelName, output: output, before: before, after: after)
        r.task = progress.task
        r.agreement = progress.agreement
        r.relativeError = progress.relativeError
        r.meanCosine = progress.meanCosine
        r.pruning = progress.pruning
        r.search = searchSection(progress)
        r.calibration = progress.calibration
        r.quantization = progress.quantization
        r.renamedValues = progress.renamedValues
        r.round = round
        r.phases = progress.phases
        r.sites = progress.sites.values.sorted { $0.worker < $1.worker }
        r.speedup = CompressionReport.FleetSpeedup(r.sites ?? [])
        if let secure = progress.secure {
            r.secureAggregation = CompressionReport.SecureAggregationSection(
                parties: secure.parties, neighbours: secure.degree, threshold: secure.threshold,
                sums: secure.closed.map { s in
                    .init(phase: plan.phases[s.phase].label, partners: s.partners.count, contributors: s.contributors,
                          dropped: s.partners.filter { !s.contributors.contains($0) }, unmasked: s.unmasked)
                })
        }
        if let privacy = progress.privacy {
            r.privacy = CompressionReport.PrivacySection(epsilon: privacy.epsilon, delta: privacy.plan.delta,
                                                         noiseMultiplier: privacy.noise.noiseMultiplier, sums: privacy.sums,
                                                         workers: privacy.noise.workers, clipNorm: plan.clipNorm ?? 0)
        }
        for p in progress.phases {
            if let s = p.startedAt, let e = p.endedAt { r.timings[p.label] = e - s }
        }
        return r
    }
}
