import Foundation
import WhittleHTTPClient
import WhittleProtocol

/// What one heartbeat came back with.
public enum HeartbeatOutcome: Sendable, Equatable {
    /// The coordinator answered (200).
    case answered(Whittle_HeartbeatResponse)
    /// The coordinator refuses this worker (401, 403): revoked, unknown, or a certificate it no longer accepts.
    case refused(String)
    /// Any other status: retried after a backoff (or the coordinator's Retry-After).
    case failed(String, retryAfter: Double?)
    /// No answer at all (connection, TLS, timeout).
    case unreachable(String)
}

/// The coordinator as the agent's heartbeat loop sees it: libcurl in production (`CurlCoordinator`), a scripted
/// one in tests.
public protocol CoordinatorClient: AnyObject {
    func heartbeat(_ beat: Whittle_Heartbeat) -> HeartbeatOutcome
}

/// The libcurl coordinator: `POST /v1/worker/heartbeat` over the worker's mutual-TLS client.
public final class CurlCoordinator: CoordinatorClient {
    let client: HTTPClient

    public init(client: HTTPClient) { self.client = client }

    public func heartbeat(_ beat: Whittle_Heartbeat) -> HeartbeatOutcome {
        do {
            let response = try client.request("POST", "/v1/worker/heartbeat", body: try beat.serializedBytes(),
                                              contentType: "application/x-protobuf")
            if response.status == 200, let answer = try? Whittle_HeartbeatResponse(serializedBytes: response.body) {
                return .answered(answer)
            }
            if response.status == 401 || response.status == 403 { return .refused(errorMessage(response)) }
            return .failed(errorMessage(response), retryAfter: response.retryAfter)
        } catch let error as HTTPClientError {
            return .unreachable(error.description)
        } catch {
            return .unreachable("\(error)")
        }
    }
}

/// The worker agent's heartbeat loop as a value: it takes what happened (a heartbeat's outcome, a renewal's, a task
/// finished) with the time, and says what to do next (renew the certificate, run a task, sleep, stop). No I/O and
/// no clock; `RunCommand` performs the actions with libcurl, the task runner and `Thread.sleep`.
public struct AgentMachine: Sendable {
    /// What the loop does next.
    public enum Action: Sendable, Equatable {
        /// Renew the certificate now, then report `.renewed` or `.renewalFailed`.
        case renewCertificate
        /// Compute and upload the task, then report `.taskFinished`.
        case run(Whittle_Task)
        /// Sleep this many seconds, then send the next heartbeat.
        case sleep(Double)
        /// Stop the agent: the coordinator refuses it, its certificate expired, or its heartbeats are done.
        case stop(StopReason)
    }

    public enum StopReason: Sendable, Equatable {
        case refused(String)
        case certificateExpired(Date)
        case heartbeatsDone
    }

    /// The certificate the worker presents: its validity and the trust set (CA fingerprint) it was issued under.
    public struct Certificate: Sendable, Equatable {
        public var notValidBefore: Date
        public var notValidAfter: Date
        public var trust: String

        public init(notValidBefore: Date, notValidAfter: Date, trust: String) {
            self.notValidBefore = notValidBefore
            self.notValidAfter = notValidAfter
            self.trust = trust
        }
    }

    public var certificate: Certificate
    /// Stop after this many answered heartbeats (nil: run until stopped).
    public let heartbeats: Int?
    public let backoff: RetryPolicy
    /// The HTTP client's timeout: an idle heartbeat asks to be held for at most two thirds of it.
    public let clientTimeout: Double
    /// How early a certificate counts as due for renewal, besides its start being backdated (`PKI.clockSkewAllowance`).
    public let clockSkewAllowance: Double
    public private(set) var failures = 0
    public private(set) var answered = 0
    /// Seconds an idle heartbeat asks the coordinator to hold it (0 before the first answer).
    public private(set) var longPoll: UInt32 = 0
    /// The heartbeat interval the coordinator last answered (a worker busy with a task heartbeats at it too).
    public private(set) var pollSeconds: Double = 1
    /// No renewal is tried before this (after a failed one, or one that did not bring the announced trust set).
    public private(set) var nextRenewal = Date.distantPast
    public private(set) var lastError: String?
    /// The wait that follows the task or renewal in progress.
    private var pendingWait: Double = 0
    /// The answer whose renewal is in progress (its task runs after it).
    private var pendingTask: Whittle_Task?
    private var announcedTrust = ""

    public init(certificate: Certificate, heartbeats: Int? = nil, backoff: RetryPolicy = RetryPolicy(attempts: Int.max, baseDelay: 1, maximumDelay: 60),
                clientTimeout: Double = 30, clockSkewAllowance: Double) {
        self.certificate = certificate
        self.heartbeats = heartbeats
        self.backoff = backoff
        self.clientTimeout = clientTimeout
        self.clockSkewAllowance = clockSkewAllowance
    }

    /// The next heartbeat: `base` (capabilities), idle, asking to be held.
    public func idleHeartbeat(_ base: Whittle_Heartbeat) -> Whittle_Heartbeat {
        var beat = base
        beat.waitSeconds = longPoll
        return beat
    }

    /// A third of the certificate's lifetime or less is left (the lifetime it was issued for: the coordinator
    /// backdates the start by `PKI.clockSkewAllowance`).
    public func renewalDue(now: Date) -> Bool {
        let lifetime = certificate.notValidAfter.timeIntervalSince(certificate.notValidBefore) - clockSkewAllowance
        return certificate.notValidAfter.timeIntervalSince(now) < lifetime / 3
    }

    /// A heartbeat sent at `askedAt` came back at `now`; `finished` says whether a task was already computed (a
    /// coordinator that has not yet counted the report hands it out again).
    public mutating func heartbeatReturned(_ outcome: HeartbeatOutcome, askedAt: Date, now: Date,
                                           finished: (Whittle_Task) -> Bool = { _ in false }) -> [Action] {
        switch outcome {
        case .answered(let answer):
            failures = 0
            answered += 1
            lastError = nil
            let poll = max(answer.pollSeconds, 1)
            pollSeconds = Double(poll)
            longPoll = min(poll, UInt32(clientTimeout * 2 / 3))
            // A held heartbeat has already spent (part of) the interval.
            pendingWait = max(0.05, Double(poll) - now.timeIntervalSince(askedAt))
            pendingTask = answer.hasTask && !finished(answer.task) ? answer.task : nil
            announcedTrust = answer.trustFingerprint
            // The coordinator asked, a third of the lifetime is left, or it trusts other CAs than this board does
            // (a CA rotation): the renewal brings a new certificate and the CAs.
            let trustChanged = !announcedTrust.isEmpty && announcedTrust != certificate.trust
            if (answer.renewCertificate || trustChanged || renewalDue(now: now)) && now >= nextRenewal {
                return [.renewCertificate]
            }
            return afterAnswer()
        case .refused(let message):
            lastError = message
            return [.stop(.refused(message))]
        case .failed(let message, let retryAfter):
            failures += 1
            lastError = message
            return [.sleep(backoff.delay(attempt: failures, retryAfter: retryAfter))]
        case .unreachable(let message):
            guard certificate.notValidAfter > now else { return [.stop(.certificateExpired(certificate.notValidAfter))] }
            failures += 1
            lastError = message
            return [.sleep(backoff.delay(attempt: failures, retryAfter: nil))]
        }
    }

    /// The renewal succeeded: the new certificate is in place.
    public mutating func renewed(_ new: Certificate, now: Date) -> [Action] {
        certificate = new
        // The renewal did not bring the trust set the coordinator announced (a coordinator mid-restart): later.
        if !announcedTrust.isEmpty && announcedTrust != new.trust { nextRenewal = now.addingTimeInterval(60) }
        return afterAnswer()
    }

    /// The renewal failed: the current certificate stays in use, and renewal is retried a little later, not at
    /// every heartbeat (a coordinator that cannot renew yet).
    public mutating func renewalFailed(_ message: String, now: Date) -> [Action] {
        nextRenewal = now.addingTimeInterval(min(3600, max(60, certificate.notValidAfter.timeIntervalSince(now) / 20)))
        lastError = message
        return afterAnswer()
    }

    /// The task ran (its report uploaded or kept for later): the next heartbeat goes at once.
    public mutating func taskFinished() -> [Action] {
        pendingWait = 0
        return next()
    }

    private mutating func afterAnswer() -> [Action] {
        if let task = pendingTask {
            pendingTask = nil
            return [.run(task)]
        }
        return next()
    }

    private func next() -> [Action] {
        if let heartbeats, answered >= heartbeats { return [.stop(.heartbeatsDone)] }
        return [.sleep(pendingWait)]
    }
}
