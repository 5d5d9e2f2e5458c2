/// The report of a compression, the same whether it ran on one machine (`coordinator model compress`) or as a
/// federated round (which adds per-worker rows).
public struct CompressionReport: Sendable, Codable {
    public struct Figures: Sendable, Codable {
        /// Size of the serialized ONNX file.
        public var bytes: Int
        public var parameters: Int
        /// Multiply-accumulates for one sample.
        public var macs: Int
        /// Top-1 accuracy on the evaluation data, when labels were given.
        public var accuracy: Double?
        /// Samples the accuracy was measured on.
        public var samples: Int?
    }

    public struct PruningStep: Sendable, Codable {
        public var ratio: Double
        public var channelsKept: Int
        public var channelsBefore: Int
        /// Accuracy right after pruning this step, and after its fine-tuning.
        public var accuracyPruned: Double?
        public var accuracyFinetuned: Double?
        public var finetuneLoss: [Double]
    }

    public struct FrozenGroup: Sendable, Codable {
        public var group: String
        public var channels: Int
        public var reason: String
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
    }

    public struct Sensitivity: Sendable, Codable {
        public var node: String
        public var opType: String
        /// Accuracy with only this layer quantized (with labels).
        public var accuracy: Double?
        /// Mean KL divergence of the output distribution from the float model's, with only this layer quantized.
        public var klDivergence: Double
        public var agreement: Double
    }

    public struct CalibrationSection: Sendable, Codable {
        public var method: CalibrationMethod
        public var samples: Int
        public var tensors: Int
        public var seconds: Double
    }

    public var model: String
    public var output: String
    public var before: Figures
    public var after: Figures
    /// Top-1 agreement of the compressed model with the original on the evaluation data.
    public var agreement: Double?
    public var pruning: PruningSection?
    public var calibration: CalibrationSection?
    public var quantization: QuantizationSummary?
    public var sensitivity: [Sensitivity]?
    /// Seconds per stage: importance, pruning, finetune, calibration, export, evaluation, total.
    public var timings: [String: Double]

    public init(model: String, output: String, before: Figures, after: Figures) {
        self.model = model
        self.output = output
        self.before = before
        self.after = after
        self.timings = [:]
    }
}
