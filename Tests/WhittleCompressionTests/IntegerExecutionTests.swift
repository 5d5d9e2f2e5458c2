import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// QDQ models exported by Whittle run their convolutions, Gemm and pooling as integer kernels (`KernelOptions.integer`), and agree
/// with the float simulation of the same file (every QuantizeLinear, DequantizeLinear and float op on its own).
@Suite struct IntegerExecutionTests {
    /// Against the float simulation the integer path differs where a requantized value rounds the other way (one
    /// quantization step, where the simulation's float products land near a half): on the demo's four logits, up to
    /// about 0.01. Against onnxruntime's integer kernels the bound is 1e-3 (Tests/interop, measured 0).
    static let relativeTolerance: Float = 0.02
    /// Top-1 agreement on the demo's holdout images.
    static let minimumAgreement = 0.999

    static let policies: [(String, QuantizationPolicy)] = {
        var symmetric = QuantizationPolicy(mode: .int8)
        symmetric.activationType = .int8
        symmetric.symmetricActivations = true
        var perTensor = QuantizationPolicy(mode: .int8)
        perTensor.perChannel = false
        return [("uint8 asymmetric, per channel", QuantizationPolicy(mode: .int8)), ("int8 symmetric", symmetric),
                ("per tensor", perTensor)]
    }()

    @Test(arguments: 0..<policies.count)
    func demoConvolutionsRunOnIntegerKernels(_ which: Int) throws {
        let (label, policy) = Self.policies[which]
        let (q, _, _, data) = try QDQExportTests.quantize(policy)
        let integer = try InferenceSession(model: q)
        let simulated = try InferenceSession(model: q, options: KernelOptions(integer: false))
        // Every Conv, the Gemm head and the global average pool before it.
        let groups = q.graph.nodes.filter { ["Conv", "Gemm", "GlobalAveragePool"].contains($0.opType) }.count
        #expect(try integer.compiled(batchSize: data.count).integerSteps == groups, "\(label): every Conv, Gemm and pool")
        #expect(try simulated.compiled(batchSize: data.count).integerSteps == 0)
        let a = try integer.firstOutput(data.samples), b = try simulated.firstOutput(data.samples)
        #expect(a.shape == b.shape)
        #expect(TestSupport.relativeError(a.floats, b.floats) < Self.relativeTolerance, "\(label)")
        let classes = a.shape[1], n = a.shape[0]
        func top1(_ t: Tensor, _ row: Int) -> Int {
            let r = t.floats[(row * classes)..<((row + 1) * classes)]
            return r.indices.max { r[$0] < r[$1] }! - row * classes
        }
        let agreeing = (0..<n).filter { top1(a, $0) == top1(b, $0) }.count
        #expect(Double(agreeing) >= Self.minimumAgreement * Double(n), "\(label): \(agreeing) of \(n)")
    }
}
