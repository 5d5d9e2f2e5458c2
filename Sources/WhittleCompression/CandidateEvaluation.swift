import Foundation
import WhittleNN
import WhittleONNX
import WhittleTensor

/// How well a candidate architecture does on some data, as sums that merge across workers: a loss (cross-entropy
/// against labels; without labels the KL divergence from the base model's softmax; for other tasks the squared error
/// against the base model's output relative to its energy) and the task's figures against the base model.
public struct CandidateScore: Sendable, Codable, Equatable {
    public var samples = 0
    public var lossSum = 0.0
    public var evaluation: TaskEvaluation

    public init(task: TaskKind) { evaluation = TaskEvaluation(task: task) }

    public var meanLoss: Double { samples == 0 ? .infinity : lossSum / Double(samples) }
    /// Top-1 accuracy on labelled samples (nil without labels).
    public var accuracy: Double? { evaluation.compressedAccuracy }

    public mutating func merge(_ other: CandidateScore) throws {
        guard other.evaluation.task == evaluation.task else {
            throw CompressionError(.incompatibleStatistics, "candidate scores of a \(evaluation.task.rawValue) and a \(other.evaluation.task.rawValue) model")
        }
        samples += other.samples
        lossSum += other.lossSum
        try evaluation.merge(other.evaluation)
    }
}

/// Scores a pruned candidate without training it (EagleEye's adaptive batch norm): its inherited weights, its
/// batch-norm statistics re-estimated on the data, then its loss and metrics on the data.
public enum CandidateEvaluation {
    /// Batches used to re-estimate batch-norm statistics (EagleEye uses 50 of 64; small data sets use what they have).
    public static let defaultAdaptationBatches = 16

    /// `model` with every BatchNormalization's running mean and variance replaced by the mean, over up to `batches`
    /// full batches of `data`, of the batch statistics a training-mode forward pass computes (the mean of the batch
    /// means and of the unbiased batch variances). A model without batch norm is returned unchanged.
    public static func adaptBatchNorm(_ model: Model, data: Dataset, batchSize: Int, batches: Int = defaultAdaptationBatches) throws -> Model {
        guard model.graph.nodes.contains(where: { $0.opType == "BatchNormalization" }) else { return model }
        let size = min(max(batchSize, 1), data.count)
        guard size >= 2 else { throw CompressionError(.invalidArgument, "re-estimating batch-norm statistics needs at least 2 samples") }
        let shapes = Samples.shapes(try data.samples.rows(0..<size).feed(model.graph), for: model.graph)
        let graph = try TrainingGraph(model: model, inputs: shapes, batchNorm: .train)
        let index = model.graph.initializerIndex
        var parameters: [String: Tensor] = [:]
        for name in graph.parameterNames { parameters[name] = model.graph.initializers[index[name]!].tensor! }
        var sums: [Int: (mean: [Double], variance: [Double])] = [:]
        var used = 0
        var rng = SplitMix64(seed: 0)
        for (batch, range) in data.batches(size) where range.count == size && used < max(batches, 1) {
            let tape = try graph.forward(inputs: batch.feed(model.graph), parameters: parameters, training: true,
                                         batchNorm: .train, rng: &rng)
            for (node, stats) in tape.batchStatistics {
                var s = sums[node] ?? (Array(repeating: 0, count: stats.mean.count), Array(repeating: 0, count: stats.variance.count))
                for c in s.mean.indices { s.mean[c] += Double(stats.mean[c]) }
                for c in s.variance.indices { s.variance[c] += Double(stats.variance[c]) }
                sums[node] = s
            }
            used += 1
        }
        var out = model
        for (node, names) in graph.runningStatistics {
            guard let s = sums[node], let m = index[names.mean], let v = index[names.variance] else { continue }
            let n = Double(used)
            out.graph.initializers[m].setTensor(Tensor(shape: [s.mean.count], floats: s.mean.map { Float($0 / n) }))
            out.graph.initializers[v].setTensor(Tensor(shape: [s.variance.count], floats: s.variance.map { Float($0 / n) }))
        }
        return out
    }

    /// The candidate's score on `data`, against the base model's outputs on the same samples (`baseOutputs`, the
    /// first output for every sample in order).
    public static func score(_ candidate: Model, data: Dataset, baseOutputs: Tensor, task: TaskKind, batchSize: Int) throws -> CandidateScore {
        let session = try InferenceSession(model: candidate)
        var score = CandidateScore(task: task)
        let perSample = baseOutputs.count / max(data.count, 1)
        for (batch, range) in data.batches(max(batchSize, 1)) {
            let z = try session.firstOutput(batch)
            let base = Tensor(shape: [range.count] + Array(baseOutputs.shape.dropFirst()),
                              floats: Array(baseOutputs.floats[(range.lowerBound * perSample)..<(range.upperBound * perSample)]))
            guard z.shape == base.shape else {
                throw CompressionError(.invalidArgument, "the candidate's output has shape \(z.shape); the base model's \(base.shape)")
            }
            let labels = data.labels(range)
            try score.evaluation.add(base: base, compressed: z, labels: labels)
            score.samples += range.count
            switch task {
            case .classification:
                if let labels {
                    var metrics = ClassificationMetrics()
                    try metrics.add(logits: z, labels: labels)
                    score.lossSum += metrics.crossEntropySum
                } else {
                    score.lossSum += LocalCompression.klDivergence(base, z) * Double(range.count)
                }
            default:
                let rows = range.count, width = z.count / max(rows, 1)
                let a = z.asFloats, b = base.asFloats
                for r in 0..<rows {
                    var error = 0.0, energy = 0.0
                    for k in (r * width)..<((r + 1) * width) {
                        error += Double(a[k] - b[k]) * Double(a[k] - b[k])
                        energy += Double(b[k]) * Double(b[k])
                    }
                    score.lossSum += error / max(energy, 1e-12)
                }
            }
        }
        return score
    }
}

/// A search on one machine, the code path a round's search phase runs per worker: candidates built from the base
/// model by keeping each group's most important channels, scored after adaptive batch norm.
public struct LocalSearch {
    public let base: Model
    public let groups: ChannelGroups
    public let space: SearchSpace
    public let costs: CostModel
    public let scores: [Int: [Double]]
    public let task: TaskKind
    public var batchSize = 64
    public var adaptationBatches = CandidateEvaluation.defaultAdaptationBatches
    /// Predict each candidate's latency, one per kind of board (for latency budgets and the latency front); a
    /// candidate's latency is the largest of their predictions, since it must meet the budget on every kind. Empty:
    /// no latency.
    public var latencies: [LatencyModel] = []

    /// `criterion` ranks each group's channels (L1 by default, as EagleEye and AMC inherit weights).
    public init(base: Model, criterion: ImportanceCriterion = .l1, statistics: ImportanceStatistics? = nil,
                minimumFraction: Double = SearchSpace.defaultMinimumFraction, steps: Int = SearchSpace.defaultSteps,
                roundTo: Int = 1, minimumChannels: Int = 1, skipBlocks: Bool = false, task: TaskKind? = nil) throws {
        self.base = base
        groups = try ChannelGroups(model: base)
        space = try SearchSpace(groups: groups, minimumFraction: minimumFraction, steps: steps, roundTo: roundTo,
                                minimumChannels: minimumChannels, skipBlocks: skipBlocks)
        if skipBlocks, !space.dimensions.contains(where: \.skippable) {
            throw CompressionError(.invalidArgument, "--skip-blocks: the model has no residual block whose branch can be skipped (a branch of one prunable group, ending in an Add whose other input does not depend on it)")
        }
        costs = try CostModel(model: base, groups: groups, space: space)
        scores = try Pruning.scores(groups, model: base, criterion: criterion, statistics: statistics)
        self.task = task ?? TaskKind.inferred(model: base)
    }

    /// The pruned model of an architecture (weights inherited, batch norm as in the base model).
    public func model(_ a: Architecture) throws -> Model {
        try Pruning.prune(base, groups: groups, kept: try space.kept(a, groups: groups, scores: scores))
    }

    /// The architecture's cost: from the cost model when it is exact, else measured on the pruned model; with the
    /// latency predicted when there is a latency model.
    public func cost(_ a: Architecture) throws -> ArchitectureCost {
        var c = costs.exact ? costs.cost(a) : try CostModel.measured(try model(a))
        c.latencyMs = latencies.isEmpty ? nil : latencies.map { $0.predict(a) }.max()
        return c
    }

    /// The architecture's score on `data` (adaptive batch norm on `data`, then loss and metrics on it).
    public func score(_ a: Architecture, data: Dataset, baseOutputs: Tensor) throws -> CandidateScore {
        let adapted = try CandidateEvaluation.adaptBatchNorm(try model(a), data: data, batchSize: batchSize, batches: adaptationBatches)
        return try CandidateEvaluation.score(adapted, data: data, baseOutputs: baseOutputs, task: task, batchSize: batchSize)
    }

    /// The base model's first output for every sample of `data`.
    public func baseOutputs(_ data: Dataset) throws -> Tensor {
        var local = LocalCompression()
        local.batchSize = batchSize
        return try local.logits(try InferenceSession(model: base), data)
    }

    /// Searches under `budget` with `strategy`, scoring on `data`. Every candidate's figures are kept for the report.
    public func run(budget: SearchBudget, strategy: EvolutionarySearch, data: Dataset,
                    progress: ((Int, Int) -> Void)? = nil) throws -> (candidates: [SearchCandidate], scores: [Architecture: CandidateScore]) {
        let reference = try baseOutputs(data)
        var scored: [Architecture: CandidateScore] = [:]
        var done = 0
        var costCache: [Architecture: ArchitectureCost] = [:]
        let candidates = try strategy.run(space: space, cost: { a in
            if let c = costCache[a] { return c }
            let c = try cost(a)
            costCache[a] = c
            return c
        }, budget: budget) { batch in
            try batch.map { a in
                let s = try score(a, data: data, baseOutputs: reference)
                scored[a] = s
                done += 1
                progress?(done, strategy.evaluations)
                return -s.meanLoss
            }
        }
        return (candidates, scored)
    }
}
