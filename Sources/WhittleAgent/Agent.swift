import Crypto
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import WhittleIO
import WhittleCompression
import WhittleHTTPClient
import WhittlePKI
import WhittleProtocol
import WhittleTensor
import X509

/// The protocol version this worker speaks.
package let protocolVersion: UInt32 = 1

/// Where things live in a worker's directory.
package struct WorkerLayout {
    package let directory: URL
    package init(_ path: String) { directory = URL(fileURLWithPath: path) }
    package func file(_ name: String) -> String { directory.appendingPathComponent(name).path }
    package var key: String { file("worker.key") }
    package var certificate: String { file("worker.pem") }
    package var ca: String { file("ca.pem") }
    package var state: String { file("worker.json") }
    package var settings: String { file("worker.conf") }
}

/// What a worker remembers between runs (worker.json).
package struct WorkerState: Codable {
    package var name: String
    package var coordinator: String
    package var caFingerprint: String
    package var enrolledAt: Date
    package var lastHeartbeatAt: Date?
    package var lastError: String?
    package var heartbeats: Int = 0

    package init(name: String, coordinator: String, caFingerprint: String, enrolledAt: Date) {
        self.name = name
        self.coordinator = coordinator
        self.caFingerprint = caFingerprint
        self.enrolledAt = enrolledAt
    }

    package static func load(_ layout: WorkerLayout) throws -> WorkerState {
        guard let data = FileManager.default.contents(atPath: layout.state) else {
            throw AgentError(.notEnrolled, "\(layout.directory.path) holds no enrollment (no worker.json); run worker enroll first")
        }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        do {
            return try decoder.decode(WorkerState.self, from: data)
        } catch {
            throw AgentError(.dataDirectory, "\(layout.state) is damaged: \(error)")
        }
    }

    package func save(_ layout: WorkerLayout) throws {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try Data(try encoder.encode(self)).write(to: URL(fileURLWithPath: layout.state), options: .atomic)
    }
}

/// Reads a failed response's `{"error", "message"}` body.
package func errorMessage(_ response: HTTPResponse) -> String {
    if let object = try? JSONDecoder().decode([String: String].self, from: Data(response.body)), let message = object["message"] {
        return "\(response.status) \(object["error"] ?? ""): \(message)"
    }
    return "\(response.status): \(response.text.prefix(200))"
}

/// Renewing the worker's certificate over its current mutual-TLS identity: a new key made on the board, a CSR
/// naming the worker, the coordinator's new certificate, and both written so that a crash at any point leaves a
/// matching key and certificate (the coordinator keeps accepting the old certificate until the new one is used).
package enum CertificateRenewal {
    package static func pending(_ path: String) -> String { path + ".renewed" }

    /// Finishes or abandons a renewal a crash interrupted: every new file was written durably before any was
    /// moved into place, the certificate last, so a new certificate on disk means the swap is completed (key and
    /// trusted CAs moved first); a new key or CA bundle alone is dropped.
    package static func recover(_ layout: WorkerLayout) throws {
        let fm = FileManager.default
        if fm.fileExists(atPath: pending(layout.certificate)) {
            if fm.fileExists(atPath: pending(layout.key)) { try move(pending(layout.key), layout.key) }
            if fm.fileExists(atPath: pending(layout.ca)) { try move(pending(layout.ca), layout.ca) }
            try move(pending(layout.certificate), layout.certificate)
        } else if fm.fileExists(atPath: pending(layout.key)) || fm.fileExists(atPath: pending(layout.ca)) {
            for path in [pending(layout.key), pending(layout.ca)] where fm.fileExists(atPath: path) { try fm.removeItem(atPath: path) }
        } else {
            return
        }
        try Files.syncDirectory(layout.directory.path)
    }

    package static func move(_ from: String, _ to: String) throws { try Files.move(from, to: to) }

    /// A PEM bundle of DER certificates, each checked to parse.
    package static func bundle(_ ders: [Data]) throws -> String {
        do {
            return try PKI.pemBundle(try ders.map { try Certificate(derEncoded: Array($0)) })
        } catch {
            throw AgentError(.coordinatorRefused, "the coordinator sent a CA certificate that does not parse")
        }
    }

    /// Asks for a new certificate, keeps it with its key (and the CAs to trust, when the coordinator lists them),
    /// and switches `client` to them; returns the certificate.
    package static func renew(client: HTTPClient, layout: WorkerLayout, name: String) throws -> Certificate {
        let key = P256.Signing.PrivateKey()
        var request = Whittle_EnrollRequest()
        request.protocolVersion = protocolVersion
        request.csrDer = Data(try PKI.makeCSR(name: name, key: key))
        let response = try client.request("POST", "/v1/worker/renew", body: try request.serializedBytes(),
                                          contentType: "application/x-protobuf")
        guard response.status == 200, let answer = try? Whittle_EnrollResponse(serializedBytes: response.body) else {
            throw AgentError(.coordinatorRefused, "the coordinator refused the renewal (\(errorMessage(response)))")
        }
        let certificate = try Certificate(derEncoded: Array(answer.certificateDer))
        guard certificate.publicKey == Certificate.PublicKey(key.publicKey), answer.name == name else {
            throw AgentError(.coordinatorRefused, "the coordinator's renewed certificate is not for this board's new key and name")
        }
        let certificatePEM = try certificate.serializeAsPEM().pemString
        let caPEM: String
        do { caPEM = try String(contentsOfFile: layout.ca, encoding: .utf8) } catch { throw AgentError(.dataDirectory, "cannot read \(layout.ca)") }
        let trustedPEM = answer.trustedCaDer.isEmpty ? caPEM : try bundle(answer.trustedCaDer)
        try Files.writeDurably(Array(key.pemRepresentation.utf8), to: pending(layout.key), mode: 0o600)
        if trustedPEM != caPEM { try Files.writeDurably(Array(trustedPEM.utf8), to: pending(layout.ca), mode: 0o644) }
        try Files.writeDurably(Array(certificatePEM.utf8), to: pending(layout.certificate), mode: 0o644)
        try recover(layout)
        client.replaceCredentials(TLSCredentials(caPEM: trustedPEM, certificatePEM: certificatePEM, privateKeyPEM: key.pemRepresentation))
        return certificate
    }
}

