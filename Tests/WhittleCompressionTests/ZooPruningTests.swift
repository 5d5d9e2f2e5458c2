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
    /// the full-size ConvNeXt-T reaches more); ViT 1.12 (torchvision's fused in-projection attention keeps its
    /// heads, see docs/architecture.md); BERT 1.16 (its two heads of 16 cannot lose 30 %: one head is 50 %).
    static let transformerFloors: [String: Double] = [
        "convnext_op17": 1.25, "convnext_dynamo": 1.25, "vit_op17": 1.1, "vit_dynamo": 1.1, "vit_op14": 1.1, "vit_op20": 1.1,
        "bert_cls_op17": 1.15, "bert_cls_dynamo": 1.15, "bert_cls_op13": 1.15, "bert_cls_op20": 1.15]

    static let models = TestSupport.zooModels.filter { !$0.hasPrefix("bert_embed") }

    @Test(arguments: models)
    func prunedEqualsMaskedWithFewerMACs(_ name: String) throws {
        let model = GraphEditing.materializeConstants(
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
