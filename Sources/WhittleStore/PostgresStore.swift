import Foundation
import Logging
import NIOSSL
import PostgresNIO

/// The store in PostgreSQL (postgres-nio's pooled `PostgresClient`): what several coordinator replicas share.
/// Every mutating call has committed when it returns (PostgreSQL's default `synchronous_commit = on`: the commit is
/// flushed to the server's WAL), so an acknowledgement sent after it cannot be lost.
///
/// The schema is versioned (`whittle_schema`): `migrate` applies what is missing under an advisory lock, in one
/// transaction, once for every replica; `connect` refuses a database that is behind this binary (migrate first) or
/// ahead of it (an older binary must not write a newer schema).
public final class PostgresStore: CoordinatorStore, Sendable {
    let client: PostgresClient
    let runner: Task<Void, Never>
    let logger: Logger
    public let url: DatabaseURL

    /// The schema's migrations, in order; a migration is never edited once released, only followed by another.
    static let migrations: [(version: Int, name: String, statements: [String])] = [
        (1, "tokens, workers, rounds, assignments, reports, dashboard sessions", [
            """
            CREATE TABLE token (
                hash text PRIMARY KEY, created_at timestamptz NOT NULL, expires_at timestamptz NOT NULL,
                uses_allowed bigint NOT NULL, uses_remaining bigint NOT NULL, revoked_at timestamptz)
            """,
            """
            CREATE TABLE worker (
                name text PRIMARY KEY, certificate_serial text NOT NULL UNIQUE, certificate_expires_at timestamptz NOT NULL,
                enrolled_at timestamptz NOT NULL, last_contact_at timestamptz, last_address text, revoked_at timestamptz,
                capabilities text, previous_serial text, renew_requested_at timestamptz, certificate_issuer text)
            """,
            "CREATE INDEX worker_previous_serial ON worker (previous_serial)",
            """
            CREATE TABLE enrollment (
                id bigserial PRIMARY KEY, worker text NOT NULL REFERENCES worker, token_hash text NOT NULL REFERENCES token,
                at timestamptz NOT NULL)
            """,
            """
            CREATE TABLE round (
                id text PRIMARY KEY, created_at timestamptz NOT NULL, state text NOT NULL, phase bigint NOT NULL,
                phase_started_at timestamptz NOT NULL, plan text NOT NULL, progress text NOT NULL, message text,
                ended_at timestamptz)
            """,
            """
            CREATE TABLE assignment (
                round text NOT NULL REFERENCES round, phase bigint NOT NULL, worker text NOT NULL REFERENCES worker,
                assigned_at timestamptz NOT NULL, dropped_at timestamptz, PRIMARY KEY (round, phase, worker))
            """,
            """
            CREATE TABLE report (
                round text NOT NULL REFERENCES round, phase bigint NOT NULL, worker text NOT NULL REFERENCES worker,
                upload_id text NOT NULL, blob text NOT NULL, bytes bigint NOT NULL, bytes_down bigint NOT NULL,
                samples bigint NOT NULL, accepted_at timestamptz NOT NULL, PRIMARY KEY (round, phase, worker))
            """,
            "CREATE TABLE dashboard_session (hash text PRIMARY KEY, expires_at timestamptz NOT NULL)",
        ]),
        (2, "round revisions, leases and shared blobs (coordinator replicas)", [
            "ALTER TABLE round ADD COLUMN revision bigint NOT NULL DEFAULT 0",
            "CREATE TABLE lease (name text PRIMARY KEY, holder text NOT NULL, expires_at timestamptz NOT NULL)",
            """
            CREATE TABLE blob (
                key text PRIMARY KEY, bytes bigint NOT NULL, chunks bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now())
            """,
            """
            CREATE TABLE blob_chunk (
                key text NOT NULL REFERENCES blob ON DELETE CASCADE, chunk bigint NOT NULL, data bytea NOT NULL,
                PRIMARY KEY (key, chunk))
            """,
        ]),
    ]

    /// The schema version this binary reads and writes.
    public static var schemaVersion: Int { migrations.last!.version }

    /// The key of the advisory lock migrations hold (any constant; "whittle" in ASCII).
    static let migrationLock: Int64 = 0x7768_6974_746c_65

    init(url: DatabaseURL, logger: Logger) throws {
        self.url = url
        self.logger = logger
        client = PostgresClient(configuration: try Self.configuration(url), backgroundLogger: logger)
        let client = client
        runner = Task { await client.run() }
    }

    deinit { runner.cancel() }

    /// Connects, and checks the schema is this binary's (`coordinator migrate` makes it so).
    public static func connect(_ url: DatabaseURL, logger: Logger) async throws -> PostgresStore {
        let store = try PostgresStore(url: url, logger: logger)
        do {
            try await store.probe()
            let version = try await store.schemaVersionInDatabase()
            if version < schemaVersion {
                throw StoreError(.schemaTooOld, "the database \(url) has schema version \(version), this coordinator needs \(schemaVersion): run coordinator migrate")
            }
            if version > schemaVersion {
                throw StoreError(.schemaTooNew, "the database \(url) has schema version \(version), newer than this coordinator's \(schemaVersion): upgrade this coordinator (an older one must not write a newer schema)")
            }
        } catch {
            store.close()
            throw error
        }
        return store
    }

    /// Brings the database's schema up to this binary's and returns the versions before and after; refuses a
    /// database newer than the binary. Concurrent migrations (two replicas' `coordinator migrate`) take turns.
    public static func migrate(_ url: DatabaseURL, logger: Logger) async throws -> (from: Int, to: Int) {
        let store = try PostgresStore(url: url, logger: logger)
        defer { store.close() }
        try await store.probe()
        return try await store.run("migrating") {
            try await store.client.withTransaction(logger: logger) { connection in
                try await connection.query("SELECT pg_advisory_xact_lock(\(Self.migrationLock))", logger: logger)
                try await connection.query("""
                    CREATE TABLE IF NOT EXISTS whittle_schema (
                        version bigint PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())
                    """, logger: logger)
                var from = 0
                for try await v in try await connection.query("SELECT coalesce(max(version), 0) FROM whittle_schema", logger: logger).decode(Int.self) {
                    from = v
                }
                guard from <= schemaVersion else {
                    throw StoreError(.schemaTooNew, "the database \(url) has schema version \(from), newer than this coordinator's \(schemaVersion): upgrade this coordinator")
                }
                for migration in migrations where migration.version > from {
                    for statement in migration.statements {
                        try await connection.query(PostgresQuery(unsafeSQL: statement), logger: logger)
                    }
                    try await connection.query("INSERT INTO whittle_schema (version, name) VALUES (\(migration.version), \(migration.name))",
                                                logger: logger)
                }
                return (from, schemaVersion)
            }
        }
    }

    /// The highest migration applied to the database (0: none).
    func schemaVersionInDatabase() async throws -> Int {
        try await run("reading the schema version") {
            let exists = try await one(Bool.self, "SELECT to_regclass('whittle_schema') IS NOT NULL") ?? false
            guard exists else { return 0 }
            return try await one(Int.self, "SELECT coalesce(max(version), 0) FROM whittle_schema") ?? 0
        }
    }

    /// Stops the pool; later calls fail.
    public func close() { runner.cancel() }

    /// The TLS settings `url` asks for (nil: sslmode=disable or a Unix socket).
    static func tls(_ url: DatabaseURL) throws -> TLSConfiguration? {
        guard url.socketDirectory == nil, url.tls != .disable else { return nil }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        switch url.tls {
        case .disable, .prefer: tls.certificateVerification = .none
        case .require: tls.certificateVerification = url.rootCertificate == nil ? .none : .noHostnameVerification
        case .verifyCA: tls.certificateVerification = .noHostnameVerification
        case .verifyFull: tls.certificateVerification = .fullVerification
        }
        if let root = url.rootCertificate {
            guard FileManager.default.isReadableFile(atPath: root) else {
                throw StoreError(.badDatabaseURL, "database_url: sslrootcert \(root) cannot be read")
            }
            tls.trustRoots = .file(root)
        }
        if let cert = url.clientCertificate, let key = url.clientKey {
            do {
                tls.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
                tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
            } catch {
                throw StoreError(.badDatabaseURL, "database_url: the client certificate \(cert) or key \(key) cannot be read: \(error)")
            }
        }
        return tls
    }

    static func socketPath(_ url: DatabaseURL) -> String? {
        url.socketDirectory.map { URL(fileURLWithPath: $0).appendingPathComponent(".s.PGSQL.\(url.port)").path }
    }

    static func configuration(_ url: DatabaseURL) throws -> PostgresClient.Configuration {
        var c: PostgresClient.Configuration
        if let path = socketPath(url) {
            c = .init(unixSocketPath: path, username: url.user, password: url.password, database: url.database)
        } else {
            let tls = try Self.tls(url)
            let mode: PostgresClient.Configuration.TLS = switch url.tls {
            case .disable: .disable
            case .prefer: .prefer(tls!)
            case .require, .verifyCA, .verifyFull: .require(tls!)
            }
            c = .init(host: url.host, port: url.port, username: url.user, password: url.password, database: url.database, tls: mode)
        }
        c.options.connectTimeout = .seconds(Int64(url.connectTimeoutSeconds))
        c.options.maximumConnections = url.poolSize
        c.options.additionalStartupParameters = [("application_name", "whittle-coordinator")]
        return c
    }

    /// Opens one connection outside the pool and closes it: the pool retries a failing connection until its circuit
    /// breaker trips, a minute later and without the cause, while this fails at once and says why (a wrong password,
    /// an unknown database, a certificate that does not verify).
    func probe() async throws {
        try await run("connecting") {
            let connection = try await PostgresConnection.connect(configuration: try connectionConfiguration(), id: 0, logger: logger)
            try await connection.close()
        }
    }

    /// One connection's configuration (outside the pool): the probe's, and the one that listens for announcements.
    func connectionConfiguration() throws -> PostgresConnection.Configuration {
        var c: PostgresConnection.Configuration
        if let path = Self.socketPath(url) {
            c = .init(unixSocketPath: path, username: url.user, password: url.password, database: url.database)
        } else {
            let mode: PostgresConnection.Configuration.TLS
            if let tls = try Self.tls(url) {
                let context = try NIOSSLContext(configuration: tls)
                mode = url.tls == .prefer ? .prefer(context) : .require(context)
            } else {
                mode = .disable
            }
            c = .init(host: url.host, port: url.port, username: url.user, password: url.password, database: url.database, tls: mode)
        }
        c.options.connectTimeout = .seconds(Int64(url.connectTimeoutSeconds))
        return c
    }

    /// Runs `body`, turning postgres-nio's deliberately vague errors into ones that say what failed (never the
    /// password: the URL is shown without it).
    func run<T>(_ what: String, _ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as StoreError {
            throw error
        } catch let error as PostgresTransactionError {
            if let inner = error.closureError ?? error.beginError ?? error.commitError {
                return try await run(what) { throw inner }
            }
            throw StoreError(.query, "PostgreSQL at \(url) failed a transaction while \(what)")
        } catch let error as PSQLError {
            if let info = error.serverInfo {
                let message = info[.message] ?? "error", state = info[.sqlState] ?? "?"
                let detail = info[.detail].map { " (\($0))" } ?? ""
                let code: StoreError.Code = state.hasPrefix("28") || state == "3D000" ? .unavailable : .query
                throw StoreError(code, "PostgreSQL at \(url) refused \(what): \(message)\(detail) [SQLSTATE \(state)]")
            }
            let cause = error.underlying.map { ": \($0)" } ?? ""
            throw StoreError(.unavailable, "PostgreSQL at \(url) cannot be reached while \(what) (\(error.code))\(cause)")
        } catch is CancellationError {
            throw CancellationError()
        } catch let error where String(describing: type(of: error)) == "ConnectionPoolError" {
            throw StoreError(.unavailable, "PostgreSQL at \(url) cannot be reached while \(what): the connection pool could not open a connection (\(error))")
        } catch {
            throw StoreError(.unavailable, "PostgreSQL at \(url) failed while \(what): \(error)")
        }
    }

    func one<T: PostgresDecodable>(_ type: T.Type, _ query: PostgresQuery) async throws -> T? {
        for try await v in try await client.query(query, logger: logger).decode(T.self) { return v }
        return nil
    }

    func all<T>(_ query: PostgresQuery, _ decode: (PostgresRow) throws -> T) async throws -> [T] {
        var out: [T] = []
        for try await row in try await client.query(query, logger: logger) { out.append(try decode(row)) }
        return out
    }

    /// Whether the pooled connection this runs on is encrypted (pg_stat_ssl): for tests and `coordinator migrate`.
    package func connectionIsEncrypted() async throws -> Bool {
        try await run("reading the connection's TLS state") {
            try await one(Bool.self, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") ?? false
        }
    }

    /// The role this store logged in as.
    package func currentUser() async throws -> String {
        try await run("reading the current user") { try await one(String.self, "SELECT current_user::text") ?? "" }
    }

    // MARK: Records

    static let workerColumns = """
        name, certificate_serial, certificate_expires_at, enrolled_at, last_contact_at, last_address, revoked_at, \
        capabilities, previous_serial, renew_requested_at, certificate_issuer
        """

    static func worker(_ row: PostgresRow) throws -> WorkerRecord {
        let (name, serial, expires, enrolled, contact, address, revoked, capabilities, previous, renew, issuer) = try row.decode(
            (String, String, Date, Date, Date?, String?, Date?, String?, String?, Date?, String?).self)
        var w = WorkerRecord(name: name, certificateSerial: serial, certificateExpiresAt: expires, enrolledAt: enrolled, certificateIssuer: issuer)
        w.lastContactAt = contact
        w.lastAddress = address
        w.revokedAt = revoked
        w.capabilities = capabilities
        w.previousSerial = previous
        w.renewRequestedAt = renew
        return w
    }

    static func token(_ row: PostgresRow) throws -> TokenRecord {
        let (hash, created, expires, allowed, remaining, revoked) = try row.decode((String, Date, Date, Int, Int, Date?).self)
        var t = TokenRecord(hash: hash, createdAt: created, expiresAt: expires, uses: allowed)
        t.usesRemaining = remaining
        t.revokedAt = revoked
        return t
    }

    static let roundColumns = "id, created_at, state, phase, phase_started_at, plan, progress, message, ended_at, revision"

    static func round(_ row: PostgresRow) throws -> RoundRecord {
        let (id, created, state, phase, started, plan, progress, message, ended, revision) = try row.decode(
            (String, Date, String, Int, Date, String, String, String?, Date?, Int).self)
        var r = RoundRecord(id: id, createdAt: created, plan: plan, progress: progress)
        r.state = state
        r.phase = phase
        r.phaseStartedAt = started
        r.message = message
        r.endedAt = ended
        r.revision = revision
        return r
    }

    static func assignment(_ row: PostgresRow) throws -> AssignmentRecord {
        let (round, phase, worker, assigned, dropped) = try row.decode((String, Int, String, Date, Date?).self)
        var a = AssignmentRecord(round: round, phase: phase, worker: worker, assignedAt: assigned)
        a.droppedAt = dropped
        return a
    }

    static let reportColumns = "round, phase, worker, upload_id, blob, bytes, bytes_down, samples, accepted_at"

    static func report(_ row: PostgresRow) throws -> ReportRecord {
        let (round, phase, worker, upload, blob, bytes, down, samples, accepted) = try row.decode(
            (String, Int, String, String, String, Int, Int, Int, Date).self)
        return ReportRecord(round: round, phase: phase, worker: worker, uploadID: upload, blob: blob, bytes: bytes, bytesDown: down,
                            samples: samples, acceptedAt: accepted)
    }

    // MARK: Tokens and workers

    public func addToken(_ t: TokenRecord) async throws {
        try await run("adding a token") {
            try await client.query("""
                INSERT INTO token (hash, created_at, expires_at, uses_allowed, uses_remaining, revoked_at)
                VALUES (\(t.hash), \(t.createdAt), \(t.expiresAt), \(t.usesAllowed), \(t.usesRemaining), \(t.revokedAt))
                """, logger: logger)
        }
    }

    public func token(hash: String) async throws -> TokenRecord? {
        try await run("reading a token") {
            try await all("SELECT hash, created_at, expires_at, uses_allowed, uses_remaining, revoked_at FROM token WHERE hash = \(hash)",
                          Self.token).first
        }
    }

    public func tokens() async throws -> [TokenRecord] {
        try await run("listing tokens") {
            try await all("SELECT hash, created_at, expires_at, uses_allowed, uses_remaining, revoked_at FROM token ORDER BY created_at DESC, hash DESC",
                          Self.token)
        }
    }

    public func revokeToken(hash: String, at: Date) async throws -> Bool {
        try await run("revoking a token") {
            let found = try await all("UPDATE token SET revoked_at = coalesce(revoked_at, \(at)) WHERE hash = \(hash) RETURNING hash") {
                try $0.decode(String.self)
            }
            return !found.isEmpty
        }
    }

    public func enroll(tokenHash: String, worker w: WorkerRecord, now: Date) async throws -> EnrollmentOutcome {
        let logger = logger
        return try await run("enrolling a worker") {
            try await client.withTransaction(logger: logger) { connection -> EnrollmentOutcome in
                // The token's row is locked until the commit: concurrent enrollments take its uses one at a time.
                var token: TokenRecord?
                for try await row in try await connection.query("""
                    SELECT hash, created_at, expires_at, uses_allowed, uses_remaining, revoked_at FROM token
                    WHERE hash = \(tokenHash) FOR UPDATE
                    """, logger: logger) { token = try Self.token(row) }
                guard let token else { return .unknownToken }
                guard token.expiresAt > now else { return .expiredToken }
                guard token.revokedAt == nil else { return .revokedToken }
                guard token.usesRemaining > 0 else { return .exhaustedToken }
                var inserted = false
                for try await _ in try await connection.query("""
                    INSERT INTO worker (\(unescaped: Self.workerColumns))
                    VALUES (\(w.name), \(w.certificateSerial), \(w.certificateExpiresAt), \(w.enrolledAt), \(w.lastContactAt),
                            \(w.lastAddress), \(w.revokedAt), \(w.capabilities), \(w.previousSerial), \(w.renewRequestedAt),
                            \(w.certificateIssuer))
                    ON CONFLICT (name) DO NOTHING RETURNING name
                    """, logger: logger) { inserted = true }
                guard inserted else { return .nameTaken }
                try await connection.query("UPDATE token SET uses_remaining = uses_remaining - 1 WHERE hash = \(tokenHash)", logger: logger)
                try await connection.query("INSERT INTO enrollment (worker, token_hash, at) VALUES (\(w.name), \(tokenHash), \(now))",
                                           logger: logger)
                return .enrolled(w)
            }
        }
    }

    public func worker(named name: String) async throws -> WorkerRecord? {
        try await run("reading a worker") {
            try await all("SELECT \(unescaped: Self.workerColumns) FROM worker WHERE name = \(name)", Self.worker).first
        }
    }

    public func worker(serial: String) async throws -> WorkerRecord? {
        try await run("finding a worker by certificate") {
            for try await w in try await client.execute(WorkerBySerial(serial: serial), logger: logger) { return w }
            return nil
        }
    }

    // Every worker request and every heartbeat runs these two: prepared once per pooled connection, so PostgreSQL
    // plans them once instead of at every call (planning cost several times their execution).

    struct WorkerBySerial: PostgresPreparedStatement {
        static let sql = "SELECT \(PostgresStore.workerColumns) FROM worker WHERE certificate_serial = $1 OR previous_serial = $1 LIMIT 1"
        typealias Row = WorkerRecord
        let serial: String
        func makeBindings() throws -> PostgresBindings {
            var b = PostgresBindings()
            b.append(serial)
            return b
        }
        func decodeRow(_ row: PostgresRow) throws -> WorkerRecord { try PostgresStore.worker(row) }
    }

    struct RecordContact: PostgresPreparedStatement {
        static let sql = """
            UPDATE worker SET last_contact_at = $2, last_address = $3, capabilities = coalesce($4, capabilities)
            WHERE name = $1 RETURNING \(PostgresStore.workerColumns)
            """
        typealias Row = WorkerRecord
        let name: String, at: Date, address: String?, capabilities: String?
        func makeBindings() throws -> PostgresBindings {
            var b = PostgresBindings()
            b.append(name)
            b.append(at)
            b.append(address)
            b.append(capabilities)
            return b
        }
        func decodeRow(_ row: PostgresRow) throws -> WorkerRecord { try PostgresStore.worker(row) }
    }

    public func workers() async throws -> [WorkerRecord] {
        try await run("listing workers") { try await all("SELECT \(unescaped: Self.workerColumns) FROM worker ORDER BY name", Self.worker) }
    }

    public func revoke(name: String, at: Date) async throws -> Bool {
        try await run("revoking a worker") {
            try await !all("UPDATE worker SET revoked_at = coalesce(revoked_at, \(at)) WHERE name = \(name) RETURNING name") {
                try $0.decode(String.self)
            }.isEmpty
        }
    }

    @discardableResult
    public func recordContact(name: String, at: Date, address: String?, capabilities: String?) async throws -> WorkerRecord? {
        try await run("recording a contact") {
            for try await w in try await client.execute(RecordContact(name: name, at: at, address: address, capabilities: capabilities),
                                                        logger: logger) { return w }
            return nil
        }
    }

    public func ping() async throws {
        _ = try await run("answering a ping") { try await one(Int.self, "SELECT 1") }
    }

    public func renewCertificate(name: String, presentedSerial: String, newSerial: String, expiresAt: Date, issuer: String?) async throws -> WorkerRecord? {
        let previous: String? = presentedSerial == newSerial ? nil : presentedSerial
        return try await run("recording a renewed certificate") {
            try await all("""
                UPDATE worker SET previous_serial = \(previous), certificate_serial = \(newSerial), certificate_expires_at = \(expiresAt),
                    certificate_issuer = \(issuer), renew_requested_at = NULL
                WHERE name = \(name) RETURNING \(unescaped: Self.workerColumns)
                """, Self.worker).first
        }
    }

    public func confirmRenewal(name: String) async throws {
        try await run("confirming a renewal") {
            try await client.query("UPDATE worker SET previous_serial = NULL WHERE name = \(name)", logger: logger)
        }
    }

    public func requestRenewal(name: String, at: Date) async throws -> Bool {
        try await run("requesting a renewal") {
            try await !all("UPDATE worker SET renew_requested_at = \(at) WHERE name = \(name) RETURNING name") { try $0.decode(String.self) }.isEmpty
        }
    }

    // MARK: Dashboard sessions

    public func addDashboardSession(hash: String, expiresAt: Date) async throws {
        try await run("adding a dashboard session") {
            try await client.query("""
                INSERT INTO dashboard_session (hash, expires_at) VALUES (\(hash), \(expiresAt))
                ON CONFLICT (hash) DO UPDATE SET expires_at = excluded.expires_at
                """, logger: logger)
        }
    }

    public func dashboardSession(hash: String) async throws -> Date? {
        try await run("reading a dashboard session") { try await one(Date.self, "SELECT expires_at FROM dashboard_session WHERE hash = \(hash)") }
    }

    public func removeDashboardSessions(expiredBefore now: Date) async throws {
        try await run("removing expired dashboard sessions") {
            try await client.query("DELETE FROM dashboard_session WHERE expires_at < \(now)", logger: logger)
        }
    }

    // MARK: Rounds

    public func addRound(_ r: RoundRecord) async throws {
        try await run("adding a round") {
            try await client.query("""
                INSERT INTO round (\(unescaped: Self.roundColumns))
                VALUES (\(r.id), \(r.createdAt), \(r.state), \(r.phase), \(r.phaseStartedAt), \(r.plan), \(r.progress), \(r.message), \(r.endedAt),
                        \(r.revision))
                """, logger: logger)
        }
    }

    public func round(id: String) async throws -> RoundRecord? {
        try await run("reading a round") { try await all("SELECT \(unescaped: Self.roundColumns) FROM round WHERE id = \(id)", Self.round).first }
    }

    public func rounds() async throws -> [RoundRecord] {
        try await run("listing rounds") {
            try await all("SELECT \(unescaped: Self.roundColumns) FROM round ORDER BY created_at DESC, id DESC", Self.round)
        }
    }

    public func runningRounds() async throws -> [RoundRecord] {
        try await run("listing running rounds") {
            try await all("SELECT \(unescaped: Self.roundColumns) FROM round WHERE state = 'running' ORDER BY created_at DESC, id DESC", Self.round)
        }
    }

    public func updateRound(_ r: RoundRecord) async throws {
        try await run("updating a round") {
            let written = try await all("""
                UPDATE round SET created_at = \(r.createdAt), state = \(r.state), phase = \(r.phase), phase_started_at = \(r.phaseStartedAt),
                    plan = \(r.plan), progress = \(r.progress), message = \(r.message), ended_at = \(r.endedAt), revision = revision + 1
                WHERE id = \(r.id) AND revision = \(r.revision) RETURNING id
                """) { try $0.decode(String.self) }
            guard !written.isEmpty else { throw StoreError.roundConflict(r.id) }
        }
    }

    public func assign(_ a: AssignmentRecord) async throws -> Bool {
        try await run("recording an assignment") {
            try await !all("""
                INSERT INTO assignment (round, phase, worker, assigned_at, dropped_at)
                VALUES (\(a.round), \(a.phase), \(a.worker), \(a.assignedAt), \(a.droppedAt))
                ON CONFLICT DO NOTHING RETURNING worker
                """) { try $0.decode(String.self) }.isEmpty
        }
    }

    public func assignments(round: String, phase: Int) async throws -> [AssignmentRecord] {
        try await run("listing assignments") {
            try await all("""
                SELECT round, phase, worker, assigned_at, dropped_at FROM assignment WHERE round = \(round) AND phase = \(phase)
                ORDER BY assigned_at, worker
                """, Self.assignment)
        }
    }

    public func dropAssignment(round: String, phase: Int, worker: String, at: Date) async throws {
        try await run("dropping an assignment") {
            try await client.query("""
                UPDATE assignment SET dropped_at = \(at)
                WHERE round = \(round) AND phase = \(phase) AND worker = \(worker) AND dropped_at IS NULL
                """, logger: logger)
        }
    }

    public func addReport(_ r: ReportRecord) async throws -> Bool {
        try await run("recording a report") {
            let known = try await one(Int.self, "SELECT count(*)::bigint FROM report WHERE round = \(r.round) AND phase = \(r.phase) AND worker = \(r.worker)") ?? 0
            guard known == 0 else { return false }
            return try await client.withTransaction(logger: logger) { connection in
                // The round's row stays locked until the commit: a replica closing the phase waits for this report,
                // then finds the revision moved on and reads the phase's reports again.
                var moved = false
                for try await _ in try await connection.query("""
                    UPDATE round SET revision = revision + 1 WHERE id = \(r.round) AND phase = \(r.phase) AND state = 'running' RETURNING id
                    """, logger: logger) { moved = true }
                guard moved else { throw StoreError.phaseClosed(r) }
                var inserted = false
                for try await _ in try await connection.query("""
                    INSERT INTO report (\(unescaped: Self.reportColumns))
                    VALUES (\(r.round), \(r.phase), \(r.worker), \(r.uploadID), \(r.blob), \(r.bytes), \(r.bytesDown), \(r.samples), \(r.acceptedAt))
                    ON CONFLICT DO NOTHING RETURNING worker
                    """, logger: logger) { inserted = true }
                return inserted
            }
        }
    }

    public func reports(round: String, phase: Int) async throws -> [ReportRecord] {
        try await run("listing reports") {
            try await all("SELECT \(unescaped: Self.reportColumns) FROM report WHERE round = \(round) AND phase = \(phase) ORDER BY accepted_at, worker",
                          Self.report)
        }
    }

    public func reports(round: String) async throws -> [ReportRecord] {
        try await run("listing reports") {
            try await all("SELECT \(unescaped: Self.reportColumns) FROM report WHERE round = \(round) ORDER BY accepted_at, worker", Self.report)
        }
    }

    // MARK: Leases and announcements

    public func claimLease(_ name: String, holder: String, now: Date, expiresAt: Date) async throws -> LeaseRecord {
        try await run("claiming a lease") {
            let taken = try await all("""
                INSERT INTO lease (name, holder, expires_at) VALUES (\(name), \(holder), \(expiresAt))
                ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                WHERE lease.holder = EXCLUDED.holder OR lease.expires_at <= \(now)
                RETURNING name, holder, expires_at
                """, Self.lease)
            if let lease = taken.first { return lease }
            if let lease = try await all("SELECT name, holder, expires_at FROM lease WHERE name = \(name)", Self.lease).first { return lease }
            // Released between the two statements: claim it again.
            return try await claimLease(name, holder: holder, now: now, expiresAt: expiresAt)
        }
    }

    public func releaseLease(_ name: String, holder: String) async throws {
        try await run("releasing a lease") {
            try await client.query("DELETE FROM lease WHERE name = \(name) AND holder = \(holder)", logger: logger)
        }
    }

    public func lease(_ name: String) async throws -> LeaseRecord? {
        try await run("reading a lease") { try await all("SELECT name, holder, expires_at FROM lease WHERE name = \(name)", Self.lease).first }
    }

    static func lease(_ row: PostgresRow) throws -> LeaseRecord {
        let (name, holder, expires) = try row.decode((String, String, Date).self)
        return LeaseRecord(name: name, holder: holder, expiresAt: expires)
    }

    /// The channel replicas announce round changes on.
    static let channel = "whittle_rounds"

    public func announceRoundsChanged() async throws {
        try await run("announcing a round change") {
            try await client.query("SELECT pg_notify(\(Self.channel), '')", logger: logger)
        }
    }

    /// One connection outside the pool listens (LISTEN) for announcements, reconnecting after a second when it is
    /// lost; each (re)connection yields once, since announcements may have been missed meanwhile.
    public func roundsChanged() -> AsyncStream<Void>? {
        let configuration: PostgresConnection.Configuration
        do {
            configuration = try connectionConfiguration()
        } catch {
            logger.error("cannot listen for round announcements", metadata: ["error": "\(error)"])
            return nil
        }
        let (stream, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let logger = logger, url = url
        let task = Task {
            var id = 1
            while !Task.isCancelled {
                do {
                    let connection = try await PostgresConnection.connect(configuration: configuration, id: id, logger: logger)
                    id += 1
                    try await connection.listen(on: Self.channel) { notifications in
                        continuation.yield()
                        for try await _ in notifications { continuation.yield() }
                    }
                    try? await connection.close()
                } catch is CancellationError {
                    break
                } catch {
                    if Task.isCancelled { break }
                    logger.warning("listening for round announcements failed; retrying", metadata: ["database.url": "\(url)", "error": "\(error)"])
                }
                try? await Task.sleep(for: .seconds(1))
            }
            continuation.finish()
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }
}
