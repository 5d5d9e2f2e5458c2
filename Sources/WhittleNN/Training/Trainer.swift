import WhittleONNX
import WhittleTensor

/// What a training run does. Units and defaults are PyTorch's where a PyTorch equivalent exists.
public struct TrainingConfiguration: Sendable {
    public var epochs: Int = 1
    public var batchSize: Int = 32
    /// Base learning rate (before the schedule).
    public var learningRate: Float = 0.01
    public var optimizer: OptimizerKind = .sgd(momentum: 0.9, nesterov: false, weightDecay: 0)
    public var schedule: LearningRateSchedule = .constant
    /// Clip the global gradient norm to this value (nil: no clipping).
    public var clipNorm: Float?
    /// Seeds data order and dropout masks.
    public var seed: UInt64 = 0
    public var batchNorm: BatchNormMode = .train
    /// Distillation temperature and weight; the caller provides teacher logits per batch.
    public var distillation: (temperature: Float, alpha: Float)?
    /// What the first output means (its loss); nil: inferred from its shape (`TaskKind.inferred`).
    public var task: TaskKind?
    /// FitNets hints: MSE between a teacher feature map and a 1×1 projection of the student's, per pair
    /// (teacher tensor, student tensor), weighted by `hintWeight`. The projections train with the student and are
    /// not exported.
    public var hints: [(teacher: String, student: String)] = []
    public var hintWeight: Float = 1
    /// EWC regularisation towards reference weights with a diagonal Fisher estimate.
    public var ewc: (lambda: Float, reference: [String: Tensor], fisher: [String: Tensor])?
    /// Quantization-aware training: fake-quantize Conv/Gemm/MatMul weights every step (symmetric, from the current
    /// weights' range; per output channel when `perChannel`).
    public var weightQuantization: (type: DataType, perChannel: Bool)?
    /// 7-bit weight fake quantization (onnxruntime's reduce_range), as the export will store them.
    public var weightReduceRange = false
    /// Quantization-aware training: fixed fake quantizers for node outputs (activation ranges from calibration).
    public var activationQuantization: [String: FakeQuantization] = [:]
    /// Per-parameter 0/1 masks (same shape as the parameter) that keep pruned channels at zero.
    public var masks: [String: Tensor] = [:]
    /// Use oneDNN/GEMM kernels (true) or the reference loops.
    public var fast = true
    /// Random transforms of each training sample (the teacher sees the transformed sample too).
    public var augmentation: Augmentation = .none

    public init() {}
}

/// Label-preserving random transforms of training images (`N×C×H×W`), drawn per sample from the trainer's seeded
/// generator.
public enum Augmentation: String, Sendable, Codable, CaseIterable {
    case none
    /// Horizontal and vertical flips.
    case flips
    /// One of the eight symmetries of the square (flips, 90° rotations and transposes), uniformly: for images with
    /// no orientation, such as surface defects. Needs square images.
    case dihedral

    /// Checks that samples of `shape` (with the batch axis) can be transformed.
    public func check(_ shape: [Int]) throws {
        guard self != .none else { return }
        guard shape.count == 4 else {
            throw ONNXError(.invalidInput, "'\(rawValue)' augmentation needs N×C×H×W images; the data has shape \(shape)")
        }
        if self == .dihedral, shape[2] != shape[3] {
            throw ONNXError(.invalidInput, "'dihedral' augmentation needs square images; the data is \(shape[2])×\(shape[3]) (use 'flips')")
        }
    }

    /// Appends `sample` (`C×H×W` values) transformed by symmetry `k` (bit 0: flip columns, bit 1: flip rows,
    /// bit 2: transpose first) to `out`.
    package static func append(_ sample: ArraySlice<Float>, channels: Int, height: Int, width: Int, symmetry k: Int,
                       to out: inout [Float]) {
        let transpose = k & 4 != 0, flipColumns = k & 1 != 0, flipRows = k & 2 != 0
        let base = sample.startIndex, plane = height * width
        for c in 0..<channels {
            let origin = base + c * plane
            for i in 0..<height {
                for j in 0..<width {
                    let r = flipRows ? height - 1 - i : i, q = flipColumns ? width - 1 - j : j
                    out.append(sample[origin + (transpose ? q * width + r : r * width + q)])
                }
            }
        }
    }
}

/// What the teacher model gives for a batch: its logits and the feature maps hints are taken at.
public struct TeacherOutputs: Sendable {
    public var logits: Tensor
    public var features: [String: Tensor]
    public init(logits: Tensor, features: [String: Tensor] = [:]) {
        self.logits = logits
        self.features = features
    }
}

/// The teacher's logits for training samples, each under each augmentation symmetry, kept across epochs and across
/// trainers: a fixed teacher gives a (sample, symmetry) the same logits every time, so it runs once per pair instead
/// of once per step. Valid for one teacher and one data set; the owner drops it when either changes.
public final class TeacherLogitsCache: @unchecked Sendable {
    var rows: [Int: [Float]] = [:]
    var classes: [Int]?
    /// Samples the teacher has been run on (for tests and logs).
    public private(set) var computed = 0

    public init() {}

    /// Logits for the batch `x`, whose row r is sample `keys[r]` (index × 8 + symmetry): cached rows are copied,
    /// the others run through `teacher` as one smaller batch and are kept.
    func logits(keys: [Int], batch x: Samples, teacher: (Samples) throws -> Tensor) throws -> Tensor {
        let missing = keys.indices.filter { rows[keys[$0]] == nil }
        if !missing.isEmpty {
            let out = try teacher(x.rows(missing))
            guard out.shape.first == missing.count, out.count % max(missing.count, 1) == 0 else {
                throw ONNXError(.invalidInput, "the teacher gave logits of shape \(out.shape) for \(missing.count) samples")
            }
            let tail = Array(out.shape.dropFirst())
            guard classes == nil || classes == tail else {
                throw ONNXError(.invalidInput, "the teacher gave logits of shape \(tail) per sample, earlier \(classes!)")
            }
            classes = tail
            let width = out.count / missing.count
            for (k, r) in missing.enumerated() { rows[keys[r]] = Array(out.floats[(k * width)..<((k + 1) * width)]) }
            computed += missing.count
        }
        var values: [Float] = []
        for key in keys { values += rows[key]! }
        return Tensor(shape: [keys.count] + (classes ?? []), floats: values)
    }
}

/// Per-epoch figures.
public struct EpochReport: Codable, Sendable {
    public var epoch: Int
    public var loss: Double
    public var accuracy: Double
    public var learningRate: Float
    public var samples: Int
    public var validationAccuracy: Double?
    public var validationLoss: Double?
}

/// Trains a model's parameters on batches: forward, loss, backward, optimizer step; keeps per-parameter gradient
/// sums and sample counts (what federated rounds upload) and exports the trained ONNX model.
public final class Trainer: @unchecked Sendable {
    public let model: Model
    public let configuration: TrainingConfiguration
    public private(set) var parameters: [String: Tensor]
    /// BatchNormalization running statistics by initializer name.
    public private(set) var runningStatistics: [String: Tensor] = [:]
    /// Σ over samples of ∂L/∂θ (batch gradients times batch sizes), by parameter.
    public private(set) var gradientSums: [String: Tensor] = [:]
    public private(set) var samplesSeen = 0
    /// Hint projections `[C_teacher, C_student]` by student tensor name.
    public private(set) var hintProjections: [String: Tensor] = [:]
    public private(set) var stepsTaken = 0
    public let parameterNames: [String]
    var optimizer: Optimizer
    /// Training graphs by the shapes of the runtime inputs (in the model's input order).
    var graphs: [[[Int]]: TrainingGraph] = [:]
    var rng: SplitMix64

    public init(model: Model, configuration: TrainingConfiguration) throws {
        guard configuration.epochs >= 0, configuration.batchSize >= 1, configuration.learningRate >= 0 else {
            throw ONNXError(.invalidInput, "training needs epochs ≥ 0, batch size ≥ 1 and a non-negative learning rate")
        }
        self.model = model
        self.configuration = configuration
        optimizer = Optimizer(configuration.optimizer)
        rng = SplitMix64(seed: configuration.seed)
        let (parameterNames, statistics) = TrainingGraph.trainables(model)
        guard !parameterNames.isEmpty else {
            throw ONNXError(.invalidGraph, "the model has no trainable parameters (no float initializers feed Conv, Gemm, MatMul, BatchNormalization…)")
        }
        self.parameterNames = parameterNames
        // Models whose inputs have only a free batch axis are prepared (and checked) now; others (a free sequence
        // length) at the first batch.
        if let shapes = try? ShapeInference.inputShapes(model, batchSize: configuration.batchSize) {
            let graph = try TrainingGraph(model: model, inputs: shapes, fast: configuration.fast,
                                          plainValues: Self.plainValues(configuration), batchNorm: configuration.batchNorm)
            graphs[model.graph.runtimeInputs.map { shapes[$0.name]!.1 }] = graph
        }
        var parameters: [String: Tensor] = [:]
        let index = model.graph.initializerIndex
        for name in parameterNames { parameters[name] = model.graph.initializers[index[name]!].tensor! }
        for (_, stats) in statistics {
            for name in [stats.0, stats.1] {
                if let i = index[name], let t = model.graph.initializers[i].tensor { runningStatistics[name] = t }
            }
        }
        for (name, mask) in configuration.masks {
            guard let p = parameters[name] else { throw ONNXError(.invalidInput, "mask for '\(name)', which is not a trainable parameter") }
            guard mask.shape == p.shape else {
                throw ONNXError(.shapeMismatch, "mask for '\(name)' has shape \(mask.shape), the parameter \(p.shape)")
            }
            parameters[name] = Tensor(shape: p.shape, floats: zip(p.floats, mask.floats).map(*))
        }
        self.parameters = parameters
    }

    /// The optimizer's state, to continue from in a later trainer (`restoreOptimizer`).
    public var optimizerState: Optimizer.State { optimizer.state }

    /// Continues the optimizer from `state` (buffers of parameters whose sizes changed are dropped). Only for the
    /// same optimizer kind: a state from another kind is ignored.
    public func restoreOptimizer(_ state: Optimizer.State, kind: OptimizerKind) {
        guard kind == configuration.optimizer else { return }
        optimizer.restore(state, sizes: parameters.mapValues(\.count))
    }

    /// The training graph for a batch fed to the model's inputs (built on first use for its shapes).
    func graph(_ fed: [String: Tensor]) throws -> TrainingGraph {
        let key = model.graph.runtimeInputs.map { fed[$0.name]!.shape }
        if let g = graphs[key] { return g }
        for info in model.graph.runtimeInputs {
            let t = fed[info.name]!
            if let declared = info.tensorType?.0, declared.isFloatingPoint != t.dtype.isFloatingPoint {
                throw ONNXError(.invalidInput, "input '\(info.name)' expects \(declared) data, got \(t.dtype)")
            }
        }
        let g = try TrainingGraph(model: model, inputs: Samples.shapes(fed, for: model.graph), fast: configuration.fast,
                                  plainValues: Self.plainValues(configuration), batchNorm: configuration.batchNorm)
        graphs[key] = g
        return g
    }

    /// Forward and backward on one batch without updating: returns the loss and the gradients of every parameter
    /// and, with `nodeOutputs`, of every node output (in NCHW order, converted from blocked layouts), and adds the
    /// parameter gradients to `gradientSums`.
    public func gradients(_ x: Tensor, labels: ArraySlice<Int64>?, teacher: TeacherOutputs? = nil,
                          accumulate: Bool = true, nodeOutputs: Bool = true) throws -> (LossResult, [String: Tensor]) {
        try gradients(Samples(x), labels: labels, teacher: teacher, accumulate: accumulate, nodeOutputs: nodeOutputs)
    }

    /// `gradients` for a batch of samples of every input (token ids and attention masks, or images).
    public func gradients(_ batch: Samples, labels: ArraySlice<Int64>?, teacher: TeacherOutputs? = nil,
                          accumulate: Bool = true, nodeOutputs: Bool = true) throws -> (LossResult, [String: Tensor]) {
        let teacherLogits = teacher?.logits
        let fed = try batch.feed(model.graph)
        let graph = try graph(fed)
        var inputs = parameters
        for (name, value) in runningStatistics { inputs[name] = value }
        let tape = try graph.forward(inputs: fed, parameters: inputs, training: true, batchNorm: configuration.batchNorm,
                                     fakeQuantization: try fakeQuantizers(), rng: &rng)
        guard let logits = tape.value(graph.outputName) else { throw ONNXError(.invalidGraph, "the model produced no output") }
        var result: LossResult
        let task = configuration.task ?? TaskKind.inferred(outputShape: logits.shape)
        if let distillation = configuration.distillation {
            guard let teacherLogits else { throw ONNXError(.invalidInput, "distillation needs teacher logits") }
            switch task {
            case .classification:
                result = try Losses.distillation(student: logits, teacher: teacherLogits, labels: labels,
                                                 temperature: distillation.temperature, alpha: distillation.alpha)
            case .segmentation:
                result = try Losses.pixelDistillation(student: logits, teacher: teacherLogits, labels: labels,
                                                      temperature: distillation.temperature, alpha: distillation.alpha)
            case .detection, .regression:
                result = try Losses.meanSquared(student: logits, target: teacherLogits, fieldAxis: task.fieldAxis(outputShape: logits.shape))
            case .embedding: result = try Losses.cosineDistance(student: logits, teacher: teacherLogits)
            }
        } else {
            guard let labels else { throw ONNXError(.invalidInput, "training without a teacher needs labels") }
            switch task {
            case .classification: result = try Losses.softmaxCrossEntropy(logits: logits, labels: labels)
            case .segmentation:
                result = try Losses.pixelDistillation(student: logits, teacher: nil, labels: labels, temperature: 1, alpha: 0)
            case .detection, .regression, .embedding:
                throw ONNXError(.invalidInput, "training a \(task.rawValue) model needs a teacher (distillation); class labels do not apply to its output \(logits.shape)")
            }
        }
        var seeds = [graph.outputName: result.dLogits]
        var hintGradients: [String: Tensor] = [:]
        for pair in configuration.hints {
            guard let t = teacher?.features[pair.teacher] else {
                throw ONNXError(.invalidInput, "the teacher did not produce the hint tensor '\(pair.teacher)'")
            }
            guard let s = tape.value(pair.student) else {
                throw ONNXError(.invalidInput, "the student has no tensor '\(pair.student)' to take a hint at")
            }
            guard s.rank == 4, t.rank == 4, s.shape[0] == t.shape[0], s.shape[2...] == t.shape[2...] else {
                throw ONNXError(.shapeMismatch, "hint '\(pair.teacher)' \(t.shape) and '\(pair.student)' \(s.shape) need equal batch and spatial sizes")
            }
            let projection = try hintProjection(pair.student, teacherChannels: t.shape[1], studentChannels: s.shape[1])
            let (loss, dProjection, dStudent) = Losses.hint(student: s, teacher: t, projection: projection,
                                                            weight: configuration.hintWeight)
            result.loss += loss
            hintGradients[pair.student] = dProjection
            if let existing = seeds[pair.student] {
                seeds[pair.student] = Tensor(shape: s.shape, floats: zip(existing.floats, dStudent.floats).map(+))
            } else {
                seeds[pair.student] = dStudent
            }
        }
        var grads = try graph.backward(tape, seeds: seeds)
        for (student, g) in hintGradients { grads[Self.hintPrefix + student] = g }
        if let ewc = configuration.ewc {
            let (penalty, extra) = Losses.elasticWeightConsolidation(parameters: parameters, reference: ewc.reference,
                                                                     fisher: ewc.fisher, lambda: ewc.lambda)
            result.loss += penalty
            for (name, g) in extra {
                if let existing = grads[name] { grads[name] = Tensor(shape: g.shape, floats: zip(existing.floats, g.floats).map(+)) }
            }
        }
        for (name, mask) in configuration.masks {
            if let g = grads[name] { grads[name] = Tensor(shape: g.shape, floats: zip(g.floats, mask.floats).map(*)) }
        }
        if configuration.batchNorm == .train {
            for (node, stats) in graph.runningStatistics {
                guard let batch = tape.batchStatistics[node], let mean = runningStatistics[stats.mean],
                    let variance = runningStatistics[stats.variance] else { continue }
                // ONNX momentum m: running = m·running + (1 − m)·batch (PyTorch's momentum is 1 − m); the variance
                // folded in is the unbiased batch variance, as PyTorch does.
                let m = stats.momentum
                runningStatistics[stats.mean] = Tensor(shape: mean.shape, floats: zip(mean.floats, batch.mean).map { m * $0 + (1 - m) * $1 })
                runningStatistics[stats.variance] = Tensor(shape: variance.shape, floats: zip(variance.floats, batch.variance).map { m * $0 + (1 - m) * $1 })
            }
        }
        if accumulate {
            let n = Float(batch.count)
            for name in graph.parameterNames {
                guard let g = grads[name] else { continue }
                let scaled = g.floats.map { $0 * n }
                if let sum = gradientSums[name] {
                    gradientSums[name] = Tensor(shape: g.shape, floats: zip(sum.floats, scaled).map(+))
                } else {
                    gradientSums[name] = Tensor(shape: g.shape, floats: scaled)
                }
            }
            samplesSeen += batch.count
        }
        if nodeOutputs {
            for name in graph.blocked.keys { if let g = grads[name] { grads[name] = graph.plain(name, g) } }
        } else {
            let keep = Set(graph.parameterNames)
            grads = grads.filter { keep.contains($0.key) || $0.key.hasPrefix(Self.hintPrefix) }
        }
        return (result, grads)
    }

    static let hintPrefix = "whittle.hint/"

    /// Values the trainer itself reads or rewrites during a step, which must stay in NCHW order.
    static func plainValues(_ configuration: TrainingConfiguration) -> Set<String> {
        Set(configuration.hints.map(\.student)).union(configuration.activationQuantization.keys)
    }

    /// The 1×1 projection for a hint at `student`, created on first use (He initialisation, seeded).
    func hintProjection(_ student: String, teacherChannels: Int, studentChannels: Int) throws -> Tensor {
        if let p = hintProjections[student] {
            guard p.shape == [teacherChannels, studentChannels] else {
                throw ONNXError(.shapeMismatch, "hint projection for '\(student)' changed shape")
            }
            return p
        }
        var generator = SplitMix64(seed: configuration.seed ^ 0x4817)
        let std = (2 / Float(studentChannels)).squareRoot()
        let p = Tensor(shape: [teacherChannels, studentChannels],
                       floats: (0..<(teacherChannels * studentChannels)).map { _ in (generator.nextFloat() * 2 - 1) * std * 1.7320508 })
        hintProjections[student] = p
        return p
    }

    /// The fake quantizers for this step: weights from their current ranges, activations as configured.
    func fakeQuantizers() throws -> [String: FakeQuantization] {
        var quantizers = configuration.activationQuantization
        guard let (type, perChannel) = configuration.weightQuantization else { return quantizers }
        for (name, axis) in weightAxes {
            guard let w = parameters[name] else { continue }
            quantizers[name] = try FakeQuantization.fromRange(of: w, type: type, symmetric: true, axis: perChannel ? axis : nil,
                                                              reduceRange: configuration.weightReduceRange)
        }
        return quantizers
    }

    /// Weight parameters and their output-channel axis: Conv W axis 0, Gemm B axis 0 with transB = 1 (else 1),
    /// MatMul B axis 1 (ALGORITHMS.md).
    var weightAxes: [String: Int] {
        var axes: [String: Int] = [:]
        let trainable = Set(parameterNames)
        for node in model.graph.nodes where node.inputs.count > 1 && trainable.contains(node.inputs[1]) {
            switch node.opType {
            case "Conv": axes[node.inputs[1]] = 0
            case "Gemm": axes[node.inputs[1]] = (node.attribute("transB")?.value.int ?? 0) != 0 ? 0 : 1
            case "MatMul": axes[node.inputs[1]] = 1
            default: break
            }
        }
        return axes
    }

    /// One optimizer step on a batch; returns its loss. Throws (naming `epoch` and the step) when the loss is not finite.
    public func step(_ x: Tensor, labels: ArraySlice<Int64>?, teacher: TeacherOutputs? = nil, learningRate: Float,
                     epoch: Int = 0) throws -> LossResult {
        try step(Samples(x), labels: labels, teacher: teacher, learningRate: learningRate, epoch: epoch)
    }

    /// `step` on a batch of samples of every input.
    public func step(_ x: Samples, labels: ArraySlice<Int64>?, teacher: TeacherOutputs? = nil, learningRate: Float,
                     epoch: Int = 0) throws -> LossResult {
        let (result, all) = try gradients(x, labels: labels, teacher: teacher, nodeOutputs: false)
        guard result.loss.isFinite else {
            throw ONNXError(.invalidInput, "the loss became \(result.loss) at epoch \(epoch + 1), step \(stepsTaken + 1); lower the learning rate or check the data")
        }
        var grads: [String: Tensor] = [:]
        for name in parameterNames { if let g = all[name] { grads[name] = g } }
        for (name, g) in all where name.hasPrefix(Self.hintPrefix) { grads[name] = g }
        if let clip = configuration.clipNorm { clipGradients(&grads, maxNorm: clip) }
        var trainable = parameters
        for (student, p) in hintProjections { trainable[Self.hintPrefix + student] = p }
        optimizer.update(&trainable, gradients: grads, lr: learningRate)
        for name in parameterNames { parameters[name] = trainable[name] }
        for student in hintProjections.keys { hintProjections[student] = trainable[Self.hintPrefix + student] }
        for (name, mask) in configuration.masks {
            if let p = parameters[name] { parameters[name] = Tensor(shape: p.shape, floats: zip(p.floats, mask.floats).map(*)) }
        }
        stepsTaken += 1
        return result
    }

    /// One epoch over `data` in an order drawn from the seed. `teacher` gives teacher logits per batch;
    /// `progress(step, steps, runningLoss)` is called after each step.
    /// One pass over `data` in a random order, each sample under a random augmentation symmetry. With
    /// `teacherCache`, each (sample, symmetry) runs through the teacher once for the cache's lifetime; the cache
    /// keeps logits only, so it is not used when the configuration takes feature hints from the teacher.
    public func trainEpoch(_ epoch: Int, data: Tensor, labels: Tensor?, teacher: ((Tensor) throws -> TeacherOutputs)? = nil,
                           teacherCache: TeacherLogitsCache? = nil,
                           progress: ((Int, Int, Double) -> Void)? = nil) throws -> EpochReport {
        try trainEpoch(epoch, data: Samples(data), labels: labels, teacher: teacher.map { t in { try t($0.first) } },
                       teacherCache: teacherCache, progress: progress)
    }

    /// `trainEpoch` over samples of every input (augmentation applies to a single image input).
    public func trainEpoch(_ epoch: Int, data: Samples, labels: Tensor?, teacher: ((Samples) throws -> TeacherOutputs)? = nil,
                           teacherCache: TeacherLogitsCache? = nil,
                           progress: ((Int, Int, Double) -> Void)? = nil) throws -> EpochReport {
        let n = data.count
        // One label per sample, or one per pixel ([N, H, W] for segmentation).
        let perSample = labels.map { $0.count / max(n, 1) } ?? 1
        if let labels, labels.count != n * perSample || perSample < 1 {
            throw ONNXError(.invalidInput, "\(labels.count) labels for \(n) samples")
        }
        if perSample > 1 && configuration.augmentation != .none {
            throw ONNXError(.invalidInput, "--augment transforms images but not per-pixel labels; train segmentation without it")
        }
        if configuration.augmentation != .none, data.names.count > 1 {
            throw ONNXError(.invalidInput, "--augment transforms a single image input; this data has \(data.names.count) inputs")
        }
        let lr = configuration.schedule.rate(base: configuration.learningRate, epoch: epoch)
        try configuration.augmentation.check(data.first.shape)
        let order = rng.permutation(n)
        let steps = (n + configuration.batchSize - 1) / configuration.batchSize
        let symmetries = [Augmentation.none: 1, .flips: 4, .dihedral: 8][configuration.augmentation]!
        var lossSum = 0.0, correct = 0, counted = 0
        for s in 0..<steps {
            let indices = Array(order[(s * configuration.batchSize)..<min((s + 1) * configuration.batchSize, n)])
            var keys: [Int] = []
            keys.reserveCapacity(indices.count)
            let ks = indices.map { _ in symmetries > 1 ? Int(rng.next() % UInt64(symmetries)) : 0 }
            for (i, k) in zip(indices, ks) { keys.append(i * 8 + k) }
            var x = data.rows(indices)
            if symmetries > 1 {
                let images = data.first, sampleSize = images.count / max(n, 1)
                var values: [Float] = []
                values.reserveCapacity(indices.count * sampleSize)
                for (i, k) in zip(indices, ks) {
                    let sample = images.floats[(i * sampleSize)..<((i + 1) * sampleSize)]
                    if k == 0 {
                        values += sample
                    } else {
                        Augmentation.append(sample, channels: images.shape[1], height: images.shape[2], width: images.shape[3],
                                            symmetry: k, to: &values)
                    }
                }
                x = try Samples([(data.names[0], Tensor(shape: [indices.count] + Array(images.shape.dropFirst()), floats: values))])
            }
            let y = labels.map { l in ArraySlice(indices.flatMap { l.ints[($0 * perSample)..<(($0 + 1) * perSample)] }) }
            var teacherOutputs: TeacherOutputs?
            if let teacher {
                teacherOutputs = try (configuration.hints.isEmpty ? teacherCache : nil).map { cache in
                    TeacherOutputs(logits: try cache.logits(keys: keys, batch: x) { try teacher($0).logits })
                } ?? teacher(x)
            }
            let result = try step(x, labels: y, teacher: teacherOutputs, learningRate: lr, epoch: epoch)
            lossSum += result.loss * Double(indices.count)
            correct += result.correct
            counted += result.counted ?? indices.count
            progress?(s + 1, steps, lossSum / Double(min((s + 1) * configuration.batchSize, n)))
        }
        return EpochReport(epoch: epoch + 1, loss: lossSum / Double(n), accuracy: Double(correct) / Double(max(counted, 1)),
                           learningRate: lr, samples: n)
    }

    /// The diagonal empirical Fisher information for EWC: the mean over samples of each parameter's squared
    /// per-sample gradient of the loss, `F_i = (1/n) Σ_s (∂ℓ_s/∂θ_i)²`, computed one sample at a time with batch
    /// normalization frozen (batch statistics of one sample are degenerate). Returns the sums of squares and the
    /// sample count, which merge across workers by addition. Parameters are not changed.
    public func fisherSums(data: Tensor, labels: Tensor?, teacher: ((Tensor) throws -> TeacherOutputs)? = nil,
                           limit: Int? = nil) throws -> (sums: [String: Tensor], samples: Int) {
        try fisherSums(data: Samples(data), labels: labels, teacher: teacher.map { t in { try t($0.first) } }, limit: limit)
    }

    /// `fisherSums` over samples of every input.
    public func fisherSums(data: Samples, labels: Tensor?, teacher: ((Samples) throws -> TeacherOutputs)? = nil,
                           limit: Int? = nil) throws -> (sums: [String: Tensor], samples: Int) {
        let n = min(data.count, limit ?? data.count)
        var sums: [String: [Float]] = [:]
        var frozen = configuration
        frozen.batchNorm = .frozen
        frozen.batchSize = 1
        let single = try Trainer(model: exportModel(), configuration: frozen)
        for i in 0..<n {
            let x = data.rows(i..<(i + 1))
            // One label per sample, or one per pixel.
            let label = labels.map { l in
                let per = l.count / max(data.count, 1)
                return l.ints[(i * per)..<((i + 1) * per)]
            }
            let (_, grads) = try single.gradients(x, labels: label, teacher: try teacher?(x), accumulate: false)
            for name in single.parameterNames {
                guard let g = grads[name] else { continue }
                if sums[name] == nil { sums[name] = [Float](repeating: 0, count: g.count) }
                for k in 0..<g.count { sums[name]![k] += g.floats[k] * g.floats[k] }
            }
        }
        var out: [String: Tensor] = [:]
        for (name, values) in sums { out[name] = Tensor(shape: parameters[name]!.shape, floats: values) }
        return (out, n)
    }

    /// The model with trained parameters and updated running statistics written into its initializers.
    public func exportModel() -> Model {
        var out = model
        let index = out.graph.initializerIndex
        for (name, value) in parameters.merging(runningStatistics, uniquingKeysWith: { a, _ in a }) {
            if let i = index[name] { out.graph.initializers[i].setTensor(value) }
        }
        return out
    }
}
