import Crypto
import Foundation
import SwiftASN1
import Testing
import WhittlePKI
import X509

@Suite struct PKITests {
    @Test func caSignsServerAndClientCertificatesThatVerify() async throws {
        let ca = try PKI.makeCA()
        let server = try PKI.makeServerCertificate(ca: ca, hosts: ["coordinator.local", "127.0.0.1", "::1"])
        let san = try #require(try server.certificate.extensions.subjectAlternativeNames)
        #expect(san.contains(.dnsName("coordinator.local")))
        #expect(san.count == 3)
        let admin = try PKI.makeClientIdentity(ca: ca, commonName: PKI.adminCommonName)
        for leaf in [server.certificate, admin.certificate] {
            var verifier = Verifier(rootCertificates: CertificateStore([ca.certificate])) { RFC5280Policy() }
            let result = await verifier.validate(leaf: leaf, intermediates: CertificateStore())
            guard case .validCertificate = result else {
                Issue.record("\(PKI.commonName(leaf) ?? "?") does not chain to the CA: \(result)")
                return
            }
        }
        // PEM round trip; a key that does not match the certificate is refused.
        let copy = try Identity(certificatePEM: admin.certificatePEM, privateKeyPEM: admin.privateKeyPEM)
        #expect(copy.certificate == admin.certificate)
        #expect { try Identity(certificatePEM: admin.certificatePEM, privateKeyPEM: server.privateKeyPEM) } throws: {
            ($0 as? PKIError)?.code == .keyMismatch
        }
        #expect { try Identity(certificatePEM: admin.certificatePEM, privateKeyPEM: "not a key") } throws: { ($0 as? PKIError)?.code == .malformed }
    }

    /// A bundle of CAs parses back in order; its trust fingerprint ignores order and duplicates and changes with the
    /// set; a server certificate's names come back as they were given.
    @Test func bundlesTrustFingerprintsAndHostNames() throws {
        let a = try PKI.makeCA(), b = try PKI.makeCA(commonName: "\(PKI.caCommonName) (from 2026-12-06)")
        let bundle = try PKI.pemBundle([a.certificate, b.certificate])
        #expect(try PKI.certificates(pem: bundle) == [a.certificate, b.certificate])
        #expect(try PKI.certificates(pem: a.certificatePEM) == [a.certificate])
        #expect { try PKI.certificates(pem: "no certificate here") } throws: { ($0 as? PKIError)?.code == .malformed }
        #expect { try PKI.makeServerCertificate(ca: a, hosts: []) } throws: { ($0 as? PKIError)?.code == .invalidRequest }
        let ab = try PKI.trustFingerprint([a.certificate, b.certificate])
        #expect(try PKI.trustFingerprint([b.certificate, a.certificate, b.certificate]) == ab)
        #expect(try PKI.trustFingerprint([a.certificate]) != ab && ab.count == 64)
        // Hand-computed: SHA-256 over the one fingerprint (no separator for a single CA).
        let single = try PKI.fingerprint(a.certificate)
        #expect(try PKI.trustFingerprint([a.certificate]) == PKI.hex(SHA256.hash(data: Data(single.utf8))))
        let hosts = ["coordinator.local", "10.0.0.5", "::1", "fd00::17"]
        let server = try PKI.makeServerCertificate(ca: a, hosts: hosts)
        #expect(try PKI.hostNames(of: server.certificate) == hosts)
        #expect(try PKI.hostNames(of: a.certificate) == [])
    }

    @Test func csrsAreVerifiedAndOnlyTheNameIsTaken() throws {
        let key = P256.Signing.PrivateKey()
        let der = try PKI.makeCSR(name: "board-7", key: key)
        let (publicKey, name) = try PKI.verifyCSR(der)
        #expect(name == "board-7")
        #expect(publicKey == Certificate.PublicKey(key.publicKey))
        // A flipped byte near the end (inside the signature) breaks it.
        var broken = der
        broken[broken.count - 5] ^= 0x01
        #expect { try PKI.verifyCSR(broken) } throws: { ($0 as? PKIError)?.code == .badSignature }
        #expect { try PKI.verifyCSR([0x30, 0x03, 0x02, 0x01, 0x00]) } throws: { ($0 as? PKIError)?.code == .malformed }
        let ca = try PKI.makeCA()
        let issued = try PKI.makeClientCertificate(ca: ca, commonName: name!, publicKey: publicKey)
        #expect(PKI.commonName(issued) == "board-7")
        #expect(issued.issuer == ca.certificate.subject)
    }

    @Test func fingerprintsAndNames() throws {
        let ca = try PKI.makeCA()
        let f = try PKI.fingerprint(ca.certificate)
        #expect(f.count == 64)
        #expect(PKI.normalizedFingerprint("SHA256:" + f.uppercased().enumerated().map { $0.offset % 2 == 1 && $0.offset < 63 ? "\($0.element):" : "\($0.element)" }.joined()) == f)
        let serial = PKI.serial(ca.certificate)
        #expect(serial.allSatisfy { $0.isHexDigit })
        #expect(PKI.isValidWorkerName("cam-07.line_3"))
        for bad in ["", "with space", "ünïcode", String(repeating: "x", count: 65), PKI.adminCommonName, "a/b"] {
            #expect(!PKI.isValidWorkerName(bad), "\(bad)")
        }
    }
}
