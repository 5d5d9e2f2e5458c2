import Foundation
import Testing
import WhittleAgent
import WhittleHTTPClient
import WhittleProtocol

/// The worker agent's heartbeat loop driven by outcomes and a hand-set time, over a scripted coordinator: no
/// sockets, no sleeps. Backoff and Retry-After, refusal, long polling, tasks (and tasks already done), certificate
/// renewal (asked, due, CA rotation, failed), an expired certificate, a bounded number of heartbeats.
@Suite struct AgentMachineTests {
    static let t0 = Date(timeIntervalSince1970: 1_800_000_000)
    static let skew = 300.0
    /// Valid 30 days (plus the backdated start), trusted under "ca-1".
    static let certificate = AgentMachine.Certificate(notValidBefore: t0.addingTimeInterval(-skew), notValidAfter: t0.addingTimeInterval(30 * 86400),
                                                      trust: "ca-1")
    /// Deterministic backoff: the policy's upper bounds (random 1).
    static let backoff = RetryPolicy(attempts: Int.max, baseDelay: 1, maximumDelay: 60)

    static func machine(heartbeats: Int? = nil) -> AgentMachine {
        AgentMachine(certificate: certificate, heartbeats: heartbeats, backoff: backoff, clientTimeout: 30, clockSkewAllowance: skew)
    }

    static func answer(poll: UInt32 = 10, task: Whittle_Task? = nil, renew: Bool = false, trust: String = "ca-1") -> HeartbeatOutcome {
        var a = Whittle_HeartbeatResponse()
        a.pollSeconds = poll
        if let task { a.task = task }
        a.renewCertificate = renew
        a.trustFingerprint = trust
        return .answered(a)
    }

    static func task(_ phase: UInt32) -> Whittle_Task {
        var t = Whittle_Task()
        t.roundID = "r1"
        t.phase = phase
        t.kind = "evaluate"
        return t
    }

    static func at(_ seconds: Double) -> Date { t0.addingTimeInterval(seconds) }

    /// The scripted coordinator: answers in order, records what it was sent.
    final class Scripted: CoordinatorClient {
        var outcomes: [HeartbeatOutcome]
        var sent: [Whittle_Heartbeat] = []
        init(_ outcomes: [HeartbeatOutcome]) { self.outcomes = outcomes }
        func heartbeat(_ beat: Whittle_Heartbeat) -> HeartbeatOutcome {
            sent.append(beat)
            return outcomes.removeFirst()
        }
    }

    @Test func idleHeartbeatsAreHeldAndTheWaitCountsTheHold() {
        var m = Self.machine()
        let coordinator = Scripted([Self.answer(poll: 10), Self.answer(poll: 60)])
        #expect(m.idleHeartbeat(Whittle_Heartbeat()).waitSeconds == 0, "no hold before the first answer")
        // Answered after a 4 s hold: the next heartbeat goes 6 s later, and asks to be held 10 s.
        #expect(m.heartbeatReturned(coordinator.heartbeat(m.idleHeartbeat(Whittle_Heartbeat())), askedAt: Self.t0, now: Self.at(4)) == [.sleep(6)])
        #expect(m.idleHeartbeat(Whittle_Heartbeat()).waitSeconds == 10)
        // A 60 s interval: the hold stays within two thirds of the client's 30 s timeout.
        #expect(m.heartbeatReturned(coordinator.heartbeat(m.idleHeartbeat(Whittle_Heartbeat())), askedAt: Self.at(10), now: Self.at(10)) == [.sleep(60)])
        #expect(coordinator.sent.map(\.waitSeconds) == [0, 10])
        #expect(m.idleHeartbeat(Whittle_Heartbeat()).waitSeconds == 20)
        // A hold longer than the interval: the next heartbeat goes at once (50 ms).
        #expect(m.heartbeatReturned(Self.answer(poll: 10), askedAt: Self.at(100), now: Self.at(130)) == [.sleep(0.05)])
    }

    @Test func failuresBackOffAndAnAnswerResetsThem() {
        var m = Self.machine()
        // The upper bounds of the policy grow 1, 2, 4 … up to 60; the draws stay within them.
        for attempt in 1...8 {
            guard case .sleep(let wait)? = m.heartbeatReturned(.unreachable("refused"), askedAt: Self.t0, now: Self.t0).first else {
                Issue.record("no sleep")
                return
            }
            #expect(wait >= 0 && wait <= min(60, pow(2, Double(attempt - 1))))
            #expect(m.failures == attempt && m.lastError == "refused")
        }
        // The coordinator's Retry-After is honoured (capped at the maximum).
        #expect(m.heartbeatReturned(.failed("overloaded", retryAfter: 7), askedAt: Self.t0, now: Self.t0) == [.sleep(7)])
        #expect(m.heartbeatReturned(.failed("overloaded", retryAfter: 600), askedAt: Self.t0, now: Self.t0) == [.sleep(60)])
        _ = m.heartbeatReturned(Self.answer(), askedAt: Self.t0, now: Self.t0)
        #expect(m.failures == 0 && m.lastError == nil)
    }

    @Test func aRefusalOrAnExpiredCertificateStopsTheAgent() {
        var m = Self.machine()
        #expect(m.heartbeatReturned(.refused("worker 'a' is revoked"), askedAt: Self.t0, now: Self.t0) == [.stop(.refused("worker 'a' is revoked"))])
        var n = Self.machine()
        let expired = Self.certificate.notValidAfter
        #expect(n.heartbeatReturned(.unreachable("handshake failed"), askedAt: expired, now: expired) == [.stop(.certificateExpired(expired))])
    }

    @Test func tasksRunAndTheNextHeartbeatGoesAtOnce() {
        var m = Self.machine()
        #expect(m.heartbeatReturned(Self.answer(task: Self.task(3)), askedAt: Self.t0, now: Self.t0) == [.run(Self.task(3))])
        #expect(m.taskFinished() == [.sleep(0)])
        // A task this worker already computed (its report not counted yet) is not run again.
        #expect(m.heartbeatReturned(Self.answer(task: Self.task(3)), askedAt: Self.t0, now: Self.t0) { $0.phase == 3 } == [.sleep(10)])
    }

    @Test func certificatesAreRenewedWhenAskedDueOrTheCAsChange() {
        var m = Self.machine()
        // Asked by the coordinator; the task of the same answer runs after the renewal.
        #expect(m.heartbeatReturned(Self.answer(task: Self.task(1), renew: true), askedAt: Self.t0, now: Self.t0) == [.renewCertificate])
        let fresh = AgentMachine.Certificate(notValidBefore: Self.at(-Self.skew), notValidAfter: Self.at(30 * 86400), trust: "ca-1")
        #expect(m.renewed(fresh, now: Self.t0) == [.run(Self.task(1))])
        // Due: a third of the lifetime left.
        #expect(!m.renewalDue(now: Self.at(19 * 86400)) && m.renewalDue(now: Self.at(21 * 86400)))
        #expect(m.heartbeatReturned(Self.answer(), askedAt: Self.at(21 * 86400), now: Self.at(21 * 86400)) == [.renewCertificate])
        // Failed: the current certificate stays, and renewal waits (here a twentieth of the 9 days left, 10.8 h → 1 h).
        #expect(m.renewalFailed("coordinator busy", now: Self.at(21 * 86400)) == [.sleep(10)])
        #expect(m.nextRenewal == Self.at(21 * 86400 + 3600))
        #expect(m.heartbeatReturned(Self.answer(), askedAt: Self.at(21 * 86400 + 10), now: Self.at(21 * 86400 + 10)) == [.sleep(10)])
        // A CA rotation announced: renew, and when the renewal does not bring the new set, try again after a minute.
        var r = Self.machine()
        #expect(r.heartbeatReturned(Self.answer(trust: "ca-2"), askedAt: Self.t0, now: Self.t0) == [.renewCertificate])
        #expect(r.renewed(Self.certificate, now: Self.t0) == [.sleep(10)])
        #expect(r.nextRenewal == Self.at(60))
        #expect(r.heartbeatReturned(Self.answer(trust: "ca-2"), askedAt: Self.at(30), now: Self.at(30)) == [.sleep(10)])
        #expect(r.heartbeatReturned(Self.answer(trust: "ca-2"), askedAt: Self.at(60), now: Self.at(60)) == [.renewCertificate])
    }

    @Test func aBoundedAgentStopsAfterItsHeartbeats() {
        var m = Self.machine(heartbeats: 2)
        #expect(m.heartbeatReturned(.unreachable("down"), askedAt: Self.t0, now: Self.t0).count == 1, "failures do not count")
        #expect(m.heartbeatReturned(Self.answer(), askedAt: Self.t0, now: Self.t0) == [.sleep(10)])
        #expect(m.heartbeatReturned(Self.answer(task: Self.task(2)), askedAt: Self.t0, now: Self.t0) == [.run(Self.task(2))])
        #expect(m.taskFinished() == [.stop(.heartbeatsDone)])
    }
}
