import ArgumentParser
import WhittleCompression

extension PruningScope: ExpressibleByArgument {}
extension ImportanceCriterion: ExpressibleByArgument {}

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
