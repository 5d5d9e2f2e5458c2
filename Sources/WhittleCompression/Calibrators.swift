import WhittleTensor

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Range computation from collected statistics (the coordinator's half of calibration). Conventions follow
/// ALGORITHMS.md: onnxruntime's MinMax and Percentile calibrators, TensorRT's entropy (KL) search, and an MSE search.
public enum Calibrators {
    /// MinMax: the observed range; symmetric: ±max(|min|, |max|).
    public static func minMax(_ r: RangeStatistics, symmetric: Bool) throws -> (Float, Float) {
        guard r.count > 0 else { throw CompressionError(.invalidStatistics, "no values were collected") }
        return symmetric ? (-r.absMax, r.absMax) : (r.min, r.max)
    }

    /// Percentile (onnxruntime): on a histogram of |x| over [0, T], `cdf = cumsum(h / total)`,
    /// `i = searchsorted(cdf, p / 100)` (first index with cdf ≥ p/100), threshold `edges[i]`; the range ±threshold is
    /// clamped to the observed [min, max]. On a two-sided histogram, (100 − p)/200 is cut from each side.
    public static func percentile(_ h: Histogram, range r: RangeStatistics, percentile p: Double = 99.999) throws -> (Float, Float) {
        guard p > 0, p <= 100 else { throw CompressionError(.invalidArgument, "percentile \(p) must be in (0, 100]") }
        let total = Double(h.total)
        guard total > 0 else { throw CompressionError(.invalidStatistics, "the histogram is empty") }
        let edges = h.edges
        var cdf = [Double](repeating: 0, count: h.binCount)
        var running = 0.0
        for (i, c) in h.counts.enumerated() { running += Double(c) / total; cdf[i] = running }
        func searchsorted(_ target: Double) -> Int { cdf.firstIndex { $0 >= target } ?? cdf.count }
        var low: Float, high: Float
        if h.magnitudes {
            let t = Float(edges[Swift.min(searchsorted(p / 100), edges.count - 1)])
            (low, high) = (-t, t)
        } else {
            let cut = (100 - p) / 200
            low = Float(edges[Swift.min(searchsorted(cut), edges.count - 1)])
            high = Float(edges[Swift.min(searchsorted(1 - cut), edges.count - 1)])
        }
        if low < r.min { low = r.min }
        if high > r.max { high = r.max }
        return (low, high)
    }

    /// Entropy (KL divergence), TensorRT style, symmetric on a histogram of |x|. As TensorRT's
    /// `_compute_amax_entropy` does, the first bin takes the second bin's count first (otherwise the spike of exact
    /// zeros after a ReLU dominates and the smallest threshold always wins). Then for each i from `levels` to the
    /// bin count, P = bins[0..<i] with the tail Σ bins[i...] added to P[i − 1]; Q merges bins[0..<i] into `levels`
    /// groups and spreads each group's mass evenly over its non-empty bins; both normalised; KL(P ‖ Q). The i with the
    /// smallest divergence wins (the last on ties); threshold = edges[i], range ±threshold.
    public static func entropy(_ h: Histogram, levels: Int = 128) throws -> (Float, Float) {
        guard h.magnitudes else { throw CompressionError(.invalidArgument, "the entropy calibrator needs a histogram of |x|") }
        guard h.total > 0 else { throw CompressionError(.invalidStatistics, "the histogram is empty") }
        var bins = h.counts.map { Double($0) }
        if bins.count > 1 { bins[0] = bins[1] }
        let n = bins.count
        guard n >= levels else { throw CompressionError(.invalidArgument, "\(n) bins cannot be merged into \(levels) levels") }
        var suffix = [Double](repeating: 0, count: n + 1)
        for i in stride(from: n - 1, through: 0, by: -1) { suffix[i] = suffix[i + 1] + bins[i] }
        var best = Double.infinity, bestIndex = levels
        var group = [Int](repeating: 0, count: n)
        for i in levels...n {
            // Level of bin k: numpy.digitize(k, linspace(0, i, levels + 1)) − 1.
            let step = Double(i) / Double(levels)
            var mass = [Double](repeating: 0, count: levels), nonEmpty = [Int](repeating: 0, count: levels)
            for k in 0..<i {
                var g = Swift.min(Int(Double(k) / step), levels - 1)
                while g + 1 <= levels - 1 && Double(g + 1) * step <= Double(k) { g += 1 }
                while g > 0 && Double(g) * step > Double(k) { g -= 1 }
                group[k] = g
                if bins[k] > 0 { mass[g] += bins[k]; nonEmpty[g] += 1 }
            }
            var q = [Double](repeating: 0, count: i), pTotal = 0.0, qTotal = 0.0
            var p = Array(bins[0..<i])
            p[i - 1] += suffix[i]
            for k in 0..<i where bins[k] > 0 { q[k] = mass[group[k]] / Double(nonEmpty[group[k]]) }
            for k in 0..<i { pTotal += p[k]; qTotal += q[k] }
            var kl = 0.0
            for k in 0..<i where p[k] > 0 {
                let pk = p[k] / pTotal, qk = q[k] / qTotal
                kl += qk > 0 ? pk * log(pk / qk) : .infinity
            }
            if kl <= best { best = kl; bestIndex = i }
        }
        let t = Float(h.edges[bestIndex])
        return (-t, t)
    }

    /// MSE: on a histogram of |x|, each bin's right edge is a candidate threshold T; the error is
    /// `Σ count · (fakequant(centre) − centre)²` over bin centres with symmetric scale `T / qmax`; the smallest error
    /// wins (the smallest T on ties). Range ±T.
    public static func mse(_ h: Histogram, quantRange q: ClosedRange<Int64> = -127...127) throws -> (Float, Float) {
        guard h.magnitudes else { throw CompressionError(.invalidArgument, "the MSE calibrator needs a histogram of |x|") }
        guard h.total > 0 else { throw CompressionError(.invalidStatistics, "the histogram is empty") }
        let edges = h.edges
        let centres = (0..<h.binCount).map { (edges[$0] + edges[$0 + 1]) / 2 }
        let qmax = Double(q.upperBound)
        var best = Double.infinity, bestT = edges.last!
        for i in 1...h.binCount {
            let t = edges[i]
            guard t > 0 else { continue }
            let scale = t / qmax
            var error = 0.0
            for (c, count) in zip(centres, h.counts) where count > 0 {
                let quantized = Swift.min(Swift.max((c / scale).rounded(.toNearestOrEven), Double(q.lowerBound)), qmax) * scale
                error += Double(count) * (quantized - c) * (quantized - c)
            }
            if error < best { best = error; bestT = t }
        }
        return (-Float(bestT), Float(bestT))
    }
}
