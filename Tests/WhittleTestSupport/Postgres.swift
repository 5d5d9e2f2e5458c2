import Foundation

/// A PostgreSQL cluster for the tests, started once per test process by `scripts/postgres-cluster` (initdb in a
/// temporary directory, TLS on, loopback only) and stopped when the process exits. Each caller gets its own
/// database, so tests share the server but no state.
public enum TestPostgres {
    public struct Cluster: Sendable {
        /// The trusted role's URL to database `whittle`.
        public let url: String
        public let port: Int
        /// The directory holding the server's Unix socket.
        public let socket: String
        /// The CA that signed the server's certificate (and the whittle_cert role's client certificate).
        public let ca: String
        public let clientCertificate: String
        public let clientKey: String
    }

    public enum Failure: Error, CustomStringConvertible {
        case cannotStart(String)
        case psql(String)
        public var description: String {
            switch self {
            case .cannotStart(let why): "the test PostgreSQL cluster did not start (scripts/postgres-cluster; bash scripts/install-deps installs PostgreSQL): \(why)"
            case .psql(let why): "psql failed: \(why)"
            }
        }
    }

    nonisolated(unsafe) static var directory: String?

    /// The cluster, started at first use.
    public static let cluster: Result<Cluster, Failure> = {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-postgres-\(UUID().uuidString)").path
        let script = TestSupport.root.appendingPathComponent("scripts/postgres-cluster")
        guard let run = try? shell(["/bin/bash", script.path, "start", dir]) else { return .failure(.cannotStart("bash did not run")) }
        guard run.status == 0 else { return .failure(.cannotStart(run.stderr)) }
        directory = dir
        atexit {
            guard let dir = TestPostgres.directory else { return }
            let script = TestSupport.root.appendingPathComponent("scripts/postgres-cluster")
            _ = try? shell(["/bin/bash", script.path, "stop", dir])
            try? FileManager.default.removeItem(atPath: dir)
        }
        var fields: [String: String] = [:]
        for line in run.stdout.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2 { fields[parts[0]] = parts[1] }
        }
        guard let url = fields["url"], let port = fields["port"].flatMap(Int.init), let socket = fields["socket"], let ca = fields["ca"],
              let cert = fields["client_cert"], let key = fields["client_key"] else {
            return .failure(.cannotStart("unexpected output: \(run.stdout)"))
        }
        return .success(Cluster(url: url, port: port, socket: socket, ca: ca, clientCertificate: cert, clientKey: key))
    }()

    /// A new empty database on the cluster (owned by the trusted role `whittle`, open to every test role); its name.
    public static func makeDatabase() throws -> (cluster: Cluster, name: String) {
        let cluster = try cluster.get()
        let name = "t_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
        try psql(cluster, database: "postgres", "CREATE DATABASE \(name)")
        try psql(cluster, database: name, "GRANT ALL ON SCHEMA public TO PUBLIC")
        return (cluster, name)
    }

    /// Runs `sql` as the trusted role over the Unix socket.
    public static func psql(_ cluster: Cluster, database: String, _ sql: String) throws {
        let r = try shell(["/usr/bin/env", "psql", "-h", cluster.socket, "-p", "\(cluster.port)", "-U", "whittle", "-d", database,
                           "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        guard r.status == 0 else { throw Failure.psql(r.stderr) }
    }

    /// Runs a program to its end with posix_spawn and waitpid, its output through temporary files: Foundation's
    /// `Process` learns of the exit through Dispatch's shared threads, which concurrent tests blocked in
    /// synchronous waits can all be holding (seen: a reaped-never zombie and a hung suite on 2 cores).
    static func shell(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        let base = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-spawn-\(UUID().uuidString)").path
        defer {
            unlink(base + ".out")
            unlink(base + ".err")
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, base + ".out", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, base + ".err", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, arguments[0], &actions, nil, &argv, environ)
        guard spawned == 0 else { throw Failure.cannotStart("posix_spawn \(arguments[0]): \(String(cString: strerror(spawned)))") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let exited = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        func read(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }
        return (exited, read(base + ".out"), read(base + ".err"))
    }
}
