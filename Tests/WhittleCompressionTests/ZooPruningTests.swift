import Foundation
import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// Pruning at 0.3 on every family of the zoo: the pruned model computes what the masked model computes, keeps its
/// output shape, and needs fewer multiply-accumulates — at least `minimumMACRatio` for the families whose
/// channels can all be pruned; transformers prune attention heads and feed-forward neurons, never the residual
/// width, so their ratio depends on how much of the model those are.
@Suite struct ZooPruningTests {
    /// The issue's goal for `--prune-ratio 0.3`.
    static let minimumMACRatio = 1.3
    /// Families whose residual (LayerNorm) width holds more than a third of the MACs at the zoo's small widths:
    /// the ratio each reaches, measured, as a floor against regressions. ConvNeXt 1.28 (feed-forward neurons only;
    /// the full-size ConvNeXt-T reaches more); ViT 1.12 and BERT 1.16 (two heads of 16 per layer cannot lose 30 %:
    /// one head is 50 %, so only feed-forward neurons go; `benchmarks/full_size_pruning.py` measures ViT-B/16).
    static let transformerFloors: [String: Double] = [
        "convnext_op17": 1.25, "convnext_dynamo": 1.25, "vit_op17": 1.1, "vit_dynamo": 1.1, "vit_op14": 1.1, "vit_op20": 1.1,
        "bert_cls_op17": 1.15, "bert_cls_dynamo": 1.15, "bert_cls_op13": 1.15, "bert_cls_op20": 1.15]

    static let models = TestSupport.zooModels.filter { !$0.hasPrefix("bert_embed") }

    @Test(arguments: models)
    func prunedEqualsMaskedWithFewerMACs(_ name: String) throws {
        let model = try GraphEditing.prepareForPruning(
            try ModelCoding.read(try TestSupport.bytes(TestSupport.zoo.appendingPathComponent("\(name).onnx")))).0
        let groups = try ChannelGroups(model: model)
        let scores = try Pruning.scores(groups, model: model, criterion: .l1)
        let kept = try Pruning.select(groups, scores: scores, options: PruningOptions(ratio: 0.3))
        let masked = try Pruning.mask(model, groups: groups, kept: kept)
        let pruned = try Pruning.prune(model, groups: groups, kept: kept)
        let inputs = try TestSupport.zooInputs(name, model: model.graph.runtimeInputs.map(\.name))
        let output = model.graph.outputs[0].name
        let a = try #require(try InferenceSession(model: masked).run(inputs: inputs)[output])
        let b = try #require(try InferenceSession(model: pruned).run(inputs: inputs)[output])
        #expect(a.shape == b.shape)
        #expect(TestSupport.relativeError(b.floats, a.floats) < surgeryTolerance, "\(name)")
        let shapes = Dictionary(uniqueKeysWithValues: inputs.map { ($0.key, ($0.value.dtype, $0.value.shape)) })
        let before = try ModelSummary(model: model, inputShapes: shapes), after = try ModelSummary(model: pruned, inputShapes: shapes)
        let ratio = Double(before.macs) / Double(after.macs)
        #expect(ratio >= Self.transformerFloors[name] ?? Self.minimumMACRatio, "\(name): \(before.macs) → \(after.macs) MACs, \(ratio)x")
    }

    /// torchvision's VisionTransformer (`nn.MultiheadAttention`: one fused in-projection, heads merged with the
    /// batch): respelled head by head (`GraphEditing.separateAttention`), it computes what the export computes at
    /// batch 1 and 3 (the analysis matches shapes at batch 1 only), its heads form one group of whole heads per layer
    /// (Q, K and V thirds and the output projection together), and at 0.5 each layer loses one of its two heads.
    @Test(arguments: ["vit_op17", "vit_op14", "vit_op20", "vit_dynamo"])
    func visionTransformerHeadsAreGroupsOfWholeHeads(_ name: String) throws {
        let export = GraphEditing.materializeConstants(try TestSupport.zooModel(name)).0
        let (model, changed) = try GraphEditing.prepareForPruning(export)
        #expect(changed)
        #expect(!model.graph.nodes.contains { $0.opType == "Gemm" && $0.name.contains("attention") }, "\(name): output projections become MatMul")
        let output = model.graph.outputs[0].name
        for batch in [1, 3] {
            let x = ["input": Tensor(shape: [batch, 3, 32, 32], floats: TestSupport.randomFloats(batch * 3 * 32 * 32, seed: UInt64(batch)))]
            let a = try #require(try InferenceSession(model: export).run(inputs: x)[output])
            let b = try #require(try InferenceSession(model: model).run(inputs: x)[output])
            #expect(a.shape == b.shape && TestSupport.relativeError(b.floats, a.floats) < surgeryTolerance, "\(name) at batch \(batch)")
        }
        let groups = try ChannelGroups(model: model)
        let heads = groups.prunable.filter { $0.unit == 16 }
        #expect(heads.count == 2, "\(name): \(groups.groups.map { "\($0.name) \($0.channels)/\($0.unit) \($0.frozenReason ?? "")" })")
        for g in heads {
            #expect(g.channels == 32)
            #expect(Set(g.members.filter { $0.role == .outputWeights }.map(\.node)).count == 3, "Q, K and V thirds")
            #expect(g.members.filter { $0.role == .inputWeights }.count == 1, "the output projection")
        }
        let scores = try Pruning.scores(groups, model: model, criterion: .l1)
        let kept = try Pruning.select(groups, scores: scores, options: PruningOptions(ratio: 0.5))
        for g in heads { #expect(kept[g.id] == Array(0..<16) || kept[g.id] == Array(16..<32)) }
        let pruned = try Pruning.prune(model, groups: groups, kept: kept)
        let masked = try Pruning.mask(model, groups: groups, kept: kept)
        let x = ["input": Tensor(shape: [3, 3, 32, 32], floats: TestSupport.randomFloats(3 * 3 * 32 * 32, seed: 9))]
        let a = try #require(try InferenceSession(model: masked).run(inputs: x)[output])
        let b = try #require(try InferenceSession(model: pruned).run(inputs: x)[output])
        #expect(TestSupport.relativeError(b.floats, a.floats) < surgeryTolerance, "\(name): pruned at batch 3")
        let shapes = ["input": (DataType.float, [1, 3, 32, 32])]
        let ratio = Double(try ModelSummary(model: model, inputShapes: shapes).macs) / Double(try ModelSummary(model: pruned, inputShapes: shapes).macs)
        #expect(ratio >= 1.5, "\(name): \(ratio)x at 0.5")
    }

    /// Form 2 in isolation: heads split after the batch ([L, N, D] → [L, N·H, d] → [N, H, L, d]) are respelled and
    /// compute the same at batch 3; the lookalike with the heads before the batch (→ [H, N, L, d]) is a different
    /// computation and is left as it is.
    @Test(arguments: [true, false])
    func batchMergedHeadsAreRespelledOnlyInTheirOrder(_ batchFirst: Bool) throws {
        let (l, d, h) = (5, 8, 2)
        let split: [Int64] = batchFirst ? [-1, Int64(h), Int64(l), Int64(d / h)] : [Int64(h), -1, Int64(l), Int64(d / h)]
        let nodes = [
            Node(opType: "Transpose", name: "sequence_first", inputs: ["x"], outputs: ["t"], attributes: [Attribute("perm", .ints([1, 0, 2]))]),
            Node(opType: "Reshape", name: "merge", inputs: ["t", "merged_shape"], outputs: ["merged"]),
            Node(opType: "Transpose", name: "swap", inputs: ["merged"], outputs: ["swapped"], attributes: [Attribute("perm", .ints([1, 0, 2]))]),
            Node(opType: "Reshape", name: "split", inputs: ["swapped", "split_shape"], outputs: ["y"]),
        ]
        let graph = Graph(name: "g", nodes: nodes,
                          inputs: [ValueInfo(name: "x", elementType: .float, shape: [.symbol("batch"), .value(l), .value(d)])],
                          outputs: [ValueInfo(name: "y", elementType: .float, shape: nil)],
                          initializers: [Initializer(name: "merged_shape", tensor: Tensor(shape: [3], ints: [Int64(l), -1, Int64(d / h)], dtype: .int64)),
                                         Initializer(name: "split_shape", tensor: Tensor(shape: [4], ints: split, dtype: .int64))])
        let model = Model(graph: graph, opset: 17)
        let (respelled, changed) = try GraphEditing.separateAttention(model)
        #expect(changed == batchFirst)
        let x = ["x": Tensor(shape: [3, l, d], floats: TestSupport.randomFloats(3 * l * d, seed: 4))]
        let a = try #require(try InferenceSession(model: model).run(inputs: x)["y"])
        let b = try #require(try InferenceSession(model: respelled).run(inputs: x)["y"])
        #expect(a.shape == b.shape && a.floats == b.floats)
    }

    /// BERT-style attention: every layer's heads form one group of whole heads (Q, K, V and the output projection
    /// together), the feed-forward neurons another; the residual width stays.
    @Test func attentionHeadsAreGroupsOfWholeHeads() throws {
        let model = GraphEditing.materializeConstants(
            try ModelCoding.read(try TestSupport.bytes(TestSupport.zoo.appendingPathComponent("bert_cls_op17.onnx")))).0
        let groups = try ChannelGroups(model: model)
        let heads = groups.prunable.filter { $0.unit == 16 }
        #expect(heads.count == 2, "one head group per layer: \(groups.prunable.map { "\($0.name) \($0.channels)/\($0.unit)" })")
        for g in heads {
            #expect(g.channels == 32)
            let projections = Set(g.members.filter { $0.role == .outputWeights }.map(\.node))
            #expect(projections.count == 3, "Q, K and V: \(projections)")
            #expect(g.members.contains { $0.role == .inputWeights && $0.node.contains("dense") })
        }
        let feedForward = groups.prunable.filter { $0.unit == 1 && $0.channels == 64 }
        #expect(feedForward.count == 2)
        // The residual width (the output projections and the feed-forward outputs) stays.
        #expect(groups.groups.filter { $0.name.hasSuffix("dense/MatMul") || $0.name.hasSuffix("output/MatMul") }.allSatisfy { !$0.prunable })
        // At 0.5 each layer loses one of its two heads; the pruned model computes what the masked one does.
        let scores = try Pruning.scores(groups, model: model, criterion: .l1)
        let kept = try Pruning.select(groups, scores: scores, options: PruningOptions(ratio: 0.5))
        for g in heads { #expect(kept[g.id]!.count == 16 && (kept[g.id]! == Array(0..<16) || kept[g.id]! == Array(16..<32))) }
        let inputs = try TestSupport.zooInputs("bert_cls_op17", model: model.graph.runtimeInputs.map(\.name))
        let masked = try InferenceSession(model: try Pruning.mask(model, groups: groups, kept: kept)).run(inputs: inputs)["logits"]!
        let pruned = try Pruning.prune(model, groups: groups, kept: kept)
        let y = try InferenceSession(model: pruned).run(inputs: inputs)["logits"]!
        #expect(TestSupport.relativeError(y.floats, masked.floats) < surgeryTolerance)
        #expect(pruned.graph.initializers.filter { $0.name.contains("query") && $0.name.contains("bias") }.allSatisfy { $0.shape == [16] })
    }
}
