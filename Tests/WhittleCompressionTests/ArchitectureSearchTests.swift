import Foundation
import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// The search space, the cost model (checked against surgery), adaptive batch norm (hand-computed) and the
/// evolutionary search (a fitness whose optimum is known).
@Suite struct ArchitectureSearchTests {
    /// Tolerance for batch-norm statistics recomputed in Float from hand values.
    static let statisticsTolerance: Float = 1e-5

    @Test func laddersAreMultiplesOfRoundToFromTheSmallestWidth() throws {
        let model = Graphs.concat()  // convA 4 channels, convB 6, conv C 5 (the output-side groups)
        let groups = try ChannelGroups(model: model)
        let space = try SearchSpace(groups: groups, minimumFraction: 0.25, steps: 4, roundTo: 2)
        let byName = Dictionary(uniqueKeysWithValues: space.dimensions.map { ($0.name, $0) })
        #expect(byName["convA"]?.widths == [2, 4])  // ⌈4·¼⌉ = 1 → 2; quarters of 4 rounded to 2s
        #expect(byName["convB"]?.widths == [2, 4, 6])  // ⌈6·¼⌉ = 2; 6·¾ = 4.5 → 5 → 6
        #expect(space.widths(space.full).values.sorted() == groups.prunable.filter { g in space.dimensions.contains { $0.group == g.id } }
            .map(\.channels).sorted())
        #expect(throws: CompressionError.self) { try SearchSpace(groups: groups, minimumFraction: 0) }
        #expect(throws: CompressionError.self) { try SearchSpace(groups: groups, roundTo: 0) }
    }

    /// The cost model's MACs, parameters and bytes equal `ModelSummary` of the model pruned by surgery, for random
    /// architectures of CNNs with residual additions, depthwise convolutions and concatenations.
    @Test(arguments: ["resnet_bn_op13.onnx", "mobilenetv2_bn_op13.onnx", "smallcnn_dynamo.onnx"])
    func costsEqualThePrunedModelsSummary(_ file: String) throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes(file))
        let groups = try ChannelGroups(model: model)
        let space = try SearchSpace(groups: groups, roundTo: 2)
        let costs = try CostModel(model: model, groups: groups, space: space)
        #expect(costs.exact)
        let scores = try Pruning.scores(groups, model: model, criterion: .l1)
        #expect(costs.cost(space.full) == (try CostModel.measured(model)))
        var rng = SplitMix64(seed: 7)
        for _ in 0..<4 {
            let a = Architecture(levels: space.dimensions.map { Int(rng.next() % UInt64($0.widths.count)) })
            let pruned = try Pruning.prune(model, groups: groups, kept: try space.kept(a, groups: groups, scores: scores))
            #expect(costs.cost(a) == (try CostModel.measured(pruned)), "\(file): \(space.describe(a))")
        }
    }

    /// A search whose generations are scored elsewhere (a round's phases) replays from the stored fitness: each
    /// generation is the one `run` asked for, a widths description maps back to its architecture, and a generation
    /// past the end of the search is empty.
    @Test func generationsReplayFromStoredFitness() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        let groups = try ChannelGroups(model: model)
        let space = try SearchSpace(groups: groups, roundTo: 2)
        let costs = try CostModel(model: model, groups: groups, space: space)
        var strategy = EvolutionarySearch()
        strategy.evaluations = 20
        strategy.population = 8
        strategy.parents = 2
        strategy.seed = 4
        let budget = SearchBudget(macs: costs.cost(space.full).macs / 3)
        func fitness(_ a: Architecture) -> Double { -Double(a.levels.enumerated().reduce(0) { $0 + ($1.offset % 3 + 1) * $1.element }) }
        var asked: [[Architecture]] = []
        _ = try strategy.run(space: space, cost: costs.cost, budget: budget) { batch in
            asked.append(batch)
            return batch.map(fitness)
        }
        #expect(asked.count == strategy.generations)
        for g in asked.indices {
            let known = asked[..<g].map { $0.map(fitness) }
            #expect(try strategy.generation(g, space: space, cost: costs.cost, budget: budget, known: Array(known)) == asked[g])
            for a in asked[g] { #expect(try space.architecture(widths: space.describe(a)) == a) }
        }
        #expect(try strategy.generation(asked.count, space: space, cost: costs.cost, budget: budget, known: asked.map { $0.map(fitness) }).isEmpty)
        // Stored fitness that does not fit the generation is refused.
        #expect(throws: CompressionError.self) {
            try strategy.generation(1, space: space, cost: costs.cost, budget: budget, known: [[0.5]])
        }
        #expect(throws: CompressionError.self) { try space.architecture(widths: ["nonsense": 3]) }
        var off = space.describe(space.full)
        off[space.dimensions[0].name] = space.dimensions[0].channels + 1
        #expect(throws: CompressionError.self) { try space.architecture(widths: off) }
    }

    /// BatchNormalization straight on the input: after adaptation its running statistics are the per-channel mean
    /// of the batch means and of the unbiased batch variances, computed here by hand.
    @Test func adaptiveBatchNormTakesTheBatchStatistics() throws {
        let bn = Node(opType: "BatchNormalization", name: "bn", inputs: ["x", "s", "b", "m", "v"], outputs: ["y"])
        let graph = Graph(
            name: "bn", nodes: [bn],
            inputs: [ValueInfo(name: "x", elementType: .float, shape: [.symbol("N"), .value(2), .value(1), .value(2)])],
            outputs: [ValueInfo(name: "y", elementType: .float, shape: [.symbol("N"), .value(2), .value(1), .value(2)])],
            initializers: [Initializer(name: "s", tensor: Tensor(shape: [2], floats: [1, 1])),
                           Initializer(name: "b", tensor: Tensor(shape: [2], floats: [0, 0])),
                           Initializer(name: "m", tensor: Tensor(shape: [2], floats: [9, 9])),
                           Initializer(name: "v", tensor: Tensor(shape: [2], floats: [9, 9]))])
        let model = Model(graph: graph, opset: 13, irVersion: 7)
        // Four samples [channel 0: two values, channel 1: two values].
        let x: [Float] = [1, 3, 10, 10,   // sample 0
                          5, 7, 20, 20,   // sample 1
                          0, 0, 1, 3,     // sample 2
                          2, 2, 5, 7]     // sample 3
        let data = try Dataset(x: Tensor(shape: [4, 2, 1, 2], floats: x), labels: nil)
        // Batch 1 (samples 0, 1): channel 0 values 1, 3, 5, 7 → mean 4, unbiased variance 20/3; channel 1 10, 10, 20,
        // 20 → mean 15, variance 100/3. Batch 2 (samples 2, 3): channel 0 0, 0, 2, 2 → 1, 4/3; channel 1 1, 3, 5, 7
        // → 4, 20/3.
        let adapted = try CandidateEvaluation.adaptBatchNorm(model, data: data, batchSize: 2, batches: 2)
        let mean = adapted.graph.initializer(named: "m")!.tensor!.floats
        let variance = adapted.graph.initializer(named: "v")!.tensor!.floats
        let expectedMean: [Float] = [(4 + 1) / 2, (15 + 4) / 2]
        let expectedVariance: [Float] = [(20.0 / 3 + 4.0 / 3) / 2, (100.0 / 3 + 20.0 / 3) / 2]
        for c in 0..<2 {
            #expect(abs(mean[c] - expectedMean[c]) <= Self.statisticsTolerance * max(1, abs(expectedMean[c])), "mean \(mean)")
            #expect(abs(variance[c] - expectedVariance[c]) <= Self.statisticsTolerance * max(1, abs(expectedVariance[c])), "variance \(variance)")
        }
        // One batch only: batch 1's statistics.
        let one = try CandidateEvaluation.adaptBatchNorm(model, data: data, batchSize: 2, batches: 1)
        #expect(abs(one.graph.initializer(named: "m")!.tensor!.floats[1] - 15) <= Self.statisticsTolerance * 15)
        #expect(throws: CompressionError.self) {
            try CandidateEvaluation.adaptBatchNorm(model, data: try Dataset(x: Tensor(shape: [1, 2, 1, 2], floats: [1, 2, 3, 4]), labels: nil), batchSize: 1)
        }
    }

    static func space() throws -> (SearchSpace, CostModel) {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        let groups = try ChannelGroups(model: model)
        let space = try SearchSpace(groups: groups)
        return (space, try CostModel(model: model, groups: groups, space: space))
    }

    /// A fitness whose best architecture under the budget is known (a preferred width per group, any excess costs
    /// less than a shortfall): the search gets closer to it than the uniform architecture, keeps within the budget,
    /// and repeats itself for a seed.
    @Test func theSearchBeatsUniformWidthsWithinTheBudgetAndRepeatsForASeed() throws {
        let (space, costs) = try Self.space()
        let full = costs.cost(space.full)
        let budget = SearchBudget(macs: full.macs / 3)
        // Groups with an even index matter: they want full width; the others do not matter at all.
        func fitness(_ a: Architecture) -> Double {
            zip(space.dimensions.indices, a.levels).reduce(0.0) { sum, pair in
                let (d, level) = pair
                let fraction = Double(space.dimensions[d].widths[level]) / Double(space.dimensions[d].channels)
                return sum + (d % 2 == 0 ? fraction : 0)
            }
        }
        var search = EvolutionarySearch()
        search.evaluations = 96
        search.seed = 3
        let run = { try search.run(space: space, cost: costs.cost, budget: budget) { $0.map(fitness) } }
        let candidates = try run()
        #expect(candidates.count <= search.evaluations && candidates.count >= search.population)
        #expect(candidates.allSatisfy { budget.admits($0.cost) })
        #expect(Set(candidates.map(\.architecture)).count == candidates.count, "no architecture is evaluated twice")
        let uniform = candidates[0]  // the first proposal: uniform widths filling the budget
        let best = candidates.max { $0.fitness < $1.fitness }!
        #expect(best.fitness > uniform.fitness * 1.1, "best \(best.fitness), uniform \(uniform.fitness)")
        #expect(try run() == candidates, "the same seed gives the same search")
        // The first candidate is the uniform architecture, widened where the budget still allows it.
        let flat = EvolutionarySearch.uniform(space: space, cost: costs.cost, budget: budget)
        #expect(zip(uniform.architecture.levels, flat.levels).allSatisfy { $0 >= $1 })
        search.seed = 4
        #expect(try search.run(space: space, cost: costs.cost, budget: budget) { $0.map(fitness) } != candidates)

        // A spread of 1 leaves every group at the uniform share: the uniform architecture is the only candidate.
        var tight = search
        tight.spread = 1
        #expect(try tight.run(space: space, cost: costs.cost, budget: budget) { $0.map(fitness) }.map(\.architecture) == [flat])
        tight.spread = 0.5
        #expect(throws: CompressionError.self) { try tight.run(space: space, cost: costs.cost, budget: budget) { $0.map(fitness) } }

        // The front: ascending MACs, each fitter than every cheaper one.
        let front = EvolutionarySearch.front(candidates)
        #expect(zip(front, front.dropFirst()).allSatisfy { $0.cost.macs <= $1.cost.macs && $0.fitness < $1.fitness })
        #expect(front.last?.fitness == best.fitness)
    }

    @Test func anInfeasibleBudgetIsRefusedWithTheSmallestFigure() throws {
        let (space, costs) = try Self.space()
        let smallest = costs.cost(space.narrowest)
        #expect {
            try EvolutionarySearch().run(space: space, cost: costs.cost, budget: SearchBudget(macs: smallest.macs - 1)) { $0.map { _ in 0 } }
        } throws: { error in
            (error as? CompressionError)?.code == .invalidArgument && "\(error)".contains("\(smallest.macs) MACs")
        }
        #expect {
            try EvolutionarySearch().run(space: space, cost: costs.cost, budget: SearchBudget(parameterBytes: smallest.parameterBytes - 1)) { $0.map { _ in 0 } }
        } throws: { error in "\(error)".contains("\(smallest.parameterBytes) bytes") }
        #expect(throws: CompressionError.self) { try EvolutionarySearch().run(space: space, cost: costs.cost, budget: SearchBudget()) { $0.map { _ in 0 } } }
    }

    /// The whole local path on a real CNN: candidates scored after adaptive batch norm, the base model scoring best
    /// against itself, every candidate's model within the budget.
    @Test func aLocalSearchScoresPrunedCandidates() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        let x = try TestSupport.npy("resnet_bn_op13.input.npy")
        let n = x.shape[0]
        // The fixture's batch repeated with small perturbations: enough samples for two adaptation batches.
        let noise = TestSupport.randomFloats(x.count * 4, seed: 11)
        let samples = Tensor(shape: [n * 4] + Array(x.shape.dropFirst()),
                             floats: (0..<(x.count * 4)).map { x.floats[$0 % x.count] + 0.05 * noise[$0] })
        let data = try Dataset(x: samples, labels: nil)
        var search = try LocalSearch(base: model, roundTo: 2)
        search.batchSize = max(2, n * 2)
        let reference = try search.baseOutputs(data)
        // The base model scored as it is agrees with itself exactly; re-estimating its batch norm on other data moves it.
        let exact = try CandidateEvaluation.score(model, data: data, baseOutputs: reference, task: search.task, batchSize: search.batchSize)
        #expect(exact.samples == data.count && exact.evaluation.agreementRate == 1 && exact.lossSum == 0, "\(exact)")
        let adapted = try search.score(search.space.full, data: data, baseOutputs: reference)
        #expect(adapted.meanLoss > 0)
        var strategy = EvolutionarySearch()
        strategy.evaluations = 6
        strategy.population = 3
        strategy.parents = 2
        let budget = SearchBudget(macs: search.costs.cost(search.space.full).macs / 2)
        let (candidates, scores) = try search.run(budget: budget, strategy: strategy, data: data)
        #expect(!candidates.isEmpty && candidates.count <= 6)
        for c in candidates {
            #expect(budget.admits(c.cost))
            #expect(scores[c.architecture]!.meanLoss > 0)
            #expect(c.fitness == -scores[c.architecture]!.meanLoss)
        }
        let best = candidates.max { $0.fitness < $1.fitness }!
        #expect(try CostModel.measured(try search.model(best.architecture)) == best.cost)
    }
}
