import Crypto
import Foundation
import SwiftASN1
import X509

/// Whittle's public-key infrastructure: a P-256 certificate authority that signs the coordinator's server
/// certificate, the admin client certificate and every enrolled worker's certificate. Pure: keys and certificates
/// in, PEM and DER out; the callers write the files.
public struct PKIError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// A certificate, key or bundle is not valid PEM (or DER) of the expected kind.
        case malformed
        /// A private key does not belong to the certificate it is paired with.
        case keyMismatch
        /// A certificate signing request's signature does not verify.
        case badSignature
        /// A key of another algorithm than P-256.
        case unsupportedKey
        /// A request the CA cannot sign as asked (a server certificate naming no host).
        case invalidRequest
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

    public var description: String { message }
}

/// A certificate with its private key (PEM both).
public struct Identity: Sendable {
    public var certificate: Certificate
    public var privateKey: P256.Signing.PrivateKey

    public init(certificate: Certificate, privateKey: P256.Signing.PrivateKey) {
        self.certificate = certificate
        self.privateKey = privateKey
    }

    public var certificatePEM: String { (try? certificate.serializeAsPEM().pemString) ?? "" }
    public var privateKeyPEM: String { privateKey.pemRepresentation }

    public init(certificatePEM: String, privateKeyPEM: String) throws {
        do {
            certificate = try Certificate(pemEncoded: certificatePEM)
        } catch {
            throw PKIError(.malformed, "the certificate is not valid PEM: \(error)")
        }
        do {
            privateKey = try P256.Signing.PrivateKey(pemRepresentation: privateKeyPEM)
        } catch {
            throw PKIError(.malformed, "the private key is not a PEM P-256 key: \(error)")
        }
        guard certificate.publicKey == Certificate.PublicKey(privateKey.publicKey) else {
            throw PKIError(.keyMismatch, "the private key does not belong to the certificate")
        }
    }
}

public enum PKI {
    /// Certificates are valid from this many seconds before they are issued, so a board whose clock runs a little
    /// behind accepts them at once.
    public static let clockSkewAllowance: TimeInterval = 300

    /// Common name prefixes: the role of a client certificate is fixed when it is issued.
    public static let adminCommonName = "whittle-admin"
    public static let caCommonName = "Whittle coordinator CA"
    /// Names workers may choose: letters, digits, dot, dash and underscore, 1 to 64 characters.
    public static func isValidWorkerName(_ name: String) -> Bool {
        !name.isEmpty && name.count <= 64 && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) }
            && name != adminCommonName
    }

    /// A new self-signed CA, valid for `years`. A CA made to replace another (`coordinator ca begin`) carries its
    /// date in its common name, so that the two are told apart in logs and by people.
    public static func makeCA(now: Date = Date(), years: Int = 10, commonName: String = caCommonName) throws -> Identity {
        let key = P256.Signing.PrivateKey()
        let name = try DistinguishedName {
            OrganizationName("Whittle")
            CommonName(commonName)
        }
        let certificate = try Certificate(
            version: .v3, serialNumber: newSerial(), publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-300), notValidAfter: now.addingTimeInterval(Double(years) * 365 * 86400),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: .init(key.publicKey))
            },
            issuerPrivateKey: .init(key))
        return Identity(certificate: certificate, privateKey: key)
    }

    /// The server certificate for `hosts` (DNS names or IP addresses), signed by `ca`.
    public static func makeServerCertificate(ca: Identity, hosts: [String], now: Date = Date(), days: Int = 825) throws -> Identity {
        guard !hosts.isEmpty else { throw PKIError(.invalidRequest, "the server certificate needs at least one host name or address") }
        let key = P256.Signing.PrivateKey()
        var names: [GeneralName] = []
        for host in hosts {
            if let bytes = ipAddressBytes(host) { names.append(.ipAddress(ASN1OctetString(contentBytes: bytes[...]))) }
            else { names.append(.dnsName(host)) }
        }
        let certificate = try Certificate(
            version: .v3, serialNumber: newSerial(), publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-300), notValidAfter: now.addingTimeInterval(Double(days) * 86400),
            issuer: ca.certificate.subject, subject: try DistinguishedName { CommonName(hosts[0]) },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth])
                SubjectAlternativeNames(names)
                AuthorityKeyIdentifier(keyIdentifier: try ca.certificate.extensions.subjectKeyIdentifier?.keyIdentifier)
            },
            issuerPrivateKey: .init(ca.privateKey))
        return Identity(certificate: certificate, privateKey: key)
    }

    /// A client certificate for `commonName` and `publicKey`, signed by `ca`. Only the name is set by the caller;
    /// nothing a requester asked for is copied.
    public static func makeClientCertificate(ca: Identity, commonName: String, publicKey: Certificate.PublicKey,
                                             now: Date = Date(), validity: TimeInterval = 365 * 86400,
                                             notBefore: Date? = nil) throws -> Certificate {
        try Certificate(
            version: .v3, serialNumber: newSerial(), publicKey: publicKey,
            notValidBefore: notBefore ?? now.addingTimeInterval(-clockSkewAllowance), notValidAfter: now.addingTimeInterval(validity),
            issuer: ca.certificate.subject,
            subject: try DistinguishedName {
                OrganizationName("Whittle")
                CommonName(commonName)
            },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.clientAuth])
                AuthorityKeyIdentifier(keyIdentifier: try ca.certificate.extensions.subjectKeyIdentifier?.keyIdentifier)
            },
            issuerPrivateKey: .init(ca.privateKey))
    }

    /// A new key pair and a client certificate for it (the admin's).
    public static func makeClientIdentity(ca: Identity, commonName: String, now: Date = Date()) throws -> Identity {
        let key = P256.Signing.PrivateKey()
        let certificate = try makeClientCertificate(ca: ca, commonName: commonName, publicKey: .init(key.publicKey), now: now)
        return Identity(certificate: certificate, privateKey: key)
    }

    /// A certificate signing request for `name`, signed by `key` (made on the board; the key never leaves it).
    public static func makeCSR(name: String, key: P256.Signing.PrivateKey) throws -> [UInt8] {
        let csr = try CertificateSigningRequest(
            version: .v1, subject: try DistinguishedName { CommonName(name) }, privateKey: .init(key),
            attributes: CertificateSigningRequest.Attributes(), signatureAlgorithm: .ecdsaWithSHA256)
        var serializer = DER.Serializer()
        try serializer.serialize(csr)
        return serializer.serializedBytes
    }

    /// Parses a CSR, checks its signature, and returns the public key and the requested common name. Extensions
    /// and other attributes are ignored.
    public static func verifyCSR(_ der: [UInt8]) throws -> (publicKey: Certificate.PublicKey, commonName: String?) {
        let csr: CertificateSigningRequest
        do {
            csr = try CertificateSigningRequest(derEncoded: der)
        } catch {
            throw PKIError(.malformed, "the certificate signing request is not valid DER")
        }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw PKIError(.badSignature, "the certificate signing request's signature does not verify")
        }
        guard P256.Signing.PublicKey(csr.publicKey) != nil else {
            throw PKIError(.unsupportedKey, "the certificate signing request is for a key other than P-256; workers use P-256 keys")
        }
        let commonName = csr.subject.flatMap { $0 }.first { $0.type == .RDNAttributeType.commonName }
            .map { String(describing: $0.value) }
        return (csr.publicKey, commonName)
    }

    /// A random positive serial of at most 20 octets (RFC 5280 §4.1.2.2): 20 random bytes with the top bit clear,
    /// so the DER integer needs no leading zero byte.
    public static func newSerial() -> Certificate.SerialNumber {
        var bytes = randomBytes(20)
        bytes[0] = (bytes[0] & 0x7F) | 0x01 << 6  // positive, and never shorter than 20 octets
        return Certificate.SerialNumber(bytes: bytes)
    }

    /// The SHA-256 fingerprint of a certificate's DER encoding, as lowercase hex.
    public static func fingerprint(_ certificate: Certificate) throws -> String {
        hex(SHA256.hash(data: try der(certificate)))
    }

    public static func der(_ certificate: Certificate) throws -> [UInt8] {
        var serializer = DER.Serializer()
        try serializer.serialize(certificate)
        return serializer.serializedBytes
    }

    /// Every certificate of a PEM bundle (one or more `CERTIFICATE` blocks), in order.
    public static func certificates(pem: String) throws -> [Certificate] {
        let documents: [PEMDocument]
        do {
            documents = try PEMDocument.parseMultiple(pemString: pem)
        } catch {
            throw PKIError(.malformed, "not a PEM certificate bundle: \(error)")
        }
        guard !documents.isEmpty else { throw PKIError(.malformed, "the PEM bundle holds no certificate") }
        return try documents.map { document in
            do { return try Certificate(pemDocument: document) } catch { throw PKIError(.malformed, "a certificate of the bundle is not valid: \(error)") }
        }
    }

    /// A PEM bundle of `certificates`, in order.
    public static func pemBundle(_ certificates: [Certificate]) throws -> String {
        try certificates.map { try $0.serializeAsPEM().pemString + "\n" }.joined()
    }

    /// One fingerprint for a set of trusted CAs, whatever their order: the SHA-256 of their sorted fingerprints.
    /// The coordinator sends it with every heartbeat; a worker whose own set differs renews and receives the set.
    public static func trustFingerprint(_ certificates: [Certificate]) throws -> String {
        let fingerprints = Set(try certificates.map(fingerprint)).sorted()
        return hex(SHA256.hash(data: Data(fingerprints.joined(separator: "\n").utf8)))
    }

    /// The DNS names and IP addresses a server certificate is valid for, as `makeServerCertificate` takes them.
    public static func hostNames(of certificate: Certificate) throws -> [String] {
        guard let names = try certificate.extensions.subjectAlternativeNames else { return [] }
        return names.compactMap { name -> String? in
            switch name {
            case .dnsName(let host): return host
            case .ipAddress(let octets):
                let bytes = Array(octets.bytes)
                let family: Int32
                switch bytes.count {
                case 4: family = AF_INET
                case 16: family = AF_INET6
                default: return nil
                }
                var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
                let ok = bytes.withUnsafeBytes { source in inet_ntop(family, source.baseAddress, &text, socklen_t(text.count)) != nil }
                guard ok else { return nil }
                return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            default: return nil
            }
        }
    }

    /// A stable serial-number string: the serial's bytes in hex, zero-padded.
    public static func serial(_ certificate: Certificate) -> String { hex(certificate.serialNumber.bytes) }

    /// The subject's common name.
    public static func commonName(_ certificate: Certificate) -> String? {
        certificate.subject.flatMap { $0 }.first { $0.type == .RDNAttributeType.commonName }.map { String(describing: $0.value) }
    }

    public static func hex<S: Sequence>(_ bytes: S) -> String where S.Element == UInt8 {
        bytes.map { String(format: "%02x", $0) }.joined()
    }

    /// `count` bytes from the system's cryptographic random source.
    public static func randomBytes(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<count).map { _ in generator.next() }
    }

    /// `count` random bytes as lowercase hex (tokens, session secrets, ids): nothing a shell or an argument parser
    /// reads specially.
    public static func randomHex(_ count: Int) -> String { hex(randomBytes(count)) }

    /// Normalises a fingerprint as people paste it ("AB:CD…", "sha256:abcd…") to lowercase hex.
    public static func normalizedFingerprint(_ text: String) -> String {
        var t = text.lowercased()
        if t.hasPrefix("sha256:") { t.removeFirst(7) }
        return t.filter { $0.isHexDigit }
    }

    static func ipAddressBytes(_ host: String) -> [UInt8]? {
        var v4 = in_addr(), v6 = in6_addr()
        if inet_pton(AF_INET, host, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        if inet_pton(AF_INET6, host, &v6) == 1 { return withUnsafeBytes(of: &v6) { Array($0) } }
        return nil
    }
}
