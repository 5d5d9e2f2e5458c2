import Foundation
import Testing
import WhittleStore
import WhittleTestSupport

/// What only the PostgreSQL store has: a versioned schema applied by `migrate`, connections over TLS with the
/// server verified, password and client-certificate logins, and errors that say what failed.
@Suite struct PostgresStoreTests {
    static let now = Date(timeIntervalSince1970: 1_800_000_000)

    @Test func theSchemaIsMigratedOnceAndANewerOneIsRefused() async throws {
        let url = try StoreKind.postgresDatabase()
        await #expect(throws: StoreError(.schemaTooOld, "the database \(url) has schema version 0, this coordinator needs \(PostgresStore.schemaVersion): run coordinator migrate")) {
            _ = try await PostgresStore.connect(url, logger: StoreKind.quiet)
        }
        // Two replicas' migrations at once take turns: one applies everything, the other nothing.
        async let first = PostgresStore.migrate(url, logger: StoreKind.quiet)
        async let second = PostgresStore.migrate(url, logger: StoreKind.quiet)
        let outcomes = try await [first, second].map { "\($0.from)→\($0.to)" }.sorted()
        let v = PostgresStore.schemaVersion
        #expect(outcomes == ["0→\(v)", "\(v)→\(v)"])

        let store = try await PostgresStore.connect(url, logger: StoreKind.quiet)
        try await store.addToken(TokenRecord(hash: "t", createdAt: Self.now, expiresAt: Self.now.addingTimeInterval(60), uses: 1))
        _ = try await store.enroll(tokenHash: "t", worker: StoreTests.worker("a"), now: Self.now)
        store.close()
        // State survives a new connection (another replica).
        let other = try await PostgresStore.connect(url, logger: StoreKind.quiet)
        #expect(try await other.worker(named: "a") == StoreTests.worker("a"))
        other.close()

        // A newer coordinator migrated the database: this one neither connects nor migrates it.
        let (cluster, name) = (try TestPostgres.cluster.get(), url.database)
        try TestPostgres.psql(cluster, database: name, "INSERT INTO whittle_schema (version, name) VALUES (\(v + 1), 'from the future')")
        await #expect(throws: StoreError.self) { _ = try await PostgresStore.connect(url, logger: StoreKind.quiet) }
        do {
            _ = try await PostgresStore.migrate(url, logger: StoreKind.quiet)
            Issue.record("migrated a newer schema")
        } catch let error as StoreError {
            #expect(error.code == .schemaTooNew && error.message.contains("upgrade this coordinator"))
        }
    }

    /// sslmode=verify-full against the test CA: the connection is encrypted (pg_stat_ssl says so); a root that
    /// did not sign the server's certificate is refused; the client certificate logs in the role it names.
    @Test func tlsToTheDatabaseIsVerified() async throws {
        let (cluster, name) = try TestPostgres.makeDatabase()
        let base = "postgresql://whittle@localhost:\(cluster.port)/\(name)"
        let verified = try DatabaseURL("\(base)?sslmode=verify-full&sslrootcert=\(cluster.ca)")
        _ = try await PostgresStore.migrate(verified, logger: StoreKind.quiet)
        let store = try await PostgresStore.connect(verified, logger: StoreKind.quiet)
        #expect(try await store.connectionIsEncrypted())
        try await store.ping()
        store.close()

        let plain = try await PostgresStore.connect(try DatabaseURL("\(base)?sslmode=disable"), logger: StoreKind.quiet)
        #expect(try await !plain.connectionIsEncrypted())
        plain.close()

        // The client certificate is no CA: as a root it verifies nothing.
        let wrongRoot = try DatabaseURL("\(base)?sslmode=verify-full&sslrootcert=\(cluster.clientCertificate)&connect_timeout=5")
        do {
            _ = try await PostgresStore.connect(wrongRoot, logger: StoreKind.quiet)
            Issue.record("connected with a root that did not sign the server's certificate")
        } catch let error as StoreError {
            #expect(error.code == .unavailable && error.message.contains("localhost:\(cluster.port)"), "\(error)")
        }

        // The whittle_cert role logs in only with its certificate; it migrates a database of its own.
        let (_, own) = try TestPostgres.makeDatabase()
        let certificate = try DatabaseURL("postgresql://whittle_cert@localhost:\(cluster.port)/\(own)?sslmode=verify-full&sslrootcert=\(cluster.ca)&sslcert=\(cluster.clientCertificate)&sslkey=\(cluster.clientKey)")
        _ = try await PostgresStore.migrate(certificate, logger: StoreKind.quiet)
        let byCertificate = try await PostgresStore.connect(certificate, logger: StoreKind.quiet)
        #expect(try await byCertificate.currentUser() == "whittle_cert")
        byCertificate.close()
    }

    @Test func passwordLoginsAndRefusalsNameNoSecret() async throws {
        let (cluster, name) = try TestPostgres.makeDatabase()
        let good = try DatabaseURL("postgresql://whittle_pw:whittle-test-password@127.0.0.1:\(cluster.port)/\(name)?sslmode=disable", environment: [:])
        _ = try await PostgresStore.migrate(good, logger: StoreKind.quiet)
        let store = try await PostgresStore.connect(good, logger: StoreKind.quiet)
        #expect(try await store.currentUser() == "whittle_pw")
        store.close()
        // From PGPASSWORD when the URL has none.
        let fromEnvironment = try DatabaseURL("postgresql://whittle_pw@127.0.0.1:\(cluster.port)/\(name)?sslmode=disable",
                                              environment: ["PGPASSWORD": "whittle-test-password"])
        try await PostgresStore.connect(fromEnvironment, logger: StoreKind.quiet).close()

        let bad = try DatabaseURL("postgresql://whittle_pw:not-the-password-42@127.0.0.1:\(cluster.port)/\(name)?sslmode=disable", environment: [:])
        do {
            _ = try await PostgresStore.connect(bad, logger: StoreKind.quiet)
            Issue.record("logged in with a wrong password")
        } catch let error as StoreError {
            #expect(error.code == .unavailable, "\(error)")
            #expect(error.message.contains("password authentication failed"), "\(error)")
            #expect(!error.message.contains("not-the-password-42"))
        }
    }

    @Test func anUnreachableServerIsAClearError() async throws {
        let port = try TestPostgres.cluster.get().port
        // A port nobody listens on: the cluster's, plus one, refused at once on loopback.
        let url = try DatabaseURL("postgresql://whittle@127.0.0.1:\(port == 65535 ? port - 1 : port + 1)/whittle?sslmode=disable&connect_timeout=3")
        do {
            _ = try await PostgresStore.connect(url, logger: StoreKind.quiet)
            Issue.record("connected to nothing")
        } catch let error as StoreError {
            #expect(error.code == .unavailable && error.message.contains("cannot be reached"), "\(error)")
        }
        let missing = try DatabaseURL("postgresql://whittle@127.0.0.1:\(port)/no_such_database?sslmode=disable")
        do {
            _ = try await PostgresStore.connect(missing, logger: StoreKind.quiet)
            Issue.record("connected to a missing database")
        } catch let error as StoreError {
            #expect(error.code == .unavailable && error.message.contains("no_such_database"), "\(error)")
        }
    }
}

@Suite struct DatabaseURLTests {
    @Test func urlsAreReadAsLibpqReadsThem() throws {
        let u = try DatabaseURL("postgresql://co%40ord:p%3Ass@db.example:6543/whittle?sslmode=verify-full&sslrootcert=/etc/ca.pem&pool_size=32",
                                environment: [:])
        #expect(u.user == "co@ord" && u.password == "p:ss" && u.host == "db.example" && u.port == 6543 && u.database == "whittle")
        #expect(u.tls == .verifyFull && u.rootCertificate == "/etc/ca.pem" && u.poolSize == 32)
        #expect(u.description == "postgresql://co@ord@db.example:6543/whittle?sslmode=verify-full", "no password")
        let v6 = try DatabaseURL("postgres://w@[::1]/d", environment: ["PGPASSWORD": "env"])
        #expect(v6.host == "::1" && v6.port == 5432 && v6.password == "env" && v6.tls == .prefer)
        let socket = try DatabaseURL("postgresql://w@/d?host=/run/postgresql", environment: [:])
        #expect(socket.socketDirectory == "/run/postgresql" && socket.password == nil)
    }

    @Test(arguments: [
        ("mysql://u@h/d", "must start with postgresql://"),
        ("postgresql://u@h", "names no database"),
        ("postgresql://u@h:5432/", "names no database"),
        ("postgresql://@h/d", "names no user"),
        ("postgresql://u@h:99999/d", "is not a port"),
        ("postgresql://u@h/d?sslmode=always", "sslmode must be one of"),
        ("postgresql://u@h/d?pool_size=0", "pool_size must be"),
        ("postgresql://u@h/d?sslcert=/c.pem", "sslcert and sslkey go together"),
        ("postgresql://u@h/d?application=x", "unknown parameter 'application'"),
        ("postgresql://u@h/d?sslmode", "is not NAME=VALUE"),
        ("postgresql://u@h/d?sslmode=disable&sslrootcert=/ca.pem", "sslmode=disable with TLS files"),
    ])
    func malformedURLsAreRefusedClearly(_ text: String, _ expected: String) {
        do {
            _ = try DatabaseURL(text, environment: [:])
            Issue.record("accepted \(text)")
        } catch let error as StoreError {
            #expect(error.code == .badDatabaseURL && error.message.contains(expected), "\(error)")
        } catch {
            Issue.record("\(error)")
        }
    }
}
