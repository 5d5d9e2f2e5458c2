import Foundation
#if canImport(Glibc)
import Glibc
#endif
import WhittleIO
import WhittlePKI
import WhittleStore
import X509

/// Replacing the coordinator's CA without losing a board, in two steps an admin takes with `coordinator ca`:
///
/// 1. `begin` makes the next CA (`ca-next.pem`, `ca-next.key`). After a restart, `serve` accepts client certificates
///    from both CAs, issues every new worker certificate from the next one, and announces the set of CAs workers must
///    trust with every heartbeat (`trust_fingerprint`). A worker whose own set differs renews over its current
///    mutual-TLS identity and receives a certificate from the next CA together with both CAs, which it then trusts.
///    The server certificate stays the current CA's, so workers that have not renewed yet still connect.
/// 2. `finish`, once every board holds a certificate from the next CA (`ca status`), makes it the CA: new server and
///    admin certificates from it, `admin_serial` updated, the old CA's certificate kept as `ca-retired-….pem` and its
///    key deleted. After a restart only the new CA is trusted, and workers renew once more to drop the old one.
///
/// `finish` is crash-safe: every new file is written beside its target (`NAME.rotated`) and synced, then a commit
/// marker is written, and only then are the files moved into place. `recover` (run by `serve` and every `ca`
/// command) completes a committed finish or discards an uncommitted one.
public enum CARotation {
    /// The files `finish` replaces, in the data directory.
    static let replaced = ["ca.pem", "ca.key", "server.pem", "server.key", "admin.pem", "admin.key", "coordinator.conf"]

    static func staged(_ layout: CoordinatorLayout, _ name: String) -> String { layout.file(name) + ".rotated" }

    /// The CAs a data directory holds: the current one (which signs the server certificate), the next one during a
    /// rotation, and which of them issues worker certificates.
    public struct Trust: Sendable {
        public var current: Identity
        public var next: Identity?
        /// Issues worker certificates: the next CA during a rotation.
        public var issuer: Identity { next ?? current }
        /// Every CA whose client certificates are accepted and which workers must trust.
        public var certificates: [Certificate] { [current.certificate] + (next.map { [$0.certificate] } ?? []) }
        public var fingerprint: String { (try? PKI.trustFingerprint(certificates)) ?? "" }
    }

    /// Reads the data directory's CAs (after completing or discarding an interrupted finish).
    public static func trust(_ layout: CoordinatorLayout) throws -> Trust {
        try recover(layout)
        let current = try identity(layout.caCertificate, layout.caKey)
        let next = try nextCA(layout)
        return Trust(current: current, next: next)
    }

    package static func identity(_ certificate: String, _ key: String) throws -> Identity {
        let read = { (path: String) throws -> String in
            do { return try String(contentsOfFile: path, encoding: .utf8) } catch { throw ServerError(.dataDirectory, "cannot read \(path)") }
        }
        do {
            return try Identity(certificatePEM: try read(certificate), privateKeyPEM: try read(key))
        } catch let error as PKIError {
            throw ServerError(.dataDirectory, "\(certificate): \(error.description)")
        }
    }

    static func nextCA(_ layout: CoordinatorLayout) throws -> Identity? {
        FileManager.default.fileExists(atPath: layout.nextCACertificate)
            ? try identity(layout.nextCACertificate, layout.nextCAKey) : nil
    }

    /// Starts a rotation: makes the next CA. Refused while one is under way.
    public static func begin(_ layout: CoordinatorLayout, now: Date = Date()) throws -> Identity {
        try recover(layout)
        if try nextCA(layout) != nil {
            throw ServerError(.rotationOutOfTurn, "a CA rotation is already under way (\(layout.nextCACertificate)); see coordinator ca status, then coordinator ca finish")
        }
        let day = ISO8601DateFormatter.string(from: now, timeZone: TimeZone(identifier: "UTC")!, formatOptions: [.withFullDate])
        let next = try PKI.makeCA(now: now, commonName: "\(PKI.caCommonName) (from \(day))")
        // The key first: a certificate without its key is never left behind (recover drops a lone key).
        try Files.writeDurably(Array(next.privateKeyPEM.utf8), to: layout.nextCAKey, mode: 0o600)
        try Files.writeDurably(Array(next.certificatePEM.utf8), to: layout.nextCACertificate, mode: 0o644)
        return next
    }

    /// The workers that would lose the coordinator if the rotation finished now: neither revoked nor expired, with
    /// a certificate not issued by `next`.
    public static func pending(_ workers: [WorkerRecord], next: String, now: Date) -> [WorkerRecord] {
        workers.filter { $0.revokedAt == nil && $0.certificateExpiresAt > now && $0.certificateIssuer != next }
            .sorted { $0.name < $1.name }
    }

    public struct Finished: Encodable, Sendable {
        public var caFingerprint: String
        public var retiredFingerprint: String
        public var retiredCertificate: String
        public var serverNames: [String]
        public var adminSerial: String
        /// Workers left behind by `--force`: they must enroll again.
        public var abandoned: [String]
    }

    /// Ends a rotation: the next CA becomes the CA. Refused while a worker still holds a certificate from the old
    /// CA, unless `force` (those workers must then enroll again).
    /// `stopAtCommit` leaves the committed files staged, as a crash right after the commit would (for tests).
    public static func finish(_ layout: CoordinatorLayout, workers: [WorkerRecord], force: Bool, now: Date = Date(),
                              stopAtCommit: Bool = false) throws -> Finished {
        let trust = try self.trust(layout)
        guard let next = trust.next else {
            throw ServerError(.rotationOutOfTurn, "no CA rotation is under way; start one with coordinator ca begin")
        }
        let nextFingerprint = try PKI.fingerprint(next.certificate)
        let left = pending(workers, next: nextFingerprint, now: now)
        if !left.isEmpty && !force {
            throw ServerError(.workersNotRenewed, "\(left.count) worker(s) still hold a certificate from the current CA and would be refused once it is retired: \(left.map(\.name).joined(separator: ", ")). Keep serve running until they renew (they do at their next heartbeat after serve restarted with the rotation), revoke the ones that are gone, or pass --force to leave them to enroll again.")
        }
        let server = try identity(layout.serverCertificate, layout.serverKey)
        let hosts = try PKI.hostNames(of: server.certificate)
        guard !hosts.isEmpty else { throw ServerError(.dataDirectory, "\(layout.serverCertificate) names no host; make one with coordinator server-certificate first") }
        let newServer = try PKI.makeServerCertificate(ca: next, hosts: hosts, now: now)
        let admin = try PKI.makeClientIdentity(ca: next, commonName: PKI.adminCommonName, now: now)
        let config: String
        do {
            config = CoordinatorConfig.replacing("admin_serial", with: PKI.serial(admin.certificate),
                                                 in: try String(contentsOfFile: layout.config, encoding: .utf8))
        } catch {
            throw ServerError(.dataDirectory, "cannot read \(layout.config)")
        }
        let retiredFingerprint = try PKI.fingerprint(trust.current.certificate)
        let retired = layout.retiredCACertificate(fingerprint: retiredFingerprint)
        try Files.writeDurably(Array(trust.current.certificatePEM.utf8), to: retired, mode: 0o644)
        let files: [(String, String, mode_t)] = [
            ("ca.pem", next.certificatePEM, 0o644), ("ca.key", next.privateKeyPEM, 0o600),
            ("server.pem", newServer.certificatePEM, 0o644), ("server.key", newServer.privateKeyPEM, 0o600),
            ("admin.pem", admin.certificatePEM, 0o644), ("admin.key", admin.privateKeyPEM, 0o600),
            ("coordinator.conf", config, 0o644),
        ]
        for (name, text, mode) in files { try Files.writeDurably(Array(text.utf8), to: staged(layout, name), mode: mode) }
        // The commit point: from here on the rotation completes, whenever the process stops.
        try Files.writeDurably(Array("\(nextFingerprint)\n".utf8), to: layout.rotationCommit, mode: 0o644)
        if !stopAtCommit { try recover(layout) }
        return Finished(caFingerprint: nextFingerprint, retiredFingerprint: retiredFingerprint, retiredCertificate: retired,
                        serverNames: hosts, adminSerial: PKI.serial(admin.certificate), abandoned: left.map(\.name))
    }

    /// Completes a committed finish (moves the staged files into place, removes the next CA's files and the
    /// marker) or discards an uncommitted one; drops the lone key of an interrupted begin.
    public static func recover(_ layout: CoordinatorLayout) throws {
        let fm = FileManager.default
        var changed = false
        if fm.fileExists(atPath: layout.rotationCommit) {
            for name in replaced where fm.fileExists(atPath: staged(layout, name)) {
                try Files.move(staged(layout, name), to: layout.file(name))
            }
            for path in [layout.nextCACertificate, layout.nextCAKey] where fm.fileExists(atPath: path) { try fm.removeItem(atPath: path) }
            try syncDirectory(layout)
            try fm.removeItem(atPath: layout.rotationCommit)
            changed = true
        } else {
            for name in replaced where fm.fileExists(atPath: staged(layout, name)) {
                try fm.removeItem(atPath: staged(layout, name))
                changed = true
            }
        }
        if fm.fileExists(atPath: layout.nextCAKey) && !fm.fileExists(atPath: layout.nextCACertificate) {
            try fm.removeItem(atPath: layout.nextCAKey)
            changed = true
        }
        if changed { try syncDirectory(layout) }
    }

    static func syncDirectory(_ layout: CoordinatorLayout) throws { try Files.syncDirectory(layout.directory.path) }
}
