import ArgumentParser
import Foundation
import WhittleServer
import WhittleCLI
import WhittleIO
import WhittleCompression
import WhittleHTTPClient
import WhittleONNX
import WhittleRounds

extension PickRule: ExpressibleByArgument {}

/// `coordinator round start|status|list|pick|cancel|fetch`.
public struct RoundCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "round", abstract: "Federated compression rounds.",
        subcommands: [Start.self, Status.self, List.self, Pick.self, Cancel.self, Fetch.self])

    public init() {}

    struct Common: ParsableArguments {
        @Option(name: .long, help: "The coordinator's data directory (for its admin certificate).") var dir: String
        @Option(name: .long, help: "The server's URL (default: from the data directory).") var server: String?
    }

    static func decoder() -> JSONDecoder {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return d
    }

    static func view(_ client: HTTPClient, _ id: String) throws -> RoundView {
        let response = try adminRequest(client, "GET", "/admin/v1/rounds/" + escaped(id))
        return try decoder().decode(RoundView.self, from: Data(response.body))
    }

    static func escaped(_ id: String) -> String { id.addingPercentEncoding(withAllowedCharacters: CharacterSet(charactersIn: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")) ?? id }

    static func percent(_ v: Double?) -> String { v.map { String(format: "%.2f %%", $0 * 100) } ?? "–" }
    static func ms(_ v: Double?) -> String { v.map { String(format: "%.2f ms", $0) } ?? "–" }

    /// The per-site before/after table, with the columns of the task's metrics that some site has.
    static func sitesTable(_ sites: [CompressionReport.Site]) -> String {
        var headers = ["worker", "samples", "accuracy before", "accuracy after"]
        var columns: [(CompressionReport.Site) -> String] = [{ percent($0.accuracyBefore) }, { percent($0.accuracyAfter) }]
        if sites.contains(where: { $0.meanIoUAfter != nil }) {
            headers += ["mIoU before", "mIoU after"]
            columns += [{ percent($0.meanIoUBefore) }, { percent($0.meanIoUAfter) }]
        }
        headers.append("agreement")
        columns.append { percent($0.agreement) }
        if sites.contains(where: { $0.relativeError != nil }) {
            headers.append("rel. error")
            columns.append { $0.relativeError.map { String(format: "%.4f", $0) } ?? "–" }
        }
        if sites.contains(where: { $0.meanCosine != nil }) {
            headers.append("cosine")
            columns.append { $0.meanCosine.map { String(format: "%.4f", $0) } ?? "–" }
        }
        headers += ["latency before", "latency after", "speed-up"]
        columns += [{ ms($0.latencyBeforeMs) }, { ms($0.latencyAfterMs) }, { times($0.speedup) }]
        if sites.contains(where: { $0.workingSpeedup != nil }) {
            headers.append("at working batch")
            columns.append { s in s.workingSpeedup.map { times($0.speedup) + " @\($0.batch)" } ?? "–" }
        }
        headers += ["up", "down", "model"]
        return table(headers, sites.map { s in
            [s.worker, "\(s.samples)"] + columns.map { $0(s) }
                + [byteSize(s.bytesUp), byteSize(s.bytesDown), s.received ? "received" : "–"]
        }, numeric: Set(1..<(headers.count - 1)))
    }

    static func times(_ v: Double?) -> String { v.map { String(format: "%.2f×", $0) } ?? "–" }

    /// The fleet's speed-up under the sites table, with where the latencies were measured.
    static func fleetLine(_ sites: [CompressionReport.Site]) -> String? {
        guard let fleet = CompressionReport.FleetSpeedup(sites) else { return nil }
        var line = "fleet speed-up \(times(fleet.batchOne)) at batch 1"
        if let working = fleet.workingBatch { line += ", \(times(working)) at the working batch" }
        line += " (geometric mean of \(fleet.sites) site\(fleet.sites == 1 ? "" : "s"); medians"
        let machines = Set(sites.compactMap { s in s.cpu.map { cpu in "\(cpu), \(s.threads ?? 0) thread\(s.threads == 1 ? "" : "s")" } })
        if !machines.isEmpty { line += " on " + machines.sorted().joined(separator: "; ") }
        return line + "; p90 in --json)"
    }

    static func phasesTable(_ v: RoundView) -> String {
        table(["#", "phase", "state", "reports", "refused", "bytes up", "seconds"], v.phases.map { p in
            ["\(p.index + 1)", p.label, p.state, "\(p.reports)", "\(p.refused)", byteSize(p.bytesUp),
             p.startedAt.map { s in String(format: "%.1f", (p.endedAt ?? Date().timeIntervalSince1970) - s) } ?? "–"]
        }, numeric: [0, 3, 4, 5, 6])
    }

    static func summary(_ v: RoundView) -> String {
        var lines = ["round \(v.id): \(v.state.rawValue)" + (v.message.map { " — \($0)" } ?? "")]
        if v.state != .succeeded { lines.append("at phase \(v.phase + 1)/\(v.phaseCount): \(v.phaseLabel), \(v.assigned) workers assigned") }
        lines.append(phasesTable(v))
        if !v.sites.isEmpty {
            lines.append("")
            lines.append(sitesTable(v.sites))
            if let fleet = fleetLine(v.sites) { lines.append(fleet) }
        }
        return lines.joined(separator: "\n")
    }

    /// Follows a round until it ends: a line per phase change (a live line on a terminal). Exits non-zero when the
    /// round did not succeed.
    static func follow(_ client: HTTPClient, _ id: String, json: Bool) throws {
        // On a terminal: a progress bar on standard error (phases done of all, and the open phase's reports);
        // otherwise a line per change on standard output.
        let bar = ProgressBar(enabled: !json)
        var last = ""
        while true {
            let v = try view(client, id)
            let p = v.phases[min(v.phase, v.phases.count - 1)]
            let line = "[\(v.phase + 1)/\(v.phaseCount)] \(v.phaseLabel): \(p.reports)/\(max(v.assigned, p.reports)) reports"
            if !v.state.ended, p.state == "waiting" {
                // The operator's turn (`--pick operator`): following on would wait for ever.
                bar.finish()
                if json { try printJSON(v) } else {
                    print("round \(id) waits at \(v.phaseLabel) for the operator: see the candidates with `coordinator round pick \(id)`, then pick one with --candidate N (or --best)")
                }
                return
            }
            if v.state.ended {
                bar.finish()
                if json { try printJSON(v) } else { print(summary(v)) }
                guard v.state == .succeeded else { throw ExitCode(1) }
                return
            }
            if bar.enabled {
                bar.update("round", v.phase, v.phaseCount, line, force: true)
            } else if line != last, !json {
                print(line)
            }
            last = line
            Thread.sleep(forTimeInterval: 0.5)
        }
    }

    public struct Start: ParsableCommand {
        public static let configuration = CommandConfiguration(
            abstract: "Start a federated compression round on the enrolled workers.",
            discussion: """
                The plan is checked against the model first (prunable groups, quantization policy, trainability). \
                Phases: [fisher] → per pruning step: [importance] → prune → fine-tune rounds → [normalization passes] → \
                [fold → ranges → histograms → QAT rounds] → export → evaluate → distribute. With --macs-budget or \
                --size-budget instead of a pruning ratio, an architecture search replaces the pruning steps: one \
                search phase per generation (every worker scores the generation's candidate widths on its own data \
                after re-estimating their batch-norm statistics; the scores are summed over the fleet), then pick \
                (the fittest candidate within the budget is cut from the model), then the fine-tune rounds.
                """)

        @OptionGroup var common: Common
        @Option(name: .long, help: "The base model (ONNX).") var model: String?
        @Option(name: .long, help: "Start from this earlier round's fine-tuned float model instead of --model.") var fromRound: String?
        @OptionGroup var pruning: PruningFlags
        @OptionGroup var searching: SearchFlags
        @Option(name: .long, help: "FedAvg rounds after each pruning step.") var finetuneRounds: Int = 0
        @Option(name: .long, help: "Local epochs per fine-tune round.") var localEpochs: Int = 1
        @OptionGroup var training: FineTuningFlags
        @Option(name: .long, parsing: .singleValue, help: "Size of one sample of an input with a free dimension besides the batch, NAME=DIMS (e.g. input_ids=1x128), for the report's MACs.") var shape: [String] = []
        @Flag(name: .long, help: "Workers continue their local optimizer's state (momentum, moments) from round to round instead of starting afresh.") var keepOptimizerState = false
        @Option(name: .long, help: "EWC penalty weight towards the starting model (adds a Fisher phase).") var ewc: Float?
        @Option(name: .long, help: "none, int8, int4-weights or mixed.") var quantize: QuantizationMode = .int8
        @OptionGroup var quantization: QuantizationFlags
        @Option(name: .long, help: "Batch-norm statistics passes after fine-tuning (0: FedAvg's averaged statistics; one per BatchNormalization node: exact population statistics).") var bnPasses: Int?
        @Option(name: .long, help: "Quantization-aware FedAvg rounds after calibration (int8).") var qatRounds: Int = 0
        @Option(name: .long, help: "Learning rate of the QAT rounds (default: a tenth of --lr).") var qatLr: Float?
        @Option(name: .long, help: "Quorum: reports a phase needs.") var minWorkers: Int = 1
        @Option(name: .long, help: "Tasks handed out per training/statistics phase (over-selection; default: all eligible).") var workersPerPhase: Int?
        @Option(name: .long, help: "Deadline per phase: 90s, 10m, 1h.") var phaseDeadline: String = "10m"
        @Option(name: .long, help: "fedavg, trimmed-mean or median.") var aggregation: String = "fedavg"
        @Option(name: .long, help: "Clip each worker's delta to this L2 norm (default: --clip-multiple).") var clipNorm: Double?
        @Option(name: .long, help: "Without --clip-norm: clip each delta to this multiple of the previous training phase's median update norm (the first phase: the model's parameter norm); 0: no clipping.") var clipMultiple: Double = 3
        @Option(name: .long, help: "Quality gate: distribute only if the compressed model agrees with the base on at least this fraction of the fleet's evaluation samples.") var minAgreement: Double = 0.3
        @Option(name: .long, help: "Quality gate: distribute only if labelled accuracy falls by at most this fraction (0.25: 25 points).") var maxAccuracyDrop: Double = 0.25
        @Option(name: .long, help: "Server momentum β for fine-tuning rounds (FedAvgM; 0: plain FedAvg).") var serverMomentum: Double = 0
        @Option(name: .long, help: "Server learning rate η applied to the averaged delta (or velocity).") var serverLr: Double = 1
        @Option(name: .long, help: "none or int8 (per tensor, error feedback on the worker).") var deltaCompression: String = "none"
        @Option(name: .long, help: "Seed for the workers' shuffling.") var seed: UInt64 = 0
        @Flag(name: .long, inversion: .prefixedNo, help: "Sum the workers' updates and calibration statistics under secure aggregation (SecAgg+): the coordinator sees only sums (default: the coordinator's secure_aggregation setting; docs/security.md).") var secureAggregation: Bool?
        @Option(name: .long, help: "Differential privacy: the round's ε per site (user-level) over its training sums; needs --secure-aggregation and --clip-norm.") var dpEpsilon: Double?
        @Option(name: .long, help: "Differential privacy: the round's δ.") var dpDelta: Double = PrivacyPlan.defaultDelta
        @Option(name: .long, help: "A public bound R on the activations: the range pass sums signed histograms over [-R, R] instead of each board's minimum and maximum (needed by --secure-aggregation when quantizing).") var calibrationRange: Double?
        @Option(name: .long, help: "After a search: best-under-budget (the round picks and goes on) or operator (the round waits for coordinator round pick).") var pick: PickRule = .bestUnderBudget
        @Flag(name: .long, help: "Follow the round until it ends.") var wait = false
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        public init() {}

        func choice<T: RawRepresentable & CaseIterable>(_ text: String, _ flag: String) throws -> T where T.RawValue == String {
            guard let v = T(rawValue: text) else {
                throw ValidationError("\(flag) must be one of \(T.allCases.map(\.rawValue).joined(separator: ", ")), not '\(text)'")
            }
            return v
        }

        func plan() throws -> RoundPlan {
            var p = RoundPlan()
            p.fromRound = fromRound
            p.pruneRatio = pruning.pruneRatio
            if pruning.schedule != nil { p.schedule = try pruning.steps() }
            p.scope = pruning.pruneScope
            p.importance = pruning.importance
            p.roundTo = pruning.roundTo
            p.minChannels = pruning.minChannels
            p.maxLayerRatio = pruning.maxLayerRatio
            if searching.searches {
                var search = SearchPlan()
                search.candidates = searching.candidates
                search.population = searching.population
                search.minimumFraction = searching.minWidth
                search.steps = searching.steps
                search.spread = searching.spread == 0 ? nil : searching.spread
                search.skipBlocks = searching.skipBlocks ? true : nil
                search.adaptationBatches = searching.adaptationBatches
                search.latencyBatch = searching.latencyBatch
                search.latencyGrid = searching.latencyGrid
                search.finalists = searching.finalists
                search.finalistEpochs = searching.finalistEpochs
                search.pick = pick == .bestUnderBudget ? nil : pick
                // A latency share is resolved on the fleet (of the original's time on the slowest kind of board);
                // MACs and size shares against the model in `run`.
                if let share = try searching.latencyShare() {
                    search.latencyShare = share
                } else if let latency = searching.latencyBudget {
                    search.budget.latencyMs = try SearchFlags.milliseconds(latency) { 0 }
                }
                p.search = search
            }
            p.finetuneRounds = finetuneRounds
            p.localEpochs = localEpochs
            p.learningRate = training.lr
            p.optimizer = training.optimizer
            p.batchSize = training.batchSize
            p.distill = training.distill
            p.augmentation = training.augment
            p.task = training.task
            p.inputSizes = shape.isEmpty ? nil : try parseShapeSizes(shape)
            p.keepOptimizerState = keepOptimizerState ? true : nil
            p.ewcLambda = ewc
            p.quantize = quantize
            p.calibration = quantization.calibration
            p.perChannel = !quantization.perTensor
            p.reduceRange = quantization.reduceRange
            p.int4BlockSize = quantization.int4BlockSize
            p.int4Format = quantization.int4Format
            p.compactNames = quantization.compactNames
            p.normalizationPasses = bnPasses
            p.qatRounds = qatRounds
            p.qatLearningRate = qatLr
            p.minWorkers = minWorkers
            p.workersPerPhase = workersPerPhase
            guard let deadline = TokenCommand.Create.seconds(phaseDeadline) else {
                throw ValidationError("--phase-deadline '\(phaseDeadline)' is not a duration like 90s, 10m or 1h")
            }
            p.phaseDeadlineSeconds = deadline
            p.aggregation = try choice(aggregation, "--aggregation")
            p.clipNorm = clipNorm
            p.clipMultiple = clipMultiple
            p.minAgreement = minAgreement
            p.maxAccuracyDrop = maxAccuracyDrop
            p.serverMomentum = serverMomentum
            p.serverLearningRate = serverLr
            p.deltaCompression = try choice(deltaCompression, "--delta-compression")
            p.seed = seed
            p.secureAggregation = secureAggregation
            p.calibrationRange = calibrationRange
            p.privacy = dpEpsilon.map { PrivacyPlan(epsilon: $0, delta: dpDelta) }
            return p
        }

        public func validate() throws {
            guard (model == nil) != (fromRound == nil) else { throw ValidationError("give --model or --from-round (one of them)") }
            if fromRound != nil, [searching.macsBudget, searching.sizeBudget].contains(where: { $0?.hasSuffix("%") == true }) {
                throw ValidationError("with --from-round the model is on the coordinator: give the search budget as a figure (12M, 40KB), not a share")
            }
            _ = try plan()
        }

        public func run() throws {
            var plan = try plan()
            if plan.search != nil, model == nil {
                let figures = try searching.budget(original: ArchitectureCost(macs: 0, parameters: 0, parameterBytes: 0))
                plan.search!.budget.macs = figures.macs
                plan.search!.budget.parameterBytes = figures.parameterBytes
            }
            let client = try adminClient(common.dir, server: common.server)
            if let model {
                let bytes = try Files.readBytes(model)
                plan.modelName = URL(fileURLWithPath: model).lastPathComponent
                plan.modelSHA256 = String(repeating: "0", count: 64)
                // The same checks the coordinator makes, before uploading anything.
                do {
                    let base = try Files.readModel(model)
                    if plan.search != nil {
                        let figures = try searching.budget(original: try CostModel.measured(base))
                        plan.search!.budget.macs = figures.macs
                        plan.search!.budget.parameterBytes = figures.parameterBytes
                    }
                    try plan.validate(model: base)
                } catch let error as CompressionError {
                    throw CLIError("\(model): \(error.message)")
                } catch let error as ONNXError {
                    throw CLIError("\(model): \(error.message)")
                }
                client.timeout = 600
                let uploaded = try adminRequest(client, "POST", "/admin/v1/artifacts", body: bytes, contentType: "application/octet-stream")
                let object = try JSONDecoder().decode([String: String].self, from: Data(uploaded.body))
                plan.modelSHA256 = object["sha256"] ?? ""
            }
            let response = try adminRequest(client, "POST", "/admin/v1/rounds", body: Array(try JSONEncoder().encode(plan)))
            let view = try RoundCommand.decoder().decode(RoundView.self, from: Data(response.body))
            if wait {
                if !json { print("round \(view.id) started: \(view.phaseCount) phases") }
                try RoundCommand.follow(client, view.id, json: json)
            } else if json {
                print(response.text)
            } else {
                print(view.id)
            }
        }
    }

    public struct Status: ParsableCommand {
        public static let configuration = CommandConfiguration(abstract: "Show a round: its phases, reports and sites.")
        @Argument(help: "The round's id.") var id: String
        @OptionGroup var common: Common
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false
        @Flag(name: .long, help: "Follow the round until it ends.") var wait = false
        public init() {}

        public func run() throws {
            let client = try adminClient(common.dir, server: common.server)
            if wait { return try RoundCommand.follow(client, id, json: json) }
            let v = try RoundCommand.view(client, id)
            if json { try printJSON(v) } else { print(RoundCommand.summary(v)) }
        }
    }

    public struct List: ParsableCommand {
        public static let configuration = CommandConfiguration(abstract: "List rounds, newest first.")
        @OptionGroup var common: Common
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false
        public init() {}

        public func run() throws {
            let response = try adminRequest(try adminClient(common.dir, server: common.server), "GET", "/admin/v1/rounds")
            if json { print(response.text); return }
            let views = try RoundCommand.decoder().decode([RoundView].self, from: Data(response.body))
            guard !views.isEmpty else { print("no rounds yet"); return }
            let f = ISO8601DateFormatter()
            print(table(["id", "state", "phase", "model", "started", "ended"], views.map { v in
                [v.id, v.state.rawValue, "\(v.phase + 1)/\(v.phaseCount) \(v.phaseLabel)", v.plan.modelName, f.string(from: v.createdAt),
                 v.endedAt.map { f.string(from: $0) } ?? "–"]
            }))
        }
    }

    public struct Pick: ParsableCommand {
        public static let configuration = CommandConfiguration(
            abstract: "Show a search round's candidates, or pick the architecture a round started with --pick operator fine-tunes.",
            discussion: """
                Without --candidate or --best: prints the search so far (the budget, the kinds of board, and every \
                candidate numbered in evaluation order with its figures, the uniform reference and the front marked). \
                With --candidate N: the round fine-tunes candidate N (it must be within the budget; on a fleet of \
                several kinds of board, give --kind, once per kind). --best lets the round pick the best within the \
                budget for the kinds not picked. The round goes on once every kind has its pick.
                """)
        @Argument(help: "The round's id.") var id: String
        @OptionGroup var common: Common
        @Option(name: .long, help: "The candidate's number (1 = the first evaluated, the uniform reference).") var candidate: Int?
        @Option(name: .long, help: "The kind of board the candidate is for (several kinds: as the search lists them).") var kind: String?
        @Flag(name: .long, help: "The round picks the best within the budget for every kind not picked.") var best = false
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false
        public init() {}

        public func validate() throws {
            if kind != nil, candidate == nil { throw ValidationError("--kind goes with --candidate") }
        }

        public func run() throws {
            let client = try adminClient(common.dir, server: common.server)
            let path = "/admin/v1/rounds/" + RoundCommand.escaped(id)
            guard candidate != nil || best else {
                let response = try adminRequest(client, "GET", path + "/search")
                if json { print(response.text); return }
                let s = try JSONDecoder().decode(CompressionReport.SearchSection.self, from: Data(response.body))
                print(Self.listing(s))
                return
            }
            struct Body: Encodable { var candidate: Int?; var kind: String?; var best: Bool }
            let response = try adminRequest(client, "POST", path + "/pick",
                                            body: Array(try JSONEncoder().encode(Body(candidate: candidate, kind: kind, best: best))))
            let v = try RoundCommand.decoder().decode(RoundView.self, from: Data(response.body))
            if json { try printJSON(v) } else { print("round \(id): \(v.state.rawValue), at \(v.phaseLabel)") }
        }

        /// The search as a table: every candidate numbered, the uniform reference and the front marked.
        static func listing(_ s: CompressionReport.SearchSection) -> String {
            var budget: [String] = []
            if let m = s.budget.macs { budget.append("\(m) MACs") }
            if let b = s.budget.parameterBytes { budget.append("\(b) bytes") }
            if let l = s.budget.latencyMs { budget.append(String(format: "%.3f ms", l)) }
            var lines = ["budget: " + (budget.isEmpty ? "–" : budget.joined(separator: ", ")) + "; \(s.evaluated) candidates"
                         + (s.boardKinds.isEmpty ? "" : "; kinds of board: " + s.boardKinds.joined(separator: " | "))]
            func key(_ widths: [String: Int]) -> String { widths.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",") }
            let front = Set(s.front.map { key($0.widths) })
            let finalists = Dictionary(s.finalists.map { (key($0.widths), $0) }, uniquingKeysWith: { a, _ in a })
            func percent(_ v: Double?) -> String { v.map { String(format: "%.2f %%", 100 * $0) } ?? "–" }
            let rows = s.candidates.enumerated().map { k, c -> [String] in
                let held = finalists[key(c.widths)]
                return ["\(k + 1)" + (k == 0 ? " uniform" : "") + (front.contains(key(c.widths)) ? " front" : ""),
                        c.kind ?? "–", "\(c.macs)", "\(c.parameterBytes)", c.latencyMs.map { String(format: "%.3f", $0) } ?? "–",
                        c.loss.map { String(format: "%.4f", $0) } ?? "–", percent(c.accuracy ?? c.agreement),
                        held.map { percent($0.accuracy ?? $0.agreement) } ?? "–",
                        held?.measuredMs.map { $0.values.map { String(format: "%.3f", $0) }.sorted().joined(separator: " / ") } ?? "–"]
            }
            lines.append(table(["#", "kind", "MACs", "bytes", "ms", "fleet loss", "accuracy", "finalist", "measured ms"], rows))
            return lines.joined(separator: "\n")
        }
    }

    public struct Cancel: ParsableCommand {
        public static let configuration = CommandConfiguration(abstract: "Cancel a running round: later reports are refused.")
        @Argument(help: "The round's id.") var id: String
        @OptionGroup var common: Common
        public init() {}

        public func run() throws {
            _ = try adminRequest(try adminClient(common.dir, server: common.server), "POST", "/admin/v1/rounds/" + RoundCommand.escaped(id) + "/cancel")
            print("cancelled \(id)")
        }
    }

    public struct Fetch: ParsableCommand {
        public static let configuration = CommandConfiguration(abstract: "Download a finished round's compressed model (SHA-256 verified) and report.")
        @Argument(help: "The round's id.") var id: String
        @OptionGroup var common: Common
        @Option(name: .long, help: "Where to write the compressed model.") var out: String
        @Option(name: .long, help: "Where to write the report (JSON, the schema of model compress plus phases and sites).") var report: String?
        public init() {}

        public func run() throws {
            let client = try adminClient(common.dir, server: common.server)
            client.timeout = 600
            let v = try RoundCommand.view(client, id)
            guard v.state == .succeeded, let sha = v.finalModel else {
                throw CLIError("round \(id) is \(v.state.rawValue)\(v.message.map { " (\($0))" } ?? ""); only a succeeded round has a model to fetch")
            }
            do {
                try client.download("/admin/v1/rounds/" + RoundCommand.escaped(id) + "/model", to: out + ".part", sha256: sha)
            } catch let error as HTTPClientError {
                throw CLIError(error.description)
            }
            guard rename(out + ".part", out) == 0 else { throw CLIError("cannot write \(out)") }
            print("wrote \(out) (SHA-256 \(sha) verified)")
            if let report {
                let r = try adminRequest(client, "GET", "/admin/v1/rounds/" + RoundCommand.escaped(id) + "/report")
                let decoded = try JSONDecoder().decode(CompressionReport.self, from: Data(r.body))
                try Files.writeBytes(try jsonBytes(decoded), to: report)
                print("wrote \(report)")
            }
        }
    }
}
