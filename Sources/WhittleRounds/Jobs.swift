import Foundation
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittlePrivacy
import WhittleProtocol
import WhittleTensor

/// What a worker computes for a task, on its local data. Pure: models and data in, a report out (the agent
/// downloads, times and uploads). Only mergeable statistics and deltas leave: never samples, labels or logits.
public enum WorkerJobs {
    /// EWC's inputs, as the coordinator publishes them.
    public struct EWC: Sendable {
        public var lambda: Float
        public var fisher: [String: Tensor]
        public var reference: [String: Tensor]

        public init(lambda: Float, fisher: [String: Tensor], reference: [String: Tensor]) {
            self.lambda = lambda
            self.fisher = fisher
            self.reference = reference
        }
    }

    /// Runs `task` (any worker kind but distribution, which is the agent's download) and returns its result.
    /// `model` is the task's model, `teacher` the round's base model.
    public static func run(_ task: Whittle_Task, model: Model, teacher: Model?, ewc: EWC? = nil, data: Dataset,
                           batchSize: Int, compressor: inout DeltaCompressor, latency: LatencyProbe? = nil,
                           latencyTables: any LatencyTableKeeping = LatencyTableCache.process) throws -> Whittle_TaskReport {
        var fresh: Optimizer.State?
        return try run(task, model: model, teacher: teacher, ewc: ewc, data: data, batchSize: batchSize, compressor: &compressor,
                       optimizerState: &fresh, latency: latency, latencyTables: latencyTables)
    }

    /// As above; `optimizerState` is the local optimizer's state from this worker's previous fine-tuning round of the
    /// round, continued when the task asks for it, and replaced by the state this task ends with. `teacherCache`
    /// keeps the teacher's logits of `data` across distillation tasks; the caller keeps one per teacher and data set.
    /// `latency` times the base and the compressed model in evaluation (the agent's clock); without it the report
    /// has no latency.
    public static func run(_ task: Whittle_Task, model: Model, teacher: Model?, ewc: EWC? = nil, data: Dataset,
                           batchSize: Int, compressor: inout DeltaCompressor,
                           optimizerState: inout Optimizer.State?,
                           teacherCache: TeacherLogitsCache? = nil, latency: LatencyProbe? = nil,
                           latencyTables: any LatencyTableKeeping = LatencyTableCache.process) throws -> Whittle_TaskReport {
        var secure: SecureAggregationClient?
        return try run(task, model: model, teacher: teacher, ewc: ewc, data: data, batchSize: batchSize, compressor: &compressor,
                       optimizerState: &optimizerState, teacherCache: teacherCache, latency: latency, latencyTables: latencyTables,
                       secure: &secure)
    }

    /// As above, with this worker's secrets of the round's secure-aggregation session (made by the key task, used and
    /// kept by the tasks after it). In a secure round the report of a securely summed phase leaves as a masked vector.
    public static func run(_ task: Whittle_Task, model: Model, teacher: Model?, ewc: EWC? = nil, data: Dataset,
                           batchSize: Int, compressor: inout DeltaCompressor,
                           optimizerState: inout Optimizer.State?,
                           teacherCache: TeacherLogitsCache? = nil, latency: LatencyProbe? = nil,
                           latencyTables: any LatencyTableKeeping = LatencyTableCache.process,
                           secure: inout SecureAggregationClient?) throws -> Whittle_TaskReport {
        guard let kind = PhaseKind(rawValue: task.kind), !kind.handler.downloadsModel else {
            throw CompressionError(.invalidArgument, "task kind '\(task.kind)' is not computed by WorkerJobs")
        }
        var job = WorkerJob(task: task, model: model, teacher: teacher, ewc: ewc, data: data, batchSize: batchSize,
                            compressor: compressor, optimizerState: optimizerState, teacherCache: teacherCache, latency: latency,
                            latencyTables: latencyTables)
        job.secure = secure
        var report = try kind.handler.run(&job)
        if task.hasSecure, RoundPlan.securelySummed.contains(kind) { report = try SecurePhases.mask(report, job: &job) }
        compressor = job.compressor
        optimizerState = job.optimizerState
        secure = job.secure
        return report
    }

    /// Local epochs from the task's model; the delta of every float initializer (parameters and running
    /// statistics), float or int8 with error feedback.
    static func finetune(_ task: Whittle_Task, model: Model, teacher: Model?, ewc: EWC?, data: Dataset, batchSize: Int,
                         compressor: inout DeltaCompressor, optimizerState: inout Optimizer.State?,
                         teacherCache: TeacherLogitsCache? = nil) throws -> Whittle_WeightUpdate {
        var configuration = TrainingConfiguration()
        configuration.epochs = Int(task.localEpochs)
        configuration.batchSize = batchSize
        configuration.learningRate = task.learningRate
        if !task.epochLearningRates.isEmpty {
            guard task.epochLearningRates.count == max(1, Int(task.localEpochs)),
                task.epochLearningRates.allSatisfy({ $0.isFinite && $0 >= 0 }) else {
                throw CompressionError(.invalidArgument, "the task gives \(task.epochLearningRates.count) epoch learning rates for \(task.localEpochs) local epochs, or rates that are not finite and non-negative")
            }
            configuration.schedule = .perEpoch(task.epochLearningRates)
        }
        configuration.seed = task.seed
        if !task.optimizer.isEmpty {
            guard let optimizer = LocalOptimizer(rawValue: task.optimizer) else {
                throw CompressionError(.invalidArgument, "the task asks for optimizer '\(task.optimizer)', which this worker does not know")
            }
            configuration.optimizer = optimizer.kind
        }
        if !task.augmentation.isEmpty {
            guard let augmentation = Augmentation(rawValue: task.augmentation) else {
                throw CompressionError(.invalidArgument, "the task asks for augmentation '\(task.augmentation)', which this worker does not know")
            }
            configuration.augmentation = augmentation
        }
        let teacherSession = try (task.distill ? teacher : nil).map { try InferenceSession(model: $0) }
        // The loss follows the model's output (per-pixel for segmenters, relative MSE for detection heads…).
        let kind = try taskKind(task, model: model, data: data)
        configuration.task = kind
        if teacherSession != nil {
            configuration.distillation = (kind.distillationTemperature, data.labels == nil ? 1 : 0.5)
        }
        guard data.labels != nil || teacherSession != nil else {
            throw CompressionError(.invalidArgument, "fine-tuning needs labels on this worker, or a round with --distill")
        }
        if let ewc { configuration.ewc = (ewc.lambda, ewc.reference, ewc.fisher) }
        if task.kind == PhaseKind.qat.rawValue {
            configuration.weightQuantization = (.int8, task.perChannel)
            configuration.weightReduceRange = task.reduceRange
            let outputs = Set(model.graph.nodes.flatMap(\.outputs))
            let range = try QuantizationParameters.range(.uint8, symmetric: false)
            for (name, low) in task.activationMin where outputs.contains(name) {
                guard let high = task.activationMax[name], low.isFinite, high.isFinite, low <= high else {
                    throw CompressionError(.invalidArgument, "the task's activation range for '\(name)' is not a finite interval")
                }
                let p = try QuantizationParameters.compute(min: low, max: high, range: range, symmetric: false)
                configuration.activationQuantization[name] = FakeQuantization(parameters: [p], axis: nil, range: range)
            }
        }
        let trainer = try Trainer(model: model, configuration: configuration)
        if task.keepOptimizerState, let state = optimizerState { trainer.restoreOptimizer(state, kind: configuration.optimizer) }
        var loss = 0.0
        for epoch in 0..<max(1, Int(task.localEpochs)) {
            let epochReport = try trainer.trainEpoch(epoch, data: data.samples, labels: data.labels, teacher: teacherSession.map { session in
                { batch in TeacherOutputs(logits: try session.firstOutput(batch)) }
            }, teacherCache: teacherCache ?? TeacherLogitsCache())
            guard epochReport.loss.isFinite else {
                throw CompressionError(.invalidStatistics, "the training loss became non-finite in local epoch \(epoch + 1)")
            }
            loss = epochReport.loss
        }
        let tuned = trainer.exportModel()
        optimizerState = task.keepOptimizerState ? trainer.optimizerState : nil
        var deltas: [String: Tensor] = [:]
        for (name, _) in updateShapes(model) {
            guard let old = model.graph.initializer(named: name)?.tensor, let new = tuned.graph.initializer(named: name)?.tensor else {
                continue
            }
            deltas[name] = Tensor(shape: old.shape, floats: zip(new.floats, old.floats).map(-))
        }
        var update = Whittle_WeightUpdate()
        update.samples = UInt64(data.count)
        update.loss = loss
        if task.compressDeltas {
            for (name, c) in compressor.compress(deltas) {
                var q = Whittle_QuantizedTensor()
                q.shape = c.shape.map { Int64($0) }
                q.scale = c.scale
                q.values = Data(c.values.map { UInt8(bitPattern: $0) })
                update.compressedDeltas[name] = q
            }
        } else {
            update.deltas = deltas.mapValues(Whittle_FloatTensor.init)
        }
        return update
    }

    /// The task's kind: the plan's, or inferred from the model's output for this data's shapes.
    static func taskKind(_ task: Whittle_Task, model: Model, data: Dataset) throws -> TaskKind {
        guard !task.taskKind.isEmpty else { return TaskKind.inferred(model: model, samples: data.samples) }
        guard let kind = TaskKind(rawValue: task.taskKind) else {
            throw CompressionError(.invalidArgument, "the task names task kind '\(task.taskKind)', which this worker does not know")
        }
        return kind
    }

    /// Top-1 classes of the model's outputs (classifiers), for label-free Fisher sums.
    static func pseudoLabels(model: Model, data: Dataset, batchSize: Int) throws -> Tensor {
        let session = try InferenceSession(model: model)
        var labels: [Int64] = []
        for (batch, _) in data.batches(batchSize) {
            let z = try session.firstOutput(batch)
            guard z.rank == 2 else {
                throw CompressionError(.invalidArgument, "EWC's Fisher information without labels takes the model's top class, and this model's output \(z.shape) is not classifier logits [N, classes]; give the workers labels")
            }
            labels += LocalCompression.top1(z).map { Int64($0) }
        }
        return Tensor(shape: [labels.count], ints: labels)
    }

    /// Accuracy or agreement of both models on the worker's data; with a probe, their latency at batch 1 and at the
    /// working batch (when larger), with the threads and instruction set it was measured on.
    static func evaluate(base: Model, compressed: Model, data: Dataset, batchSize: Int, task: TaskKind,
                         latency: LatencyProbe?) throws -> Whittle_EvaluationReport {
        var local = LocalCompression()
        local.batchSize = batchSize
        let baseSession = try InferenceSession(model: base), compressedSession = try InferenceSession(model: compressed)
        let evaluation = try local.evaluate(task, base: try local.logits(baseSession, data),
                                            compressed: try local.logits(compressedSession, data), data: data)
        var out = Whittle_EvaluationReport(evaluation)
        guard let latency, data.count > 0 else { return out }
        let batches = Set([1, min(batchSize, data.count)]).sorted()
        for batch in batches {
            let measured = try latency.compare(baseSession, compressedSession, samples: data.samples, batch: batch)
            out.latency.append(Whittle_LatencyFigures(measured))
        }
        out.baseLatencyMs = out.latency[0].baseP50Ms
        out.compressedLatencyMs = out.latency[0].compressedP50Ms
        out.threads = UInt32(ComputeThreads.current)
        out.cpu = Kernels.cpuInstructionSet
        return out
    }

    /// The batch size for a job: the plan's, or less when the worker's memory budget (the engine's estimate of
    /// peak activations plus weights; training takes about three times inference) does not hold it.
    /// `data` gives the inputs' sizes (a sequence length) where the model leaves them free.
    public static func batchSize(model: Model, planned: Int, memoryLimit: Int?, training: Bool, data: Dataset? = nil) throws -> Int {
        guard let memoryLimit, memoryLimit > 0 else { return planned }
        let session = try InferenceSession(model: model)
        guard let fitting = try session.largestBatch(fittingIn: training ? memoryLimit / 3 : memoryLimit, limit: max(planned, 1),
                                                     sampleShapes: try data.map { try $0.samples.sampleShapes(for: model.graph) }) else {
            throw CompressionError(.invalidArgument, "the memory limit (\(memoryLimit) bytes) does not hold even one sample of this model")
        }
        return min(planned, fitting)
    }
}
