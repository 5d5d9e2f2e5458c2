import WhittleNN
import WhittleONNX
import WhittleTensor

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Samples of every model input (and optional labels) held in memory.
public struct Dataset: Sendable {
    public var samples: Samples
    /// One label per sample `[N]`, or per pixel `[N, H, W]` (segmentation).
    public var labels: Tensor?

    /// The unnamed samples of a single-input model.
    public init(x: Tensor, labels: Tensor?) throws {
        try self.init(samples: Samples(x), labels: labels)
    }

    /// Samples of one or several named inputs; float inputs must be finite.
    public init(samples: Samples, labels: Tensor?) throws {
        for (name, t) in samples.named {
            let label = name.isEmpty ? "the data" : "input '\(name)'"
            guard t.rank >= 1, t.shape[0] >= 1 else {
                throw CompressionError(.invalidArgument, "\(label) has shape \(t.shape); expected samples [N, …] with N ≥ 1")
            }
            if t.dtype.isFloatingPoint, let bad = t.floats.firstIndex(where: { !$0.isFinite }) {
                throw CompressionError(.invalidStatistics, "\(label) contains a non-finite value at flat index \(bad)")
            }
        }
        let n = samples.count
        if let labels, labels.rank < 1 || labels.shape[0] != n || labels.count % n != 0 {
            throw CompressionError(.invalidArgument, "\(labels.count) labels (shape \(labels.shape)) for \(n) samples")
        }
        self.samples = samples
        self.labels = labels
    }

    /// The first input's samples (the only input of a single-input model).
    public var x: Tensor { samples.first }

    public var count: Int { samples.count }

    /// The samples (and labels) at `indices`, in their order.
    public func subset(_ indices: [Int]) throws -> Dataset {
        try Dataset(samples: samples.rows(indices), labels: labels.map { l in
            let per = l.shape.dropFirst().reduce(1, *)
            return Tensor(shape: [indices.count] + Array(l.shape.dropFirst()),
                          ints: indices.flatMap { l.ints[($0 * per)..<(($0 + 1) * per)] }, dtype: l.dtype)
        })
    }

    /// The samples in `range` as one batch.
    public func slice(_ range: Range<Int>) -> Samples { samples.rows(range) }

    /// Labels of the samples in `range`.
    public func labels(_ range: Range<Int>) -> ArraySlice<Int64>? {
        labels.map { l in
            let per = l.count / max(count, 1)
            return l.ints[(range.lowerBound * per)..<(range.upperBound * per)]
        }
    }

    /// Batches of at most `size` samples, in order: `(batch, range of sample indices)`, made as they are consumed.
    public func batches(_ size: Int) -> LazyMapSequence<StrideTo<Int>, (Samples, Range<Int>)> {
        stride(from: 0, to: count, by: size).lazy.map { start in
            let range = start..<min(start + size, self.count)
            return (self.slice(range), range)
        }
    }
}

/// What `coordinator model compress` does, on one machine: prune (progressively, with fine-tuning), fold batch
/// normalization, calibrate, export QDQ, evaluate, report. A federated round runs the same steps with statistics
/// merged from workers.
public struct LocalCompression {
    public var pruning: PruningOptions?
    /// Ratios of a progressive schedule (each against the original channel counts); `[pruning.ratio]` by default.
    public var schedule: [Double] = []
    public var finetuneEpochs = 0
    public var finetuneLearningRate: Float = 0.01
    public var finetuneOptimizer: OptimizerKind = .sgd(momentum: 0.9, nesterov: false, weightDecay: 0)
    public var distill = false
    /// Random transforms of the fine-tuning samples.
    public var augmentation: Augmentation = .none
    /// Called during fine-tuning: epoch (from 0), epochs, step (from 1), steps, running mean loss.
    public var trainingProgress: (@Sendable (Int, Int, Int, Int, Double) -> Void)?
    public var quantization = QuantizationPolicy(mode: .none)
    public var sensitivity = false
    /// Rename every internal value and node to a short name in the output (`GraphEditing.compactNames`).
    public var compactNames = false
    /// What the model's first output means (its losses and metrics); nil: inferred from the output's shape.
    public var task: TaskKind?
    public var batchSize = 32
    public var seed: UInt64 = 0

    public init() {}

    /// Progress messages (stage, detail) for the terminal.
    public typealias Progress = (String) -> Void

    public func run(model base: Model, modelName: String, outputName: String, calibration: Dataset, evaluation: Dataset?,
                    training: Dataset?, progress: Progress = { _ in }) throws -> (Model, CompressionReport) {
        let clock = ContinuousClock()
        let start = clock.now
        var timings: [String: Double] = [:]
        func timed<T>(_ stage: String, _ body: () throws -> T) rethrows -> T {
            let t0 = clock.now
            defer { timings[stage, default: 0] += seconds(clock.now - t0) }
            return try body()
        }
        try quantization.check()
        if let pruning { try pruning.check() }
        let evaluationData = evaluation ?? calibration
        let baseSession = try InferenceSession(model: base)
        try baseSession.validate(calibration.samples)
        if let training { try baseSession.validate(training.samples) }
        if let evaluation { try baseSession.validate(evaluation.samples) }
        let task = self.task ?? TaskKind.inferred(model: base, samples: calibration.samples)
        let baseLogits = try timed("evaluation") { try logits(baseSession, evaluationData) }
        // The base model against itself: its accuracy and mean IoU with labels.
        let baseEvaluation = try evaluate(task, base: baseLogits, compressed: baseLogits, data: evaluationData)
        let shapes = try calibration.samples.sampleShapes(for: base.graph)
        func figures(_ model: Model, evaluation: TaskEvaluation, compressed: Bool) throws -> CompressionReport.Figures {
            try self.figures(model, evaluation: evaluation, compressed: compressed, inputShapes: shapes)
        }
        let before = try figures(base, evaluation: baseEvaluation, compressed: false)
        func evaluated(_ model: Model) throws -> TaskEvaluation {
            try evaluate(task, base: baseLogits, compressed: try logits(try InferenceSession(model: model), evaluationData),
                         data: evaluationData)
        }

        // Every layer owns its parameters (exporters share equal constants through Identity nodes); a model to prune
        // has its attention spelled head by head.
        let prunes = pruning.map { $0.ratio > 0 || !schedule.isEmpty } ?? false
        var model = prunes ? try GraphEditing.prepareForPruning(base).0 : GraphEditing.materializeConstants(base).0
        var pruningSection: CompressionReport.PruningSection?
        if let pruning, prunes {
            let steps = schedule.isEmpty ? [pruning.ratio] : schedule
            guard steps.allSatisfy({ $0 >= 0 && $0 < 1 }), zip(steps, steps.dropFirst()).allSatisfy({ $0 <= $1 }) else {
                throw CompressionError(.invalidArgument, "a schedule's ratios must be in [0, 1) and non-decreasing, got \(steps)")
            }
            let initialGroups = try ChannelGroups(model: model)
            guard !initialGroups.prunable.isEmpty else {
                let reasons = initialGroups.groups.compactMap { g in g.frozenReason.map { "\(g.name): \($0)" } }
                throw CompressionError(.invalidArgument,
                    "no channel group of this model can be pruned safely: " + reasons.prefix(6).joined(separator: "; "))
            }
            var bookkeeping = PruningSchedule(groups: initialGroups, options: pruning, steps: steps, finetuneEpochs: finetuneEpochs,
                                           distill: distill)
            for (k, ratio) in steps.enumerated() {
                progress(String(format: "pruning step %d/%d: %.0f %% of channels (%@ importance)", k + 1, steps.count,
                                ratio * 100, pruning.criterion.rawValue))
                let groups = try ChannelGroups(model: model)
                var statistics: ImportanceStatistics?
                if pruning.criterion.needsData {
                    statistics = try timed("importance") {
                        let collector = try ImportanceCollector(model: model, groups: groups, criterion: pruning.criterion,
                                                                teacher: base, batchSize: batchSize, task: task)
                        try collector.collect(data: calibration)
                        return collector.statistics
                    }
                }
                let kept = try timed("pruning") { try bookkeeping.select(model, groups: groups, ratio: ratio, statistics: statistics) }
                let current = model
                model = try timed("pruning") { try bookkeeping.apply(kept, to: current, groups: groups, ratio: ratio) }
                var step = bookkeeping.section.steps.removeLast()
                if evaluationData.labels != nil {
                    step.accuracyPruned = try timed("evaluation") { try evaluated(model).compressedAccuracy }
                }
                if finetuneEpochs > 0, let training {
                    progress(String(format: "fine-tuning step %d/%d: %d epochs on %d samples", k + 1, steps.count,
                                    finetuneEpochs, training.count))
                    let (tuned, losses) = try timed("finetune") {
                        try finetune(model, teacher: distill ? baseSession : nil, data: training, epochs: finetuneEpochs, task: task)
                    }
                    model = tuned
                    step.finetuneLoss = losses
                    if evaluationData.labels != nil {
                        step.accuracyFinetuned = try timed("evaluation") { try evaluated(model).compressedAccuracy }
                    }
                }
                bookkeeping.section.steps.append(step)
            }
            try bookkeeping.decide(model)
            pruningSection = bookkeeping.section
        }

        var calibrationSection: CompressionReport.CalibrationSection?
        var summary: QuantizationSummary?
        var sensitivityRows: [CompressionReport.Sensitivity]?
        if quantization.mode != .none || !quantization.overrides.isEmpty {
            let folded = try GraphEditing.foldBatchNormalization(model)
            progress("calibrating on \(calibration.count) samples (\(quantization.calibration.rawValue))")
            let t0 = clock.now
            let ranges = try timed("calibration") { try calibrate(folded, calibration) }
            calibrationSection = CompressionReport.CalibrationSection(method: quantization.calibration, samples: calibration.count,
                                                                      tensors: ranges.count, seconds: seconds(clock.now - t0))
            let (quantized, s) = try timed("export") { try QDQExport.export(folded, ranges: ranges, policy: quantization) }
            summary = s
            if sensitivity {
                progress("sensitivity: quantizing one layer at a time")
                let floatLogits = try timed("sensitivity") { try logits(try InferenceSession(model: folded), evaluationData) }
                sensitivityRows = []
                for layer in s.layers where layer.precision != .float {
                    let single = singleLayerPolicy(folded, layer.node, layer.precision)
                    let row = try timed("sensitivity") { () throws -> CompressionReport.Sensitivity in
                        let (m, _) = try QDQExport.export(folded, ranges: ranges, policy: single)
                        let z = try logits(try InferenceSession(model: m), evaluationData)
                        let e = try evaluate(task, base: floatLogits, compressed: z, data: evaluationData)
                        return CompressionReport.Sensitivity(
                            node: layer.node, opType: layer.opType, accuracy: e.compressedAccuracy,
                            klDivergence: task == .classification ? Self.klDivergence(floatLogits, z) : nil,
                            agreement: e.agreementRate ?? 0, relativeError: e.relativeError)
                    }
                    sensitivityRows!.append(row)
                }
            }
            model = quantized
        }
        var renamed: [String: String]?
        if compactNames { (model, renamed) = GraphEditing.compactNames(model) }
        let afterEvaluation = try timed("evaluation") { try evaluated(model) }
        var report = CompressionReport(model: modelName, output: outputName, before: before,
                                       after: try figures(model, evaluation: afterEvaluation, compressed: true))
        report.task = task
        report.agreement = afterEvaluation.agreementRate
        report.relativeError = afterEvaluation.relativeError
        report.meanCosine = afterEvaluation.meanCosine
        report.pruning = pruningSection
        report.calibration = calibrationSection
        report.quantization = summary
        report.sensitivity = sensitivityRows
        report.renamedValues = renamed
        timings["total"] = seconds(clock.now - start)
        report.timings = timings
        return (model, report)
    }

    /// Locally, pass 1 keeps the observed activations up to this size so pass 2 needs no second run of the model.
    public static let retainedCalibrationBytes = 256 << 20

    /// Calibrated [min, max] per float activation: pass 1 ranges; pass 2 (histogram methods) |x| histograms over
    /// [0, max|x|] with the policy's bin count, then the calibrator's threshold, clamped to the observed range.
    public func calibrate(_ model: Model, _ data: Dataset) throws -> [String: (min: Float, max: Float)] {
        var tensors = try QDQExport.calibrationTensors(model, policy: quantization)
        if sensitivity {
            for node in QDQExport.weightedNodes(model.graph) {
                tensors.formUnion(try QDQExport.calibrationTensors(model, policy: singleLayerPolicy(model, node.name, .int8)))
            }
        }
        let collector = CalibrationCollector(session: try InferenceSession(model: model), tensors: tensors,
                                             retainBytes: quantization.calibration.needsHistograms ? Self.retainedCalibrationBytes : 0)
        collector.expectedSamples = data.count
        for (batch, _) in data.batches(batchSize) { try collector.collectRanges(batch) }
        return try Self.ranges(collector: collector, data: data, policy: quantization, batchSize: batchSize)
    }

    /// The policy quantizing only `node` (at `precision`), everything else float: for sensitivity.
    func singleLayerPolicy(_ model: Model, _ node: String, _ precision: LayerPrecision) -> QuantizationPolicy {
        var single = quantization
        single.keepFloat = Set(model.graph.nodes.map(\.name)).subtracting([node])
        single.overrides = [node: precision]
        single.mode = .none
        return single
    }

    static func ranges(collector: CalibrationCollector, data: Dataset, policy: QuantizationPolicy, batchSize: Int) throws
        -> [String: (min: Float, max: Float)] {
        if policy.calibration.needsHistograms {
            try collector.beginHistograms(upperBounds: collector.ranges.mapValues(\.absMax), binCount: policy.histogramBins)
            if collector.retainedEverything {
                try collector.collectRetainedHistograms()
            } else {
                for (batch, _) in data.batches(batchSize) { try collector.collectHistograms(batch) }
            }
        }
        return try calibratedRanges(ranges: collector.ranges, histograms: collector.histograms, policy: policy)
    }

    /// The calibrator's [min, max] per tensor from merged pass-1 ranges and (histogram methods) pass-2 |x|
    /// histograms over [0, absMax]: the same whether the statistics came from one machine or from a fleet.
    public static func calibratedRanges(ranges: [String: RangeStatistics], histograms: [String: Histogram],
                                        policy: QuantizationPolicy) throws -> [String: (min: Float, max: Float)] {
        var out: [String: (min: Float, max: Float)] = [:]
        for (name, r) in ranges where r.count > 0 {
            var range: (Float, Float)
            func histogram() throws -> Histogram {
                guard let h = histograms[name] else {
                    throw CompressionError(.invalidStatistics, "tensor '\(name)' has a range but no histogram")
                }
                return h
            }
            switch policy.calibration {
            case .minmax:
                range = try Calibrators.minMax(r, symmetric: policy.symmetricActivations)
            case .percentile:
                range = try Calibrators.percentile(try histogram(), range: r, percentile: policy.percentile)
            case .entropy:
                range = r.absMax == 0 ? (0, 0) : try Calibrators.entropy(try histogram())
            case .mse:
                range = r.absMax == 0 ? (0, 0) : try Calibrators.mse(try histogram(),
                    quantRange: r.min >= 0 && policy.activationType == .uint8 && !policy.symmetricActivations ? 0...255 : -127...127)
            }
            if policy.calibration == .entropy || policy.calibration == .mse {
                range = (max(range.0, r.min), min(range.1, r.max))
            }
            out[name] = (range.0, range.1)
        }
        return out
    }

    public func finetune(_ model: Model, teacher: InferenceSession?, data: Dataset, epochs: Int,
                         task: TaskKind? = nil) throws -> (Model, [Double]) {
        var configuration = TrainingConfiguration()
        configuration.epochs = epochs
        configuration.batchSize = batchSize
        configuration.learningRate = finetuneLearningRate
        configuration.optimizer = finetuneOptimizer
        configuration.seed = seed
        configuration.schedule = .cosine(epochs: epochs, minimum: 0)
        configuration.augmentation = augmentation
        let task = task ?? TaskKind.inferred(model: model, samples: data.samples)
        configuration.task = task
        if teacher != nil {
            configuration.distillation = (task.distillationTemperature, data.labels == nil ? 1 : 0.5)
        }
        guard data.labels != nil || teacher != nil else {
            throw CompressionError(.invalidArgument, "fine-tuning needs training labels, or distillation from the original model")
        }
        let trainer = try Trainer(model: model, configuration: configuration)
        var losses: [Double] = []
        let cache = TeacherLogitsCache()
        for epoch in 0..<epochs {
            let report = try trainer.trainEpoch(epoch, data: data.samples, labels: data.labels, teacher: teacher.map { session in
                { batch in TeacherOutputs(logits: try session.firstOutput(batch)) }
            }, teacherCache: cache) { [trainingProgress] step, steps, loss in trainingProgress?(epoch, epochs, step, steps, loss) }
            losses.append(report.loss)
        }
        return (trainer.exportModel(), losses)
    }

    /// The first output of the model for every sample, in order (`[N, …]`).
    public func logits(_ session: InferenceSession, _ data: Dataset) throws -> Tensor {
        var values: [Float] = []
        var tail: [Int] = []
        for (batch, _) in data.batches(max(batchSize, 64)) {
            let z = try session.firstOutput(batch)
            tail = Array(z.shape.dropFirst())
            values += z.asFloats
        }
        return Tensor(shape: [data.count] + tail, floats: values)
    }

    /// Compares outputs of a compressed model with the base model's on `data` (with its labels, if any).
    public func evaluate(_ task: TaskKind, base: Tensor, compressed: Tensor, data: Dataset) throws -> TaskEvaluation {
        var e = TaskEvaluation(task: task)
        try e.add(base: base, compressed: compressed, labels: data.labels.map { $0.ints[...] })
        return e
    }

    /// Size, parameters and MACs (for one sample of `inputShapes`), and the task's figures from `evaluation`: of the
    /// compressed model, or with `compressed` false of the base model.
    public func figures(_ model: Model, evaluation: TaskEvaluation, compressed: Bool,
                        inputShapes: [String: (DataType, [Int])]? = nil) throws -> CompressionReport.Figures {
        let summary = try ModelSummary(model: model, inputShapes: inputShapes)
        let bytes = try ModelCoding.write(model).count
        var f = CompressionReport.Figures(bytes: bytes, parameters: summary.parameters, macs: summary.macs,
                                          accuracy: compressed ? evaluation.compressedAccuracy : evaluation.baseAccuracy,
                                          samples: evaluation.samples)
        f.meanIoU = compressed ? evaluation.compressedMeanIoU : evaluation.baseMeanIoU
        return f
    }

    public static func top1(_ z: Tensor) -> [Int] {
        let n = z.shape[0], c = z.count / max(n, 1)
        return (0..<n).map { r in
            let row = z.floats[(r * c)..<((r + 1) * c)]
            return row.firstIndex(of: row.max()!)! - row.startIndex
        }
    }

    /// Mean over samples of KL(softmax(p) ‖ softmax(q)).
    public static func klDivergence(_ p: Tensor, _ q: Tensor) -> Double {
        let n = p.shape[0], c = p.count / max(n, 1)
        var total = 0.0
        for r in 0..<n {
            func logSoftmax(_ z: ArraySlice<Float>) -> [Double] {
                let m = Double(z.max()!)
                let s = log(z.reduce(0.0) { $0 + exp(Double($1) - m) }) + m
                return z.map { Double($0) - s }
            }
            let lp = logSoftmax(p.floats[(r * c)..<((r + 1) * c)]), lq = logSoftmax(q.floats[(r * c)..<((r + 1) * c)])
            for k in 0..<c { total += exp(lp[k]) * (lp[k] - lq[k]) }
        }
        return total / Double(max(n, 1))
    }
}

/// A duration in seconds.
public func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
}
