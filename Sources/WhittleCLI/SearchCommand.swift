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
        /// Mean loss after adaptive batch norm (cross-entropy with labels, KL from the base model without).
        public var loss: Double
        public var accuracy: Double?
        public var agreement: Double
        public var generation: Int
    }

    public struct Finalist: Codable, Sendable {
        public var widths: [String: Int]
        public var macs: Int
        public var loss: Double
        public var accuracy: Double?
        public var agreement: Double
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
    public var seconds: [String: Double]
}

extension ModelCommand {
    struct Search: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Search channel widths per layer group under a MACs or size budget and write the chosen model.",
            discussion: """
                An evolutionary search over the widths of every prunable dependency group (a ladder of --steps \
                steps from --min-width of the channels to all of them, multiples of --round-to). Each candidate \
                inherits the most important channels of the original (L1), has its batch-norm statistics \
                re-estimated on --calibration-data (adaptive batch norm, as EagleEye does), and is scored by its \
                loss on that data: cross-entropy with --labels, KL divergence from the original without. MACs and \
                sizes are computed exactly. The fittest candidate is written, fine-tuned when --finetune-epochs is \
                given; the report holds the front of accuracy against MACs.
                """)

        @Argument(help: "The ONNX model to search from.") var model: String
        @Option(name: .long, help: "Samples that score candidates and re-estimate batch norm (.npy or .npz).") var calibrationData: String
        @Option(name: .long, help: "Labels of the calibration samples (int .npy): candidates are scored by cross-entropy (else by KL from the original).") var labels: String?
        @Option(name: .long, help: "Largest MACs per sample: a count (12000000, 12M, 1.5G) or a share of the original's (25%).") var macsBudget: String?
        @Option(name: .long, help: "Largest size of the float parameters: bytes (40KB, 2MB) or a share of the original's (30%).") var sizeBudget: String?
        @Option(name: .long, help: "Where to write the chosen model (float, pruned; quantize it with model compress).") var out: String

        @Option(name: .long, help: "Candidates evaluated in all.") var candidates: Int = 160
        @Option(name: .long, help: "Candidates per generation.") var population: Int = 32
        @Option(name: .long, help: "Each group's width stays between 1/S and S times the uniform share that fills the budget (0, the default: anywhere on the ladder).") var spread: Double = 0
        @Option(name: .long, help: "Smallest width of a group, as a fraction of its channels.") var minWidth: Double = SearchSpace.defaultMinimumFraction
        @Option(name: .long, help: "Steps of the width ladder between the smallest width and all channels.") var steps: Int = SearchSpace.defaultSteps
        @Option(name: .long, help: "Kept channel counts are multiples of this (vector widths of the target's kernels).") var roundTo: Int = 1
        @Option(name: .long, help: "Batches that re-estimate each candidate's batch-norm statistics.") var adaptationBatches: Int = CandidateEvaluation.defaultAdaptationBatches
        @Option(name: .long, help: "With --finetune-epochs: the fittest candidates (the uniform one among them) fine-tuned briefly and scored on --val-data (else the calibration data), the best of them chosen.") var finalists: Int = 4
        @Option(name: .long, help: "Fine-tuning epochs of each finalist.") var finalistEpochs: Int = 1

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
            guard macsBudget != nil || sizeBudget != nil else { throw ValidationError("give a budget: --macs-budget or --size-budget (or both)") }
            guard candidates >= 1 else { throw ValidationError("--candidates must be at least 1") }
            guard population >= 2 else { throw ValidationError("--population must be at least 2") }
            guard spread == 0 || spread >= 1 else { throw ValidationError("--spread must be 0 (no bound) or at least 1") }
            guard minWidth > 0, minWidth <= 1 else { throw ValidationError("--min-width must be in (0, 1]") }
            guard steps >= 1, steps <= 256 else { throw ValidationError("--steps must be 1 to 256") }
            guard roundTo >= 1 else { throw ValidationError("--round-to must be at least 1") }
            guard finalists >= 1 else { throw ValidationError("--finalists must be at least 1") }
            guard finalistEpochs >= 1 else { throw ValidationError("--finalist-epochs must be at least 1") }
            guard adaptationBatches >= 1 else { throw ValidationError("--adaptation-batches must be at least 1") }
            guard training.batchSize >= 2 else { throw ValidationError("--batch-size must be at least 2 (batch statistics)") }
            guard finetuneEpochs >= 0 else { throw ValidationError("--finetune-epochs must not be negative") }
            guard finetuneEpochs == 0 || trainData != nil else { throw ValidationError("--finetune-epochs needs --train-data") }
            guard finetuneEpochs == 0 || trainLabels != nil || training.distill else {
                throw ValidationError("fine-tuning needs --train-labels, or --distill to learn from the original model")
            }
            guard valLabels == nil || valData != nil else { throw ValidationError("--val-labels needs --val-data") }
        }

        /// A budget figure: a share of the original's (`25%`), or an absolute count with an optional K, M or G
        /// (powers of 1000 for MACs; sizes take `parseByteSize`'s units).
        static func figure(_ text: String, of original: Int, bytes: Bool, flag: String) throws -> Int {
            let trimmed = text.trimmingCharacters(in: .whitespaces)
            if trimmed.hasSuffix("%") {
                guard let share = Double(trimmed.dropLast()), share > 0, share <= 100 else {
                    throw ValidationError("\(flag) '\(text)': a share must be in (0, 100] %")
                }
                return Int(Double(original) * share / 100)
            }
            if bytes {
                guard let n = parseByteSize(trimmed) else { throw ValidationError("\(flag) '\(text)' is not a size like 40KB or 30%") }
                return n
            }
            let multipliers: [Character: Double] = ["K": 1e3, "M": 1e6, "G": 1e9]
            let unit = trimmed.last.flatMap { multipliers[Character($0.uppercased())] }
            guard let value = Double(unit == nil ? trimmed : String(trimmed.dropLast())), value > 0, value.isFinite else {
                throw ValidationError("\(flag) '\(text)' is not a count like 12000000, 12M or 25%")
            }
            return Int(value * (unit ?? 1))
        }

        func run() throws {
            if let threads { ComputeThreads.set(threads) }
            let clock = ContinuousClock()
            let start = clock.now
            let base = try Files.readModel(model)
            let calibration = try Files.readDataset(calibrationData, labels: labels, for: base)
            let evaluation = try valData.map { try Files.readDataset($0, labels: valLabels, for: base) } ?? calibration
            let trainingSet = try trainData.map { try Files.readDataset($0, labels: trainLabels, for: base) }
            let batchSize = training.batchSize

            var search: LocalSearch
            do {
                search = try LocalSearch(base: base, minimumFraction: minWidth, steps: steps, roundTo: roundTo, task: training.task)
            } catch let error as CompressionError {
                throw CLIError("\(model): \(error.message)")
            }
            search.batchSize = batchSize
            search.adaptationBatches = adaptationBatches
            let original = try CostModel.measured(base)
            let budget = SearchBudget(
                macs: try macsBudget.map { try Self.figure($0, of: original.macs, bytes: false, flag: "--macs-budget") },
                parameterBytes: try sizeBudget.map { try Self.figure($0, of: original.parameterBytes, bytes: true, flag: "--size-budget") })
            var strategy = EvolutionarySearch()
            strategy.evaluations = candidates
            strategy.population = population
            strategy.spread = spread == 0 ? nil : spread
            strategy.parents = max(1, min(population, population / 4))
            strategy.seed = seed

            let quiet = json || isatty(STDERR_FILENO) == 0
            let bar = ProgressBar(enabled: !quiet)
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
            var finalistScores: [SearchReport.Finalist] = []
            if finetuneEpochs > 0, let trainingSet, finalists > 1 {
                var bestFigure = -Double.infinity
                for (k, f) in EvolutionarySearch.finalists(found, count: finalists).enumerated() {
                    bar.update("finalists", k, finalists, "\(k)/\(finalists) fine-tuned")
                    var m = try CandidateEvaluation.adaptBatchNorm(try search.model(f.architecture), data: calibration,
                                                                   batchSize: batchSize, batches: adaptationBatches)
                    (m, _) = try local.finetune(m, teacher: teacher, data: trainingSet, epochs: finalistEpochs, task: search.task)
                    let s = try CandidateEvaluation.score(m, data: evaluation, baseOutputs: reference, task: search.task, batchSize: batchSize)
                    let figure = s.accuracy ?? s.evaluation.agreementRate ?? -s.meanLoss
                    finalistScores.append(SearchReport.Finalist(widths: search.space.describe(f.architecture), macs: f.cost.macs,
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
                                          parameterBytes: c.cost.parameterBytes, loss: s?.meanLoss ?? .infinity,
                                          accuracy: s?.accuracy, agreement: s?.evaluation.agreementRate ?? 0, generation: c.generation)
            }

            // The chosen model: inherited weights, batch norm re-estimated, fine-tuned when asked.
            var chosen = try CandidateEvaluation.adaptBatchNorm(try search.model(best.architecture), data: calibration,
                                                                batchSize: batchSize, batches: adaptationBatches)
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

            let result = SearchReport(
                model: model, budget: budget, base: original, evaluations: found.count, seed: seed,
                uniform: point(found[0]), chosen: point(best), front: EvolutionarySearch.front(found).map(point),
                finalists: finalistScores, finetuneEpochs: finetuneEpochs, baseAccuracy: figures.baseAccuracy, finalAccuracy: figures.compressedAccuracy,
                finalAgreement: figures.agreementRate,
                seconds: ["search": seconds(searched - start), "total": seconds(clock.now - start)])
            if let report { try Files.writeBytes(try jsonBytes(result), to: report) }
            if json {
                try printJSON(result)
            } else {
                printSummary(result)
            }
        }

        func printSummary(_ r: SearchReport) {
            func percent(_ v: Double?) -> String { v.map { String(format: "%.2f %%", $0 * 100) } ?? "–" }
            func row(_ name: String, _ p: SearchReport.Point) -> [String] {
                [name, "\(p.macs)", byteSize(p.parameterBytes), String(format: "%.4f", p.loss), percent(p.accuracy), percent(p.agreement)]
            }
            var budget: [String] = []
            if let m = r.budget.macs { budget.append("\(m) MACs") }
            if let b = r.budget.parameterBytes { budget.append(byteSize(b)) }
            print("searched \(r.evaluations) candidates under \(budget.joined(separator: " and ")) in \(String(format: "%.1f", r.seconds["search"] ?? 0)) s "
                  + "(original: \(r.base.macs) MACs, \(byteSize(r.base.parameterBytes)))")
            print(table(["candidate", "MACs", "size", "loss", "accuracy", "agreement"],
                        [row("uniform widths", r.uniform), row("chosen", r.chosen)], numeric: [1, 2, 3, 4, 5]))
            print("front (\(r.front.count) candidates): " + r.front.map { String(format: "%d MACs loss %.4f", $0.macs, $0.loss) }.joined(separator: "; "))
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
