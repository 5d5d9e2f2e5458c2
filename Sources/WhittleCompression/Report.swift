import WhittleNN
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The report of a compression, the same whether it ran on one machine (`coordinator model compress`) or as a
/// federated round (which adds per-worker rows).
public struct CompressionReport: Sendable, Codable {
    public struct Figures: Sendable, Codable {
        /// Size of the serialized ONNX file.
        public var bytes: Int
        public var parameters: Int
        /// Multiply-accumulates for one sample.
        public var macs: Int
        /// With labels: top-1 accuracy (classification) or pixel accuracy (segmentation) on the evaluation data.
        public var accuracy: Double?
        /// Samples the figures were measured on.
        public var samples: Int?
        /// Segmentation with per-pixel labels: mean intersection over union of the classes present.
        public var meanIoU: Double?

        public init(bytes: Int, parameters: Int, macs: Int, accuracy: Double?, samples: Int?) {
            self.bytes = bytes
            self.parameters = parameters
            self.macs = macs
            self.accuracy = accuracy
            self.samples = samples
        }
    }

    public struct PruningStep: Sendable, Codable {
        public var ratio: Double
        public var channelsKept: Int
        public var channelsBefore: Int
        /// Accuracy right after pruning this step, and after its fine-tuning.
        public var accuracyPruned: Double?
        public var accuracyFinetuned: Double?
        public var finetuneLoss: [Double]

        public init(ratio: Double, channelsKept: Int, channelsBefore: Int, accuracyPruned: Double?, accuracyFinetuned: Double?, finetuneLoss: [Double]) {
            self.ratio = ratio
            self.channelsKept = channelsKept
            self.channelsBefore = channelsBefore
            self.accuracyPruned = accuracyPruned
            self.accuracyFinetuned = accuracyFinetuned
            self.finetuneLoss = finetuneLoss
        }
    }

    public struct FrozenGroup: Sendable, Codable {
        public var group: String
        public var channels: Int
        public var reason: String

        public init(group: String, channels: Int, reason: String) {
            self.group = group
            self.channels = channels
            self.reason = reason
        }
    }

    public struct PruningSection: Sendable, Codable {
        public var criterion: ImportanceCriterion
        public var scope: PruningScope
        public var schedule: [Double]
        public var roundTo: Int
        public var minChannels: Int
        public var maxLayerRatio: Double
        public var finetuneEpochs: Int
        public var distill: Bool
        public var steps: [PruningStep]
        /// Final kept channels per group (original counts).
        public var groups: [GroupDecision]
        /// Groups left alone, with why.
        public var frozen: [FrozenGroup]

        public init(criterion: ImportanceCriterion, scope: PruningScope, schedule: [Double], roundTo: Int, minChannels: Int, maxLayerRatio: Double, finetuneEpochs: Int, distill: Bool, steps: [PruningStep], groups: [GroupDecision], frozen: [FrozenGroup]) {
            self.criterion = criterion
            self.scope = scope
            self.schedule = schedule
            self.roundTo = roundTo
            self.minChannels = minChannels
            self.maxLayerRatio = maxLayerRatio
            self.finetuneEpochs = finetuneEpochs
            self.distill = distill
            self.steps = steps
            self.groups = groups
            self.frozen = frozen
        }
    }

    public struct Sensitivity: Sendable, Codable {
        public var node: String
        public var opType: String
        /// Accuracy with only this layer quantized (with labels).
        public var accuracy: Double?
        /// Classifiers: mean KL divergence of the output distribution from the float model's, with only this layer
        /// quantized.
        public var klDivergence: Double?
        /// Agreement with the float model (see `TaskEvaluation`).
        public var agreement: Double
        /// ‖output − float output‖ / ‖float output‖.
        public var relativeError: Double?
    }

    public struct CalibrationSection: Sendable, Codable {
        public var method: CalibrationMethod
        public var samples: Int
        public var tensors: Int
        public var seconds: Double

        public init(method: CalibrationMethod, samples: Int, tensors: Int, seconds: Double) {
            self.method = method
            self.samples = samples
            self.tensors = tensors
            self.seconds = seconds
        }
    }

    /// One worker's part in a federated round.
    public struct Site: Sendable, Codable, Equatable {
        public var worker: String
        public var samples: Int
        public var labels: Bool
        /// Phases whose reports were accepted from this worker.
        public var phasesServed: Int
        public var bytesUp: Int
        public var bytesDown: Int
        /// With labels: top-1 accuracy of the base and the compressed model on this worker's data.
        public var accuracyBefore: Double?
        public var accuracyAfter: Double?
        /// Agreement of the compressed model with the base model (with or without labels; see `TaskEvaluation`).
        public var agreement: Double?
        /// Segmentation with per-pixel labels: mean IoU of the base and the compressed model.
        public var meanIoUBefore: Double?
        public var meanIoUAfter: Double?
        /// ‖compressed output − base output‖ / ‖base output‖ on this worker's data.
        public var relativeError: Double?
        /// Embeddings: mean cosine similarity of the compressed model's with the base model's.
        public var meanCosine: Double?
        /// Median single-sample latency on the board, milliseconds (the batch-1 entry of `latency`).
        public var latencyBeforeMs: Double?
        public var latencyAfterMs: Double?
        /// Both models timed on the board the same way: at batch 1, then at the working batch when larger.
        public var latency: [LatencyComparison]?
        /// Compute threads (pinned to cores) and the instruction set the latency was measured with.
        public var threads: Int?
        public var cpu: String?

        /// Median speed-up at batch 1 (base ÷ compressed latency).
        public var speedup: Double? { latency?.first.map(\.speedup) ?? latencyBeforeMs.flatMap { b in latencyAfterMs.map { b / max($0, 1e-9) } } }
        /// Median speed-up at the working batch (the largest batch timed).
        public var workingSpeedup: (batch: Int, speedup: Double)? {
            guard let last = latency?.max(by: { $0.batch < $1.batch }), last.batch > 1 else { return nil }
            return (last.batch, last.speedup)
        }
        /// True once the worker holds the final model, SHA-256 verified.
        public var received: Bool

        public init(worker: String, samples: Int, labels: Bool) {
            self.worker = worker
            self.samples = samples
            self.labels = labels
            phasesServed = 0
            bytesUp = 0
            bytesDown = 0
            received = false
        }
    }

    /// The fleet's speed-up: the geometric mean over the sites that timed both models of each site's median
    /// speed-up, at batch 1 and at the site's working batch.
    public struct FleetSpeedup: Sendable, Codable, Equatable {
        public var batchOne: Double
        /// Over the sites that timed a working batch larger than 1.
        public var workingBatch: Double?
        public var sites: Int

        public init?(_ sites: [Site]) {
            let single = sites.compactMap(\.speedup).filter { $0.isFinite && $0 > 0 }
            guard !single.isEmpty else { return nil }
            func geometricMean(_ v: [Double]) -> Double { exp(v.map { log($0) }.reduce(0, +) / Double(v.count)) }
            batchOne = geometricMean(single)
            let working = sites.compactMap { $0.workingSpeedup?.speedup }.filter { $0.isFinite && $0 > 0 }
            workingBatch = working.isEmpty ? nil : geometricMean(working)
            self.sites = single.count
        }
    }

    /// One phase of a federated round.
    public struct PhaseRow: Sendable, Codable, Equatable {
        public var index: Int
        public var kind: String
        public var label: String
        public var state: String
        public var startedAt: Double?
        public var endedAt: Double?
        public var reports: Int
        public var refused: Int
        public var bytesUp: Int
        /// Coordinator CPU seconds spent folding reports in and closing the phase.
        public var aggregationSeconds: Double

        public init(index: Int, kind: String, label: String) {
            self.index = index
            self.kind = kind
            self.label = label
            state = "pending"
            reports = 0
            refused = 0
            bytesUp = 0
            aggregationSeconds = 0
        }
    }

    public var model: String
    public var output: String
    public var before: Figures
    public var after: Figures
    /// What the model's first output means; its metrics follow.
    public var task: TaskKind?
    /// Agreement of the compressed model with the original on the evaluation data: the same top class per sample
    /// (classification) or per pixel (segmentation), outputs within 10 % (detection, regression), cosine ≥ 0.9
    /// (embedding).
    public var agreement: Double?
    /// ‖compressed output − original output‖ / ‖original output‖ on the evaluation data.
    public var relativeError: Double?
    /// Embeddings: mean cosine similarity with the original's.
    public var meanCosine: Double?
    public var pruning: PruningSection?
    /// An architecture search's figures (rounds with a search budget).
    public var search: SearchSection?
    public var calibration: CalibrationSection?
    public var quantization: QuantizationSummary?
    public var sensitivity: [Sensitivity]?
    /// Seconds per stage: importance, pruning, finetune, calibration, export, evaluation, total.
    public var timings: [String: Double]
    /// With compact names: each renamed value's original name → its name in the file.
    public var renamedValues: [String: String]?
    /// Federated rounds: the round's id, its phases, and one row per worker.
    public var round: String?
    public var phases: [PhaseRow]?
    public var sites: [Site]?
    /// Federated rounds: the fleet's speed-up from the sites' latencies.
    public var speedup: FleetSpeedup?
    /// Federated rounds under secure aggregation: the session and each secure sum's workers.
    public var secureAggregation: SecureAggregationSection?
    /// Federated rounds with differential privacy: the guarantee, the noise, and each site's ε over the rounds so far.
    public var privacy: PrivacySection?

    public init(model: String, output: String, before: Figures, after: Figures) {
        self.model = model
        self.output = output
        self.before = before
        self.after = after
        self.timings = [:]
    }
}

extension CompressionReport {
    /// A round's secure-aggregation session: its parties, each one's neighbours and the threshold that rebuilds a
    /// party's secrets, and per secure sum who was asked, who contributed and who answered the unmask step.
    public struct SecureAggregationSection: Sendable, Codable, Equatable {
        public struct Sum: Sendable, Codable, Equatable {
            public var phase: String
            public var partners: Int
            public var contributors: [String]
            /// Partners that sent no input (their masks were removed with their neighbours' shares).
            public var dropped: [String]
            public var unmasked: [String]

            public init(phase: String, partners: Int, contributors: [String], dropped: [String], unmasked: [String]) {
                self.phase = phase
                self.partners = partners
                self.contributors = contributors
                self.dropped = dropped
                self.unmasked = unmasked
            }
        }

        public var parties: [String]
        public var neighbours: Int
        public var threshold: Int
        public var sums: [Sum]

        public init(parties: [String], neighbours: Int, threshold: Int, sums: [Sum]) {
            self.parties = parties
            self.neighbours = neighbours
            self.threshold = threshold
            self.sums = sums
        }
    }

    /// A private round's guarantee: (ε, δ) for the round (user-level: one site's whole contribution), the noise that
    /// gives it, and each site's ε at that δ over every private round it took part in up to this one.
    public struct PrivacySection: Sendable, Codable, Equatable {
        public var epsilon: Double
        public var delta: Double
        public var noiseMultiplier: Double
        /// Training sums noised, and the workers the noise is counted from (the quorum).
        public var sums: Int
        public var workers: Int
        public var clipNorm: Double
        public var sites: [String: Double]?

        public init(epsilon: Double, delta: Double, noiseMultiplier: Double, sums: Int, workers: Int, clipNorm: Double) {
            self.epsilon = epsilon
            self.delta = delta
            self.noiseMultiplier = noiseMultiplier
            self.sums = sums
            self.workers = workers
            self.clipNorm = clipNorm
        }
    }

    /// An architecture search in a round: every candidate's merged scores, the uniform reference, the front and the
    /// choice.
    public struct SearchSection: Sendable, Codable, Equatable {
        public struct Candidate: Codable, Sendable, Equatable {
            /// Channels kept per group, by the group's name.
            public var widths: [String: Int]
            public var macs: Int
            public var parameterBytes: Int
            /// Predicted milliseconds on the slowest kind of board (with a latency budget).
            public var latencyMs: Double?
            /// The negated mean loss over the fleet's samples (a finite stand-in when no sample scored it).
            public var fitness: Double
            public var loss: Double?
            /// Top-1 accuracy over the fleet's labelled samples, and agreement with the original.
            public var accuracy: Double?
            public var agreement: Double?
            public var samples: Int
            /// Milliseconds measured end to end on the fleet (finalists under a latency budget): per kind of board,
            /// the median of its boards' medians at the search's latency batch.
            public var measuredMs: [String: Double]?
            /// The kind of board whose budget the candidate was proposed for (a fleet of several kinds searches
            /// for each; `latencyMs` is then the prediction on that kind). Nil: every kind.
            public var kind: String?

            public init(widths: [String: Int], cost: ArchitectureCost, score: CandidateScore?, kind: String? = nil) {
                self.widths = widths
                self.kind = kind
                macs = cost.macs
                parameterBytes = cost.parameterBytes
                latencyMs = cost.latencyMs
                let loss = score?.meanLoss ?? .infinity
                self.loss = loss.isFinite ? loss : nil
                fitness = loss.isFinite ? -loss : -Double.greatestFiniteMagnitude
                accuracy = score?.accuracy
                agreement = score?.evaluation.agreementRate
                samples = score?.samples ?? 0
            }
        }

        public var budget: SearchBudget
        /// The kinds of board whose latency tables predicted the candidates' latency.
        public var boardKinds: [String] = []
        public var evaluated: Int
        /// The uniform architecture that fills the budget (the first candidate scored).
        public var uniform: Candidate?
        public var chosen: Candidate?
        /// The candidates no other beats on both fitness and cost (predicted latency with a latency budget, else
        /// MACs), ascending cost.
        public var front: [Candidate]
        /// Every candidate, in evaluation order.
        public var candidates: [Candidate]
        /// The finalists after a short fine-tuning on the fleet, scored on held-out samples (the uniform one first).
        public var finalists: [Candidate] = []
        /// One model per kind of board (a fleet of several kinds): the kinds each architecture serves, its predicted
        /// latency on each, and the round that fine-tunes and distributes it. Empty for a single kind.
        public var models: [KindModel] = []
        /// Boards left out of the latency tables: they cannot time models (`worker run --no-timing`).
        public var untimed: [String] = []

        enum CodingKeys: String, CodingKey {
            case budget, boardKinds, evaluated, uniform, chosen, front, candidates, finalists, models, untimed
        }

        /// Fields added later default when a report lacks them.
        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            budget = try c.decode(SearchBudget.self, forKey: .budget)
            boardKinds = try c.decodeIfPresent([String].self, forKey: .boardKinds) ?? []
            evaluated = try c.decode(Int.self, forKey: .evaluated)
            uniform = try c.decodeIfPresent(Candidate.self, forKey: .uniform)
            chosen = try c.decodeIfPresent(Candidate.self, forKey: .chosen)
            front = try c.decode([Candidate].self, forKey: .front)
            candidates = try c.decode([Candidate].self, forKey: .candidates)
            finalists = try c.decodeIfPresent([Candidate].self, forKey: .finalists) ?? []
            models = try c.decodeIfPresent([KindModel].self, forKey: .models) ?? []
            untimed = try c.decodeIfPresent([String].self, forKey: .untimed) ?? []
        }

        /// An architecture chosen for some kinds of board.
        public struct KindModel: Codable, Sendable, Equatable {
            public var kinds: [String]
            public var widths: [String: Int]
            public var macs: Int
            public var parameterBytes: Int
            /// Predicted milliseconds on each kind it serves.
            public var latencyMs: [String: Double]
            /// The round that fine-tunes, exports and distributes it.
            public var round: String?

            public init(kinds: [String], widths: [String: Int], macs: Int, parameterBytes: Int, latencyMs: [String: Double], round: String? = nil) {
                self.kinds = kinds
                self.widths = widths
                self.macs = macs
                self.parameterBytes = parameterBytes
                self.latencyMs = latencyMs
                self.round = round
            }
        }

        public init(budget: SearchBudget, candidates: [Candidate], chosen: Candidate?) {
            self.budget = budget
            self.candidates = candidates
            evaluated = candidates.count
            uniform = candidates.first
            self.chosen = chosen
            var best = -Double.infinity
            front = []
            let byLatency = !candidates.isEmpty && candidates.allSatisfy { $0.latencyMs != nil }
            func cost(_ c: Candidate) -> Double { byLatency ? c.latencyMs! : Double(c.macs) }
            for c in candidates.sorted(by: { cost($0) != cost($1) ? cost($0) < cost($1) : $0.fitness > $1.fitness }) where c.fitness > best {
                front.append(c)
                best = c.fitness
            }
        }
    }
}
