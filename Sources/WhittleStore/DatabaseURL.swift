import Foundation

/// Where the coordinator's state lives: `database_url` in coordinator.conf. Empty selects the embedded SQLite file
/// in the data directory; `postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=…&sslrootcert=…]` a PostgreSQL
/// server, read as libpq reads it (https://www.postgresql.org/docs/15/libpq-connect.html#LIBPQ-CONNSTRING), for the
/// parameters Whittle supports: `sslmode` (disable, prefer, require, verify-ca, verify-full; default prefer),
/// `sslrootcert`, `sslcert` and `sslkey` (PEM files, the last two for a client certificate), `host` (a Unix-socket
/// directory, which takes the place of the authority's host), `connect_timeout` (seconds) and `pool_size`.
/// A password missing from the URL is taken from `PGPASSWORD`.
public struct DatabaseURL: Sendable, Equatable, CustomStringConvertible {
    public enum TLSMode: String, Sendable, CaseIterable {
        /// No TLS.
        case disable
        /// TLS when the server offers it, without verifying the server (libpq's default).
        case prefer
        /// TLS or no connection; the server's certificate is verified only when `sslrootcert` is given (as libpq).
        case require
        /// TLS, the server's certificate chains to `sslrootcert` (or the system's roots).
        case verifyCA = "verify-ca"
        /// As verify-ca, and the certificate names the host.
        case verifyFull = "verify-full"
    }

    public var user: String
    public var password: String?
    public var host: String
    public var port: Int
    public var database: String
    /// A directory holding the server's Unix socket (`?host=/path`), used instead of TCP.
    public var socketDirectory: String?
    public var tls: TLSMode
    public var rootCertificate: String?
    public var clientCertificate: String?
    public var clientKey: String?
    public var connectTimeoutSeconds: Int
    /// Connections the coordinator keeps to the server at most.
    public var poolSize: Int

    public static let defaultPort = 5432
    public static let defaultPoolSize = 16

    /// Parses `text`; a clear error names what is wrong (never the password).
    public init(_ text: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws {
        let scheme = ["postgresql://", "postgres://"].first { text.lowercased().hasPrefix($0) }
        guard let scheme else {
            throw StoreError(.badDatabaseURL, "database_url must start with postgresql:// (or be empty for the embedded SQLite database)")
        }
        var rest = Substring(text.dropFirst(scheme.count))
        var query = ""
        if let q = rest.firstIndex(of: "?") {
            query = String(rest[rest.index(after: q)...])
            rest = rest[..<q]
        }
        guard let slash = rest.firstIndex(of: "/") else {
            throw StoreError(.badDatabaseURL, "database_url names no database: postgresql://USER@HOST:PORT/DATABASE")
        }
        var authority = rest[..<slash]
        database = try Self.decode(rest[rest.index(after: slash)...], "database")
        guard !database.isEmpty, !database.contains("/") else {
            throw StoreError(.badDatabaseURL, "database_url names no database: postgresql://USER@HOST:PORT/DATABASE")
        }
        var userInfo: Substring = ""
        if let at = authority.lastIndex(of: "@") {
            userInfo = authority[..<at]
            authority = authority[authority.index(after: at)...]
        }
        if let colon = userInfo.firstIndex(of: ":") {
            user = try Self.decode(userInfo[..<colon], "user")
            password = try Self.decode(userInfo[userInfo.index(after: colon)...], "password")
        } else {
            user = try Self.decode(userInfo, "user")
            password = nil
        }
        guard !user.isEmpty else { throw StoreError(.badDatabaseURL, "database_url names no user: postgresql://USER@HOST:PORT/DATABASE") }
        if password == nil { password = environment["PGPASSWORD"] }
        // host, host:port, [v6], [v6]:port
        port = Self.defaultPort
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { throw StoreError(.badDatabaseURL, "database_url: unclosed [ in the host") }
            host = String(authority[authority.index(after: authority.startIndex)..<close])
            let after = authority[authority.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw StoreError(.badDatabaseURL, "database_url: expected :PORT after the host") }
                port = try Self.port(after.dropFirst())
            }
        } else if let colon = authority.lastIndex(of: ":") {
            host = String(authority[..<colon])
            port = try Self.port(authority[authority.index(after: colon)...])
        } else {
            host = String(authority)
        }
        tls = .prefer
        connectTimeoutSeconds = 10
        poolSize = Self.defaultPoolSize
        for pair in query.split(separator: "&") where !pair.isEmpty {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2 else { throw StoreError(.badDatabaseURL, "database_url: parameter '\(pair)' is not NAME=VALUE") }
            let name = String(parts[0]), value = try Self.decode(parts[1], name)
            switch name {
            case "sslmode":
                guard let mode = TLSMode(rawValue: value) else {
                    throw StoreError(.badDatabaseURL, "database_url: sslmode must be one of \(TLSMode.allCases.map(\.rawValue).joined(separator: ", ")), not '\(value)'")
                }
                tls = mode
            case "sslrootcert": rootCertificate = value
            case "sslcert": clientCertificate = value
            case "sslkey": clientKey = value
            case "host": socketDirectory = value
            case "connect_timeout":
                guard let s = Int(value), s > 0, s <= 3600 else {
                    throw StoreError(.badDatabaseURL, "database_url: connect_timeout must be 1 to 3600 seconds, not '\(value)'")
                }
                connectTimeoutSeconds = s
            case "pool_size":
                guard let n = Int(value), n > 0, n <= 1000 else {
                    throw StoreError(.badDatabaseURL, "database_url: pool_size must be 1 to 1000 connections, not '\(value)'")
                }
                poolSize = n
            default:
                throw StoreError(.badDatabaseURL, "database_url: unknown parameter '\(name)' (known: sslmode, sslrootcert, sslcert, sslkey, host, connect_timeout, pool_size)")
            }
        }
        if host.isEmpty && socketDirectory == nil { host = "localhost" }
        guard (clientCertificate == nil) == (clientKey == nil) else {
            throw StoreError(.badDatabaseURL, "database_url: sslcert and sslkey go together")
        }
        if tls == .disable, rootCertificate != nil || clientCertificate != nil {
            throw StoreError(.badDatabaseURL, "database_url: sslmode=disable with TLS files; choose require, verify-ca or verify-full")
        }
    }

    static func port(_ text: Substring) throws -> Int {
        guard let p = Int(text), (1...65535).contains(p) else { throw StoreError(.badDatabaseURL, "database_url: '\(text)' is not a port") }
        return p
    }

    static func decode(_ text: Substring, _ what: String) throws -> String {
        guard let s = String(text).removingPercentEncoding else {
            throw StoreError(.badDatabaseURL, "database_url: the \(what) is not valid percent-encoding")
        }
        return s
    }

    /// The URL without its password: what logs and errors show.
    public var description: String {
        let authority = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        var s = "postgresql://\(user)@\(socketDirectory == nil ? authority : "")/\(database)"
        var params: [String] = []
        if let socketDirectory { params.append("host=\(socketDirectory)") }
        if tls != .prefer { params.append("sslmode=\(tls.rawValue)") }
        if !params.isEmpty { s += "?" + params.joined(separator: "&") }
        return s
    }
}

/// What a store refuses outside the records it holds: a database URL, a schema, a server that cannot be reached.
public struct StoreError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Code: String, Sendable {
        case badDatabaseURL
        /// The database was migrated by a newer coordinator than this one.
        case schemaTooNew
        /// The database's schema is older than this coordinator's: `coordinator migrate` first.
        case schemaTooOld
        /// The database server cannot be reached, or refused us.
        case unavailable
        /// The database answered a query with an error.
        case query
        /// The row changed since it was read (another coordinator replica wrote it): read it again.
        case conflict
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }

    static func roundConflict(_ id: String) -> StoreError {
        StoreError(.conflict, "round '\(id)' changed since it was read (another coordinator replica wrote it)")
    }

    static func phaseClosed(_ r: ReportRecord) -> StoreError {
        StoreError(.conflict, "round '\(r.round)' is no longer running at phase \(r.phase): the report came too late")
    }
}
