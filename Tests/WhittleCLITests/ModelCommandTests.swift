import Foundation
import Testing
import WhittleTestSupport

/// The `coordinator model …` commands as a person or script runs them: real processes, real files.
@Suite struct ModelCommandTests {
    let coordinator = TestSupport.productsDirectory.appendingPathComponent("coordinator")
    let fixtures = TestSupport.fixtures.path

    func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-cli-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    @Test func inspectPrintsJSON() throws {
        let result = try TestSupport.runProcess(coordinator, ["model", "inspect", "\(fixtures)/resnet_bn_op13.onnx", "--json"])
        #expect(result.status == 0)
        let json = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
        let summary = json["summary"] as! [String: Any]
        #expect(summary["opset"] as? Int == 13)
        #expect((summary["macs"] as? Int ?? 0) > 1_000_000)
        #expect((summary["inputs"] as! [[String: Any]])[0]["shape"] as? [String] == ["batch", "3", "32", "32"])
    }

    @Test func runWritesOutputsMatchingOnnxRuntime() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(at: dir) }
        let out = dir.appendingPathComponent("y.npy").path
        let result = try TestSupport.runProcess(coordinator, [
            "model", "run", "\(fixtures)/mobilenetv2_bn_op13.onnx", "--input", "\(fixtures)/mobilenetv2_bn_op13.input.npy",
            "--output", out, "--batch-size", "3", "--threads", "1"])
        #expect(result.status == 0, "\(result.stderr)")
        let y = try NPYFile.load(out)
        let expected = try TestSupport.npy("mobilenetv2_bn_op13.ort_output.npy")
        #expect(y.shape == [4, 10])
        #expect(TestSupport.relativeError(y.floats, expected.floats) < 1e-4)
    }

    @Test func evalReportsAccuracy() throws {
        let root = TestSupport.root.path
        let result = try TestSupport.runProcess(coordinator, [
            "model", "eval", "\(root)/examples/models/defect_cnn.onnx", "--data", "\(root)/examples/data/defects_test_x.npy",
            "--labels", "\(root)/examples/data/defects_test_y.npy", "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
        #expect(json["samples"] as? Int == 512)
        // The shipped demo model's accuracy as onnxruntime measured it when the model was made (examples/models).
        #expect(abs((json["accuracy"] as? Double ?? 0) - 461.0 / 512.0) < 1e-9)
    }

    @Test func memoryLimitPicksTheBatchSize() throws {
        let root = TestSupport.root.path
        let arguments = ["model", "eval", "\(root)/examples/models/defect_cnn.onnx", "--data",
                         "\(root)/examples/data/defects_test_x.npy", "--labels", "\(root)/examples/data/defects_test_y.npy",
                         "--json"]
        let small = try TestSupport.runProcess(coordinator, arguments + ["--memory-limit", "3MB"])
        #expect(small.status == 0, "\(small.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(small.stdout.utf8)) as! [String: Any]
        let batch = json["batchSize"] as? Int ?? 0
        #expect(batch >= 1 && batch < 32)
        #expect(abs((json["accuracy"] as? Double ?? 0) - 461.0 / 512.0) < 1e-9)
        let tiny = try TestSupport.runProcess(coordinator, arguments + ["--memory-limit", "100KB"])
        #expect(tiny.status != 0)
        #expect(tiny.stderr.contains("does not fit"))
    }

    @Test(arguments: [
        (["model", "inspect", "/nonexistent/model.onnx"], "file not found"),
        (["model", "inspect", "Package.swift"], "not a valid ONNX model"),
        (["model", "run", "Tests/Fixtures/models/resnet_bn_op13.onnx", "--input", "Tests/Fixtures/models/resnet_bn_op13.onnx",
          "--output", "/tmp/x.npy"], "not a .npy file"),
        (["model", "run", "Tests/Fixtures/models/resnet_bn_op13.onnx", "--input",
          "Tests/Fixtures/models/smallcnn_dynamo.ort_output.npy", "--output", "/tmp/x.npy"], "rank 4"),
        (["model", "eval", "examples/models/defect_cnn.onnx", "--data", "examples/data/defects_test_x.npy",
          "--labels", "examples/data/defects_test_x.npy"], "labels must be integers"),
        (["model", "run", "Tests/Fixtures/models/resnet_bn_op13.onnx", "--input", "x", "--output", "y", "--batch-size", "0"],
         "--batch-size"),
        (["model", "eval", "examples/models/defect_cnn.onnx", "--data", "x", "--labels", "y", "--memory-limit", "lots"],
         "--memory-limit"),
    ])
    func badInputGivesAClearErrorAndNonZeroExit(_ arguments: [String], _ message: String) throws {
        let process = Process()
        process.executableURL = coordinator
        process.arguments = arguments
        process.currentDirectoryURL = TestSupport.root
        let err = Pipe()
        process.standardError = err
        process.standardOutput = Pipe()
        try process.run()
        let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationReason == .exit)
        #expect(process.terminationStatus != 0)
        #expect(text.contains(message), "stderr was: \(text)")
    }
}

import WhittleTensor

enum NPYFile {
    static func load(_ path: String) throws -> Tensor { try NPY.decode(try TestSupport.bytes(URL(fileURLWithPath: path))) }
}
