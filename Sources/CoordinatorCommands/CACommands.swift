import ArgumentParser
import Foundation
import Logging
import WhittleServer
import WhittleCLI
import WhittleIO
import WhittlePKI
import WhittleStore
import X509

/// `coordinator ca`: the CA's state and its rotation (see `CARotation`). Local commands on the data directory, like
/// `server-certificate`; `serve` reads the CAs when it starts, so each step takes effect at its next restart.
public struct CACommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ca",
        abstract: "Show the coordinator's CA and rotate it without re-enrolling the fleet (begin, then finish).",
        subcommands: [Status.self, Begin.self, Finish.self])

    public init() {}

    struct Summary: Encodable {
        var fingerprint: String
        var commonName: String
        var expiresAt: Date
    }

    static func summary(_ identity: Identity) throws -> Summary {
        Summary(fingerprint: try PKI.fingerprint(identity.certificate), commonName: PKI.commonName(identity.certificate) ?? "",
                expiresAt: identity.certificate.notValidAfter)
    }

    static func workers(_ layout: CoordinatorLayout, _ config: CoordinatorConfig) async throws -> [WorkerRecord] {
        let store = try await CoordinatorServer.openStore(layout: layout, config: config, logger: Logger(label: "whittle.coordinator"))
        defer { store.close() }
        return try await store.workers()
    }

    public struct Status: AsyncParsableCommand {
        public static let configuration = CommandConfiguration(
            abstract: "The current CA and, during a rotation, the next one with the workers that hold a certificate from each.")

        @Option(name: .long, help: "The coordinator's data directory.") var dir: String
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        public init() {}

        struct Report: Encodable {
            var current: Summary
            var next: Summary?
            /// During a rotation: workers whose certificate comes from the next CA, and those still on the current.
            var renewed: [String]?
            var pending: [String]?
        }

        public func run() async throws {
            let (layout, config) = try loadConfig(dir)
            let trust = try CARotation.trust(layout)
            var report = Report(current: try summary(trust.current))
            if let next = trust.next {
                let fingerprint = try PKI.fingerprint(next.certificate)
                let workers = try await CACommand.workers(layout, config)
                let pending = CARotation.pending(workers, next: fingerprint, now: Date())
                report.next = try summary(next)
                report.pending = pending.map(\.name)
                report.renewed = workers.filter { $0.revokedAt == nil && $0.certificateIssuer == fingerprint }.map(\.name).sorted()
            }
            if json { return try printJSON(report) }
            let f = ISO8601DateFormatter()
            print("CA \(report.current.fingerprint) (\(report.current.commonName)), valid until \(f.string(from: report.current.expiresAt))")
            guard let next = report.next else { return print("no rotation under way") }
            print("rotation under way to CA \(next.fingerprint) (\(next.commonName)), valid until \(f.string(from: next.expiresAt))")
            print("renewed from the next CA: \(report.renewed!.count) worker(s)\(report.renewed!.isEmpty ? "" : ": " + report.renewed!.joined(separator: ", "))")
            if report.pending!.isEmpty {
                print("every worker has renewed: coordinator ca finish --dir \(dir)")
            } else {
                print("still on the current CA: \(report.pending!.joined(separator: ", "))")
            }
        }
    }

    public struct Begin: ParsableCommand {
        public static let configuration = CommandConfiguration(
            abstract: "Make the next CA; after a restart of serve every worker renews from it and trusts both CAs.")

        @Option(name: .long, help: "The coordinator's data directory.") var dir: String
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        public init() {}

        public func run() throws {
            let (layout, _) = try loadConfig(dir)
            let next = try summary(try CARotation.begin(layout))
            if json { return try printJSON(next) }
            print("next CA \(next.fingerprint) (\(next.commonName)), valid until \(ISO8601DateFormatter().string(from: next.expiresAt))")
            print("restart coordinator serve: workers then renew from the next CA at their next heartbeat; follow with coordinator ca status --dir \(dir)")
        }
    }

    public struct Finish: AsyncParsableCommand {
        public static let configuration = CommandConfiguration(
            abstract: "Make the next CA the CA: new server and admin certificates, the old CA retired (restart serve).")

        @Option(name: .long, help: "The coordinator's data directory.") var dir: String
        @Flag(name: .long, help: "Finish even though some workers still hold a certificate from the old CA (they must enroll again).")
        var force = false
        @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

        public init() {}

        public func run() async throws {
            let (layout, config) = try loadConfig(dir)
            let finished = try CARotation.finish(layout, workers: try await CACommand.workers(layout, config), force: force)
            if json { return try printJSON(finished) }
            print("CA \(finished.caFingerprint) is now the coordinator's CA; the old one is kept as \(finished.retiredCertificate) (its key is deleted)")
            print("new server certificate for \(finished.serverNames.joined(separator: ", ")); new admin certificate \(finished.adminSerial) (admin.pem, admin.key): copy them to every admin machine")
            if !finished.abandoned.isEmpty {
                print("left behind (they must enroll again): \(finished.abandoned.joined(separator: ", "))")
            }
            print("restart coordinator serve; workers then renew once more and stop trusting the old CA")
        }
    }
}
