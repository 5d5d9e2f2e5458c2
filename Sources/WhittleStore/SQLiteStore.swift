import Foundation
import GRDB

/// The store in SQLite (GRDB's DatabasePool: WAL, concurrent readers, one writer), with migrations.
/// `synchronous = FULL`: a committed transaction is on disk before the call returns.
public final class SQLiteStore: CoordinatorStore, @unchecked Sendable {
    let pool: DatabasePool

    /// Opens (creating if needed) the database at `path` and migrates it to the current schema.
    public init(path: String) throws {
        var configuration = Configuration()
        configuration.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
            try db.execute(sql: "PRAGMA foreign_keys = ON")
        }
        configuration.busyMode = .timeout(10)
        pool = try DatabasePool(path: path, configuration: configuration)
        try Self.migrator.migrate(pool)
    }

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
        return m
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
        try await pool.read { db in try WorkerRecord.filter(Column("certificateSerial") == serial).fetchOne(db) }
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

    public func recordContact(name: String, at: Date, address: String?, capabilities: String?) async throws {
        try await pool.write { db in
            guard var w = try WorkerRecord.fetchOne(db, key: name) else { return }
            w.lastContactAt = at
            w.lastAddress = address
            if let capabilities { w.capabilities = capabilities }
            try w.update(db)
        }
    }

    public func ping() async throws {
        _ = try await pool.read { db in try Int.fetchOne(db, sql: "SELECT 1") }
    }
}

extension WorkerRecord: FetchableRecord, PersistableRecord {
    public static let databaseTableName = "worker"
}

extension TokenRecord: FetchableRecord, PersistableRecord {
    public static let databaseTableName = "token"
}
