import Foundation

/// Differential-privacy accounting in Rényi DP (Mironov 2017) for noise the workers add before secure aggregation,
/// so the sum carries the calibrated total: RDP per order adds up over rounds, and converts to (ε, δ) at the end.
/// Pure functions; checked against Google's dp_accounting (`Tests/Fixtures/privacy/accounting.json`, made by
/// `scripts/make_privacy_fixture.py`).
public enum PrivacyAccountant {
    /// dp_accounting's default orders (`RdpAccountant`): 1.1…10.9 by 0.1, 11…63, 128, 256, 512, 1024.
    public static let defaultOrders: [Double] = {
        let fine: [Double] = (1...99).map { (k: Int) -> Double in 1 + Double(k) / 10 }
        let whole: [Double] = (11...63).map { (k: Int) -> Double in Double(k) }
        return fine + whole + [128, 256, 512, 1024]
    }()

    /// RDP at order α of the Gaussian mechanism with noise multiplier z = σ / Δ₂: α / (2z²).
    public static func gaussian(noiseMultiplier z: Double, order α: Double) -> Double { α / (2 * z * z) }

    /// RDP at order α of the sum of `workers` independent discrete Gaussians N_Z(0, σ²) on `dimension` coordinates,
    /// for neighbours that differ by one worker's vector of L1 norm `l1` and L2 norm `l2` (σ, l1, l2 in the integer
    /// domain the workers sum in): Kairouz, Liu and Steinke (ICML 2021, "The Distributed Discrete Gaussian
    /// Mechanism"), Proposition 14, the least of its three bounds, with
    /// τ = 10 · Σ_{k=1}^{n−1} exp(−2π²σ² · k/(k+1)) measuring how far the sum is from one discrete Gaussian.
    /// Needs σ ≥ ½.
    public static func distributedDiscreteGaussian(order α: Double, sigma σ: Double, workers n: Int, l1: Double, l2: Double,
                                                   dimension d: Int) -> Double {
        let variance: Double = σ * σ
        var tau: Double = 0
        for k in 1..<max(n, 1) {
            let share: Double = Double(k) / Double(k + 1)
            tau += 10 * exp(-2 * Double.pi * Double.pi * variance * share)
        }
        let workers = Double(n), dd = Double(d)
        let spread: Double = workers.squareRoot() * σ
        let ratio: Double = l2 * l2 / (workers * variance)
        let first: Double = α * ratio / 2 + tau * dd
        let second: Double = α / 2 * (ratio + 2 * l1 * tau / spread + tau * tau * dd)
        let shifted: Double = l2 / spread + tau * dd.squareRoot()
        let third: Double = α / 2 * shifted * shifted
        return min(first, second, third)
    }

    /// The L2 and L1 norms a vector of L2 norm at most `clip` (in units of the rounding step) can have after
    /// conditional randomized rounding of its `dimension` coordinates to integers, where rounding is repeated until
    /// the rounded norm is within the bound that holds with probability 1 − `beta` (Kairouz, Liu and Steinke,
    /// section 4.1): Δ₂² = min{c² + d/4 + √(2 ln(1/β))·(c + √d/2), (c + √d)²}, Δ₁ = Δ₂·min(√d, Δ₂).
    public static func roundedSensitivity(clip c: Double, dimension d: Int, beta: Double) -> (l2: Double, l1: Double) {
        let dd = Double(d)
        let squared = beta > 0 && beta < 1
            ? min(c * c + dd / 4 + (2 * log(1 / beta)).squareRoot() * (c + dd.squareRoot() / 2), pow(c + dd.squareRoot(), 2))
            : pow(c + dd.squareRoot(), 2)
        let l2 = squared.squareRoot()
        return (l2, l2 * min(dd.squareRoot(), l2))
    }

    /// The smallest ε at `delta` for RDP values `rdp` at `orders` (one value per order), and the order that gives
    /// it: ε_α = RDP(α) + log(1 − 1/α) − log(δ·α)/(α − 1) (Canonne, Kamath and Steinke 2020, Proposition 12; Balle
    /// et al. 2020), as dp_accounting's `compute_epsilon` computes it, orders at or below 1.01 skipped.
    public static func epsilon(rdp: [Double], orders: [Double], delta: Double) throws -> (epsilon: Double, order: Double) {
        guard rdp.count == orders.count, !orders.isEmpty else {
            throw PrivacyError(.invalidArgument, "\(rdp.count) RDP values for \(orders.count) orders")
        }
        guard delta > 0, delta < 1 else { throw PrivacyError(.invalidArgument, "δ must be in (0, 1), not \(delta)") }
        guard rdp.allSatisfy({ $0 >= 0 && !$0.isNaN }) else { throw PrivacyError(.invalidArgument, "an RDP value is negative or NaN") }
        var best = (epsilon: Double.infinity, order: orders[0])
        for (r, a) in zip(rdp, orders) where a > 1.01 {
            // When δ exceeds what the KL divergence bound allows, ε = 0 at this order.
            let e = delta * delta + expm1(-r) > 0 ? 0 : r + log1p(-1 / a) - log(delta * a) / (a - 1)
            if e < best.epsilon { best = (e, a) }
        }
        return (max(0, best.epsilon), best.order)
    }
}
