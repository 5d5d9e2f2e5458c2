import ArgumentParser
import Foundation
import WhittleCompression
import WhittleIO
import WhittleNN
import WhittleONNX
import WhittleTensor

/// What `model search` writes with `--report` and prints with `--json`.
public struct SearchReport: Codable, Sendable {
    public struct Point: Codable, Sendable {
        /// Channels kept per group (by the group's first producer).
        public var widths: [String: Int]
        public var macs: Int
        public var parameters: Int
        public var parameterBytes: Int
        /// Predicted milliseconds on this machine (with a latency budget).
        public var latencyMs: Double?
        /// Mean loss after adaptive batch norm (cross-entropy with labels, KL from the base model without).
        public var loss: Double
        public var accuracy: Double?
        public var agreement: Double
        public var generation: Int
    }

    public struct Finalist: Codable, Sendable {
        public var widths: [String: Int]
        public var macs: Int
        /// Predicted and measured milliseconds (with a latency budget).
        public var predictedMs: Double?
        public var measuredMs: Double?
        public var loss: Double
        public var accuracy: Double?
        public var agreement: Double
    }

    /// How latency was predicted and what was measured end to end (with a latency budget).
    public struct Latency: Codable, Sendable {
        public var machine: String
        public var threads: Int
        public var batch: Int
        /// Layers timed and grid points per channel axis; whether the table came from --latency-table unchanged.
        public var layers: Int
        public var points: Int
        public var cached: Bool
        public var tableSeconds: Double
        /// The original's end-to-end time when the search started over the table's: predictions are scaled by it.
        public var scale: Double
        public var baseMs: Double
        public var uniformPredictedMs: Double
        public var uniformMeasuredMs: Double
        public var chosenPredictedMs: Double
        public var chosenMeasuredMs: Double
    }

    public var model: String
    public var budget: SearchBudget
    public var base: ArchitectureCost
    public var evaluations: Int
    public var seed: UInt64
    /// The uniform architecture that fills the budget (every group at the same fraction), the reference.
    public var uniform: Point
    public var chosen: Point
    /// Accuracy-against-MACs front of every evaluated candidate (ascending MACs).
    public var front: [Point]
    /// The finalists' figures after their short fine-tuning (on the calibration data), when there were finalists.
    public var finalists: [Finalist]
    /// After fine-tuning (when asked): the chosen model's figures on the evaluation data.
    public var finetuneEpochs: Int
    public var baseAccuracy: Double?
    public var finalAccuracy: Double?
    public var finalAgreement: Double?
    public var latency: Latency?
    public var seconds: [String: Double]
}

extension ModelCommand {
    struct Search: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Search channel widths per layer group under a MACs, size or latency budget and write the chosen model.",
            discussion: """
                An evolutionary search over the widths of every prunable dependency group (a ladder of --steps \
                steps from --min-width of the channels to all of them, multiples of --round-to). Each candidate \
                inherits the most important channels of the original (L1), has its batch-norm statistics \
                re-estimated on --calibration-data (adaptive batch norm, as EagleEye does), and is scored by its \
                loss on that data: cross-entropy with --labels, KL divergence from the original without. MACs and \
                sizes are computed exactly. Latency is predicted from a table measured on this machine: every Conv, \
                Gemm and MatMul timed alone (with the batch norm and activation the runtime fuses into it) at a grid \
                of channel counts, plus the rest of the model fitted from two end-to-end runs; --latency-table keeps \
                the table for the next search on the same kind of machine. The fittest candidate is written, \
                fine-tuned when --finetune-epochs is given; the finalists and the chosen model are timed end to \
                end. The report holds the front of accuracy against latency (or MACs).
                """)

        @Argument(help: "The ONNX model to search from.") var model: String
        @Option(name: .long, help: "Samples that score candidates and re-estimate batch norm (.npy or .npz).") var calibrationData: String
        @Option(name: .long, help: "Labels of the calibration samples (int .npy): candidates are scored by cross-entropy (else by KL from the original).") var labels: String?
        @OptionGroup var searching: SearchFlags
        @Option(name: .long, help: "The latency table: read when it was built for this model, machine, threads and batch, else built and written here.") var latencyTable: String?
        @Option(name: .long, help: "Where to write the chosen model (float, pruned; quantize it with model compress).") var out: String

        @Option(name: .long, help: "Kept channel counts are multiples of this (vector widths of the target's kernels).") var roundTo: Int = 1

        @Option(name: .long, help: "Fine-tuning epochs for the chosen model (needs --train-data).") var finetuneEpochs: Int = 0
        @Option(name: .long, help: "Fine-tuning samples (.npy or .npz).") var trainData: String?
        @Option(name: .long, help: "Fine-tuning labels (.npy).") var trainLabels: String?
        @OptionGroup var training: FineTuningFlags

        @Option(name: .long, help: "Evaluation samples for the final figures (.npy or .npz); default: the calibration data.") var valData: String?
        @Option(name: .long, help: "Evaluation labels (.npy).") var valLabels: String?
        @Option(name: .long, help: "Seed of the search (and of fine-tuning).") var seed: UInt64 = 0
        @Option(name: .long, help: "Compute threads.") var threads: Int?
        @Option(name: .long, help: "Write the JSON report here.") var report: String?
        @Flag(name: .long, help: "Print the report as JSON.") var json = false

        func validate() throws {
            guard searching.searches else {
                throw ValidationError("give a budget: --macs-budget, --size-budget or --latency-budget (or several)")
            }
            guard roundTo >= 1 else { throw ValidationError("--round-to must be at least 1") }
            guard training.batchSize >= 2 else { throw ValidationError("--batch-size must be at least 2 (batch statistics)") }
            guard finetuneEpochs >= 0 else { throw ValidationError("--finetune-epochs must not be negative") }
            guard finetuneEpochs == 0 || trainData != nil else { throw ValidationError("--finetune-epochs needs --train-data") }
            guard finetuneEpochs == 0 || trainLabels != nil || training.distill else {
                throw ValidationError("fine-tuning needs --train-labels, or --distill to learn from the original model")
            }
            guard valLabels == nil || valData != nil else { throw ValidationError("--val-labels needs --val-data") }
        }

        func run() throws {
            if let threads { ComputeThreads.set(threads) }
            let clock = ContinuousClock()
            let start = clock.now
            // As `model compress` does: every layer owns its parameters (exporters share equal constants through
            // Identity nodes, which would freeze the groups they join) and attention is spelled head by head.
            let base: Model
            do {
                base = try GraphEditing.prepareForPruning(try Files.readModel(model)).0
            } catch let error as CompressionError {
                throw CLIError("\(model): \(error.message)")
            }
            let calibration = try Files.readDataset(calibrationData, labels: labels, for: base)
            let evaluation = try valData.map { try Files.readDataset($0, labels: valLabels, for: base) } ?? calibration
            let trainingSet = try trainData.map { try Files.readDataset($0, labels: trainLabels, for: base) }
            let batchSize = training.batchSize

            var search: LocalSearch
            do {
                search = try LocalSearch(base: base, minimumFraction: searching.minWidth, steps: searching.steps, roundTo: roundTo,
                                         skipBlocks: searching.skipBlocks, task: training.task)
            } catch let error as CompressionError {
                throw CLIError("\(model): \(error.message)")
            }
            search.batchSize = batchSize
            search.adaptationBatches = searching.adaptationBatches
            let original = try CostModel.measured(base)
            let quiet = json || isatty(STDERR_FILENO) == 0
            let bar = ProgressBar(enabled: !quiet)
            let origin = clock.now
            var probe = LatencyProbe(now: { ContinuousClock.now - origin })
            probe.runs = 20
            probe.budget = .milliseconds(200)
            var latency: (table: LatencyTable, cached: Bool, seconds: Double)?
            if searching.latencyBudget != nil {
                let began = clock.now
                var builder = LatencyTableBuilder(machine: Kernels.cpuInstructionSet, threads: ComputeThreads.current) { session, inputs in
                    try probe.median(session, inputs: inputs)
                }
                builder.batch = searching.latencyBatch
                builder.points = searching.latencyGrid
                do {
                    let expected = try builder.grid(base: base, costs: search.costs)
                    if let path = latencyTable, FileManager.default.fileExists(atPath: path) {
                        let stored = try JSONDecoder().decode(LatencyTable.self, from: Data(try Files.readBytes(path)))
                        if let why = stored.mismatch(machine: builder.machine, threads: builder.threads, batch: searching.latencyBatch, expected: expected) {
                            if !quiet { FileHandle.standardError.write(Data("\(path): \(why); measuring a new table\n".utf8)) }
                        } else {
                            latency = (stored, true, 0)
                        }
                    }
                    if latency == nil {
                        let table = try builder.build(base: base, costs: search.costs, model: search.model) { done, total in
                            bar.update("latency table", done, total, "\(done)/\(total) timings")
                        }
                        bar.finish()
                        if let path = latencyTable { try Files.writeBytes(try jsonBytes(table), to: path) }
                        latency = (table, false, seconds(clock.now - began))
                    }
                    var predictor = try LatencyModel(base: base, costs: search.costs, table: latency!.table)
                    // Re-anchored to the machine's speed now (a table read from a file was measured another time).
                    predictor.scale = latency!.cached ? try timed([base], batch: searching.latencyBatch, probe: probe)[0] / max(latency!.table.fullMilliseconds, 1e-9) : 1
                    search.latencies = [predictor]
                } catch let error as CompressionError {
                    bar.finish()
                    throw CLIError("\(model): \(error.message)")
                } catch let error as DecodingError {
                    throw CLIError("\(latencyTable ?? ""): not a latency table (\(error))")
                }
            }
            var budget = try searching.budget(original: original)
            budget.latencyMs = try searching.latencyBudget.map { try SearchFlags.milliseconds($0) { latency!.table.fullMilliseconds * (search.latencies.first?.scale ?? 1) } }
            var strategy = EvolutionarySearch()
            strategy.evaluations = searching.candidates
            strategy.population = searching.population
            strategy.spread = searching.spread == 0 ? nil : searching.spread
            strategy.parents = max(1, min(searching.population, searching.population / 4))
            strategy.seed = seed

            let found: [SearchCandidate], scores: [Architecture: CandidateScore]
            do {
                (found, scores) = try search.run(budget: budget, strategy: strategy, data: calibration) { done, total in
                    bar.update("search", done, total, "\(done)/\(total) candidates")
                }
                bar.finish()
            } catch let error as CompressionError {
                bar.finish()
                throw CLIError("\(model): \(error.message)")
            }
            guard var best = found.max(by: { $0.fitness != $1.fitness ? $0.fitness < $1.fitness : $0.generation > $1.generation }) else {
                throw CLIError("\(model): the search evaluated no candidate")
            }
            var local = LocalCompression()
            local.batchSize = batchSize
            local.seed = seed
            local.finetuneLearningRate = training.lr
            local.finetuneOptimizer = training.optimizer.kind
            local.augmentation = training.augment
            let teacher = training.distill ? try InferenceSession(model: base) : nil
            // Finalists: a short fine-tuning of each decides (the loss after adaptive batch norm ranks
            // architectures before training, not after it).
            // The base model's outputs on the evaluation data (--val-data: samples the fine-tuning did not see, when
            // given): what the finalists and the chosen model are compared with.
            let reference = try search.baseOutputs(evaluation)
            func measured(_ models: [Model]) throws -> [Double] { try timed(models, batch: searching.latencyBatch, probe: probe) }
            var finalistScores: [SearchReport.Finalist] = []
            var finalistModels: [Model] = []
            if finetuneEpochs > 0, let trainingSet, searching.finalists > 1 {
                var bestFigure = -Double.infinity
                for (k, f) in EvolutionarySearch.finalists(found, count: searching.finalists).enumerated() {
                    bar.update("finalists", k, searching.finalists, "\(k)/\(searching.finalists) fine-tuned")
                    var m = try CandidateEvaluation.adaptBatchNorm(try search.model(f.architecture), data: calibration,
                                                                   batchSize: batchSize, batches: searching.adaptationBatches)
                    (m, _) = try local.finetune(m, teacher: teacher, data: trainingSet, epochs: searching.finalistEpochs, task: search.task)
                    let s = try CandidateEvaluation.score(m, data: evaluation, baseOutputs: reference, task: search.task, batchSize: batchSize)
                    let figure = s.accuracy ?? s.evaluation.agreementRate ?? -s.meanLoss
                    finalistModels.append(m)
                    finalistScores.append(SearchReport.Finalist(widths: search.space.describe(f.architecture), macs: f.cost.macs,
                                                                predictedMs: f.cost.latencyMs, measuredMs: nil,
                                                                loss: s.meanLoss, accuracy: s.accuracy, agreement: s.evaluation.agreementRate ?? 0))
                    if figure > bestFigure {
                        bestFigure = figure
                        best = f
                    }
                }
                bar.finish()
            }
            let searched = clock.now
            func point(_ c: SearchCandidate) -> SearchReport.Point {
                let s = scores[c.architecture]
                return SearchReport.Point(widths: search.space.describe(c.architecture), macs: c.cost.macs, parameters: c.cost.parameters,
                                          parameterBytes: c.cost.parameterBytes, latencyMs: c.cost.latencyMs, loss: s?.meanLoss ?? .infinity,
                                          accuracy: s?.accuracy, agreement: s?.evaluation.agreementRate ?? 0, generation: c.generation)
            }

            // The chosen model: inherited weights, batch norm re-estimated, fine-tuned when asked.
            var chosen = try CandidateEvaluation.adaptBatchNorm(try search.model(best.architecture), data: calibration,
                                                                batchSize: batchSize, batches: searching.adaptationBatches)
            if finetuneEpochs > 0, let trainingSet {
                local.trainingProgress = { epoch, epochs, step, steps, loss in
                    bar.update(String(format: "fine-tune epoch %d/%d", epoch + 1, epochs), step, steps,
                               String(format: "%d/%d loss %.4f", step, steps, loss))
                }
                (chosen, _) = try local.finetune(chosen, teacher: teacher, data: trainingSet, epochs: finetuneEpochs, task: search.task)
                bar.finish()
            }
            let finalOutputs = try local.logits(try InferenceSession(model: chosen), evaluation)
            let figures = try local.evaluate(search.task, base: reference, compressed: finalOutputs, data: evaluation)
            try Files.writeModel(chosen, to: out)
            let latencyFigures = try latency.map { l in
                // The original, the uniform architecture, the chosen model and the finalists, timed together.
                let times = try measured([base, try search.model(found[0].architecture), chosen] + finalistModels)
                for k in finalistScores.indices { finalistScores[k].measuredMs = times[3 + k] }
                return SearchReport.Latency(
                    machine: l.table.machine, threads: l.table.threads, batch: l.table.batch, layers: l.table.layers.count,
                    points: searching.latencyGrid, cached: l.cached, tableSeconds: l.seconds, scale: search.latencies.first?.scale ?? 1, baseMs: times[0],
                    uniformPredictedMs: found[0].cost.latencyMs ?? 0, uniformMeasuredMs: times[1],
                    chosenPredictedMs: best.cost.latencyMs ?? 0, chosenMeasuredMs: times[2])
            }

            let result = SearchReport(
                model: model, budget: budget, base: original, evaluations: found.count, seed: seed,
                uniform: point(found[0]), chosen: point(best), front: EvolutionarySearch.front(found).map(point),
                finalists: finalistScores, finetuneEpochs: finetuneEpochs, baseAccuracy: figures.baseAccuracy, finalAccuracy: figures.compressedAccuracy,
                finalAgreement: figures.agreementRate, latency: latencyFigures,
                seconds: ["search": seconds(searched - start), "total": seconds(clock.now - start)])
            if let report { try Files.writeBytes(try jsonBytes(result), to: report) }
            if json {
                try printJSON(result)
            } else {
                printSummary(result)
            }
        }

        /// End-to-end milliseconds of models at `batch` (on deterministic inputs): three passes over them, alternately
        /// forward and backward, each model's figure the median of its passes (as the latency table is built).
        func timed(_ models: [Model], batch: Int, probe: LatencyProbe) throws -> [Double] {
            let sessions = try models.map { try InferenceSession(model: $0) }
            let feeds = try models.map { m -> [String: Tensor] in
                var generator = WhittleNN.SplitMix64(seed: 5)
                return try ShapeInference.inputShapes(m, batchSize: batch).mapValues { type, shape in
                    type.isInteger ? Tensor(shape: shape, ints: [Int64](repeating: 1, count: shape.reduce(1, *)), dtype: type)
                        : Tensor(shape: shape, floats: (0..<shape.reduce(1, *)).map { _ in generator.nextFloat() * 2 - 1 })
                }
            }
            var times = [[Double]](repeating: [], count: models.count)
            for pass in 0..<3 {
                for k in (pass % 2 == 0 ? Array(models.indices) : models.indices.reversed()) {
                    times[k].append(try probe.median(sessions[k], inputs: feeds[k]))
                }
            }
            return times.map { $0.sorted()[1] }
        }

        func printSummary(_ r: SearchReport) {
            func percent(_ v: Double?) -> String { v.map { String(format: "%.2f %%", $0 * 100) } ?? "–" }
            func row(_ name: String, _ p: SearchReport.Point) -> [String] {
                [name, "\(p.macs)", byteSize(p.parameterBytes), String(format: "%.4f", p.loss), percent(p.accuracy), percent(p.agreement)]
            }
            var budget: [String] = []
            if let m = r.budget.macs { budget.append("\(m) MACs") }
            if let b = r.budget.parameterBytes { budget.append(byteSize(b)) }
            if let l = r.budget.latencyMs, let t = r.latency { budget.append(String(format: "%.3f ms at batch %d", l, t.batch)) }
            print("searched \(r.evaluations) candidates under \(budget.joined(separator: " and ")) in \(String(format: "%.1f", r.seconds["search"] ?? 0)) s "
                  + "(original: \(r.base.macs) MACs, \(byteSize(r.base.parameterBytes)))")
            print(table(["candidate", "MACs", "size", "loss", "accuracy", "agreement"],
                        [row("uniform widths", r.uniform), row("chosen", r.chosen)], numeric: [1, 2, 3, 4, 5]))
            print("front (\(r.front.count) candidates): " + r.front.map { p in
                (p.latencyMs.map { String(format: "%.3f ms", $0) } ?? "\(p.macs) MACs") + String(format: " loss %.4f", p.loss)
            }.joined(separator: "; "))
            if let t = r.latency {
                print(String(format: "latency table: %d layers, %@ (%@, %d threads, batch %d)", t.layers,
                             t.cached ? String(format: "read from --latency-table, scaled by %.3f to this machine's speed now", t.scale)
                                 : String(format: "measured in %.1f s", t.tableSeconds), t.machine, t.threads, t.batch))
                print(String(format: "latency measured end to end: original %.3f ms; uniform %.3f ms (predicted %.3f); chosen %.3f ms (predicted %.3f)",
                             t.baseMs, t.uniformMeasuredMs, t.uniformPredictedMs, t.chosenMeasuredMs, t.chosenPredictedMs))
                if let limit = r.budget.latencyMs, t.chosenMeasuredMs > limit {
                    print(String(format: "note: the chosen model measured %.1f %% above the latency budget (the prediction was %.1f %% off)",
                                 (t.chosenMeasuredMs / limit - 1) * 100, (t.chosenPredictedMs / t.chosenMeasuredMs - 1) * 100))
                }
            }
            for (k, f) in r.finalists.enumerated() {
                print(String(format: "finalist %d%@: %d MACs, after a short fine-tuning accuracy %@, agreement %@", k + 1,
                             k == 0 ? " (uniform)" : "", f.macs, percent(f.accuracy), percent(f.agreement)))
            }
            let widths = r.chosen.widths.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            print("chosen widths: \(widths)")
            if r.finetuneEpochs > 0 || r.finalAccuracy != nil {
                print("after \(r.finetuneEpochs) fine-tuning epoch(s): accuracy \(percent(r.baseAccuracy)) → \(percent(r.finalAccuracy)), agreement \(percent(r.finalAgreement))")
            }
            print(String(format: "wrote %@ (%.1f s)", out, r.seconds["total"] ?? 0))
        }
    }
}
