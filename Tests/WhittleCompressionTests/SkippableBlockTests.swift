import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// Skippable residual blocks (`--skip-blocks`): the branches found in a ResNet, a block skipped by surgery computes
/// what the masked model computes and costs what the cost model says, and the search explores skips.
@Suite struct SkippableBlockTests {
    static func resnet() throws -> Model { try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx")) }

    /// The fixture's five BasicBlocks (layer1.0 … layer3.0) each have one branch, named by the group of its first
    /// convolution's outputs; the groups of the residual streams and the stem have none.
    @Test func eachBasicBlockHasABranchOfItsInnerGroup() throws {
        let model = try Self.resnet()
        let groups = try ChannelGroups(model: model)
        let names = groups.branches.keys.map { id in groups.groups[id].name }.sorted()
        #expect(names == ["/layer1/layer1.0/conv1/Conv", "/layer1/layer1.1/conv1/Conv", "/layer2/layer2.0/conv1/Conv",
                          "/layer2/layer2.1/conv1/Conv", "/layer3/layer3.0/conv1/Conv"])
        let nodeOutput = Dictionary(uniqueKeysWithValues: model.graph.nodes.map { ($0.outputs[0], $0) })
        for (_, branch) in groups.branches {
            // conv1, bn1, relu, conv2, bn2: the shortcut (identity or projection) is not part of it.
            #expect(branch.nodes.map { nodeOutput[$0]!.opType } == ["Conv", "BatchNormalization", "Relu", "Conv", "BatchNormalization"])
            #expect(nodeOutput[branch.add]?.opType == "Add")
            #expect(!branch.nodes.contains { nodeOutput[$0]!.name.contains("shortcut") })
        }
        // A plain CNN has no residual branch; asking it for skippable blocks is refused with the reason.
        let plain = try ModelCoding.read(try TestSupport.fixtureBytes("smallcnn_dynamo.onnx"))
        #expect(try ChannelGroups(model: plain).branches.isEmpty)
        #expect(throws: CompressionError.self) { try LocalSearch(base: plain, skipBlocks: true) }
    }

    /// Removing a branch group whole: the pruned model reads the shortcut (fewer nodes, no Add for that block), its
    /// outputs equal the masked model's (the branch's biases, shifts and means zeroed), also with two consecutive
    /// blocks skipped and with a projection shortcut; a group outside any branch cannot keep 0 channels.
    @Test func aSkippedBlockComputesTheMaskedModel() throws {
        let model = try Self.resnet()
        let x = try TestSupport.npy("resnet_bn_op13.input.npy")
        let groups = try ChannelGroups(model: model)
        let byName = Dictionary(uniqueKeysWithValues: groups.groups.map { ($0.name, $0) })
        let full = Dictionary(uniqueKeysWithValues: groups.prunable.map { ($0.id, Array(0..<$0.channels)) })
        let base = try InferenceSession(model: model).run(x)
        for skipped in [["/layer1/layer1.0/conv1/Conv"], ["/layer1/layer1.0/conv1/Conv", "/layer1/layer1.1/conv1/Conv"],
                        ["/layer2/layer2.0/conv1/Conv", "/layer3/layer3.0/conv1/Conv"]] {
            var kept = full
            for name in skipped { kept[byName[name]!.id] = [] }
            let pruned = try Pruning.prune(model, groups: groups, kept: kept)
            let masked = try Pruning.mask(model, groups: groups, kept: kept)
            let a = try InferenceSession(model: masked).run(x), b = try InferenceSession(model: pruned).run(x)
            #expect(a.shape == b.shape)
            #expect(TestSupport.relativeError(b.floats, a.floats) < surgeryTolerance, "\(skipped)")
            // Skipping changes what the model computes (the test is not vacuous).
            #expect(TestSupport.relativeError(b.floats, base.floats) > 100 * surgeryTolerance)
            #expect(pruned.graph.nodes.count == model.graph.nodes.count - 6 * skipped.count)
            #expect(pruned.graph.nodes.filter { $0.opType == "Add" }.count == 5 - skipped.count)
            let gone = Set(skipped.flatMap { groups.branches[byName[$0]!.id]!.nodes + [groups.branches[byName[$0]!.id]!.add] })
            #expect(gone.count == 6 * skipped.count)
            #expect(!pruned.graph.nodes.contains { gone.contains($0.outputs[0]) })
        }
        var wrong = full
        let stream = try #require(groups.prunable.first { groups.branches[$0.id] == nil })
        wrong[stream.id] = []
        #expect(throws: CompressionError.self) { try Pruning.prune(model, groups: groups, kept: wrong) }
    }

    /// With `skipBlocks`, the branch groups' ladders start at 0 and the cost model still equals `ModelSummary` of the
    /// model pruned by surgery (the skipped branch's every parameter and MAC gone), for random architectures that
    /// skip blocks; without it no ladder has 0.
    @Test func costsOfSkippedBlocksEqualThePrunedModelsSummary() throws {
        let model = try Self.resnet()
        let groups = try ChannelGroups(model: model)
        #expect(try SearchSpace(groups: groups).dimensions.allSatisfy { !$0.skippable })
        let space = try SearchSpace(groups: groups, roundTo: 2, skipBlocks: true)
        #expect(space.dimensions.filter(\.skippable).count == 5)
        let costs = try CostModel(model: model, groups: groups, space: space)
        #expect(costs.exact)
        let scores = try Pruning.scores(groups, model: model, criterion: .l1)
        var rng = SplitMix64(seed: 3)
        var skips = 0
        for _ in 0..<6 {
            let a = Architecture(levels: space.dimensions.map { d in
                d.skippable && rng.next() % 2 == 0 ? 0 : d.narrowestKept + Int(rng.next() % UInt64(d.widths.count - d.narrowestKept))
            })
            skips += space.skipped(a).count
            let pruned = try Pruning.prune(model, groups: groups, kept: try space.kept(a, groups: groups, scores: scores))
            #expect(costs.cost(a) == (try CostModel.measured(pruned)), "\(space.describe(a))")
        }
        #expect(skips > 0)
        #expect(costs.cost(space.narrowest).macs < costs.cost(Architecture(levels: space.dimensions.map(\.narrowestKept))).macs)
    }

    /// A fitness that rewards skipping the two layer1 blocks and keeping the rest wide: the search finds architectures
    /// that skip them, every candidate within the budget, and the uniform reference skips nothing.
    @Test func theSearchExploresSkippedBlocks() throws {
        let model = try Self.resnet()
        let groups = try ChannelGroups(model: model)
        let space = try SearchSpace(groups: groups, skipBlocks: true)
        let costs = try CostModel(model: model, groups: groups, space: space)
        let budget = SearchBudget(macs: costs.cost(space.full).macs / 2)
        let wanted = Set(["/layer1/layer1.0/conv1/Conv", "/layer1/layer1.1/conv1/Conv"])
        func fitness(_ a: Architecture) -> Double {
            zip(space.dimensions, a.levels).reduce(0.0) { sum, pair in
                let (d, level) = pair
                if wanted.contains(d.name) { return sum + (level == 0 ? 10 : 0) }
                return sum + Double(d.widths[level]) / Double(d.channels)
            }
        }
        var strategy = EvolutionarySearch()
        strategy.evaluations = 160
        strategy.seed = 1
        let found = try strategy.run(space: space, cost: costs.cost, budget: budget) { $0.map(fitness) }
        #expect(found.allSatisfy { budget.admits($0.cost) })
        #expect(space.skipped(found[0].architecture).isEmpty)
        let best = found.max { $0.fitness < $1.fitness }!
        #expect(Set(space.skipped(best.architecture)) == wanted, "\(space.describe(best.architecture))")
        #expect(found.contains { !space.skipped($0.architecture).isEmpty && Set(space.skipped($0.architecture)) != wanted })
    }

    /// A model with skipped blocks goes the rest of the way: fine-tuning (the training graph without those blocks),
    /// calibration and QDQ export, and the exported model runs.
    @Test func aModelWithSkippedBlocksFineTunesAndQuantizes() throws {
        let model = try Self.resnet()
        let groups = try ChannelGroups(model: model)
        var kept = Dictionary(uniqueKeysWithValues: groups.prunable.map { ($0.id, Array(0..<$0.channels)) })
        for id in groups.branches.keys.sorted().prefix(2) { kept[id] = [] }
        let pruned = try Pruning.prune(model, groups: groups, kept: kept)
        let (_, data) = try QDQExportTests.demo()
        var job = LocalCompression()
        job.quantization = QuantizationPolicy(mode: .int8)
        job.finetuneEpochs = 1
        job.batchSize = 16
        let (out, report) = try job.run(model: pruned, modelName: "skipped", outputName: "out", calibration: data,
                                        evaluation: nil, training: data)
        #expect(report.after.bytes < report.before.bytes / 3)
        #expect(out.graph.nodes.contains { $0.opType == "QuantizeLinear" })
        #expect(out.graph.nodes.filter { $0.opType == "Add" }.count == 3)
        let y = try InferenceSession(model: out).run(data.x)
        #expect(y.shape == [data.count, 10])
        #expect(y.floats.allSatisfy { $0.isFinite })
    }
}
