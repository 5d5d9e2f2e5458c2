import Foundation
import Testing
import WhittleCompression
import WhittleTensor
import WhittleTestSupport

/// Whittle's calibrators and quantization parameters against the numbers in Tests/Fixtures/calibration, made by
/// scripts/make_calibration_fixture.py: onnxruntime's own `compute_scale_zp`, and numpy references of the percentile,
/// entropy and MSE searches on the same histograms.
@Suite struct CalibrationReferenceTests {
    static let folder = TestSupport.root.appendingPathComponent("Tests/Fixtures/calibration")
    /// Thresholds are bin edges computed in Double and stored as Float on both sides; they agree to Float rounding.
    static let edgeTolerance: Float = 1e-6

    static func reference() throws -> [String: Any] {
        try JSONSerialization.jsonObject(with: Data(contentsOf: folder.appendingPathComponent("reference.json"))) as! [String: Any]
    }

    @Test(arguments: ["exponential", "gaussian", "relu_mixture"])
    func thresholdsMatchTheReference(_ name: String) throws {
        let entry = (try Self.reference()["histograms"] as! [String: Any])[name] as! [String: Double]
        let counts = try NPY.decode(try TestSupport.bytes(Self.folder.appendingPathComponent("histogram_\(name).npy"))).ints
        let h = try Histogram(lower: 0, upper: Float(entry["upper"]!), counts: counts.map { UInt64($0) }, magnitudes: true)
        func close(_ a: Float, _ b: Double) -> Bool { abs(a - Float(b)) <= Self.edgeTolerance * max(1, abs(Float(b))) }
        let observed = RangeStatistics(min: Float(entry["min"]!), max: Float(entry["max"]!), count: Int(h.total))
        let (low, high) = try Calibrators.percentile(h, range: observed, percentile: 99.99)
        #expect(close(high, entry["percentile_99_99"]!), "percentile \(high) vs \(entry["percentile_99_99"]!)")
        #expect(close(low, max(-entry["percentile_99_99"]!, entry["min"]!)) || low == Float(entry["min"]!))
        let kl = try Calibrators.entropy(h).1
        #expect(close(kl, entry["entropy"]!), "entropy \(kl) vs \(entry["entropy"]!)")
        let mse = try Calibrators.mse(h).1
        #expect(close(mse, entry["mse"]!), "mse \(mse) vs \(entry["mse"]!)")
    }

    @Test func scaleAndZeroPointEqualOnnxRuntime() throws {
        let cases = try Self.reference()["scale_zero_point"] as! [[String: Any]]
        #expect(cases.count == 24)
        for c in cases {
            let range = Int64(c["qmin"] as! Int)...Int64(c["qmax"] as! Int)
            let type: DataType = c["type"] as! String == "int8" ? .int8 : .uint8
            #expect(range == (try QuantizationParameters.range(type, symmetric: c["symmetric"] as! Bool)))
            let p = try QuantizationParameters.compute(min: Float(c["min"] as! Double), max: Float(c["max"] as! Double),
                                                       range: range, symmetric: c["symmetric"] as! Bool)
            #expect(p.scale == Float(c["scale"] as! Double), "\(c)")
            #expect(p.zeroPoint == Int64(c["zero_point"] as! Int), "\(c)")
        }
    }
}
