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

    public init(name: String, certificateSerial: String, certificateExpiresAt: Date, enrolledAt: Date) {
        self.name = name
        self.certificateSerial = certificateSerial
        self.certificateExpiresAt = certificateExpiresAt
        self.enrolledAt = enrolledAt
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

    public init(hash: String, createdAt: Date, expiresAt: Date, uses: Int) {
        self.hash = hash
        self.createdAt = createdAt
        self.expiresAt = expiresAt
        self.usesAllowed = uses
        self.usesRemaining = uses
    }
}

public enum EnrollmentOutcome: Sendable, Equatable {
    case enrolled(WorkerRecord)
    case unknownToken
    case expiredToken
    case exhaustedToken
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
    func recordContact(name: String, at: Date, address: String?, capabilities: String?) async throws
    /// A cheap query proving the store answers (readiness).
    func ping() async throws
}

/// The store in memory: for tests and for trying things out; nothing survives the process.
public actor MemoryStore: CoordinatorStore {
    var tokens: [String: TokenRecord] = [:]
    var byName: [String: WorkerRecord] = [:]

    public init() {}

    public func addToken(_ token: TokenRecord) throws { tokens[token.hash] = token }
    public func token(hash: String) throws -> TokenRecord? { tokens[hash] }

    public func enroll(tokenHash: String, worker: WorkerRecord, now: Date) throws -> EnrollmentOutcome {
        guard var token = tokens[tokenHash] else { return .unknownToken }
        guard token.expiresAt > now else { return .expiredToken }
        guard token.usesRemaining > 0 else { return .exhaustedToken }
        guard byName[worker.name] == nil else { return .nameTaken }
        token.usesRemaining -= 1
        tokens[tokenHash] = token
        byName[worker.name] = worker
        return .enrolled(worker)
    }

    public func worker(named name: String) throws -> WorkerRecord? { byName[name] }
    public func worker(serial: String) throws -> WorkerRecord? { byName.values.first { $0.certificateSerial == serial } }
    public func workers() throws -> [WorkerRecord] { byName.values.sorted { $0.name < $1.name } }

    public func revoke(name: String, at: Date) throws -> Bool {
        guard var w = byName[name] else { return false }
        if w.revokedAt == nil { w.revokedAt = at }
        byName[name] = w
        return true
    }

    public func recordContact(name: String, at: Date, address: String?, capabilities: String?) throws {
        guard var w = byName[name] else { return }
        w.lastContactAt = at
        w.lastAddress = address
        if let capabilities { w.capabilities = capabilities }
        byName[name] = w
    }

    public func ping() throws {}
}
