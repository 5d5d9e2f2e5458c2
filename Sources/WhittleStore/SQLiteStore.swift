import Foundation
import GRDB

/// The store in SQLite (GRDB's DatabasePool: WAL, concurrent readers, one writer), with migrations.
/// `synchronous = FULL`: a committed transaction is on disk before the call returns.
public final class SQLiteStore: CoordinatorStore, @unchecked Sendable {
    let pool: DatabasePool

    /// Opens (creating if needed) the database at `path` and migrates it to the current schema: the embedded
    /// database has one process, so it migrates on open (PostgreSQL, shared by replicas, waits for
    /// `coordinator migrate`). A database a newer coordinator migrated is refused, not written.
    public init(path: String) throws {
        pool = try Self.open(path)
        _ = try Self.migrate(pool, path: path)
    }

    /// The pool over the file at `path`: `synchronous = FULL`, foreign keys enforced, 10 s of patience with a lock.
    static func open(_ path: String) throws -> DatabasePool {
        var configuration = Configuration()
        configuration.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
            try db.execute(sql: "PRAGMA foreign_keys = ON")
        }
        configuration.busyMode = .timeout(10)
        return try DatabasePool(path: path, configuration: configuration)
    }

    /// Applies the missing migrations; the schema versions (counts of migrations) before and after.
    static func migrate(_ pool: DatabasePool, path: String) throws -> (from: Int, to: Int) {
        let migrator = Self.migrator
        let (superseded, applied) = try pool.read { db in
            (try migrator.hasBeenSuperseded(db), try migrator.appliedIdentifiers(db))
        }
        if superseded {
            let unknown = applied.subtracting(migrator.migrations).sorted()
            throw StoreError(.schemaTooNew, "the database \(path) was migrated by a newer coordinator (\(unknown.joined(separator: "; "))): upgrade this coordinator (an older one must not write a newer schema)")
        }
        try migrator.migrate(pool)
        return (applied.count, migrator.migrations.count)
    }

    /// Migrates the database at `path` (creating it if needed): `coordinator migrate`.
    public static func migrate(path: String) throws -> (from: Int, to: Int) { try migrate(try open(path), path: path) }

    static var migrator: DatabaseMigrator {
        var m = DatabaseMigrator()
        m.registerMigration("v1: tokens and workers") { db in
            try db.create(table: "token") { t in
                t.primaryKey("hash", .text)
                t.column("createdAt", .datetime).notNull()
                t.column("expiresAt", .datetime).notNull()
                t.column("usesAllowed", .integer).notNull()
                t.column("usesRemaining", .integer).notNull()
            }
            try db.create(table: "worker") { t in
                t.primaryKey("name", .text)
                t.column("certificateSerial", .text).notNull().unique()
                t.column("certificateExpiresAt", .datetime).notNull()
                t.column("enrolledAt", .datetime).notNull()
                t.column("lastContactAt", .datetime)
                t.column("lastAddress", .text)
                t.column("revokedAt", .datetime)
                t.column("capabilities", .text)
            }
            try db.create(table: "enrollment") { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("worker", .text).notNull().references("worker")
                t.column("tokenHash", .text).notNull().references("token")
                t.column("at", .datetime).notNull()
            }
        }
        m.registerMigration("v2: rounds, assignments, reports") { db in
            try db.create(table: "round") { t in
                t.primaryKey("id", .text)
                t.column("createdAt", .datetime).notNull()
                t.column("state", .text).notNull()
                t.column("phase", .integer).notNull()
                t.column("phaseStartedAt", .datetime).notNull()
                t.column("plan", .text).notNull()
                t.column("progress", .text).notNull()
                t.column("message", .text)
                t.column("endedAt", .datetime)
            }
            try db.create(table: "assignment") { t in
                t.column("round", .text).notNull().references("round")
                t.column("phase", .integer).notNull()
                t.column("worker", .text).notNull().references("worker")
                t.column("assignedAt", .datetime).notNull()
                t.column("droppedAt", .datetime)
                t.primaryKey(["round", "phase", "worker"])
            }
            try db.create(table: "report") { t in
                t.column("round", .text).notNull().references("round")
                t.column("phase", .integer).notNull()
                t.column("worker", .text).notNull().references("worker")
                t.column("uploadID", .text).notNull()
                t.column("blob", .text).notNull()
                t.column("bytes", .integer).notNull()
                t.column("bytesDown", .integer).notNull()
                t.column("samples", .integer).notNull()
                t.column("acceptedAt", .datetime).notNull()
                t.primaryKey(["round", "phase", "worker"])
            }
        }
        m.registerMigration("v3: token revocation, certificate renewal, dashboard sessions") { db in
            try db.alter(table: "token") { t in t.add(column: "revokedAt", .datetime) }
            try db.alter(table: "worker") { t in
                t.add(column: "previousSerial", .text)
                t.add(column: "renewRequestedAt", .datetime)
            }
            try db.create(index: "worker_previous_serial", on: "worker", columns: ["previousSerial"])
            try db.create(table: "dashboardSession") { t in
                t.primaryKey("hash", .text)
                t.column("expiresAt", .datetime).notNull()
            }
        }
        m.registerMigration("v4: the CA that issued each worker certificate (CA rotation)") { db in
            try db.alter(table: "worker") { t in t.add(column: "certificateIssuer", .text) }
        }
        m.registerMigration("v5: round revisions and leases (coordinator replicas)") { db in
            try db.alter(table: "round") { t in t.add(column: "revision", .integer).notNull().defaults(to: 0) }
            try db.create(table: "lease") { t in
                t.primaryKey("name", .text)
                t.column("holder", .text).notNull()
                t.column("expiresAt", .datetime).notNull()
            }
        }
        return m
    }

    public func addRound(_ round: RoundRecord) async throws {
        try await pool.write { db in try round.insert(db) }
    }

    public func round(id: String) async throws -> RoundRecord? {
        try await pool.read { db in try RoundRecord.fetchOne(db, key: id) }
    }

    public func rounds() async throws -> [RoundRecord] {
        try await pool.read { db in try RoundRecord.order(Column("createdAt").desc, Column("id").desc).fetchAll(db) }
    }

    public func runningRounds() async throws -> [RoundRecord] {
        try await pool.read { db in
            try RoundRecord.filter(Column("state") == "running").order(Column("createdAt").desc, Column("id").desc).fetchAll(db)
        }
    }

    public func updateRound(_ round: RoundRecord) async throws {
        try await pool.write { db in
            guard try Int.fetchOne(db, sql: "SELECT revision FROM round WHERE id = ?", arguments: [round.id]) == round.revision else {
                throw StoreError.roundConflict(round.id)
            }
            var next = round
            next.revision += 1
            try next.update(db)
        }
    }

    public func assign(_ a: AssignmentRecord) async throws -> Bool {
        try await pool.write { db in
            try a.insert(db, onConflict: .ignore)
            return db.changesCount > 0
        }
    }

    public func assignments(round: String, phase: Int) async throws -> [AssignmentRecord] {
        try await pool.read { db in
            try AssignmentRecord.filter(Column("round") == round && Column("phase") == phase).fetchAll(db)
        }
    }

    public func dropAssignment(round: String, phase: Int, worker: String, at: Date) async throws {
        try await pool.write { db in
            try db.execute(sql: "UPDATE assignment SET droppedAt = ? WHERE round = ? AND phase = ? AND worker = ? AND droppedAt IS NULL",
                           arguments: [at, round, phase, worker])
        }
    }

    public func addReport(_ r: ReportRecord) async throws -> Bool {
        try await pool.write { db in
            guard try ReportRecord.filter(Column("round") == r.round && Column("phase") == r.phase && Column("worker") == r.worker).fetchCount(db) == 0 else {
                return false
            }
            try db.execute(sql: "UPDATE round SET revision = revision + 1 WHERE id = ? AND phase = ? AND state = 'running'",
                           arguments: [r.round, r.phase])
            guard db.changesCount == 1 else { throw StoreError.phaseClosed(r) }
            try r.insert(db)
            return true
        }
    }

    public func claimLease(_ name: String, holder: String, now: Date, expiresAt: Date) async throws -> LeaseRecord {
        try await pool.write { db in
            let lease = LeaseRecord.claimed(try LeaseRecord.fetchOne(db, key: name), name: name, holder: holder, now: now, expiresAt: expiresAt)
            try lease.save(db)
            return lease
        }
    }

    public func releaseLease(_ name: String, holder: String) async throws {
        try await pool.write { db in
            try db.execute(sql: "DELETE FROM lease WHERE name = ? AND holder = ?", arguments: [name, holder])
        }
    }

    public func lease(_ name: String) async throws -> LeaseRecord? {
        try await pool.read { db in try LeaseRecord.fetchOne(db, key: name) }
    }

    public func reports(round: String, phase: Int) async throws -> [ReportRecord] {
        try await pool.read { db in
            try ReportRecord.filter(Column("round") == round && Column("phase") == phase).order(Column("acceptedAt")).fetchAll(db)
        }
    }

    public func reports(round: String) async throws -> [ReportRecord] {
        try await pool.read { db in try ReportRecord.filter(Column("round") == round).order(Column("acceptedAt")).fetchAll(db) }
    }

    public func addToken(_ token: TokenRecord) async throws {
        try await pool.write { db in try token.insert(db) }
    }

    public func token(hash: String) async throws -> TokenRecord? {
        try await pool.read { db in try TokenRecord.fetchOne(db, key: hash) }
    }

    public func enroll(tokenHash: String, worker: WorkerRecord, now: Date) async throws -> EnrollmentOutcome {
        try await pool.write { db -> EnrollmentOutcome in
            guard var token = try TokenRecord.fetchOne(db, key: tokenHash) else { return .unknownToken }
            guard token.expiresAt > now else { return .expiredToken }
            guard token.revokedAt == nil else { return .revokedToken }
            guard token.usesRemaining > 0 else { return .exhaustedToken }
            guard try WorkerRecord.fetchOne(db, key: worker.name) == nil else { return .nameTaken }
            token.usesRemaining -= 1
            try token.update(db)
            try worker.insert(db)
            try db.execute(sql: "INSERT INTO enrollment (worker, tokenHash, at) VALUES (?, ?, ?)",
                           arguments: [worker.name, tokenHash, now])
            return .enrolled(worker)
        }
    }

    public func worker(named name: String) async throws -> WorkerRecord? {
        try await pool.read { db in try WorkerRecord.fetchOne(db, key: name) }
    }

    public func worker(serial: String) async throws -> WorkerRecord? {
        try await pool.read { db in
            try WorkerRecord.filter(Column("certificateSerial") == serial || Column("previousSerial") == serial).fetchOne(db)
        }
    }

    public func workers() async throws -> [WorkerRecord] {
        try await pool.read { db in try WorkerRecord.order(Column("name")).fetchAll(db) }
    }

    public func revoke(name: String, at: Date) async throws -> Bool {
        try await pool.write { db in
            guard var w = try WorkerRecord.fetchOne(db, key: name) else { return false }
            if w.revokedAt == nil {
                w.revokedAt = at
                try w.update(db)
            }
            return true
        }
    }

    @discardableResult
    public func recordContact(name: String, at: Date, address: String?, capabilities: String?) async throws -> WorkerRecord? {
        try await pool.write { db in
            guard var w = try WorkerRecord.fetchOne(db, key: name) else { return nil }
            w.lastContactAt = at
            w.lastAddress = address
            if let capabilities { w.capabilities = capabilities }
            try w.update(db)
            return w
        }
    }

    public func ping() async throws {
        _ = try await pool.read { db in try Int.fetchOne(db, sql: "SELECT 1") }
    }

    public func tokens() async throws -> [TokenRecord] {
        try await pool.read { db in try TokenRecord.order(Column("createdAt").desc, Column("hash").desc).fetchAll(db) }
    }

    public func revokeToken(hash: String, at: Date) async throws -> Bool {
        try await pool.write { db in
            guard var t = try TokenRecord.fetchOne(db, key: hash) else { return false }
            if t.revokedAt == nil {
                t.revokedAt = at
                try t.update(db)
            }
            return true
        }
    }

    public func renewCertificate(name: String, presentedSerial: String, newSerial: String, expiresAt: Date, issuer: String?) async throws -> WorkerRecord? {
        try await pool.write { db in
            guard var w = try WorkerRecord.fetchOne(db, key: name) else { return nil }
            w.previousSerial = presentedSerial == newSerial ? nil : presentedSerial
            w.certificateSerial = newSerial
            w.certificateExpiresAt = expiresAt
            w.certificateIssuer = issuer
            w.renewRequestedAt = nil
            try w.update(db)
            return w
        }
    }

    public func confirmRenewal(name: String) async throws {
        try await pool.write { db in
            try db.execute(sql: "UPDATE worker SET previousSerial = NULL WHERE name = ?", arguments: [name])
        }
    }

    public func requestRenewal(name: String, at: Date) async throws -> Bool {
        try await pool.write { db in
            try db.execute(sql: "UPDATE worker SET renewRequestedAt = ? WHERE name = ?", arguments: [at, name])
            return db.changesCount > 0
        }
    }

    public func addDashboardSession(hash: String, expiresAt: Date) async throws {
        try await pool.write { db in
            try db.execute(sql: "INSERT OR REPLACE INTO dashboardSession (hash, expiresAt) VALUES (?, ?)", arguments: [hash, expiresAt])
        }
    }

    public func dashboardSession(hash: String) async throws -> Date? {
        try await pool.read { db in try Date.fetchOne(db, sql: "SELECT expiresAt FROM dashboardSession WHERE hash = ?", arguments: [hash]) }
    }

    public func removeDashboardSessions(expiredBefore now: Date) async throws {
        try await pool.write { db in try db.execute(sql: "DELETE FROM dashboardSession WHERE expiresAt < ?", arguments: [now]) }
    }
}

extension WorkerRecord: FetchableRecord, PersistableRecord {
    public static let databaseTableName = "worker"
}

extension RoundRecord: FetchableRecord, PersistableRecord {
    public static let databaseTableName = "round"
}

extension AssignmentRecord: FetchableRecord, PersistableRecord {
    public static let databaseTableName = "assignment"
}

extension ReportRecord: FetchableRecord, PersistableRecord {
    public static let databaseTableName = "report"
}

extension LeaseRecord: FetchableRecord, PersistableRecord {
    public static let databaseTableName = "lease"
}

extension TokenRecord: FetchableRecord, PersistableRecord {
    public static let databaseTableName = "token"
}
