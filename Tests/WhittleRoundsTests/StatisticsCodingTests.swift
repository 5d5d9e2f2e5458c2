import Testing
import WhittleCompression
import WhittleNN
import WhittleProtocol
import WhittleRounds
import WhittleTensor
import WhittleTestSupport

@Suite struct StatisticsCodingTests {
    @Test func statisticsSurviveTheWireExactly() throws {
        var r = RangeStatistics()
        try r.add([-1.5, 0.25, 3.75])
        var h = try Histogram(lower: 0, upper: 4, binCount: 64, magnitudes: true)
        try h.add(TestSupport.randomFloats(500, seed: 9).map { $0 * 4 })
        var c = ChannelStatistics(channels: 2)
        try c.add(TestSupport.randomFloats(40, seed: 10), shape: [5, 2, 4])
        var report = Whittle_CalibrationReport()
        report.ranges = ["conv1": Whittle_RangeStatistics(r)]
        report.histograms = ["conv1": Whittle_Histogram(h)]
        report.samples = 5
        let bytes: [UInt8] = try report.serializedBytes()
        let decoded = try Whittle_CalibrationReport.decode(bytes)
        #expect(decoded.ranges["conv1"] == r)
        #expect(decoded.histograms["conv1"] == h)
        #expect(decoded.samples == 5)
        let channelBytes: [UInt8] = try Whittle_ChannelStatistics(c).serializedBytes()
        #expect(try Whittle_ChannelStatistics(serializedBytes: channelBytes).decoded() == c)
    }

    @Test func hostileStatisticsAreRefused() throws {
        var bad = Whittle_RangeStatistics()
        bad.min = .nan
        bad.max = 1
        bad.count = 3
        #expect(throws: CompressionError.self) { try bad.decoded() }
        var inverted = Whittle_RangeStatistics()
        (inverted.min, inverted.max, inverted.count) = (2, 1, 1)
        #expect(throws: CompressionError.self) { try inverted.decoded() }
        var huge = Whittle_Histogram()
        huge.upper = 1
        huge.counts = [UInt64](repeating: 1, count: 70000)
        #expect(throws: CompressionError.self) { try huge.decoded() }
        var ragged = Whittle_ChannelStatistics()
        ragged.sums = [1, 2]
        ragged.absoluteSums = [1]
        #expect(throws: CompressionError.self) { try ragged.decoded() }
        #expect(throws: CompressionError.self) { try Whittle_CalibrationReport.decode(Array("not protobuf at all!!".utf8)) }
    }

    @Test func importanceReportsSurviveTheWireAndHostileOnesAreRefused() throws {
        var s = ImportanceStatistics()
        var c = ChannelStatistics(channels: 3)
        try c.add(TestSupport.randomFloats(24, seed: 3), shape: [2, 3, 4])
        s.channels["relu1"] = c
        s.gradientSums["conv1.weight"] = Tensor(shape: [3, 2], floats: TestSupport.randomFloats(6, seed: 4))
        s.samples = 2
        let decoded = try Whittle_ImportanceReport.decode(try Whittle_ImportanceReport(s).serializedBytes())
        #expect(decoded.channels == s.channels)
        #expect(decoded.gradientSums == s.gradientSums)
        #expect(decoded.samples == 2)

        var ragged = Whittle_FloatTensor()
        ragged.shape = [2, 2]
        ragged.values = [1, 2, 3]
        #expect(throws: CompressionError.self) { try ragged.decoded() }
        var poisoned = Whittle_FloatTensor()
        poisoned.shape = [2]
        poisoned.values = [1, .infinity]
        #expect(throws: CompressionError.self) { try poisoned.decoded() }
        var enormous = Whittle_FloatTensor()
        enormous.shape = [1 << 20, 1 << 20]
        #expect(throws: CompressionError.self) { try enormous.decoded() }
        #expect(throws: CompressionError.self) { try Whittle_ImportanceReport.decode([0xFF, 0xFF, 0xFF]) }
    }

    /// Evaluation reports round-trip through the wire, and forged counts are refused without a trap: units beyond
    /// what `Int` holds, per-class counts beyond the units, a task no one knows.
    @Test func evaluationReportsDecodeOrAreRefused() throws {
        var e = TaskEvaluation(task: .segmentation)
        e.samples = 2; e.units = 8; e.agreement = 6; e.labelled = true; e.baseCorrect = 7; e.compressedCorrect = 5
        e.baseIntersection = [3, 4]; e.baseUnion = [4, 5]; e.compressedIntersection = [2, 3]; e.compressedUnion = [5, 6]
        e.squaredError = 0.5; e.squaredReference = 8
        let message = Whittle_EvaluationReport(e)
        let decoded = try Whittle_EvaluationReport(serializedBytes: try message.serializedBytes() as [UInt8]).decoded()
        #expect(decoded == e)
        var huge = message
        huge.samples = 1 << 39
        huge.units = 1 << 63
        #expect { try huge.decoded() } throws: { "\($0)".contains("units") }
        var union = message
        union.compressedUnion = [1 << 40, 1]
        #expect { try union.decoded() } throws: { "\($0)".contains("intersections and unions") }
        var unknown = message
        unknown.taskKind = "telepathy"
        #expect { try unknown.decoded() } throws: { "\($0)".contains("unknown task") }
    }
}
