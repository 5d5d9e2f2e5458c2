import WhittleNN
import WhittleONNX
import WhittleTensor

/// The collecting half of calibration (what a worker runs on its data): observes every float activation of a
/// model during forward passes and accumulates mergeable statistics. Pass 1 collects per-tensor ranges; pass 2,
/// given the bin edges everyone shares, collects fixed-edge histograms of |x|.
public final class CalibrationCollector {
    public let session: InferenceSession
    /// The tensors observed: the graph input and every float node output, unless restricted.
    public let tensors: Set<String>
    public private(set) var ranges: [String: RangeStatistics] = [:]
    public private(set) var histograms: [String: Histogram] = [:]
    public private(set) var samples = 0

    public init(session: InferenceSession, tensors: Set<String>? = nil) {
        self.session = session
        if let tensors {
            self.tensors = tensors
        } else {
            var names = Set([session.primaryInput.name])
            for node in session.model.graph.nodes { names.formUnion(node.outputs.filter { !$0.isEmpty }) }
            self.tensors = names
        }
    }

    /// Pass 1: adds a batch to the per-tensor ranges.
    public func collectRanges(_ batch: Tensor) throws {
        try observe(batch) { name, value in
            var r = self.ranges[name] ?? RangeStatistics()
            try r.add(value.floats)
            self.ranges[name] = r
        }
        samples += batch.shape[0]
    }

    /// Starts pass 2 with shared edges: a |x| histogram over [0, upper] per tensor (`upper` is the merged absMax).
    public func beginHistograms(upperBounds: [String: Float], binCount: Int = Histogram.defaultBinCount) throws {
        histograms = [:]
        for (name, upper) in upperBounds { histograms[name] = try Histogram(lower: 0, upper: upper, binCount: binCount, magnitudes: true) }
    }

    /// Pass 2: adds a batch to the histograms started by `beginHistograms`.
    public func collectHistograms(_ batch: Tensor) throws {
        try observe(batch) { name, value in
            guard var h = self.histograms[name] else { return }
            try h.add(value.floats)
            self.histograms[name] = h
        }
    }

    func observe(_ batch: Tensor, _ body: @escaping (String, Tensor) throws -> Void) throws {
        if tensors.contains(session.primaryInput.name) { try body(session.primaryInput.name, batch) }
        let wanted = tensors
        _ = try session.run(batch) { node, outputs in
            for (name, value) in zip(node.outputs, outputs) where wanted.contains(name) && value.dtype == .float {
                do {
                    try body(name, value)
                } catch let error as CompressionError {
                    throw CompressionError(error.code, "\(node.label), output '\(name)': \(error.message)")
                }
            }
        }
    }
}
