import Foundation
import ArgumentParser
import WhittleCompression
import WhittleIO
import WhittleNN
import WhittleTensor

extension PruningScope: ExpressibleByArgument {}
extension ImportanceCriterion: ExpressibleByArgument {}
extension LocalOptimizer: ExpressibleByArgument {}
extension Augmentation: ExpressibleByArgument {}
extension TaskKind: ExpressibleByArgument {}
extension CalibrationMethod: ExpressibleByArgument {}
extension QuantizationMode: ExpressibleByArgument {}
extension Int4Format: ExpressibleByArgument {}

/// The pruning flags of `model compress` and `round start`, declared once with one set of defaults, so a local
/// compression and a federated round read the same command line the same way.
public struct PruningFlags: ParsableArguments {
    @Option(name: .long, help: "Fraction of channels to remove, in [0, 1).") public var pruneRatio: Double = 0
    @Option(name: .long, help: "Progressive pruning ratios, e.g. 0.2,0.25,0.3 (fine-tuning after each step).") public var schedule: String?
    @Option(name: .long, help: "local (each group loses the same fraction) or global (channels ranked across groups).")
    public var pruneScope: PruningScope = PruningOptions(ratio: 0).scope
    @Option(name: .long, help: "l1, l2, bn-scale (from the weights), or activation, apoz, taylor (from data: the calibration data of `model compress`, the workers' data in a round).")
    public var importance: ImportanceCriterion = PruningOptions(ratio: 0).criterion
    @Option(name: .long, help: "Round kept channel counts up to a multiple of this (8 or 16 for hardware); a layer is never pruned harder than asked.")
    public var roundTo: Int = PruningOptions(ratio: 0).roundTo
    @Option(name: .long, help: "Keep at least this many channels per group.") public var minChannels: Int = PruningOptions(ratio: 0).minChannels
    @Option(name: .long, help: "Remove at most this fraction of any group.") public var maxLayerRatio: Double = PruningOptions(ratio: 0).maxLayerRatio

    public init() {}

    public func validate() throws {
        guard pruneRatio >= 0, pruneRatio < 1 else { throw ValidationError("--prune-ratio must be in [0, 1), got \(pruneRatio)") }
        guard roundTo >= 1, minChannels >= 1 else { throw ValidationError("--round-to and --min-channels must be at least 1") }
        _ = try steps()
    }

    /// The schedule's ratios (empty without --schedule).
    public func steps() throws -> [Double] {
        guard let schedule else { return [] }
        let values = schedule.split(separator: ",").map { Double($0.trimmingCharacters(in: .whitespaces)) }
        guard !values.isEmpty, values.allSatisfy({ $0 != nil && $0! >= 0 && $0! < 1 }) else {
            throw ValidationError("--schedule must be ratios in [0, 1) separated by commas, e.g. 0.2,0.25,0.3")
        }
        return values.map { $0! }
    }

    /// Whether anything is pruned.
    public var prunes: Bool { pruneRatio > 0 || schedule != nil }

    /// The options of one pruning step at `ratio` (the schedule's last, or --prune-ratio).
    public func options() throws -> PruningOptions {
        var options = PruningOptions(ratio: try steps().last ?? pruneRatio)
        options.scope = pruneScope
        options.criterion = importance
        options.roundTo = roundTo
        options.minChannels = minChannels
        options.maxLayerRatio = maxLayerRatio
        return options
    }
}

/// The fine-tuning flags of `model compress`, `model search` and `round start`, declared once with one set of
/// defaults (in a round they apply to every worker's local training).
public struct FineTuningFlags: ParsableArguments {
    @Option(name: .long, help: "Fine-tuning learning rate (one cosine over the epochs; in a round over every local epoch of a pruning step's rounds).")
    public var lr: Float = 0.01
    @Option(name: .long, help: "Fine-tuning optimizer: sgd (momentum 0.9), adam or adamw (weight decay 0.01); in a round fresh every round unless --keep-optimizer-state.")
    public var optimizer: LocalOptimizer = .sgd
    @Option(name: .long, help: "Samples per batch (a worker with --memory-limit may use fewer).") public var batchSize: Int = 32
    @Flag(name: .long, help: "Fine-tune by distillation from the original model (samples without labels take part).") public var distill = false
    @Option(name: .long, help: "Random transforms of training images: none, flips or dihedral (flips and 90° rotations).")
    public var augment: Augmentation = .none
    @Option(name: .long, help: "What the model's output means: classification, segmentation, detection, regression or embedding (losses and metrics; default: inferred from the output's shape).")
    public var task: TaskKind?

    public init() {}

    public func validate() throws {
        guard batchSize >= 1 else { throw ValidationError("--batch-size must be at least 1") }
        guard lr > 0, lr.isFinite else { throw ValidationError("--lr must be a positive number, got \(lr)") }
    }
}

/// The quantization flags `model compress` and `round start` share, declared once with one set of defaults. The
/// mode (`--quantize`) is each command's own: a round exports int8 unless told otherwise, a local compression only
/// quantizes when asked.
public struct QuantizationFlags: ParsableArguments {
    @Option(name: .long, help: "minmax, percentile, entropy or mse.") public var calibration: CalibrationMethod = .minmax
    @Flag(name: .long, help: "Per-output-channel weight scales (the default).") public var perChannel = false
    @Flag(name: .long, help: "One weight scale per tensor.") public var perTensor = false
    @Flag(name: .long, help: "7-bit weights (onnxruntime's reduce_range): for x86 CPUs without AVX-VNNI, whose u8×s8 kernels saturate.")
    public var reduceRange = false
    @Option(name: .long, help: "int4 weights in blocks of this many along the reduction axis (16, 32, 64, 128 or 256), each with its own scale; default: one scale per output channel (qdq), 32 (matmulnbits).")
    public var int4BlockSize: Int?
    @Option(name: .long, help: "How int4 weights are written: qdq (DequantizeLinear, opset 21) or matmulnbits (onnxruntime's MatMulNBits, com.microsoft).")
    public var int4Format: Int4Format = .qdq
    @Flag(name: .long, help: "Short names for every internal value and node in the output (smaller file; the report maps them).")
    public var compactNames = false

    public init() {}

    public func validate() throws {
        guard !(perChannel && perTensor) else { throw ValidationError("--per-channel and --per-tensor exclude each other") }
        if let b = int4BlockSize, !BlockwiseInt4.blockSizes.contains(b) {
            throw ValidationError("--int4-block-size must be one of \(BlockwiseInt4.blockSizes.map(String.init).joined(separator: ", "))")
        }
    }

    /// The policy for `mode` with these flags (the command sets what only it has).
    public func policy(_ mode: QuantizationMode) -> QuantizationPolicy {
        var p = QuantizationPolicy(mode: mode)
        p.calibration = calibration
        p.perChannel = !perTensor
        p.reduceRange = reduceRange
        p.int4BlockSize = int4BlockSize
        p.int4Format = int4Format
        return p
    }
}

/// The architecture-search flags of `model search` and `round start`: the budgets and the search's size and space,
/// declared once with one set of defaults.
public struct SearchFlags: ParsableArguments {
    @Option(name: .long, help: "Largest MACs per sample of a searched architecture: a count (12000000, 12M, 1.5G) or a share of the original's (25%).")
    public var macsBudget: String?
    @Option(name: .long, help: "Largest size of a searched architecture's float parameters: bytes (40KB, 2MB) or a share of the original's (30%).")
    public var sizeBudget: String?
    @Option(name: .long, help: "Candidate architectures evaluated in all.") public var candidates: Int = 160
    @Option(name: .long, help: "Candidates per generation (in a round, one phase each).") public var population: Int = 32
    @Option(name: .long, help: "Each group's width stays between 1/S and S times the uniform share that fills the budget (0, the default: anywhere on the ladder).")
    public var spread: Double = 0
    @Flag(name: .long, help: "Residual blocks may be skipped: a group inside a residual block's branch may also keep 0 channels (the block becomes its shortcut).")
    public var skipBlocks = false
    @Option(name: .long, help: "Smallest width of a group, as a fraction of its channels.") public var minWidth: Double = SearchSpace.defaultMinimumFraction
    @Option(name: .long, help: "Steps of the width ladder between the smallest width and all channels.") public var steps: Int = SearchSpace.defaultSteps
    @Option(name: .long, help: "Batches that re-estimate each candidate's batch-norm statistics.")
    public var adaptationBatches: Int = CandidateEvaluation.defaultAdaptationBatches
    @Option(name: .long, help: "Largest latency of a searched architecture (float) at --latency-batch: 2ms, 800us, 0.5s, or a share of the original's (40%); measured on this machine (model search) or on every kind of board in the fleet (round start).")
    public var latencyBudget: String?
    @Option(name: .long, help: "Batch size the latency budget is for.") public var latencyBatch: Int = 1
    @Option(name: .long, help: "Grid points per channel axis of the latency table.") public var latencyGrid: Int = 6
    @Option(name: .long, help: "The fittest candidates (the uniform one among them) fine-tuned briefly and compared on held-out samples, the best chosen (model search: with --finetune-epochs, on --val-data; a round: on every worker, a fifth of its data held out); 1: the fittest directly.")
    public var finalists: Int = 4
    @Option(name: .long, help: "Fine-tuning epochs of each finalist.") public var finalistEpochs: Int = EvolutionarySearch.defaultFinalistEpochs

    public init() {}

    public func validate() throws {
        guard candidates >= 1 else { throw ValidationError("--candidates must be at least 1") }
        guard population >= 2 else { throw ValidationError("--population must be at least 2") }
        guard spread == 0 || spread >= 1 else { throw ValidationError("--spread must be 0 (no bound) or at least 1") }
        guard minWidth > 0, minWidth <= 1 else { throw ValidationError("--min-width must be in (0, 1]") }
        guard steps >= 1, steps <= 256 else { throw ValidationError("--steps must be 1 to 256") }
        guard adaptationBatches >= 1 else { throw ValidationError("--adaptation-batches must be at least 1") }
        guard latencyBatch >= 1 else { throw ValidationError("--latency-batch must be at least 1") }
        guard latencyGrid >= 2, latencyGrid <= 16 else { throw ValidationError("--latency-grid must be 2 to 16") }
        guard finalists >= 1 else { throw ValidationError("--finalists must be at least 1") }
        guard finalistEpochs >= 1 else { throw ValidationError("--finalist-epochs must be at least 1") }
        if let latencyBudget, !latencyBudget.hasSuffix("%") { _ = try Self.milliseconds(latencyBudget) { 0 } }
    }

    /// A budget is given (MACs, size or latency).
    public var searches: Bool { macsBudget != nil || sizeBudget != nil || latencyBudget != nil }

    /// The latency budget as a share of the original's latency (`40%` → 0.4), nil for an absolute one.
    public func latencyShare() throws -> Double? {
        guard let latencyBudget, latencyBudget.trimmingCharacters(in: .whitespaces).hasSuffix("%") else { return nil }
        return try Self.milliseconds(latencyBudget) { 1 }
    }

    /// A latency: `2ms`, `800us`, `0.5s`, or a share of the original's (`40%`; `original` is called only then).
    public static func milliseconds(_ text: String, original: () throws -> Double) throws -> Double {
        let trimmed = text.trimmingCharacters(in: .whitespaces).lowercased()
        if trimmed.hasSuffix("%") {
            guard let share = Double(trimmed.dropLast()), share > 0, share <= 100 else {
                throw ValidationError("--latency-budget '\(text)': a share must be in (0, 100] %")
            }
            return try original() * share / 100
        }
        for (unit, scale) in [("ms", 1.0), ("us", 1e-3), ("µs", 1e-3), ("s", 1e3)] where trimmed.hasSuffix(unit) {
            guard let v = Double(trimmed.dropLast(unit.count).trimmingCharacters(in: .whitespaces)), v > 0, v.isFinite else { break }
            return v * scale
        }
        throw ValidationError("--latency-budget '\(text)' is not a latency like 2ms, 800us, 0.5s or 40%")
    }

    /// The MACs and size budgets as figures, shares taken of `original`'s.
    public func budget(original: ArchitectureCost) throws -> SearchBudget {
        SearchBudget(macs: try macsBudget.map { try Self.figure($0, of: original.macs, bytes: false, flag: "--macs-budget") },
                     parameterBytes: try sizeBudget.map { try Self.figure($0, of: original.parameterBytes, bytes: true, flag: "--size-budget") })
    }

    /// A budget figure: a share of the original's (`25%`), or an absolute count with an optional K, M or G
    /// (powers of 1000 for MACs; sizes take `parseByteSize`'s units).
    public static func figure(_ text: String, of original: Int, bytes: Bool, flag: String) throws -> Int {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        if trimmed.hasSuffix("%") {
            guard let share = Double(trimmed.dropLast()), share > 0, share <= 100 else {
                throw ValidationError("\(flag) '\(text)': a share must be in (0, 100] %")
            }
            return Int(Double(original) * share / 100)
        }
        if bytes {
            guard let n = parseByteSize(trimmed) else { throw ValidationError("\(flag) '\(text)' is not a size like 40KB or 30%") }
            return n
        }
        let multipliers: [Character: Double] = ["K": 1e3, "M": 1e6, "G": 1e9]
        let unit = trimmed.last.flatMap { multipliers[Character($0.uppercased())] }
        guard let value = Double(unit == nil ? trimmed : String(trimmed.dropLast())), value > 0, value.isFinite else {
            throw ValidationError("\(flag) '\(text)' is not a count like 12000000, 12M or 25%")
        }
        return Int(value * (unit ?? 1))
    }
}
