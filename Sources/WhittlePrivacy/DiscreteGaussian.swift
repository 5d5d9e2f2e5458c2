/// The discrete Gaussian N_Z(0, σ²): P[x] ∝ exp(−x²/(2σ²)) on the integers, the noise each worker adds to its
/// integer vector so the secure sum carries the distributed discrete Gaussian (Kairouz, Liu and Steinke 2021).
/// Sampled exactly, with integer arithmetic only (Canonne, Kamath and Steinke 2020, Algorithms 1–3; Steinke's
/// reference is IBM/discrete-gaussian-differential-privacy, discretegauss.py): no floating-point probability, whose
/// rounding would leak (Mironov 2012). σ² is held as the rational `numerator / 2¹⁶`.
public struct DiscreteGaussian: Sendable, Equatable {
    /// σ² = numerator / 2^denominatorBits.
    public let numerator: UInt64
    public static let denominatorBits = 16
    /// The largest σ sampled (so every intermediate product fits 128 bits).
    public static let maximumSigma = 65536.0
    /// Laplace draws past this many times t (≥ σ) are drawn again, so no product overflows: the Gaussian mass out
    /// there is below e^−800, which is all the distribution can change by.
    static let tailSigmas: UInt64 = 40

    public init(sigma: Double) throws {
        guard sigma.isFinite, sigma > 0, sigma <= Self.maximumSigma else {
            throw PrivacyError(.invalidArgument, "a discrete Gaussian's σ must be in (0, \(Self.maximumSigma)], not \(sigma)")
        }
        let n = (sigma * sigma * Double(1 << Self.denominatorBits)).rounded()
        numerator = UInt64(max(n, 1))
    }

    /// σ² as the sampler holds it.
    public var variance: Double { Double(numerator) / Double(1 << Self.denominatorBits) }

    /// One draw.
    public func sample<R: RandomNumberGenerator>(using random: inout R) -> Int64 {
        let a = UInt128(numerator), b = UInt128(1) << UInt128(Self.denominatorBits)
        // t = ⌊σ⌋ + 1, with σ = √(a/b) floored exactly.
        let t = UInt128(Self.floorSquareRoot(numerator >> UInt64(Self.denominatorBits)) + 1)
        let limit = UInt128(Self.tailSigmas) * (t + 1)
        while true {
            let y = Self.discreteLaplace(t, using: &random)
            let magnitude = UInt128(y.magnitude)
            guard magnitude <= limit else { continue }
            // Accept with exp(−(|y| − σ²/t)² / (2σ²)) = exp(−(|y|·t·b − a)² / (2·a·b·t²)).
            let scaled = magnitude * t * b
            let difference = scaled >= a ? scaled - a : a - scaled
            if Self.bernoulliExp(difference * difference, 2 * a * b * t * t, using: &random) { return y }
        }
    }

    /// ⌊√n⌋ exactly, for n < 2⁶² (σ² ≤ 2³² here).
    static func floorSquareRoot(_ n: UInt64) -> UInt64 {
        var r = UInt64(Double(n).squareRoot())
        while r * r > n { r -= 1 }
        while (r + 1) * (r + 1) <= n { r += 1 }
        return r
    }

    /// Bernoulli(p/q).
    static func bernoulli<R: RandomNumberGenerator>(_ p: UInt128, _ q: UInt128, using random: inout R) -> Bool {
        UInt128.random(in: 0..<q, using: &random) < p
    }

    /// Bernoulli(exp(−p/q)) (Algorithm 1).
    static func bernoulliExp<R: RandomNumberGenerator>(_ p: UInt128, _ q: UInt128, using random: inout R) -> Bool {
        var p = p
        // exp(−γ) = exp(−1)^⌊γ⌋ · exp(−(γ − ⌊γ⌋)).
        while p > q {
            if !bernoulliExpAtMostOne(1, 1, using: &random) { return false }
            p -= q
        }
        return bernoulliExpAtMostOne(p, q, using: &random)
    }

    /// Bernoulli(exp(−γ)) for γ = p/q ≤ 1: K counts the successes of Bernoulli(γ/k), k = 1, 2, …; 1 when K is even
    /// (the number of trials odd).
    static func bernoulliExpAtMostOne<R: RandomNumberGenerator>(_ p: UInt128, _ q: UInt128, using random: inout R) -> Bool {
        var k: UInt128 = 1
        while bernoulli(p, q * k, using: &random) { k += 1 }
        return k % 2 == 1
    }

    /// The discrete Laplace of scale t: P[y] ∝ exp(−|y|/t) (Algorithm 2 with s = 1).
    static func discreteLaplace<R: RandomNumberGenerator>(_ t: UInt128, using random: inout R) -> Int64 {
        while true {
            let u = UInt128.random(in: 0..<t, using: &random)
            guard bernoulliExp(u, t, using: &random) else { continue }
            var v: UInt128 = 0
            while bernoulliExp(1, 1, using: &random) { v += 1 }
            let x = u + t * v
            let negative = Bool.random(using: &random)
            if negative && x == 0 { continue }
            guard x <= UInt128(Int64.max) else { continue }
            return negative ? -Int64(x) : Int64(x)
        }
    }
}
