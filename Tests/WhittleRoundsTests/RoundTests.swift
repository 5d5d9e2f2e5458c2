import Foundation
import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleRounds
import WhittleTensor
import WhittleTestSupport

/// Double sums of per-channel statistics merged in another order agree to this relative error.
let mergedSumTolerance = 1e-9
/// Float gradient sums accumulated per part and merged agree with one pass to this relative error.
let gradientSumTolerance: Float = 1e-4

/// The federated phases' aggregates against the same computation on the union of the workers' data.
@Suite struct RoundTests {
    static let model: Model = try! ModelCoding.read(try! TestSupport.bytes(TestSupport.root.appendingPathComponent("examples/models/defect_cnn.onnx")))

    /// Three workers' shards (sizes 7, 10, 13) of seeded images, and their union.
    static func shards() throws -> (parts: [Dataset], union: Dataset) {
        let sizes = [7, 10, 13], sample = 3 * 32 * 32
        let all = TestSupport.randomFloats(sizes.reduce(0, +) * sample, seed: 11).map { abs($0) }
        let labels = (0..<sizes.reduce(0, +)).map { Int64($0 % 4) }
        var parts: [Dataset] = [], start = 0
        for n in sizes {
            parts.append(try Dataset(x: Tensor(shape: [n, 3, 32, 32], floats: Array(all[(start * sample)..<((start + n) * sample)])),
                                     labels: Tensor(shape: [n], ints: Array(labels[start..<(start + n)]))))
            start += n
        }
        return (parts, try Dataset(x: Tensor(shape: [start, 3, 32, 32], floats: all), labels: Tensor(shape: [start], ints: labels)))
    }

    static func plan(_ configure: (inout RoundPlan) -> Void = { _ in }) -> RoundPlan {
        var p = RoundPlan()
        p.modelSHA256 = String(repeating: "a", count: 64)
        configure(&p)
        return p
    }

    /// Runs a worker phase on each shard, through the wire encoding, into an accumulator.
    static func federated(_ kind: PhaseKind, plan: RoundPlan, model: Model, teacher: Model? = nil, progress: RoundProgress,
                          parts: [Dataset], batchSize: Int = 4) throws -> PhaseAccumulator {
        let engine = RoundEngine(plan: plan)
        let expectation = try engine.expectation(Phase(kind), model: model, progress: progress)
        let task = engine.task(Phase(kind), index: 0, round: "r", progress: progress, expectation: expectation, deadline: 0,
                               artifactBytes: { _ in 0 })
        var accumulator = PhaseAccumulator(expectation: expectation, aggregation: plan.aggregation)
        for (k, part) in parts.enumerated() {
            var compressor = DeltaCompressor()
            let report = try WorkerJobs.run(task, model: model, teacher: teacher ?? model, data: part, batchSize: batchSize,
                                            compressor: &compressor)
            let wire = try Whittle_TaskReport(serializedBytes: try report.serializedBytes() as [UInt8])
            try accumulator.add(wire, worker: "w\(k)", maximumSamples: part.count)
        }
        return accumulator
    }

    @Test func phasesFollowThePlan() {
        #expect(Self.plan().phases.map(\.kind) == [.fold, .ranges, .export, .evaluate, .distribute])
        let pruned = Self.plan {
            $0.schedule = [0.2, 0.4]
            $0.importance = .taylor
            $0.finetuneRounds = 2
            $0.quantize = .int8
            $0.calibration = .entropy
            $0.ewcLambda = 10
            $0.normalizationPasses = 2
        }
        #expect(pruned.phases.map(\.kind) == [.fisher, .importance, .prune, .finetune, .finetune, .normalization, .normalization,
                                              .importance, .prune, .finetune, .finetune, .normalization, .normalization,
                                              .fold, .ranges, .histograms, .export, .evaluate, .distribute])
        #expect(pruned.phases[9].label == "finetune (step 2, round 1)")
        let float = Self.plan { $0.quantize = .none; $0.pruneRatio = 0.3 }
        #expect(float.phases.map(\.kind) == [.prune, .export, .evaluate, .distribute])
        // Cosine over a step's rounds.
        let lr = Self.plan { $0.finetuneRounds = 4; $0.learningRate = 0.1 }
        #expect(lr.learningRate(iteration: 0) == 0.1)
        #expect(abs(lr.learningRate(iteration: 2) - 0.05) < 1e-7)
        // ... over every local epoch of them: 4 rounds × 2 epochs anneal as 8 central epochs would.
        let epochs = Self.plan { $0.finetuneRounds = 4; $0.localEpochs = 2; $0.learningRate = 0.1 }
        let all = (0..<4).flatMap { epochs.epochLearningRates(.finetune, iteration: $0) }
        let central = (0..<8).map { LearningRateSchedule.cosine(epochs: 8, minimum: 0).rate(base: 0.1, epoch: $0) }
        #expect(all.count == 8 && zip(all, central).allSatisfy { abs($0 - $1) < 1e-7 })
        #expect(Self.plan { $0.finetuneRounds = 1; $0.localEpochs = 1 }.epochLearningRates(.finetune, iteration: 0) == [0.01])
    }

    @Test func badPlansAreRefusedWithReasons() throws {
        let cases: [(RoundPlan, String)] = [
            (Self.plan { $0.pruneRatio = 1 }, "--prune-ratio"),
            (Self.plan { $0.schedule = [0.4, 0.2] }, "non-decreasing"),
            (Self.plan { $0.minWorkers = 4; $0.workersPerPhase = 2 }, "--workers-per-phase"),
            (Self.plan { $0.ewcLambda = 5 }, "--finetune-rounds"),
            (Self.plan { $0.phaseDeadlineSeconds = 0 }, "--phase-deadline"),
            (Self.plan { $0.modelSHA256 = "" }, "no base model"),
        ]
        for (plan, needle) in cases {
            do {
                try plan.check()
                Issue.record("accepted a bad plan (\(needle))")
            } catch let error as CompressionError {
                #expect(error.code == .invalidArgument && error.message.contains(needle), "\(error.message)")
            }
        }
        // Against the model: one Gemm from input to output has no prunable channel group (both ends are fixed).
        let gemm = Model(graph: Graph(
            name: "gemm", nodes: [Node(opType: "Gemm", name: "fc", inputs: ["x", "w", "b"], outputs: ["y"], attributes: [Attribute("transB", .int(1))])],
            inputs: [ValueInfo(name: "x", elementType: .float, shape: [.value(2), .value(3)])],
            outputs: [ValueInfo(name: "y", elementType: .float, shape: [.value(2), .value(4)])],
            initializers: [Initializer(name: "w", tensor: Tensor(shape: [4, 3], floats: Array(repeating: 0.5, count: 12))),
                           Initializer(name: "b", tensor: Tensor(shape: [4], floats: [0, 0, 0, 0]))]), opset: 13)
        do {
            try Self.plan { $0.pruneRatio = 0.5 }.validate(model: gemm)
            Issue.record("a model without prunable groups was accepted for pruning")
        } catch let error as CompressionError {
            #expect(error.message.contains("no channel group"), "\(error.message)")
        }
        try Self.plan { $0.pruneRatio = 0.5; $0.finetuneRounds = 1 }.validate(model: Self.model)
    }

    @Test func federatedRangesAndHistogramsEqualTheUnion() throws {
        let (parts, union) = try Self.shards()
        let plan = Self.plan { $0.calibration = .entropy }
        let folded = try GraphEditing.foldBatchNormalization(Self.model)
        var progress = RoundProgress(plan: plan, baseModel: "b", startModel: "c")
        let ranges = try Self.federated(.ranges, plan: plan, model: folded, progress: progress, parts: parts)

        var local = LocalCompression()
        local.quantization = plan.quantizationPolicy
        let collector = CalibrationCollector(session: try InferenceSession(model: folded),
                                             tensors: try QDQExport.calibrationTensors(folded, policy: plan.quantizationPolicy))
        for (batch, _) in union.batches(5) { try collector.collectRanges(batch) }
        #expect(ranges.ranges == collector.ranges)
        #expect(ranges.samples == union.count)

        progress.histogramUpper = RoundEngine(plan: plan).histogramEdges(ranges)
        let histograms = try Self.federated(.histograms, plan: plan, model: folded, progress: progress, parts: parts, batchSize: 3)
        try collector.beginHistograms(upperBounds: collector.ranges.mapValues(\.absMax), binCount: plan.quantizationPolicy.histogramBins)
        for (batch, _) in union.batches(5) { try collector.collectHistograms(batch) }
        #expect(histograms.histograms == collector.histograms)
        let federated = try LocalCompression.calibratedRanges(ranges: ranges.ranges, histograms: histograms.histograms,
                                                              policy: plan.quantizationPolicy)
        let central = try local.calibrate(folded, union)
        #expect(federated.keys.sorted() == central.keys.sorted())
        for (name, r) in central { #expect(federated[name]! == r, "\(name)") }
    }

    @Test func federatedImportanceEqualsTheUnion() throws {
        let (parts, union) = try Self.shards()
        let progress = RoundProgress(plan: Self.plan(), baseModel: "b", startModel: "c")
        for criterion in [ImportanceCriterion.activation, .taylor] {
            let plan = Self.plan { $0.importance = criterion; $0.pruneRatio = 0.5 }
            let federated = try Self.federated(.importance, plan: plan, model: Self.model, progress: progress, parts: parts)
            let groups = try ChannelGroups(model: Self.model)
            let collector = try ImportanceCollector(model: Self.model, groups: groups, criterion: criterion, teacher: Self.model, batchSize: 4)
            try collector.collect(data: union)
            let central = collector.statistics
            #expect(federated.importance.samples == central.samples)
            for (name, c) in central.channels {
                let f = federated.importance.channels[name]!
                #expect(f.valuesPerChannel == c.valuesPerChannel && f.zeroCounts == c.zeroCounts)
                for (a, b) in zip(f.absoluteSums, c.absoluteSums) { #expect(abs(a - b) <= mergedSumTolerance * max(abs(b), 1)) }
            }
            for (name, g) in central.gradientSums {
                #expect(TestSupport.relativeError(federated.importance.gradientSums[name]!.floats, g.floats, floor: 1e-3) < gradientSumTolerance, "\(name)")
            }
            // The same scores select the same channels.
            let fScores = try Pruning.scores(groups, model: Self.model, criterion: criterion, statistics: federated.importance)
            let cScores = try Pruning.scores(groups, model: Self.model, criterion: criterion, statistics: central)
            let options = plan.pruningOptions
            #expect(try Pruning.select(groups, scores: fScores, options: options) == Pruning.select(groups, scores: cScores, options: options))
        }
    }

    @Test func fineTuningDeltasAverageAndApply() throws {
        let (parts, _) = try Self.shards()
        let progress = RoundProgress(plan: Self.plan(), baseModel: "b", startModel: "c")
        for compression in [DeltaCompression.none, .int8] {
            let plan = Self.plan { $0.finetuneRounds = 1; $0.deltaCompression = compression; $0.learningRate = 0.05 }
            let accumulator = try Self.federated(.finetune, plan: plan, model: Self.model, progress: progress, parts: parts)
            let delta = try accumulator.delta()
            #expect(delta.keys.sorted() == updateShapes(Self.model).keys.sorted())
            #expect(delta.values.contains { t in t.floats.contains { $0 != 0 } })
            let tuned = try applying(delta, to: Self.model)
            let w = Self.model.graph.initializer(named: "fc.weight")!.tensor!, t = tuned.graph.initializer(named: "fc.weight")!.tensor!
            #expect(zip(zip(w.floats, delta["fc.weight"]!.floats), t.floats).allSatisfy { abs($0.0 + $0.1 - $1) <= 1e-6 })
        }
    }

    @Test func aKeptOptimizerStateContinuesFromRoundToRound() throws {
        let (parts, _) = try Self.shards()
        let progress = RoundProgress(plan: Self.plan(), baseModel: "b", startModel: "c")
        let plan = Self.plan { $0.finetuneRounds = 2; $0.optimizer = .adamw; $0.learningRate = 0.001; $0.keepOptimizerState = true }
        let engine = RoundEngine(plan: plan)
        let expectation = try engine.expectation(Phase(.finetune), model: Self.model, progress: progress)
        let task = engine.task(Phase(.finetune), index: 0, round: "r", progress: progress, expectation: expectation, deadline: 0,
                               artifactBytes: { _ in 0 })
        #expect(task.keepOptimizerState)
        var compressor = DeltaCompressor()
        var state: Optimizer.State?
        let first = try WorkerJobs.run(task, model: Self.model, teacher: nil, data: parts[2], batchSize: 4, compressor: &compressor,
                                       optimizerState: &state)
        let steps = (parts[2].count + 3) / 4
        #expect(state?.step == steps && state?.second.isEmpty == false)
        let carried = try WorkerJobs.run(task, model: Self.model, teacher: nil, data: parts[2], batchSize: 4, compressor: &compressor,
                                         optimizerState: &state)
        #expect(state?.step == 2 * steps)
        // The same task from a fresh state gives the first round's update again; from the carried state, another.
        var fresh: Optimizer.State?
        let again = try WorkerJobs.run(task, model: Self.model, teacher: nil, data: parts[2], batchSize: 4, compressor: &compressor,
                                       optimizerState: &fresh)
        #expect(again.update.deltas == first.update.deltas)
        #expect(carried.update.deltas != first.update.deltas)
        // A state for other shapes (after pruning) is dropped whole.
        var optimizer = Optimizer(.adamW(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0))
        optimizer.restore(state!, sizes: ["fc.weight": 3])
        #expect(optimizer.state.first.isEmpty && optimizer.state.step == 0)
        // Without the option, nothing is carried.
        var none: Optimizer.State?
        var plain = task
        plain.keepOptimizerState = false
        _ = try WorkerJobs.run(plain, model: Self.model, teacher: nil, data: parts[2], batchSize: 4, compressor: &compressor,
                               optimizerState: &none)
        #expect(none == nil)
    }

    @Test func malformedTrainingParametersInATaskAreRefused() throws {
        let (parts, _) = try Self.shards()
        let progress = RoundProgress(plan: Self.plan(), baseModel: "b", startModel: "c")
        let plan = Self.plan { $0.finetuneRounds = 2; $0.localEpochs = 2 }
        let engine = RoundEngine(plan: plan)
        let expectation = try engine.expectation(Phase(.finetune), model: Self.model, progress: progress)
        let task = engine.task(Phase(.finetune), index: 0, round: "r", progress: progress, expectation: expectation, deadline: 0,
                               artifactBytes: { _ in 0 })
        #expect(task.epochLearningRates.count == 2)
        var compressor = DeltaCompressor()
        var shortRates = task
        shortRates.epochLearningRates = [0.01]
        var negative = task
        negative.epochLearningRates = [0.01, -1]
        var unknown = task
        unknown.augmentation = "mirror"
        for (bad, needle) in [(shortRates, "epoch learning rates"), (negative, "non-negative"), (unknown, "augmentation 'mirror'")] {
            #expect { try WorkerJobs.run(bad, model: Self.model, teacher: nil, data: parts[0], batchSize: 4, compressor: &compressor) }
                throws: { "\($0)".contains(needle) }
        }
    }

    @Test func theServerOptimizerStepsParametersAndAveragesRunningStatistics() throws {
        let (parts, _) = try Self.shards()
        let progress = RoundProgress(plan: Self.plan(), baseModel: "b", startModel: "c")
        let plan = Self.plan { $0.finetuneRounds = 1; $0.learningRate = 0.05; $0.serverLearningRate = 2; $0.serverMomentum = 0.5 }
        let accumulator = try Self.federated(.finetune, plan: plan, model: Self.model, progress: progress, parts: parts)
        let delta = try accumulator.delta()
        var record = progress
        let engine = RoundEngine(plan: plan)
        let previous = delta.mapValues { Tensor(shape: $0.shape, floats: [Float](repeating: 1, count: $0.count)) }
        let (tuned, velocity) = try engine.finetuned(Self.model, accumulator, velocity: previous, progress: &record)
        let statistics = RoundEngine.runningStatistics(Self.model)
        #expect(statistics.count == 10)
        #expect(velocity.map { Set($0.keys).isDisjoint(with: statistics) } == true)
        for (name, d) in delta {
            let before = Self.model.graph.initializer(named: name)!.tensor!.floats, after = tuned.graph.initializer(named: name)!.tensor!.floats
            // Statistics: the plain weighted mean; parameters: eta * (beta * v + delta).
            let expected = statistics.contains(name) ? zip(before, d.floats).map { $0 + $1 }
                                                     : zip(before, d.floats).map { $0 + 2 * (0.5 * 1 + $1) }
            #expect(zip(expected, after).allSatisfy { abs($0 - $1) <= 1e-5 * max(1, abs($0)) }, "\(name)")
        }
    }

    @Test func plansAndProgressStoredBeforeAFieldExistedStillDecode() throws {
        let plan = Self.plan { $0.pruneRatio = 0.5; $0.finetuneRounds = 3; $0.optimizer = .adamw; $0.augmentation = .dihedral }
        var object = try JSONSerialization.jsonObject(with: JSONEncoder().encode(plan)) as! [String: Any]
        for key in ["optimizer", "augmentation", "qatRounds", "serverMomentum", "batchSize"] { object[key] = nil }
        let old = try RoundPlan.stored(JSONSerialization.data(withJSONObject: object))
        #expect(old.pruneRatio == 0.5 && old.finetuneRounds == 3)
        #expect(old.optimizer == .sgd && old.augmentation == nil && old.qatRounds == 0 && old.batchSize == 32)
        var progress = try JSONSerialization.jsonObject(with: JSONEncoder().encode(
            RoundProgress(plan: plan, baseModel: "b", startModel: "c"))) as! [String: Any]
        for key in ["sites", "originalChannels", "originalIndex"] { progress[key] = nil }
        let decoded = try RoundProgress.stored(JSONSerialization.data(withJSONObject: progress))
        #expect(decoded.baseModel == "b" && decoded.sites.isEmpty && decoded.phases.count == plan.phases.count)
        #expect(throws: (any Error).self) { try RoundPlan.stored(Data("[1]".utf8)) }
    }

    @Test func badReportsAreRefusedAndChangeNothing() throws {
        let (parts, _) = try Self.shards()
        let plan = Self.plan()
        let folded = try GraphEditing.foldBatchNormalization(Self.model)
        let progress = RoundProgress(plan: plan, baseModel: "b", startModel: "c")
        var accumulator = try Self.federated(.ranges, plan: plan, model: folded, progress: progress, parts: [parts[0]])
        let before = accumulator.ranges
        let engine = RoundEngine(plan: plan)
        let task = engine.task(Phase(.ranges), index: 0, round: "r", progress: progress,
                               expectation: accumulator.expectation, deadline: 0, artifactBytes: { _ in 0 })
        var compressor = DeltaCompressor()
        let good = try WorkerJobs.run(task, model: folded, teacher: nil, data: parts[1], batchSize: 4, compressor: &compressor)
        var nan = good
        let name = nan.calibration.ranges.keys.sorted()[0]
        nan.calibration.ranges[name]!.max = .nan
        var missing = good
        missing.calibration.ranges[name] = nil
        var inverted = good
        inverted.calibration.ranges[name]!.min = 5
        inverted.calibration.ranges[name]!.max = -5
        var wrongKind = Whittle_TaskReport()
        wrongKind.evaluation = Whittle_EvaluationReport()
        // Forged counts: merged with w0's they would overflow; refused, never a trap.
        var overflowing = good
        overflowing.calibration.ranges[name]!.count = UInt64(Int.max)
        var huge = good
        huge.calibration.samples = 1 << 50
        let cases: [(Whittle_TaskReport, String, Int, String)] = [
            (nan, "w1", 100, "finite"), (missing, "w1", 100, "tensors"), (inverted, "w1", 100, "interval"),
            (good, "w1", 3, "declared"), (good, "w0", 100, "already reported"), (wrongKind, "w1", 100, "ranges phase"),
            (overflowing, "w1", 100, "overflow"), (huge, "w1", Int.max, "declared"),
        ]
        for (report, worker, maximum, needle) in cases {
            do {
                try accumulator.add(report, worker: worker, maximumSamples: maximum)
                Issue.record("accepted a bad report (\(needle))")
            } catch let error as AggregationError {
                #expect(error.code == .invalidUpdate && error.description.contains(needle), "\(error.description)")
            }
        }
        #expect(accumulator.ranges == before && accumulator.reports == 1)
        try accumulator.add(good, worker: "w1", maximumSamples: 100)
        #expect(accumulator.reports == 2)
    }

    /// A forged int8 delta whose shape overflows when multiplied out is refused (never a trap); a finite but huge
    /// update is clipped by the default bound, and without any bound the aggregated model is refused as non-finite.
    @Test func hostileTrainingUpdatesNeitherTrapNorPoison() throws {
        let plan = Self.plan { $0.finetuneRounds = 1 }
        var progress = RoundProgress(plan: plan, baseModel: "b", startModel: "c")
        let engine = RoundEngine(plan: plan)
        let expectation = try engine.expectation(Phase(.finetune), model: Self.model, progress: progress)
        var forged = Whittle_TaskReport()
        var update = Whittle_WeightUpdate()
        var q = Whittle_QuantizedTensor()
        q.shape = [1 << 32, 1 << 32]
        q.values = Data([1, 2, 3, 4])
        q.scale = 1
        update.compressedDeltas["fc.weight"] = q
        update.samples = 1
        forged.update = update
        var accumulator = PhaseAccumulator(expectation: expectation)
        #expect { try accumulator.add(forged, worker: "w", maximumSamples: 10) } throws: { "\($0)".contains("shape") }
        #expect(accumulator.reports == 0)

        // The default bound: the parameters' norm for the first training phase, then a multiple of the median.
        let trainable = Set(expectation.shapes.keys)
        var squares = 0.0
        for initializer in Self.model.graph.initializers where trainable.contains(initializer.name) {
            for v in initializer.tensor?.floats ?? [] { squares += Double(v) * Double(v) }
        }
        let parameterNorm = squares.squareRoot()
        let first = try #require(engine.clipBound(model: Self.model, trainable: trainable, progress: progress))
        #expect(abs(first - parameterNorm) <= 1e-9 * parameterNorm)
        progress.updateNormMedian = 2
        #expect(engine.clipBound(model: Self.model, trainable: trainable, progress: progress) == 6)
        #expect(RoundEngine(plan: Self.plan { $0.clipNorm = 0.5 }).clipBound(model: Self.model, trainable: trainable, progress: progress) == 0.5)
        #expect(RoundEngine(plan: Self.plan { $0.clipMultiple = 0 }).clipBound(model: Self.model, trainable: trainable, progress: progress) == nil)

        // A finite update of 1e30 in every entry: clipped to the bound it leaves the model finite; unclipped, the
        // round refuses the aggregate.
        var poison = Whittle_WeightUpdate()
        for (name, shape) in expectation.shapes {
            poison.deltas[name] = Whittle_FloatTensor(Tensor(shape: shape, floats: [Float](repeating: 1e30, count: shape.reduce(1, *))))
        }
        poison.samples = 5
        poison.loss = 1
        var poisoned = Whittle_TaskReport()
        poisoned.update = poison
        var clipped = PhaseAccumulator(expectation: expectation, clipNorm: 6)
        try clipped.add(poisoned, worker: "w", maximumSamples: 10)
        #expect(try #require(clipped.medianUpdateNorm) > 1e30)  // recorded before clipping
        let step = try clipped.delta()
        var stepSquares = 0.0
        for t in step.values { for v in t.floats { stepSquares += Double(v) * Double(v) } }
        let stepNorm = stepSquares.squareRoot()
        #expect(stepNorm <= 6 * (1 + 1e-6))
        // Training reports fold in place: one refused for a non-finite value in any of its parameters (here every
        // parameter is finite but one, each in turn) changes nothing.
        let before = try clipped.delta()
        for bad in expectation.shapes.keys.sorted() {
            var late = poison
            for (name, shape) in expectation.shapes {
                var values = [Float](repeating: 0.5, count: shape.reduce(1, *))
                if name == bad { values[values.count - 1] = .nan }
                late.deltas[name] = Whittle_FloatTensor(Tensor(shape: shape, floats: values))
            }
            var report = Whittle_TaskReport()
            report.update = late
            #expect { try clipped.add(report, worker: "late-\(bad)", maximumSamples: 10) } throws: { "\($0)".contains("non-finite") }
        }
        #expect(try clipped.delta() == before && clipped.reports == 1 && clipped.samples == 5)
        var p2 = progress
        _ = try engine.finetuned(Self.model, clipped, velocity: nil, progress: &p2)
        #expect(p2.updateNormMedian == clipped.medianUpdateNorm)
        // Unclipped, with a server learning rate that overflows float32, the aggregate is refused.
        var huge = Whittle_WeightUpdate()
        for (name, shape) in expectation.shapes {
            huge.deltas[name] = Whittle_FloatTensor(Tensor(shape: shape, floats: [Float](repeating: 1e38, count: shape.reduce(1, *))))
        }
        huge.samples = 5
        var overflowing = Whittle_TaskReport()
        overflowing.update = huge
        var unclipped = PhaseAccumulator(expectation: expectation, clipNorm: nil)
        try unclipped.add(overflowing, worker: "w", maximumSamples: 10)
        let amplifying = RoundEngine(plan: Self.plan { $0.finetuneRounds = 1; $0.serverLearningRate = 10 })
        #expect { try amplifying.finetuned(Self.model, unclipped, velocity: nil, progress: &p2) } throws: { "\($0)".contains("non-finite") }
    }

    /// The quality gate before distribution refuses a model that disagrees with the base model or lost accuracy
    /// beyond the plan's bounds, and lets a good one through.
    @Test func theQualityGateStopsABrokenModel() throws {
        let engine = RoundEngine(plan: Self.plan())
        var progress = RoundProgress(plan: Self.plan(), baseModel: "b", startModel: "c")
        progress.agreement = 0.95
        progress.before = CompressionReport.Figures(bytes: 1, parameters: 1, macs: 1, accuracy: 0.9, samples: 100)
        progress.after = CompressionReport.Figures(bytes: 1, parameters: 1, macs: 1, accuracy: 0.88, samples: 100)
        try engine.checkQuality(progress)
        var broken = progress
        broken.agreement = 0.1
        #expect { try engine.checkQuality(broken) } throws: { "\($0)".contains("--min-agreement") }
        var worse = progress
        worse.after?.accuracy = 0.5
        #expect { try engine.checkQuality(worse) } throws: { "\($0)".contains("--max-accuracy-drop") }
        try RoundEngine(plan: Self.plan { $0.maxAccuracyDrop = 0.5 }).checkQuality(worse)
    }

    @Test func theBatchSizeShrinksToTheMemoryLimit() throws {
        #expect(try WorkerJobs.batchSize(model: Self.model, planned: 32, memoryLimit: nil, training: true) == 32)
        #expect(try WorkerJobs.batchSize(model: Self.model, planned: 32, memoryLimit: 1 << 34, training: true) == 32)
        let session = try InferenceSession(model: Self.model)
        let limit = 12 << 20
        let small = try WorkerJobs.batchSize(model: Self.model, planned: 256, memoryLimit: limit, training: false)
        #expect(small >= 1 && small < 256)
        #expect(small == (try session.largestBatch(fittingIn: limit, limit: 256)))
        let training = try WorkerJobs.batchSize(model: Self.model, planned: 256, memoryLimit: limit, training: true)
        #expect(training < small, "training budgets a third of the limit")
        #expect(throws: CompressionError.self) { try WorkerJobs.batchSize(model: Self.model, planned: 32, memoryLimit: 1024, training: false) }
    }

    @Test func quantizationAwareRoundsTrainAgainstTheCalibratedRanges() throws {
        #expect(throws: CompressionError.self) { try Self.plan { $0.qatRounds = 1; $0.quantize = .none }.check() }
        let plan = Self.plan { $0.qatRounds = 2; $0.learningRate = 0.01 }
        #expect(plan.phases.map(\.kind) == [.fold, .ranges, .qat, .qat, .export, .evaluate, .distribute])
        #expect(abs(plan.qatLearningRate(iteration: 0) - 0.001) < 1e-9)
        let (parts, _) = try Self.shards()
        let folded = try GraphEditing.foldBatchNormalization(Self.model)
        var progress = RoundProgress(plan: plan, baseModel: "b", startModel: "c")
        let ranges = try Self.federated(.ranges, plan: plan, model: folded, progress: progress, parts: parts)
        try RoundEngine(plan: plan).calibrate(ranges: ranges.ranges, histograms: [:], samples: ranges.samples, progress: &progress)
        let calibrated = try #require(progress.calibrated)
        #expect(calibrated.keys.sorted() == ranges.ranges.keys.sorted())
        let engine = RoundEngine(plan: plan)
        let expectation = try engine.expectation(Phase(.qat), model: folded, progress: progress)
        let task = engine.task(Phase(.qat), index: 2, round: "r", progress: progress, expectation: expectation, deadline: 0,
                               artifactBytes: { _ in 0 })
        #expect(task.activationMin.count == calibrated.count && task.perChannel && abs(task.learningRate - 0.001) < 1e-9)
        var accumulator = PhaseAccumulator(expectation: expectation)
        for (k, part) in parts.enumerated() {
            var compressor = DeltaCompressor()
            let report = try WorkerJobs.run(task, model: folded, teacher: Self.model, data: part, batchSize: 4, compressor: &compressor)
            try accumulator.add(report, worker: "w\(k)", maximumSamples: part.count)
        }
        let tuned = try applying(try accumulator.delta(), to: folded)
        let exported = try engine.export(tuned, progress: &progress)
        #expect(exported.graph.nodes.contains { $0.opType == "QuantizeLinear" })
        #expect(progress.quantization?.tensors.isEmpty == false)
    }

    @Test func batchNormStatisticsPassesSetPopulationMoments() throws {
        let (parts, union) = try Self.shards()
        let plan = Self.plan { $0.finetuneRounds = 1 }
        let progress = RoundProgress(plan: plan, baseModel: "b", startModel: "c")
        let engine = RoundEngine(plan: plan)
        let inputs = RoundEngine.normalizationInputs(Self.model)
        #expect(inputs.count == 5)
        let pass1 = try engine.renormalized(Self.model, try Self.federated(.normalization, plan: plan, model: Self.model,
                                                                             progress: progress, parts: parts))
        // The first BatchNormalization's input does not depend on any statistics: exact after one pass.
        let first = Self.model.graph.nodes.first { $0.opType == "BatchNormalization" }!
        let session = try InferenceSession(model: Self.model)
        var central = ChannelStatistics(channels: inputs[first.inputs[0]]!)
        _ = try session.run(union.x, observing: [first.inputs[0]]) { node, outputs in
            for (name, value) in zip(node.outputs, outputs) where name == first.inputs[0] { try central.add(value.floats, shape: value.shape) }
        }
        let n = Double(central.valuesPerChannel)
        let mean = pass1.graph.initializer(named: first.inputs[3])!.tensor!.floats
        let variance = pass1.graph.initializer(named: first.inputs[4])!.tensor!.floats
        for c in 0..<mean.count {
            let m = central.sums[c] / n
            #expect(abs(Double(mean[c]) - m) <= 1e-5 * max(1, abs(m)))
            #expect(abs(Double(variance[c]) - (central.squaredSums[c] / n - m * m)) <= 1e-4 * max(1, central.squaredSums[c] / n))
        }
        // A second pass changes the later layers (their inputs saw the first layer's new statistics), not the first.
        let pass2 = try engine.renormalized(pass1, try Self.federated(.normalization, plan: plan, model: pass1,
                                                                        progress: progress, parts: parts))
        #expect(pass2.graph.initializer(named: first.inputs[3])!.tensor!.floats == mean)
    }
}
