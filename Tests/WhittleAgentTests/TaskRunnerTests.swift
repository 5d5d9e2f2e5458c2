import Crypto
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import Testing
import WhittleAgent
import WhittleCLI
import WhittleCompression
import WhittleHTTPClient
import WhittleONNX
import WhittleProtocol
import WhittleTensor
import WhittleTestSupport

/// The worker's task runner against a coordinator stand-in on a local port: it downloads the task's model once
/// (verified by SHA-256, then cached), computes on its data, keeps the report in `pending/` until the coordinator
/// acknowledges it, uploads it again under the same upload id after a 503, takes up a pending report after a
/// restart without computing again, and refuses a task with a malformed identifier before touching a file.
@Suite(.serialized) struct TaskRunnerTests {
    static let model = try! TestSupport.bytes(TestSupport.root.appendingPathComponent("examples/models/defect_cnn.onnx"))
    static let sha = SHA256.hash(data: model).map { String(format: "%02x", $0) }.joined()
    static let round = "r20261206T202423-e73ca113"

    /// What the stand-in saw.
    actor Seen {
        var downloads = 0
        var uploads: [[UInt8]] = []
        var busy = 1
        func download() { downloads += 1 }
        /// The first upload is answered 503 (Retry-After 0), the others accepted.
        func upload(_ body: [UInt8]) -> Bool {
            uploads.append(body)
            if busy > 0 {
                busy -= 1
                return false
            }
            return true
        }
    }

    static func coordinator(_ seen: Seen) -> some ApplicationProtocol {
        let router = Router()
        router.get("/v1/worker/artifacts/:sha") { _, context -> Response in
            guard context.parameters.get("sha") == sha else { return Response(status: .notFound) }
            await seen.download()
            return Response(status: .ok, body: .init(byteBuffer: ByteBuffer(bytes: model)))
        }
        router.post("/v1/worker/reports") { request, _ -> Response in
            let body = try await request.body.collect(upTo: 1 << 24)
            guard await seen.upload(body.getBytes(at: body.readerIndex, length: body.readableBytes) ?? []) else {
                return Response(status: .serviceUnavailable, headers: [.retryAfter: "0"])
            }
            let answer: [UInt8] = try Whittle_TaskReportResponse().serializedBytes()
            return Response(status: .ok, body: .init(byteBuffer: ByteBuffer(bytes: answer)))
        }
        return Application(router: router)
    }

    static func task(phase: UInt32, tensors: [String]) -> Whittle_Task {
        var t = Whittle_Task()
        t.roundID = round
        t.phase = phase
        t.kind = "ranges"
        t.modelSha256 = sha
        t.teacherSha256 = sha
        t.tensors = tensors
        t.batchSize = 16
        t.deadline = Date().timeIntervalSince1970 + 600
        return t
    }

    static func runner(port: Int, directory: String) throws -> TaskRunner {
        let x = try NPY.decode(try TestSupport.bytes(TestSupport.root.appendingPathComponent("examples/data/defects_test_x.npy")))
        let first = Tensor(shape: [64] + Array(x.shape.dropFirst()), floats: Array(x.floats.prefix(64 * x.count / x.shape[0])))
        return TaskRunner(client: HTTPClient(baseURL: "http://127.0.0.1:\(port)"), layout: WorkerLayout(directory),
                          data: try Dataset(x: first, labels: nil), evaluation: nil, memoryLimit: nil,
                          log: AgentLog(format: .json, level: .critical, worker: "camera-0"))
    }

    @Test func reportsAreKeptUntilAcknowledgedAndRetriedUnderOneUploadID() async throws {
        let tensors = Array(try QDQExport.calibrationTensors(try ModelCoding.read(Self.model), policy: QuantizationPolicy(mode: .int8))).sorted()
        let seen = Seen()
        try await Self.coordinator(seen).test(.live) { client in
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-runner-\(UUID().uuidString)").path
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let runner = try Self.runner(port: client.port!, directory: directory)
            try await TestSupport.offThePool { runner.run(Self.task(phase: 3, tensors: tensors)) }
            let uploads = await seen.uploads
            #expect(uploads.count == 2, "a 503, then accepted")
            #expect(uploads[0] == uploads[1], "the retry sends the same report")
            let report = try Whittle_TaskReport(serializedBytes: uploads[1])
            #expect(report.roundID == Self.round && report.phase == 3 && report.uploadID.count == 24)
            #expect(Set(report.calibration.ranges.keys) == Set(tensors) && report.calibration.samples == 64)
            #expect(report.bytesDown == UInt64(Self.model.count))
            #expect(!FileManager.default.fileExists(atPath: runner.pendingPath(Self.task(phase: 3, tensors: tensors))), "acknowledged: no longer pending")
            // The same task again is not computed twice; the next one reuses the cached model.
            try await TestSupport.offThePool { runner.run(Self.task(phase: 3, tensors: tensors)) }
            #expect(await seen.uploads.count == 2)
            try await TestSupport.offThePool { runner.run(Self.task(phase: 4, tensors: tensors)) }
            #expect(await seen.downloads == 1)
            let next = try Whittle_TaskReport(serializedBytes: await seen.uploads.last!)
            #expect(next.phase == 4 && next.bytesDown == 0 && next.uploadID != report.uploadID)

            // A worker restarted with a pending report uploads it as it is, without computing or downloading.
            let restarted = try Self.runner(port: client.port!, directory: directory)
            var pending = report
            pending.phase = 5
            let bytes: [UInt8] = try pending.serializedBytes()
            try FileManager.default.createDirectory(atPath: directory + "/pending", withIntermediateDirectories: true)
            try Data(bytes).write(to: URL(fileURLWithPath: restarted.pendingPath(Self.task(phase: 5, tensors: tensors))))
            try FileManager.default.removeItem(atPath: directory + "/artifacts")
            try await TestSupport.offThePool { restarted.run(Self.task(phase: 5, tensors: tensors)) }
            #expect(await seen.uploads.last == bytes)
            #expect(await seen.downloads == 1)

            // A task whose round id could name a path is refused before anything is written.
            var hostile = Self.task(phase: 6, tensors: tensors)
            hostile.roundID = "../../etc"
            let before = await seen.uploads.count
            try await TestSupport.offThePool { restarted.run(hostile) }
            #expect(await seen.uploads.count == before)
            #expect(!FileManager.default.fileExists(atPath: directory + "/artifacts"))
        }
    }
}
