import Foundation
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittlePrivacy
import WhittleTensor

/// How a fine-tuning phase combines the workers' deltas.
public enum AggregationMethod: String, Codable, Sendable, CaseIterable {
    /// Sample-weighted mean, folded in as reports arrive.
    case fedavg
    /// Coordinate-wise: drop the largest and smallest 20 % per coordinate, average the rest.
    case trimmedMean = "trimmed-mean"
    case median
}

public enum DeltaCompression: String, Codable, Sendable, CaseIterable {
    case none
    /// int8 per tensor with error feedback on the worker.
    case int8
}

/// The kinds of phase a round runs. Worker phases hand out tasks and fold reports; coordinator phases compute.
public enum PhaseKind: String, Codable, Sendable, CaseIterable {
    /// Workers: the diagonal Fisher (sums of squared gradients) of the starting model, for EWC.
    case fisher
    /// Workers: data-driven channel importance statistics of the current model.
    case importance
    /// Coordinator: scores → global mask → surgery.
    case prune
    /// Workers: a latency table of the model on the worker's hardware (each layer at a grid of widths, the uniform
    /// architectures end to end), merged per kind of board, for a search's latency budget.
    case latency
    /// Workers: one generation of an architecture search: each candidate scored on local data after its batch-norm
    /// statistics are re-estimated there (adaptive batch norm), merged as sums.
    case search
    /// Workers: the search's finalists (the uniform architecture and the fittest candidates), each fine-tuned briefly
    /// on the worker's data and scored on a held-out fifth of it; the scores are summed over the fleet.
    case finalists
    /// Coordinator: the search's fittest candidate (or best finalist) → surgery (each group keeps its strongest channels by L1).
    case pick
    /// Workers: local epochs → weight deltas; the coordinator averages them into the next global model.
    case finetune
    /// Workers: per-channel sums and sums of squares of every BatchNormalization input, under the averaged model;
    /// the coordinator sets the running statistics from them. FedAvg averages each worker's running statistics,
    /// which describe that worker's own weights, not the averaged ones: evaluated as they are, the averaged model
    /// normalizes with the wrong statistics.
    case normalization
    /// Coordinator: fold batch normalization into the convolutions before calibration.
    case fold
    /// Workers: per-tensor min/max/count of the activations the export quantizes.
    case ranges
    /// Workers: |x| histograms over the edges the coordinator derived from the merged ranges.
    case histograms
    /// Coordinator: calibrators → quantization ranges → QDQ model (or the float model when not quantizing).
    case export
    /// Workers: quantization-aware fine-tuning (fake-quantized weights and activations, straight-through
    /// estimator) → weight deltas, averaged like fine-tuning.
    case qat
    /// Workers: base and compressed model on local data: accuracy or agreement, latency.
    case evaluate
    /// Workers: download the final model, verify its SHA-256, keep it.
    case distribute
    /// Workers (secure aggregation): each makes the round's secrets and advertises its public keys.
    case secureKeys = "secure-keys"
    /// Workers (secure aggregation): each seals Shamir shares of its secrets for each neighbour.
    case secureShares = "secure-shares"
    /// Workers (secure aggregation): after a secure phase, each returns the shares that remove the masks from its sum.
    case unmask

    /// The kind's handler: everything the kind does (`PhaseHandlers.registry`).
    public var handler: any PhaseHandler { PhaseHandlers.handler(self) }
    public var onWorkers: Bool { handler.onWorkers }
    /// Phases whose task count is capped by `--workers-per-phase`; evaluation and distribution go to everyone.
    public var overSelected: Bool { handler.overSelected }
    /// Phases whose reports are weight deltas.
    public var trains: Bool { handler.trains }
}

/// One phase of a round's plan.
public struct Phase: Codable, Sendable, Equatable {
    public var kind: PhaseKind
    /// The pruning step it belongs to (importance, prune, finetune), from 0.
    public var step: Int
    /// The fine-tuning round within the step, from 0.
    public var iteration: Int

    public init(_ kind: PhaseKind, step: Int = 0, iteration: Int = 0) {
        self.kind = kind
        self.step = step
        self.iteration = iteration
    }

    public var label: String {
        switch kind {
        case .importance, .prune: return "\(kind.rawValue) (step \(step + 1))"
        case .finetune: return "finetune (step \(step + 1), round \(iteration + 1))"
        case .qat: return "qat (round \(iteration + 1))"
        case .search: return "search (generation \(iteration + 1))"
        case .normalization: return "batch-norm statistics (step \(step + 1), pass \(iteration + 1))"
        case .secureKeys: return "secure aggregation: keys"
        case .secureShares: return "secure aggregation: shares"
        default: return kind.rawValue
        }
    }
}

/// Who decides which searched architecture a round fine-tunes (`round start --pick`).
public enum PickRule: String, Codable, Sendable, CaseIterable {
    /// The best candidate within the budget (after finalists, the best of them), without waiting.
    case bestUnderBudget = "best-under-budget"
    /// The round waits at `pick` until the operator picks a candidate for each kind of board (`coordinator round
    /// pick`), or lets the round pick the rest.
    case `operator`
}

/// An architecture search instead of a pruning schedule (`coordinator round start --macs-budget/--size-budget`):
/// generations of candidate widths per prunable group, each generation scored by the fleet on its own data, then the
/// fittest candidate within the budget is cut from the model (`pick`) and fine-tuned as a pruned model would be.
public struct SearchPlan: Codable, Sendable, Equatable {
    /// Absolute figures (shares are resolved against the model when the round starts).
    public var budget = SearchBudget()
    public var candidates = 96
    public var population = 32
    public var minimumFraction = SearchSpace.defaultMinimumFraction
    public var steps = SearchSpace.defaultSteps
    /// Each group's width within 1/spread…spread times the uniform share (nil: anywhere on the ladder).
    public var spread: Double?
    /// Residual blocks may be skipped (`--skip-blocks`: a group inside a residual branch may keep 0 channels). Nil
    /// (a plan stored before the option) is false.
    public var skipBlocks: Bool?
    public var adaptationBatches = CandidateEvaluation.defaultAdaptationBatches
    /// A latency budget as a share of the original's latency on the slowest kind of board (the budget's
    /// `latencyMs` is then set when the latency tables are in).
    public var latencyShare: Double?
    /// The batch size latency budgets are for, and the latency table's grid points per channel axis.
    public var latencyBatch = 1
    public var latencyGrid = 6
    /// Finalists (the uniform architecture among them) fine-tuned for `finalistEpochs` local epochs on each worker
    /// and compared on held-out samples; 1 (or 0 epochs): the fittest candidate is picked directly.
    public var finalists = 4
    public var finalistEpochs = EvolutionarySearch.defaultFinalistEpochs
    /// Who picks the architecture after the search: nil or `.bestUnderBudget`, the round itself; `.operator`, the
    /// round waits at `pick` for `coordinator round pick`.
    public var pick: PickRule?
    /// A follow-up round of a search over several kinds of board: the architecture its search chose for the kinds
    /// this round serves (`pick` cuts it; no search phase runs). Nil: search.
    public var architecture: [String: Int]?

    public init() {}

    /// A finalists phase runs between the generations and the pick.
    public var comparesFinalists: Bool { finalists > 1 && finalistEpochs > 0 }

    /// A latency budget needs the fleet's latency tables (a latency phase first).
    public var measuresLatency: Bool { budget.latencyMs != nil || latencyShare != nil }

    /// The search strategy, seeded by the round's seed.
    public func strategy(seed: UInt64) -> EvolutionarySearch {
        var s = EvolutionarySearch()
        s.evaluations = candidates
        s.population = population
        s.parents = max(1, population / 4)
        s.spread = spread
        s.seed = seed
        return s
    }

    func check() throws {
        func fail(_ message: String) -> CompressionError { CompressionError(.invalidArgument, message) }
        guard budget.macs != nil || budget.parameterBytes != nil || measuresLatency else {
            throw fail("the search needs a budget: --macs-budget, --size-budget or --latency-budget")
        }
        if let l = budget.latencyMs { guard l > 0, l.isFinite else { throw fail("--latency-budget must be a positive time") } }
        if let share = latencyShare { guard share > 0, share <= 1 else { throw fail("--latency-budget as a share must be in (0, 100] %") } }
        guard latencyBatch >= 1, latencyBatch <= 4096 else { throw fail("--latency-batch must be in 1…4096") }
        guard latencyGrid >= 2, latencyGrid <= 16 else { throw fail("--latency-grid must be in 2…16") }
        guard finalists >= 1, finalists <= 64 else { throw fail("--finalists must be in 1…64") }
        guard finalistEpochs >= 0, finalistEpochs <= 100 else { throw fail("--finalist-epochs must be in 0…100") }
        guard candidates >= 1, candidates <= 10_000 else { throw fail("--candidates must be in 1…10000") }
        guard population >= 2, population <= candidates || candidates < 2 else { throw fail("--population must be in 2…--candidates") }
        guard minimumFraction > 0, minimumFraction <= 1 else { throw fail("--min-width must be in (0, 1]") }
        guard steps >= 1, steps <= 256 else { throw fail("--steps must be in 1…256") }
        if let spread { guard spread >= 1 else { throw fail("--spread must be 0 (no bound) or at least 1") } }
        guard adaptationBatches >= 1, adaptationBatches <= 1000 else { throw fail("--adaptation-batches must be in 1…1000") }
    }
}

/// A round as the operator asked for it (`coordinator round start`): what to compress, how, and with which fleet
/// rules. Stored as JSON with the round.
public struct RoundPlan: Codable, Sendable, Equatable {
    public var modelName = "model.onnx"
    /// The base model: an artifact of the coordinator, by SHA-256.
    public var modelSHA256 = ""
    /// Start from this earlier round's fine-tuned float model instead of `modelSHA256` (continual re-compression).
    public var fromRound: String?
    public var pruneRatio = 0.0
    /// Search channel widths under a budget instead of pruning at a ratio (nil: no search).
    public var search: SearchPlan?
    /// Progressive ratios, each against the original channel counts (overrides `pruneRatio`).
    public var schedule: [Double] = []
    public var scope = PruningOptions(ratio: 0).scope
    public var importance: ImportanceCriterion = .l1
    public var roundTo = 1
    public var minChannels = 1
    public var maxLayerRatio = 0.9
    /// FedAvg rounds after each pruning step (or, without pruning, on their own).
    public var finetuneRounds = 0
    public var localEpochs = 1
    public var learningRate: Float = 0.01
    public var optimizer: LocalOptimizer = .sgd
    public var batchSize = 32
    /// Quantization-aware FedAvg rounds after calibration (int8 only), at `qatLearningRate`.
    public var qatRounds = 0
    public var qatLearningRate: Float?
    /// Distill from the base model: workers without labels can fine-tune.
    public var distill = false
    /// What the model's first output means (losses and metrics on the workers); nil: inferred from its shape.
    public var task: TaskKind?
    /// Sizes of one sample of inputs with free dimensions besides the batch (a sequence length), for the report's
    /// MACs (`--shape input_ids=1x128`).
    public var inputSizes: [String: [Int]]?
    /// Random transforms of local training samples (nil: none).
    public var augmentation: Augmentation?
    /// Workers continue their local optimizer's state from one fine-tuning round to the next (nil: fresh each round).
    public var keepOptimizerState: Bool?
    /// EWC penalty towards the starting model during fine-tuning (needs a Fisher phase first).
    public var ewcLambda: Float?
    public var quantize: QuantizationMode = .int8
    public var calibration: CalibrationMethod = .minmax
    public var perChannel = true
    public var reduceRange = false
    /// int4 weights in blocks along K (nil: per output channel, or 32 for MatMulNBits), and how they are written.
    public var int4BlockSize: Int?
    public var int4Format: Int4Format?
    /// Short internal names in the exported file (`GraphEditing.compactNames`).
    public var compactNames = false
    public var minWorkers = 1
    /// Tasks per over-selected phase (nil: every eligible worker).
    public var workersPerPhase: Int?
    public var phaseDeadlineSeconds = 600.0
    public var aggregation: AggregationMethod = .fedavg
    public var trimFraction = 0.2
    /// Passes of the batch-norm statistics phase after each step's fine-tuning (0: keep FedAvg's averaged running
    /// statistics). Each pass makes at least one more layer exact (a layer's inputs depend on the statistics of the
    /// layers before it), so one pass per BatchNormalization node gives the population statistics under the
    /// averaged weights. Measured on the demo CNN it did not beat the averaged statistics (benchmarks/README.md),
    /// so it is off unless asked for; nil: 0.
    public var normalizationPasses: Int?
    /// Server momentum for fine-tuning rounds (FedAvgM, Hsu et al. 2019): `v ← β·v + Δ`, `θ ← θ + η·v` on the
    /// parameters (running statistics are averaged plainly), with β this value (0: plain FedAvg) and η
    /// `serverLearningRate`; reset at each pruning step.
    public var serverMomentum = 0.0
    public var serverLearningRate = 1.0
    /// A fixed bound on each update's L2 norm (`--clip-norm`); nil: the adaptive bound below.
    public var clipNorm: Double?
    /// Without `--clip-norm`, each training update is clipped to this multiple of the median update norm of the
    /// round's previous training phase; the first training phase clips to the norm of the model's trainable
    /// parameters. 0 turns the default clipping off.
    public var clipMultiple = 3.0
    /// The quality gate before distribution: the compressed model is not distributed (the round fails and says
    /// why) when its agreement with the base model over the fleet's evaluation samples is below this fraction…
    public var minAgreement = 0.3
    /// …or when the labelled accuracy falls by more than this fraction (0.25: 25 points) below the base model's.
    public var maxAccuracyDrop = 0.25
    public var deltaCompression: DeltaCompression = .none
    public var seed: UInt64 = 0
    /// Secure aggregation (`--secure-aggregation`, issue 20): the phases whose statistics are sums (`securelySummed`)
    /// are summed under SecAgg+, so the coordinator sees only the sum over the phase's workers. Nil: off.
    public var secureAggregation: Bool?
    /// A public bound on the activations the export quantizes (`--calibration-range R`): the range pass bins each
    /// tensor into a signed histogram over [−R, R] (`quantizationPolicy.histogramBins` bins) instead of reporting its
    /// minimum and maximum, and the range is the outermost non-empty bins' edges (within one bin of the exact one).
    /// Histograms are sums, so the range pass can be summed securely; a secure round that quantizes needs it.
    public var calibrationRange: Double?
    /// Differential privacy (`--dp-epsilon`, `--dp-delta`): the training sums carry distributed discrete Gaussian
    /// noise that makes the round (ε, δ)-DP per site (`DifferentialPrivacy`). Needs secure aggregation and `--clip-norm`.
    public var privacy: PrivacyPlan?

    public init() {}

    /// The pruning ratios, one per step (empty: no pruning).
    public var steps: [Double] {
        if !schedule.isEmpty { return schedule }
        return pruneRatio > 0 ? [pruneRatio] : []
    }

    public var pruningOptions: PruningOptions {
        var o = PruningOptions(ratio: steps.last ?? 0)
        o.scope = scope
        o.criterion = importance
        o.roundTo = roundTo
        o.minChannels = minChannels
        o.maxLayerRatio = maxLayerRatio
        return o
    }

    public var quantizationPolicy: QuantizationPolicy {
        var p = QuantizationPolicy(mode: quantize)
        p.perChannel = perChannel
        p.reduceRange = reduceRange
        p.calibration = calibration
        p.int4BlockSize = int4BlockSize
        p.int4Format = int4Format ?? .qdq
        return p
    }

    /// The phases, in order.
    public var phases: [Phase] {
        var out: [Phase] = []
        if ewcLambda != nil { out.append(Phase(.fisher)) }
        for (k, _) in steps.enumerated() {
            if importance.needsData { out.append(Phase(.importance, step: k)) }
            out.append(Phase(.prune, step: k))
            for r in 0..<finetuneRounds { out.append(Phase(.finetune, step: k, iteration: r)) }
            if finetuneRounds > 0 { for p in 0..<(normalizationPasses ?? 0) { out.append(Phase(.normalization, step: k, iteration: p)) } }
        }
        if let search, search.architecture != nil {
            out.append(Phase(.pick))
        } else if let search {
            if search.measuresLatency { out.append(Phase(.latency)) }
            for g in 0..<search.strategy(seed: seed).generations { out.append(Phase(.search, iteration: g)) }
            if search.comparesFinalists { out.append(Phase(.finalists)) }
            out.append(Phase(.pick))
        }
        if steps.isEmpty, finetuneRounds > 0 {
            for r in 0..<finetuneRounds { out.append(Phase(.finetune, iteration: r)) }
            for p in 0..<(normalizationPasses ?? 0) { out.append(Phase(.normalization, iteration: p)) }
        }
        if quantize != .none {
            out.append(Phase(.fold))
            out.append(Phase(.ranges))
            if calibration.needsHistograms { out.append(Phase(.histograms)) }
            for r in 0..<qatRounds { out.append(Phase(.qat, iteration: r)) }
        }
        out += [Phase(.export), Phase(.evaluate), Phase(.distribute)]
        return secureAggregation == true ? Self.secured(out) : out
    }

    /// The phase kinds secure aggregation adds to a plan.
    public static let secureProtocol: Set<PhaseKind> = [.secureKeys, .secureShares, .unmask]

    /// Phase kinds whose reports are summed under secure aggregation.
    public static let securelySummed: Set<PhaseKind> = [.fisher, .importance, .finetune, .normalization, .qat, .ranges, .histograms]

    /// `phases` with secure aggregation: the key exchange before the first securely summed phase, and an unmask
    /// phase after each (same step and iteration).
    static func secured(_ phases: [Phase]) -> [Phase] {
        guard let first = phases.firstIndex(where: { securelySummed.contains($0.kind) }) else { return phases }
        var out = Array(phases[..<first]) + [Phase(.secureKeys), Phase(.secureShares)]
        for p in phases[first...] {
            out.append(p)
            if securelySummed.contains(p.kind) { out.append(Phase(.unmask, step: p.step, iteration: p.iteration)) }
        }
        return out
    }

    /// The secure sums of the plan, in order: the index of each securely summed phase in `phases`.
    public var secureSums: [Int] {
        guard secureAggregation == true else { return [] }
        let all = phases
        return all.indices.filter { Self.securelySummed.contains(all[$0].kind) }
    }

    /// The secure sum `phase` is (its index in `secureSums`), nil for a phase summed in the clear.
    public func secureSum(of phase: Phase) -> Int? {
        let all = phases
        return secureSums.firstIndex { all[$0] == phase }
    }

    /// The learning rate of fine-tuning round `iteration` of a step at its first local epoch (see
    /// `epochLearningRates`).
    public func learningRate(iteration: Int) -> Float {
        epochLearningRates(.finetune, iteration: iteration)[0]
    }

    /// The learning rate of QAT round `iteration` at its first local epoch; QAT starts from `qatLearningRate`
    /// (default a tenth of `learningRate`).
    public func qatLearningRate(iteration: Int) -> Float {
        epochLearningRates(.qat, iteration: iteration)[0]
    }

    /// The learning rate of each local epoch of round `iteration` (fine-tuning within a step, or QAT): one cosine
    /// from the base rate towards 0 over all `rounds × localEpochs` local epochs, as a centralised run of that many
    /// epochs would anneal (each worker's optimizer still starts afresh every round, as in FedAvg).
    public func epochLearningRates(_ kind: PhaseKind, iteration: Int) -> [Float] {
        let (base, rounds) = kind == .qat ? (qatLearningRate ?? learningRate / 10, qatRounds) : (learningRate, finetuneRounds)
        let epochs = max(localEpochs, 1), total = max(rounds, 1) * epochs
        guard total > 1 else { return [base] }
        return (0..<epochs).map { e in
            Float(Double(base) * 0.5 * (1 + cos(Double.pi * Double(iteration * epochs + e) / Double(total))))
        }
    }

    /// Checks the values on their own.
    public func check() throws {
        func fail(_ message: String) -> CompressionError { CompressionError(.invalidArgument, message) }
        guard modelSHA256.count == 64 else { throw fail("the plan names no base model") }
        guard pruneRatio >= 0, pruneRatio < 1 else { throw fail("--prune-ratio must be in [0, 1), got \(pruneRatio)") }
        guard schedule.allSatisfy({ $0 > 0 && $0 < 1 }), zip(schedule, schedule.dropFirst()).allSatisfy({ $0 <= $1 }) else {
            throw fail("--schedule ratios must be in (0, 1) and non-decreasing, got \(schedule)")
        }
        if !steps.isEmpty { try pruningOptions.check() }
        if let search {
            guard steps.isEmpty else { throw fail("a round either searches widths under a budget or prunes at --prune-ratio/--schedule, not both") }
            try search.check()
            guard finetuneRounds >= 1 else {
                throw fail("a searched architecture keeps inherited weights and batch-norm statistics of the original: give --finetune-rounds (at least 1)")
            }
        }
        try quantizationPolicy.check()
        guard finetuneRounds >= 0, finetuneRounds <= 1000 else { throw fail("--finetune-rounds must be in 0…1000") }
        guard qatRounds >= 0, qatRounds <= 1000 else { throw fail("--qat-rounds must be in 0…1000") }
        if qatRounds > 0, quantize != .int8 {
            throw fail("--qat-rounds trains against int8 weights and activations: it needs --quantize int8 (not \(quantize.rawValue))")
        }
        if let q = qatLearningRate, !(q > 0 && q.isFinite) { throw fail("--qat-lr must be positive") }
        guard localEpochs >= 1, localEpochs <= 1000 else { throw fail("--local-epochs must be in 1…1000") }
        guard learningRate > 0, learningRate.isFinite else { throw fail("--lr must be positive") }
        guard batchSize >= 1, batchSize <= 4096 else { throw fail("the batch size must be in 1…4096") }
        guard minWorkers >= 1 else { throw fail("--min-workers must be at least 1") }
        if let m = workersPerPhase, m < minWorkers {
            throw fail("--workers-per-phase (\(m)) must be at least --min-workers (\(minWorkers))")
        }
        guard phaseDeadlineSeconds >= 1, phaseDeadlineSeconds <= 7 * 86400 else { throw fail("--phase-deadline must be 1 s…7 d") }
        guard trimFraction >= 0, trimFraction < 0.5 else { throw fail("the trim fraction must be in [0, 0.5)") }
        if let n = normalizationPasses, n < 0 || n > 100 { throw fail("--bn-passes must be in 0…100") }
        guard serverMomentum >= 0, serverMomentum < 1 else { throw fail("--server-momentum must be in [0, 1)") }
        guard serverLearningRate > 0, serverLearningRate <= 10 else { throw fail("--server-lr must be in (0, 10]") }
        if let c = clipNorm, !(c > 0 && c.isFinite) { throw fail("--clip-norm must be positive") }
        if let r = calibrationRange, !(r > 0 && r <= 1e30) { throw fail("--calibration-range must be positive and finite") }
        guard clipMultiple >= 0, clipMultiple <= 1000 else { throw fail("--clip-multiple must be in 0…1000") }
        guard minAgreement >= 0, minAgreement <= 1 else { throw fail("--min-agreement must be in 0…1") }
        guard maxAccuracyDrop >= 0, maxAccuracyDrop <= 1 else { throw fail("--max-accuracy-drop must be in 0…1") }
        if let l = ewcLambda {
            guard l > 0, l.isFinite else { throw fail("--ewc must be positive") }
            guard finetuneRounds > 0 else { throw fail("--ewc regularises fine-tuning: give --finetune-rounds") }
        }
        if secureAggregation == true {
            guard aggregation == .fedavg else {
                throw fail("--secure-aggregation sums updates: it needs --aggregation fedavg (\(aggregation.rawValue) needs every update in the clear)")
            }
            guard deltaCompression == .none else { throw fail("--secure-aggregation sums float deltas in its ring: drop --compress-deltas") }
            guard minWorkers >= 3 else {
                throw fail("--secure-aggregation needs --min-workers 3 or more (with two, each worker's input is the sum minus its own)")
            }
            guard calibrationRange != nil || !phases.contains(where: { $0.kind == .ranges }) else {
                throw fail("--secure-aggregation with --quantize \(quantize.rawValue) needs --calibration-range R: a public bound on the activations, so the range pass sums histograms over [-R, R] instead of sending each board's minimum and maximum")
            }
            guard secureSums.count <= SecureAggregationSetup.maximumSums else {
                throw fail("--secure-aggregation serves at most \(SecureAggregationSetup.maximumSums) secure phases per round; this plan has \(secureSums.count)")
            }
        }
        if let privacy {
            guard secureAggregation == true else {
                throw fail("--dp-epsilon adds noise each worker's share of which hides nothing alone: it needs --secure-aggregation")
            }
            guard clipNorm != nil else { throw fail("--dp-epsilon needs --clip-norm C: the noise is calibrated to each update's bound") }
            guard privacySums > 0 else { throw fail("--dp-epsilon protects training updates: give --finetune-rounds or --qat-rounds") }
            guard privacy.epsilon > 0, privacy.epsilon.isFinite, privacy.delta > 0, privacy.delta < 1 else {
                throw fail("--dp-epsilon must be positive and --dp-delta in (0, 1)")
            }
        }
    }

    /// The plan's secure training sums (the ones a private round adds noise to).
    public var privacySums: Int {
        let all = phases
        return secureSums.filter { all[$0].kind.trains }.count
    }

    /// A private round's noise and accounting for `model` (nil without `privacy`).
    public func privacyProgress(model: Model) throws -> PrivacyProgress? {
        guard let privacy, let clipNorm else { return nil }
        let dimension = updateShapes(model).values.reduce(0) { $0 + $1.reduce(1, *) }
        return try DifferentialPrivacy.calibrate(privacy, clip: clipNorm, dimension: dimension, workers: minWorkers, sums: privacySums)
    }

    /// Checks the plan against the model it will compress: everything that can be refused before any worker is
    /// asked anything.
    public func validate(model: Model) throws {
        try check()
        _ = try privacyProgress(model: model)
        let session = try InferenceSession(model: model)
        guard session.primaryInput.name.isEmpty == false else {
            throw CompressionError(.invalidArgument, "the model has no input")
        }
        if let augmentation, augmentation != .none, case .tensor(_, let shape?) = session.primaryInput.type {
            let input = "the model's input '\(session.primaryInput.name)' is \(shape.map(\.description).joined(separator: "×"))"
            guard shape.count == 4 else {
                throw CompressionError(.invalidArgument, "--augment \(augmentation.rawValue) needs N×C×H×W images; \(input)")
            }
            if augmentation == .dihedral, case .value(let h) = shape[2], case .value(let w) = shape[3], h != w {
                throw CompressionError(.invalidArgument, "--augment dihedral needs square images; \(input) (use flips)")
            }
        }
        do {
            _ = try ModelSummary(model: model, inputShapes: try ShapeInference.sampleShapes(model, sizes: inputSizes ?? [:]))
        } catch let error as ONNXError {
            throw CompressionError(.invalidArgument, error.message)
        }
        if let search {
            // The space, the costs and the budget, as the search phases will see them.
            let local = try localSearch(model)
            // A latency budget is checked once the fleet's latency tables are in (the latency phase).
            var known = search.budget
            known.latencyMs = nil
            if !known.isEmpty { try known.check(smallest: try local.cost(local.space.narrowest)) }
        }
        if !steps.isEmpty {
            let groups = try ChannelGroups(model: model)
            guard !groups.prunable.isEmpty else {
                let reasons = groups.groups.compactMap { g in g.frozenReason.map { "\(g.name): \($0)" } }
                throw CompressionError(.invalidArgument,
                    "no channel group of this model can be pruned safely: " + reasons.prefix(6).joined(separator: "; "))
            }
        }
        if finetuneRounds > 0 || importance == .taylor || ewcLambda != nil {
            _ = try Trainer(model: model, configuration: TrainingConfiguration())
        }
        if quantize != .none {
            let folded = try GraphEditing.foldBatchNormalization(model)
            _ = try QDQExport.calibrationTensors(folded, policy: quantizationPolicy)
        }
    }
}

/// The float initializers a fine-tuning update carries a delta for (parameters and running statistics alike):
/// every float initializer, in name order.
public func updateShapes(_ model: Model) -> [String: [Int]] {
    var out: [String: [Int]] = [:]
    for i in model.graph.initializers where i.elementType == .float && i.tensor != nil { out[i.name] = i.shape }
    return out
}

/// `model` with `delta` added to its float initializers.
public func applying(_ delta: [String: Tensor], to model: Model) throws -> Model {
    var out = model
    for (k, i) in model.graph.initializers.enumerated() {
        guard let d = delta[i.name], let t = i.tensor else { continue }
        guard d.shape == t.shape else {
            throw AggregationError(.invalidUpdate, "delta for '\(i.name)' has shape \(d.shape), the parameter \(t.shape)")
        }
        out.graph.initializers[k] = Initializer(name: i.name, tensor: Tensor(shape: t.shape, floats: zip(t.floats, d.floats).map(+)))
    }
    return out
}

/// Decodes JSON that an earlier version stored (a round's plan or progress): top-level keys it lacks take their
/// values from `defaults`, so a field added later does not make older rounds unreadable.
public func decodeStored<T: Codable>(_ type: T.Type, from data: Data, defaults: T) throws -> T {
    // What this version stored decodes as it is (the optional fields it lacks default to nil, as in `defaults`); only
    // an older record, without a field that has a default value, needs the merge (the round service decodes a
    // round's progress for every heartbeat that asks for work).
    if let current = try? JSONDecoder().decode(T.self, from: data) { return current }
    guard let stored = try JSONSerialization.jsonObject(with: data) as? [String: Any],
        let base = try JSONSerialization.jsonObject(with: JSONEncoder().encode(defaults)) as? [String: Any] else {
        return try JSONDecoder().decode(T.self, from: data)
    }
    return try JSONDecoder().decode(T.self, from: JSONSerialization.data(withJSONObject: base.merging(stored) { $1 }))
}

extension RoundPlan {
    /// The search space, costs and inherited channels of an architecture search on `model` (the coordinator's side
    /// of the search phases; workers build the candidates from the widths the task names).
    /// `kinds`: predict latency on these kinds of board only (nil: every kind, the largest prediction counting).
    public func localSearch(_ model: Model, progress: RoundProgress? = nil, kinds: [String]? = nil) throws -> LocalSearch {
        let plan = search ?? SearchPlan()
        var local = try LocalSearch(base: model, minimumFraction: plan.minimumFraction, steps: plan.steps, roundTo: roundTo,
                                    minimumChannels: minChannels, skipBlocks: plan.skipBlocks ?? false, task: task)
        let tables = (progress?.search?.latencyTables ?? []).filter { t in kinds.map { $0.contains(t.kind) } ?? true }
        local.latencies = try tables.map { try LatencyModel(base: model, costs: local.costs, table: $0) }
        return local
    }

    /// The search's budget in effect: a latency share becomes milliseconds of the original on the slowest kind of
    /// board once the latency tables are in.
    public func searchBudget(_ progress: RoundProgress) -> SearchBudget {
        var budget = search?.budget ?? SearchBudget()
        if budget.latencyMs == nil, let share = search?.latencyShare,
           let slowest = progress.search?.latencyTables.map(\.fullMilliseconds).max() {
            budget.latencyMs = share * slowest
        }
        return budget
    }

    /// A stored plan (see `decodeStored`).
    public static func stored(_ data: Data) throws -> RoundPlan { try decodeStored(RoundPlan.self, from: data, defaults: RoundPlan()) }
}

extension RoundProgress {
    /// A stored progress record (see `decodeStored`).
    public static func stored(_ data: Data) throws -> RoundProgress {
        try decodeStored(RoundProgress.self, from: data, defaults: RoundProgress(plan: RoundPlan(), baseModel: "", startModel: ""))
    }
}
