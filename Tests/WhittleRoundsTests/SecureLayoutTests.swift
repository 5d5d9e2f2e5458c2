import Testing
import WhittleCompression
import WhittlePrivacy
import WhittleProtocol
import WhittleRounds
import WhittleTensor
import WhittleNN

/// Weights merged under secure aggregation agree with the clear path to this relative error (the ring's fixed
/// point is far finer; the mean passes once more through Float).
let secureRelativeTolerance = 1e-5

/// Reports summed under secure aggregation (encoded by `SecureLayout`, masked and unmasked by the real protocol)
/// fold into the same aggregate as the clear reports.
@Suite struct SecureLayoutTests {
    /// The ring sum of `vectors` through the whole protocol among their workers.
    static func secureSum(_ vectors: [String: [UInt64]], random: inout SplitMix64) throws -> [UInt64] {
        let setup = try SecureAggregationSetup(session: Array("round".utf8), participants: Array(vectors.keys))
        var server = SecureAggregationServer(setup: setup)
        var clients: [String: SecureAggregationClient] = [:]
        for n in setup.participants {
            clients[n] = try SecureAggregationClient(name: n, session: setup.session, sums: setup.sums, using: &random)
            try server.receive(advertisement: clients[n]!.advertisement, from: n)
        }
        try server.closeAdvertising()
        for n in setup.participants { try server.receive(envelopes: try clients[n]!.shareKeys(setup, advertisements: try server.advertisements(for: n), using: &random), from: n) }
        try server.closeSharing()
        let length = vectors.first!.value.count
        try server.open(sum: 0, partners: Set(setup.participants), length: length)
        for n in setup.participants {
            try clients[n]!.receive(envelopes: try server.envelopes(for: n))
            try server.receive(maskedInput: try clients[n]!.maskedInput(vectors[n]!, sum: 0, partners: try server.partners(of: n, sum: 0)), sum: 0, from: n)
        }
        try server.closeInputs(sum: 0)
        for n in setup.participants { try server.receive(unmask: try clients[n]!.unmask(try server.unmaskRequest(for: n, sum: 0), sum: 0), sum: 0, from: n) }
        return try server.result(sum: 0)
    }

    @Test func fedAvgUnderSecureAggregationMatchesTheClearMerge() throws {
        var random = SplitMix64(seed: 11)
        let shapes = ["conv.weight": [4, 3, 3, 3], "conv.bias": [4], "fc.weight": [2, 4]]
        let clipNorm = 2.0
        var reports: [String: Whittle_TaskReport] = [:]
        for k in 0..<8 {
            var message = Whittle_WeightUpdate()
            // Worker 3's update is far above the clip norm: the worker clips it before encoding, as the coordinator
            // clips it in the clear.
            let scale: Float = k == 3 ? 5 : 0.1
            for (name, shape) in shapes {
                let n = shape.reduce(1, *)
                message.deltas[name] = Whittle_FloatTensor(Tensor(shape: shape, floats: (0..<n).map { _ in Float.random(in: -scale...scale, using: &random) }))
            }
            message.samples = UInt64(100 + 37 * k)
            message.loss = 0.5 + Double(k) / 10
            var report = Whittle_TaskReport()
            report.update = message
            reports["camera-\(k)"] = report
        }
        var expectation = PhaseExpectation(kind: .finetune)
        expectation.shapes = shapes
        var clear = PhaseAccumulator(expectation: expectation, clipNorm: clipNorm)
        for (worker, r) in reports { try clear.add(r, worker: worker, maximumSamples: 1000) }

        let layout = try SecureLayout.update(shapes: shapes, clipNorm: clipNorm, maximumSamples: 1000, summands: 8)
        let sum = try Self.secureSum(try reports.mapValues { try layout.encode($0) }, random: &random)
        var secure = PhaseAccumulator(expectation: expectation, clipNorm: clipNorm)
        try secure.add(try layout.decode(sum), worker: "secure sum", maximumSamples: 1000 * 8)

        #expect(secure.samples == clear.samples)
        let a = try clear.delta(), b = try secure.delta()
        for (name, t) in a {
            for (x, y) in zip(t.floats, b[name]!.floats) {
                #expect(abs(Double(x) - Double(y)) <= secureRelativeTolerance * max(abs(Double(x)), 1e-3))
            }
        }
        // The loss is the sample-weighted mean of the workers' losses.
        let weighted = reports.values.reduce(0.0) { $0 + $1.update.loss * Double($1.update.samples) } / Double(clear.samples)
        #expect(abs(secure.losses[0] - weighted) < 1e-9)
    }

    @Test func histogramsUnderSecureAggregationAreIdentical() throws {
        var random = SplitMix64(seed: 12)
        let upper: [String: Float] = ["relu1": 6, "relu2": 3.5]
        var reports: [String: Whittle_TaskReport] = [:]
        for k in 0..<6 {
            var calibration = Whittle_CalibrationReport()
            for (name, u) in upper {
                let counts = (0..<64).map { _ in UInt64.random(in: 0...5000, using: &random) }
                calibration.histograms[name] = Whittle_Histogram(try Histogram(lower: 0, upper: u, counts: counts, magnitudes: true))
            }
            calibration.samples = UInt64(50 + k)
            var report = Whittle_TaskReport()
            report.calibration = calibration
            reports["camera-\(k)"] = report
        }
        var expectation = PhaseExpectation(kind: .histograms)
        expectation.histogramUpper = upper
        expectation.histogramBins = 64
        var clear = PhaseAccumulator(expectation: expectation)
        for (worker, r) in reports { try clear.add(r, worker: worker, maximumSamples: 100) }
        let layout = SecureLayout.histograms(upper: upper, bins: 64, maximumSamples: 100, maximumValues: 1 << 40)
        let sum = try Self.secureSum(try reports.mapValues { try layout.encode($0) }, random: &random)
        var secure = PhaseAccumulator(expectation: expectation)
        try secure.add(try layout.decode(sum), worker: "secure sum", maximumSamples: 600)
        #expect(secure.histograms == clear.histograms)
        #expect(secure.samples == clear.samples)
    }

    @Test func reportsTheLayoutCannotSumAreRefused() throws {
        let layout = try SecureLayout.update(shapes: ["w": [2]], clipNorm: 1, maximumSamples: 10, summands: 4)
        var message = Whittle_WeightUpdate()
        message.deltas["w"] = Whittle_FloatTensor(Tensor(shape: [2], floats: [0.1, 0.2]))
        message.samples = 5
        var report = Whittle_TaskReport()
        report.update = message
        #expect(try layout.encode(report).count == layout.length)
        var compressed = message
        compressed.compressedDeltas["w"] = Whittle_QuantizedTensor()
        compressed.deltas = [:]
        var other = message
        other.deltas["v"] = Whittle_FloatTensor(Tensor(shape: [1], floats: [0]))
        var tooMany = message
        tooMany.samples = 11
        for bad in [compressed, other, tooMany] {
            var r = Whittle_TaskReport()
            r.update = bad
            #expect(throws: CompressionError.self) { try layout.encode(r) }
        }
        #expect(throws: CompressionError.self) { try SecureLayout.update(shapes: ["w": [2]], clipNorm: 0, maximumSamples: 10, summands: 4) }
        var calibration = Whittle_TaskReport()
        calibration.calibration = Whittle_CalibrationReport()
        #expect(throws: CompressionError.self) { try layout.encode(calibration) }
    }
}
