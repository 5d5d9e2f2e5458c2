import Foundation

/// An enrolled worker as the coordinator records it.
public struct WorkerRecord: Codable, Sendable, Equatable {
    public var name: String
    /// The serial of the certificate the coordinator issued (hex), by which requests are attributed.
    public var certificateSerial: String
    public var certificateExpiresAt: Date
    public var enrolledAt: Date
    public var lastContactAt: Date?
    public var lastAddress: String?
    public var revokedAt: Date?
    /// The capabilities the worker last reported, as JSON.
    public var capabilities: String?
    /// During a certificate renewal: the serial of the certificate the worker renewed with, still accepted until
    /// the worker first presents the new one (so a renewal whose answer is lost locks nobody out).
    public var previousSerial: String?
    /// When an admin asked for the worker's certificate to be renewed (`workers renew`); cleared by the renewal.
    public var renewRequestedAt: Date?
    /// The SHA-256 fingerprint of the CA that issued the current certificate; nil for a certificate issued before
    /// the coordinator recorded it, which is always the data directory's first CA.
    public var certificateIssuer: String?

    public init(name: String, certificateSerial: String, certificateExpiresAt: Date, enrolledAt: Date,
                certificateIssuer: String? = nil) {
        self.name = name
        self.certificateSerial = certificateSerial
        self.certificateExpiresAt = certificateExpiresAt
        self.enrolledAt = enrolledAt
        self.certificateIssuer = certificateIssuer
    }

    /// revoked, expired, online (contact within `onlineWindow`), offline, or enrolled (never seen since).
    public func state(now: Date, onlineWindow: TimeInterval = 120) -> String {
        if revokedAt != nil { return "revoked" }
        if certificateExpiresAt < now { return "expired" }
        guard let lastContactAt else { return "enrolled" }
        return now.timeIntervalSince(lastContactAt) <= onlineWindow ? "online" : "offline"
    }
}

/// An enrollment token, stored by the SHA-256 of its secret only.
public struct TokenRecord: Codable, Sendable, Equatable {
    public var hash: String
    public var createdAt: Date
    public var expiresAt: Date
    public var usesAllowed: Int
    public var usesRemaining: Int
    /// When an admin cancelled the token (`token revoke`); a revoked token enrolls nobody.
    public var revokedAt: Date?

    /// active, revoked, expired or exhausted.
    public func state(now: Date) -> String {
        if revokedAt != nil { return "revoked" }
        if expiresAt <= now { return "expired" }
        return usesRemaining > 0 ? "active" : "exhausted"
    }

    public init(hash: String, createdAt: Date, expiresAt: Date, uses: Int) {
        self.hash = hash
        self.createdAt = createdAt
        self.expiresAt = expiresAt
        self.usesAllowed = uses
        self.usesRemaining = uses
    }
}

/// A federated round: its plan and progress as JSON (the store does not interpret them), its state and phase.
public struct RoundRecord: Codable, Sendable, Equatable {
    public var id: String
    public var createdAt: Date
    /// running, succeeded, failed, cancelled.
    public var state: String
    public var phase: Int
    public var phaseStartedAt: Date
    public var plan: String
    public var progress: String
    /// Why the round failed or was cancelled.
    public var message: String?
    public var endedAt: Date?
    /// How many times the row was written: `updateRound` writes only over the revision it was read at (and moves
    /// it on), and every accepted report moves it too, so two coordinator replicas can never both close a phase,
    /// nor close it without a report another replica acknowledged meanwhile.
    public var revision = 0

    public init(id: String, createdAt: Date, plan: String, progress: String) {
        self.id = id
        self.createdAt = createdAt
        state = "running"
        phase = 0
        phaseStartedAt = createdAt
        self.plan = plan
        self.progress = progress
    }

    public var ended: Bool { state != "running" }
}

/// A worker given a phase's task. A dropped assignment (the worker vanished, or the phase closed without it)
/// makes its later report stale.
public struct AssignmentRecord: Codable, Sendable, Equatable {
    public var round: String
    public var phase: Int
    public var worker: String
    public var assignedAt: Date
    public var droppedAt: Date?

    public init(round: String, phase: Int, worker: String, assignedAt: Date) {
        self.round = round
        self.phase = phase
        self.worker = worker
        self.assignedAt = assignedAt
    }
}

/// An accepted report: its blob is on disk (fsynced) before the row is committed, and the row is committed
/// before the worker is answered.
public struct ReportRecord: Codable, Sendable, Equatable {
    public var round: String
    public var phase: Int
    public var worker: String
    public var uploadID: String
    /// The blob's path, relative to the data directory.
    public var blob: String
    public var bytes: Int
    public var bytesDown: Int
    public var samples: Int
    public var acceptedAt: Date

    public init(round: String, phase: Int, worker: String, uploadID: String, blob: String, bytes: Int, bytesDown: Int,
                samples: Int, acceptedAt: Date) {
        self.round = round
        self.phase = phase
        self.worker = worker
        self.uploadID = uploadID
        self.blob = blob
        self.bytes = bytes
        self.bytesDown = bytesDown
        self.samples = samples
        self.acceptedAt = acceptedAt
    }
}

/// A lease: which coordinator replica holds `name` (the rounds' transitions) until when.
public struct LeaseRecord: Codable, Sendable, Equatable {
    public var name: String
    public var holder: String
    public var expiresAt: Date

    public init(name: String, holder: String, expiresAt: Date) {
        self.name = name
        self.holder = holder
        self.expiresAt = expiresAt
    }
}

public enum EnrollmentOutcome: Sendable, Equatable {
    case enrolled(WorkerRecord)
    case unknownToken
    case expiredToken
    case exhaustedToken
    case revokedToken
    case nameTaken
}

/// The coordinator's durable state. Every mutating call is durable when it returns (the SQLite implementation
/// commits with synchronous=FULL before returning), so an acknowledgement sent after it cannot be lost.
public protocol CoordinatorStore: AnyObject, Sendable {
    func addToken(_ token: TokenRecord) async throws
    func token(hash: String) async throws -> TokenRecord?
    /// Atomically: checks the token (known, not expired, uses left), checks the name is free, takes one use and
    /// records the worker.
    func enroll(tokenHash: String, worker: WorkerRecord, now: Date) async throws -> EnrollmentOutcome
    func worker(named name: String) async throws -> WorkerRecord?
    func worker(serial: String) async throws -> WorkerRecord?
    func workers() async throws -> [WorkerRecord]
    /// Marks a worker revoked; false when there is no such worker.
    func revoke(name: String, at: Date) async throws -> Bool
    /// Records a heartbeat; returns the worker as it stands after it (nil when there is no such worker).
    @discardableResult
    func recordContact(name: String, at: Date, address: String?, capabilities: String?) async throws -> WorkerRecord?
    /// A cheap query proving the store answers (readiness).
    func ping() async throws

    /// Every token, newest first.
    func tokens() async throws -> [TokenRecord]
    /// Marks a token revoked; false when there is no such token.
    func revokeToken(hash: String, at: Date) async throws -> Bool
    /// Records a renewed certificate: `newSerial` becomes the worker's, and `presentedSerial` (the certificate the
    /// renewal came with) stays accepted until the new one is used; any earlier pending serial is forgotten, and a
    /// renewal request is cleared; `issuer` is the fingerprint of the CA that signed it. Nil when there is no such
    /// worker.
    func renewCertificate(name: String, presentedSerial: String, newSerial: String, expiresAt: Date, issuer: String?) async throws -> WorkerRecord?
    /// The worker has presented its current certificate: its previous serial is no longer accepted.
    func confirmRenewal(name: String) async throws
    /// Asks the worker to renew at its next heartbeat; false when there is no such worker.
    func requestRenewal(name: String, at: Date) async throws -> Bool

    /// Dashboard sessions, by the SHA-256 of their secret: they survive a restart of `serve`.
    func addDashboardSession(hash: String, expiresAt: Date) async throws
    func dashboardSession(hash: String) async throws -> Date?
    /// Forgets sessions that expired before `now`.
    func removeDashboardSessions(expiredBefore now: Date) async throws

    func addRound(_ round: RoundRecord) async throws
    func round(id: String) async throws -> RoundRecord?
    /// Every round, newest first.
    func rounds() async throws -> [RoundRecord]
    /// The rounds still running, newest first (what every heartbeat and tick looks at; ended rounds accumulate).
    func runningRounds() async throws -> [RoundRecord]
    /// Writes the round over the revision it was read at (`round.revision`), which moves on by one; throws
    /// `StoreError.conflict` (and writes nothing) when the stored row has moved on meanwhile.
    func updateRound(_ round: RoundRecord) async throws
    /// Records an assignment; false when the worker already had one for the phase.
    func assign(_ assignment: AssignmentRecord) async throws -> Bool
    func assignments(round: String, phase: Int) async throws -> [AssignmentRecord]
    func dropAssignment(round: String, phase: Int, worker: String, at: Date) async throws
    /// Records an accepted report and moves its round's revision on, in one transaction; false (and nothing
    /// written) when the worker already has one for the phase; `StoreError.conflict` (nothing written) when the
    /// round is no longer running at the report's phase.
    func addReport(_ report: ReportRecord) async throws -> Bool
    func reports(round: String, phase: Int) async throws -> [ReportRecord]
    func reports(round: String) async throws -> [ReportRecord]
    /// Takes or renews the lease `name` for `holder` until `expiresAt`, when it is free, expired at `now`, or
    /// already `holder`'s; returns the lease as it stands after the call (someone else's when it was taken).
    func claimLease(_ name: String, holder: String, now: Date, expiresAt: Date) async throws -> LeaseRecord
    /// Gives the lease up if `holder` has it (a replica shutting down), so another takes it at once.
    func releaseLease(_ name: String, holder: String) async throws
    func lease(_ name: String) async throws -> LeaseRecord?

    /// Tells every process sharing the store that rounds changed (a phase opened, a round started or ended), so
    /// their held heartbeats look for work again; the default (a store no other process shares) does nothing.
    func announceRoundsChanged() async throws
    /// The announcements of other processes sharing the store, as they arrive (nil: nothing else shares it). The
    /// stream also yields after a lost connection to the announcements comes back, since some may have been missed.
    func roundsChanged() -> AsyncStream<Void>?
    /// Releases the store's connections (a server's last call); the default does nothing.
    func close()
}

extension CoordinatorStore {
    public func runningRounds() async throws -> [RoundRecord] { try await rounds().filter { !$0.ended } }
    public func close() {}
    public func announceRoundsChanged() async throws {}
    public func roundsChanged() -> AsyncStream<Void>? { nil }
}

extension LeaseRecord {
    /// The lease after `holder` claims it at `now` until `expiresAt` (the rule every store applies atomically).
    static func claimed(_ current: LeaseRecord?, name: String, holder: String, now: Date, expiresAt: Date) -> LeaseRecord {
        if let current, current.holder != holder, current.expiresAt > now { return current }
        return LeaseRecord(name: name, holder: holder, expiresAt: expiresAt)
    }
}

/// The store in memory: for tests and for trying things out; nothing survives the process.
public actor MemoryStore: CoordinatorStore {
    var tokensByHash: [String: TokenRecord] = [:]
    var byName: [String: WorkerRecord] = [:]

    public init() {}

    public func addToken(_ token: TokenRecord) throws { tokensByHash[token.hash] = token }
    public func token(hash: String) throws -> TokenRecord? { tokensByHash[hash] }

    public func enroll(tokenHash: String, worker: WorkerRecord, now: Date) throws -> EnrollmentOutcome {
        guard var token = tokensByHash[tokenHash] else { return .unknownToken }
        guard token.expiresAt > now else { return .expiredToken }
        guard token.revokedAt == nil else { return .revokedToken }
        guard token.usesRemaining > 0 else { return .exhaustedToken }
        guard byName[worker.name] == nil else { return .nameTaken }
        token.usesRemaining -= 1
        tokensByHash[tokenHash] = token
        byName[worker.name] = worker
        return .enrolled(worker)
    }

    public func worker(named name: String) throws -> WorkerRecord? { byName[name] }
    public func worker(serial: String) throws -> WorkerRecord? {
        byName.values.first { $0.certificateSerial == serial || $0.previousSerial == serial }
    }
    public func workers() throws -> [WorkerRecord] { byName.values.sorted { $0.name < $1.name } }

    public func revoke(name: String, at: Date) throws -> Bool {
        guard var w = byName[name] else { return false }
        if w.revokedAt == nil { w.revokedAt = at }
        byName[name] = w
        return true
    }

    @discardableResult
    public func recordContact(name: String, at: Date, address: String?, capabilities: String?) throws -> WorkerRecord? {
        guard var w = byName[name] else { return nil }
        w.lastContactAt = at
        w.lastAddress = address
        if let capabilities { w.capabilities = capabilities }
        byName[name] = w
        return w
    }

    public func ping() throws {}
    public nonisolated func close() {}

    public func tokens() throws -> [TokenRecord] { tokensByHash.values.sorted { ($0.createdAt, $0.hash) > ($1.createdAt, $1.hash) } }

    public func revokeToken(hash: String, at: Date) throws -> Bool {
        guard var t = tokensByHash[hash] else { return false }
        if t.revokedAt == nil { t.revokedAt = at }
        tokensByHash[hash] = t
        return true
    }

    public func renewCertificate(name: String, presentedSerial: String, newSerial: String, expiresAt: Date, issuer: String?) throws -> WorkerRecord? {
        guard var w = byName[name] else { return nil }
        w.previousSerial = presentedSerial == newSerial ? nil : presentedSerial
        w.certificateSerial = newSerial
        w.certificateExpiresAt = expiresAt
        w.certificateIssuer = issuer
        w.renewRequestedAt = nil
        byName[name] = w
        return w
    }

    public func confirmRenewal(name: String) throws { byName[name]?.previousSerial = nil }

    public func requestRenewal(name: String, at: Date) throws -> Bool {
        guard byName[name] != nil else { return false }
        byName[name]!.renewRequestedAt = at
        return true
    }

    var sessions: [String: Date] = [:]
    public func addDashboardSession(hash: String, expiresAt: Date) throws { sessions[hash] = expiresAt }
    public func dashboardSession(hash: String) throws -> Date? { sessions[hash] }
    public func removeDashboardSessions(expiredBefore now: Date) throws { sessions = sessions.filter { $0.value >= now } }

    var roundsByID: [String: RoundRecord] = [:]
    var assignmentRows: [AssignmentRecord] = []
    var reportRows: [ReportRecord] = []

    public func addRound(_ round: RoundRecord) throws { roundsByID[round.id] = round }
    public func round(id: String) throws -> RoundRecord? { roundsByID[id] }
    public func rounds() throws -> [RoundRecord] { roundsByID.values.sorted { ($0.createdAt, $0.id) > ($1.createdAt, $1.id) } }
    public func updateRound(_ round: RoundRecord) throws {
        guard let stored = roundsByID[round.id], stored.revision == round.revision else { throw StoreError.roundConflict(round.id) }
        var next = round
        next.revision += 1
        roundsByID[round.id] = next
    }

    public func assign(_ a: AssignmentRecord) throws -> Bool {
        guard !assignmentRows.contains(where: { $0.round == a.round && $0.phase == a.phase && $0.worker == a.worker }) else { return false }
        assignmentRows.append(a)
        return true
    }

    public func assignments(round: String, phase: Int) throws -> [AssignmentRecord] {
        assignmentRows.filter { $0.round == round && $0.phase == phase }
    }

    public func dropAssignment(round: String, phase: Int, worker: String, at: Date) throws {
        for i in assignmentRows.indices where assignmentRows[i].round == round && assignmentRows[i].phase == phase
            && assignmentRows[i].worker == worker && assignmentRows[i].droppedAt == nil {
            assignmentRows[i].droppedAt = at
        }
    }

    public func addReport(_ r: ReportRecord) throws -> Bool {
        guard !reportRows.contains(where: { $0.round == r.round && $0.phase == r.phase && $0.worker == r.worker }) else { return false }
        guard let round = roundsByID[r.round], !round.ended, round.phase == r.phase else { throw StoreError.phaseClosed(r) }
        roundsByID[r.round]!.revision += 1
        reportRows.append(r)
        return true
    }

    public func reports(round: String, phase: Int) throws -> [ReportRecord] {
        reportRows.filter { $0.round == round && $0.phase == phase }
    }

    public func reports(round: String) throws -> [ReportRecord] { reportRows.filter { $0.round == round } }

    var leases: [String: LeaseRecord] = [:]

    public func claimLease(_ name: String, holder: String, now: Date, expiresAt: Date) throws -> LeaseRecord {
        let lease = LeaseRecord.claimed(leases[name], name: name, holder: holder, now: now, expiresAt: expiresAt)
        leases[name] = lease
        return lease
    }

    public func releaseLease(_ name: String, holder: String) throws {
        if leases[name]?.holder == holder { leases[name] = nil }
    }

    public func lease(_ name: String) throws -> LeaseRecord? { leases[name] }
}
