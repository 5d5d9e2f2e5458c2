import Foundation
import Testing
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// Every model of the family zoo (torchvision classifiers, segmenters, YOLO-style detectors, ViT, BERT-style
/// encoders; TorchScript opsets 13–20 and dynamo) runs and matches onnxruntime.
@Suite struct ZooTests {
    /// Largest difference relative to the output's largest magnitude (issue 16's parity goal).
    static let onnxruntimeTolerance: Float = 1e-4

    static func session(_ name: String, fast: Bool = true) throws -> InferenceSession {
        let model = try ModelCoding.read(try TestSupport.bytes(TestSupport.zoo.appendingPathComponent("\(name).onnx")))
        return try InferenceSession(model: model, options: KernelOptions(fast: fast))
    }

    static func check(_ name: String, fast: Bool) throws {
        let session = try session(name, fast: fast)
        let inputs = try TestSupport.zooInputs(name, model: session.model.graph.runtimeInputs.map(\.name))
        let expected = try NPY.decode(try TestSupport.bytes(TestSupport.zoo.appendingPathComponent("\(name).ort_output.npy")))
        let output = try #require(try session.run(inputs: inputs)[session.primaryOutput])
        #expect(output.shape == expected.shape, "\(name)")
        let error = TestSupport.relativeError(output.floats, expected.floats)
        #expect(error < Self.onnxruntimeTolerance, "\(name): relative error \(error)")
    }

    /// The zoo's manifest lists every family (a missing manifest would make the tests below vacuous).
    @Test func theZooIsComplete() { #expect(TestSupport.zooModels.count >= 26) }

    @Test(arguments: TestSupport.zooModels)
    func matchesOnnxRuntime(_ name: String) throws { try Self.check(name, fast: true) }

    /// The reference kernels give the same answers (they are what the fast kernels are checked against).
    @Test(arguments: ["mobilenetv3_op17", "convnext_op17", "vit_op17", "bert_cls_op17", "yolov8_dynamo"])
    func referenceKernelsMatchOnnxRuntime(_ name: String) throws { try Self.check(name, fast: false) }
}
