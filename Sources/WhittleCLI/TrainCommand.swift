import ArgumentParser
import Foundation
import WhittleCompression
import WhittleIO
import WhittleNN
import WhittleONNX
import WhittleTensor

extension ModelCommand {
    struct Train: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Train (fine-tune) a model on local data and write the trained ONNX model.",
            discussion: """
                Loss: softmax cross-entropy with --labels; with --teacher, knowledge distillation \
                (1 − α)·CE + α·T²·KL(teacher ‖ student), which needs no labels when --distill-alpha is 1. \
                Segmenters (per-pixel logits) take per-pixel labels [N, H, W] and distil per pixel; detection heads, \
                regression outputs and embeddings distil from --teacher by relative MSE or cosine distance (--task). \
                Several inputs (token ids and an attention mask) come as one .npz with an array per input. \
                Batch normalization trains with batch statistics and updates its running statistics \
                (--freeze-bn keeps them). Runs are deterministic for a given --seed.
                """)

        @Argument(help: "The ONNX model to train.") var model: String
        @Option(name: .long, help: "Training samples: .npy (NCHW float32, one input) or .npz (one array per model input, by name).") var data: String
        @Option(name: .long, help: "Labels, int64/int32 .npy: one class index per sample [N], or per pixel [N, H, W].") var labels: String?
        @Option(name: .long, help: "What the output means: classification, segmentation, detection, regression or embedding (default: inferred from its shape).") var task: String?
        @Option(name: .long, help: "Passes over the data.") var epochs: Int
        @Option(name: .long, help: "Where to write the trained model.") var out: String
        @Option(name: .long, help: "Samples per step.") var batchSize: Int = 32
        @Option(name: .long, help: "Base learning rate.") var lr: Float = 0.01
        @Option(name: .long, help: "sgd, adam or adamw.") var optimizer: String = "sgd"
        @Option(name: .long, help: "SGD momentum.") var momentum: Float = 0.9
        @Flag(name: .long, help: "Nesterov momentum (SGD).") var nesterov = false
        @Option(name: .long, help: "Weight decay (L2 for sgd/adam, decoupled for adamw).") var weightDecay: Float = 0
        @Option(name: .long, help: "Learning-rate schedule: constant, cosine, or step:EVERY:GAMMA (e.g. step:10:0.1).")
        var schedule: String = "constant"
        @Option(name: .long, help: "Clip the global gradient norm to this value.") var clipNorm: Float?
        @Option(name: .long, help: "Random transforms of training images: none, flips or dihedral (flips and 90° rotations).") var augment: String = "none"
        @Option(name: .long, help: "Teacher model for distillation.") var teacher: String?
        @Option(name: .long, help: "Distillation weight α in [0, 1] (1: no labels needed).") var distillAlpha: Float = 0.5
        @Option(name: .long, help: "Distillation temperature T.") var temperature: Float = 4
        @Option(name: .long, parsing: .upToNextOption,
                help: "Feature hints TEACHER_TENSOR:STUDENT_TENSOR (MSE to a trained 1x1 projection of the student's map; needs --teacher).")
        var hint: [String] = []
        @Option(name: .long, help: "Weight of the hint losses.") var hintWeight: Float = 1
        @Option(name: .long, help: "Validation samples (.npy or .npz).") var valData: String?
        @Option(name: .long, help: "Validation labels (.npy).") var valLabels: String?
        @Option(name: .long, help: "Seed for data order, dropout and --reinitialize.") var seed: UInt64 = 0
        @Flag(name: .long, help: "Start from fresh random weights (He initialisation) instead of the model's own.")
        var reinitialize = false
        @Flag(name: .long, help: "Keep batch-normalization statistics fixed (use and keep the running statistics).")
        var freezeBn = false
        @Option(name: .long, help: "Compute threads.") var threads: Int?
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        struct Report: Encodable {
            var model: String
            var output: String
            var parameters: Int
            var epochs: [EpochReport]
            var seconds: Double
        }

        func validate() throws {
            guard epochs >= 1 else { throw ValidationError("--epochs must be at least 1") }
            guard batchSize >= 1 else { throw ValidationError("--batch-size must be at least 1") }
            guard lr > 0, lr.isFinite else { throw ValidationError("--lr must be positive") }
            guard Augmentation(rawValue: augment) != nil else { throw ValidationError("--augment must be none, flips or dihedral") }
            guard ["sgd", "adam", "adamw"].contains(optimizer) else { throw ValidationError("--optimizer must be sgd, adam or adamw") }
            if let task, TaskKind(rawValue: task) == nil {
                throw ValidationError("--task must be one of \(TaskKind.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            guard labels != nil || teacher != nil else { throw ValidationError("give --labels, or --teacher to distill without labels") }
            guard (valData == nil) == (valLabels == nil) else { throw ValidationError("--val-data and --val-labels go together") }
            _ = try parsedSchedule()
            guard hint.isEmpty || teacher != nil else { throw ValidationError("--hint needs --teacher") }
            _ = try parsedHints()
        }

        func parsedHints() throws -> [(teacher: String, student: String)] {
            try hint.map { pair in
                let parts = pair.split(separator: ":", maxSplits: 1).map(String.init)
                guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                    throw ValidationError("--hint '\(pair)' must be TEACHER_TENSOR:STUDENT_TENSOR")
                }
                return (parts[0], parts[1])
            }
        }

        func parsedSchedule() throws -> LearningRateSchedule {
            let parts = schedule.split(separator: ":")
            switch parts.first {
            case "constant": return .constant
            case "cosine": return .cosine(epochs: epochs, minimum: 0)
            case "step":
                guard parts.count == 3, let every = Int(parts[1]), every > 0, let gamma = Float(parts[2]) else { break }
                return .step(every: every, gamma: gamma)
            default: break
            }
            throw ValidationError("--schedule must be constant, cosine or step:EVERY:GAMMA")
        }

        func run() throws {
            if let threads { ComputeThreads.set(threads) }
            var base = try Files.readModel(model)
            if reinitialize { base = try Initialization.heInitialized(base, seed: seed) }
            let training = try Files.readDataset(data, labels: labels, for: base)
            let y = training.labels
            var configuration = TrainingConfiguration()
            configuration.epochs = epochs
            configuration.batchSize = batchSize
            configuration.learningRate = lr
            configuration.seed = seed
            configuration.schedule = try parsedSchedule()
            configuration.clipNorm = clipNorm
            configuration.augmentation = Augmentation(rawValue: augment)!
            configuration.batchNorm = freezeBn ? .frozen : .train
            let kind = task.flatMap(TaskKind.init(rawValue:)) ?? TaskKind.inferred(model: base, samples: training.samples)
            configuration.task = kind
            switch optimizer {
            case "adam": configuration.optimizer = .adam(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: weightDecay)
            case "adamw": configuration.optimizer = .adamW(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: weightDecay)
            default: configuration.optimizer = .sgd(momentum: momentum, nesterov: nesterov, weightDecay: weightDecay)
            }
            var teacherSession: InferenceSession?
            if let teacher {
                teacherSession = try InferenceSession(model: try Files.readModel(teacher))
                configuration.distillation = (temperature, y == nil ? 1 : distillAlpha)
                configuration.hints = try parsedHints()
                configuration.hintWeight = hintWeight
            }
            let hintTensors = Set(configuration.hints.map(\.teacher))
            let trainer: Trainer
            do {
                trainer = try Trainer(model: base, configuration: configuration)
            } catch let error as ONNXError {
                throw CLIError("\(model): \(error.message)")
            }
            let validation = try valData.map { try Files.readDataset($0, labels: valLabels, for: base) }
            if validation != nil, kind != .classification, kind != .segmentation {
                throw CLIError("--val-labels are classes, and this \(kind.rawValue) model's output has none")
            }
            let progress = ProgressBar(enabled: !json)
            let clock = ContinuousClock()
            let start = clock.now
            var reports: [EpochReport] = []
            for epoch in 0..<epochs {
                var report: EpochReport
                do {
                    report = try trainer.trainEpoch(epoch, data: training.samples, labels: y, teacher: teacherSession.map { session in
                        { batch in
                            var features: [String: Tensor] = [:]
                            let observe: ((Node, [Tensor]) throws -> Void)? = hintTensors.isEmpty ? nil : { node, outputs in
                                for (name, value) in zip(node.outputs, outputs) where hintTensors.contains(name) {
                                    features[name] = value
                                }
                            }
                            let logits = try session.run(batch, observe: observe)[session.primaryOutput]!
                            return TeacherOutputs(logits: logits, features: features)
                        }
                    }) { step, steps, loss in
                        progress.update(String(format: "epoch %d/%d", epoch + 1, epochs), step, steps,
                                        String(format: "%d/%d loss %.4f", step, steps, loss))
                    }
                    if let validation {
                        let session = try InferenceSession(model: trainer.exportModel())
                        var metrics = ClassificationMetrics()
                        var pixels = TaskEvaluation(task: .segmentation)
                        try forEachBatch(session, validation.samples, batchSize: 256) { logits, range in
                            if kind == .classification {
                                try metrics.add(logits: logits, labels: validation.labels!.ints[range])
                            } else {
                                try pixels.add(base: logits, compressed: logits, labels: validation.labels(range))
                            }
                        }
                        report.validationAccuracy = kind == .classification ? metrics.accuracy : pixels.baseAccuracy
                        report.validationLoss = kind == .classification ? metrics.meanCrossEntropy : nil
                    }
                } catch let error as ONNXError {
                    progress.finish()
                    throw CLIError(error.message)
                }
                progress.finish()
                reports.append(report)
                if !json {
                    var line = String(format: "epoch %d/%d  loss %.4f  accuracy %.2f %%  lr %.5g", report.epoch, epochs,
                                      report.loss, report.accuracy * 100, report.learningRate)
                    if let vl = report.validationLoss { line += String(format: "  val loss %.4f", vl) }
                    if let va = report.validationAccuracy { line += String(format: "  val accuracy %.2f %%", va * 100) }
                    print(line)
                }
            }
            let elapsed = clock.now - start
            try Files.writeModel(trainer.exportModel(), to: out)
            let seconds = WhittleCompression.seconds(elapsed)
            let parameterCount = trainer.parameters.values.reduce(0) { $0 + $1.count }
            if json {
                try printJSON(Report(model: model, output: out, parameters: parameterCount, epochs: reports, seconds: seconds))
            } else {
                print(String(format: "wrote %@ (%d trained parameters, %.1f s)", out, parameterCount, seconds))
            }
        }
    }
}
