import WhittleNN
import WhittleONNX
import WhittleTensor

/// Channel importance criteria (ALGORITHMS.md).
public enum ImportanceCriterion: String, Sendable, Codable, CaseIterable {
    /// Σ|w| over each channel's slice of every weight in the group.
    case l1
    /// Σw² over the same slices.
    case l2
    /// |γ| of the group's BatchNormalizations (network slimming); groups without one fall back to l1.
    case bnScale = "bn-scale"
    /// Mean |a| of the channel's activations over samples and positions.
    case activation
    /// 1 − APoZ: the fraction of non-zero activations (after the activation function).
    case apoz
    /// First-order Taylor: |Σ_j w_j · ḡ_j| per channel and weight, ḡ the mean gradient of the loss.
    case taylor

    /// Whether the criterion needs data (activation statistics or gradients).
    public var needsData: Bool { self == .activation || self == .apoz || self == .taylor }
}

public enum PruningScope: String, Sendable, Codable, CaseIterable {
    /// Every group loses the same fraction of its channels.
    case local
    /// Channels of all groups are ranked together by normalised importance.
    case global
}

public struct PruningOptions: Sendable {
    /// Fraction of channels to remove, in [0, 1): of each group (local) or of all prunable channels (global),
    /// counted against the original channel counts.
    public var ratio: Double
    public var scope: PruningScope = .local
    public var criterion: ImportanceCriterion = .l1
    /// Never keep fewer channels in a group.
    public var minChannels = 1
    /// Never remove more than this fraction of a group's original channels.
    public var maxLayerRatio = 0.9
    /// Kept counts are rounded down to a multiple of this (hardware alignment), never below it.
    public var roundTo = 1

    public init(ratio: Double) {
        self.ratio = ratio
    }

    public func check() throws {
        guard ratio.isFinite, ratio >= 0, ratio < 1 else {
            throw CompressionError(.invalidArgument, "the pruning ratio must be in [0, 1), got \(ratio)")
        }
        guard maxLayerRatio > 0, maxLayerRatio < 1 else {
            throw CompressionError(.invalidArgument, "the maximum per-layer ratio must be in (0, 1), got \(maxLayerRatio)")
        }
        guard minChannels >= 1 else { throw CompressionError(.invalidArgument, "the minimum channel count must be at least 1") }
        guard roundTo >= 1 else { throw CompressionError(.invalidArgument, "round-to must be at least 1, got \(roundTo)") }
    }
}

/// What data-driven importance needs, collected on a worker's data and merged exactly across workers: per-channel
/// activation statistics of each group's statistics tensor, and per-parameter gradient sums with the sample count.
public struct ImportanceStatistics: Sendable {
    public var channels: [String: ChannelStatistics] = [:]
    public var gradientSums: [String: Tensor] = [:]
    public var samples = 0

    public init() {}

    public func merged(with other: ImportanceStatistics) throws -> ImportanceStatistics {
        var out = self
        for (name, s) in other.channels { out.channels[name] = try out.channels[name].map { try $0.merged(with: s) } ?? s }
        for (name, g) in other.gradientSums {
            if let mine = out.gradientSums[name] {
                guard mine.shape == g.shape else {
                    throw CompressionError(.incompatibleStatistics, "gradient sums of '\(name)' have shapes \(mine.shape) and \(g.shape)")
                }
                out.gradientSums[name] = Tensor(shape: g.shape, floats: zip(mine.floats, g.floats).map(+))
            } else {
                out.gradientSums[name] = g
            }
        }
        out.samples = try checkedSum(samples, other.samples)
        return out
    }
}

/// One group's pruning decision, as reports show it.
public struct GroupDecision: Sendable, Codable, Equatable {
    public var group: String
    public var producers: [String]
    public var channels: Int
    public var kept: Int
    /// Kept channel indices (ascending).
    public var keptIndices: [Int]

    public init(group: String, producers: [String], channels: Int, kept: Int, keptIndices: [Int]) {
        self.group = group
        self.producers = producers
        self.channels = channels
        self.kept = kept
        self.keptIndices = keptIndices
    }
}

/// Structured pruning: importance per channel group, local or global selection, masking and physical surgery.
public enum Pruning {
    /// Normalised importance per prunable group (by group id): each member's per-channel score, the mean over the
    /// group's members, divided by the mean over channels (Torch-Pruning's default reduction), so scores of
    /// different groups compare in global ranking.
    public static func scores(_ groups: ChannelGroups, model: Model, criterion: ImportanceCriterion,
                              statistics: ImportanceStatistics? = nil) throws -> [Int: [Double]] {
        let initializers = model.graph.initializerIndex
        func tensor(_ name: String) throws -> Tensor {
            guard let i = initializers[name], let t = model.graph.initializers[i].tensor, t.dtype == .float else {
                throw CompressionError(.invalidArgument, "initializer '\(name)' is missing or not float")
            }
            return t
        }
        if criterion.needsData {
            guard let statistics, statistics.samples > 0 else {
                throw CompressionError(.invalidStatistics, "\(criterion.rawValue) importance needs statistics collected on data")
            }
        }
        var out: [Int: [Double]] = [:]
        for group in groups.prunable {
            let c = group.channels
            var perMember: [[Double]] = []
            switch criterion {
            case .l1, .l2, .bnScale, .taylor:
                var members = group.members.filter(\.scored)
                if criterion == .bnScale {
                    let scales = members.filter { $0.role == .normalizationScale }
                    if !scales.isEmpty { members = scales }
                }
                for m in members {
                    let w = try tensor(m.tensor)
                    let g: Tensor?
                    if criterion == .taylor {
                        guard let sum = statistics!.gradientSums[m.tensor], sum.shape == w.shape else {
                            throw CompressionError(.invalidStatistics, "no gradient sums for parameter '\(m.tensor)'")
                        }
                        g = sum
                    } else {
                        g = nil
                    }
                    var s = [Double](repeating: 0, count: c)
                    let n = Double(statistics?.samples ?? 1)
                    forEachSlice(w.shape, m, channels: c) { k, i in
                        let v = Double(w.floats[i])
                        switch criterion {
                        case .l1, .bnScale: s[k] += abs(v)
                        case .l2: s[k] += v * v
                        default: s[k] += v * Double(g!.floats[i]) / n
                        }
                    }
                    if criterion == .taylor { s = s.map(abs) }
                    perMember.append(s)
                }
            case .activation, .apoz:
                let names = group.statisticsTensor.map { [$0] } ?? []
                for name in names {
                    guard let stats = statistics!.channels[name], stats.channels == c else {
                        throw CompressionError(.invalidStatistics, "no activation statistics for '\(name)' (group \(group.name))")
                    }
                    perMember.append(criterion == .activation ? stats.meanMagnitude : stats.zeroFraction.map { 1 - $0 })
                }
            }
            guard !perMember.isEmpty else {
                throw CompressionError(.invalidArgument, "group \(group.name) has nothing to score with \(criterion.rawValue)")
            }
            var score = [Double](repeating: 0, count: c)
            for s in perMember { for k in 0..<c { score[k] += s[k] / Double(perMember.count) } }
            let mean = score.reduce(0, +) / Double(c)
            if mean > 0 { score = score.map { $0 / mean } }
            guard score.allSatisfy(\.isFinite) else {
                throw CompressionError(.invalidStatistics, "importance of group \(group.name) is not finite")
            }
            out[group.id] = score
        }
        return out
    }

    /// Visits the flat indices of member `m`'s slices in a tensor of `shape`: `body(channel, flatIndex)`.
    static func forEachSlice(_ shape: [Int], _ m: ChannelMember, channels: Int, _ body: (Int, Int) -> Void) {
        let outer = shape[..<m.axis].reduce(1, *), size = shape[m.axis], inner = shape[(m.axis + 1)...].reduce(1, *)
        for o in 0..<outer {
            for p in m.offset..<min(size, m.offset + channels * m.factor) {
                let k = (p - m.offset) / m.factor
                let base = (o * size + p) * inner
                for j in 0..<inner { body(k, base + j) }
            }
        }
    }

    /// Kept channel indices per prunable group (by id). `originalChannels` (by group name) are the counts before
    /// any pruning, for progressive schedules; the current counts otherwise.
    public static func select(_ groups: ChannelGroups, scores: [Int: [Double]], options: PruningOptions,
                              originalChannels: [String: Int] = [:]) throws -> [Int: [Int]] {
        try options.check()
        var keep: [Int: Int] = [:], lower: [Int: Int] = [:]
        let prunable = groups.prunable
        for g in prunable {
            let original = max(originalChannels[g.name] ?? g.channels, g.channels)
            let bound = max(original - Int((Double(original) * options.maxLayerRatio).rounded(.down)), min(options.minChannels, g.channels), 1)
            lower[g.id] = min(bound, g.channels)
            keep[g.id] = g.channels
            if options.scope == .local {
                let target = Int((Double(original) * (1 - options.ratio)).rounded(.down))
                keep[g.id] = min(g.channels, max(target, lower[g.id]!))
            }
        }
        if options.scope == .global {
            let originalTotal = prunable.reduce(0) { $0 + max(originalChannels[$1.name] ?? $1.channels, $1.channels) }
            let currentTotal = prunable.reduce(0) { $0 + $1.channels }
            let targetKept = Int((Double(originalTotal) * (1 - options.ratio)).rounded(.down))
            var toPrune = currentTotal - targetKept
            var ranked: [(Double, Int, Int)] = []
            for g in prunable { for (k, s) in scores[g.id]!.enumerated() { ranked.append((s, g.id, k)) } }
            ranked.sort { ($0.0, $0.1, $0.2) < ($1.0, $1.1, $1.2) }
            for (_, id, _) in ranked where toPrune > 0 && keep[id]! > lower[id]! {
                keep[id]! -= 1
                toPrune -= 1
            }
        }
        var out: [Int: [Int]] = [:]
        for g in prunable {
            // Kept counts round up, to a multiple of --round-to and of the group's unit: never pruned harder than
            // asked (a count already off the grid keeps all of its channels rather than dropping below target).
            var k = keep[g.id]!
            for multiple in [options.roundTo, g.unit] where multiple > 1 && k < g.channels {
                k = min(g.channels, (k + multiple - 1) / multiple * multiple)
            }
            out[g.id] = strongest(g, scores: scores[g.id]!, keeping: k)
        }
        return out
    }

    /// The `count` most important channels of `group` (ascending indices; ties to the lower index). A group with a
    /// unit (attention heads) keeps whole aligned blocks ranked by their summed scores, `count` rounded down to them.
    public static func strongest(_ group: ChannelGroup, scores s: [Double], keeping count: Int) -> [Int] {
        let k = min(max(count, 0), group.channels)
        if group.unit > 1 {
            let blocks = group.channels / group.unit
            let total = (0..<blocks).map { b in (0..<group.unit).reduce(0.0) { $0 + s[b * group.unit + $1] } }
            let order = (0..<blocks).sorted { total[$0] != total[$1] ? total[$0] > total[$1] : $0 < $1 }
            return order.prefix(k / group.unit).sorted().flatMap { b in (b * group.unit)..<((b + 1) * group.unit) }
        }
        let order = (0..<group.channels).sorted { s[$0] != s[$1] ? s[$0] > s[$1] : $0 < $1 }
        return Array(order.prefix(k)).sorted()
    }

    /// Removed positions per (initializer, axis) for a selection.
    static func removals(_ groups: ChannelGroups, kept: [Int: [Int]]) -> [String: [Int: Set<Int>]] {
        var out: [String: [Int: Set<Int>]] = [:]
        for g in groups.groups {
            guard let k = kept[g.id], k.count < g.channels else { continue }
            let keptSet = Set(k)
            let pruned = (0..<g.channels).filter { !keptSet.contains($0) }
            for m in g.members {
                var positions = out[m.tensor]?[m.axis] ?? []
                for c in pruned { for j in 0..<m.factor { positions.insert(m.offset + c * m.factor + j) } }
                out[m.tensor, default: [:]][m.axis] = positions
            }
        }
        return out
    }

    /// The masked model: every parameter slice of the removed channels set to zero (the model that fine-tuning
    /// with masks trains, and whose outputs surgery must reproduce).
    public static func mask(_ model: Model, groups: ChannelGroups, kept: [Int: [Int]]) throws -> Model {
        var out = model
        let index = out.graph.initializerIndex
        for (name, axes) in removals(groups, kept: kept) {
            guard let i = index[name], var t = out.graph.initializers[i].tensor else { continue }
            for (axis, positions) in axes {
                let size = t.shape[axis], inner = t.shape[(axis + 1)...].reduce(1, *)
                for flat in 0..<t.count where positions.contains((flat / inner) % size) { t.floats[flat] = 0 }
            }
            out.graph.initializers[i].setTensor(t)
        }
        // A removed branch adds nothing: its layers' biases and its batch norms' shifts and means are zeroed too.
        var zeroed = Set<String>()
        for g in groups.groups where kept[g.id]?.isEmpty == true {
            guard let branch = groups.branches[g.id] else { continue }
            let outputs = Set(branch.nodes)
            for node in out.graph.nodes where node.outputs.first.map({ outputs.contains($0) }) == true {
                if ["Conv", "Gemm"].contains(node.opType), node.inputs.count > 2 { zeroed.insert(node.inputs[2]) }
                if node.opType == "BatchNormalization", node.inputs.count > 3 { zeroed.formUnion([node.inputs[2], node.inputs[3]]) }
            }
        }
        for name in zeroed {
            guard let i = index[name], var t = out.graph.initializers[i].tensor else { continue }
            t.floats = Array(repeating: 0, count: t.count)
            out.graph.initializers[i].setTensor(t)
        }
        return out
    }

    /// The pruned model: removed channels cut out of every parameter, depthwise convolutions' `group` updated.
    /// Its outputs equal the masked model's (`mask`). The result is checked by shape inference.
    public static func prune(_ model: Model, groups: ChannelGroups, kept: [Int: [Int]]) throws -> Model {
        var out = model
        let index = out.graph.initializerIndex
        for (name, axes) in removals(groups, kept: kept) {
            guard let i = index[name], var t = out.graph.initializers[i].tensor else { continue }
            for (axis, positions) in axes.sorted(by: { $0.key < $1.key }) { t = slice(t, axis: axis, removing: positions) }
            out.graph.initializers[i].setTensor(t)
        }
        let shapes = Dictionary(uniqueKeysWithValues: out.graph.initializers.map { ($0.name, $0.shape) })
        for (n, node) in out.graph.nodes.enumerated() {
            guard let width = groups.groupedNodes[node.name], let w = shapes[node.inputs[1]],
                  let a = node.attributes.firstIndex(where: { $0.name == "group" }) else { continue }
            out.graph.nodes[n].attributes[a] = Attribute("group", .int(Int64(w[0] / width)))
        }
        // Reshapes that channels pass through (attention heads split or merged, [N, C, 1, 1] → [N, C]) take targets
        // that follow the kept counts: leading sizes copied (0), the channels' axis inferred (-1).
        var used = Set(out.graph.initializers.map(\.name))
        for r in groups.reshapeRewrites {
            guard let n = out.graph.nodes.firstIndex(where: { $0.name == r.node }) else { continue }
            let name = GraphEditing.uniqueName(r.node + "_pruned_shape", &used)
            out.graph.initializers.append(Initializer(name: name, tensor: Tensor(shape: [r.target.count], ints: r.target, dtype: .int64)))
            out.graph.nodes[n].inputs[1] = name
            // 0 copies the input's size only without allowzero.
            out.graph.nodes[n].attributes.removeAll { $0.name == "allowzero" }
        }
        try removeBranches(&out.graph, groups: groups, kept: kept)
        out.graph.removeDeadNodes()
        out.graph.valueInfo = []
        do {
            _ = try ShapeInference.infer(out.graph, opset: out.defaultOpset ?? 13,
                                         inputs: try ChannelGroups.analysisShapes(out))
        } catch {
            throw CompressionError(.invalidArgument, "pruning produced an inconsistent graph (a Whittle bug, please report): \(error)")
        }
        return out
    }

    /// Groups that keep none of their channels: each must live inside a residual branch (`ChannelGroups.branches`),
    /// and the block becomes its shortcut (the Add's readers read the shortcut; the branch is then dead).
    static func removeBranches(_ graph: inout Graph, groups: ChannelGroups, kept: [Int: [Int]]) throws {
        var renamed: [String: String] = [:]
        for g in groups.groups where kept[g.id]?.isEmpty == true {
            guard let branch = groups.branches[g.id] else {
                throw CompressionError(.invalidArgument, "group \(g.name) cannot keep 0 of its \(g.channels) channels: only a group inside a residual block's branch can be removed whole (the block then skipped)")
            }
            guard let n = graph.nodes.firstIndex(where: { $0.outputs.first == branch.add }) else { continue }
            let add = graph.nodes[n], shortcut = add.inputs[1 - branch.branchInput]
            if graph.outputs.contains(where: { $0.name == branch.add }) {
                graph.nodes[n] = Node(opType: "Identity", name: add.name, inputs: [shortcut], outputs: add.outputs)
            } else {
                graph.nodes.remove(at: n)
                renamed[branch.add] = shortcut
            }
        }
        guard !renamed.isEmpty else { return }
        // Consecutive skipped blocks: a shortcut may itself be a removed Add's output.
        func resolved(_ name: String) -> String {
            var name = name
            while let next = renamed[name] { name = next }
            return name
        }
        for i in graph.nodes.indices {
            graph.nodes[i].inputs = graph.nodes[i].inputs.map { $0.isEmpty ? $0 : resolved($0) }
        }
    }

    static func slice(_ t: Tensor, axis: Int, removing positions: Set<Int>) -> Tensor {
        let outer = t.shape[..<axis].reduce(1, *), size = t.shape[axis], inner = t.shape[(axis + 1)...].reduce(1, *)
        let keep = (0..<size).filter { !positions.contains($0) }
        var values: [Float] = []
        values.reserveCapacity(outer * keep.count * inner)
        for o in 0..<outer {
            for p in keep {
                let base = (o * size + p) * inner
                values += t.floats[base..<(base + inner)]
            }
        }
        var shape = t.shape
        shape[axis] = keep.count
        return Tensor(shape: shape, floats: values)
    }

    /// The decisions as reports show them.
    public static func decisions(_ groups: ChannelGroups, kept: [Int: [Int]]) -> [GroupDecision] {
        groups.prunable.map { g in
            let k = kept[g.id] ?? Array(0..<g.channels)
            return GroupDecision(group: g.name, producers: g.producers, channels: g.channels, kept: k.count, keptIndices: k)
        }
    }
}
