import Foundation
import Testing
import WhittlePrivacy
import WhittleNN

/// The chi-square statistic the samples may reach against the exact probabilities (about 21 bins; a correct
/// sampler exceeds it with probability below 1e-6, and the seeds are fixed).
let discreteGaussianChiSquareLimit = 60.0

/// The exact sampler against the exact probabilities exp(−x²/(2σ²)) / Σ, by a chi-square test per σ.
@Suite struct DiscreteGaussianTests {
    static func check(sigma: Double, draws: Int, seed: UInt64) throws {
        let d = try DiscreteGaussian(sigma: sigma)
        var random = SplitMix64(seed: seed)
        var counts: [Int64: Int] = [:]
        var sum = 0.0, squares = 0.0
        for _ in 0..<draws {
            let x = d.sample(using: &random)
            counts[x, default: 0] += 1
            sum += Double(x)
            squares += Double(x) * Double(x)
        }
        // Exact probabilities; bins of single values within 3σ (at least ±1), the rest in two tails.
        let reach = Int64(max(1, (3 * sigma).rounded(.down)))
        let span = Int64(60 * sigma + 10)
        let weight = { (x: Int64) -> Double in exp(-Double(x) * Double(x) / (2 * d.variance)) }
        let total = (-span...span).reduce(0.0) { $0 + weight($1) }
        var chi = 0.0
        func add(_ observed: Int, _ p: Double) {
            let expected = p * Double(draws)
            chi += (Double(observed) - expected) * (Double(observed) - expected) / expected
        }
        var bins = 0
        if reach <= 10 {
            for x in -reach...reach { add(counts[x] ?? 0, weight(x) / total); bins += 1 }
        } else {
            // Wide σ: ±3σ in 21 equal ranges.
            let width = (2 * reach + 1 + 20) / 21
            var lower = -reach
            while lower <= reach {
                let upper = min(reach, lower + width - 1)
                add((lower...upper).reduce(0) { $0 + (counts[$1] ?? 0) }, (lower...upper).reduce(0.0) { $0 + weight($1) } / total)
                bins += 1
                lower = upper + 1
            }
        }
        let tail = (reach + 1...span).reduce(0.0) { $0 + weight($1) } / total
        add(counts.filter { $0.key > reach }.values.reduce(0, +), tail)
        add(counts.filter { $0.key < -reach }.values.reduce(0, +), tail)
        #expect(chi < discreteGaussianChiSquareLimit, "σ \(sigma): chi-square \(chi) over \(bins + 2) bins")
        // Mean 0 and the exact variance (a little below σ² for small σ), within five standard errors.
        var moment = 0.0
        for x in -span...span {
            let v = Double(x)
            moment += v * v * weight(x)
        }
        let variance: Double = moment / total
        let n = Double(draws)
        let meanError: Double = 5 * (variance / n).squareRoot()
        let varianceError: Double = 5 * variance * (2 / n).squareRoot()
        #expect(abs(sum / n) < meanError)
        #expect(abs(squares / n - variance) < varianceError)
    }

    @Test func smallMediumAndWideSigmasFollowTheExactDistribution() throws {
        try Self.check(sigma: 0.6, draws: 100_000, seed: 1)
        try Self.check(sigma: 3, draws: 100_000, seed: 2)
        try Self.check(sigma: 1000, draws: 100_000, seed: 3)
    }

    @Test func sigmasOutsideTheSamplersRangeAreRefused() {
        for bad in [0, -1, .nan, .infinity, 1e6] { #expect(throws: PrivacyError.self) { try DiscreteGaussian(sigma: bad) } }
    }
}
