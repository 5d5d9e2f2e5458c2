import ArgumentParser
import Foundation
import WhittleCompression
import WhittleIO
import WhittleNN
import WhittleONNX
import WhittleTensor

extension ModelCommand {
    struct Compress: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Prune and/or quantize a model on local data and write the compressed ONNX model (QDQ).",
            discussion: """
                Locally, exactly what a federated round does with statistics merged from many workers. \
                Pruning removes whole channels (dependency groups found from the graph), optionally in a \
                progressive --schedule with fine-tuning between steps; quantization calibrates activation ranges \
                on --calibration-data and writes QuantizeLinear/DequantizeLinear as onnxruntime's QDQ quantizer \
                places them. Accuracy is measured on --val-data (or the calibration data) when labels are given.
                """)

        @Argument(help: "The ONNX model to compress.") var model: String
        @Option(name: .long, help: "Calibration (and importance) samples: .npy (NCHW float32, one input) or .npz (one array per model input, by name, e.g. input_ids and attention_mask).") var calibrationData: String
        @Option(name: .long, help: "Labels of the calibration samples (int .npy, [N] or per pixel [N, H, W]): accuracy, Taylor importance.") var labels: String?
        @Option(name: .long, help: "What the model's output means: classification, segmentation, detection, regression or embedding (losses and metrics; default: inferred from its shape).") var task: String?
        @Option(name: .long, help: "Where to write the compressed model.") var out: String

        @OptionGroup var pruning: PruningFlags
        @Option(name: .long, help: "Fine-tuning epochs after each pruning step (needs --train-data).") var finetuneEpochs: Int = 0
        @Option(name: .long, help: "Fine-tuning samples (.npy or .npz).") var trainData: String?
        @Option(name: .long, help: "Fine-tuning labels (.npy).") var trainLabels: String?
        @Option(name: .long, help: "Fine-tuning learning rate (cosine schedule).") var lr: Float = 0.01
        @Option(name: .long, help: "Fine-tuning optimizer: sgd (momentum 0.9), adam or adamw.") var optimizer: String = "sgd"
        @Option(name: .long, help: "Random transforms of fine-tuning images: none, flips or dihedral (flips and 90° rotations).") var augment: String = "none"
        @Flag(name: .long, help: "Fine-tune by distillation from the original model (no labels needed).") var distill = false

        @Option(name: .long, help: "none, int8, int4-weights or mixed.") var quantize: String = "none"
        @Option(name: .long, help: "minmax, percentile, entropy or mse.") var calibration: String = "minmax"
        @Option(name: .long, help: "Percentile for --calibration percentile.") var percentile: Double = 99.999
        @Flag(name: .long, help: "Per-output-channel weight scales (the default).") var perChannel = false
        @Flag(name: .long, help: "One weight scale per tensor.") var perTensor = false
        @Option(name: .long, help: "Activation type: uint8 or int8.") var activationType: String = "uint8"
        @Flag(name: .long, help: "Symmetric activation ranges.") var symmetricActivations = false
        @Flag(name: .long, help: "7-bit weights (onnxruntime's reduce_range): for x86 CPUs without AVX-VNNI, whose u8×s8 kernels saturate.")
        var reduceRange = false
        @Option(name: .long, help: "int4 weights in blocks of this many along the reduction axis (16, 32, 64, 128 or 256), each with its own scale; default: one scale per output channel (qdq), 32 (matmulnbits).") var int4BlockSize: Int?
        @Option(name: .long, help: "How int4 weights are written: qdq (DequantizeLinear, opset 21) or matmulnbits (onnxruntime's MatMulNBits, com.microsoft).") var int4Format: String = "qdq"
        @Option(name: .long, parsing: .upToNextOption, help: "Nodes to keep in float, by name.") var keepFloat: [String] = []
        @Option(name: .long, parsing: .upToNextOption, help: "Per-node precision, NODE=float|int8|int4-weights.") var override: [String] = []
        @Flag(name: .long, help: "Report each quantized layer's effect alone (accuracy or output KL divergence).") var sensitivity = false
        @Flag(name: .long, help: "Short names for every internal value and node in the output (smaller file; the report maps them).") var compactNames = false

        @Option(name: .long, help: "Evaluation samples (.npy or .npz); default: the calibration data.") var valData: String?
        @Option(name: .long, help: "Evaluation labels (.npy).") var valLabels: String?
        @Option(name: .long, help: "Samples per batch.") var batchSize: Int = 32
        @Option(name: .long, help: "Seed for fine-tuning.") var seed: UInt64 = 0
        @Option(name: .long, help: "Compute threads.") var threads: Int?
        @Option(name: .long, help: "Write the JSON report here.") var report: String?
        @Flag(name: .long, help: "Print the report as JSON.") var json = false

        func validate() throws {
            guard QuantizationMode(rawValue: quantize) != nil else { throw ValidationError("--quantize must be none, int8, int4-weights or mixed") }
            guard CalibrationMethod(rawValue: calibration) != nil else {
                throw ValidationError("--calibration must be minmax, percentile, entropy or mse")
            }
            guard !(perChannel && perTensor) else { throw ValidationError("--per-channel and --per-tensor exclude each other") }
            guard Int4Format(rawValue: int4Format) != nil else { throw ValidationError("--int4-format must be qdq or matmulnbits") }
            if let b = int4BlockSize, !BlockwiseInt4.blockSizes.contains(b) {
                throw ValidationError("--int4-block-size must be one of \(BlockwiseInt4.blockSizes.map(String.init).joined(separator: ", "))")
            }
            guard ["uint8", "int8"].contains(activationType) else { throw ValidationError("--activation-type must be uint8 or int8") }
            guard batchSize >= 1 else { throw ValidationError("--batch-size must be at least 1") }
            if let task, TaskKind(rawValue: task) == nil {
                throw ValidationError("--task must be one of \(TaskKind.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            guard Augmentation(rawValue: augment) != nil else { throw ValidationError("--augment must be none, flips or dihedral") }
            guard finetuneEpochs >= 0 else { throw ValidationError("--finetune-epochs must not be negative") }
            guard finetuneEpochs == 0 || trainData != nil else { throw ValidationError("--finetune-epochs needs --train-data") }
            guard finetuneEpochs == 0 || trainLabels != nil || distill else {
                throw ValidationError("fine-tuning needs --train-labels, or --distill to learn from the original model")
            }
            guard (valData == nil) == (valLabels == nil) || valLabels == nil else { throw ValidationError("--val-labels needs --val-data") }
            _ = try parsedOverrides()
        }

        func parsedOverrides() throws -> [String: LayerPrecision] {
            var out: [String: LayerPrecision] = [:]
            for item in override {
                let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
                guard parts.count == 2, let p = LayerPrecision(rawValue: parts[1]) else {
                    throw ValidationError("--override '\(item)' must be NODE=float|int8|int4-weights")
                }
                out[parts[0]] = p
            }
            return out
        }

        func run() throws {
            if let threads { ComputeThreads.set(threads) }
            let base = try Files.readModel(model)
            let calibrationSet = try Files.readDataset(calibrationData, labels: labels, for: base)
            let evaluation = try valData.map { try Files.readDataset($0, labels: valLabels, for: base) }
            let training = try trainData.map { try Files.readDataset($0, labels: trainLabels, for: base) }

            var job = LocalCompression()
            if pruning.prunes {
                job.pruning = try pruning.options()
                job.schedule = try pruning.steps()
            }
            job.finetuneEpochs = finetuneEpochs
            job.finetuneLearningRate = lr
            switch optimizer {
            case "sgd": break
            case "adam": job.finetuneOptimizer = .adam(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0)
            case "adamw": job.finetuneOptimizer = .adamW(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0.01)
            default: throw ValidationError("--optimizer must be sgd, adam or adamw")
            }
            job.distill = distill
            job.augmentation = Augmentation(rawValue: augment)!
            job.batchSize = batchSize
            job.seed = seed
            var policy = QuantizationPolicy(mode: QuantizationMode(rawValue: quantize)!)
            policy.calibration = CalibrationMethod(rawValue: calibration)!
            policy.percentile = percentile
            policy.perChannel = !perTensor
            policy.activationType = activationType == "int8" ? .int8 : .uint8
            policy.symmetricActivations = symmetricActivations
            policy.reduceRange = reduceRange
            policy.keepFloat = Set(keepFloat)
            policy.overrides = try parsedOverrides()
            policy.int4BlockSize = int4BlockSize
            policy.int4Format = Int4Format(rawValue: int4Format)!
            job.quantization = policy
            job.sensitivity = sensitivity
            job.compactNames = compactNames
            job.task = task.flatMap(TaskKind.init(rawValue:))

            let quiet = json || isatty(STDERR_FILENO) == 0
            let bar = ProgressBar(enabled: !quiet)
            job.trainingProgress = { epoch, epochs, step, steps, loss in
                bar.update(String(format: "fine-tune epoch %d/%d", epoch + 1, epochs), step, steps,
                           String(format: "%d/%d loss %.4f", step, steps, loss))
            }
            let (compressed, result): (Model, CompressionReport)
            do {
                (compressed, result) = try job.run(model: base, modelName: model, outputName: out, calibration: calibrationSet,
                                                   evaluation: evaluation, training: training) { message in
                    bar.finish()
                    if !quiet { FileHandle.standardError.write(Data("… \(message)\n".utf8)) }
                }
                bar.finish()
            } catch let error as CompressionError {
                throw CLIError("\(model): \(error.message)")
            } catch let error as ONNXError {
                throw CLIError("\(model): \(error.message)")
            } catch let error as TensorError {
                throw CLIError("\(model): \(error.message)")
            }
            try Files.writeModel(compressed, to: out)
            if let report { try Files.writeBytes(try jsonBytes(result), to: report) }
            if json {
                try printJSON(result)
            } else {
                printSummary(result)
            }
        }

        func printSummary(_ r: CompressionReport) {
            func percent(_ v: Double?) -> String { v.map { String(format: "%.2f %%", $0 * 100) } ?? "–" }
            print(table(["", "before", "after", "ratio"],
                        [["size", byteSize(r.before.bytes), byteSize(r.after.bytes), String(format: "%.2fx", Double(r.before.bytes) / Double(max(r.after.bytes, 1)))],
                         ["parameters", "\(r.before.parameters)", "\(r.after.parameters)", String(format: "%.2fx", Double(r.before.parameters) / Double(max(r.after.parameters, 1)))],
                         ["MACs", "\(r.before.macs)", "\(r.after.macs)", String(format: "%.2fx", Double(r.before.macs) / Double(max(r.after.macs, 1)))],
                         [r.task == .segmentation ? "pixel accuracy" : "accuracy", percent(r.before.accuracy), percent(r.after.accuracy), ""]]
                        + (r.after.meanIoU == nil ? [] : [["mean IoU", percent(r.before.meanIoU), percent(r.after.meanIoU), ""]]),
                        numeric: [1, 2, 3]))
            var against: [String] = []
            if let a = r.agreement {
                let what = switch r.task ?? .classification {
                case .classification: "top-1 agreement"
                case .segmentation: "pixel agreement"
                case .detection, .regression: "outputs within 10 %"
                case .embedding: "embeddings with cosine ≥ 0.9"
                }
                against.append(String(format: "%@ %.2f %%", what, a * 100))
            }
            if let e = r.relativeError { against.append(String(format: "relative error %.4f", e)) }
            if let c = r.meanCosine { against.append(String(format: "mean cosine %.4f", c)) }
            if !against.isEmpty { print("against the original (\((r.task ?? .classification).rawValue)): " + against.joined(separator: ", ")) }
            if let p = r.pruning {
                print("pruning (\(p.criterion.rawValue), \(p.scope.rawValue)): " + p.steps.map { step in
                    var s = String(format: "%.0f %% → %d/%d channels", step.ratio * 100, step.channelsKept, step.channelsBefore)
                    if let a = step.accuracyPruned { s += String(format: ", %.2f %%", a * 100) }
                    if let a = step.accuracyFinetuned { s += String(format: " → %.2f %% after fine-tuning", a * 100) }
                    return s
                }.joined(separator: "; "))
                for f in p.frozen { print("  kept whole: \(f.group) (\(f.channels) channels): \(f.reason)") }
            }
            if let q = r.quantization {
                let counts = Dictionary(grouping: q.layers, by: \.precision).mapValues(\.count)
                let layers = LayerPrecision.allCases.compactMap { p in counts[p].map { "\($0) \(p.rawValue)" } }
                print("quantization \(q.mode.rawValue), \(q.calibration.rawValue) calibration: "
                      + (layers.isEmpty ? "no weighted layers" : layers.joined(separator: ", ") + " layers")
                      + ", \(q.tensors.filter { $0.role == .activation }.count) activations quantized")
            }
            if let rows = r.sensitivity, !rows.isEmpty {
                print(table(["layer", "op", "accuracy", "KL", "agreement", "rel. error"], rows.map {
                    [$0.node, $0.opType, $0.accuracy.map { String(format: "%.2f %%", $0 * 100) } ?? "–",
                     $0.klDivergence.map { String(format: "%.5f", $0) } ?? "–", String(format: "%.2f %%", $0.agreement * 100),
                     $0.relativeError.map { String(format: "%.4f", $0) } ?? "–"]
                }, numeric: [2, 3, 4, 5]))
            }
            print(String(format: "wrote %@ (%.1f s)", out, r.timings["total"] ?? 0))
        }
    }
}
