import WhittleNN
import WhittleONNX
import WhittleTensor

/// The collecting half of calibration (what a worker runs on its data): observes every float activation of a
/// model during forward passes and accumulates mergeable statistics. Pass 1 collects per-tensor ranges; pass 2,
/// given the bin edges everyone shares, collects fixed-edge histograms of |x|.
public final class CalibrationCollector {
    public let session: InferenceSession
    /// The tensors observed: the graph input and every float node output, unless restricted (then the run stays
    /// fused, only those values kept whole).
    public let tensors: Set<String>
    let restricted: Bool
    public private(set) var ranges: [String: RangeStatistics] = [:]
    public private(set) var histograms: [String: Histogram] = [:]
    public private(set) var samples = 0
    /// Pass 1 keeps the observed values while they fit in this many bytes, so pass 2 bins them without running
    /// the model again (0: never keep).
    public let retainBytes: Int
    var retained: [(String, [Float])]? = []
    var retainedBytes = 0
    /// The samples pass 1 will see, when known: once the first batch shows the bytes per sample, values that will
    /// not fit in `retainBytes` are not kept at all (instead of being copied until the limit is passed).
    public var expectedSamples: Int?

    public init(session: InferenceSession, tensors: Set<String>? = nil, retainBytes: Int = 0) {
        self.session = session
        self.retainBytes = retainBytes
        restricted = tensors != nil
        if let tensors {
            self.tensors = tensors
        } else {
            var names = Set(session.model.graph.runtimeInputs.filter { $0.tensorType?.0.isFloatingPoint == true }.map(\.name))
            for node in session.model.graph.nodes { names.formUnion(node.outputs.filter { !$0.isEmpty }) }
            self.tensors = names
        }
    }

    /// Pass 1: adds a batch to the per-tensor ranges.
    public func collectRanges(_ batch: Tensor) throws { try collectRanges(Samples(batch)) }

    /// Pass 1 for a batch of samples of every input.
    public func collectRanges(_ batch: Samples) throws {
        try observe(batch) { name, value in
            var r = self.ranges[name] ?? RangeStatistics()
            try r.add(value.floats)
            self.ranges[name] = r
            if self.retained != nil {
                self.retainedBytes += value.count * 4
                if self.retainedBytes <= self.retainBytes { self.retained!.append((name, value.floats)) } else { self.retained = nil }
            }
        }
        samples += batch.count
        if let expected = expectedSamples, retained != nil, samples > 0,
           retainedBytes.multipliedReportingOverflow(by: expected).partialValue / samples > retainBytes || retainedBytes > retainBytes {
            retained = nil
        }
    }

    /// True when pass 1 kept every observed value (see `retainBytes`): `collectRetainedHistograms` then replaces
    /// running pass 2 over the data.
    public var retainedEverything: Bool { retained != nil && retainBytes > 0 }

    /// Pass 2 from the values pass 1 kept; releases them.
    public func collectRetainedHistograms() throws {
        guard let values = retained, retainBytes > 0 else {
            throw CompressionError(.invalidArgument, "pass 1 did not keep its values; run pass 2 over the data")
        }
        for (name, floats) in values {
            guard var h = histograms[name] else { continue }
            try h.add(floats)
            histograms[name] = h
        }
        retained = nil
    }

    /// Starts pass 2 with shared edges: a |x| histogram over [0, upper] per tensor (`upper` is the merged absMax).
    /// `signed`: histograms of x over [−upper, upper] rather than of |x| over [0, upper].
    public func beginHistograms(upperBounds: [String: Float], binCount: Int = Histogram.defaultBinCount, signed: Bool = false) throws {
        histograms = [:]
        for (name, upper) in upperBounds {
            histograms[name] = try Histogram(lower: signed ? -upper : 0, upper: upper, binCount: binCount, magnitudes: !signed)
        }
    }

    /// Pass 2: adds a batch to the histograms started by `beginHistograms`.
    public func collectHistograms(_ batch: Tensor) throws { try collectHistograms(Samples(batch)) }

    /// Pass 2 for a batch of samples of every input.
    public func collectHistograms(_ batch: Samples) throws {
        try observe(batch) { name, value in
            guard var h = self.histograms[name] else { return }
            try h.add(value.floats)
            self.histograms[name] = h
        }
    }

    func observe(_ batch: Samples, _ body: @escaping (String, Tensor) throws -> Void) throws {
        for (name, value) in try batch.feed(session.model.graph) where tensors.contains(name) && value.dtype.isFloatingPoint {
            try body(name, value)
        }
        let wanted = tensors
        _ = try session.run(batch, observing: restricted ? wanted : nil) { node, outputs in
            for (name, value) in zip(node.outputs, outputs) where wanted.contains(name) && value.dtype == .float {
                do {
                    try body(name, value)
                } catch let error as CompressionError {
                    throw CompressionError(error.code, "\(node.label), output '\(name)': \(error.message)")
                }
            }
        }
    }
}

extension ChannelStatistics {
    /// Runs `batch` and adds each observed tensor's per-channel statistics (axis 1) to `channels`: activation
    /// importance, and the batch-norm statistics passes of rounds.
    /// Tensors in `lastAxis` carry their channels on the last axis (`[N, S, D]` features): each position counts as
    /// a sample.
    public static func collect(_ session: InferenceSession, _ batch: Samples, tensors: Set<String>, lastAxis: Set<String> = [],
                               into channels: inout [String: ChannelStatistics]) throws {
        var gathered = channels
        _ = try session.run(batch, observing: tensors) { node, outputs in
            for (name, value) in zip(node.outputs, outputs) where tensors.contains(name) {
                let shape = lastAxis.contains(name) && value.rank >= 2 ? [value.count / value.shape.last!, value.shape.last!] : value.shape
                var s = gathered[name] ?? ChannelStatistics(channels: shape[1])
                do {
                    try s.add(value.floats, shape: shape)
                } catch let error as CompressionError {
                    throw CompressionError(error.code, "\(node.label), output '\(name)': \(error.message)")
                }
                gathered[name] = s
            }
        }
        channels = gathered
    }
}

/// The collecting half of data-driven channel importance (what a worker runs on its data): per-channel activation
/// statistics of each group's statistics tensor (activation, APoZ), or per-parameter gradient sums (Taylor).
/// Gradients are taken with batch normalization frozen (running statistics), so sums over disjoint parts of the
/// data add up to the sum over the whole. Without labels, the loss is cross-entropy against the unpruned model's
/// top-1 prediction: distillation's gradient vanishes while the student still equals its teacher.
public final class ImportanceCollector {
    public let criterion: ImportanceCriterion
    public let groups: ChannelGroups
    public private(set) var statistics = ImportanceStatistics()
    let session: InferenceSession
    let teacher: InferenceSession?
    var trainer: Trainer?
    let batchSize: Int

    /// What the model's output means (nil: inferred from its shape): Taylor importance without labels needs class
    /// scores or per-pixel class scores.
    let task: TaskKind?

    public init(model: Model, groups: ChannelGroups, criterion: ImportanceCriterion, teacher: Model? = nil,
                batchSize: Int = 32, task: TaskKind? = nil) throws {
        self.criterion = criterion
        self.task = task
        self.groups = groups
        self.batchSize = batchSize
        session = try InferenceSession(model: model)
        self.teacher = try teacher.map { try InferenceSession(model: $0) }
        if criterion == .taylor {
            var configuration = TrainingConfiguration()
            configuration.batchSize = batchSize
            configuration.batchNorm = .frozen
            configuration.learningRate = 0
            configuration.task = task
            trainer = try Trainer(model: model, configuration: configuration)
        }
    }

    /// Adds a batch (`labels` optional).
    public func collect(_ batch: Samples, labels: ArraySlice<Int64>? = nil) throws {
        switch criterion {
        case .activation, .apoz:
            try ChannelStatistics.collect(session, batch, tensors: Set(groups.prunable.compactMap(\.statisticsTensor)),
                                          lastAxis: Set(groups.prunable.filter(\.statisticsOnLastAxis).compactMap(\.statisticsTensor)),
                                          into: &statistics.channels)
        case .taylor:
            var y = labels
            if y == nil { y = try Self.pseudoLabels(try (teacher ?? session).firstOutput(batch), task: task) }
            let (loss, _) = try trainer!.gradients(batch, labels: y, accumulate: true, nodeOutputs: false)
            guard loss.loss.isFinite else {
                throw CompressionError(.invalidStatistics, "the loss is not finite on this batch; the data or model is broken")
            }
            statistics.gradientSums = trainer!.gradientSums
        default:
            break
        }
        statistics.samples += batch.count
    }

    /// The unpruned model's top class per sample (classifier logits `[N, K]`) or per pixel (segmentation logits
    /// `[N, K, H, W]`): the targets of label-free Taylor importance. Other outputs (detection heads, embeddings,
    /// regression) have no class to take, and their distillation loss and its gradient are zero while the student
    /// equals its teacher.
    static func pseudoLabels(_ z: Tensor, task: TaskKind? = nil) throws -> ArraySlice<Int64> {
        switch task ?? TaskKind.inferred(outputShape: z.shape) {
        case .classification:
            guard z.rank >= 1, z.count > 0 else { throw CompressionError(.invalidArgument, "the model's output \(z.shape) holds no class scores") }
            return ArraySlice(LocalCompression.top1(z).map { Int64($0) })
        case .segmentation:
            guard z.rank == 4, z.shape[1] >= 2 else {
                throw CompressionError(.invalidArgument, "segmentation needs per-pixel class scores [N, classes, H, W]; the model gives \(z.shape)")
            }
            let (n, c, hw) = (z.shape[0], z.shape[1], z.shape[2] * z.shape[3])
            var out = [Int64](repeating: 0, count: n * hw)
            for b in 0..<n {
                for p in 0..<hw {
                    var best = 0
                    for k in 1..<c where z.floats[(b * c + k) * hw + p] > z.floats[(b * c + best) * hw + p] { best = k }
                    out[b * hw + p] = Int64(best)
                }
            }
            return out[...]
        case let task:
            throw CompressionError(.invalidArgument,
                "Taylor importance without labels needs a classifier or a segmenter; this model's output \(z.shape) is taken as \(task.rawValue): use --importance activation, l1 or l2")
        }
    }

    /// Adds all of `data` in batches.
    public func collect(data: Dataset) throws {
        for (batch, range) in data.batches(batchSize) { try collect(batch, labels: data.labels(range)) }
    }
}
