import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// The pruned model must compute what the masked model computes; only the summation order of the smaller
/// convolutions differs.
let surgeryTolerance: Float = 1e-4
/// Double sums added in another order (per batch, then merged) agree to a few ulps.
let doubleSumTolerance = 1e-12

@Suite struct PruningTests {
    static func input(_ model: Model, batch: Int = 2, seed: UInt64 = 11) throws -> Tensor {
        let shape = try ShapeInference.inputShapes(model, batchSize: batch)[model.graph.runtimeInputs[0].name]!.1
        return Tensor(shape: shape, floats: TestSupport.randomFloats(shape.reduce(1, *), seed: seed))
    }

    /// Prunes with the given options and checks that the pruned model's outputs equal the masked model's, that it
    /// really is smaller, and that every kept count follows the options.
    func checkSurgery(_ model: Model, _ options: PruningOptions, input x: Tensor) throws -> (Model, ChannelGroups, [Int: [Int]]) {
        let groups = try ChannelGroups(model: model)
        let scores = try Pruning.scores(groups, model: model, criterion: options.criterion)
        let kept = try Pruning.select(groups, scores: scores, options: options)
        let masked = try Pruning.mask(model, groups: groups, kept: kept)
        let pruned = try Pruning.prune(model, groups: groups, kept: kept)
        let a = try InferenceSession(model: masked).run(x), b = try InferenceSession(model: pruned).run(x)
        #expect(a.shape == b.shape)
        #expect(TestSupport.relativeError(b.floats, a.floats) < surgeryTolerance)
        let before = try ModelSummary(model: model), after = try ModelSummary(model: pruned)
        #expect(after.parameters < before.parameters)
        #expect(after.macs < before.macs)
        for g in groups.prunable {
            let k = kept[g.id]!.count
            #expect(k >= 1 && k <= g.channels)
            if options.roundTo > 1 && k < g.channels { #expect(k % options.roundTo == 0) }
            if g.unit > 1 { #expect(k % g.unit == 0) }
            #expect(Double(g.channels - k) <= Double(g.channels) * options.maxLayerRatio + Double(options.roundTo))
        }
        return (pruned, groups, kept)
    }

    @Test(arguments: ["resnet_bn_op13.onnx", "resnet_folded_op17.onnx", "mobilenetv2_bn_op13.onnx", "mobilenetv2_folded_op17.onnx"])
    func prunedFixtureEqualsMaskedFixture(_ file: String) throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes(file))
        let x = try TestSupport.npy(file.replacingOccurrences(of: ".onnx", with: ".input.npy"))
        var local = PruningOptions(ratio: 0.3)
        local.criterion = .l2
        _ = try checkSurgery(model, local, input: x)
        var global = PruningOptions(ratio: 0.4)
        global.scope = .global
        global.roundTo = 4
        _ = try checkSurgery(model, global, input: x)
    }

    /// Two steps of a schedule compose: the second selects among the channels the first kept, against the original
    /// counts, so the final kept indices (in original numbering) are a subset of the first step's; each step records
    /// its channels before and after; the decisions name the original counts. A schedule taken up again from its
    /// parts (a round's durable progress) continues identically.
    @Test func scheduleStepsCompose() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        var options = PruningOptions(ratio: 0)
        options.criterion = .l2
        let groups = try ChannelGroups(model: model)
        var schedule = PruningSchedule(groups: groups, options: options, steps: [0.25, 0.5], finetuneEpochs: 0, distill: false)
        let first = try schedule.apply(try schedule.select(model, groups: groups, ratio: 0.25, statistics: nil), to: model,
                                       groups: groups, ratio: 0.25)
        let afterFirst = schedule.originalIndex
        var resumed = PruningSchedule(originalChannels: schedule.originalChannels, originalIndex: schedule.originalIndex,
                                      section: schedule.section)
        let groups2 = try ChannelGroups(model: first)
        let second = try schedule.apply(try schedule.select(first, groups: groups2, ratio: 0.5, statistics: nil), to: first,
                                        groups: groups2, ratio: 0.5)
        let again = try resumed.apply(try resumed.select(first, groups: groups2, ratio: 0.5, statistics: nil), to: first,
                                      groups: groups2, ratio: 0.5)
        #expect(try ModelCoding.write(again) == (try ModelCoding.write(second)))
        try schedule.decide(second)
        #expect(schedule.section.steps.count == 2)
        #expect(schedule.section.steps[1].channelsBefore == schedule.section.steps[0].channelsKept)
        #expect(schedule.section.steps[1].channelsKept < schedule.section.steps[0].channelsKept)
        for decision in schedule.section.groups {
            let original = try #require(groups.prunable.first { $0.name == decision.group })
            #expect(decision.channels == original.channels)
            #expect(decision.keptIndices.count == decision.kept)
            #expect(Set(decision.keptIndices).isSubset(of: Set(afterFirst[decision.group] ?? [])))
            #expect(decision.keptIndices == decision.keptIndices.sorted() && decision.keptIndices.allSatisfy { $0 < original.channels })
            // Half of the original channels go (within the rounding bounds), not half of the remaining ones.
            #expect(decision.kept <= original.channels - original.channels / 2 + 1)
        }
    }

    @Test func residualAddsShareOneGroup() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        let groups = try ChannelGroups(model: model)
        let adds = model.graph.nodes.filter { $0.opType == "Add" }
        #expect(!adds.isEmpty)
        // Every Add's summands live in one group: the group holding the first summand's producer holds the other's.
        for group in groups.groups where group.producers.count > 1 {
            let residual = group.members.filter { $0.role == .outputWeights }.map(\.node)
            #expect(Set(residual).count == residual.count)
        }
        let stem = groups.groups.first { $0.producers.contains(model.graph.nodes.first { $0.opType == "Conv" }!.name) }!
        #expect(stem.producers.count >= 2, "the stem's channels reach the residual Adds: \(stem.producers)")
        #expect(stem.prunable)
    }

    @Test func depthwiseConvolutionsPassChannelsThrough() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("mobilenetv2_bn_op13.onnx"))
        let groups = try ChannelGroups(model: model)
        #expect(!groups.depthwiseNodes.isEmpty)
        for node in model.graph.nodes where groups.depthwiseNodes.contains(node.name) {
            let group = groups.groups.first { g in g.members.contains { $0.node == node.name && $0.role == .depthwiseWeights } }
            #expect(group != nil, "\(node.name) belongs to the group of the conv before it")
            #expect(group!.members.contains { $0.role == .outputWeights }, "the group also holds its producer")
        }
    }

    @Test func concatMapsChannelsByOffset() throws {
        let model = Graphs.concat()
        let groups = try ChannelGroups(model: model)
        let a = groups.groups.first { $0.producers.first == "convA" }!, b = groups.groups.first { $0.producers.first == "convB" }!
        #expect(a.channels == 4 && b.channels == 6)
        #expect(a.members.contains { $0.node == "convC" && $0.role == .inputWeights && $0.offset == 0 })
        #expect(b.members.contains { $0.node == "convC" && $0.role == .inputWeights && $0.offset == 4 })
        #expect(b.members.contains { $0.node == "dw" && $0.role == .depthwiseWeights && $0.offset == 4 })
        let c = groups.groups.first { $0.producers.first == "convC" }!
        #expect(c.members.contains { $0.node == "fc" && $0.role == .inputWeights && $0.axis == 1 })
        #expect(groups.groups.first { $0.producers.first == "fc" }?.prunable == false)

        // Keep channels 1 and 3 of A and 0, 2, 5 of B: convC keeps input columns 1, 3, 4, 6, 9.
        let kept = [a.id: [1, 3], b.id: [0, 2, 5], c.id: [0, 1, 2, 3, 4]]
        let pruned = try Pruning.prune(model, groups: groups, kept: kept)
        let wC = pruned.graph.initializer(named: "wC")!.tensor!, original = model.graph.initializer(named: "wC")!.tensor!
        #expect(wC.shape == [5, 5, 1, 1])
        for row in 0..<5 {
            #expect(Array(wC.floats[(row * 5)..<(row * 5 + 5)]) == [1, 3, 4, 6, 9].map { original.floats[row * 10 + $0] })
        }
        let dw = pruned.graph.nodes.first { $0.name == "dw" }!
        #expect(dw.attribute("group")?.value.int == 5)
        let x = try Self.input(model)
        let masked = try Pruning.mask(model, groups: groups, kept: kept)
        #expect(TestSupport.relativeError(try InferenceSession(model: pruned).run(x).floats,
                                          try InferenceSession(model: masked).run(x).floats) < surgeryTolerance)
    }

    @Test func flattenIntoGemmSpreadsChannelsOverFeatures() throws {
        // conv (3→4) → Relu → Flatten of [N, 4, 2, 2] → Gemm reads 16 features, 4 per channel.
        let model = Graphs.model([
            Graphs.conv("conv", "x", "a", weight: "w"),
            Node(opType: "Relu", name: "relu", inputs: ["a"], outputs: ["r"]),
            Node(opType: "Flatten", name: "flat", inputs: ["r"], outputs: ["f"]),
            Node(opType: "Gemm", name: "fc", inputs: ["f", "wF"], outputs: ["logits"], attributes: [Attribute("transB", .int(1))]),
        ], [Graphs.weight("w", [4, 3, 1, 1], seed: 1), Graphs.weight("wF", [3, 16], seed: 2)], input: [3, 2, 2])
        let groups = try ChannelGroups(model: model)
        let g = groups.groups.first { $0.producers.first == "conv" }!
        #expect(g.members.contains { $0.node == "fc" && $0.factor == 4 })
        let pruned = try Pruning.prune(model, groups: groups, kept: [g.id: [0, 2]])
        #expect(pruned.graph.initializer(named: "wF")!.shape == [3, 8])
        let x = try Self.input(model)
        #expect(TestSupport.relativeError(try InferenceSession(model: pruned).run(x).floats,
            try InferenceSession(model: try Pruning.mask(model, groups: groups, kept: [g.id: [0, 2]])).run(x).floats) < surgeryTolerance)
    }

    @Test func patternsWhittleCannotMapAreFrozenNamingTheNode() throws {
        // Transpose moves the conv's channels to axis 2, where GlobalAveragePool pools over them: the group is kept
        // whole, and the reason names the node.
        let model = Graphs.model([
            Graphs.conv("conv", "x", "a", weight: "w"),
            Node(opType: "Transpose", name: "swap", inputs: ["a"], outputs: ["t"], attributes: [Attribute("perm", .ints([0, 2, 1, 3]))]),
            Node(opType: "GlobalAveragePool", name: "gap", inputs: ["t"], outputs: ["g"]),
            Node(opType: "Flatten", name: "flat", inputs: ["g"], outputs: ["f"]),
            Node(opType: "Gemm", name: "fc", inputs: ["f", "wF"], outputs: ["logits"], attributes: [Attribute("transB", .int(1))]),
        ], [Graphs.weight("w", [4, 3, 1, 1], seed: 1), Graphs.weight("wF", [3, 8], seed: 2)])
        let groups = try ChannelGroups(model: model)
        let g = groups.groups.first { $0.producers.first == "conv" }!
        #expect(!g.prunable)
        #expect(g.frozenReason?.contains("GlobalAveragePool node 'gap' pools over the channels' axis") == true, "\(g.frozenReason ?? "")")

        // Weights fed at run time: nothing can be pruned, and compress says why.
        var dynamic = Graphs.model([Graphs.conv("conv", "x", "a", weight: "w"),
                                    Node(opType: "GlobalAveragePool", name: "gap", inputs: ["a"], outputs: ["g"]),
                                    Node(opType: "Flatten", name: "flat", inputs: ["g"], outputs: ["logits"])], [])
        dynamic.graph.inputs.append(ValueInfo(name: "w", elementType: .float, shape: [.value(3), .value(3), .value(1), .value(1)]))
        let frozen = try ChannelGroups(model: dynamic)
        #expect(frozen.prunable.isEmpty)
        #expect(frozen.groups.contains { $0.frozenReason?.contains("Conv node 'conv'") == true })
    }

    @Test func localSelectionFollowsRatioRoundingAndBounds() throws {
        let model = Graphs.concat()
        let groups = try ChannelGroups(model: model)
        let scores = try Pruning.scores(groups, model: model, criterion: .l1)
        var options = PruningOptions(ratio: 0.5)
        var kept = try Pruning.select(groups, scores: scores, options: options)
        let byName = Dictionary(uniqueKeysWithValues: groups.prunable.map { ($0.name, $0.id) })
        // ⌊C·(1 − r)⌋ kept: 4 → 2, 6 → 3, 5 → 2.
        #expect(kept[byName["convA"]!]!.count == 2)
        #expect(kept[byName["convB"]!]!.count == 3)
        #expect(kept[byName["convC"]!]!.count == 2)
        // The kept channels are the highest-scoring ones.
        let sA = scores[byName["convA"]!]!
        let top = (0..<4).sorted { sA[$0] > sA[$1] }.prefix(2).sorted()
        #expect(kept[byName["convA"]!]! == Array(top))
        options.roundTo = 4
        kept = try Pruning.select(groups, scores: scores, options: options)
        #expect(kept[byName["convB"]!]!.count == 4, "3 rounds up to 4: never pruned harder than asked")
        #expect(kept[byName["convA"]!]!.count == 4, "2 rounds up to 4, all of convA")
        options = PruningOptions(ratio: 0.9)
        options.maxLayerRatio = 0.5
        options.minChannels = 3
        kept = try Pruning.select(groups, scores: scores, options: options)
        #expect(kept[byName["convA"]!]!.count == 3)
        #expect(kept[byName["convB"]!]!.count == 3)
        // Progressive: counted against the original sizes.
        options = PruningOptions(ratio: 0.5)
        kept = try Pruning.select(groups, scores: scores, options: options, originalChannels: ["convB": 12])
        #expect(kept[byName["convB"]!]!.count == 6)
    }

    @Test func globalSelectionPrunesTheLeastImportantChannelsAnywhere() throws {
        let model = Graphs.concat()
        let groups = try ChannelGroups(model: model)
        let ids = groups.prunable.map(\.id)
        // Hand-made scores: group 0's channels are all unimportant.
        var scores: [Int: [Double]] = [:]
        for g in groups.prunable { scores[g.id] = (0..<g.channels).map { Double($0 + 10 * (g.id == ids[0] ? 0 : 1)) } }
        var options = PruningOptions(ratio: 0.2)
        options.scope = .global
        options.maxLayerRatio = 0.75
        let kept = try Pruning.select(groups, scores: scores, options: options)
        let total = groups.prunable.reduce(0) { $0 + $1.channels }
        let removed = total - kept.values.reduce(0) { $0 + $1.count }
        #expect(removed == total - Int(Double(total) * 0.8))
        let first = groups.prunable[0]
        #expect(first.channels - kept[first.id]!.count == min(removed, Int(Double(first.channels) * 0.75)))
    }

    @Test func badOptionsAreRefused() throws {
        for ratio in [1.0, -0.1, .nan] {
            #expect(throws: CompressionError.self) { try PruningOptions(ratio: ratio).check() }
        }
        var options = PruningOptions(ratio: 0.5)
        options.roundTo = 0
        #expect(throws: CompressionError.self) { try options.check() }
    }

    /// Data-driven importance collected on two halves and merged equals the whole: activation sums exactly,
    /// Taylor gradient sums to rounding.
    @Test func importanceStatisticsMergeToTheWhole() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        let x = try TestSupport.npy("resnet_bn_op13.input.npy")
        let half = x.count / 2
        let first = Tensor(shape: [2, 3, 32, 32], floats: Array(x.floats[..<half]))
        let second = Tensor(shape: [2, 3, 32, 32], floats: Array(x.floats[half...]))
        let groups = try ChannelGroups(model: model)
        let labels: [Int64] = [1, 3, 5, 7]
        for criterion in [ImportanceCriterion.activation, .taylor] {
            let whole = try ImportanceCollector(model: model, groups: groups, criterion: criterion, batchSize: 2)
            try whole.collect(Samples(first), labels: labels[0..<2])
            try whole.collect(Samples(second), labels: labels[2..<4])
            let a = try ImportanceCollector(model: model, groups: groups, criterion: criterion, batchSize: 2)
            let b = try ImportanceCollector(model: model, groups: groups, criterion: criterion, batchSize: 2)
            try a.collect(Samples(first), labels: labels[0..<2])
            try b.collect(Samples(second), labels: labels[2..<4])
            let merged = try a.statistics.merged(with: b.statistics)
            #expect(merged.samples == 4)
            // Sums are Double: adding per-batch partial sums in another order moves the last bits.
            for (name, s) in whole.statistics.channels {
                let m = merged.channels[name]!
                #expect(m.zeroCounts == s.zeroCounts && m.valuesPerChannel == s.valuesPerChannel)
                for (x, y) in zip(m.absoluteSums + m.squaredSums, s.absoluteSums + s.squaredSums) {
                    #expect(abs(x - y) <= doubleSumTolerance * max(abs(y), 1), "\(name)")
                }
            }
            for (name, g) in whole.statistics.gradientSums {
                #expect(TestSupport.relativeError(merged.gradientSums[name]!.floats, g.floats) < 1e-5, "\(name)")
            }
            let s1 = try Pruning.scores(groups, model: model, criterion: criterion, statistics: merged)
            let s2 = try Pruning.scores(groups, model: model, criterion: criterion, statistics: whole.statistics)
            for (id, s) in s1 { #expect(TestSupport.relativeError(s.map(Float.init), s2[id]!.map(Float.init)) < 1e-4) }
        }
    }

    /// l1 importance by hand on the concat model: convA's channel k scores Σ|wA[k]| (its row), Σ|wD[k]| (the
    /// depthwise row) and Σ|wC[:, k]| (convC's column), averaged, then divided by the mean over channels.
    @Test func magnitudeImportanceByHand() throws {
        let model = Graphs.concat()
        let groups = try ChannelGroups(model: model)
        let a = groups.groups.first { $0.producers.first == "convA" }!
        let scores = try Pruning.scores(groups, model: model, criterion: .l1)[a.id]!
        let wA = model.graph.initializer(named: "wA")!.tensor!.floats, wD = model.graph.initializer(named: "wD")!.tensor!.floats
        let wC = model.graph.initializer(named: "wC")!.tensor!.floats
        var expected = (0..<4).map { k -> Double in
            let row = wA[(k * 27)..<((k + 1) * 27)].reduce(0.0) { $0 + Double(abs($1)) }
            let dw = wD[(k * 9)..<((k + 1) * 9)].reduce(0.0) { $0 + Double(abs($1)) }
            let column = (0..<5).reduce(0.0) { $0 + Double(abs(wC[$1 * 10 + k])) }
            return (row + dw + column) / 3
        }
        let mean = expected.reduce(0, +) / 4
        expected = expected.map { $0 / mean }
        for k in 0..<4 { #expect(abs(scores[k] - expected[k]) < 1e-9) }
    }

    /// The issue's case: `--schedule 0.2,0.25 --round-to 16` keeps all 32 channels of a layer at both steps (24
    /// would round down to 16, harder than asked); with `--round-to 8` the second step keeps 24.
    @Test func roundingNeverPrunesHarderThanAsked() throws {
        let model = Graphs.wideConvNet()
        let groups = try ChannelGroups(model: model)
        let scores = try Pruning.scores(groups, model: model, criterion: .l1)
        #expect(Set(groups.prunable.map(\.channels)) == [16, 32])
        for (roundTo, ratio, expected16, expected32) in [(16, 0.2, 16, 32), (16, 0.25, 16, 32), (8, 0.25, 16, 24), (1, 0.25, 12, 24)] {
            var options = PruningOptions(ratio: ratio)
            options.roundTo = roundTo
            let kept = try Pruning.select(groups, scores: scores, options: options)
            for g in groups.prunable {
                let k = kept[g.id]!.count
                #expect(k == (g.channels == 16 ? expected16 : expected32), "\(g.name): round-to \(roundTo) at \(ratio)")
                #expect(k >= Int((Double(g.channels) * (1 - ratio)).rounded(.down)), "never harder than asked")
            }
        }
    }

    /// PyTorch's exporter shares one initializer among layers whose folded constants are equal (zero biases),
    /// through Identity nodes: pruning gives each layer its own copy instead of producing an inconsistent graph.
    @Test func biasesSharedThroughIdentityArePrunedPerLayer() throws {
        var model = Graphs.concat()
        // convA and convB read their biases through Identity nodes of one shared zero initializer... of the same
        // length only for convC's 5 channels, so share convC's with a second 5-channel conv's.
        model.graph.initializers.append(Initializer(name: "zeros5", tensor: Tensor(shape: [5], floats: [Float](repeating: 0, count: 5))))
        let c = model.graph.nodes.firstIndex { $0.name == "convC" }!
        model.graph.nodes[c].inputs[2] = "bC_shared"
        model.graph.nodes.insert(Node(opType: "Identity", name: "Identity_1", inputs: ["zeros5"], outputs: ["bC_shared"]), at: 0)
        let (owned, changed) = GraphEditing.materializeConstants(model)
        #expect(changed && owned.graph.nodes.allSatisfy { $0.opType != "Identity" })
        #expect(owned.graph.initializer(named: "bC_shared") != nil && owned.graph.initializer(named: "zeros5") == nil)
        // Without the rewrite the group is left whole with its reason, never cut inconsistently.
        let raw = try ChannelGroups(model: model)
        let convC = try #require(raw.groups.first { $0.producers.first == "convC" })
        #expect(!convC.prunable && convC.frozenReason!.contains("bias that is not an initializer"))
        let x = try Self.input(owned)
        let (_, groups, kept) = try checkSurgery(owned, PruningOptions(ratio: 0.4), input: x)
        let pruned = try #require(groups.groups.first { $0.producers.first == "convC" })
        #expect(pruned.prunable && kept[pruned.id]!.count == 3)
    }

    /// Channels that pass through a grouped convolution are removed in whole groups (the groups stay equal), and
    /// the convolution's `group` follows.
    @Test func groupedConvolutionsLoseWholeGroups() throws {
        var model = Graphs.concat()
        // The depthwise conv over the 10 concatenated channels becomes grouped with width 2 (5 groups).
        model.graph.nodes[model.graph.nodes.firstIndex { $0.name == "dw" }!].attributes = [
            Attribute("kernel_shape", .ints([3, 3])), Attribute("pads", .ints([1, 1, 1, 1])), Attribute("group", .int(5))]
        let w = model.graph.initializers.firstIndex { $0.name == "wD" }!
        model.graph.initializers[w] = Graphs.weight("wD", [10, 2, 3, 3], seed: 5)
        let groups = try ChannelGroups(model: model)
        #expect(groups.groupedNodes["dw"] == 2)
        let x = try Self.input(model)
        let (pruned, after, kept) = try checkSurgery(model, PruningOptions(ratio: 0.5), input: x)
        for g in after.prunable where g.unit > 1 {
            let k = kept[g.id]!
            #expect(k.count % g.unit == 0)
            // Aligned blocks: channel 2b is kept exactly when 2b + 1 is.
            for c in k where c % 2 == 0 { #expect(k.contains(c + 1)) }
        }
        let dw = pruned.graph.nodes.first { $0.name == "dw" }!
        let rows = pruned.graph.initializer(named: "wD")!.tensor!.shape[0]
        #expect(dw.attribute("group")?.value.int == Int64(rows / 2))
    }
}
