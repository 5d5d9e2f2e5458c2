import WhittleNN
import WhittleONNX
import WhittleTensor

/// One architecture of a search space: the channels kept in each prunable group, as ladder levels (index into the
/// dimension's `widths`), in the order of `SearchSpace.dimensions`.
public struct Architecture: Hashable, Sendable, Codable {
    public var levels: [Int]
    public init(levels: [Int]) { self.levels = levels }
}

/// The architectures reachable by channel pruning: per prunable dependency group, a ladder of widths from
/// `minimumFraction` of its channels to all of them, in steps of `1 / steps`, each a multiple of `--round-to` and of
/// the group's unit (an attention head), never below `minimumChannels`. With `skipBlocks`, a group that lives
/// inside a residual block's branch (`ChannelGroups.branches`) may also keep 0 channels: the block is skipped.
public struct SearchSpace: Sendable {
    public struct Dimension: Sendable, Codable, Equatable {
        /// The group's id in `ChannelGroups` and its name (its first producer).
        public var group: Int
        public var name: String
        public var channels: Int
        /// Ascending widths; the last is `channels`. A first width of 0 skips the residual block the group is in.
        public var widths: [Int]

        /// Whether the dimension can skip its residual block (its ladder starts at 0).
        public var skippable: Bool { widths.first == 0 }
        /// The level of the narrowest width that keeps channels (1 when the ladder starts with the skip).
        public var narrowestKept: Int { skippable ? 1 : 0 }
    }

    public let dimensions: [Dimension]

    /// Default ladder: from a sixteenth of the channels in 32 steps (every width of a group of up to 32 channels),
    /// fine enough that the uniform ratios of extreme pruning (85 % and more) are points of the space.
    public static let defaultMinimumFraction = 0.0625
    public static let defaultSteps = 32

    public init(groups: ChannelGroups, minimumFraction: Double = defaultMinimumFraction, steps: Int = defaultSteps,
                roundTo: Int = 1, minimumChannels: Int = 1, skipBlocks: Bool = false) throws {
        guard minimumFraction > 0, minimumFraction <= 1 else {
            throw CompressionError(.invalidArgument, "the smallest width must be a fraction in (0, 1], got \(minimumFraction)")
        }
        guard steps >= 1, steps <= 256 else { throw CompressionError(.invalidArgument, "the width ladder needs 1 to 256 steps, got \(steps)") }
        guard roundTo >= 1 else { throw CompressionError(.invalidArgument, "--round-to must be at least 1, got \(roundTo)") }
        var dimensions: [Dimension] = []
        for g in groups.prunable {
            let multiple = Self.leastCommonMultiple(max(roundTo, 1), max(g.unit, 1))
            func rounded(_ k: Int) -> Int { min(g.channels, (k + multiple - 1) / multiple * multiple) }
            let floor = rounded(max(minimumChannels, Int((Double(g.channels) * minimumFraction).rounded(.up)), 1))
            var widths = Set([g.channels, floor])
            for step in 1...steps {
                let k = rounded(Int((Double(g.channels) * Double(step) / Double(steps)).rounded(.up)))
                if k >= floor { widths.insert(k) }
            }
            if skipBlocks, groups.branches[g.id] != nil { widths.insert(0) }
            let ladder = widths.sorted()
            guard ladder.count > 1 else { continue }  // nothing to choose (a group of one unit)
            dimensions.append(Dimension(group: g.id, name: g.name, channels: g.channels, widths: ladder))
        }
        guard !dimensions.isEmpty else {
            throw CompressionError(.invalidArgument, "the model has no channel group that can be narrowed; there is nothing to search")
        }
        self.dimensions = dimensions
    }

    static func leastCommonMultiple(_ a: Int, _ b: Int) -> Int {
        func gcd(_ x: Int, _ y: Int) -> Int { y == 0 ? x : gcd(y, x % y) }
        return a / gcd(a, b) * b
    }

    /// Every group at full width (the base model).
    public var full: Architecture { Architecture(levels: dimensions.map { $0.widths.count - 1 }) }
    /// Every group at its narrowest (every skippable block skipped).
    public var narrowest: Architecture { Architecture(levels: dimensions.map { _ in 0 }) }

    /// The groups skipped in `a` (their residual blocks removed), by name.
    public func skipped(_ a: Architecture) -> [String] {
        zip(dimensions, a.levels).filter { $0.widths[$1] == 0 }.map(\.0.name)
    }

    /// The channels kept per group id.
    public func widths(_ a: Architecture) -> [Int: Int] {
        Dictionary(uniqueKeysWithValues: zip(dimensions, a.levels).map { ($0.group, $0.widths[$1]) })
    }

    /// The kept channel indices per group id: each group's most important channels (`Pruning.strongest`) by `scores`.
    public func kept(_ a: Architecture, groups: ChannelGroups, scores: [Int: [Double]]) throws -> [Int: [Int]] {
        let byID = Dictionary(uniqueKeysWithValues: groups.groups.map { ($0.id, $0) })
        var out: [Int: [Int]] = [:]
        for (d, level) in zip(dimensions, a.levels) {
            guard let g = byID[d.group], let s = scores[d.group], s.count == g.channels else {
                throw CompressionError(.invalidArgument, "no importance scores for group \(d.name)")
            }
            out[d.group] = Pruning.strongest(g, scores: s, keeping: d.widths[level])
        }
        return out
    }

    /// The per-group widths as reports show them (and search tasks carry them).
    public func describe(_ a: Architecture) -> [String: Int] {
        Dictionary(uniqueKeysWithValues: zip(dimensions, a.levels).map { ($0.name, $0.widths[$1]) })
    }

    /// The architecture with these widths per group name (`describe`'s inverse): every dimension named, each width
    /// on its ladder.
    public func architecture(widths: [String: Int]) throws -> Architecture {
        guard Set(widths.keys) == Set(dimensions.map(\.name)) else {
            let missing = dimensions.map(\.name).filter { widths[$0] == nil }, unknown = widths.keys.filter { w in !dimensions.contains { $0.name == w } }
            throw CompressionError(.invalidArgument, "the widths name groups \(unknown.sorted()) the model does not have, or miss \(missing.sorted())")
        }
        return Architecture(levels: try dimensions.map { d in
            guard let level = d.widths.firstIndex(of: widths[d.name]!) else {
                throw CompressionError(.invalidArgument, "group \(d.name) cannot keep \(widths[d.name]!) channels; its widths are \(d.widths)")
            }
            return level
        })
    }
}

/// What an architecture costs, computed exactly from shapes: MACs for one sample, parameters, parameter bytes; and,
/// when a latency table is at hand, its predicted latency (`LatencyModel`).
public struct ArchitectureCost: Sendable, Codable, Equatable {
    public var macs: Int
    public var parameters: Int
    public var parameterBytes: Int
    /// Predicted milliseconds at the latency table's batch size.
    public var latencyMs: Double?

    public init(macs: Int, parameters: Int, parameterBytes: Int, latencyMs: Double? = nil) {
        self.macs = macs
        self.parameters = parameters
        self.parameterBytes = parameterBytes
        self.latencyMs = latencyMs
    }

    public init(_ summary: ModelSummary) {
        self.init(macs: summary.macs, parameters: summary.parameters, parameterBytes: summary.parameterBytes)
    }
}

/// The costs of a search space's architectures without building them: every initializer's element count is the
/// product of its axes' sizes, and an axis shrinks by the channels its groups drop (times the member's factor);
/// Conv, ConvTranspose, Gemm and MatMul MACs are proportional to their constant weight's element count. When every
/// node with MACs has such a weight, the figures equal `ModelSummary` of the pruned model (`exact`); otherwise
/// (a MatMul of two activations, as in attention) `cost` is only an estimate and callers confirm with `measured`.
public struct CostModel: Sendable {
    struct Axis: Sendable {
        var size: Int
        /// (dimension index, factor): the channels of that dimension's group each take `factor` positions here.
        var members: [(dimension: Int, factor: Int)]
    }

    struct Parameter: Sendable {
        var elementBytes: Int
        var axes: [Axis]
        /// Skippable dimensions whose skip removes the parameter (only their residual branch reads it).
        var vanishesWith: [Int] = []
    }

    let space: SearchSpace
    let parameters: [String: Parameter]
    /// Parameters no group touches (their elements and bytes are constant).
    let fixedElements: Int
    let fixedBytes: Int
    /// MACs of nodes with a constant weight, by weight name (several nodes may share one).
    let scaledMACs: [(weight: String, macs: Int)]
    let fixedMACs: Int
    /// MACs of nodes without a constant weight inside skippable branches, with the dimensions whose skip removes them.
    let branchMACs: [(dimensions: [Int], macs: Int)]
    public let exact: Bool

    public init(model: Model, groups: ChannelGroups, space: SearchSpace) throws {
        self.space = space
        let dimensionOf = Dictionary(uniqueKeysWithValues: space.dimensions.enumerated().map { ($1.group, $0) })
        var touched: [String: [Int: [(Int, Int)]]] = [:]
        for g in groups.groups {
            guard let d = dimensionOf[g.id] else { continue }
            for m in g.members { touched[m.tensor, default: [:]][m.axis, default: []].append((d, m.factor)) }
        }
        // Skippable dimensions: the nodes of their residual branches (by first output), and the initializers only
        // those nodes read, which a skip removes.
        var branchDimensions: [String: Set<Int>] = [:]
        for (d, dimension) in space.dimensions.enumerated() where dimension.skippable {
            for output in groups.branches[dimension.group]?.nodes ?? [] { branchDimensions[output, default: []].insert(d) }
        }
        var readers: [String: [Set<Int>]] = [:]
        for node in model.graph.nodes {
            let dimensions = branchDimensions[node.outputs.first ?? ""] ?? []
            for input in node.inputs where !input.isEmpty { readers[input, default: []].append(dimensions) }
        }
        func vanishing(_ name: String) -> [Int] {
            guard let sets = readers[name], let first = sets.first else { return [] }
            return sets.dropFirst().reduce(first) { $0.intersection($1) }.sorted()
        }
        var parameters: [String: Parameter] = [:]
        var fixedElements = 0, fixedBytes = 0
        for initializer in model.graph.initializers {
            let bytes = ModelSummary.elementBytes(initializer.elementType)
            let shape = initializer.shape
            let vanishes = vanishing(initializer.name)
            guard touched[initializer.name] != nil || !vanishes.isEmpty else {
                fixedElements += shape.reduce(1, *)
                fixedBytes += shape.reduce(1, *) * bytes
                continue
            }
            let axes = touched[initializer.name] ?? [:]
            parameters[initializer.name] = Parameter(elementBytes: bytes, axes: shape.enumerated().map { axis, size in
                Axis(size: size, members: (axes[axis] ?? []).map { (dimension: $0.0, factor: $0.1) })
            }, vanishesWith: vanishes)
        }
        let inferred = try ShapeInference.infer(model.graph, opset: model.defaultOpset ?? 13,
                                                inputs: try ShapeInference.inputShapes(model, batchSize: 1))
        let initializerNames = Set(model.graph.initializers.map(\.name))
        var scaled: [(String, Int)] = []
        var fixedMACs = 0
        var branchMACs: [([Int], Int)] = []
        var exact = true
        for (i, ctx) in inferred.contexts.enumerated() where inferred.macs[i] > 0 && !inferred.folded[i] {
            let node = ctx.node
            let weight = ["Conv", "ConvTranspose", "Gemm", "MatMul"].contains(node.opType) && node.inputs.count > 1
                && initializerNames.contains(node.inputs[1]) ? node.inputs[1] : nil
            if let weight {
                if parameters[weight] != nil { scaled.append((weight, inferred.macs[i])) } else { fixedMACs += inferred.macs[i] }
            } else if let dimensions = branchDimensions[node.outputs.first ?? ""] {
                branchMACs.append((dimensions.sorted(), inferred.macs[i]))
                exact = false
            } else {
                fixedMACs += inferred.macs[i]
                exact = false
            }
        }
        self.branchMACs = branchMACs.map { (dimensions: $0.0, macs: $0.1) }
        self.parameters = parameters
        self.fixedElements = fixedElements
        self.fixedBytes = fixedBytes
        scaledMACs = scaled
        self.fixedMACs = fixedMACs
        self.exact = exact
    }

    /// The channels kept per dimension of `a`.
    func widths(_ a: Architecture) -> [Int] { zip(space.dimensions, a.levels).map { $0.widths[$1] } }

    /// The size of `axis` of the initializer `name` once the groups are narrowed to `widths` (its size in the base
    /// model when no group touches it or it is not an initializer).
    func size(of name: String, axis: Int, widths: [Int], base: Int) -> Int {
        guard let p = parameters[name], axis < p.axes.count else { return base }
        var size = p.axes[axis].size
        for m in p.axes[axis].members { size -= (space.dimensions[m.dimension].channels - widths[m.dimension]) * m.factor }
        return max(size, 0)
    }

    /// The cost of `a` (exact when `exact`).
    public func cost(_ a: Architecture) -> ArchitectureCost {
        let widths = widths(a)
        var elements: [String: Int] = [:]
        var total = fixedElements, bytes = fixedBytes
        for (name, p) in parameters {
            var n = 1
            for axis in p.axes {
                var size = axis.size
                for m in axis.members { size -= (space.dimensions[m.dimension].channels - widths[m.dimension]) * m.factor }
                n *= max(size, 0)
            }
            if p.vanishesWith.contains(where: { widths[$0] == 0 }) { n = 0 }
            elements[name] = n
            total += n
            bytes += n * p.elementBytes
        }
        var macs = fixedMACs
        for (dimensions, m) in branchMACs where !dimensions.contains(where: { widths[$0] == 0 }) { macs += m }
        for (weight, base) in scaledMACs {
            let original = parameters[weight]!.axes.reduce(1) { $0 * $1.size }
            // Integer arithmetic: MACs are (output positions) × (weight elements), so the division is exact.
            macs += original == 0 ? 0 : base / original * elements[weight]!
        }
        return ArchitectureCost(macs: macs, parameters: total, parameterBytes: bytes)
    }

    /// The cost of the model itself (pruned by surgery and summarized): the reference `cost` is checked against.
    public static func measured(_ model: Model) throws -> ArchitectureCost { ArchitectureCost(try ModelSummary(model: model)) }
}

/// Limits an architecture must meet; nil means no limit. A latency limit needs costs with a predicted latency.
public struct SearchBudget: Sendable, Codable, Equatable {
    public var macs: Int?
    public var parameterBytes: Int?
    /// Milliseconds at the latency table's batch size.
    public var latencyMs: Double?

    public init(macs: Int? = nil, parameterBytes: Int? = nil, latencyMs: Double? = nil) {
        self.macs = macs
        self.parameterBytes = parameterBytes
        self.latencyMs = latencyMs
    }

    public var isEmpty: Bool { macs == nil && parameterBytes == nil && latencyMs == nil }

    public func admits(_ c: ArchitectureCost) -> Bool {
        (macs.map { c.macs <= $0 } ?? true) && (parameterBytes.map { c.parameterBytes <= $0 } ?? true)
            && (latencyMs.map { limit in c.latencyMs.map { $0 <= limit } ?? false } ?? true)
    }

    /// How much of the budget `c` uses: the largest of its fractions (1 is exactly at the budget).
    public func usage(_ c: ArchitectureCost) -> Double {
        max(macs.map { Double(c.macs) / Double(max($0, 1)) } ?? 0, parameterBytes.map { Double(c.parameterBytes) / Double(max($0, 1)) } ?? 0,
            latencyMs.map { limit in (c.latencyMs ?? .infinity) / max(limit, .leastNonzeroMagnitude) } ?? 0)
    }

    /// Refuses a budget no architecture of the space meets, naming the smallest achievable figures.
    public func check(smallest: ArchitectureCost) throws {
        guard !isEmpty else { throw CompressionError(.invalidArgument, "the search needs a budget (MACs, size or latency)") }
        if let latencyMs {
            guard let predicted = smallest.latencyMs else {
                throw CompressionError(.invalidArgument, "a latency budget needs a latency table")
            }
            if predicted > latencyMs {
                throw CompressionError(.invalidArgument, "the latency budget \(Self.milliseconds(latencyMs)) is below the smallest architecture of the search space (\(Self.milliseconds(predicted)) predicted); raise the budget or lower the smallest width")
            }
        }
        if let macs, smallest.macs > macs {
            throw CompressionError(.invalidArgument, "the MACs budget \(macs) is below the smallest architecture of the search space (\(smallest.macs) MACs); raise the budget or lower the smallest width")
        }
        if let parameterBytes, smallest.parameterBytes > parameterBytes {
            throw CompressionError(.invalidArgument, "the size budget \(parameterBytes) bytes is below the smallest architecture of the search space (\(smallest.parameterBytes) bytes of parameters); raise the budget or lower the smallest width")
        }
    }

    static func milliseconds(_ v: Double) -> String {
        "\((v * 1000).rounded() / 1000) ms"
    }
}

/// One evaluated architecture.
public struct SearchCandidate: Sendable, Codable, Equatable {
    public var architecture: Architecture
    public var cost: ArchitectureCost
    /// Higher is better (the negated mean loss after adaptive batch norm).
    public var fitness: Double
    public var generation: Int
}

/// Evolutionary search under a budget (in the manner of Once-for-All's and EagleEye's searches): a population of
/// architectures that fill the budget, the fittest kept as parents, children by crossover and mutation of ladder
/// levels, each repaired back into the budget (narrowed while over it, widened while it still fits) so every
/// candidate spends the budget. Deterministic for a seed: the same fitness gives the same candidates.
public struct EvolutionarySearch: Sendable {
    /// Fine-tuning epochs of each finalist before they are compared (`--finalist-epochs`). Two, not one: after one
    /// epoch the uniform architecture, which learns fastest, won comparisons it lost after five
    /// (benchmarks/README.md, "Architecture search against uniform pruning").
    public static let defaultFinalistEpochs = 2

    /// Architectures evaluated in all (the initial population included).
    public var evaluations = 160
    public var population = 32
    public var parents = 8
    /// Probability that a child's level in one dimension is redrawn.
    public var mutationRate = 0.1
    /// How far a group's width may stray from the uniform share that fills the budget: between share / spread and
    /// share × spread of its channels (nil, the default: anywhere on the ladder). A bound keeps architectures
    /// balanced (the loss before training also likes one- and two-channel bottlenecks); on the demo CNN it did not
    /// help (benchmarks/README.md, "Architecture search").
    public var spread: Double?
    public var seed: UInt64 = 0

    public init() {}

    /// Runs the search. `fitness` scores a batch of architectures (higher is better); it is called once per
    /// generation with the new ones only. Returns every evaluated candidate, in evaluation order.
    public func run(space: SearchSpace, cost: (Architecture) throws -> ArchitectureCost, budget: SearchBudget,
                    fitness: ([Architecture]) throws -> [Double]) throws -> [SearchCandidate] {
        guard evaluations >= 1, population >= 2, parents >= 1, parents <= population, (0...1).contains(mutationRate) else {
            throw CompressionError(.invalidArgument, "the search needs evaluations ≥ 1, population ≥ 2 and 1 ≤ parents ≤ population")
        }
        try budget.check(smallest: try cost(space.narrowest))
        if let spread { guard spread >= 1 else { throw CompressionError(.invalidArgument, "the spread must be at least 1, got \(spread)") } }
        var rng = SplitMix64(seed: seed ^ 0x5EA5C4)
        let (uniform, share) = try Self.uniformShare(space: space, cost: cost, budget: budget)
        // Per dimension, the levels allowed: around the uniform share, always including the uniform level.
        let bounds: [ClosedRange<Int>] = space.dimensions.enumerated().map { d, dimension in
            let top = dimension.widths.count - 1
            guard let spread else { return 0...top }
            let c = Double(dimension.channels)
            let low = dimension.widths.firstIndex { Double($0) >= c * share / spread - 1e-9 } ?? top
            let high = dimension.widths.lastIndex { Double($0) <= c * share * spread + 1e-9 } ?? 0
            return (dimension.skippable ? 0 : min(low, uniform.levels[d]))...max(high, uniform.levels[d])
        }
        var seen: Set<Architecture> = []
        var evaluated: [SearchCandidate] = []

        // The narrowest level a width may move to: a skippable block is skipped or not by mutation only, never by
        // narrowing or widening (which would revive skipped blocks at their narrowest, or skip them to fit).
        func floor(_ d: Int) -> Int { max(bounds[d].lowerBound, space.dimensions[d].narrowestKept) }

        func repaired(_ start: Architecture) throws -> Architecture {
            var a = start
            func skipped(_ d: Int) -> Bool { a.levels[d] == 0 && space.dimensions[d].skippable }
            // Narrow while over the budget: a random dimension, weighted by how many levels it has left.
            while !budget.admits(try cost(a)) {
                let open = a.levels.indices.filter { !skipped($0) && a.levels[$0] > floor($0) }
                guard !open.isEmpty else { break }
                let total = open.reduce(0) { $0 + a.levels[$1] - floor($1) }
                var pick = Int(rng.next() % UInt64(total))
                for d in open {
                    pick -= a.levels[d] - floor(d)
                    if pick < 0 { a.levels[d] -= 1; break }
                }
            }
            // Widen while it fits: dimensions in random order, one level at a time, until none can grow.
            var grew = true
            while grew {
                grew = false
                for d in rng.permutation(a.levels.count) where a.levels[d] < bounds[d].upperBound && !skipped(d) {
                    a.levels[d] += 1
                    if budget.admits(try cost(a)) { grew = true } else { a.levels[d] -= 1 }
                }
            }
            return a
        }

        func evaluate(_ batch: [Architecture], generation: Int) throws {
            guard !batch.isEmpty else { return }
            let scores = try fitness(batch)
            guard scores.count == batch.count else {
                throw CompressionError(.invalidStatistics, "the fitness gave \(scores.count) scores for \(batch.count) architectures")
            }
            for (a, f) in zip(batch, scores) {
                evaluated.append(SearchCandidate(architecture: a, cost: try cost(a), fitness: f.isFinite ? f : -Double.infinity,
                                                 generation: generation))
            }
        }

        // The first generation: the uniform architecture that fills the budget, then random ones around it.
        var first: [Architecture] = []
        func propose(_ a: Architecture, into batch: inout [Architecture]) throws {
            let r = try repaired(a)
            if budget.admits(try cost(r)), seen.insert(r).inserted { batch.append(r) }
        }
        // The uniform architecture as it is (not widened here and there to fill the budget): the reference.
        if budget.admits(try cost(uniform)), seen.insert(uniform).inserted { first.append(uniform) }
        var attempts = 0
        while first.count < min(population, evaluations) && attempts < population * 20 {
            attempts += 1
            try propose(Architecture(levels: bounds.map { $0.lowerBound + Int(rng.next() % UInt64($0.count)) }), into: &first)
        }
        try evaluate(first, generation: 0)

        var generation = 1
        while evaluated.count < evaluations {
            let ranked = evaluated.sorted { $0.fitness != $1.fitness ? $0.fitness > $1.fitness : $0.generation < $1.generation }
            let elite = ranked.prefix(parents).map(\.architecture)
            var children: [Architecture] = []
            let wanted = min(population, evaluations - evaluated.count)
            attempts = 0
            while children.count < wanted && attempts < wanted * 20 {
                attempts += 1
                let mother = elite[Int(rng.next() % UInt64(elite.count))]
                let father = elite[Int(rng.next() % UInt64(elite.count))]
                var child = Architecture(levels: zip(mother.levels, father.levels).map { m, f in rng.next() & 1 == 0 ? m : f })
                for d in child.levels.indices where Double(rng.nextFloat()) < mutationRate {
                    let count = space.dimensions[d].widths.count
                    // A skippable block is skipped or brought back (at its uniform width) by a quarter of mutations.
                    if space.dimensions[d].skippable, rng.next() % 4 == 0 {
                        child.levels[d] = child.levels[d] == 0 ? max(uniform.levels[d], 1) : 0
                        continue
                    }
                    // A step of up to an eighth of the ladder (at least two levels) either way: children stay near
                    // their parents.
                    let reach = max(2, count / 8)
                    let step = Int(rng.next() % UInt64(2 * reach)) - reach
                    guard child.levels[d] != 0 || !space.dimensions[d].skippable else { continue }  // a skipped block stays so
                    child.levels[d] = min(max(child.levels[d] + (step >= 0 ? step + 1 : step), floor(d)), bounds[d].upperBound)
                }
                try propose(child, into: &children)
            }
            if children.isEmpty { break }  // the space near the elite is exhausted
            try evaluate(children, generation: generation)
            generation += 1
        }
        return evaluated
    }

    /// The architectures of generation `g` (0 the first), given the fitness of every earlier generation (`known[k]`:
    /// generation k's, in its order): what `run` would ask to score next. A search whose generations are scored
    /// elsewhere (a round's phases, each on the fleet) replays from what it stored, deterministically. Empty when the
    /// search ends before generation `g` (its evaluations spent, or the space near its elite exhausted).
    public func generation(_ g: Int, space: SearchSpace, cost: (Architecture) throws -> ArchitectureCost, budget: SearchBudget,
                           known: [[Double]]) throws -> [Architecture] {
        struct Asked: Error { let batch: [Architecture] }
        var calls = 0
        do {
            _ = try run(space: space, cost: cost, budget: budget) { batch in
                defer { calls += 1 }
                if calls == g { throw Asked(batch: batch) }
                guard calls < known.count, known[calls].count == batch.count else {
                    throw CompressionError(.invalidStatistics, "generation \(calls + 1) of the search has \(batch.count) candidates; \(calls < known.count ? "\(known[calls].count) scores are stored" : "no scores are stored")")
                }
                return known[calls]
            }
        } catch let asked as Asked {
            return asked.batch
        }
        return []
    }

    /// Generations of `population` needed for `evaluations` candidates (a search may end sooner).
    public var generations: Int { (max(evaluations, 1) + max(population, 1) - 1) / max(population, 1) }

    /// The widest architecture with every group at the same share of its channels (to a thousandth) that meets the
    /// budget: uniform pruning's point, the reference a search must beat.
    public static func uniform(space: SearchSpace, cost: (Architecture) throws -> ArchitectureCost, budget: SearchBudget) rethrows -> Architecture {
        try uniformShare(space: space, cost: cost, budget: budget).architecture
    }

    /// `uniform` and its share of channels.
    static func uniformShare(space: SearchSpace, cost: (Architecture) throws -> ArchitectureCost,
                             budget: SearchBudget) rethrows -> (architecture: Architecture, share: Double) {
        func at(_ share: Double) -> Architecture {
            Architecture(levels: space.dimensions.map { d in
                d.widths.lastIndex { $0 > 0 && Double($0) <= Double(d.channels) * share + 1e-9 } ?? d.narrowestKept
            })
        }
        // Bisection on the share: the cost grows with it.
        var low = 0.0, high = 1.0
        if budget.admits(try cost(at(1))) { return (at(1), 1) }
        for _ in 0..<30 {
            let middle = (low + high) / 2
            if budget.admits(try cost(at(middle))) { low = middle } else { high = middle }
        }
        return (at(low), low)
    }

    /// The `count` fittest distinct candidates, the first (uniform) one always among them: the finalists a short
    /// fine-tuning decides between.
    public static func finalists(_ candidates: [SearchCandidate], count: Int) -> [SearchCandidate] {
        guard let first = candidates.first else { return [] }
        let ranked = candidates.dropFirst().sorted { $0.fitness != $1.fitness ? $0.fitness > $1.fitness : $0.generation < $1.generation }
        return [first] + ranked.prefix(max(count - 1, 0))
    }

    /// The candidates no other beats on both fitness and cost: predicted latency when every candidate has one, MACs
    /// otherwise (ascending cost).
    public static func front(_ candidates: [SearchCandidate]) -> [SearchCandidate] {
        let byLatency = !candidates.isEmpty && candidates.allSatisfy { $0.cost.latencyMs != nil }
        func key(_ c: SearchCandidate) -> Double { byLatency ? c.cost.latencyMs! : Double(c.cost.macs) }
        let sorted = candidates.sorted { key($0) != key($1) ? key($0) < key($1) : $0.fitness > $1.fitness }
        var out: [SearchCandidate] = []
        var best = -Double.infinity
        for c in sorted where c.fitness > best {
            out.append(c)
            best = c.fitness
        }
        return out
    }
}
