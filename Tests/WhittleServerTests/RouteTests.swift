import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import Testing
import CoordinatorCommands
import WhittleCLI
import WhittlePKI
import WhittleProtocol
import WhittleServer
import WhittleStore
import X509

/// Every route's admission and refusals in process, through Hummingbird's router testing: the coordinator's own
/// router and handlers over a real data directory (`coordinator init`) and SQLite store, real certificates from
/// its CA. Without TLS in process, the client certificate comes in a header the test's `ClientCertificates`
/// reads; the TLS layer's own checks are the interop tests' (`test_hostile_peers.py`).
@Suite struct RouteTests {
    /// The certificate a request presents: `Authorization: Test-Certificate <DER in base64>` (tests only:
    /// production reads the TLS handshake's).
    static let scheme = "Test-Certificate "

    struct HeaderCertificates: ClientCertificates {
        func certificate(of request: Request, context: WhittleContext) async throws -> Certificate? {
            guard let text = request.headers[.authorization], text.hasPrefix(RouteTests.scheme),
                  let der = Data(base64Encoded: String(text.dropFirst(RouteTests.scheme.count))) else { return nil }
            return try Certificate(derEncoded: Array(der))
        }
    }

    struct Coordinator {
        let root: URL
        let layout: CoordinatorLayout
        let store: SQLiteStore
        let app: Application<RouterResponder<WhittleContext>>
        let admin: Certificate
        let ca: Identity

        init() async throws {
            root = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-routes-\(UUID().uuidString)")
            let dir = root.appendingPathComponent("coordinator")
            try await InitCommand.parse(["--dir", dir.path, "--hostname", "coord.example.com"]).run()
            layout = CoordinatorLayout(dir.path)
            let config = try CoordinatorConfig.parse(try String(contentsOfFile: layout.config, encoding: .utf8))
            let trust = try CARotation.trust(layout)
            ca = trust.current
            store = try SQLiteStore(path: layout.database)
            let state = try ServerState(store: store, trust: trust, config: config, directory: layout.directory, artifacts: layout.artifacts,
                                        logger: Logger(label: "routes"), clientCertificates: HeaderCertificates())
            app = Application(router: CoordinatorServer.router(state: state))
            admin = try PKI.certificates(pem: try String(contentsOfFile: layout.adminCertificate, encoding: .utf8))[0]
        }

        /// A worker enrolled with a certificate of this CA (revoked when asked).
        func worker(_ name: String, revoked: Bool = false) async throws -> Certificate {
            let identity = try PKI.makeClientIdentity(ca: ca, commonName: name)
            let now = Date()
            try await store.addToken(TokenRecord(hash: "t-\(name)", createdAt: now, expiresAt: now.addingTimeInterval(3600), uses: 1))
            _ = try await store.enroll(tokenHash: "t-\(name)", worker: WorkerRecord(
                name: name, certificateSerial: PKI.serial(identity.certificate), certificateExpiresAt: identity.certificate.notValidAfter,
                enrolledAt: now), now: now)
            if revoked { _ = try await store.revoke(name: name, at: now) }
            return identity.certificate
        }
    }

    static func headers(_ certificate: Certificate?, _ extra: HTTPFields = [:]) throws -> HTTPFields {
        var h = extra
        if let certificate { h[.authorization] = scheme + Data(try PKI.der(certificate)).base64EncodedString() }
        return h
    }

    /// The error code of a JSON refusal.
    static func code(_ response: TestResponse) -> String? {
        (try? JSONDecoder().decode([String: String].self, from: Data(buffer: response.body)))?["error"]
    }

    @Test func routesAdmitOnlyTheirRole() async throws {
        let c = try await Coordinator()
        defer { try? FileManager.default.removeItem(at: c.root) }
        let worker = try await c.worker("camera-1")
        let revoked = try await c.worker("camera-2", revoked: true)
        let stranger = try PKI.makeClientIdentity(ca: try PKI.makeCA(commonName: "another CA"), commonName: "camera-3").certificate
        try await c.app.test(.router) { client in
            // Open routes.
            for path in ["/healthz", "/readyz", "/v1/ca"] {
                #expect(try await client.execute(uri: path, method: .get).status == .ok, "\(path)")
            }
            let workerRoutes: [(HTTPRequest.Method, String)] = [(.post, "/v1/worker/heartbeat"), (.get, "/v1/worker/artifacts/" + String(repeating: "a", count: 64)),
                                                                (.post, "/v1/worker/reports"), (.post, "/v1/worker/renew")]
            let adminRoutes: [(HTTPRequest.Method, String)] = [(.get, "/admin/v1/tokens"), (.post, "/admin/v1/tokens"), (.get, "/admin/v1/workers"),
                                                               (.get, "/admin/v1/rounds"), (.post, "/admin/v1/rounds"), (.post, "/admin/v1/artifacts")]
            for (method, path) in workerRoutes + adminRoutes {
                let none = try await client.execute(uri: path, method: method)
                #expect(none.status == .unauthorized && Self.code(none) == "client_certificate_required", "\(method) \(path)")
            }
            for (method, path) in workerRoutes {
                let admin = try await client.execute(uri: path, method: method, headers: try Self.headers(c.admin))
                #expect(admin.status == .forbidden && Self.code(admin) == "worker_certificate_required", "\(path)")
                let gone = try await client.execute(uri: path, method: method, headers: try Self.headers(revoked))
                #expect(gone.status == .forbidden && Self.code(gone) == "revoked", "\(path)")
                let foreign = try await client.execute(uri: path, method: method, headers: try Self.headers(stranger))
                #expect(foreign.status == .forbidden && Self.code(foreign) == "worker_certificate_required", "\(path)")
            }
            for (method, path) in adminRoutes {
                let w = try await client.execute(uri: path, method: method, headers: try Self.headers(worker))
                #expect(w.status == .forbidden && Self.code(w) == "admin_certificate_required", "\(path)")
            }
            // Admitted: the admin lists, a worker heartbeats (idle, not held).
            #expect(try await client.execute(uri: "/admin/v1/workers", method: .get, headers: try Self.headers(c.admin)).status == .ok)
            var beat = Whittle_Heartbeat()
            beat.protocolVersion = 1
            let beatBytes: [UInt8] = try beat.serializedBytes()
            let answered = try await client.execute(uri: "/v1/worker/heartbeat", method: .post,
                                                    headers: try Self.headers(worker, [.contentType: "application/x-protobuf"]),
                                                    body: ByteBuffer(bytes: beatBytes))
            #expect(answered.status == .ok)
            let answerBytes: [UInt8] = answered.body.getBytes(at: answered.body.readerIndex, length: answered.body.readableBytes) ?? []
            #expect(try Whittle_HeartbeatResponse(serializedBytes: answerBytes).pollSeconds > 0)
            let metrics = try await client.execute(uri: "/metrics", method: .get)
            #expect(metrics.status == .unauthorized && Self.code(metrics) == "metrics_unauthorized")
            #expect(try await client.execute(uri: "/metrics", method: .get, headers: try Self.headers(c.admin)).status == .ok)
            let unknown = try await client.execute(uri: "/v1/nothing", method: .get)
            #expect(unknown.status == .notFound && Self.code(unknown) == "unknown_route")
        }
    }

    @Test func roundAndTokenRefusalsCarryTheirCodes() async throws {
        let c = try await Coordinator()
        defer { try? FileManager.default.removeItem(at: c.root) }
        let worker = try await c.worker("camera-1")
        try await c.app.test(.router) { client in
            let admin = try Self.headers(c.admin)
            func call(_ method: HTTPRequest.Method, _ path: String, _ headers: HTTPFields, body: [UInt8]? = nil) async throws -> TestResponse {
                try await client.execute(uri: path, method: method, headers: headers, body: body.map { ByteBuffer(bytes: $0) })
            }
            let cases: [(HTTPRequest.Method, String, [UInt8]?, HTTPResponse.Status, String)] = [
                (.get, "/admin/v1/rounds/r-none", nil, .notFound, "unknown_round"),
                (.post, "/admin/v1/rounds/r-none/cancel", nil, .notFound, "unknown_round"),
                (.get, "/admin/v1/rounds/r-none/report", nil, .notFound, "unknown_round"),
                (.get, "/admin/v1/rounds/r-none/model", nil, .notFound, "unknown_round"),
                (.post, "/admin/v1/tokens/xyz/revoke", nil, .badRequest, "bad_token_id"),
                (.post, "/admin/v1/tokens/" + String(repeating: "a", count: 16) + "/revoke", nil, .notFound, "unknown_token"),
                (.get, "/admin/v1/workers/nobody", nil, .notFound, "unknown_worker"),
            ]
            for (method, path, body, status, code) in cases {
                let r = try await call(method, path, admin, body: body)
                #expect(r.status == status && Self.code(r) == code, "\(method) \(path): \(r.status) \(Self.code(r) ?? "-")")
            }
            // A plan naming a model the coordinator does not hold, and one that is not JSON.
            var plan = RoundPlanStub()
            plan.modelSHA256 = String(repeating: "b", count: 64)
            let unknownModel = try await call(.post, "/admin/v1/rounds", admin, body: Array(try JSONEncoder().encode(plan)))
            #expect(unknownModel.status == .notFound && Self.code(unknownModel) == "unknown_artifact", "\(Self.code(unknownModel) ?? "-")")
            let garbage = try await call(.post, "/admin/v1/rounds", admin, body: Array("{".utf8))
            #expect(garbage.status == .badRequest && Self.code(garbage) == "malformed_json", "\(garbage.status)")
            // A worker without a task uploads a report; an artifact that does not exist.
            let report = try await call(.post, "/v1/worker/reports", try Self.headers(worker, [.contentType: "application/x-protobuf", .contentLength: "4"]),
                                        body: [1, 2, 3, 4])
            #expect(report.status == .conflict && Self.code(report) == "stale_report", "\(report.status) \(Self.code(report) ?? "-")")
            let missing = try await call(.get, "/v1/worker/artifacts/" + String(repeating: "c", count: 64), try Self.headers(worker))
            #expect(missing.status == .notFound && Self.code(missing) == "unknown_artifact", "\(missing.status)")
            let badHeartbeat = try await call(.post, "/v1/worker/heartbeat", try Self.headers(worker, [.contentType: "application/x-protobuf"]),
                                              body: [0xFF, 0xFF, 0xFF])
            #expect(badHeartbeat.status == .badRequest && Self.code(badHeartbeat) == "malformed_message",
                    "\(badHeartbeat.status) \(Self.code(badHeartbeat) ?? "-")")
        }
    }

    /// The smallest plan the route decodes (the rest takes its defaults, as stored plans do).
    struct RoundPlanStub: Encodable {
        var modelSHA256 = ""
        var modelName = "m.onnx"
    }
}
