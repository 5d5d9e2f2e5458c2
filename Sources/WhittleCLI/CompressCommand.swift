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
        @Option(name: .long, help: "Where to write the compressed model.") var out: String

        @OptionGroup var pruning: PruningFlags
        @Option(name: .long, help: "Fine-tuning epochs after each pruning step (needs --train-data).") var finetuneEpochs: Int = 0
        @Option(name: .long, help: "Fine-tuning samples (.npy or .npz).") var trainData: String?
        @Option(name: .long, help: "Fine-tuning labels (.npy).") var trainLabels: String?
        @OptionGroup var training: FineTuningFlags

        @Option(name: .long, help: "none, int8, int4-weights or mixed.") var quantize: QuantizationMode = .none
        @OptionGroup var quantization: QuantizationFlags
        @Option(name: .long, help: "Percentile for --calibration percentile.") var percentile: Double = 99.999
        @Option(name: .long, help: "Activation type: uint8 or int8.") var activationType: String = "uint8"
        @Flag(name: .long, help: "Symmetric activation ranges.") var symmetricActivations = false
        @Option(name: .long, parsing: .upToNextOption, help: "Nodes to keep in float, by name.") var keepFloat: [String] = []
        @Option(name: .long, parsing: .upToNextOption, help: "Per-node precision, NODE=float|int8|int4-weights.") var override: [String] = []
        @Flag(name: .long, help: "Report each quantized layer's effect alone (accuracy or output KL divergence).") var sensitivity = false

        @Option(name: .long, help: "Evaluation samples (.npy or .npz); default: the calibration data.") var valData: String?
        @Option(name: .long, help: "Evaluation labels (.npy).") var valLabels: String?
        @Option(name: .long, help: "Seed for fine-tuning.") var seed: UInt64 = 0
        @Option(name: .long, help: "Compute threads.") var threads: Int?
        @Option(name: .long, help: "Write the JSON report here.") var report: String?
        @Flag(name: .long, help: "Print the report as JSON.") var json = false

        func validate() throws {
            guard ["uint8", "int8"].contains(activationType) else { throw ValidationError("--activation-type must be uint8 or int8") }
            guard finetuneEpochs >= 0 else { throw ValidationError("--finetune-epochs must not be negative") }
            guard finetuneEpochs == 0 || trainData != nil else { throw ValidationError("--finetune-epochs needs --train-data") }
            guard finetuneEpochs == 0 || trainLabels != nil || training.distill else {
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
            let trainingSet = try trainData.map { try Files.readDataset($0, labels: trainLabels, for: base) }

            var job = LocalCompression()
            if pruning.prunes {
                job.pruning = try pruning.options()
                job.schedule = try pruning.steps()
            }
            job.finetuneEpochs = finetuneEpochs
            job.finetuneLearningRate = training.lr
            job.finetuneOptimizer = training.optimizer.kind
            job.distill = training.distill
            job.augmentation = training.augment
            job.batchSize = training.batchSize
            job.seed = seed
            var policy = quantization.policy(quantize)
            policy.percentile = percentile
            policy.activationType = activationType == "int8" ? .int8 : .uint8
            policy.symmetricActivations = symmetricActivations
            policy.keepFloat = Set(keepFloat)
            policy.overrides = try parsedOverrides()
            job.quantization = policy
            job.sensitivity = sensitivity
            job.compactNames = quantization.compactNames
            job.task = training.task

            let quiet = json || isatty(STDERR_FILENO) == 0
            let bar = ProgressBar(enabled: !quiet)
            job.trainingProgress = { epoch, epochs, step, steps, loss in
                bar.update(String(format: "fine-tune epoch %d/%d", epoch + 1, epochs), step, steps,
                           String(format: "%d/%d loss %.4f", step, steps, loss))
            }
            let (compressed, result): (Model, CompressionReport)
            do {
                (compressed, result) = try job.run(model: base, modelName: model, outputName: out, calibration: calibrationSet,
                                                   evaluation: evaluation, training: trainingSet) { message in
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
