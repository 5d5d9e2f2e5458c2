import ArgumentParser
import Foundation
import WhittleServer
#if canImport(Glibc)
import Glibc
#endif
import Logging
import WhittleCLI
import WhittleIO
import WhittleHTTPClient
import WhittlePKI
import WhittleStore

/// `coordinator init`: creates the data directory.
public struct InitCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Create a coordinator data directory: CA, server and admin certificates, configuration, database.",
        discussion: """
            The CA is P-256, made here unless --ca-cert and --ca-key give an operator's own. Key files are \
            created with mode 0600. An existing directory with content is never overwritten. With --database-url \
            the state lives in PostgreSQL, whose schema is created here; replicas are copies of this directory \
            (docs/operations.md, "The database: SQLite or PostgreSQL").
            """)

    @Option(name: .long, help: "The data directory to create.") var dir: String
    @Option(name: .long, parsing: .upToNextOption, help: "Host names and IP addresses the server certificate is valid for.")
    var hostname: [String] = ["localhost", "127.0.0.1", "::1"]
    @Option(name: .long, help: "An existing CA certificate (PEM) to use instead of making one.") var caCert: String?
    @Option(name: .long, help: "The private key (PEM, P-256) of --ca-cert.") var caKey: String?
    @Option(name: .long, help: "Address and port serve listens on.") var listen: String = "127.0.0.1:8443"
    @Option(name: .long, help: "A PostgreSQL database for the coordinator's state, postgresql://USER@HOST:PORT/DB[?sslmode=verify-full&sslrootcert=CA.pem] (database_url; default: the embedded SQLite file).")
    var databaseURL: String?
    @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

    public init() {}

    public func validate() throws {
        guard (caCert == nil) == (caKey == nil) else { throw ValidationError("--ca-cert and --ca-key go together") }
        if let databaseURL {
            do { _ = try DatabaseURL(databaseURL) } catch let error as StoreError { throw ValidationError(error.message) }
        }
        guard !hostname.isEmpty else { throw ValidationError("give at least one --hostname") }
        _ = try CoordinatorConfig.hostPort(listen)
    }

    struct Report: Encodable {
        var directory: String
        var caFingerprint: String
        var serverNames: [String]
        var adminSerial: String
        var listen: String
        var database: String
    }

    public func run() async throws {
        let layout = CoordinatorLayout(dir)
        let fm = FileManager.default
        if let contents = try? fm.contentsOfDirectory(atPath: dir), !contents.isEmpty {
            throw CLIError("\(dir) already exists and is not empty; coordinator init never overwrites a data directory")
        }
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        guard chmod(dir, 0o700) == 0 else { throw CLIError("cannot restrict \(dir) to its owner (chmod 0700)") }
        let ca: Identity
        if let caCert, let caKey {
            ca = try Identity(certificatePEM: try String(contentsOfFile: caCert, encoding: .utf8),
                              privateKeyPEM: try String(contentsOfFile: caKey, encoding: .utf8))
        } else {
            ca = try PKI.makeCA()
        }
        let server = try PKI.makeServerCertificate(ca: ca, hosts: hostname)
        let admin = try PKI.makeClientIdentity(ca: ca, commonName: PKI.adminCommonName)
        try Files.writeNew(ca.certificatePEM, to: layout.caCertificate, mode: 0o644)
        try Files.writeNew(ca.privateKeyPEM, to: layout.caKey, mode: 0o600)
        try Files.writeNew(server.certificatePEM, to: layout.serverCertificate, mode: 0o644)
        try Files.writeNew(server.privateKeyPEM, to: layout.serverKey, mode: 0o600)
        try Files.writeNew(admin.certificatePEM, to: layout.adminCertificate, mode: 0o644)
        try Files.writeNew(admin.privateKeyPEM, to: layout.adminKey, mode: 0o600)
        var config = CoordinatorConfig()
        config.listen = listen
        config.adminSerial = PKI.serial(admin.certificate)
        config.databaseURL = databaseURL ?? ""
        // The settings may hold the database's password: readable by the owner only then.
        try Files.writeNew(config.text, to: layout.config, mode: databaseURL == nil ? 0o644 : 0o600)
        let migrated = try await CoordinatorServer.migrateStore(layout: layout, config: config, logger: Logger(label: "whittle.coordinator"))
        let report = Report(directory: dir, caFingerprint: try PKI.fingerprint(ca.certificate), serverNames: hostname,
                            adminSerial: config.adminSerial, listen: listen, database: migrated.database)
        if json {
            try printJSON(report)
        } else {
            print("created \(dir)")
            print("CA fingerprint (SHA-256): \(report.caFingerprint)")
            print("server certificate for: \(hostname.joined(separator: ", "))")
            print("database: \(migrated.database) (schema version \(migrated.to))")
            print("start it with: coordinator serve --dir \(dir)")
        }
    }
}

/// `coordinator server-certificate`: a new server certificate (and key) from the data directory's CA, for new host
/// names or before the old one expires. Workers trust the CA, not the certificate, so nothing changes for them;
/// `serve` reads the files when it starts: restart it.
public struct ServerCertificateCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "server-certificate",
        abstract: "Issue a new server certificate from the coordinator's CA (restart serve to use it).")

    @Option(name: .long, help: "The coordinator's data directory.") var dir: String
    @Option(name: .long, parsing: .upToNextOption, help: "Host names and IP addresses the server certificate is valid for.")
    var hostname: [String] = ["localhost", "127.0.0.1", "::1"]
    @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

    public init() {}

    public func validate() throws {
        guard !hostname.isEmpty else { throw ValidationError("give at least one --hostname") }
    }

    public func run() throws {
        let (layout, _) = try loadConfig(dir)
        let read = { (path: String) throws -> String in
            do { return try String(contentsOfFile: path, encoding: .utf8) } catch { throw CLIError("cannot read \(path)") }
        }
        let ca = try Identity(certificatePEM: try read(layout.caCertificate), privateKeyPEM: try read(layout.caKey))
        let server = try PKI.makeServerCertificate(ca: ca, hosts: hostname)
        // Key first: a crash between the two writes leaves the old certificate with a key it does not match, which
        // serve refuses at start; running the command again repairs it.
        try Files.writeDurably(Array(server.privateKeyPEM.utf8), to: layout.serverKey, mode: 0o600)
        try Files.writeDurably(Array(server.certificatePEM.utf8), to: layout.serverCertificate, mode: 0o644)
        let report = ["serial": PKI.serial(server.certificate), "expiresAt": ISO8601DateFormatter().string(from: server.certificate.notValidAfter),
                      "names": hostname.joined(separator: ",")]
        if json {
            try printJSON(report)
        } else {
            print("new server certificate \(report["serial"]!) for \(hostname.joined(separator: ", ")), valid until \(report["expiresAt"]!)")
            print("restart coordinator serve to use it; workers keep trusting the same CA")
        }
    }
}

/// Loads the configuration of a data directory.
/// The data directory's settings, overridden by `WHITTLE_KEY` environment variables and then `settings`
/// (`KEY=VALUE`, from `--set`).
func loadConfig(_ dir: String, settings: [String] = []) throws -> (CoordinatorLayout, CoordinatorConfig) {
    let layout = CoordinatorLayout(dir)
    guard FileManager.default.fileExists(atPath: layout.config) else {
        throw CLIError("\(dir) is not a coordinator data directory (no coordinator.conf); create one with coordinator init --dir \(dir)")
    }
    var config: CoordinatorConfig
    do {
        config = try CoordinatorConfig.parse(try String(contentsOfFile: layout.config, encoding: .utf8))
    } catch let error as ServerError {
        throw error.within(layout.config)
    }
    try config.override(environment: ProcessInfo.processInfo.environment, settings: settings)
    return (layout, config)
}

/// `coordinator serve`.
public struct ServeCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the coordinator's HTTPS server (TLS 1.2+, mutual TLS for workers and admins) until SIGTERM/SIGINT.")

    @Option(name: .long, help: "The data directory made by coordinator init.") var dir: String
    @Option(name: .long, help: "HOST:PORT to listen on (port 0: any free port, written to DIR/listening).") var listen: String?
    @Option(name: .long, parsing: .singleValue,
            help: "Override a coordinator.conf setting, KEY=VALUE (repeatable; also WHITTLE_KEY in the environment, e.g. WHITTLE_HEARTBEAT_SECONDS).")
    var set: [String] = []
    @Option(name: .long, help: "Log lines as text or json (default: WHITTLE_LOG_FORMAT, else text).") var logFormat: String?
    @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical (default: WHITTLE_LOG_LEVEL, else info).") var logLevel: String?

    public init() {}

    public func run() async throws {
        let (layout, config) = try loadConfig(dir, settings: set)
        try LogFormat.resolve(logFormat).bootstrap()
        var logger = Logger(label: "whittle.coordinator")
        logger.logLevel = try LogFormat.level(logLevel)
        try await CoordinatorServer.serve(layout: layout, config: config, listen: listen ?? config.listen, logger: logger)
    }
}

/// `coordinator migrate`: brings the database to this binary's schema, once for every replica.
public struct MigrateCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Bring the coordinator's database to this version's schema (run once, before starting upgraded replicas).",
        discussion: """
            The schema is versioned; migrations are applied in one transaction under a lock, so replicas migrating \
            at once take turns. A database a newer coordinator migrated is refused. serve migrates the embedded \
            SQLite database itself; on PostgreSQL it refuses to start until the schema is this version's.
            """)

    @Option(name: .long, help: "The coordinator's data directory.") var dir: String
    @Option(name: .long, parsing: .singleValue, help: "Override a coordinator.conf setting, KEY=VALUE (repeatable), e.g. database_url=….")
    var set: [String] = []
    @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

    public init() {}

    public func run() async throws {
        let (layout, config) = try loadConfig(dir, settings: set)
        let migrated = try await CoordinatorServer.migrateStore(layout: layout, config: config, logger: Logger(label: "whittle.coordinator"))
        if json {
            try printJSON(["database": migrated.database, "from": "\(migrated.from)", "to": "\(migrated.to)"])
        } else if migrated.from == migrated.to {
            print("\(migrated.database): schema version \(migrated.to), up to date")
        } else {
            print("\(migrated.database): schema version \(migrated.from) → \(migrated.to)")
        }
    }
}

/// An HTTPS client with the admin certificate of a data directory, aimed at its running server.
func adminClient(_ dir: String, server: String?) throws -> HTTPClient {
    let (layout, config) = try loadConfig(dir)
    let url: String
    if let server {
        url = server
    } else if !config.url.isEmpty {
        url = config.url
    } else if let listening = try? String(contentsOfFile: layout.listening, encoding: .utf8) {
        // A server listening on every address is reached on loopback from its own host.
        url = listening.trimmingCharacters(in: .whitespacesAndNewlines)
            .replacingOccurrences(of: "https://0.0.0.0:", with: "https://127.0.0.1:")
            .replacingOccurrences(of: "https://[::]:", with: "https://[::1]:")
    } else {
        url = "https://" + config.listen
    }
    let read = { (path: String) throws -> String in
        do { return try String(contentsOfFile: path, encoding: .utf8) } catch { throw CLIError("cannot read \(path)") }
    }
    let client = HTTPClient(baseURL: url, credentials: TLSCredentials(
        caPEM: try read(layout.caCertificate), certificatePEM: try read(layout.adminCertificate),
        privateKeyPEM: try read(layout.adminKey)))
    client.timeout = 30
    return client
}

/// Sends an admin request and turns failures into messages for people.
func adminRequest(_ client: HTTPClient, _ method: String, _ path: String, body: [UInt8]? = nil,
                  contentType: String = "application/json") throws -> HTTPResponse {
    let response: HTTPResponse
    do {
        response = try client.send(method, path, body: body, contentType: body == nil ? nil : contentType,
                                   retry: RetryPolicy(attempts: 3, baseDelay: 0.2, maximumDelay: 2))
    } catch let error as HTTPClientError {
        throw CLIError("cannot reach the coordinator at \(client.baseURL): \(error.description) (is coordinator serve running?)")
    }
    guard response.status == 200 else {
        let message = (try? JSONDecoder().decode([String: String].self, from: Data(response.body)))?["message"] ?? response.text
        throw CLIError("the coordinator answered \(response.status): \(message)")
    }
    return response
}

/// `coordinator token create|list|revoke`.
public struct TokenCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "token", abstract: "Enrollment tokens.", subcommands: [Create.self, List.self, Revoke.self])

    public init() {}

    public struct Create: ParsableCommand {
        public static let configuration = CommandConfiguration(
            abstract: "Create an enrollment token (printed once, stored hashed) and print the CA fingerprint workers check.")

        @Option(name: .long, help: "The coordinator's data directory (for its admin certificate).") var dir: String
        @Option(name: .long, help: "How long the token stays valid: 30m, 1h, 2d, or seconds.") var ttl: String = "1h"
        @Option(name: .long, help: "How many enrollments it allows.") var uses: Int = 1
        @Option(name: .long, help: "The server's URL (default: from the data directory).") var server: String?
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        public init() {}

        public func validate() throws {
            guard Self.seconds(ttl) != nil else { throw ValidationError("--ttl '\(ttl)' is not a duration like 30m, 1h or 2d") }
            guard uses >= 1 else { throw ValidationError("--uses must be at least 1") }
        }

        static func seconds(_ text: String) -> Double? {
            let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
            if let unit = text.last, let factor = units[unit], let v = Double(text.dropLast()), v > 0 { return v * factor }
            return Double(text).flatMap { $0 > 0 ? $0 : nil }
        }

        public func run() throws {
            let client = try adminClient(dir, server: server)
            let body = try JSONEncoder().encode(["ttlSeconds": Self.seconds(ttl)!, "uses": Double(uses)])
            let response = try adminRequest(client, "POST", "/admin/v1/tokens", body: Array(body))
            if json {
                print(response.text)
            } else {
                let object = try JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any] ?? [:]
                print("token: \(object["token"] ?? "")")
                print("uses: \(object["uses"] ?? ""), expires: \(object["expiresAt"] ?? "")")
                print("CA fingerprint (SHA-256): \(object["caFingerprint"] ?? "")")
                print("enroll a board with: worker enroll --coordinator \(client.baseURL) --token <token> --ca-fingerprint <fingerprint> --dir WDIR")
            }
        }
    }
}

extension TokenCommand {
    public struct List: ParsableCommand {
        public static let configuration = CommandConfiguration(
            abstract: "List enrollment tokens: id (the start of the token's hash; the secret is never stored), state, uses, expiry.")
        @OptionGroup var common: WorkersCommand.Common
        public init() {}

        public func run() throws {
            let response = try adminRequest(try adminClient(common.dir, server: common.server), "GET", "/admin/v1/tokens")
            if common.json { print(response.text); return }
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            let tokens = try decoder.decode([TokenView].self, from: Data(response.body))
            guard !tokens.isEmpty else { print("no tokens"); return }
            let f = ISO8601DateFormatter()
            print(table(["id", "state", "uses left", "created", "expires"], tokens.map {
                [$0.id, $0.state, "\($0.usesRemaining) of \($0.usesAllowed)", f.string(from: $0.createdAt), f.string(from: $0.expiresAt)]
            }))
        }
    }

    public struct Revoke: ParsableCommand {
        public static let configuration = CommandConfiguration(
            abstract: "Revoke an enrollment token: it enrolls nobody from now on (workers it enrolled stay enrolled).")
        @Argument(help: "The token's id as `token list` shows it (at least 8 hex digits).") var id: String
        @OptionGroup var common: WorkersCommand.Common
        public init() {}

        public func validate() throws {
            guard id.count >= 8, id.count <= 64, id.allSatisfy(\.isHexDigit) else {
                throw ValidationError("the token id is 8 to 64 hex digits, as `coordinator token list` shows")
            }
        }

        public func run() throws {
            let response = try adminRequest(try adminClient(common.dir, server: common.server), "POST", "/admin/v1/tokens/\(id)/revoke")
            if common.json { print(response.text) } else { print("revoked token \(id)") }
        }
    }
}

/// `coordinator gc`.
public struct GCCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Delete what no round needs any more: closed phases' report blobs, and models of rounds ended more than retention_days ago (serve also does this hourly).")
    @OptionGroup var common: WorkersCommand.Common
    public init() {}

    public func run() throws {
        let response = try adminRequest(try adminClient(common.dir, server: common.server), "POST", "/admin/v1/gc")
        if common.json { print(response.text); return }
        let c = try JSONDecoder().decode(RoundService.Collected.self, from: Data(response.body))
        print("deleted \(c.artifacts) artifacts (\(byteSize(c.artifactBytes))) and \(c.reports) report blobs (\(byteSize(c.reportBytes)))")
    }
}

/// `coordinator workers list|show|revoke|renew`.
public struct WorkersCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "workers", abstract: "Enrolled workers.", subcommands: [List.self, Show.self, Revoke.self, Renew.self])

    public init() {}

    struct Common: ParsableArguments {
        @Option(name: .long, help: "The coordinator's data directory (for its admin certificate).") var dir: String
        @Option(name: .long, help: "The server's URL (default: from the data directory).") var server: String?
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false
    }

    static func decodeWorkers(_ response: HTTPResponse) throws -> [WorkerView] {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try decoder.decode([WorkerView].self, from: Data(response.body))
    }

    static func describe(_ w: WorkerView) -> [String] {
        let f = ISO8601DateFormatter()
        return [w.name, w.state, w.lastContactAt.map { f.string(from: $0) } ?? "never", w.address ?? "–",
                w.capabilities.map { "\($0.samples)" } ?? "–", w.certificateSerial.prefix(16) + "…",
                f.string(from: w.certificateExpiresAt)]
    }

    public struct List: ParsableCommand {
        public static let configuration = CommandConfiguration(abstract: "List enrolled workers.")
        @OptionGroup var common: Common
        public init() {}

        public func run() throws {
            let response = try adminRequest(try adminClient(common.dir, server: common.server), "GET", "/admin/v1/workers")
            if common.json { print(response.text); return }
            let workers = try WorkersCommand.decodeWorkers(response)
            guard !workers.isEmpty else { print("no workers enrolled"); return }
            print(table(["name", "state", "last contact", "address", "samples", "certificate", "expires"],
                              workers.map(WorkersCommand.describe)))
        }
    }

    public struct Show: ParsableCommand {
        public static let configuration = CommandConfiguration(abstract: "Show one worker.")
        @Argument(help: "The worker's name.") var name: String
        @OptionGroup var common: Common
        public init() {}

        public func run() throws {
            let path = "/admin/v1/workers/" + (name.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? name)
            let response = try adminRequest(try adminClient(common.dir, server: common.server), "GET", path)
            print(response.text)
        }
    }

    public struct Revoke: ParsableCommand {
        public static let configuration = CommandConfiguration(
            abstract: "Revoke a worker: its next request is refused, without a restart.")
        @Argument(help: "The worker's name.") var name: String
        @OptionGroup var common: Common
        public init() {}

        public func run() throws {
            let path = "/admin/v1/workers/" + (name.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? name) + "/revoke"
            let response = try adminRequest(try adminClient(common.dir, server: common.server), "POST", path)
            if common.json { print(response.text) } else { print("revoked \(name)") }
        }
    }

    public struct Renew: ParsableCommand {
        public static let configuration = CommandConfiguration(
            abstract: "Ask a worker to renew its certificate at its next heartbeat (workers also renew by themselves when a third of the lifetime is left).")
        @Argument(help: "The worker's name.") var name: String
        @OptionGroup var common: Common
        public init() {}

        public func run() throws {
            let path = "/admin/v1/workers/" + (name.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? name) + "/renew"
            let response = try adminRequest(try adminClient(common.dir, server: common.server), "POST", path)
            if common.json { print(response.text) } else { print("\(name) renews its certificate at its next heartbeat") }
        }
    }
}
