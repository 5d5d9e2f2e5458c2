import Foundation
import Testing
import WhittleRounds
import WhittleTensor

/// Float deltas averaged in Double agree with the hand computation to Float rounding.
let aggregationTolerance: Float = 1e-6

@Suite struct AggregationTests {
    static let shapes = ["w": [2, 2], "b": [2]]

    static func update(_ w: [Float], _ b: [Float], samples: Int) -> ModelUpdate {
        ModelUpdate(deltas: ["w": Tensor(shape: [2, 2], floats: w), "b": Tensor(shape: [2], floats: b)], samples: samples)
    }

    @Test func fedAvgIsTheSampleWeightedMeanInAnyOrder() throws {
        let updates = [Self.update([1, 2, 3, 4], [1, -1], samples: 10), Self.update([3, 2, 1, 0], [0, 1], samples: 30),
                       Self.update([-1, 0, 0, 2], [2, 2], samples: 60)]
        var forward = FedAvgAccumulator(validator: UpdateValidator(shapes: Self.shapes))
        var backward = forward
        for u in updates { try forward.add(u) }
        for u in updates.reversed() { try backward.add(u) }
        let a = try forward.result(), b = try backward.result()
        // w[0] = (10·1 + 30·3 + 60·(−1)) / 100 = 0.4; b[1] = (−10 + 30 + 120) / 100 = 1.4.
        #expect(abs(a["w"]!.floats[0] - 0.4) < aggregationTolerance)
        #expect(abs(a["b"]!.floats[1] - 1.4) < aggregationTolerance)
        #expect(a["w"]! == b["w"]! && a["b"]! == b["b"]!)
        #expect(forward.samples == 100 && forward.updates == 3)
    }

    @Test func badReportsAreRefusedAndChangeNothing() throws {
        var acc = FedAvgAccumulator(validator: UpdateValidator(shapes: Self.shapes, maximumSamples: 1000))
        try acc.add(Self.update([1, 1, 1, 1], [1, 1], samples: 5))
        let before = try acc.result()
        let bad: [ModelUpdate] = [
            Self.update([.nan, 1, 1, 1], [1, 1], samples: 5),
            Self.update([.infinity, 1, 1, 1], [1, 1], samples: 5),
            Self.update([1, 1, 1, 1], [1, 1], samples: 0),
            Self.update([1, 1, 1, 1], [1, 1], samples: 5000),
            ModelUpdate(deltas: ["w": Tensor(shape: [4], floats: [1, 1, 1, 1]), "b": Tensor(shape: [2], floats: [1, 1])], samples: 5),
            ModelUpdate(deltas: ["w": Tensor(shape: [2, 2], floats: [1, 1, 1, 1])], samples: 5),
        ]
        for u in bad { #expect(throws: AggregationError.self) { try acc.add(u) } }
        #expect(try acc.result() == before)
        #expect(acc.updates == 1)
        #expect(throws: AggregationError.self) { try FedAvgAccumulator(validator: UpdateValidator(shapes: Self.shapes)).result() }
    }

    /// The fold's eight-lane loops against their scalar twins, on lengths around the lane count (the tails).
    @Test(arguments: [0, 1, 7, 8, 9, 15, 16, 17, 1000, 1003])
    func foldKernelsMatchTheirReferences(_ count: Int) {
        let x = (0..<count).map { Float(sin(Double($0) * 1.7)) * 3 }
        let expected = FoldKernels.squaredSumReference(x)
        let got = x.withUnsafeBufferPointer { FoldKernels.squaredSum($0) }
        #expect(abs(got - expected) <= 1e-12 * max(1, expected))
        var reference = (0..<count).map { Double($0) * 0.25 }
        var sums = reference
        FoldKernels.addScaledReference(x, scale: 0.3, weight: 3.5, into: &reference)
        x.withUnsafeBufferPointer { xs in sums.withUnsafeMutableBufferPointer { FoldKernels.addScaled(xs, scale: 0.3, weight: 3.5, into: $0) } }
        #expect(sums == reference, "the same operations in the same order per element")
    }

    /// Folding in place keeps value semantics: a copy taken before a fold does not see it; the fold's result is the
    /// clipped, weighted mean, and the norm it returns is the update's before clipping. Clipping in the fold gives
    /// exactly what folding the `clipped` update gives (the secure path clips on the worker with `clipped`).
    @Test func foldingInPlaceLeavesCopiesAlone() throws {
        let odd = Self.update([0.3, -7.1, 2.9, 11.3], [0.77, -1.9], samples: 3)
        var clipping = FedAvgAccumulator(validator: UpdateValidator(shapes: Self.shapes), clipNorm: 1.3)
        var preclipped = FedAvgAccumulator(validator: UpdateValidator(shapes: Self.shapes))
        try clipping.add(odd)
        try preclipped.add(clipped(odd, to: 1.3))
        #expect(try clipping.result() == preclipped.result())

        var acc = FedAvgAccumulator(validator: UpdateValidator(shapes: Self.shapes), clipNorm: 5)
        try acc.add(Self.update([1, 0, 0, 0], [0, 0], samples: 1))
        let copy = acc
        let norm = try acc.add(Self.update([30, 0, 0, 40], [0, 0], samples: 1))  // norm 50, clipped to 5: [3, 0, 0, 4]
        #expect(abs(norm - 50) < 1e-9)
        #expect(try copy.result()["w"]!.floats == [1, 0, 0, 0])
        let w = try acc.result()["w"]!.floats
        #expect(abs(w[0] - 2) < aggregationTolerance && abs(w[3] - 2) < aggregationTolerance)
    }

    @Test func clippingBoundsEachUpdatesNorm() throws {
        let big = Self.update([30, 0, 0, 40], [0, 0], samples: 1)  // norm 50
        let c = clipped(big, to: 5)
        #expect(abs(c.norm - 5) < 1e-5)
        #expect(c.deltas["w"]!.floats == [3, 0, 0, 4])
        #expect(clipped(Self.update([0.1, 0, 0, 0], [0, 0], samples: 1), to: 5).deltas["w"]!.floats == [0.1, 0, 0, 0])
    }

    @Test func trimmedMeanAndMedianResistAnOutlier() throws {
        var updates = (0..<4).map { k in Self.update([Float(k), 1, 1, 1], [0, 0], samples: 1) }
        updates.append(Self.update([1000, 1, 1, 1], [0, 0], samples: 1))  // values 0, 1, 2, 3, 1000
        let validator = UpdateValidator(shapes: Self.shapes)
        #expect(try RobustAggregation.median.aggregate(updates, validator: validator)["w"]!.floats[0] == 2)
        // Trimming 20 % drops 0 and 1000: mean of 1, 2, 3.
        #expect(try RobustAggregation.trimmedMean(fraction: 0.2).aggregate(updates, validator: validator)["w"]!.floats[0] == 2)
        let even = Array(updates.prefix(4))
        #expect(try RobustAggregation.median.aggregate(even, validator: validator)["w"]!.floats[0] == 1.5)
    }

    /// With error feedback, the sum of what was sent tracks the sum of what was meant to be sent within one
    /// quantization step of the last round, instead of drifting.
    @Test func int8DeltasWithErrorFeedbackDoNotDrift() throws {
        var compressor = DeltaCompressor()
        var sent = [Float](repeating: 0, count: 6), meant = sent
        var lastScale: Float = 0
        for round in 0..<50 {
            let delta = (0..<6).map { Float(($0 * 7 + round * 3) % 11) * 0.001 - 0.004 + ($0 == 0 ? 0.5 : 0) }
            let c = compressor.compress(["w": Tensor(shape: [6], floats: delta)])["w"]!
            #expect(c.bytes == 10)
            for i in 0..<6 { sent[i] += c.decompressed().floats[i]; meant[i] += delta[i] }
            lastScale = c.scale
        }
        for i in 0..<6 { #expect(abs(sent[i] - meant[i]) <= lastScale * 0.5 + 1e-5, "coordinate \(i)") }
    }
}
