import Foundation
import WhittleCompression
import WhittlePrivacy

/// A plan's differential privacy (`--dp-epsilon ε [--dp-delta δ]`, issue 20): every training sum of the round (its
/// fine-tuning and QAT rounds, under secure aggregation) carries distributed discrete Gaussian noise calibrated so
/// that the round as a whole is (ε, δ)-differentially private for each site's data (user-level: neighbouring fleets
/// differ by one worker's whole update), accounted in Rényi DP.
public struct PrivacyPlan: Codable, Sendable, Equatable {
    public var epsilon: Double
    public var delta: Double

    public init(epsilon: Double, delta: Double = PrivacyPlan.defaultDelta) {
        self.epsilon = epsilon
        self.delta = delta
    }

    public static let defaultDelta = 1e-5
}

/// The noise of one training sum, in the integer domain the workers sum in (Kairouz, Liu and Steinke, ICML 2021):
/// each worker clips its update to the clip norm, divides it by `granularity`, rounds it at random to integers until
/// its L2 norm is at most `l2`, and adds N_Z(0, σ²) to every coordinate; the sum over the workers carries noise of
/// variance workers·σ² or more.
public struct NoiseParameters: Codable, Sendable, Equatable {
    public var granularity: Double
    /// Each worker's σ, in rounding steps.
    public var sigma: Double
    /// The L2 and L1 norms a rounded update may have (its sensitivity), in steps.
    public var l2: Double
    public var l1: Double
    /// Coordinates of an update (the largest model of the round).
    public var dimension: Int
    /// The workers whose noise the accounting counts on: the plan's quorum (more workers add more noise).
    public var workers: Int
    /// The total noise's σ over the clip norm: √workers·σ·granularity / clip.
    public var noiseMultiplier: Double

    public init(granularity: Double, sigma: Double, l2: Double, l1: Double = 0, dimension: Int = 0, workers: Int = 0, noiseMultiplier: Double = 0) {
        self.granularity = granularity
        self.sigma = sigma
        self.l2 = l2
        self.l1 = l1
        self.dimension = dimension
        self.workers = workers
        self.noiseMultiplier = noiseMultiplier
    }
}

/// A round's privacy as planned and spent (`RoundProgress.privacy`).
public struct PrivacyProgress: Codable, Sendable, Equatable {
    public var plan: PrivacyPlan
    public var noise: NoiseParameters
    /// RDP of one training sum at each of `PrivacyAccountant.defaultOrders`.
    public var rdpPerSum: [Double]
    /// Training sums the plan makes.
    public var sums: Int
    /// ε at the plan's δ of all of them (at most `plan.epsilon`).
    public var epsilon: Double
}

public enum DifferentialPrivacy {
    /// Rounding steps per clip norm (the update's resolution before noise), unless σ would exceed what the sampler
    /// draws; and the probability a random rounding is retried (Kairouz et al.'s β).
    public static let clipSteps = 4096.0
    public static let roundingBeta = exp(-0.5)

    /// The noise that makes `sums` training sums of `dimension` coordinates, each worker's update clipped to `clip`
    /// and at least `workers` workers adding noise, (ε, δ)-DP: the smallest noise multiplier found by bisection.
    public static func calibrate(_ plan: PrivacyPlan, clip: Double, dimension: Int, workers: Int, sums: Int) throws -> PrivacyProgress {
        guard plan.epsilon > 0, plan.epsilon.isFinite, plan.delta > 0, plan.delta < 1 else {
            throw CompressionError(.invalidArgument, "--dp-epsilon must be positive and --dp-delta in (0, 1)")
        }
        guard clip > 0, clip.isFinite, dimension >= 1, workers >= 1, sums >= 1 else {
            throw CompressionError(.invalidArgument, "differential privacy needs a clip norm, a model with parameters, workers and a training sum")
        }
        func spent(_ z: Double) throws -> (PrivacyProgress) {
            let n = Double(workers)
            // Steps per clip norm: as many as the sampler's σ allows.
            let c = min(clipSteps, DiscreteGaussian.maximumSigma * n.squareRoot() / z)
            let sigma = z * c / n.squareRoot()
            let (l2, l1) = PrivacyAccountant.roundedSensitivity(clip: c, dimension: dimension, beta: roundingBeta)
            let noise = NoiseParameters(granularity: clip / c, sigma: sigma, l2: l2, l1: l1, dimension: dimension, workers: workers,
                                        noiseMultiplier: z)
            let perSum = PrivacyAccountant.defaultOrders.map {
                PrivacyAccountant.distributedDiscreteGaussian(order: $0, sigma: sigma, workers: workers, l1: l1, l2: l2, dimension: dimension)
            }
            let epsilon = try wrap { try PrivacyAccountant.epsilon(rdp: perSum.map { $0 * Double(sums) }, orders: PrivacyAccountant.defaultOrders,
                                                                  delta: plan.delta).epsilon }
            return PrivacyProgress(plan: plan, noise: noise, rdpPerSum: perSum, sums: sums, epsilon: epsilon)
        }
        var low = 0.01, high = 10_000.0
        guard try spent(high).epsilon <= plan.epsilon else {
            throw CompressionError(.invalidArgument, String(format: "ε = %g at δ = %g cannot be reached over %d training sums", plan.epsilon, plan.delta, sums))
        }
        if try spent(low).epsilon <= plan.epsilon { return try spent(low) }
        for _ in 0..<60 {
            let mid = (low * high).squareRoot()
            if try spent(mid).epsilon <= plan.epsilon { high = mid } else { low = mid }
        }
        return try spent(high)
    }

    /// ε at `delta` of RDP values at `PrivacyAccountant.defaultOrders`.
    public static func epsilon(_ rdp: [Double], delta: Double) throws -> Double {
        try wrap { try PrivacyAccountant.epsilon(rdp: rdp, orders: PrivacyAccountant.defaultOrders, delta: delta).epsilon }
    }

    static func wrap<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let error as PrivacyError { throw CompressionError(.invalidArgument, error.message) }
    }

    /// One worker's update as it leaves the board: `values` (clipped already) divided by the granularity, rounded at
    /// random to integers until the L2 norm is within the bound (conditional randomized rounding), plus discrete
    /// Gaussian noise on every coordinate.
    public static func noisy<R: RandomNumberGenerator>(_ values: [Double], _ noise: NoiseParameters, using random: inout R) throws -> [Int64] {
        let scaled = values.map { $0 / noise.granularity }
        let bound = noise.l2 * noise.l2
        var rounded = [Int64](repeating: 0, count: scaled.count)
        var tries = 0
        while true {
            var norm = 0.0
            for (i, x) in scaled.enumerated() {
                let low = x.rounded(.down), fraction = x - low
                let r = low + (Double(random.next() >> 11) * 0x1p-53 < fraction ? 1 : 0)
                rounded[i] = Int64(r)
                norm += r * r
            }
            if norm <= bound { break }
            tries += 1
            guard tries < 10_000 else {
                throw CompressionError(.invalidStatistics, "the update could not be rounded within its sensitivity bound (is it clipped?)")
            }
        }
        let sampler = try wrap { try DiscreteGaussian(sigma: noise.sigma) }
        for i in rounded.indices { rounded[i] += sampler.sample(using: &random) }
        return rounded
    }

    /// The largest magnitude one coordinate of a noisy update can have: the bound plus the sampler's tail.
    public static func coordinateBound(_ noise: NoiseParameters) -> Double { noise.l2 + 41 * (noise.sigma + 2) }
}
