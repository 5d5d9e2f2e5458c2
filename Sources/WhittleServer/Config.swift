import Foundation
import WhittleIO
import WhittleStore

/// The coordinator's settings, read from `DIR/coordinator.conf` (`key = value` lines, `#` comments). Every key has
/// a documented default; `coordinator init` writes the file with all of them.
public struct CoordinatorConfig: Sendable, Equatable {
    /// Address and port `serve` listens on (`--listen` overrides).
    public var listen = "127.0.0.1:8443"
    /// The URL admin commands use to reach the server (derived from `listen` when empty).
    public var url = ""
    /// Seconds between a worker's heartbeats.
    public var heartbeatSeconds = 10
    /// Validity of issued worker certificates, in days (fractions allowed: 0.01 is 14.4 minutes). Workers renew
    /// theirs when a third of it is left.
    public var workerCertificateDays = 365.0
    /// Body limits per route, in bytes.
    public var enrollBodyLimit = 64 << 10
    public var heartbeatBodyLimit = 16 << 10
    public var adminBodyLimit = 16 << 10
    /// Largest task report (a round's phase may set a smaller limit, from its model's size).
    public var reportBodyLimit = 256 << 20
    /// Largest model an admin uploads for a round.
    public var modelBodyLimit = 1 << 30
    /// Enrollment rate limit per client address: sustained requests per second and burst.
    public var enrollRatePerSecond = 5.0
    public var enrollBurst = 20
    /// The serial (hex) of the admin client certificate; admin routes accept only it.
    public var adminSerial = ""
    /// A bearer token `/metrics` also accepts (empty: the admin certificate only).
    public var metricsToken = ""
    /// Seconds a connection may stay idle (no request in progress), counted from the TCP accept: covers the TLS
    /// handshake and a request head that never completes.
    public var idleTimeoutSeconds = 60
    /// Seconds a request body may take to arrive.
    public var bodyTimeoutSeconds = 600
    /// Connections held at once; beyond it new connections wait in the listen backlog.
    public var maxConnections = 4096
    /// Bytes of report bodies in flight at once (one larger report is admitted alone); beyond it uploads are
    /// answered 503 with Retry-After.
    public var uploadMemoryLimit = 256 << 20
    /// Days the artifacts of an ended round are kept (the latest succeeded round's are kept regardless); report
    /// blobs of closed phases are deleted at the next collection. Collected hourly and by `coordinator gc`.
    public var retentionDays = 30.0
    /// Rounds sum their workers' statistics under secure aggregation unless `round start` says otherwise.
    public var secureAggregation = false
    /// Each site's differential-privacy budget ε at `privacyDelta` over all rounds (0: none).
    public var privacyBudget = 0.0
    public var privacyDelta = 1e-5
    /// Where the coordinator's state lives: empty for the embedded SQLite file (DIR/whittle.sqlite), else a
    /// PostgreSQL URL every replica shares (`DatabaseURL`).
    public var databaseURL = ""
    /// This replica's name in the rounds' lease (PostgreSQL only); empty: the host name and the listening port.
    public var replicaName = ""
    /// Seconds the rounds' lease lasts unrenewed: how long a dead replica's phases wait before another replica
    /// takes them over.
    public var replicaLeaseSeconds = 10

    public init() {}

    package static let documentation: [(key: String, comment: String)] = [
        ("listen", "Address and port the HTTPS server listens on (coordinator serve --listen overrides)."),
        ("url", "URL admin commands use to reach the server; empty: the address serve wrote to DIR/listening (a wildcard listen becomes loopback), else https://<listen>."),
        ("heartbeat_seconds", "Seconds between a worker's heartbeats."),
        ("worker_certificate_days", "Validity of the certificates issued to enrolled workers, in days (fractions allowed); workers renew theirs when a third of it is left."),
        ("enroll_body_limit", "Largest enrollment request body, in bytes (larger: 413)."),
        ("heartbeat_body_limit", "Largest heartbeat body, in bytes."),
        ("admin_body_limit", "Largest admin request body, in bytes."),
        ("report_body_limit", "Largest task report a worker uploads, in bytes (each phase also caps it at 2 × its model's size + 16 MiB)."),
        ("model_body_limit", "Largest model an admin uploads for a round (coordinator round start), in bytes."),
        ("enroll_rate_per_second", "Enrollment requests per second allowed per client address (beyond the burst: 429)."),
        ("enroll_burst", "Enrollment requests a client address may send at once."),
        ("admin_serial", "Serial of the admin client certificate (admin.pem); set by coordinator init."),
        ("metrics_token", "Bearer token GET /metrics also accepts, for a Prometheus server without the admin certificate; empty: admin certificate only."),
        ("idle_timeout_seconds", "Seconds a connection may stay idle before it is closed, counted from the TCP accept (covers unfinished TLS handshakes and request heads)."),
        ("body_timeout_seconds", "Seconds a request body may take to arrive (slower: 408)."),
        ("max_connections", "Connections held at once; further connections wait in the listen backlog until one closes."),
        ("upload_memory_limit", "Bytes of report bodies held in flight at once (a single larger report is admitted alone); beyond it: 503 with Retry-After."),
        ("retention_days", "Days an ended round's models stay in artifacts/ (the latest succeeded round's are always kept); report blobs of closed phases are deleted. Collected hourly and by coordinator gc."),
        ("secure_aggregation", "true: rounds sum their workers' updates and calibration statistics under secure aggregation unless round start says --no-secure-aggregation (docs/security.md)."),
        ("privacy_budget", "Each site's differential-privacy budget: the ε at privacy_delta all rounds together may spend on its data; a round that would exceed it, or that trains without --dp-epsilon, is refused. 0: no budget."),
        ("privacy_delta", "The δ privacy_budget is counted at."),
        ("database_url", "Where the coordinator's state lives: empty for the embedded SQLite file DIR/whittle.sqlite; postgresql://USER[:PASSWORD]@HOST:PORT/DB[?sslmode=verify-full&sslrootcert=CA.pem] for a PostgreSQL database that coordinator replicas share (coordinator migrate creates its schema; docs/operations.md)."),
        ("replica_name", "With database_url: this replica's name in the rounds' lease (the replica holding it closes phases and ends rounds); empty: HOSTNAME:PORT (HOSTNAME:pidPID on port 0). A restarted replica with the same name takes its lease back at once; two live replicas must not share one."),
        ("replica_lease_seconds", "With database_url: seconds the rounds' lease lasts unrenewed, so how long a dead replica's rounds wait before another replica takes them over."),
    ]

    package var values: [String: String] {
        ["listen": listen, "url": url, "heartbeat_seconds": "\(heartbeatSeconds)",
         "worker_certificate_days": Self.number(workerCertificateDays), "enroll_body_limit": "\(enrollBodyLimit)",
         "heartbeat_body_limit": "\(heartbeatBodyLimit)", "admin_body_limit": "\(adminBodyLimit)",
         "report_body_limit": "\(reportBodyLimit)", "model_body_limit": "\(modelBodyLimit)",
         "enroll_rate_per_second": "\(enrollRatePerSecond)", "enroll_burst": "\(enrollBurst)", "admin_serial": adminSerial,
         "metrics_token": metricsToken, "idle_timeout_seconds": "\(idleTimeoutSeconds)",
         "body_timeout_seconds": "\(bodyTimeoutSeconds)", "max_connections": "\(maxConnections)",
         "upload_memory_limit": "\(uploadMemoryLimit)", "retention_days": Self.number(retentionDays),
         "secure_aggregation": "\(secureAggregation)", "privacy_budget": Self.number(privacyBudget),
         "privacy_delta": Self.number(privacyDelta), "database_url": databaseURL, "replica_name": replicaName,
         "replica_lease_seconds": "\(replicaLeaseSeconds)"]
    }

    /// The file's text, every key with its comment.
    public var text: String {
        var out = "# Whittle coordinator configuration. Each setting shows its default unless changed.\n"
        out += "# The environment variable WHITTLE_<KEY> (e.g. WHITTLE_HEARTBEAT_SECONDS=5) overrides a setting, and\n"
        out += "# `coordinator serve --set KEY=VALUE` overrides both.\n"
        for (key, comment) in Self.documentation {
            out += "\n# \(comment)\n\(key) = \(values[key] ?? "")\n"
        }
        return out
    }

    /// `text` (a coordinator.conf) with `key`'s setting line set to `value`, or the line added; comments, order
    /// and every other line are kept.
    public static func replacing(_ key: String, with value: String, in text: String) -> String {
        var lines = text.components(separatedBy: "\n")
        let setting = "\(key) = \(value)"
        var found = false
        for (i, line) in lines.enumerated() {
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            let parts = trimmed.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            if !trimmed.hasPrefix("#"), parts.count == 2, parts[0].trimmingCharacters(in: .whitespaces) == key {
                lines[i] = setting
                found = true
            }
        }
        if !found {
            if lines.last == "" { lines.removeLast() }
            lines += [setting, ""]
        }
        return lines.joined(separator: "\n")
    }

    public static func parse(_ text: String) throws -> CoordinatorConfig {
        var c = CoordinatorConfig()
        let (lines, bad) = settingLines(text)
        for (number, key, value) in lines {
            do { try c.set(key, value) } catch let error as ServerError { throw error.within("line \(number)") }
        }
        if let bad { throw ServerError(.malformedSetting, "line \(bad.number): expected key = value, got '\(bad.text)'") }
        return c
    }

    /// Sets one setting from its text.
    public mutating func set(_ key: String, _ value: String) throws {
        func int() throws -> Int {
            guard let v = Int(value), v > 0 else { throw ServerError(.invalidSetting, "\(key) must be a positive integer, not '\(value)'") }
            return v
        }
        switch key {
        case "listen": listen = value
        case "url": url = value
        case "heartbeat_seconds": heartbeatSeconds = try int()
        case "worker_certificate_days":
            guard let v = Double(value), v > 0, v <= 36500 else {
                throw ServerError(.invalidSetting, "worker_certificate_days must be a positive number of days (at most 36500), not '\(value)'")
            }
            workerCertificateDays = v
        case "enroll_body_limit": enrollBodyLimit = try int()
        case "heartbeat_body_limit": heartbeatBodyLimit = try int()
        case "admin_body_limit": adminBodyLimit = try int()
        case "report_body_limit": reportBodyLimit = try int()
        case "model_body_limit": modelBodyLimit = try int()
        case "enroll_rate_per_second":
            guard let v = Double(value), v > 0 else { throw ServerError(.invalidSetting, "enroll_rate_per_second must be positive, not '\(value)'") }
            enrollRatePerSecond = v
        case "enroll_burst": enrollBurst = try int()
        case "admin_serial": adminSerial = value
        case "metrics_token": metricsToken = value
        case "idle_timeout_seconds": idleTimeoutSeconds = try int()
        case "body_timeout_seconds": bodyTimeoutSeconds = try int()
        case "max_connections": maxConnections = try int()
        case "upload_memory_limit": uploadMemoryLimit = try int()
        case "retention_days":
            guard let v = Double(value), v >= 0, v <= 36500 else {
                throw ServerError(.invalidSetting, "retention_days must be a number of days from 0 to 36500, not '\(value)'")
            }
            retentionDays = v
        case "privacy_budget":
            guard let v = Double(value), v >= 0, v.isFinite else {
                throw ServerError(.invalidSetting, "privacy_budget must be an ε of 0 (no budget) or more, not '\(value)'")
            }
            privacyBudget = v
        case "privacy_delta":
            guard let v = Double(value), v > 0, v < 1 else { throw ServerError(.invalidSetting, "privacy_delta must be in (0, 1), not '\(value)'") }
            privacyDelta = v
        case "database_url":
            if !value.isEmpty {
                do { _ = try DatabaseURL(value) } catch let error as StoreError { throw ServerError(.invalidSetting, error.message) }
            }
            databaseURL = value
        case "replica_name":
            guard value.utf8.count <= 200, value.allSatisfy({ $0.isASCII && !$0.isWhitespace && !$0.isNewline }) else {
                throw ServerError(.invalidSetting, "replica_name must be at most 200 printable ASCII characters without spaces")
            }
            replicaName = value
        case "replica_lease_seconds":
            let v = try int()
            guard v >= 2, v <= 3600 else { throw ServerError(.invalidSetting, "replica_lease_seconds must be from 2 to 3600, not '\(value)'") }
            replicaLeaseSeconds = v
        case "secure_aggregation":
            guard let v = Bool(value) else { throw ServerError(.invalidSetting, "secure_aggregation must be true or false, not '\(value)'") }
            secureAggregation = v
        default:
            throw ServerError(.unknownSetting, "unknown setting '\(key)' (known: \(Self.documentation.map(\.key).joined(separator: ", ")))")
        }
    }

    /// `value` without a fraction when it is whole (365, not 365.0).
    static func number(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? "\(Int(value))" : "\(value)"
    }

    /// The environment variable that overrides `key`: `WHITTLE_` and the key in capitals (`WHITTLE_HEARTBEAT_SECONDS`).
    public static func environmentName(_ key: String) -> String { "WHITTLE_" + key.uppercased() }

    /// The file's settings overridden by the environment (`WHITTLE_KEY=value`), then by `KEY=VALUE` flags.
    public mutating func override(environment: [String: String], settings: [String]) throws {
        for (key, _) in Self.documentation {
            if let value = environment[Self.environmentName(key)] {
                do { try set(key, value) } catch let error as ServerError { throw error.within(Self.environmentName(key)) }
            }
        }
        for setting in settings {
            let parts = setting.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            guard parts.count == 2 else { throw ServerError(.malformedSetting, "--set '\(setting)' must be KEY=VALUE") }
            do { try set(parts[0].trimmingCharacters(in: .whitespaces), parts[1].trimmingCharacters(in: .whitespaces)) } catch let error as ServerError {
                throw error.within("--set \(setting)")
            }
        }
    }

    /// `host:port` split; IPv6 in brackets.
    public static func hostPort(_ text: String) throws -> (String, Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
            throw ServerError(.invalidSetting, "'\(text)' is not HOST:PORT")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host, port)
    }
}

/// What the coordinator refuses outside a request (requests get an `APIError`, rounds a `RoundError`): a setting,
/// a data directory that is not as `coordinator init` left it, a CA rotation asked out of turn.
public struct ServerError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// A setting's value is out of its range or not of its type.
        case invalidSetting
        /// No setting has that name.
        case unknownSetting
        /// A settings line or flag that is not `key = value`.
        case malformedSetting
        /// A file of the data directory cannot be read, or does not hold what it should (a certificate or key).
        case dataDirectory
        /// `ca begin` while a rotation is under way, or `ca finish` with none.
        case rotationOutOfTurn
        /// `ca finish` would strand workers that still hold certificates from the current CA.
        case workersNotRenewed
        /// A file of the data directory cannot be written or moved into place.
        case fileSystem
    }

    public let code: Code
    public let message: String
    public let file: String
    public let line: Int

    public init(_ code: Code, _ message: String, file: String = #fileID, line: Int = #line) {
        self.code = code
        self.message = message
        self.file = file
        self.line = line
    }

    /// The same error, its message prefixed with where it came from (`line 3`, `WHITTLE_HEARTBEAT_SECONDS`).
    public func within(_ source: String) -> ServerError { ServerError(code, "\(source): \(message)", file: file, line: line) }

    public var description: String { message }
}

/// Where things live in the coordinator's data directory.
public struct CoordinatorLayout: Sendable {
    public let directory: URL
    public init(_ path: String) { directory = URL(fileURLWithPath: path) }
    func file(_ name: String) -> String { directory.appendingPathComponent(name).path }
    public var caCertificate: String { file("ca.pem") }
    public var caKey: String { file("ca.key") }
    public var serverCertificate: String { file("server.pem") }
    public var serverKey: String { file("server.key") }
    public var adminCertificate: String { file("admin.pem") }
    public var adminKey: String { file("admin.key") }
    /// During a CA rotation (`coordinator ca begin`): the CA that replaces `ca.pem` at `coordinator ca finish`.
    public var nextCACertificate: String { file("ca-next.pem") }
    public var nextCAKey: String { file("ca-next.key") }
    /// Written by `coordinator ca finish` once every new file is staged: the rotation is committed.
    package var rotationCommit: String { file("ca-rotation.commit") }
    /// A CA replaced by a rotation, kept for audit (its key is deleted).
    func retiredCACertificate(fingerprint: String) -> String { file("ca-retired-\(fingerprint.prefix(16)).pem") }
    public var config: String { file("coordinator.conf") }
    /// The embedded database (when `database_url` is empty).
    public var database: String { file("whittle.sqlite") }
    /// Files served to workers, named by their SHA-256.
    public var artifacts: URL { directory.appendingPathComponent("artifacts") }
    /// Written by `serve` once listening: the bound address (useful with port 0).
    public var listening: String { file("listening") }
}
