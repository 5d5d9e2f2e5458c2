import WhittleONNX
import WhittleTensor

/// Progressive pruning's bookkeeping, one value for `model compress` and for rounds: per group, its original
/// channel count and the original index of each channel still there (steps compose: step k's selection indexes the
/// channels step k − 1 kept), and the report's pruning section, step by step. Each step is Torch-Pruning's split:
/// the dependency groups of the current model (`ChannelGroups`), importance scores (`Pruning.scores`), the
/// selection against the original counts (`Pruning.select`, with `roundTo` and the per-group bounds), surgery
/// (`Pruning.prune`).
public struct PruningSchedule: Sendable, Codable {
    /// Original channel count per group name.
    public private(set) var originalChannels: [String: Int]
    /// Per group name, the original index of each current channel.
    public private(set) var originalIndex: [String: [Int]]
    /// The report's section: the options, the steps taken, the final decisions, the frozen groups.
    public var section: CompressionReport.PruningSection

    /// Starts from the unpruned model's groups; `options` gives the criterion, scope and bounds (each step its ratio).
    public init(groups: ChannelGroups, options: PruningOptions, steps: [Double], finetuneEpochs: Int, distill: Bool) {
        originalChannels = [:]
        originalIndex = [:]
        for g in groups.prunable {
            originalChannels[g.name] = g.channels
            originalIndex[g.name] = Array(0..<g.channels)
        }
        section = CompressionReport.PruningSection(
            criterion: options.criterion, scope: options.scope, schedule: steps, roundTo: options.roundTo,
            minChannels: options.minChannels, maxLayerRatio: options.maxLayerRatio, finetuneEpochs: finetuneEpochs,
            distill: distill, steps: [], groups: [],
            frozen: groups.groups.filter { !$0.prunable && !$0.members.isEmpty }.map {
                CompressionReport.FrozenGroup(group: $0.name, channels: $0.channels, reason: $0.frozenReason ?? "")
            })
    }

    /// A schedule already under way (a round's durable progress).
    public init(originalChannels: [String: Int], originalIndex: [String: [Int]], section: CompressionReport.PruningSection) {
        self.originalChannels = originalChannels
        self.originalIndex = originalIndex
        self.section = section
    }

    /// The options a step at `ratio` runs with.
    public var options: PruningOptions {
        var o = PruningOptions(ratio: 0)
        o.criterion = section.criterion
        o.scope = section.scope
        o.roundTo = section.roundTo
        o.minChannels = section.minChannels
        o.maxLayerRatio = section.maxLayerRatio
        return o
    }

    /// The selection of one step at `ratio` on `model`'s groups: kept channels per group id. `statistics` are the
    /// data-driven criteria's (nil for the weight-based ones).
    public func select(_ model: Model, groups: ChannelGroups, ratio: Double, statistics: ImportanceStatistics?) throws -> [Int: [Int]] {
        var o = options
        o.ratio = ratio
        let scores = try Pruning.scores(groups, model: model, criterion: o.criterion, statistics: statistics)
        return try Pruning.select(groups, scores: scores, options: o, originalChannels: originalChannels)
    }

    /// Applies a selection: the kept indices composed into the original ones, the surgery, the step recorded (its
    /// accuracies and losses are the caller's to fill in, `section.steps.last`). Returns the pruned model.
    public mutating func apply(_ kept: [Int: [Int]], to model: Model, groups: ChannelGroups, ratio: Double) throws -> Model {
        for g in groups.prunable {
            if let k = kept[g.id], let index = originalIndex[g.name] { originalIndex[g.name] = k.map { index[$0] } }
        }
        let pruned = try Pruning.prune(model, groups: groups, kept: kept)
        section.steps.append(CompressionReport.PruningStep(
            ratio: ratio, channelsKept: kept.values.reduce(0) { $0 + $1.count },
            channelsBefore: groups.prunable.reduce(0) { $0 + $1.channels }, accuracyPruned: nil, accuracyFinetuned: nil,
            finetuneLoss: []))
        return pruned
    }

    /// The final decisions per group (original count, kept count, kept original indices) from the pruned model.
    public mutating func decide(_ pruned: Model) throws {
        section.groups = try ChannelGroups(model: pruned).prunable.map { g in
            GroupDecision(group: g.name, producers: g.producers, channels: originalChannels[g.name] ?? g.channels,
                          kept: g.channels, keptIndices: originalIndex[g.name] ?? Array(0..<g.channels))
        }
    }
}
