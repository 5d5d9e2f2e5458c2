import Foundation
import Logging
import Testing
import WhittleStore
import WhittleTestSupport

/// One suite, run against every store implementation: they must behave the same.
enum StoreKind: String, CaseIterable, CustomStringConvertible {
    case memory, sqlite, postgres
    var description: String { rawValue }

    static let quiet: Logger = {
        var l = Logger(label: "store-tests")
        l.logLevel = .critical
        return l
    }()

    func make() async throws -> (any CoordinatorStore, URL?) {
        switch self {
        case .memory: return (MemoryStore(), nil)
        case .sqlite:
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-store-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            return (try SQLiteStore(path: dir.appendingPathComponent("whittle.sqlite").path), dir)
        case .postgres:
            let url = try Self.postgresDatabase()
            _ = try await PostgresStore.migrate(url, logger: Self.quiet)
            return (try await PostgresStore.connect(url, logger: Self.quiet), nil)
        }
    }

    /// A new, empty database on the tests' PostgreSQL cluster, reached as the trusted role over TCP without TLS.
    static func postgresDatabase() throws -> DatabaseURL {
        let (cluster, name) = try TestPostgres.makeDatabase()
        return try DatabaseURL("postgresql://whittle@127.0.0.1:\(cluster.port)/\(name)?sslmode=disable")
    }
}

@Suite struct StoreTests {
    static let now = Date(timeIntervalSince1970: 1_800_000_000)

    static func worker(_ name: String, serial: String? = nil) -> WorkerRecord {
        WorkerRecord(name: name, certificateSerial: serial ?? "serial-\(name)", certificateExpiresAt: now.addingTimeInterval(86400),
                     enrolledAt: now)
    }

    @Test(arguments: StoreKind.allCases)
    func enrollmentChecksTokenAndNameAtomically(_ kind: StoreKind) async throws {
        let (store, _) = try await kind.make()
        try await store.addToken(TokenRecord(hash: "t2", createdAt: Self.now, expiresAt: Self.now.addingTimeInterval(60), uses: 2))
        try await store.addToken(TokenRecord(hash: "old", createdAt: Self.now, expiresAt: Self.now.addingTimeInterval(-1), uses: 5))
        #expect(try await store.enroll(tokenHash: "nope", worker: Self.worker("a"), now: Self.now) == .unknownToken)
        #expect(try await store.enroll(tokenHash: "old", worker: Self.worker("a"), now: Self.now) == .expiredToken)
        #expect(try await store.enroll(tokenHash: "t2", worker: Self.worker("a"), now: Self.now) == .enrolled(Self.worker("a")))
        #expect(try await store.enroll(tokenHash: "t2", worker: Self.worker("a", serial: "x"), now: Self.now) == .nameTaken)
        // A refused enrollment takes no use.
        #expect(try await store.token(hash: "t2")?.usesRemaining == 1)
        #expect(try await store.enroll(tokenHash: "t2", worker: Self.worker("b"), now: Self.now) == .enrolled(Self.worker("b")))
        #expect(try await store.enroll(tokenHash: "t2", worker: Self.worker("c"), now: Self.now) == .exhaustedToken)
        #expect(try await store.workers().map(\.name) == ["a", "b"])
        #expect(try await store.worker(serial: "serial-b")?.name == "b")
        #expect(try await store.worker(named: "c") == nil)
    }

    @Test(arguments: StoreKind.allCases)
    func revocationAndContact(_ kind: StoreKind) async throws {
        let (store, _) = try await kind.make()
        try await store.addToken(TokenRecord(hash: "t", createdAt: Self.now, expiresAt: Self.now.addingTimeInterval(60), uses: 1))
        _ = try await store.enroll(tokenHash: "t", worker: Self.worker("a"), now: Self.now)
        let recorded = try await store.recordContact(name: "a", at: Self.now.addingTimeInterval(5), address: "10.0.0.2", capabilities: "{\"cores\":2}")
        var a = try #require(try await store.worker(named: "a"))
        #expect(a.lastAddress == "10.0.0.2" && a.capabilities == "{\"cores\":2}")
        #expect(recorded == a, "the heartbeat answers from the row it wrote")
        #expect(try await store.recordContact(name: "ghost", at: Self.now, address: nil, capabilities: nil) == nil)
        _ = try await store.requestRenewal(name: "a", at: Self.now.addingTimeInterval(6))
        let again = try await store.recordContact(name: "a", at: Self.now.addingTimeInterval(7), address: "10.0.0.3", capabilities: nil)
        #expect(again?.renewRequestedAt == Self.now.addingTimeInterval(6) && again?.capabilities == "{\"cores\":2}",
                "a renewal request is seen by the next heartbeat; capabilities left out are kept")
        a = try #require(try await store.worker(named: "a"))
        #expect(a.state(now: Self.now.addingTimeInterval(10)) == "online")
        #expect(a.state(now: Self.now.addingTimeInterval(1000)) == "offline")
        #expect(try await store.revoke(name: "a", at: Self.now.addingTimeInterval(20)))
        #expect(try await !store.revoke(name: "ghost", at: Self.now))
        a = try #require(try await store.worker(named: "a"))
        #expect(a.revokedAt == Self.now.addingTimeInterval(20))
        #expect(a.state(now: Self.now) == "revoked")
        try await store.ping()
    }

    /// 50 enrollments at once against a 40-use token: exactly 40 succeed.
    @Test(arguments: StoreKind.allCases)
    func concurrentEnrollmentsNeverOverspendAToken(_ kind: StoreKind) async throws {
        let (store, _) = try await kind.make()
        try await store.addToken(TokenRecord(hash: "t", createdAt: Self.now, expiresAt: Self.now.addingTimeInterval(60), uses: 40))
        let outcomes = try await withThrowingTaskGroup(of: EnrollmentOutcome.self) { group in
            for i in 0..<50 { group.addTask { try await store.enroll(tokenHash: "t", worker: Self.worker("w\(i)"), now: Self.now) } }
            var all: [EnrollmentOutcome] = []
            for try await o in group { all.append(o) }
            return all
        }
        #expect(outcomes.filter { if case .enrolled = $0 { true } else { false } }.count == 40)
        #expect(outcomes.filter { $0 == .exhaustedToken }.count == 10)
        #expect(try await store.workers().count == 40)
        #expect(try await store.token(hash: "t")?.usesRemaining == 0)
    }

    @Test(arguments: StoreKind.allCases)
    func tokensAreListedAndRevoked(_ kind: StoreKind) async throws {
        let (store, _) = try await kind.make()
        try await store.addToken(TokenRecord(hash: "t1", createdAt: Self.now, expiresAt: Self.now.addingTimeInterval(60), uses: 2))
        try await store.addToken(TokenRecord(hash: "t2", createdAt: Self.now.addingTimeInterval(1), expiresAt: Self.now.addingTimeInterval(60), uses: 1))
        #expect(try await store.tokens().map(\.hash) == ["t2", "t1"], "newest first")
        #expect(try await store.revokeToken(hash: "t1", at: Self.now.addingTimeInterval(2)))
        #expect(try await !store.revokeToken(hash: "ghost", at: Self.now))
        let t1 = try #require(try await store.token(hash: "t1"))
        #expect(t1.revokedAt == Self.now.addingTimeInterval(2) && t1.state(now: Self.now) == "revoked")
        #expect(try await store.enroll(tokenHash: "t1", worker: Self.worker("a"), now: Self.now) == .revokedToken)
        #expect(try await store.token(hash: "t1")?.usesRemaining == 2, "a refused enrollment takes no use")
        #expect(try await store.enroll(tokenHash: "t2", worker: Self.worker("a"), now: Self.now) == .enrolled(Self.worker("a")))
        #expect(try await store.token(hash: "t2")?.state(now: Self.now) == "exhausted")
        #expect(try await store.token(hash: "t2")?.state(now: Self.now.addingTimeInterval(61)) == "expired")
    }

    /// A renewal keeps the certificate it came with usable until the new one is presented; a second renewal made
    /// with the old certificate (the first answer was lost) keeps the old one, not the unused first renewal.
    @Test(arguments: StoreKind.allCases)
    func certificateRenewalKeepsThePresentedSerialUntilTheNewOneIsUsed(_ kind: StoreKind) async throws {
        let (store, _) = try await kind.make()
        try await store.addToken(TokenRecord(hash: "t", createdAt: Self.now, expiresAt: Self.now.addingTimeInterval(60), uses: 1))
        var enrolled = Self.worker("a", serial: "s1")
        enrolled.certificateIssuer = "ca1"
        _ = try await store.enroll(tokenHash: "t", worker: enrolled, now: Self.now)
        #expect(try await store.worker(named: "a")?.certificateIssuer == "ca1")
        #expect(try await store.requestRenewal(name: "a", at: Self.now))
        #expect(try await !store.requestRenewal(name: "ghost", at: Self.now))
        #expect(try await store.worker(named: "a")?.renewRequestedAt == Self.now)
        let later = Self.now.addingTimeInterval(86400 * 2)
        var a = try #require(try await store.renewCertificate(name: "a", presentedSerial: "s1", newSerial: "s2", expiresAt: later, issuer: "ca1"))
        #expect(a.certificateSerial == "s2" && a.previousSerial == "s1" && a.certificateExpiresAt == later && a.renewRequestedAt == nil)
        #expect(try await store.worker(serial: "s1")?.name == "a")
        #expect(try await store.worker(serial: "s2")?.name == "a")
        // The answer was lost: the worker renews again with s1.
        a = try #require(try await store.renewCertificate(name: "a", presentedSerial: "s1", newSerial: "s3", expiresAt: later, issuer: "ca2"))
        // A renewal during a CA rotation records the new CA as the issuer.
        #expect(try await store.worker(named: "a")?.certificateIssuer == "ca2")
        #expect(try await store.worker(serial: "s2") == nil)
        #expect(try await store.worker(serial: "s1")?.name == "a")
        try await store.confirmRenewal(name: "a")
        #expect(try await store.worker(serial: "s1") == nil)
        #expect(try await store.worker(serial: "s3")?.previousSerial == nil)
        #expect(try await store.renewCertificate(name: "ghost", presentedSerial: "x", newSerial: "y", expiresAt: later, issuer: nil) == nil)
    }

    @Test(arguments: StoreKind.allCases)
    func dashboardSessionsAreKeptUntilTheyExpire(_ kind: StoreKind) async throws {
        let (store, _) = try await kind.make()
        try await store.addDashboardSession(hash: "s", expiresAt: Self.now.addingTimeInterval(60))
        try await store.addDashboardSession(hash: "old", expiresAt: Self.now.addingTimeInterval(-1))
        #expect(try await store.dashboardSession(hash: "s") == Self.now.addingTimeInterval(60))
        try await store.removeDashboardSessions(expiredBefore: Self.now)
        #expect(try await store.dashboardSession(hash: "old") == nil)
        #expect(try await store.dashboardSession(hash: "s") != nil)
    }

    /// Rounds newest first and updated whole; one assignment and one report per worker and phase (a second is
    /// refused and changes nothing); dropping marks only the live assignment.
    @Test(arguments: StoreKind.allCases)
    func roundsAssignmentsAndReports(_ kind: StoreKind) async throws {
        let (store, _) = try await kind.make()
        try await store.addToken(TokenRecord(hash: "t", createdAt: Self.now, expiresAt: Self.now.addingTimeInterval(60), uses: 2))
        _ = try await store.enroll(tokenHash: "t", worker: Self.worker("a"), now: Self.now)
        _ = try await store.enroll(tokenHash: "t", worker: Self.worker("b"), now: Self.now)
        let r1 = RoundRecord(id: "r1", createdAt: Self.now, plan: "{\"plan\":1}", progress: "{}")
        let r2 = RoundRecord(id: "r2", createdAt: Self.now.addingTimeInterval(5), plan: "{\"plan\":2}", progress: "{}")
        try await store.addRound(r1)
        try await store.addRound(r2)
        #expect(try await store.rounds().map(\.id) == ["r2", "r1"], "newest first")
        #expect(try await store.runningRounds().map(\.id) == ["r2", "r1"])
        var updated = r1
        updated.state = "failed"
        updated.phase = 3
        updated.phaseStartedAt = Self.now.addingTimeInterval(9)
        updated.progress = String(repeating: "x", count: 100_000)
        updated.message = "it's a \"quoted\" message; DROP TABLE round"
        updated.endedAt = Self.now.addingTimeInterval(10)
        try await store.updateRound(updated)
        updated.revision += 1
        #expect(try await store.runningRounds().map(\.id) == ["r2"], "a failed round is not running")
        #expect(try await store.round(id: "r1") == updated)
        #expect(try await store.round(id: "nope") == nil)

        #expect(try await store.assign(AssignmentRecord(round: "r2", phase: 0, worker: "a", assignedAt: Self.now)))
        #expect(try await !store.assign(AssignmentRecord(round: "r2", phase: 0, worker: "a", assignedAt: Self.now.addingTimeInterval(1))))
        #expect(try await store.assign(AssignmentRecord(round: "r2", phase: 0, worker: "b", assignedAt: Self.now.addingTimeInterval(2))))
        #expect(try await store.assign(AssignmentRecord(round: "r2", phase: 1, worker: "a", assignedAt: Self.now.addingTimeInterval(3))))
        try await store.dropAssignment(round: "r2", phase: 0, worker: "b", at: Self.now.addingTimeInterval(4))
        try await store.dropAssignment(round: "r2", phase: 0, worker: "b", at: Self.now.addingTimeInterval(8))
        let phase0 = try await store.assignments(round: "r2", phase: 0).sorted { $0.worker < $1.worker }
        #expect(phase0.map(\.worker) == ["a", "b"])
        #expect(phase0[0].droppedAt == nil && phase0[0].assignedAt == Self.now)
        #expect(phase0[1].droppedAt == Self.now.addingTimeInterval(4), "the first drop stands")

        func report(_ worker: String, _ phase: Int, at: TimeInterval, upload: String = "u") -> ReportRecord {
            ReportRecord(round: "r2", phase: phase, worker: worker, uploadID: "\(upload)-\(worker)", blob: "reports/r2/\(phase)/\(worker)",
                         bytes: 1 << 33, bytesDown: 12, samples: 500, acceptedAt: Self.now.addingTimeInterval(at))
        }
        #expect(try await store.addReport(report("b", 0, at: 1)))
        #expect(try await store.addReport(report("a", 0, at: 2)))
        #expect(try await !store.addReport(report("a", 0, at: 3, upload: "again")), "one report per worker and phase")
        var atOne = try #require(try await store.round(id: "r2"))
        atOne.phase = 1
        try await store.updateRound(atOne)
        #expect(try await store.addReport(report("a", 1, at: 4)))
        #expect(try await store.reports(round: "r2", phase: 0) == [report("b", 0, at: 1), report("a", 0, at: 2)], "in acceptance order")
        #expect(try await store.reports(round: "r2").map(\.phase) == [0, 0, 1])
        #expect(try await store.reports(round: "r1").isEmpty)
    }

    /// The fences coordinator replicas rely on: a round is written only over the revision it was read at, and a
    /// report is recorded only while its round runs at its phase, moving the revision on.
    @Test(arguments: StoreKind.allCases)
    func roundRevisionsFenceConcurrentWriters(_ kind: StoreKind) async throws {
        let (store, _) = try await kind.make()
        try await store.addToken(TokenRecord(hash: "t", createdAt: Self.now, expiresAt: Self.now.addingTimeInterval(60), uses: 2))
        _ = try await store.enroll(tokenHash: "t", worker: Self.worker("a"), now: Self.now)
        _ = try await store.enroll(tokenHash: "t", worker: Self.worker("b"), now: Self.now)
        try await store.addRound(RoundRecord(id: "r", createdAt: Self.now, plan: "{}", progress: "{}"))
        let read = try #require(try await store.round(id: "r"))
        #expect(read.revision == 0)
        var first = read
        first.progress = "{\"first\":1}"
        try await store.updateRound(first)
        var second = read
        second.progress = "{\"second\":1}"
        await #expect(throws: StoreError.self, "a write over a revision that moved on is refused") { try await store.updateRound(second) }
        #expect(try await store.round(id: "r")?.progress == "{\"first\":1}")
        #expect(try await store.round(id: "r")?.revision == 1)

        func report(_ worker: String, _ phase: Int) -> ReportRecord {
            ReportRecord(round: "r", phase: phase, worker: worker, uploadID: "u-\(worker)", blob: "reports/r/\(phase)-\(worker).pb",
                         bytes: 10, bytesDown: 1, samples: 5, acceptedAt: Self.now)
        }
        #expect(try await store.addReport(report("a", 0)))
        #expect(try await store.round(id: "r")?.revision == 2, "an accepted report moves the revision on")
        var stale = try #require(try await store.round(id: "r"))
        stale.revision = 1
        stale.phase = 1
        await #expect(throws: StoreError.self, "a phase cannot close over a report it did not see") { try await store.updateRound(stale) }
        #expect(try await !store.addReport(report("a", 0)), "a duplicate is not counted")
        await #expect(throws: StoreError.self, "no report for a phase the round is not at") { _ = try await store.addReport(report("b", 1)) }
        var closed = try #require(try await store.round(id: "r"))
        closed.phase = 1
        try await store.updateRound(closed)
        await #expect(throws: StoreError.self, "no report for a phase that closed") { _ = try await store.addReport(report("b", 0)) }
        #expect(try await store.reports(round: "r").map(\.worker) == ["a"])
        var ended = try #require(try await store.round(id: "r"))
        ended.state = "cancelled"
        try await store.updateRound(ended)
        await #expect(throws: StoreError.self, "no report for an ended round") { _ = try await store.addReport(report("b", 1)) }
        do {
            try await store.updateRound(stale)
        } catch let error as StoreError {
            #expect(error.code == .conflict)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func leasesPassOnlyWhenFreeExpiredOrReleased(_ kind: StoreKind) async throws {
        let (store, _) = try await kind.make()
        let t = Self.now
        #expect(try await store.lease("rounds") == nil)
        #expect(try await store.claimLease("rounds", holder: "a", now: t, expiresAt: t.addingTimeInterval(10)).holder == "a")
        let refused = try await store.claimLease("rounds", holder: "b", now: t.addingTimeInterval(5), expiresAt: t.addingTimeInterval(15))
        #expect(refused == LeaseRecord(name: "rounds", holder: "a", expiresAt: t.addingTimeInterval(10)), "a live lease stays its holder's")
        #expect(try await store.claimLease("rounds", holder: "a", now: t.addingTimeInterval(9), expiresAt: t.addingTimeInterval(19)).expiresAt
                == t.addingTimeInterval(19), "the holder renews")
        #expect(try await store.claimLease("rounds", holder: "b", now: t.addingTimeInterval(18), expiresAt: t.addingTimeInterval(28)).holder == "a")
        #expect(try await store.claimLease("rounds", holder: "b", now: t.addingTimeInterval(19), expiresAt: t.addingTimeInterval(29)).holder == "b",
                "an expired lease passes")
        #expect(try await store.claimLease("other", holder: "a", now: t, expiresAt: t.addingTimeInterval(10)).holder == "a", "leases are by name")
        try await store.releaseLease("rounds", holder: "a")
        #expect(try await store.lease("rounds")?.holder == "b", "only the holder releases")
        try await store.releaseLease("rounds", holder: "b")
        #expect(try await store.lease("rounds") == nil)
        #expect(try await store.claimLease("rounds", holder: "a", now: t.addingTimeInterval(20), expiresAt: t.addingTimeInterval(30)).holder == "a")
    }

    @Test func sqliteStateSurvivesReopening() async throws {
        let (first, dir) = try await StoreKind.sqlite.make()
        let path = dir!.appendingPathComponent("whittle.sqlite").path
        try await first.addToken(TokenRecord(hash: "t", createdAt: Self.now, expiresAt: Self.now.addingTimeInterval(60), uses: 3))
        _ = try await first.enroll(tokenHash: "t", worker: Self.worker("a"), now: Self.now)
        let reopened = try SQLiteStore(path: path)
        #expect(try await reopened.worker(named: "a") == Self.worker("a"))
        #expect(try await reopened.token(hash: "t")?.usesRemaining == 2)
        try await first.addDashboardSession(hash: "s", expiresAt: Self.now)
        #expect(try await SQLiteStore(path: path).dashboardSession(hash: "s") == Self.now)
    }
}
