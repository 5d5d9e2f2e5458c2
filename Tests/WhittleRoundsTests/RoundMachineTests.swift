import Foundation
import Testing
import WhittleRounds

/// A round's lifecycle driven by event sequences and a hand-set time: no store, no sockets, no sleeps. Every
/// failure path of a worker phase: quorum missed at the deadline or out of reach, cancel, workers lost (silent,
/// revoked), duplicate, late and foreign reports, over-selection and workers that cannot do the work.
@Suite struct RoundMachineTests {
    static let t0 = Date(timeIntervalSince1970: 1_800_000_000)
    static let poll = 10

    /// A machine at the first phase of `kind` of a float-or-int8 round, opened at `t0`.
    static func machine(at kind: PhaseKind, minWorkers: Int = 2, deadline: Double = 600,
                        _ configure: (inout RoundPlan) -> Void = { _ in }) throws -> RoundMachine {
        var plan = RoundPlan()
        plan.modelSHA256 = String(repeating: "a", count: 64)
        plan.minWorkers = minWorkers
        plan.phaseDeadlineSeconds = deadline
        configure(&plan)
        let phase = try #require(plan.phases.firstIndex { $0.kind == kind })
        return RoundMachine(id: "r1", plan: plan, state: .running, phase: phase, phaseStartedAt: t0, assignments: [],
                            reported: [], pollSeconds: poll)
    }

    static func worker(_ name: String, seen: Date? = t0, samples: Int = 50, labels: Bool = true, revoked: Bool = false) -> WorkerStatus {
        WorkerStatus(name: name, lastContact: seen, revoked: revoked, certificateExpiresAt: t0.addingTimeInterval(86400),
                     samples: samples, labels: labels)
    }

    static func at(_ seconds: Double) -> Date { t0.addingTimeInterval(seconds) }

    /// Takes the task for each worker and reports for each of `reporting`.
    static func assignAndReport(_ m: inout RoundMachine, _ workers: [String], reporting: [String], at time: Date = t0) {
        for name in workers { _ = m.taskRequested(by: worker(name), now: time) }
        for name in reporting {
            #expect(try! m.reportArrived(phase: m.phase, worker: name, uploadID: "upload-\(name)-1", bytes: 10, bodyLimit: 100,
                                         accepted: nil) == .admit)
            m.reportAccepted(from: name)
        }
    }

    @Test func aPhaseClosesWhenEveryAssignedWorkerReportedAfterTheSelectionWindow() throws {
        var m = try Self.machine(at: .evaluate)
        let first = m.taskRequested(by: Self.worker("a"), now: Self.t0)
        #expect(first.handOut && first.actions == [.assign(worker: "a", at: Self.t0)])
        #expect(m.taskRequested(by: Self.worker("a"), now: Self.at(1)) == (true, []), "the assignment is handed out again, not twice")
        Self.assignAndReport(&m, ["b"], reporting: ["a", "b"])
        let everyone = [Self.worker("a"), Self.worker("b"), Self.worker("c")]
        // c is online and could still take the task: the window stays open for two heartbeats.
        #expect(m.tick(now: Self.at(5), workers: everyone).isEmpty)
        #expect(m.tick(now: Self.at(21), workers: everyone.map { var w = $0; w.lastContact = Self.at(20); return w }) == [.closePhase])
        // Nobody else could take it: the phase closes at once.
        var n = try Self.machine(at: .evaluate)
        Self.assignAndReport(&n, ["a", "b"], reporting: ["a", "b"])
        #expect(n.tick(now: Self.at(1), workers: Array(everyone.prefix(2))) == [.closePhase])
    }

    @Test func theDeadlineClosesWithAQuorumAndDropsTheLateOnes() throws {
        var m = try Self.machine(at: .evaluate, minWorkers: 2, deadline: 100)
        Self.assignAndReport(&m, ["a", "b", "c"], reporting: ["a", "b"])
        let workers = ["a", "b", "c"].map { Self.worker($0, seen: Self.at(95)) }
        #expect(m.tick(now: Self.at(99), workers: workers).isEmpty, "c is still working")
        #expect(m.tick(now: Self.at(100), workers: workers) == [.drop(worker: "c", at: Self.at(100)), .closePhase])
        // c's report after the close is refused as stale.
        #expect(throws: RoundError(.staleReport, "worker 'c' was dropped from phase \(m.openPhase.label) (it missed the deadline or went silent); this report was not counted")) {
            try m.reportArrived(phase: m.phase, worker: "c", uploadID: "upload-c-1", bytes: 10, bodyLimit: 100, accepted: nil)
        }
    }

    @Test func theDeadlineWithoutAQuorumFailsTheRound() throws {
        var m = try Self.machine(at: .evaluate, minWorkers: 2, deadline: 100)
        Self.assignAndReport(&m, ["a"], reporting: ["a"])
        let workers = [Self.worker("a", seen: Self.at(99)), Self.worker("b", seen: Self.at(99))]
        #expect(m.tick(now: Self.at(50), workers: workers).isEmpty)
        let actions = m.tick(now: Self.at(100), workers: workers)
        guard case .end(.failed, let message)? = actions.last else { Issue.record("\(actions)"); return }
        #expect(message.contains("got 1 of the 2 reports"))
        #expect(m.state == .failed)
        #expect(m.taskRequested(by: Self.worker("b"), now: Self.at(101)) == (false, []))
        #expect { try m.cancel() } throws: { ($0 as? RoundError)?.code == .roundEnded }
    }

    @Test func aQuorumOutOfReachFailsAtOnce() throws {
        var m = try Self.machine(at: .evaluate, minWorkers: 2)
        Self.assignAndReport(&m, ["a"], reporting: [])
        let actions = m.tick(now: Self.at(1), workers: [Self.worker("a"), Self.worker("b", revoked: true)])
        guard case .end(.failed, let message)? = actions.last else { Issue.record("\(actions)"); return }
        #expect(message.contains("can reach at most 1 reports"))
    }

    @Test func silentAndRevokedWorkersAreLost() throws {
        var m = try Self.machine(at: .evaluate, minWorkers: 1)
        Self.assignAndReport(&m, ["a", "b", "c"], reporting: ["a"])
        // b's last heartbeat was 31 s ago (three polls are 30 s); c is revoked.
        let workers = [Self.worker("a", seen: Self.at(30)), Self.worker("b", seen: Self.at(0)), Self.worker("c", seen: Self.at(30), revoked: true)]
        let actions = m.tick(now: Self.at(31), workers: workers)
        #expect(actions == [.drop(worker: "b", at: Self.at(31)), .drop(worker: "c", at: Self.at(31)), .closePhase])
        #expect(!m.mayUpload("b") && m.mayUpload("a"))
        // Silence counts from the phase's opening too: a worker assigned just now is not lost for an old heartbeat.
        var n = try Self.machine(at: .evaluate, minWorkers: 1)
        _ = n.taskRequested(by: Self.worker("d", seen: Self.at(-100)), now: Self.at(5))
        #expect(n.tick(now: Self.at(20), workers: [Self.worker("d", seen: Self.at(-100))]).isEmpty)
        #expect(n.workerLost("d", now: Self.at(21)) == [.drop(worker: "d", at: Self.at(21))])
        #expect(n.workerLost("d", now: Self.at(22)).isEmpty, "lost once")
        // …and from the coordinator's restart: a worker backing off while the coordinator was down is not lost for it.
        var r = try Self.machine(at: .evaluate, minWorkers: 1)
        _ = r.taskRequested(by: Self.worker("e"), now: Self.t0)
        r.awakeSince = Self.at(40)
        #expect(r.tick(now: Self.at(45), workers: [Self.worker("e", seen: Self.at(1))]).isEmpty)
        #expect(r.tick(now: Self.at(71), workers: [Self.worker("e", seen: Self.at(1))]).first == .drop(worker: "e", at: Self.at(71)))
    }

    @Test func duplicateLateAndForeignReportsAreTold() throws {
        var m = try Self.machine(at: .evaluate)
        Self.assignAndReport(&m, ["a"], reporting: ["a"])
        let report = { (phase: Int, worker: String, upload: String, accepted: String?) throws -> RoundMachine.Admission in
            try m.reportArrived(phase: phase, worker: worker, uploadID: upload, bytes: 10, bodyLimit: 100, accepted: accepted)
        }
        #expect(try report(m.phase, "a", "upload-a-1", "upload-a-1") == .duplicate)
        #expect(Self.code { try report(m.phase, "a", "upload-a-2", "upload-a-1") } == .alreadyReported)
        #expect(Self.code { try report(m.phase, "z", "upload-z-1", nil) } == .staleReport, "never given the task")
        #expect(Self.code { try report(m.phase - 1, "a", "upload-a-3", nil) } == .staleReport, "a closed phase")
        _ = m.taskRequested(by: Self.worker("b"), now: Self.t0)
        #expect(Self.code { try report(m.phase, "b", "short", nil) } == .badReport)
        #expect(Self.code { try m.reportArrived(phase: m.phase, worker: "b", uploadID: "upload-b-1", bytes: 101, bodyLimit: 100, accepted: nil) } == .tooLarge)
        #expect(try report(m.phase, "b", "upload-b-1", nil) == .admit)
        #expect(try m.cancel() == [.end(.cancelled, message: "cancelled by the operator")])
        #expect(Self.code { try report(m.phase, "b", "upload-b-1", nil) } == .staleReport, "the round ended")
        #expect(try report(m.phase, "a", "upload-a-1", "upload-a-1") == .duplicate, "a retry is still recognised")
        #expect(Self.code { _ = try m.cancel() } == .roundEnded)
    }

    @Test func statisticsPhasesAreCappedAndTrainingNeedsLabels() throws {
        var m = try Self.machine(at: .ranges, minWorkers: 1) { $0.workersPerPhase = 2 }
        #expect(m.taskRequested(by: Self.worker("a"), now: Self.t0).handOut)
        #expect(m.taskRequested(by: Self.worker("b"), now: Self.t0).handOut)
        #expect(!m.taskRequested(by: Self.worker("c"), now: Self.t0).handOut, "two tasks for --workers-per-phase 2")
        #expect(!m.taskRequested(by: Self.worker("d", samples: 0), now: Self.t0).handOut)
        // The cap reached, the window is over at once.
        Self.assignAndReport(&m, [], reporting: ["a", "b"])
        #expect(m.tick(now: Self.at(1), workers: ["a", "b", "c"].map { Self.worker($0) }) == [.closePhase])

        var training = try Self.machine(at: .finetune, minWorkers: 1) { $0.quantize = .none; $0.finetuneRounds = 1 }
        #expect(!training.taskRequested(by: Self.worker("a", labels: false), now: Self.t0).handOut)
        #expect(training.taskRequested(by: Self.worker("b"), now: Self.t0).handOut)
        var distilling = try Self.machine(at: .finetune, minWorkers: 1) { $0.quantize = .none; $0.finetuneRounds = 1; $0.distill = true }
        #expect(distilling.taskRequested(by: Self.worker("a", labels: false), now: Self.t0).handOut)
        // No new task after the deadline.
        var late = try Self.machine(at: .evaluate, deadline: 100)
        #expect(!late.taskRequested(by: Self.worker("a"), now: Self.at(100)).handOut)
    }

    @Test func coordinatorPhasesTakeNoWorkerEvents() throws {
        var m = try Self.machine(at: .export)
        #expect(m.taskRequested(by: Self.worker("a"), now: Self.t0) == (false, []))
        #expect(m.tick(now: Self.at(10_000), workers: [Self.worker("a")]).isEmpty)
        #expect(!m.mayUpload("a"))
    }

    static func code(_ body: () throws -> Any) -> RoundError.Code? {
        do {
            _ = try body()
            return nil
        } catch {
            return (error as? RoundError)?.code
        }
    }

    @Test func aWorkerWithoutTheRoundsSecretsSitsOutItsSecurePhases() throws {
        var m = try Self.machine(at: .secureShares, minWorkers: 3) {
            $0.secureAggregation = true
            $0.finetuneRounds = 1
            $0.quantize = .none
            $0.clipNorm = 1
        }
        func board(_ name: String, holds: Bool, seen: Double = 0) -> WorkerStatus {
            var w = Self.worker(name, seen: Self.at(seen))
            w.secureRounds = holds ? ["r1"] : []
            return w
        }
        // a never made keys for r1 (or restarted since): its heartbeat asking for the task says so, and it is not
        // given the task.
        #expect(m.taskRequested(by: board("a", holds: false, seen: 1), now: Self.at(1)).handOut == false)
        #expect(m.taskRequested(by: board("b", holds: true, seen: 1), now: Self.at(1)).handOut)
        // b restarts and says so in its next heartbeat: it is given up at once, not at the deadline.
        let actions = m.tick(now: Self.at(2), workers: [board("a", holds: false, seen: 2), board("b", holds: false, seen: 2)])
        #expect(actions.contains(.drop(worker: "b", at: Self.at(2))), "\(actions)")
        // A phase for named workers waits past the selection window for each one still online, not just the quorum.
        var shares = try Self.machine(at: .secureShares, minWorkers: 2) {
            $0.secureAggregation = true
            $0.finetuneRounds = 1
            $0.quantize = .none
            $0.clipNorm = 1
        }
        shares.eligible = ["a", "b", "c"]
        for name in ["a", "b"] {
            _ = shares.taskRequested(by: board(name, holds: true), now: Self.t0)
            #expect(try shares.reportArrived(phase: shares.phase, worker: name, uploadID: "upload-\(name)-1", bytes: 10, bodyLimit: 100, accepted: nil) == .admit)
            shares.reportAccepted(from: name)
        }
        let online = [board("a", holds: true, seen: 60), board("b", holds: true, seen: 60), board("c", holds: true, seen: 60)]
        #expect(shares.tick(now: Self.at(60), workers: online).isEmpty, "c is online and has not shared")
        // ... even when c's last heartbeat, from before the phase opened, predates its keys.
        #expect(shares.tick(now: Self.at(5), workers: [online[0], online[1], board("c", holds: false, seen: -1)]).isEmpty)
        // Once c is gone (silent), the quorum closes the phase.
        #expect(shares.tick(now: Self.at(100), workers: [online[0], online[1], board("c", holds: true, seen: 0)]) == [.closePhase])
        // Other phases ignore what a worker holds.
        var evaluate = try Self.machine(at: .evaluate)
        #expect(evaluate.taskRequested(by: board("a", holds: false), now: Self.t0).handOut)
    }
}
