import Testing
#if canImport(Glibc)
import Glibc
#endif
import WhittleCompression
import WhittleTensor
import WhittleTestSupport

@Suite struct StatisticsTests {
    static let data: [Float] = TestSupport.randomFloats(3000, seed: 7).enumerated().map { i, v in i % 97 == 0 ? v * 40 : v * 3 }

    /// Collecting on k disjoint parts and merging (in any order and grouping) equals collecting on the whole.
    @Test(arguments: [2, 3, 7])
    func mergingPartsEqualsTheWhole(_ k: Int) throws {
        let parts = (0..<k).map { p in Array(Self.data[(p * Self.data.count / k)..<((p + 1) * Self.data.count / k)]) }
        var whole = RangeStatistics()
        try whole.add(Self.data)
        let ranges = try parts.map { part -> RangeStatistics in var r = RangeStatistics(); try r.add(part); return r }
        #expect(try ranges.reduce(RangeStatistics()) { try $0.merged(with: $1) } == whole)
        #expect(try ranges.reversed().reduce(RangeStatistics()) { try $0.merged(with: $1) } == whole)

        let t = whole.absMax
        var wholeHistogram = try Histogram(lower: 0, upper: t, magnitudes: true)
        try wholeHistogram.add(Self.data)
        let histograms = try parts.map { part -> Histogram in
            var h = try Histogram(lower: 0, upper: t, magnitudes: true)
            try h.add(part)
            return h
        }
        let forward = try histograms.dropFirst().reduce(histograms[0]) { try $0.merged(with: $1) }
        let backward = try histograms.dropLast().reversed().reduce(histograms.last!) { try $0.merged(with: $1) }
        #expect(forward == wholeHistogram && backward == wholeHistogram)
        // Ranges computed from merged statistics equal those from the whole data.
        #expect(try Calibrators.entropy(forward) == Calibrators.entropy(wholeHistogram))
        #expect(try Calibrators.percentile(forward, range: whole) == Calibrators.percentile(wholeHistogram, range: whole))

        let shape = [Self.data.count / 12, 3, 4]
        var channels = ChannelStatistics(channels: 3)
        try channels.add(Self.data, shape: shape)
        let rows = shape[0]
        var merged = ChannelStatistics(channels: 3)
        for p in 0..<k {
            let from = p * rows / k, to = (p + 1) * rows / k
            var part = ChannelStatistics(channels: 3)
            try part.add(Array(Self.data[(from * 12)..<(to * 12)]), shape: [to - from, 3, 4])
            merged = try merged.merged(with: part)
        }
        #expect(merged.valuesPerChannel == channels.valuesPerChannel && merged.zeroCounts == channels.zeroCounts)
        for c in 0..<3 { #expect(abs(merged.sums[c] - channels.sums[c]) < 1e-9 * max(1, abs(channels.sums[c]))) }
    }

    @Test func refusesIncompatibleOrPoisonedStatistics() throws {
        let a = try Histogram(lower: 0, upper: 1, binCount: 16, magnitudes: true)
        let b = try Histogram(lower: 0, upper: 2, binCount: 16, magnitudes: true)
        #expect { try a.merged(with: b) } throws: { ($0 as? CompressionError)?.code == .incompatibleStatistics }
        var r = RangeStatistics()
        #expect { try r.add([1, .nan]) } throws: { ($0 as? CompressionError)?.code == .invalidStatistics }
        #expect(r.count == 0)  // nothing was half-added
        // A batch with a NaN or an infinity anywhere (before, among or after the others) is refused whole.
        var h = try Histogram(lower: 0, upper: 4, binCount: 4, magnitudes: true)
        try h.add([0.5, -1.5, 3.999, 4, 9, -0])
        #expect(h.counts == [2, 1, 0, 3])  // |−1.5| in bin 1; 4 and 9 in the last bin; −0 in bin 0
        for poisoned: [Float] in [[.nan, 1], [1, 2, .infinity], [-.infinity] + [Float](repeating: 1, count: 20)] {
            #expect { try h.add(poisoned) } throws: { ($0 as? CompressionError)?.code == .invalidStatistics }
            #expect(h.counts == [2, 1, 0, 3])
        }
        var c = ChannelStatistics(channels: 2)
        #expect(throws: CompressionError.self) { try c.add([1, 2, 3], shape: [1, 3, 1]) }
        #expect(throws: CompressionError.self) { try Calibrators.minMax(RangeStatistics(), symmetric: true) }
    }

    @Test func minMaxAndPercentileByHand() throws {
        var r = RangeStatistics()
        try r.add([-2, 0.5, 3])
        #expect(try Calibrators.minMax(r, symmetric: false) == (-2, 3))
        #expect(try Calibrators.minMax(r, symmetric: true) == (-3, 3))
        // |x| histogram, 10 bins over [0, 10]: 90 values in bin 0, 9 in bin 5, 1 in bin 9.
        var h = try Histogram(lower: 0, upper: 10, binCount: 10, magnitudes: true)
        try h.add([Float](repeating: 0.5, count: 90) + [Float](repeating: 5.5, count: 9) + [9.5])
        var seen = RangeStatistics()
        try seen.add([-9.5, 9.5])
        // cdf = 0.9 (bins 0–4), 0.99 (5–8), 1.0 (9): p = 99 → first cdf ≥ 0.99 is bin 5 → edge 5.
        #expect(try Calibrators.percentile(h, range: seen, percentile: 99) == (-5, 5))
        #expect(try Calibrators.percentile(h, range: seen, percentile: 99.5) == (-9, 9))
        // Clamped to the observed range.
        var narrow = RangeStatistics()
        try narrow.add([-1, 1])
        #expect(try Calibrators.percentile(h, range: narrow, percentile: 99.5) == (-1, 1))
    }

    @Test func entropyAndMSEClipLongTails() throws {
        // Exponentially distributed magnitudes (a dense, long tail, like activations): both searches clip below the
        // largest value, which MinMax would keep.
        let values = TestSupport.randomFloats(50000, seed: 3).map { -log(max(($0 + 1) / 2, 1e-7)) }
        let top = values.max()!
        var h = try Histogram(lower: 0, upper: top, magnitudes: true)
        try h.add(values)
        let (_, kl) = try Calibrators.entropy(h)
        let (_, mse) = try Calibrators.mse(h)
        #expect(kl > 1 && kl < top * 0.9)
        #expect(mse > 1 && mse < top * 0.9)
        // MSE by hand on two bins: all mass at centre 0.25 of [0, 1] (2 bins); candidates 0.5 and 1 both
        // represent 0.25 within rounding, and the smaller threshold has the smaller step.
        var tiny = try Histogram(lower: 0, upper: 1, binCount: 2, magnitudes: true)
        try tiny.add([0.1, 0.2, 0.3])
        let (_, t) = try Calibrators.mse(tiny)
        #expect(t == 0.5)
    }

    @Test func forgedCountsThatWouldOverflowAreRefusedNotTrapped() throws {
        let big = try Histogram(lower: 0, upper: 1, counts: [UInt64.max, 1], magnitudes: true)
        #expect(big.total == .max)
        #expect(throws: CompressionError.self) { _ = try big.checkedTotal() }
        let one = try Histogram(lower: 0, upper: 1, counts: [1, 0], magnitudes: true)
        #expect { try big.merged(with: one) } throws: { "\($0)".contains("overflow") }
        let range = RangeStatistics(min: 0, max: 1, count: Int.max)
        #expect { try range.merged(with: RangeStatistics(min: 0, max: 2, count: 1)) } throws: { "\($0)".contains("overflow") }
        #expect(try RangeStatistics(min: 0, max: 1, count: 2).merged(with: RangeStatistics(min: -1, max: 0, count: 3))
                == RangeStatistics(min: -1, max: 1, count: 5))
    }
}
