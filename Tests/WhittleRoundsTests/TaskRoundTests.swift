import Foundation
import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleRounds
import WhittleTensor
import WhittleTestSupport

/// Federated phases on models that are not the demo classifier: an encoder fed token ids and attention masks by
/// name, and a segmenter evaluated per pixel, each site's figures merged as sums.
@Suite struct TaskRoundTests {
    /// Token shards (sizes 6 and 10) of random ids with random lengths, and their union.
    static func tokenShards() throws -> (parts: [Dataset], union: Dataset) {
        var rng = SplitMix64(seed: 21)
        let sizes = [6, 10], seq = 16, n = sizes.reduce(0, +)
        var ids: [Int64] = [], mask: [Int64] = []
        for _ in 0..<n {
            let length = 4 + Int(rng.next() % UInt64(seq - 3))
            for t in 0..<seq {
                ids.append(t == 0 ? 1 : t < length ? 2 + Int64(rng.next() % 98) : 0)
                mask.append(t < length ? 1 : 0)
            }
        }
        let union = try Dataset(samples: try Samples([("input_ids", Tensor(shape: [n, seq], ints: ids)),
                                                      ("attention_mask", Tensor(shape: [n, seq], ints: mask))]), labels: nil)
        var parts: [Dataset] = [], start = 0
        for size in sizes {
            parts.append(try Dataset(samples: union.slice(start..<(start + size)), labels: nil))
            start += size
        }
        return (parts, union)
    }

    static func run(_ kind: PhaseKind, plan: RoundPlan, model: Model, teacher: Model, progress: RoundProgress,
                    parts: [Dataset]) throws -> PhaseAccumulator {
        try RoundTests.federated(kind, plan: plan, model: model, teacher: teacher, progress: progress, parts: parts)
    }

    @Test func anEncoderTakesEveryWorkerPhaseFromTokenData() throws {
        let model = GraphEditing.materializeConstants(try TestSupport.zooModel("bert_cls_op17")).0
        let (parts, union) = try Self.tokenShards()
        var plan = RoundPlan()
        plan.modelSHA256 = String(repeating: "a", count: 64)
        plan.pruneRatio = 0.5
        plan.importance = .activation
        plan.finetuneRounds = 1
        plan.distill = true
        // Without a sequence length the report's MACs cannot be counted: the plan is refused, saying how to give one.
        #expect { try plan.validate(model: model) } throws: { "\($0)".contains("--shape input_ids") }
        plan.inputSizes = ["input_ids": [1, 16], "attention_mask": [1, 16]]
        try plan.validate(model: model)
        var progress = RoundProgress(plan: plan, baseModel: "b", startModel: "c")

        // Activation importance over the shards equals one pass over their union.
        let importance = try Self.run(.importance, plan: plan, model: model, teacher: model, progress: progress, parts: parts)
        let collector = try ImportanceCollector(model: model, groups: try ChannelGroups(model: model), criterion: .activation, batchSize: 4)
        try collector.collect(data: union)
        #expect(importance.importance.samples == union.count)
        #expect(!collector.statistics.channels.isEmpty)
        for (name, whole) in collector.statistics.channels {
            let merged = try #require(importance.importance.channels[name])
            #expect(merged.valuesPerChannel == whole.valuesPerChannel)
            for (a, b) in zip(merged.absoluteSums, whole.absoluteSums) { #expect(abs(a - b) <= mergedSumTolerance * max(1, abs(b)), "\(name)") }
        }

        // Calibration ranges of the float activations (the token ids are not observed).
        let ranges = try Self.run(.ranges, plan: plan, model: model, teacher: model, progress: progress, parts: parts)
        #expect(!ranges.ranges.isEmpty && ranges.ranges["input_ids"] == nil && ranges.ranges["attention_mask"] == nil)

        // A pruned student distils from the base model on every shard: finite deltas for its parameters.
        let pruned = try RoundEngine(plan: plan).prune(step: 0, model: model, importance: importance.importance, progress: &progress)
        let tuning = try Self.run(.finetune, plan: plan, model: pruned, teacher: model, progress: progress, parts: parts)
        #expect(tuning.reports == 2)

        // Evaluation against the base model: the model against itself agrees everywhere.
        let evaluation = try Self.run(.evaluate, plan: plan, model: model, teacher: model, progress: progress, parts: parts)
        try RoundEngine(plan: plan).evaluated(base: model, final: model, evaluation, baseBytes: 1, finalBytes: 1, progress: &progress)
        #expect(progress.task == .classification && progress.agreement == 1 && progress.relativeError == 0)
        #expect(progress.sites.values.allSatisfy { $0.agreement == 1 } && progress.sites.count == 2)
    }

    @Test func segmentationSitesReportPixelAccuracyAndMeanIoU() throws {
        let base = try TestSupport.zooModel("lraspp_op17")
        // The "compressed" model: the classifier's weights disturbed, so some pixels change class.
        var compressed = base
        let heads = compressed.graph.nodes.filter { $0.opType == "Conv" }.suffix(2).map { $0.inputs[1] }
        for (k, initializer) in compressed.graph.initializers.enumerated() where heads.contains(initializer.name) {
            let t = initializer.tensor!
            let noise = TestSupport.randomFloats(t.count, seed: UInt64(40 + k))
            compressed.graph.initializers[k].setTensor(Tensor(shape: t.shape, floats: zip(t.floats, noise).map { $0 + 0.3 * $1 }))
        }
        let n = 6, (h, w) = (64, 64)
        let images = Tensor(shape: [n, 3, h, w], floats: TestSupport.randomFloats(n * 3 * h * w, seed: 9))
        // Labels: the base model's classes, every seventh pixel moved to the next class.
        let z = try InferenceSession(model: base).firstOutput(Samples(images))
        var labels = [Int64](repeating: 0, count: n * h * w)
        for b in 0..<n {
            for p in 0..<(h * w) {
                var best = 0
                for k in 1..<3 where z.floats[(b * 3 + k) * h * w + p] > z.floats[(b * 3 + best) * h * w + p] { best = k }
                labels[b * h * w + p] = Int64((best + (p % 7 == 0 ? 1 : 0)) % 3)
            }
        }
        let union = try Dataset(x: images, labels: Tensor(shape: [n, h, w], ints: labels))
        let parts = try [0..<2, 2..<6].map { r in
            try Dataset(samples: union.slice(r), labels: Tensor(shape: [r.count, h, w], ints: Array(labels[(r.lowerBound * h * w)..<(r.upperBound * h * w)])))
        }
        var plan = RoundPlan()
        plan.modelSHA256 = String(repeating: "a", count: 64)
        var progress = RoundProgress(plan: plan, baseModel: "b", startModel: "c")
        let accumulator = try Self.run(.evaluate, plan: plan, model: compressed, teacher: base, progress: progress, parts: parts)
        try RoundEngine(plan: plan).evaluated(base: base, final: compressed, accumulator, baseBytes: 1, finalBytes: 1, progress: &progress)

        // The fleet's figures equal one evaluation over the union of the sites' data.
        var local = LocalCompression()
        local.batchSize = 4
        let whole = try local.evaluate(.segmentation, base: try local.logits(try InferenceSession(model: base), union),
                                       compressed: try local.logits(try InferenceSession(model: compressed), union), data: union)
        #expect(progress.task == .segmentation)
        #expect(progress.before?.accuracy == whole.baseAccuracy && progress.after?.accuracy == whole.compressedAccuracy)
        #expect(progress.before?.meanIoU == whole.baseMeanIoU && progress.after?.meanIoU == whole.compressedMeanIoU)
        #expect(progress.agreement == whole.agreementRate)
        // 6 of 7 pixels carry the base model's class: its pixel accuracy is about 6/7; the disturbed model's less.
        let baseAccuracy = try #require(whole.baseAccuracy), after = try #require(whole.compressedAccuracy)
        #expect(abs(baseAccuracy - 6.0 / 7) < 0.01 && after < baseAccuracy && whole.agreementRate! < 1)
        let sites = progress.sites.values.sorted { $0.worker < $1.worker }
        #expect(sites.count == 2 && sites.allSatisfy { $0.meanIoUBefore != nil && $0.meanIoUAfter != nil && $0.relativeError != nil })

        // A forged site report (more intersecting pixels than the union holds, or counts beyond its pixels) is refused.
        var compressor = DeltaCompressor()
        var forged = try WorkerJobs.run(RoundEngine(plan: plan).task(Phase(.evaluate), index: 0, round: "r", progress: progress,
                                                                     expectation: accumulator.expectation, deadline: 0,
                                                                     artifactBytes: { _ in 0 }),
                                        model: compressed, teacher: base, data: parts[0], batchSize: 4, compressor: &compressor)
        forged.evaluation.baseIntersection[0] = forged.evaluation.baseUnion[0] + 1
        var fresh = PhaseAccumulator(expectation: accumulator.expectation, aggregation: plan.aggregation)
        #expect { try fresh.add(forged, worker: "w0", maximumSamples: 2) } throws: { "\($0)".contains("intersections") }
        forged.evaluation.baseIntersection[0] = 0
        forged.evaluation.agreement = forged.evaluation.units + 1
        #expect { try fresh.add(forged, worker: "w0", maximumSamples: 2) } throws: { "\($0)".contains("exceed") }
        forged.evaluation.agreement = 0
        forged.evaluation.taskKind = "telepathy"
        #expect { try fresh.add(forged, worker: "w0", maximumSamples: 2) } throws: { "\($0)".contains("unknown task") }
    }

    /// Label-free Taylor importance takes the base model's top class: a classifier's per sample, a segmenter's per
    /// pixel. An embedding has no class to take, and says so instead of ranking channels by a meaningless loss.
    @Test func labelFreeTaylorImportanceFollowsTheTask() throws {
        let (_, union) = try Self.tokenShards()
        let classifier = GraphEditing.materializeConstants(try TestSupport.zooModel("bert_cls_op17")).0
        let collector = try ImportanceCollector(model: classifier, groups: try ChannelGroups(model: classifier), criterion: .taylor,
                                                batchSize: 8, task: .classification)
        try collector.collect(data: union)
        #expect(!collector.statistics.gradientSums.isEmpty && collector.statistics.samples == union.count)
        let encoder = GraphEditing.materializeConstants(try TestSupport.zooModel("bert_embed_op17")).0
        let embedding = try ImportanceCollector(model: encoder, groups: try ChannelGroups(model: encoder), criterion: .taylor,
                                                batchSize: 8, task: .embedding)
        #expect { try embedding.collect(data: union) } throws: { "\($0)".contains("needs a classifier or a segmenter") }
    }

    /// A worker with a memory limit sizes its batches for a sequence model from its own data's sequence length (the
    /// model leaves it free): more memory, larger batches, never more than planned.
    @Test func memoryLimitedBatchesFollowTheDataSequenceLength() throws {
        let model = try TestSupport.zooModel("bert_cls_op17")
        let (_, union) = try Self.tokenShards()
        let small = try WorkerJobs.batchSize(model: model, planned: 64, memoryLimit: 700_000, training: false, data: union)
        let large = try WorkerJobs.batchSize(model: model, planned: 64, memoryLimit: 8_000_000, training: false, data: union)
        #expect(small >= 1 && small < large && large <= 64, "\(small) \(large)")
        #expect { try WorkerJobs.batchSize(model: model, planned: 64, memoryLimit: 700_000, training: false) } throws: {
            "\($0)".contains("free dimension")
        }
    }
}
