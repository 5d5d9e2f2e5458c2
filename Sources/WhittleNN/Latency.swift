import WhittleTensor

/// The median and 90th percentile (nearest rank) of timed runs, milliseconds.
public struct LatencyPercentiles: Sendable, Codable, Equatable {
    public var p50Ms: Double
    public var p90Ms: Double

    public init(p50Ms: Double, p90Ms: Double) {
        self.p50Ms = p50Ms
        self.p90Ms = p90Ms
    }

    /// Nearest-rank percentiles of `milliseconds` (at least one): the ⌈q · n⌉-th smallest.
    public init(_ milliseconds: [Double]) {
        let sorted = milliseconds.sorted()
        func rank(_ q: Double) -> Double { sorted[max(Int((q * Double(sorted.count)).rounded(.up)) - 1, 0)] }
        self.init(p50Ms: rank(0.5), p90Ms: rank(0.9))
    }
}

/// Latency of a base and a compressed model measured the same way on the same batch.
public struct LatencyComparison: Sendable, Codable, Equatable {
    public var batch: Int
    /// Timed runs of each model.
    public var runs: Int
    public var base: LatencyPercentiles
    public var compressed: LatencyPercentiles

    public init(batch: Int, runs: Int, base: LatencyPercentiles, compressed: LatencyPercentiles) {
        self.batch = batch
        self.runs = runs
        self.base = base
        self.compressed = compressed
    }

    /// Median latency of the base over the compressed model's.
    public var speedup: Double { base.p50Ms / max(compressed.p50Ms, .leastNonzeroMagnitude) }
}

/// How a board times its models: warm-up runs, then timed runs of the two models interleaved (their order
/// alternating, so drift of the machine's speed falls on both alike) until `runs` each or, past `minimumRuns`,
/// until `budget` is spent; the compute threads pinned to cores meanwhile.
///
/// The clock is the caller's (`now`: monotonic time from any origin), so the measurement itself stays in the pure
/// core and tests can script it.
public struct LatencyProbe: Sendable {
    public var now: @Sendable () -> Duration
    public var warmup = 2
    public var runs = 20
    public var minimumRuns = 5
    /// Time for the timed runs of both models at one batch size.
    public var budget: Duration = .seconds(10)
    public var pinThreads = true
    /// Runs the timing alone on the machine (the agent's evaluation lock: workers sharing a machine time one at a
    /// time); nil when the caller already holds it.
    public var exclusive: (@Sendable (() throws -> Void) throws -> Void)?

    public init(now: @escaping @Sendable () -> Duration) {
        self.now = now
    }

    /// Times `base` and `compressed` on the first `batch` samples (all of them when fewer).
    public func compare(_ base: InferenceSession, _ compressed: InferenceSession, samples: Samples, batch: Int) throws -> LatencyComparison {
        let rows = samples.rows(0..<min(max(batch, 1), samples.count))
        let sessions = [base, compressed]
        let fed = try sessions.map { try rows.feed($0.model.graph) }
        func measure() throws -> LatencyComparison {
            for _ in 0..<warmup {
                for (session, inputs) in zip(sessions, fed) { _ = try session.run(inputs: inputs) }
            }
            var times: [[Double]] = [[], []]
            let start = now()
            while times[0].count < max(runs, 1) {
                if times[0].count >= minimumRuns && now() - start > budget { break }
                let order = times[0].count % 2 == 0 ? [0, 1] : [1, 0]
                for i in order {
                    let t0 = now()
                    _ = try sessions[i].run(inputs: fed[i])
                    times[i].append(Self.milliseconds(now() - t0))
                }
            }
            return LatencyComparison(batch: rows.count, runs: times[0].count, base: LatencyPercentiles(times[0]),
                                     compressed: LatencyPercentiles(times[1]))
        }
        return try alone { pinThreads ? try ComputeThreads.pinned { _ in try measure() } : try measure() }
    }

    static func milliseconds(_ d: Duration) -> Double {
        Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
    }
}

extension LatencyProbe {
    /// Median milliseconds of one session on `inputs`: `warmup` runs, then timed runs until `runs` or, past
    /// `minimumRuns`, until `budget` is spent (the compute threads pinned meanwhile when `pinThreads`).
    public func median(_ session: InferenceSession, inputs: [String: Tensor]) throws -> Double {
        func measure() throws -> Double {
            for _ in 0..<warmup { _ = try session.run(inputs: inputs) }
            var times: [Double] = []
            let start = now()
            while times.count < max(runs, 1) {
                if times.count >= minimumRuns && now() - start > budget { break }
                let t0 = now()
                _ = try session.run(inputs: inputs)
                times.append(Self.milliseconds(now() - t0))
            }
            return LatencyPercentiles(times).p50Ms
        }
        return try alone { pinThreads ? try ComputeThreads.pinned { _ in try measure() } : try measure() }
    }

    func alone<T>(_ body: () throws -> T) throws -> T {
        guard let exclusive else { return try body() }
        var out: T?
        try exclusive { out = try body() }
        return out!
    }
}
