import ArgumentParser
import Foundation
import WhittleCompression
import WhittleIO
import WhittleNN
import WhittleONNX
import WhittleTensor

/// `model …`: inspect, run, evaluate and benchmark ONNX models on this machine.
public struct ModelCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "model",
        abstract: "Inspect, run, evaluate, train, compress and benchmark ONNX models locally.",
        subcommands: [Inspect.self, Run.self, Eval.self, Train.self, Compress.self, Search.self, Bench.self, Convert.self])

    public init() {}
}

/// Options shared by commands that run a model.
struct RunOptions: ParsableArguments {
    @Option(name: .long, help: "Samples per forward pass (default 32, or the largest that fits --memory-limit).")
    var batchSize: Int?

    @Option(name: .long, help: "Memory budget for weights and activations, e.g. 512MB or 1GB; picks the batch size.")
    var memoryLimit: String?

    @Option(name: .long, help: "Compute threads (oneDNN and OpenBLAS). Default: all cores.")
    var threads: Int?

    @Flag(name: .long, help: "Use the naive reference kernels instead of oneDNN (slow; for checking).")
    var reference = false

    func validate() throws {
        if let batchSize, batchSize < 1 { throw ValidationError("--batch-size must be at least 1") }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
        if let memoryLimit, parseByteSize(memoryLimit) == nil {
            throw ValidationError("--memory-limit '\(memoryLimit)' is not a size like 512MB or 1GB")
        }
    }

    /// The batch size to use: --batch-size, capped by what fits in --memory-limit.
    /// `data`: the samples to be run, whose sizes fill free dimensions (a sequence length); or `sampleShapes`, one
    /// sample of each input.
    func batchSize(for session: InferenceSession, data: Samples? = nil,
                   sampleShapes: [String: (DataType, [Int])]? = nil) throws -> Int {
        guard let memoryLimit, let bytes = parseByteSize(memoryLimit) else { return batchSize ?? 32 }
        let shapes: [String: (DataType, [Int])]?
        do {
            shapes = try sampleShapes ?? data.map { try $0.conformed(to: session.model.graph).sampleShapes(for: session.model.graph) }
        } catch let error as ONNXError {
            throw CLIError(error.message)
        }
        guard let fitting = try session.largestBatch(fittingIn: bytes, limit: batchSize ?? 4096, sampleShapes: shapes) else {
            throw CLIError("even one sample does not fit in --memory-limit \(memoryLimit)")
        }
        return fitting
    }

    /// Applies the thread count and opens the model.
    func session(_ path: String) throws -> InferenceSession {
        if let threads { ComputeThreads.set(threads) }
        let model = try Files.readModel(path)
        do {
            return try InferenceSession(model: model, options: KernelOptions(fast: !reference))
        } catch let error as ONNXError {
            throw CLIError("\(path): \(error.message)")
        }
    }
}

/// `--shape NAME=DIMS` options (e.g. `input_ids=1x128`) as sizes by input name.
public func parseShapeSizes(_ items: [String]) throws -> [String: [Int]] {
    var sizes: [String: [Int]] = [:]
    for item in items {
        let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
        let dims = parts.count == 2 ? parts[1].split(separator: "x").map { Int($0) } : []
        guard parts.count == 2, !dims.isEmpty, dims.allSatisfy({ ($0 ?? 0) >= 1 }) else {
            throw CLIError("--shape '\(item)' is not NAME=DIMS, e.g. input_ids=1x128")
        }
        sizes[parts[0]] = dims.map { $0! }
    }
    return sizes
}

/// Runs `session` over `data` in batches, calling `body` with each batch's first output and its sample range.
func forEachBatch(_ session: InferenceSession, _ data: Samples, batchSize: Int,
                  _ body: (Tensor, Range<Int>) throws -> Void) throws {
    do {
        let data = data.conformed(to: session.model.graph)
        try session.validate(data)
        for start in stride(from: 0, to: data.count, by: batchSize) {
            let range = start..<min(start + batchSize, data.count)
            try body(try session.firstOutput(data.rows(range)), range)
        }
    } catch let error as ONNXError {
        throw CLIError(error.message)
    } catch let error as TensorError {
        throw CLIError(error.message)
    }
}

extension ModelCommand {
    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show inputs, outputs, op counts, parameters and MACs per layer of an ONNX model.")

        @Argument(help: "The ONNX model file.") var model: String
        @Option(name: .long, parsing: .singleValue,
                help: "A free input dimension's size for the MAC count, NAME=DIMS with x between sizes (e.g. input_ids=1x128; repeatable). The batch is 1 otherwise.")
        var shape: [String] = []
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        struct Report: Encodable {
            var file: String
            var fileBytes: Int
            var summary: ModelSummary
        }

        /// One sample of every runtime input: --shape where given, else the declaration with the batch at 1 (for
        /// `model bench`).
        static func inputShapes(_ model: Model, _ given: [String]) throws -> [String: (DataType, [Int])] {
            do {
                return try ShapeInference.sampleShapes(model, sizes: try parseShapeSizes(given))
            } catch let error as ONNXError {
                throw CLIError(error.message)
            }
        }

        func run() throws {
            let bytes = try Files.readBytes(model).count
            let parsed = try Files.readModel(model)
            let summary: ModelSummary
            do {
                summary = try ModelSummary(model: parsed, inputShapes: try ShapeInference.sampleShapes(parsed, sizes: try parseShapeSizes(shape)))
            } catch let error as ONNXError {
                throw CLIError("\(model): \(error.message)")
            }
            if json {
                try printJSON(Report(file: model, fileBytes: bytes, summary: summary))
                return
            }
            print("model      \(model) (\(byteSize(bytes)))")
            print("format     ONNX IR \(summary.irVersion), opset \(summary.opset)\(summary.producer.isEmpty ? "" : ", from \(summary.producer)")")
            for input in summary.inputs { print("input      \(input.name): \(input.elementType) [\(input.shape.joined(separator: ", "))]") }
            for output in summary.outputs { print("output     \(output.name): \(output.elementType) [\(output.shape.joined(separator: ", "))]") }
            print("nodes      \(summary.nodeCount): " + summary.opCounts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
            print("parameters \(grouped(summary.parameters)) (\(byteSize(summary.parameterBytes)))")
            print("MACs       \(grouped(summary.macs)) per sample")
            print("")
            let rows = summary.layers.map { layer in
                [layer.name, layer.opType, "[" + layer.outputShape.map(String.init).joined(separator: ", ") + "]",
                 grouped(layer.parameters), grouped(layer.macs)]
            }
            print(table(["layer", "op", "output (batch 1)", "params", "MACs"], rows, numeric: [3, 4]))
        }
    }

    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a forward pass; the first graph output is written as a float32 .npy file.")

        @Argument(help: "The ONNX model file.") var model: String
        @Option(name: .long, help: "Input samples, batch first: a .npy for a model with one input (NCHW float32 images), or an .npz with one array per input by name (e.g. int64 input_ids and attention_mask).") var input: String
        @Option(name: .long, help: "Where to write the first output (.npy).") var output: String
        @OptionGroup var options: RunOptions
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        func run() throws {
            let session = try options.session(model)
            let names = session.model.graph.runtimeInputs.map(\.name)
            let inputs = try Files.readInputs(input, names: names)
            var outputs: [Float] = []
            var outShape: [Int] = []
            let data = try Samples(names.map { ($0, inputs[$0]!) })
            try forEachBatch(session, data, batchSize: try options.batchSize(for: session, data: data)) { batch, range in
                guard batch.rank >= 1, batch.shape[0] == range.count else {
                    throw CLIError("the first output '\(session.primaryOutput)' has shape \(batch.shape), which has no batch axis of size \(range.count)")
                }
                outputs += batch.asFloats
                outShape = [range.upperBound] + Array(batch.shape.dropFirst())
            }
            try Files.writeNPY(Tensor(shape: outShape, floats: outputs), to: output)
            if json {
                try printJSON(["output": output, "shape": outShape.map(String.init).joined(separator: "x")])
            } else {
                print("wrote \(output): float32 \(outShape)")
            }
        }
    }

    struct Eval: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Accuracy and throughput of a model on labelled data: top-1 and cross-entropy (classifiers), pixel accuracy and mean IoU (segmenters).")

        @Argument(help: "The ONNX model file.") var model: String
        @Option(name: .long, help: "Samples: .npy (NCHW float32, one input) or .npz (one array per model input, by name).") var data: String
        @Option(name: .long, help: "Labels, int64 or int32 .npy: one class index per sample [N], or per pixel [N, H, W].") var labels: String
        @Option(name: .long, help: "classification or segmentation (default: inferred from the output's shape).") var task: String?
        @OptionGroup var options: RunOptions
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        struct Report: Encodable {
            var model: String
            var task: TaskKind
            var samples: Int
            /// Top-1 accuracy (classification) or pixel accuracy (segmentation).
            var accuracy: Double
            var meanCrossEntropy: Double?
            var meanIoU: Double?
            var samplesPerSecond: Double
            var batchSize: Int
            var threads: Int
        }

        func run() throws {
            let session = try options.session(model)
            let data = try Files.readDataset(data, labels: labels, for: session.model)
            var kind = TaskKind.inferred(model: session.model, samples: data.samples)
            if let task {
                guard let k = TaskKind(rawValue: task), k == .classification || k == .segmentation else {
                    throw ValidationError("--task must be classification or segmentation (labels are classes), not '\(task)'")
                }
                kind = k
            }
            guard kind == .classification || kind == .segmentation else {
                throw CLIError("\(model): the output looks like \(kind.rawValue) (not class scores), and labels are classes; pass --task if it is a classifier or segmenter, or compare with the original by `model compress`'s report")
            }
            let y = data.labels!
            var metrics = ClassificationMetrics()
            var evaluation = TaskEvaluation(task: kind)
            let batchSize = try options.batchSize(for: session, data: data.samples)
            let clock = ContinuousClock()
            let start = clock.now
            try forEachBatch(session, data.samples, batchSize: batchSize) { logits, range in
                do {
                    if kind == .classification {
                        try metrics.add(logits: logits, labels: y.ints[range])
                    } else {
                        try evaluation.add(base: logits, compressed: logits, labels: data.labels(range))
                    }
                } catch let error as ONNXError {
                    throw CLIError(error.message)
                }
            }
            let elapsed = clock.now - start
            let seconds = WhittleCompression.seconds(elapsed)
            let report = kind == .classification
                ? Report(model: model, task: kind, samples: metrics.samples, accuracy: metrics.accuracy,
                         meanCrossEntropy: metrics.meanCrossEntropy, meanIoU: nil,
                         samplesPerSecond: Double(metrics.samples) / max(seconds, 1e-9), batchSize: batchSize,
                         threads: ComputeThreads.current)
                : Report(model: model, task: kind, samples: evaluation.samples, accuracy: evaluation.baseAccuracy ?? 0,
                         meanCrossEntropy: nil, meanIoU: evaluation.baseMeanIoU,
                         samplesPerSecond: Double(evaluation.samples) / max(seconds, 1e-9), batchSize: batchSize,
                         threads: ComputeThreads.current)
            if json {
                try printJSON(report)
            } else {
                print("model          \(model)")
                print("samples        \(report.samples)")
                if kind == .classification {
                    print(String(format: "top-1 accuracy %.2f %%", report.accuracy * 100))
                    print(String(format: "cross-entropy  %.4f", report.meanCrossEntropy ?? 0))
                } else {
                    print(String(format: "pixel accuracy %.2f %%", report.accuracy * 100))
                    print(String(format: "mean IoU       %.2f %%", (report.meanIoU ?? 0) * 100))
                }
                print(String(format: "throughput     %.1f samples/s (batch %d, %d threads)", report.samplesPerSecond,
                             report.batchSize, report.threads))
            }
        }
    }

    struct Bench: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Measure forward-pass throughput on random input of the model's declared shape.")

        @Argument(help: "The ONNX model file.") var model: String
        @OptionGroup var options: RunOptions
        @Option(name: .long, help: "Timed forward passes.") var iterations: Int = 20
        @Option(name: .long, help: "Untimed warm-up passes.") var warmup: Int = 3
        @Option(name: .long, parsing: .singleValue, help: "Size of an input with a free dimension besides the batch, NAME=DIMS for one sample (e.g. input_ids=1x128); the batch comes from --batch-size.") var shape: [String] = []
        @Flag(name: .long, help: "Also print the time of each step (fused kernel) of one pass.") var profile = false
        @Flag(name: .long, help: "Time training passes (forward in training mode, cross-entropy or a squared-error loss, backward; no optimizer step), with every input fed.")
        var train = false
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        struct Report: Encodable {
            var model: String
            var batchSize: Int
            var threads: Int
            var iterations: Int
            var imagesPerSecond: Double
            var millisecondsPerBatch: Double
            var peakActivationBytes: Int
            /// QDQ groups run on integer kernels (0 for float models, and with --train).
            var integerSteps: Int
        }

        func run() throws {
            guard iterations >= 1, warmup >= 0 else { throw ValidationError("--iterations must be ≥ 1 and --warmup ≥ 0") }
            let session = try options.session(model)
            let one = try Inspect.inputShapes(session.model, shape)
            let batchSize = try options.batchSize(for: session, sampleShapes: one)
            let shapes = one.mapValues { ($0.0, [batchSize] + Array($0.1.dropFirst())) }
            guard let (_, shape) = shapes[session.primaryInput.name] else { throw CLIError("the model has no input") }
            var generator = WhittleNN.SplitMix64(seed: 42)
            let input = Tensor(shape: shape, floats: (0..<shape.reduce(1, *)).map { _ in generator.nextFloat() * 2 - 1 })
            // Several inputs, or integer ones (token ids and masks, all 1: a valid id and no padding).
            var feeds: [String: Tensor] = [:]
            for info in session.model.graph.runtimeInputs {
                guard let (dtype, s) = shapes[info.name] else { continue }
                feeds[info.name] = dtype.isInteger ? Tensor(shape: s, ints: [Int64](repeating: 1, count: s.reduce(1, *)), dtype: dtype)
                    : info.name == session.primaryInput.name ? input
                    : Tensor(shape: s, floats: (0..<s.reduce(1, *)).map { _ in generator.nextFloat() * 2 - 1 })
            }
            let plain = feeds.count == 1 && !(shapes[session.primaryInput.name]?.0.isInteger ?? false)
            var pass: () throws -> Void = plain ? { _ = try session.run(input) } : { _ = try session.run(inputs: feeds) }
            if train {
                // Every input fed (token ids and masks too); the loss is cross-entropy for [N, classes] logits, and
                // half the mean square of any other output (the same backward work).
                let graph = try TrainingGraph(model: session.model, inputs: feeds.mapValues { ($0.dtype, $0.shape) })
                var parameters: [String: Tensor] = [:]
                for initializer in session.model.graph.initializers where initializer.tensor != nil {
                    parameters[initializer.name] = initializer.tensor!
                }
                var rng = WhittleNN.SplitMix64(seed: 1)
                pass = {
                    let tape = try graph.forward(inputs: feeds, parameters: parameters, training: true, rng: &rng)
                    let y = tape.value(graph.outputName)!
                    let seed: Tensor
                    if y.rank == 2 {
                        let labels = (0..<batchSize).map { Int64($0 % y.shape[1]) }
                        seed = try Losses.softmaxCrossEntropy(logits: y, labels: labels[...]).dLogits
                    } else {
                        seed = Tensor(shape: y.shape, floats: y.floats.map { $0 / Float(max(y.count, 1)) })
                    }
                    _ = try graph.backward(tape, seeds: [graph.outputName: seed])
                }
            }
            for _ in 0..<warmup { try pass() }
            let clock = ContinuousClock()
            let start = clock.now
            for _ in 0..<iterations { try pass() }
            let elapsed = clock.now - start
            let seconds = WhittleCompression.seconds(elapsed)
            let report = Report(model: model, batchSize: batchSize, threads: ComputeThreads.current,
                                iterations: iterations,
                                imagesPerSecond: Double(iterations * batchSize) / seconds,
                                millisecondsPerBatch: seconds * 1000 / Double(iterations),
                                peakActivationBytes: try session.compiled(shapes: shapes).peakActivationBytes,
                                integerSteps: train ? 0 : try session.compiled(shapes: shapes).integerSteps)
            if profile {
                let rows = try session.compiled(shapes: shapes).profile(feeds)
                let total = rows.reduce(0) { $0 + $1.seconds }
                for row in rows.sorted(by: { $0.seconds > $1.seconds }) {
                    print(String(format: "%8.3f ms %5.1f %%  %@  %@", row.seconds * 1000, row.seconds / total * 100,
                                 row.label, row.implementation))
                }
            }
            if json {
                try printJSON(report)
            } else {
                print(String(format: "%@: %.1f images/s (%.2f ms per batch of %d, %d threads)", model,
                             report.imagesPerSecond, report.millisecondsPerBatch, report.batchSize, report.threads)
                      + (report.integerSteps > 0 ? ", \(report.integerSteps) QDQ groups on integer kernels" : ""))
            }
        }
    }
}

extension ModelCommand {
    struct Convert: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Read a model and write it back (external weight data is inlined); checks it loads on the way.",
            discussion: "Unchanged models are written back byte for byte; names, opset imports, metadata and doc strings survive.")

        @Argument(help: "The ONNX model file.") var model: String
        @Option(name: .long, help: "Where to write the model.") var out: String
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        func run() throws {
            let parsed = try Files.readModel(model)
            do {
                _ = try ModelSummary(model: parsed)  // shape inference over every node: refuses what Whittle cannot run
            } catch let error as ONNXError {
                throw CLIError("\(model): \(error.message)")
            }
            let bytes = try ModelCoding.write(parsed)
            try Files.writeBytes(bytes, to: out)
            if json {
                try printJSON(["output": out, "bytes": String(bytes.count)])
            } else {
                print("wrote \(out) (\(byteSize(bytes.count)))")
            }
        }
    }
}

