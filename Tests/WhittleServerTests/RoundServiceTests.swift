import Foundation
import Logging
import Testing
import WhittleCompression
import WhittleProtocol
import WhittleRounds
import WhittleServer
import WhittleStore
import WhittleTestSupport

/// The round service's fleet rules against a real SQLite store and data directory, without the network: duplicate
/// and stale uploads, a coordinator restart between reports, quorum failures, silent workers.
@Suite(.serialized) struct RoundServiceTests {
    static let modelBytes = try! TestSupport.bytes(TestSupport.root.appendingPathComponent("examples/models/defect_cnn.onnx"))

    struct Fixture {
        let directory: URL
        let store: SQLiteStore
        /// The service's time: phases' deadlines, selection windows and silences pass when a test advances it.
        let clock = ScriptedClock(Date())

        init() throws {
            directory = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-rounds-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            store = try SQLiteStore(path: directory.appendingPathComponent("whittle.sqlite").path)
        }

        /// A new service over the same store and directory: what `coordinator serve` has after a restart.
        func service(holds gate: Gate? = nil, privacyBudget: PrivacyPlan? = nil) throws -> RoundService {
            try RoundService(store: store, directory: directory, artifacts: directory.appendingPathComponent("artifacts"),
                             pollSeconds: 1, logger: Logger(label: "test"), now: clock.read, privacyBudget: privacyBudget,
                             holdTimer: { _ in await gate?.wait() })
        }

        func enroll(_ names: [String], samples: Int = 50) async throws {
            let now = clock.now
            try await store.addToken(TokenRecord(hash: "t", createdAt: now, expiresAt: now.addingTimeInterval(3600), uses: 100))
            for (k, name) in names.enumerated() {
                _ = try await store.enroll(tokenHash: "t", worker: WorkerRecord(
                    name: name, certificateSerial: "s\(k)", certificateExpiresAt: now.addingTimeInterval(86400), enrolledAt: now),
                    now: now)
                try await touch(name, samples: samples)
            }
        }

        /// A heartbeat from the worker now (or at `at`).
        func touch(_ name: String, samples: Int = 50, at: Date? = nil) async throws {
            let at = at ?? clock.now
            let capabilities = CapabilitiesView(cores: 1, memoryBytes: 1 << 30, samples: samples, labels: true, version: "t",
                                                memoryLimitBytes: 0, evaluationSamples: nil)
            try await store.recordContact(name: name, at: at, address: "127.0.0.1",
                                          capabilities: String(decoding: try JSONEncoder().encode(capabilities), as: UTF8.self))
        }

        /// A float round without pruning: export (at start), evaluate, distribute.
        func start(_ service: RoundService, minWorkers: Int = 2, deadline: Double = 600) async throws -> RoundRecord {
            var plan = RoundPlan()
            plan.quantize = .none
            plan.minWorkers = minWorkers
            plan.phaseDeadlineSeconds = deadline
            plan.modelSHA256 = try await service.storeArtifact(RoundServiceTests.modelBytes)
            return try await service.start(plan)
        }
    }

    static func evaluation(_ task: Whittle_Task, correct: UInt64, upload: String) -> (Whittle_TaskReport, [UInt8]) {
        var e = Whittle_EvaluationReport()
        e.samples = 40
        e.labels = true
        e.baseCorrect = 36
        e.compressedCorrect = correct
        e.agreement = 39
        e.baseLatencyMs = 1.5
        e.compressedLatencyMs = 1.0
        var r = Whittle_TaskReport()
        r.protocolVersion = 1
        r.roundID = task.roundID
        r.phase = task.phase
        r.uploadID = upload
        r.evaluation = e
        return (r, try! r.serializedBytes())
    }

    static func code(_ body: () async throws -> Void) async -> String? {
        do {
            try await body()
            return nil
        } catch let error as RoundError {
            return error.code.rawValue
        } catch {
            return "\(error)"
        }
    }

    static func phase(_ store: SQLiteStore, _ id: String) async throws -> RoundRecord { try await store.round(id: id)! }

    @Test func duplicatesCountOnceAndLateOrForeignReportsAreStale() async throws {
        let f = try Fixture()
        try await f.enroll(["a", "b", "c"])
        let service = try f.service()
        let round = try await f.start(service)
        #expect(round.phase == 1, "export ran at the start; the round waits at evaluate")
        let taskA = try #require(try await service.task(forWorkerNamed: "a"))
        let taskB = try #require(try await service.task(forWorkerNamed: "b"))
        #expect(taskA.kind == "evaluate" && taskA == taskB)
        #expect(try await service.task(forWorkerNamed: "a") == taskA, "the assignment is handed out again, not twice")

        let (reportA, bytesA) = Self.evaluation(taskA, correct: 30, upload: "upload-a-1")
        #expect(try await service.accept(reportA, bytes: bytesA, worker: try await f.store.worker(named: "a")!) == false)
        #expect(try await service.accept(reportA, bytes: bytesA, worker: try await f.store.worker(named: "a")!) == true)
        let (again, againBytes) = Self.evaluation(taskA, correct: 31, upload: "upload-a-2")
        #expect(await Self.code { _ = try await service.accept(again, bytes: againBytes, worker: try await f.store.worker(named: "a")!) } == "already_reported")
        // c never asked for the task: its report is not counted.
        #expect(await Self.code { _ = try await service.accept(again, bytes: againBytes, worker: try await f.store.worker(named: "c")!) } == "stale_report")
        #expect(try await f.store.reports(round: round.id, phase: 1).count == 1)

        // c took the task after all, then b and c report; after the selection window the phase closes.
        let taskC = try #require(try await service.task(forWorkerNamed: "c"))
        let (reportB, bytesB) = Self.evaluation(taskB, correct: 34, upload: "upload-b-1")
        #expect(try await service.accept(reportB, bytes: bytesB, worker: try await f.store.worker(named: "b")!) == false)
        let (reportC, bytesC) = Self.evaluation(taskC, correct: 35, upload: "upload-c-1")
        #expect(try await service.accept(reportC, bytes: bytesC, worker: try await f.store.worker(named: "c")!) == false)
        f.clock.advance(3.2)
        for name in ["a", "b", "c"] { try await f.touch(name) }
        await service.tick()
        let closed = try await Self.phase(f.store, round.id)
        #expect(closed.phase == 2 && closed.state == "running")
        // A retry of an accepted upload after the phase closed is still answered as a duplicate; anything else is stale.
        #expect(try await service.accept(reportA, bytes: bytesA, worker: try await f.store.worker(named: "a")!) == true)
        #expect(await Self.code { _ = try await service.accept(again, bytes: againBytes, worker: try await f.store.worker(named: "c")!) } == "already_reported")
        let progress = try RoundService.progress(closed)
        #expect(progress.phases[1].reports == 3)
        #expect(progress.after?.accuracy == Double(30 + 34 + 35) / 120)
        #expect(progress.sites["a"]?.accuracyAfter == 30.0 / 40)
    }

    /// Holds' timeouts in tests: a held heartbeat times out when the test releases the gate, never by the clock.
    actor Gate {
        var waiting: [CheckedContinuation<Void, Never>] = []
        func wait() async { await withCheckedContinuation { waiting.append($0) } }
        /// Every hold waiting on the gate times out now.
        func release() {
            for c in waiting { c.resume() }
            waiting = []
        }
    }

    /// Long polling: a held heartbeat wakes when a worker phase opens (round start, a phase closing) instead of
    /// waiting out its hold; an unchanged generation times out; a stale generation is not held; shutdown answers
    /// held heartbeats and holds no more. A hold ends only by a wake or by the test releasing its timer, so a wake
    /// that does not come shows as `.timedOut`.
    @Test func heldHeartbeatsWakeWhenAWorkerPhaseOpens() async throws {
        let f = try Fixture()
        try await f.enroll(["a", "b"])
        let gate = Gate()
        let service = try f.service(holds: gate)
        func held(after generation: Int, by change: () async throws -> Void) async throws -> LongPoll.Return {
            async let returned = service.waitForWork(after: generation, seconds: 60)
            while service.heldHeartbeats == 0 { await Task.yield() }
            try await change()
            await gate.release()  // a hold the change did not wake times out now
            return await returned
        }
        let idle = service.workGeneration
        var round: RoundRecord?
        #expect(try await held(after: idle) { round = try await f.start(service) } == .woken)
        let id = try #require(round?.id)
        let started = service.workGeneration
        #expect(started > idle)
        let taskA = try #require(try await service.task(forWorkerNamed: "a"))
        let taskB = try #require(try await service.task(forWorkerNamed: "b"))
        // A worker that has reported holds its heartbeat until the phase closes and the next one (distribute) opens.
        let (reportA, bytesA) = Self.evaluation(taskA, correct: 30, upload: "upload-a-1")
        #expect(try await service.accept(reportA, bytes: bytesA, worker: try await f.store.worker(named: "a")!) == false)
        #expect(try await service.task(forWorkerNamed: "a") == nil)
        var acceptedB: Bool?
        let closing = try await held(after: started) { () async throws -> Void in
            let (reportB, bytesB) = Self.evaluation(taskB, correct: 34, upload: "upload-b-1")
            acceptedB = try await service.accept(reportB, bytes: bytesB, worker: try await f.store.worker(named: "b")!)
            await service.tick()
        }
        #expect(closing == .woken && acceptedB == false)
        #expect(try await Self.phase(f.store, id).phase == 2)
        #expect(try await service.task(forWorkerNamed: "a")?.kind == "distribute")

        // Nothing changes: the hold times out. A generation already passed: no hold at all.
        let now = service.workGeneration
        #expect(try await held(after: now) {} == .timedOut)
        #expect(await service.waitForWork(after: idle, seconds: 60) == .notHeld)
        #expect(service.heldHeartbeats == 0)
        // Shutdown answers a held heartbeat, and later ones are not held.
        #expect(try await held(after: now) { service.stopHolding() } == .woken)
        #expect(await service.waitForWork(after: service.workGeneration, seconds: 60) == .notHeld)
    }

    @Test func aRestartedCoordinatorRefoldsAcceptedReports() async throws {
        let f = try Fixture()
        try await f.enroll(["a", "b"])
        let before = try f.service()
        let round = try await f.start(before)
        let taskA = try #require(try await before.task(forWorkerNamed: "a"))
        _ = try #require(try await before.task(forWorkerNamed: "b"))
        let (reportA, bytesA) = Self.evaluation(taskA, correct: 33, upload: "upload-a-1")
        #expect(try await before.accept(reportA, bytes: bytesA, worker: try await f.store.worker(named: "a")!) == false)

        // The coordinator dies (its memory is gone); a new one serves the same directory.
        let after = try f.service()
        #expect(try await after.accept(reportA, bytes: bytesA, worker: try await f.store.worker(named: "a")!) == true,
                "the acknowledged report is known after the restart")
        let (reportB, bytesB) = Self.evaluation(taskA, correct: 34, upload: "upload-b-1")
        #expect(try await after.accept(reportB, bytes: bytesB, worker: try await f.store.worker(named: "b")!) == false)
        f.clock.advance(3.2)
        for name in ["a", "b"] { try await f.touch(name) }
        await after.tick()
        let progress = try RoundService.progress(try await Self.phase(f.store, round.id))
        #expect(progress.phases[1].reports == 2)
        #expect(progress.after?.accuracy == Double(33 + 34) / 80, "both reports, each once")
    }

    /// A compressed model whose fleet accuracy fell beyond --max-accuracy-drop fails the round at the evaluation
    /// phase, with the reason, and no worker is asked to take it.
    @Test func aModelFailingTheQualityGateIsNotDistributed() async throws {
        let f = try Fixture()
        try await f.enroll(["a", "b"])
        let service = try f.service()
        let round = try await f.start(service)
        for (name, correct) in [("a", UInt64(20)), ("b", UInt64(28))] {
            let task = try #require(try await service.task(forWorkerNamed: name))
            let (report, bytes) = Self.evaluation(task, correct: correct, upload: "upload-\(name)-1")
            #expect(try await service.accept(report, bytes: bytes, worker: try await f.store.worker(named: name)!) == false)
        }
        await service.tick()
        let ended = try #require(try await f.store.round(id: round.id))
        #expect(ended.state == "failed")
        #expect(ended.message?.contains("quality gate") == true, "\(ended.message ?? "")")
        #expect(try await service.task(forWorkerNamed: "a") == nil)
    }

    @Test func aPhaseWithoutQuorumFailsTheRoundAtItsDeadline() async throws {
        let f = try Fixture()
        try await f.enroll(["a", "b"])
        let service = try f.service()
        let round = try await f.start(service, minWorkers: 2, deadline: 2)
        let taskA = try #require(try await service.task(forWorkerNamed: "a"))
        let (reportA, bytesA) = Self.evaluation(taskA, correct: 20, upload: "upload-a-1")
        _ = try await service.accept(reportA, bytes: bytesA, worker: try await f.store.worker(named: "a")!)
        f.clock.advance(2.2)
        try await f.touch("a")
        await service.tick()
        let failed = try await Self.phase(f.store, round.id)
        #expect(failed.state == "failed")
        #expect(failed.message?.contains("got 1 of the 2 reports") == true, "\(failed.message ?? "")")
        #expect(await Self.code { _ = try await service.accept(reportA, bytes: bytesA, worker: try await f.store.worker(named: "a")!) } == nil,
                "the accepted upload is still recognised")
    }

    @Test func silentWorkersAreDroppedAndTheirLateReportsRefused() async throws {
        let f = try Fixture()
        try await f.enroll(["a", "b", "c"])
        let service = try f.service()
        let round = try await f.start(service, minWorkers: 2)
        let task = try #require(try await service.task(forWorkerNamed: "a"))
        for name in ["b", "c"] { _ = try await service.task(forWorkerNamed: name) }
        for (name, correct) in [("a", 30), ("b", 31)] {
            let (r, bytes) = Self.evaluation(task, correct: UInt64(correct), upload: "upload-\(name)-1")
            _ = try await service.accept(r, bytes: bytes, worker: try await f.store.worker(named: name)!)
        }
        // c goes silent (no heartbeat for more than three poll intervals): the phase closes without it.
        f.clock.advance(3.6)
        for name in ["a", "b"] { try await f.touch(name) }
        try await f.touch("c", at: f.clock.now.addingTimeInterval(-10))
        await service.tick()
        #expect(try await Self.phase(f.store, round.id).phase == 2)
        let (late, lateBytes) = Self.evaluation(task, correct: 10, upload: "upload-c-1")
        #expect(await Self.code { _ = try await service.accept(late, bytes: lateBytes, worker: try await f.store.worker(named: "c")!) } == "stale_report")
        let refused = try await f.store.assignments(round: round.id, phase: 1).first { $0.worker == "c" }
        #expect(refused?.droppedAt != nil)
    }

    @Test func invalidReportsAreRefusedWithReasonsAndNotStored() async throws {
        let f = try Fixture()
        try await f.enroll(["a", "b"], samples: 30)
        let service = try f.service()
        let round = try await f.start(service)
        let task = try #require(try await service.task(forWorkerNamed: "a"))
        var (report, _) = Self.evaluation(task, correct: 30, upload: "upload-a-1")
        report.evaluation.compressedCorrect = 99  // more correct answers than samples
        #expect(await Self.code { _ = try await service.accept(report, bytes: try report.serializedBytes(), worker: try await f.store.worker(named: "a")!) } == "invalid_report")
        report.evaluation.compressedCorrect = 30
        report.evaluation.samples = 40  // more than the 30 the worker declared
        #expect(await Self.code { _ = try await service.accept(report, bytes: try report.serializedBytes(), worker: try await f.store.worker(named: "a")!) } == "invalid_report")
        report.uploadID = "x"
        #expect(await Self.code { _ = try await service.accept(report, bytes: try report.serializedBytes(), worker: try await f.store.worker(named: "a")!) } == "bad_report")
        #expect(try await f.store.reports(round: round.id, phase: 1).isEmpty)
        let view = try await service.view(try await Self.phase(f.store, round.id))
        #expect(view.phases[1].refused == 2)
        // The refusals are durable: a restarted coordinator still counts them, and counts on from there.
        let restarted = try f.service()
        #expect(try await restarted.view(try await Self.phase(f.store, round.id)).phases[1].refused == 2)
        report.uploadID = "upload-a-2"
        #expect(await Self.code { _ = try await restarted.accept(report, bytes: try report.serializedBytes(), worker: try await f.store.worker(named: "a")!) } == "invalid_report")
        #expect(try await restarted.view(try await Self.phase(f.store, round.id)).phases[1].refused == 3)
    }

    @Test func aQuorumOutOfReachFailsAtOnce() async throws {
        let f = try Fixture()
        try await f.enroll(["a", "b"])
        let service = try f.service()
        let round = try await f.start(service, minWorkers: 2)
        _ = try #require(try await service.task(forWorkerNamed: "a"))
        _ = try await f.store.revoke(name: "b", at: f.clock.now)
        await service.tick()
        let failed = try await Self.phase(f.store, round.id)
        #expect(failed.state == "failed")
        #expect(failed.message?.contains("can reach at most 1 reports") == true, "\(failed.message ?? "")")
    }

    @Test func overSelectionCapsStatisticsPhasesAndCancelEndsTheRound() async throws {
        let f = try Fixture()
        try await f.enroll(["a", "b", "c"])
        let service = try f.service()
        var plan = RoundPlan()
        plan.quantize = .int8
        plan.minWorkers = 1
        plan.workersPerPhase = 2
        plan.modelSHA256 = try await service.storeArtifact(Self.modelBytes)
        let round = try await service.start(plan)
        #expect(plan.phases[round.phase].kind == .ranges, "fold ran at the start")
        let a = try await service.task(forWorkerNamed: "a"), b = try await service.task(forWorkerNamed: "b")
        let c = try await service.task(forWorkerNamed: "c")
        #expect(a?.kind == "ranges" && b?.kind == "ranges" && c == nil, "two tasks for --workers-per-phase 2")
        #expect(a?.tensors.isEmpty == false)
        let cancelled = try await service.cancel(round.id)
        #expect(cancelled.state == "cancelled")
        var report = Whittle_TaskReport()
        report.roundID = round.id
        report.phase = UInt32(round.phase)
        report.uploadID = "upload-a-1"
        report.calibration = Whittle_CalibrationReport()
        #expect(await Self.code { _ = try await service.accept(report, bytes: try report.serializedBytes(), worker: try await f.store.worker(named: "a")!) } == "stale_report")
        #expect(try await service.task(forWorkerNamed: "a") == nil)
        #expect(await Self.code { _ = try await service.cancel(round.id) } == "round_ended")
    }

    @Test func aRoundThatWouldExceedASitesPrivacyBudgetIsRefusedBeforeItStarts() async throws {
        let f = try Fixture()
        try await f.enroll(["a", "b", "c"])
        let service = try f.service(privacyBudget: PrivacyPlan(epsilon: 2.5, delta: 1e-5))
        var plan = RoundPlan()
        plan.quantize = .none
        plan.finetuneRounds = 2
        plan.minWorkers = 3
        plan.clipNorm = 1
        plan.modelSHA256 = try await service.storeArtifact(RoundServiceTests.modelBytes)
        // Training without differential privacy is refused while there is a budget.
        let clear = await Self.code { _ = try await service.start(plan) }
        #expect(clear == "bad_plan")
        plan.secureAggregation = true
        plan.privacy = PrivacyPlan(epsilon: 2)
        let first = try await service.start(plan)
        #expect(try RoundService.progress(first).privacy?.epsilon ?? 9 <= 2)
        // A second round of ε = 2 while the first may still spend its 2 would take every site to 2.94 (Rényi
        // composition is sublinear), past 2.5: refused, naming a site and the figures.
        do {
            _ = try await service.start(plan)
            Issue.record("a round past the budget started")
        } catch let error as RoundError {
            #expect(error.code == .badPlan && error.message.contains("privacy budget") && error.message.contains("would bring it to"), "\(error.message)")
        }
        // One of ε = 0.5 fits.
        plan.privacy = PrivacyPlan(epsilon: 0.5)
        _ = try await service.start(plan)
    }
}
