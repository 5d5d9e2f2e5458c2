import Foundation
import Logging
import WhittleIO
import WhittleCompression
import WhittleHTTPClient
import WhittleNN
import WhittleONNX
import WhittlePKI
import WhittlePrivacy
import WhittleProtocol
import WhittleRounds
import WhittleTensor

/// Shows a transfer's progress: bytes done of a total, if known.
package protocol TransferProgress: AnyObject, Sendable {
    func bytes(_ label: String, _ done: Int, _ total: Int?)
    func finish()
}

/// Runs the tasks a coordinator hands out: downloads the task's artifacts (resumed, SHA-256 verified, cached),
/// computes on the local data (WorkerJobs), and uploads the report with retries under one upload id, so a
/// retried upload is never counted twice. Only statistics and deltas leave the board.
package final class TaskRunner {
    package let client: HTTPClient
    package let layout: WorkerLayout
    package let data: Dataset
    /// Held-out samples for the evaluation phase, if the worker has them.
    package let evaluation: Dataset?
    package let memoryLimit: Int?
    package var compressor = DeltaCompressor()
    /// The local optimizer's state at the end of the last fine-tuning task, with its round and kind (in memory: a
    /// restarted worker starts afresh).
    package var optimizerState: (key: String, state: Optimizer.State)?
    /// The teacher's logits of this worker's training data, kept across the fine-tuning tasks of rounds that share a
    /// teacher (the base model, named by its SHA-256).
    package var teacherCache: (sha: String, cache: TeacherLogitsCache)?
    /// False for a board that cannot time models (`worker run --no-timing`): its jobs get no clock.
    package var timing = true
    /// The latency tables this worker measured, kept across restarts.
    package lazy var latencyTables = LatencyTableFiles(directory: layout.file("latency-tables"), log: agentLog)
    /// This worker's secrets of each secure round's session, by round id (in memory only: a restarted worker sits
    /// out the rest of the round's secure phases, and its neighbours' shares remove its masks).
    package var secure: [String: SecureAggregationClient] = [:]
    /// Tasks ("round/phase") finished or given up, so a re-sent task is not computed twice.
    package var finished: Set<String> = []

    package let agentLog: AgentLog
    /// Where download progress is shown (the worker command draws a bar on a terminal); nil shows nothing.
    package var progress: (any TransferProgress)?
    /// The running task's log metadata.
    package var context: Logger.Metadata = [:]

    package init(client: HTTPClient, layout: WorkerLayout, data: Dataset, evaluation: Dataset?, memoryLimit: Int?, log: AgentLog) {
        agentLog = log
        self.client = client
        self.layout = layout
        self.data = data
        self.evaluation = evaluation
        self.memoryLimit = memoryLimit
    }

    package static func key(_ task: Whittle_Task) -> String { "\(task.roundID)/\(task.phase)" }

    package func log(_ message: String) { agentLog.warning(message, context) }

    /// The artifact's local copy (downloaded once, verified), and the bytes downloaded for it now.
    package func artifact(_ sha: String, folder: String = "artifacts") throws -> (path: String, downloaded: Int) {
        guard Identifiers.isSHA256(sha) else { throw AgentError(.badTask, "the task names a malformed artifact (not 64 lowercase hex digits)") }
        let directory = layout.file(folder)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = directory + "/" + sha + ".onnx"
        if FileManager.default.fileExists(atPath: path) { return (path, 0) }
        let partial = path + ".part"
        let had = ((try? FileManager.default.attributesOfItem(atPath: partial))?[.size] as? NSNumber)?.intValue ?? 0
        let bar = progress
        defer { bar?.finish() }
        do {
            try client.download("/v1/worker/artifacts/" + sha, to: partial, sha256: sha,
                                retry: RetryPolicy(attempts: 8, baseDelay: 0.5, maximumDelay: 10)) { have, total in
                bar?.bytes("download \(sha.prefix(12))…", have, total)
            }
        } catch let error as HTTPClientError {
            throw AgentError(.coordinatorRefused, "downloading artifact \(sha.prefix(12))…: \(error.description)")
        }
        let size = ((try? FileManager.default.attributesOfItem(atPath: partial))?[.size] as? NSNumber)?.intValue ?? 0
        try Files.move(partial, to: path)
        return (path, max(0, size - had))
    }

    package func model(_ sha: String, bytesDown: inout Int) throws -> Model {
        let (path, downloaded) = try artifact(sha)
        bytesDown += downloaded
        return try Files.readModel(path)
    }

    /// The lock file the evaluate job holds, shared by every worker process of this machine's user.
    package static var evaluationLock: String { (NSTemporaryDirectory() as NSString).appendingPathComponent("whittle-evaluate.lock") }

    /// Runs `body` holding an exclusive advisory lock (flock) on `path`, waiting for it; without a path, or when the
    /// file cannot be opened, without a lock.
    package static func exclusive<R>(on path: String?, _ body: () throws -> R) rethrows -> R {
        guard let path else { return try body() }
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o666)
        guard fd >= 0 else { return try body() }
        defer { close(fd) }  // closing releases the lock
        while flock(fd, LOCK_EX) != 0 && errno == EINTR {}
        return try body()
    }

    /// Computes a task's report.
    package func compute(_ task: Whittle_Task) throws -> Whittle_TaskReport {
        let clock = ContinuousClock()
        let t0 = clock.now
        var bytesDown = 0
        var report: Whittle_TaskReport
        guard let handler = PhaseKind(rawValue: task.kind)?.handler else {
            throw CompressionError(.invalidArgument, "task kind '\(task.kind)' is not one this worker knows")
        }
        if handler.downloadsModel {
            let (path, downloaded) = try artifact(task.modelSha256, folder: "models")
            bytesDown += downloaded
            var d = Whittle_DistributionReport()
            d.sha256 = task.modelSha256
            d.bytes = UInt64(((try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? NSNumber)?.intValue ?? 0)
            d.path = path
            report = Whittle_TaskReport()
            report.distribution = d
        } else {
            let model = try model(task.modelSha256, bytesDown: &bytesDown)
            let teacher = task.teacherSha256.isEmpty || task.teacherSha256 == task.modelSha256 ? model
                : try self.model(task.teacherSha256, bytesDown: &bytesDown)
            var ewc: WorkerJobs.EWC?
            if !task.ewcSha256.isEmpty {
                let (path, downloaded) = try artifact(task.ewcSha256)
                bytesDown += downloaded
                let state = try Whittle_EWCState(serializedBytes: try Files.readBytes(path))
                ewc = WorkerJobs.EWC(lambda: task.ewcLambda, fisher: try state.fisher.mapValues { try $0.decoded() },
                                     reference: try state.reference.mapValues { try $0.decoded() })
            }
            let local = handler.timesModels ? (evaluation ?? data) : data
            let batch = try WorkerJobs.batchSize(model: model, planned: Int(max(task.batchSize, 1)), memoryLimit: memoryLimit,
                                                 training: handler.backpropagates(task), data: local)
            let stateKey = "\(task.roundID)/\(task.kind)"
            var state = optimizerState?.key == stateKey ? optimizerState?.state : nil
            let teacherSHA = task.teacherSha256.isEmpty ? task.modelSha256 : task.teacherSha256
            if teacherCache?.sha != teacherSHA { teacherCache = (teacherSHA, TeacherLogitsCache()) }
            let origin = ContinuousClock.now
            // Workers sharing a machine evaluate one at a time, so each times its models without the others' load; a
            // job that only times a little (finalists) takes the lock around its timing alone. A board that cannot
            // time models (`--no-timing`) gets no clock.
            var probe = LatencyProbe(now: { ContinuousClock.now - origin })
            if !handler.timesModels { probe.exclusive = { body in try Self.exclusive(on: Self.evaluationLock, body) } }
            var client = secure[task.roundID]
            report = try Self.exclusive(on: handler.timesModels ? Self.evaluationLock : nil) {
                try WorkerJobs.run(task, model: model, teacher: teacher, ewc: ewc, data: local, batchSize: batch,
                                   compressor: &compressor, optimizerState: &state, teacherCache: teacherCache?.cache,
                                   latency: timing ? probe : nil, latencyTables: latencyTables, secure: &client)
            }
            if let client {
                // One session per round; a new round's keys replace older rounds' secrets.
                if secure[task.roundID] == nil { secure = [:] }
                secure[task.roundID] = client
            }
            if handler.trains {
                optimizerState = state.map { (stateKey, $0) }
            }
        }
        report.protocolVersion = protocolVersion
        report.roundID = task.roundID
        report.phase = task.phase
        report.bytesDown = UInt64(bytesDown)
        report.computeSeconds = seconds(clock.now - t0)
        return report
    }

    /// Where a computed report waits until the coordinator has acknowledged it (a restarted worker uploads it
    /// again under the same upload id instead of computing anew). Only for tasks whose round id passed
    /// `Identifiers.isRoundID` (checked in `run`): the name can never leave the pending folder.
    package func pendingPath(_ task: Whittle_Task) -> String {
        precondition(Identifiers.isRoundID(task.roundID), "pendingPath of an unchecked task")
        return layout.file("pending") + "/\(task.roundID)-\(task.phase).pb"
    }

    /// Computes (or takes the pending result of) a task and uploads it. Never throws: a task that cannot be done
    /// is reported on stderr and not tried again. A task with a malformed identifier is refused before anything
    /// touches a file.
    package func run(_ task: Whittle_Task) {
        let key = Self.key(task)
        guard !finished.contains(key) else { return }
        defer { finished.insert(key) }
        if let problem = Identifiers.problem(in: task) {
            agentLog.warning("refused a task from the coordinator: \(problem)", ["task.kind": "\(task.kind.prefix(32))"])
            return
        }
        let label = "task \(task.kind) (round \(task.roundID), phase \(task.phase))"
        context = ["round.id": "\(task.roundID)", "phase": "\(task.phase)", "task.kind": "\(task.kind)"]
        var body: [UInt8]
        do {
            try FileManager.default.createDirectory(atPath: layout.file("pending"), withIntermediateDirectories: true)
            if let pending = try? Files.readBytes(pendingPath(task)) {
                body = pending
            } else {
                var report = try compute(task)
                report.uploadID = PKI.randomHex(12)
                body = try report.serializedBytes()
                try Files.writeDurably(body, to: pendingPath(task))
            }
        } catch let error as CompressionError {
            log("\(label) failed: \(error.message)")
            return
        } catch let error as ONNXError {
            log("\(label) failed: \(error.message)")
            return
        } catch {
            log("\(label) failed: \(error)")
            return
        }
        var attempt = 1
        let backoff = RetryPolicy(attempts: Int.max, baseDelay: 0.5, maximumDelay: 15)
        while true {
            do {
                let response = try client.request("POST", "/v1/worker/reports", body: body, contentType: "application/x-protobuf")
                if response.status == 200 {
                    let duplicate = (try? Whittle_TaskReportResponse(serializedBytes: response.body))?.duplicate ?? false
                    agentLog.info("\(label): report accepted (\(body.count) bytes\(duplicate ? ", already counted" : ""))",
                                  context.merging(["bytes": "\(body.count)", "duplicate": "\(duplicate)"]) { $1 })
                    break
                }
                if RetryPolicy.isRetryable(status: response.status) {
                    Thread.sleep(forTimeInterval: backoff.delay(attempt: attempt, retryAfter: response.retryAfter))
                    attempt += 1
                    continue
                }
                log("\(label): the coordinator refused the report: \(errorMessage(response))")
                break
            } catch let error as HTTPClientError {
                guard Date().timeIntervalSince1970 < task.deadline + 60 else {
                    log("\(label): giving up the upload after the phase's deadline (\(error.description))")
                    break
                }
                Thread.sleep(forTimeInterval: backoff.delay(attempt: attempt, retryAfter: nil))
                attempt += 1
            } catch {
                log("\(label): the upload failed: \(error)")
                break
            }
        }
        try? FileManager.default.removeItem(atPath: pendingPath(task))
    }
}

/// Heartbeats on their own thread (and connection) while a task computes, so the coordinator knows the worker
/// is alive and busy. `stop` returns once the thread has finished (a request in flight completes first), so the
/// process never exits under a running heartbeat.
package final class BusyHeartbeat: @unchecked Sendable {
    package let box = StopBox()
    package let finished = DispatchSemaphore(value: 0)
    package var stopped = false

    package init(client: HTTPClient, body: [UInt8], seconds: Double) {
        let box = self.box, finished = self.finished
        let thread = Thread {
            defer { finished.signal() }
            while !box.isStopped {
                _ = try? client.request("POST", "/v1/worker/heartbeat", body: body, contentType: "application/x-protobuf")
                var waited = 0.0
                while waited < seconds, !box.isStopped {
                    Thread.sleep(forTimeInterval: 0.1)
                    waited += 0.1
                }
            }
        }
        thread.start()
    }

    /// Stops the heartbeats and waits for the thread to end (idempotent).
    package func stop() {
        guard !stopped else { return }
        stopped = true
        box.stop()
        finished.wait()
    }

    package final class StopBox: @unchecked Sendable {
        let lock = NSLock()
        var value = false
        var isStopped: Bool { lock.lock(); defer { lock.unlock() }; return value }
        func stop() { lock.lock(); value = true; lock.unlock() }
    }
}
