import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

@Suite struct CollectionTests {
    /// Two workers collecting on halves of the data, merged, give exactly the ranges and histograms of one
    /// collector on all of it — the federated calibration property. (All collectors use batches of 2: oneDNN may
    /// sum in a different order for another batch size, which moves an activation by an ulp; that is the engine's
    /// batch-size dependence, not the merge's.)
    @Test func collectingOnSplitDataMergesToTheWhole() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("mobilenetv2_bn_op13.onnx"))
        let x = try TestSupport.npy("mobilenetv2_bn_op13.input.npy")
        let half = x.count / 2
        let first = Tensor(shape: [2, 3, 32, 32], floats: Array(x.floats[..<half]))
        let second = Tensor(shape: [2, 3, 32, 32], floats: Array(x.floats[half...]))

        let whole = CalibrationCollector(session: try InferenceSession(model: model))
        try whole.collectRanges(first)
        try whole.collectRanges(second)
        let a = CalibrationCollector(session: try InferenceSession(model: model))
        let b = CalibrationCollector(session: try InferenceSession(model: model))
        try a.collectRanges(first)
        try b.collectRanges(second)
        #expect(whole.ranges.count > 50)
        var merged: [String: RangeStatistics] = [:]
        for (name, r) in a.ranges { merged[name] = try r.merged(with: b.ranges[name]!) }
        #expect(merged == whole.ranges)

        let uppers = merged.mapValues { $0.absMax }
        for c in [whole, a, b] { try c.beginHistograms(upperBounds: uppers) }
        try whole.collectHistograms(first)
        try whole.collectHistograms(second)
        try a.collectHistograms(first)
        try b.collectHistograms(second)
        for (name, h) in whole.histograms {
            #expect(try a.histograms[name]!.merged(with: b.histograms[name]!) == h, "\(name)")
        }
        let conv = model.graph.nodes.first { $0.opType == "Conv" }!.outputs[0]
        #expect(try Calibrators.entropy(whole.histograms[conv]!) == Calibrators.entropy(
            try a.histograms[conv]!.merged(with: b.histograms[conv]!)))
    }
}
