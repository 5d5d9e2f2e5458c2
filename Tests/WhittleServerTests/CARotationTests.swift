import Foundation
import Testing
import CoordinatorCommands
import WhittleCLI
import WhittlePKI
import WhittleIO
import WhittleServer
import WhittleStore
import X509

/// CA rotation on a real data directory made by `coordinator init`: begin, the finish refused while a worker would
/// be left behind, the finish itself, and a finish interrupted before and after its commit point.
@Suite struct CARotationTests {
    static func dataDirectory() async throws -> (CoordinatorLayout, URL) {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-ca-\(UUID().uuidString)")
        let dir = root.appendingPathComponent("coordinator")
        let command = try InitCommand.parse(["--dir", dir.path, "--hostname", "coord.example.com", "10.0.0.5", "::1"])
        try await command.run()
        return (CoordinatorLayout(dir.path), root)
    }

    static func worker(_ name: String, issuer: String?, revoked: Bool = false) -> WorkerRecord {
        var w = WorkerRecord(name: name, certificateSerial: name + "-serial", certificateExpiresAt: Date().addingTimeInterval(86400),
                             enrolledAt: Date(), certificateIssuer: issuer)
        if revoked { w.revokedAt = Date() }
        return w
    }

    static func signs(_ ca: Certificate, _ certificate: Certificate) -> Bool {
        certificate.issuer == ca.subject && ca.publicKey.isValidSignature(certificate.signature, for: certificate)
    }

    static func read(_ path: String) throws -> String { try String(contentsOfFile: path, encoding: .utf8) }

    @Test func aRotationReplacesTheCAOnceEveryWorkerHasRenewed() async throws {
        let (layout, root) = try await Self.dataDirectory()
        defer { try? FileManager.default.removeItem(at: root) }
        let old = try CARotation.trust(layout)
        #expect(old.next == nil && old.certificates.count == 1)
        #expect { try CARotation.finish(layout, workers: [], force: false) } throws: { ($0 as? ServerError)?.code == .rotationOutOfTurn }

        let next = try CARotation.begin(layout)
        #expect { try CARotation.begin(layout) } throws: { ($0 as? ServerError)?.code == .rotationOutOfTurn }
        let during = try CARotation.trust(layout)
        #expect(during.issuer.certificate == next.certificate && during.current.certificate == old.current.certificate)
        #expect(during.certificates == [old.current.certificate, next.certificate])
        #expect(during.fingerprint != old.fingerprint)
        #expect(PKI.commonName(next.certificate)!.hasPrefix(PKI.caCommonName + " (from "))

        // A worker still on the old CA (recorded issuer, or none from before issuers were recorded) blocks finish;
        // revoked workers and those renewed from the next CA do not.
        let nextFingerprint = try PKI.fingerprint(next.certificate)
        let oldFingerprint = try PKI.fingerprint(old.current.certificate)
        let workers = [Self.worker("renewed", issuer: nextFingerprint), Self.worker("legacy", issuer: nil),
                       Self.worker("stale", issuer: oldFingerprint), Self.worker("gone", issuer: nil, revoked: true)]
        #expect(CARotation.pending(workers, next: nextFingerprint, now: Date()).map(\.name) == ["legacy", "stale"])
        #expect { try CARotation.finish(layout, workers: workers, force: false) } throws: {
            ($0 as? ServerError)?.code == .workersNotRenewed && "\($0)".contains("legacy, stale")
        }
        #expect(try CARotation.trust(layout).next != nil, "a refused finish changes nothing")

        let adminBefore = try Self.read(layout.adminCertificate)
        let finished = try CARotation.finish(layout, workers: workers, force: true)
        #expect(finished.abandoned == ["legacy", "stale"])
        #expect(finished.serverNames == ["coord.example.com", "10.0.0.5", "::1"])
        let after = try CARotation.trust(layout)
        #expect(after.next == nil && after.current.certificate == next.certificate)
        #expect(!FileManager.default.fileExists(atPath: layout.nextCACertificate) && !FileManager.default.fileExists(atPath: layout.nextCAKey))
        let server = try Certificate(pemEncoded: try Self.read(layout.serverCertificate))
        #expect(Self.signs(next.certificate, server))
        #expect(try PKI.hostNames(of: server) == ["coord.example.com", "10.0.0.5", "::1"])
        _ = try CARotation.identity(layout.serverCertificate, layout.serverKey)  // the key matches
        let admin = try CARotation.identity(layout.adminCertificate, layout.adminKey)
        #expect(Self.signs(next.certificate, admin.certificate) && adminBefore != admin.certificatePEM)
        let config = try CoordinatorConfig.parse(try Self.read(layout.config))
        #expect(config.adminSerial == PKI.serial(admin.certificate) && config.adminSerial == finished.adminSerial)
        #expect(try Certificate(pemEncoded: try Self.read(finished.retiredCertificate)) == old.current.certificate)
        #expect(finished.retiredFingerprint == oldFingerprint)
    }

    @Test func aFinishInterruptedAfterItsCommitCompletesAndOneBeforeItIsUndone() async throws {
        let (layout, root) = try await Self.dataDirectory()
        defer { try? FileManager.default.removeItem(at: root) }
        let old = try CARotation.trust(layout).current
        let next = try CARotation.begin(layout)
        let fm = FileManager.default

        // Staged but not committed (the marker is gone, as if the process stopped before writing it): undone.
        _ = try CARotation.finish(layout, workers: [], force: false, stopAtCommit: true)
        try fm.removeItem(atPath: layout.rotationCommit)
        #expect(try Self.read(layout.caCertificate) == old.certificatePEM)
        let undone = try CARotation.trust(layout)
        #expect(undone.current.certificate == old.certificate && undone.next?.certificate == next.certificate)
        #expect(try fm.contentsOfDirectory(atPath: layout.directory.path).allSatisfy { !$0.hasSuffix(".rotated") })

        // Committed, nothing moved yet: the next reader completes it.
        let finished = try CARotation.finish(layout, workers: [], force: false, stopAtCommit: true)
        #expect(try Self.read(layout.caCertificate) == old.certificatePEM, "nothing is moved before recovery")
        let completed = try CARotation.trust(layout)
        #expect(completed.current.certificate == next.certificate && completed.next == nil)
        #expect(try CoordinatorConfig.parse(try Self.read(layout.config)).adminSerial == finished.adminSerial)
        #expect(!fm.fileExists(atPath: layout.rotationCommit))

        // A begin that stopped after writing the next CA's key alone leaves no rotation behind.
        try Files.writeDurably(Array("not used".utf8), to: layout.nextCAKey, mode: 0o600)
        #expect(try CARotation.trust(layout).next == nil)
        #expect(!fm.fileExists(atPath: layout.nextCAKey))
    }

    @Test func replacingOneSettingKeepsTheRestOfTheFile() {
        let text = "# admin_serial = commented\nlisten = 0.0.0.0:8443\n\nadmin_serial = ab\nadmin_serial=cd\n"
        #expect(CoordinatorConfig.replacing("admin_serial", with: "ef", in: text)
                == "# admin_serial = commented\nlisten = 0.0.0.0:8443\n\nadmin_serial = ef\nadmin_serial = ef\n")
        #expect(CoordinatorConfig.replacing("admin_serial", with: "ef", in: "listen = x\n") == "listen = x\nadmin_serial = ef\n")
        #expect(CoordinatorConfig.replacing("admin_serial", with: "ef", in: "admin_serial =\n") == "admin_serial = ef\n")
    }
}
