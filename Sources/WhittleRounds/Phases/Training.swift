import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Workers: local epochs from the current model (fine-tuning after pruning, or quantization-aware fine-tuning with
/// fake-quantized weights and activations), reported as weight deltas; the coordinator merges them (FedAvg or a
/// robust aggregator, clipped), steps the server optimizer and stores the next model.
struct TrainingPhase: PhaseHandler {
    let kind: PhaseKind

    init(_ kind: PhaseKind) {
        precondition(kind == .finetune || kind == .qat)
        self.kind = kind
    }

    var trains: Bool { true }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        var e = PhaseExpectation(kind: kind)
        e.shapes = updateShapes(model)
        return e
    }

    func configure(_ task: inout Whittle_Task, _ engine: RoundEngine, phase: Phase, progress: RoundProgress) {
        let plan = engine.plan
        task.epochLearningRates = plan.epochLearningRates(kind, iteration: phase.iteration)
        task.learningRate = task.epochLearningRates[0]
        if kind == .qat, let calibrated = progress.calibrated {
            task.activationMin = calibrated.mapValues { $0[0] }
            task.activationMax = calibrated.mapValues { $0[1] }
            task.perChannel = plan.perChannel
            task.reduceRange = plan.reduceRange
        }
        if kind == .finetune, let lambda = plan.ewcLambda, let state = progress.ewcState {
            task.ewcLambda = lambda
            task.ewcSha256 = state
        }
        task.keepOptimizerState = plan.keepOptimizerState ?? false
        if let augmentation = plan.augmentation, augmentation != .none { task.augmentation = augmentation.rawValue }
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate {
        UpdateAggregate(shapes: expectation.shapes, options: options)
    }

    /// The merged delta applied (with server momentum within one sequence of training rounds: a step's
    /// fine-tuning, or QAT), the velocity kept as an artifact for the next round of the sequence.
    func close(_ closing: inout PhaseClosing) throws {
        let acc = try closing.gathered()
        let velocity = try closing.phase.iteration > 0 ? closing.progress.serverVelocity.map { sha -> [String: Tensor] in
            try Whittle_WeightUpdate(serializedBytes: try closing.artifacts.bytes(sha)).deltas.mapValues { try $0.decoded() }
        } : nil
        let model = try closing.artifacts.model(closing.progress.currentModel)
        let (tuned, next) = try closing.engine.finetuned(model, acc, velocity: velocity, progress: &closing.progress)
        closing.progress.currentModel = try closing.artifacts.store(tuned)
        if let next {
            var message = Whittle_WeightUpdate()
            message.deltas = next.mapValues(Whittle_FloatTensor.init)
            closing.progress.serverVelocity = try closing.artifacts.store(try message.serializedBytes())
        } else {
            closing.progress.serverVelocity = nil
        }
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        var report = Whittle_TaskReport()
        report.update = try WorkerJobs.finetune(job.task, model: job.model, teacher: job.teacher, ewc: job.ewc, data: job.data,
                                                batchSize: job.batchSize, compressor: &job.compressor,
                                                optimizerState: &job.optimizerState, teacherCache: job.teacherCache)
        return report
    }

    func backpropagates(_ task: Whittle_Task) -> Bool { true }
}

/// Training updates: streamed into FedAvg's weighted sums, or kept whole for the robust aggregators (trimmed mean,
/// median), with the local losses and each update's norm before clipping.
struct UpdateAggregate: PhaseAggregate {
    let shapes: [String: [Int]]
    let options: AggregationOptions
    var fedavg: FedAvgAccumulator
    var updates: [ModelUpdate] = []
    var losses: [Double] = []
    var updateNorms: [Double] = []

    init(shapes: [String: [Int]], options: AggregationOptions) {
        self.shapes = shapes
        self.options = options
        fedavg = FedAvgAccumulator(validator: UpdateValidator(shapes: shapes), clipNorm: options.clipNorm)
    }

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .update(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        var deltas = try message.deltas.mapValues { try $0.decoded() }
        for (name, q) in message.compressedDeltas {
            guard deltas[name] == nil else { throw PhaseAccumulator.refuse("parameter '\(name)' is sent both as float and as int8") }
            let shape = q.shape.map { Int($0) }
            // The shape is checked against the model's before anything multiplies its dimensions.
            guard e.shapes.isEmpty || e.shapes[name] == shape else {
                throw PhaseAccumulator.refuse("the int8 delta of '\(name)' has shape \(q.shape); the model's parameter is \(e.shapes[name].map { "\($0)" } ?? "unknown")")
            }
            guard TensorLimits.elementCount(shape) == q.values.count, q.scale.isFinite, q.scale > 0 else {
                throw PhaseAccumulator.refuse("the int8 delta of '\(name)' is malformed (shape \(q.shape), \(q.values.count) values, scale \(q.scale))")
            }
            deltas[name] = Tensor(shape: shape, floats: q.values.map { Float(Int8(bitPattern: $0)) * q.scale })
        }
        let update = ModelUpdate(deltas: deltas, samples: try PhaseAccumulator.checkSamples(message.samples, maximumSamples))
        guard message.loss.isFinite else { throw PhaseAccumulator.refuse("the reported loss is not finite") }
        let norm: Double
        switch options.method {
        case .fedavg:
            norm = try fedavg.add(update)
        case .trimmedMean, .median:
            try UpdateValidator(shapes: e.shapes).validate(update)
            norm = update.norm
            updates.append(update)
        }
        losses.append(message.loss)
        updateNorms.append(norm)
        return update.samples
    }

    /// Every check comes before the first change (the FedAvg sums are the last thing written): folded in place.
    var foldsInPlace: Bool { true }

    /// The merged delta.
    func delta() throws -> [String: Tensor] {
        switch options.method {
        case .fedavg: return try fedavg.result()
        case .median: return try RobustAggregation.median.aggregate(updates, validator: UpdateValidator(shapes: shapes), clipNorm: options.clipNorm)
        case .trimmedMean:
            return try RobustAggregation.trimmedMean(fraction: options.trimFraction).aggregate(
                updates, validator: UpdateValidator(shapes: shapes), clipNorm: options.clipNorm)
        }
    }
}
