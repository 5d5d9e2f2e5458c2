import Crypto
import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOCore
import NIOSSL
import ServiceLifecycle
import SwiftProtobuf
import WhittlePKI
import WhittleCompression
import WhittleProtocol
import WhittleRounds
import WhittleStore
import X509

/// The wire protocol version this coordinator speaks.
public let protocolVersion: UInt32 = 1

/// The request context: the channel (for the peer certificate) and, once the middleware has checked it, who the
/// client is.
public struct WhittleContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    let channel: any Channel
    var workerName: String?
    /// The serial of the client certificate the request came with (worker routes).
    var certificateSerial: String?

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }

    var remoteAddress: String? { channel.remoteAddress?.ipAddress }
}

/// An error answered as `{"error": code, "message": …}` with a status.
package struct APIError: HTTPResponseError {
    package let status: HTTPResponse.Status
    package let code: String
    package let message: String
    var retryAfter: Int?

    init(_ status: HTTPResponse.Status, _ code: String, _ message: String, retryAfter: Int? = nil) {
        self.status = status
        self.code = code
        self.message = message
        self.retryAfter = retryAfter
    }

    var headers: HTTPFields {
        var h: HTTPFields = [.contentType: "application/json"]
        if let retryAfter { h[.retryAfter] = "\(retryAfter)" }
        return h
    }

    package func response(from request: Request, context: some RequestContext) throws -> Response {
        let body = (try? JSONEncoder().encode(["error": code, "message": message])) ?? Data()
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }
}

extension APIError {
    /// A round's refusal as the routes answer it: its code, and the HTTP status that code maps to.
    init(_ error: RoundError) {
        let status: HTTPResponse.Status = switch error.code {
        case .unknownRound, .unknownArtifact: .notFound
        case .roundEnded, .alreadyReported, .staleReport, .quorum, .notReady: .conflict
        case .badReport, .badPlan, .badModel: .badRequest
        case .tooLarge: .contentTooLarge
        case .invalidReport: .unprocessableContent
        }
        self.init(status, error.code.rawValue, error.message)
    }

    /// The code of an error a route answers with, if it is one of Whittle's refusals.
    static func code(of error: any Error) -> String? {
        (error as? APIError)?.code ?? (error as? RoundError)?.code.rawValue
    }
}

/// The round service's refusals reach HTTP only here, in the routes' error handling.
extension RoundError: HTTPResponseError {
    public var status: HTTPResponse.Status { APIError(self).status }
    public func response(from request: Request, context: some RequestContext) throws -> Response {
        try APIError(self).response(from: request, context: context)
    }
}

/// Where a request's client certificate comes from: the TLS channel (`TLSClientCertificates`); in-process route
/// tests, which have no TLS, supply theirs.
package protocol ClientCertificates: Sendable {
    func certificate(of request: Request, context: WhittleContext) async throws -> Certificate?
}

/// The certificate the client presented in the TLS handshake (already checked to chain to a trusted CA and be
/// within its validity by the TLS layer), or nil when it presented none.
struct TLSClientCertificates: ClientCertificates {
    func certificate(of request: Request, context: WhittleContext) async throws -> Certificate? {
        guard let peer = try await context.channel.nioSSL_peerCertificate().get() else { return nil }
        return try Certificate(derEncoded: try peer.toDERBytes())
    }
}

/// Everything the handlers share.
package final class ServerState: Sendable {
    let store: any CoordinatorStore
    /// The current CA (it signs the server certificate; enrolling workers pin it) and, during a CA rotation, the
    /// next one (it issues worker certificates).
    let trust: CARotation.Trust
    var ca: Identity { trust.current }
    let config: CoordinatorConfig
    let limiter: RateLimiter
    let logger: Logger
    /// Files workers download (compressed models), named by their SHA-256.
    let artifacts: URL
    let rounds: RoundService
    let metrics: CoordinatorMetrics
    let dashboard: DashboardSessions
    let uploads: UploadGate
    let clientCertificates: any ClientCertificates

    /// `replica`: this replica's name when the store is shared (PostgreSQL): report blobs and artifacts then live
    /// in the store too, and the rounds' lease decides which replica closes phases.
    package init(store: any CoordinatorStore, trust: CARotation.Trust, config: CoordinatorConfig, directory: URL, artifacts: URL, logger: Logger,
                 clientCertificates: any ClientCertificates = TLSClientCertificates(), replica: String? = nil) throws {
        self.clientCertificates = clientCertificates
        self.artifacts = artifacts
        let metrics = CoordinatorMetrics()
        self.metrics = metrics
        let shared = replica != nil ? store as? any BlobStore : nil
        rounds = try RoundService(store: store, directory: directory, artifacts: artifacts, pollSeconds: config.heartbeatSeconds,
                                  logger: logger, metrics: metrics,
                                  privacyBudget: config.privacyBudget > 0 ? PrivacyPlan(epsilon: config.privacyBudget, delta: config.privacyDelta) : nil,
                                  blobs: shared, sharedArtifacts: shared,
                                  replication: replica.map { RoundService.Replication(holder: $0, leaseSeconds: Double(config.replicaLeaseSeconds)) })
        self.store = store
        self.trust = trust
        self.config = config
        self.limiter = RateLimiter(rate: config.enrollRatePerSecond, burst: Double(config.enrollBurst))
        self.logger = logger
        uploads = UploadGate(budget: config.uploadMemoryLimit)
        dashboard = DashboardSessions(store: store)
    }
}

/// Admission for report bodies: one upload in flight per worker, and the bytes of all uploads in flight within a
/// budget (a single upload larger than the budget is admitted alone), so concurrent uploads cannot exhaust memory.
actor UploadGate {
    let budget: Int
    var inFlight: [String: Int] = [:]
    var total = 0

    init(budget: Int) { self.budget = budget }

    /// Reserves `bytes` for `worker`'s upload or throws 429 (the worker is already uploading) or 503 (the budget
    /// is spent; Retry-After tells when to try again).
    func enter(worker: String, bytes: Int) throws {
        guard inFlight[worker] == nil else {
            throw APIError(.tooManyRequests, "upload_in_progress", "worker '\(worker)' already has an upload in flight", retryAfter: 1)
        }
        guard total == 0 || total + bytes <= budget else {
            throw APIError(.serviceUnavailable, "uploads_busy",
                "\(inFlight.count) uploads (\(total) bytes) are in flight; this one (\(bytes) bytes) waits for room", retryAfter: 2)
        }
        inFlight[worker] = bytes
        total += bytes
    }

    func leave(worker: String) {
        total -= inFlight.removeValue(forKey: worker) ?? 0
    }
}

/// A token bucket per client address. Buckets that have refilled are forgotten (a full bucket and no bucket
/// behave alike), so memory follows the addresses active in the last `burst / rate` seconds, not every address
/// ever seen.
package actor RateLimiter {
    let rate: Double
    let burst: Double
    var buckets: [String: (tokens: Double, at: ContinuousClock.Instant)] = [:]
    /// Bucket count that triggers the next sweep of refilled buckets (doubles with the live count).
    var sweepAt = 1024

    package init(rate: Double, burst: Double) {
        self.rate = rate
        self.burst = burst
    }

    package var bucketCount: Int { buckets.count }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
    }

    /// Nil when allowed; otherwise the seconds to wait.
    package func take(_ key: String, now: ContinuousClock.Instant = .now) -> Int? {
        if buckets.count >= sweepAt {
            buckets = buckets.filter { $0.value.tokens + Self.seconds(now - $0.value.at) * rate < burst }
            sweepAt = max(1024, 2 * buckets.count)
        }
        var bucket = buckets[key] ?? (burst, now)
        let seconds = Self.seconds(now - bucket.at)
        bucket.tokens = min(burst, bucket.tokens + seconds * rate)
        bucket.at = now
        defer { buckets[key] = bucket }
        if bucket.tokens >= 1 {
            bucket.tokens -= 1
            return nil
        }
        return max(1, Int(((1 - bucket.tokens) / rate).rounded(.up)))
    }
}

/// Turns the router's own refusals (unknown route, wrong method) into the JSON error body every refusal has.
struct JSONErrorsMiddleware: RouterMiddleware {
    func handle(_ request: Request, context: WhittleContext,
                next: (Request, WhittleContext) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let error as HTTPError {
            throw APIError(error.status, error.status == .notFound ? "unknown_route" : "http_error",
                           error.body ?? "\(request.method) \(request.uri.path): \(error.status.reasonPhrase)")
        }
    }
}

/// Admits only clients presenting a certificate of the given role: the admin certificate, or an enrolled,
/// unrevoked worker's. The TLS layer already refused certificates that do not chain to the CA or have expired.
struct ClientCertificateMiddleware: RouterMiddleware {
    enum Role { case admin, worker }
    let role: Role
    let state: ServerState

    func handle(_ request: Request, context: WhittleContext,
                next: (Request, WhittleContext) async throws -> Response) async throws -> Response {
        guard let certificate = try await state.clientCertificates.certificate(of: request, context: context) else {
            throw APIError(.unauthorized, "client_certificate_required", "this route needs a client certificate")
        }
        let serial = PKI.serial(certificate)
        var context = context
        switch role {
        case .admin:
            guard !state.config.adminSerial.isEmpty, serial == state.config.adminSerial else {
                throw APIError(.forbidden, "admin_certificate_required", "this route needs the admin certificate")
            }
        case .worker:
            guard let worker = try await state.store.worker(serial: serial) else {
                throw APIError(.forbidden, "worker_certificate_required", "this route needs an enrolled worker's certificate")
            }
            guard worker.revokedAt == nil else {
                throw APIError(.forbidden, "revoked", "worker '\(worker.name)' has been revoked")
            }
            // The first request with a renewed certificate retires the one it replaced.
            if worker.previousSerial != nil, serial == worker.certificateSerial {
                try await state.store.confirmRenewal(name: worker.name)
                state.logger.info("renewed certificate in use", metadata: ["worker.name": "\(worker.name)", "certificate.serial": "\(serial)"])
            }
            context.workerName = worker.name
            context.certificateSerial = serial
        }
        return try await next(request, context)
    }
}

/// The coordinator's HTTPS application.
public enum CoordinatorServer {
    package static func router(state: ServerState) -> Router<WhittleContext> {
        let router = Router(context: WhittleContext.self)
        router.add(middleware: MetricsMiddleware(metrics: state.metrics))
        router.add(middleware: JSONErrorsMiddleware())
        router.get("/healthz") { _, _ in "ok\n" }
        router.get("/readyz") { _, _ -> Response in
            do {
                try await state.store.ping()
                return Response(status: .ok, body: .init(byteBuffer: ByteBuffer(string: "ready\n")))
            } catch {
                return Response(status: .serviceUnavailable, body: .init(byteBuffer: ByteBuffer(string: "not ready\n")))
            }
        }
        router.get("/v1/ca") { _, _ -> Response in
            Response(status: .ok, headers: [.contentType: "application/x-pem-file"],
                     body: .init(byteBuffer: ByteBuffer(string: state.ca.certificatePEM)))
        }
        router.get("/metrics") { request, context -> Response in
            try await metricsAuthorized(request, context, state)
            let text = try await state.metrics.render(store: state.store)
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                            body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        router.post("/v1/enroll") { request, context in try await enroll(request, context, state) }

        let worker = router.group("/v1/worker").add(middleware: ClientCertificateMiddleware(role: .worker, state: state))
        worker.post("/heartbeat") { request, context in try await heartbeat(request, context, state) }
        worker.get("/artifacts/:sha256") { request, context in
            try await artifact(request, context, name: context.parameters.get("sha256") ?? "", state)
        }
        worker.post("/reports") { request, context in try await taskReport(request, context, state) }
        worker.post("/renew") { request, context in try await renew(request, context, state) }

        let admin = router.group("/admin/v1").add(middleware: ClientCertificateMiddleware(role: .admin, state: state))
        admin.post("/tokens") { request, context in try await createToken(request, context, state) }
        admin.get("/tokens") { _, _ -> Response in
            let now = Date()
            return try json(try await state.store.tokens().map { TokenView($0, now: now) })
        }
        admin.post("/tokens/:id/revoke") { _, context -> Response in
            let id = (context.parameters.get("id") ?? "").lowercased()
            guard id.count >= 8, id.count <= 64, id.allSatisfy(\.isHexDigit) else {
                throw APIError(.badRequest, "bad_token_id", "a token id is 8 to 64 hex digits of its hash, as `token list` shows")
            }
            let matches = try await state.store.tokens().filter { $0.hash.hasPrefix(id) }
            guard let token = matches.first else { throw APIError(.notFound, "unknown_token", "no token with id \(id)") }
            guard matches.count == 1 else { throw APIError(.conflict, "ambiguous_token_id", "\(matches.count) tokens start with \(id); give more digits") }
            _ = try await state.store.revokeToken(hash: token.hash, at: Date())
            state.logger.info("token revoked", metadata: ["token.id": "\(token.hash.prefix(16))"])
            return try json(TokenView(try await state.store.token(hash: token.hash)!, now: Date()))
        }
        admin.get("/workers") { _, _ -> Response in try json(try await workerViews(state)) }
        admin.get("/workers/:name") { _, context -> Response in
            let name = context.parameters.get("name") ?? ""
            guard let w = try await state.store.worker(named: name) else {
                throw APIError(.notFound, "unknown_worker", "no worker is called '\(name)'")
            }
            return try json(WorkerView(w, now: Date()))
        }
        admin.post("/gc") { _, _ -> Response in
            try json(try await state.rounds.collectGarbage(retentionDays: state.config.retentionDays))
        }
        admin.post("/workers/:name/renew") { _, context -> Response in
            let name = context.parameters.get("name") ?? ""
            guard try await state.store.requestRenewal(name: name, at: Date()), let w = try await state.store.worker(named: name) else {
                throw APIError(.notFound, "unknown_worker", "no worker '\(name)'")
            }
            state.logger.info("certificate renewal requested", metadata: ["worker.name": "\(name)"])
            return try json(WorkerView(w, now: Date()))
        }
        admin.post("/workers/:name/revoke") { _, context -> Response in
            let name = context.parameters.get("name") ?? ""
            guard try await state.store.revoke(name: name, at: Date()) else {
                throw APIError(.notFound, "unknown_worker", "no worker is called '\(name)'")
            }
            state.logger.info("revoked", metadata: ["worker.name": "\(name)"])
            return try json(WorkerView(try await state.store.worker(named: name)!, now: Date()))
        }
        admin.post("/artifacts") { request, _ -> Response in
            let bytes = try await body(request, limit: state.config.modelBodyLimit)
            guard !bytes.isEmpty else { throw APIError(.badRequest, "empty_artifact", "the artifact is empty") }
            let sha = try await state.rounds.storeArtifact(bytes)
            return try json(["sha256": sha, "bytes": "\(bytes.count)"])
        }
        admin.post("/rounds") { request, _ -> Response in
            let bytes = try await body(request, limit: state.config.adminBodyLimit)
            var plan: RoundPlan
            do {
                plan = try RoundPlan.stored(Data(bytes))
            } catch {
                throw APIError(.badRequest, "malformed_json", "the body is not a round plan: \(error)")
            }
            // The coordinator's default (`secure_aggregation`) for a plan that does not say.
            if plan.secureAggregation == nil, state.config.secureAggregation { plan.secureAggregation = true }
            let round = try await state.rounds.start(plan)
            return try json(try await state.rounds.view(round))
        }
        admin.get("/rounds") { _, _ -> Response in try json(try await roundViews(state)) }
        admin.get("/rounds/:id") { _, context -> Response in
            let id = context.parameters.get("id") ?? ""
            guard let r = try await state.store.round(id: id) else { throw APIError(.notFound, "unknown_round", "no round '\(id)'") }
            return try json(try await state.rounds.view(r))
        }
        admin.post("/rounds/:id/cancel") { _, context -> Response in
            let round = try await state.rounds.cancel(context.parameters.get("id") ?? "")
            return try json(try await state.rounds.view(round))
        }
        admin.post("/rounds/:id/pick") { request, context -> Response in
            struct Pick: Decodable { var candidate: Int?; var kind: String?; var best: Bool? }
            let bytes = try await body(request, limit: state.config.adminBodyLimit)
            let pick: Pick
            do { pick = try JSONDecoder().decode(Pick.self, from: Data(bytes)) } catch {
                throw APIError(.badRequest, "malformed_json", "the body is not a pick {candidate, kind, best}: \(error)")
            }
            let round = try await state.rounds.pick(context.parameters.get("id") ?? "", candidate: pick.candidate, kind: pick.kind,
                                                    best: pick.best ?? false)
            return try json(try await state.rounds.view(round))
        }
        admin.get("/rounds/:id/search") { _, context -> Response in
            try json(try await state.rounds.search(context.parameters.get("id") ?? ""))
        }
        admin.get("/rounds/:id/report") { _, context -> Response in
            try json(try await state.rounds.report(context.parameters.get("id") ?? ""))
        }
        admin.get("/rounds/:id/model") { request, context -> Response in
            try await artifact(request, context, name: try await state.rounds.finalModel(context.parameters.get("id") ?? ""), state)
        }
        DashboardRoutes.add(to: router, admin: admin, state: state)
        return router
    }

    static func workerViews(_ state: ServerState) async throws -> [WorkerView] {
        let now = Date()
        return try await state.store.workers().map { WorkerView($0, now: now) }
    }

    static func roundViews(_ state: ServerState) async throws -> [RoundView] {
        var views: [RoundView] = []
        for r in try await state.store.rounds() { views.append(try await state.rounds.view(r)) }
        return views
    }

    /// Whether the client presented the admin certificate (the TLS layer already checked that it chains to the CA
    /// and has not expired).
    static func presentsAdminCertificate(_ request: Request, _ context: WhittleContext, _ state: ServerState) async throws -> Bool {
        guard !state.config.adminSerial.isEmpty,
              let certificate = try await state.clientCertificates.certificate(of: request, context: context) else { return false }
        return PKI.serial(certificate) == state.config.adminSerial
    }

    /// `/metrics` admits the admin certificate, or `Authorization: Bearer METRICS_TOKEN` when `metrics_token` is
    /// set (for a Prometheus server that scrapes without a client certificate).
    static func metricsAuthorized(_ request: Request, _ context: WhittleContext, _ state: ServerState) async throws {
        if try await presentsAdminCertificate(request, context, state) { return }
        if !state.config.metricsToken.isEmpty, let header = request.headers[.authorization] {
            // Compared as SHA-256 digests, in constant time: neither the token nor its length leaks through timing.
            let expected = Array(SHA256.hash(data: Data("Bearer \(state.config.metricsToken)".utf8)))
            let given = Array(SHA256.hash(data: Data(header.utf8)))
            guard zip(given, expected).reduce(0, { $0 | ($1.0 ^ $1.1) }) == 0 else {
                throw APIError(.unauthorized, "bad_metrics_token", "the bearer token does not match metrics_token")
            }
            return
        }
        throw APIError(.unauthorized, "metrics_unauthorized",
                       "/metrics needs the admin certificate\(state.config.metricsToken.isEmpty ? "" : " or the bearer token metrics_token")")
    }

    /// `POST /v1/worker/reports`: a task's result (TaskReport). Durable before the 200; a retried upload id is
    /// answered `duplicate` and not counted again.
    static func taskReport(_ request: Request, _ context: WhittleContext, _ state: ServerState) async throws -> Response {
        let duplicate: Bool, size: Int
        do {
            (duplicate, size) = try await acceptReport(request, context, state)
        } catch {
            if let code = APIError.code(of: error) { state.metrics.report(result: "refused", reason: code) }
            throw error
        }
        state.metrics.report(result: duplicate ? "duplicate" : "accepted", bytes: size)
        Task { await state.rounds.tick() }
        var response = Whittle_TaskReportResponse()
        response.duplicate = duplicate
        return try protobuf(response)
    }

    /// Reads, checks and hands a report to the round service: whether it was a duplicate, and its size. Before a
    /// byte of the body is read: the worker must hold the open phase's task, the declared length must fit the
    /// phase's limit, the worker may have one upload in flight, and all uploads together must fit the memory
    /// budget (else 503 with Retry-After, which workers honour).
    static func acceptReport(_ request: Request, _ context: WhittleContext, _ state: ServerState) async throws -> (Bool, Int) {
        let worker = context.workerName!
        let declared = request.headers[.contentLength].flatMap { Int($0) }
        if let declared, declared > state.config.reportBodyLimit {
            throw APIError(.contentTooLarge, "body_too_large", "the report is \(declared) bytes; reports are at most \(state.config.reportBodyLimit)")
        }
        guard let limit = try await state.rounds.uploadLimit(forWorkerNamed: worker) else {
            throw APIError(.conflict, "stale_report",
                "worker '\(worker)' holds no task of an open phase (a report it sent before the phase closed was counted); this report was not read")
        }
        let reserved = min(declared ?? limit, limit)
        if let declared, declared > limit {
            throw APIError(.contentTooLarge, "body_too_large", "the report is \(declared) bytes; this phase takes at most \(limit)")
        }
        try await state.uploads.enter(worker: worker, bytes: reserved)
        defer { Task { await state.uploads.leave(worker: worker) } }
        // The body stays in the network buffer it arrived in: decoded and written to disk from there, never copied.
        let bytes = try await bodyBuffer(request, limit: limit, seconds: state.config.bodyTimeoutSeconds)
        let message: Whittle_TaskReport
        do {
            message = try bytes.withUnsafeReadableBytes { try Whittle_TaskReport(serializedBytes: $0) }
        } catch {
            throw APIError(.badRequest, "malformed_message", "the body is not a valid \(Whittle_TaskReport.protoMessageName) message")
        }
        guard message.protocolVersion == protocolVersion else {
            throw APIError(.badRequest, "unsupported_protocol", "protocol version \(message.protocolVersion) is not supported")
        }
        guard let worker = try await state.store.worker(named: context.workerName!) else {
            throw APIError(.forbidden, "worker_certificate_required", "unknown worker")
        }
        return (try await state.rounds.accept(message, bytes: bytes, worker: worker), bytes.readableBytes)
    }

    /// The request body, at most `limit` bytes, read within `seconds` (a client that trickles its body is cut off).
    static func body(_ request: Request, limit: Int, seconds: Int = 60) async throws -> [UInt8] {
        Array(try await bodyBuffer(request, limit: limit, seconds: seconds).readableBytesView)
    }

    /// `body`, as the buffer it arrived in.
    static func bodyBuffer(_ request: Request, limit: Int, seconds: Int = 60) async throws -> ByteBuffer {
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > limit {
            throw APIError(.contentTooLarge, "body_too_large", "the request body (\(declared) bytes) exceeds \(limit) bytes for this route")
        }
        do {
            return try await withDeadline(seconds: seconds) {
                var request = request
                return try await request.collectBody(upTo: limit)
            }
        } catch is NIOTooManyBytesError {
            throw APIError(.contentTooLarge, "body_too_large", "the request body exceeds \(limit) bytes for this route")
        } catch is DeadlineExceeded {
            throw APIError(.requestTimeout, "body_timeout", "the request body did not arrive within \(seconds) s")
        }
    }

    struct DeadlineExceeded: Error {}

    /// `operation`'s result, or `DeadlineExceeded` after `seconds` (the operation is cancelled).
    static func withDeadline<T: Sendable>(seconds: Int, _ operation: @escaping @Sendable () async throws -> T) async throws -> T {
        try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await operation() }
            group.addTask {
                try await Task.sleep(for: .seconds(seconds))
                return nil
            }
            defer { group.cancelAll() }
            guard let first = try await group.next(), let value = first else { throw DeadlineExceeded() }
            return value
        }
    }

    static func protobuf(_ message: some SwiftProtobuf.Message) throws -> Response {
        let bytes: [UInt8] = try message.serializedBytes()
        return Response(status: .ok, headers: [.contentType: "application/x-protobuf"], body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    static func json(_ value: some Encodable) throws -> Response {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        return Response(status: .ok, headers: [.contentType: "application/json"],
                        body: .init(byteBuffer: ByteBuffer(bytes: try encoder.encode(value))))
    }

    static func decode<M: SwiftProtobuf.Message>(_ type: M.Type, _ bytes: [UInt8]) throws -> M {
        do {
            return try M(serializedBytes: bytes)
        } catch {
            throw APIError(.badRequest, "malformed_message", "the body is not a valid \(M.protoMessageName) message")
        }
    }

    static func enroll(_ request: Request, _ context: WhittleContext, _ state: ServerState) async throws -> Response {
        do {
            let response = try await enrolled(request, context, state)
            state.metrics.enrollment("enrolled")
            return response
        } catch let error as APIError {
            state.metrics.enrollment(error.code)
            throw error
        }
    }

    static func enrolled(_ request: Request, _ context: WhittleContext, _ state: ServerState) async throws -> Response {
        if let wait = await state.limiter.take(context.remoteAddress ?? "unknown") {
            throw APIError(.tooManyRequests, "rate_limited", "too many enrollment requests; retry in \(wait) s", retryAfter: wait)
        }
        let (message, csr) = try await signingRequest(request, state)
        guard let name = csr.commonName, PKI.isValidWorkerName(name) else {
            throw APIError(.badRequest, "bad_name", "the CSR's common name must be a worker name: 1–64 letters, digits, '.', '-' or '_'")
        }
        let now = Date()
        let certificate = try workerCertificate(name: name, publicKey: csr.publicKey, now: now, state)
        let record = WorkerRecord(name: name, certificateSerial: PKI.serial(certificate),
                                  certificateExpiresAt: certificate.notValidAfter, enrolledAt: now,
                                  certificateIssuer: try PKI.fingerprint(state.trust.issuer.certificate))
        switch try await state.store.enroll(tokenHash: tokenHash(message.token), worker: record, now: now) {
        case .enrolled:
            state.logger.info("enrolled", metadata: ["worker.name": "\(name)", "worker.address": "\(context.remoteAddress ?? "?")"])
            return try certificateResponse(name: name, certificate, state)
        case .unknownToken: throw APIError(.unauthorized, "unknown_token", "the enrollment token is not known")
        case .expiredToken: throw APIError(.unauthorized, "expired_token", "the enrollment token has expired")
        case .exhaustedToken: throw APIError(.unauthorized, "exhausted_token", "the enrollment token has no uses left")
        case .revokedToken: throw APIError(.unauthorized, "revoked_token", "the enrollment token has been revoked")
        case .nameTaken: throw APIError(.conflict, "name_taken", "a worker called '\(name)' is already enrolled; choose another --name")
        }
    }

    /// `POST /v1/worker/renew`: a new certificate for the worker's new key, over its current mutual-TLS identity.
    /// The CSR must name the worker itself; the certificate the request came with stays accepted until the new one
    /// is first used, so a renewal whose answer is lost locks nobody out.
    static func renew(_ request: Request, _ context: WhittleContext, _ state: ServerState) async throws -> Response {
        let (_, csr) = try await signingRequest(request, state)
        let name = context.workerName!
        guard csr.commonName == name else {
            throw APIError(.badRequest, "bad_name", "a renewal's CSR must name the worker itself ('\(name)')")
        }
        let certificate = try workerCertificate(name: name, publicKey: csr.publicKey, now: Date(), state)
        guard try await state.store.renewCertificate(name: name, presentedSerial: context.certificateSerial ?? "",
                                                     newSerial: PKI.serial(certificate),
                                                     expiresAt: certificate.notValidAfter,
                                                     issuer: try PKI.fingerprint(state.trust.issuer.certificate)) != nil else {
            throw APIError(.forbidden, "worker_certificate_required", "unknown worker")
        }
        state.logger.info("certificate renewed", metadata: ["worker.name": "\(name)", "certificate.serial": "\(PKI.serial(certificate))",
                                                            "certificate.expires": "\(certificate.notValidAfter)"])
        return try certificateResponse(name: name, certificate, state)
    }

    /// The EnrollRequest of an enrollment or a renewal: its body within the enrollment limit, its protocol version,
    /// and its CSR with the signature verified (only the public key and common name are used).
    static func signingRequest(_ request: Request, _ state: ServerState) async throws
        -> (Whittle_EnrollRequest, (publicKey: Certificate.PublicKey, commonName: String?)) {
        let message = try decode(Whittle_EnrollRequest.self, try await body(request, limit: state.config.enrollBodyLimit))
        guard message.protocolVersion == protocolVersion else {
            throw APIError(.badRequest, "unsupported_protocol", "protocol version \(message.protocolVersion) is not supported (this coordinator speaks \(protocolVersion))")
        }
        do {
            return (message, try PKI.verifyCSR(Array(message.csrDer)))
        } catch let error as PKIError {
            throw APIError(.badRequest, "bad_csr", error.description)
        }
    }

    /// A worker's client certificate for `publicKey`, valid `worker_certificate_days`, from the issuing CA (the
    /// next one during a CA rotation).
    static func workerCertificate(name: String, publicKey: Certificate.PublicKey, now: Date, _ state: ServerState) throws -> Certificate {
        try PKI.makeClientCertificate(ca: state.trust.issuer, commonName: name, publicKey: publicKey, now: now,
                                      validity: state.config.workerCertificateDays * 86400)
    }

    /// The EnrollResponse carrying a worker's certificate, the CA's, and every CA the worker must trust.
    static func certificateResponse(name: String, _ certificate: Certificate, _ state: ServerState) throws -> Response {
        var response = Whittle_EnrollResponse()
        response.name = name
        response.certificateDer = Data(try PKI.der(certificate))
        response.caCertificateDer = Data(try PKI.der(state.ca.certificate))
        response.trustedCaDer = try state.trust.certificates.map { Data(try PKI.der($0)) }
        return try protobuf(response)
    }

    static func heartbeat(_ request: Request, _ context: WhittleContext, _ state: ServerState) async throws -> Response {
        let message = try decode(Whittle_Heartbeat.self, try await body(request, limit: state.config.heartbeatBodyLimit))
        guard message.protocolVersion == protocolVersion else {
            throw APIError(.badRequest, "unsupported_protocol", "protocol version \(message.protocolVersion) is not supported")
        }
        let c = message.capabilities
        var capabilities = CapabilitiesView(cores: Int(c.cores), memoryBytes: Int(clamping: c.memoryBytes),
                                            samples: Int(clamping: c.samples), labels: c.labels, version: c.version,
                                            memoryLimitBytes: Int(clamping: c.memoryLimitBytes),
                                            evaluationSamples: Int(clamping: c.evaluationSamples))
        // The kind of board (latency tables are kept per kind); a worker before it existed sends none.
        if !c.cpu.isEmpty, c.threads >= 1 {
            guard c.cpu.utf8.count <= 64, c.cpu.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "-") }), c.threads <= 1 << 16 else {
                throw APIError(.badRequest, "bad_capabilities", "the heartbeat names cpu '\(c.cpu.prefix(64))' with \(c.threads) threads")
            }
            capabilities.cpu = c.cpu
            capabilities.threads = Int(c.threads)
        }
        if c.noTiming { capabilities.noTiming = true }
        guard c.secureRounds.count <= 16, c.secureRounds.allSatisfy(Identifiers.isRoundID) else {
            throw APIError(.badRequest, "bad_capabilities", "the heartbeat names \(c.secureRounds.count) secure rounds or a malformed round id")
        }
        capabilities.secureRounds = c.secureRounds
        let text = String(decoding: try JSONEncoder().encode(capabilities), as: UTF8.self)
        let recorded = try await state.store.recordContact(name: context.workerName!, at: Date(), address: context.remoteAddress,
                                                           capabilities: text)
        state.metrics.heartbeat()
        var response = Whittle_HeartbeatResponse()
        response.pollSeconds = UInt32(state.config.heartbeatSeconds)
        response.renewCertificate = recorded?.renewRequestedAt != nil
        response.trustFingerprint = state.trust.fingerprint
        if message.workingOn.isEmpty {
            // Long polling: an idle worker that asks for it waits here (at most one heartbeat interval) until a
            // phase opens, and gets its task then instead of at its next heartbeat.
            let generation = state.rounds.workGeneration
            if let task = try await state.rounds.task(forWorkerNamed: context.workerName!) {
                response.task = task
            } else if message.waitSeconds > 0 {
                let seconds = Double(min(Int(message.waitSeconds), state.config.heartbeatSeconds))
                // SIGTERM answers held heartbeats at once, so a graceful shutdown does not wait for them.
                _ = await withGracefulShutdownHandler {
                    await state.rounds.waitForWork(after: generation, seconds: seconds)
                } onGracefulShutdown: {
                    state.rounds.stopHolding()
                }
                if let task = try await state.rounds.task(forWorkerNamed: context.workerName!) { response.task = task }
            }
        }
        return try protobuf(response)
    }

    /// `GET /v1/worker/artifacts/SHA256`: a file of `DIR/artifacts` named by its SHA-256, whole or from a byte
    /// offset (`Range: bytes=N-` or `bytes=N-M`, answered 206 with Content-Range; past the end, or M < N, 416).
    /// The body is streamed from the file in chunks: memory per download does not grow with the artifact.
    static func artifact(_ request: Request, _ context: WhittleContext, name: String, _ state: ServerState) async throws -> Response {
        guard Identifiers.isSHA256(name) else {
            throw APIError(.badRequest, "bad_artifact", "artifacts are named by their SHA-256 in lowercase hex")
        }
        let path = state.artifacts.appendingPathComponent(name).path
        // Replicas: an artifact another replica made is copied here first.
        try await state.rounds.fetchArtifacts([name])
        guard let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? NSNumber else {
            throw APIError(.notFound, "unknown_artifact", "no artifact \(name)")
        }
        let total = size.intValue
        var start = 0, end = total - 1, partial = false
        func unsatisfiable() -> Response {
            var headers: HTTPFields = [.contentType: "application/json"]
            headers[.contentRange] = "bytes */\(total)"
            return Response(status: .rangeNotSatisfiable, headers: headers)
        }
        if let range = request.headers[.range] {
            let spec = range.trimmingCharacters(in: .whitespaces)
            let parts = spec.hasPrefix("bytes=") ? spec.dropFirst(6).split(separator: "-", omittingEmptySubsequences: false) : []
            guard parts.count == 2, let first = Int(parts[0]), first >= 0 else {
                throw APIError(.badRequest, "bad_range", "only single ranges 'bytes=N-' or 'bytes=N-M' are served")
            }
            guard first < total else { return unsatisfiable() }
            start = first
            if !parts[1].isEmpty {
                guard let last = Int(parts[1]), last >= first else { return unsatisfiable() }
                end = min(last, total - 1)
            }
            partial = true
        }
        var headers: HTTPFields = [.contentType: "application/octet-stream", .acceptRanges: "bytes"]
        if partial { headers[.contentRange] = "bytes \(start)-\(end)/\(total)" }
        let count = max(0, end - start + 1)
        headers[.contentLength] = "\(count)"
        let body = count == 0 ? ResponseBody() : try await FileIO().loadFile(path: path, range: start...end, context: context)
        state.metrics.artifactSent(bytes: count)
        return Response(status: partial ? .partialContent : .ok, headers: headers, body: body)
    }

    struct TokenRequest: Decodable {
        var ttlSeconds: Double?
        var uses: Int?
    }

    struct TokenResponse: Encodable {
        var token: String
        var expiresAt: Date
        var uses: Int
        var caFingerprint: String
    }

    static func createToken(_ request: Request, _ context: WhittleContext, _ state: ServerState) async throws -> Response {
        let bytes = try await body(request, limit: state.config.adminBodyLimit)
        let parameters: TokenRequest
        do {
            parameters = bytes.isEmpty ? TokenRequest() : try JSONDecoder().decode(TokenRequest.self, from: Data(bytes))
        } catch {
            throw APIError(.badRequest, "malformed_json", "the body is not a token request: {\"ttlSeconds\": 3600, \"uses\": 1}")
        }
        let ttl = parameters.ttlSeconds ?? 3600, uses = parameters.uses ?? 1
        guard ttl > 0, ttl <= 366 * 86400, uses >= 1, uses <= 100_000 else {
            throw APIError(.badRequest, "bad_token_request", "ttlSeconds must be in (0, 1 year] and uses in [1, 100000]")
        }
        // 256 random bits as 64 hex digits: nothing a shell or an argument parser reads specially (a base64url
        // token may start with '-').
        let token = PKI.randomHex(32)
        let now = Date()
        try await state.store.addToken(TokenRecord(hash: tokenHash(token), createdAt: now, expiresAt: now.addingTimeInterval(ttl), uses: uses))
        state.logger.info("token created", metadata: ["token.uses": "\(uses)", "token.ttl": "\(ttl)"])
        return try json(TokenResponse(token: token, expiresAt: now.addingTimeInterval(ttl), uses: uses,
                                      caFingerprint: try PKI.fingerprint(state.ca.certificate)))
    }

    static func tokenHash(_ token: String) -> String { PKI.hex(SHA256.hash(data: Data(token.utf8))) }

    /// The TLS configuration: TLS 1.2+, the server certificate, and optional client certificates that must chain to
    /// the CA (a foreign or expired certificate is refused at the handshake; none at all is allowed, for
    /// enrollment and health).
    static func tlsConfiguration(layout: CoordinatorLayout, trust: CARotation.Trust) throws -> TLSConfiguration {
        let certificate = try NIOSSLCertificate(file: layout.serverCertificate, format: .pem)
        let key = try NIOSSLPrivateKey(file: layout.serverKey, format: .pem)
        let roots = try trust.certificates.map { try NIOSSLCertificate(bytes: try PKI.der($0), format: .der) }
        var tls = TLSConfiguration.makeServerConfiguration(certificateChain: [.certificate(certificate)], privateKey: .privateKey(key))
        tls.minimumTLSVersion = .tlsv12
        tls.certificateVerification = .optionalVerification
        tls.trustRoots = .certificates(roots)
        tls.applicationProtocols = ["http/1.1"]
        return tls
    }

    /// The store `config` names: the embedded SQLite file, or the PostgreSQL database replicas share (its schema
    /// must be this binary's: `coordinator migrate`).
    public static func openStore(layout: CoordinatorLayout, config: CoordinatorConfig, logger: Logger) async throws -> any CoordinatorStore {
        guard !config.databaseURL.isEmpty else { return try SQLiteStore(path: layout.database) }
        let url = try DatabaseURL(config.databaseURL)
        let store = try await PostgresStore.connect(url, logger: logger)
        logger.info("database", metadata: ["database.url": "\(url)", "database.schema": "\(PostgresStore.schemaVersion)"])
        return store
    }

    /// Brings the database `config` names to this binary's schema: the versions before and after, and where.
    public static func migrateStore(layout: CoordinatorLayout, config: CoordinatorConfig, logger: Logger) async throws -> (from: Int, to: Int, database: String) {
        guard !config.databaseURL.isEmpty else {
            let (from, to) = try SQLiteStore.migrate(path: layout.database)
            return (from, to, layout.database)
        }
        let url = try DatabaseURL(config.databaseURL)
        let (from, to) = try await PostgresStore.migrate(url, logger: logger)
        return (from, to, url.description)
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully.
    public static func serve(layout: CoordinatorLayout, config: CoordinatorConfig, listen: String, logger: Logger) async throws {
        // A CA rotation's finish that a crash interrupted is completed (or discarded) before anything is read.
        let trust = try CARotation.trust(layout)
        let store = try await openStore(layout: layout, config: config, logger: logger)
        defer { store.close() }
        let (host, port) = try CoordinatorConfig.hostPort(listen)
        let replica = config.databaseURL.isEmpty ? nil : replicaName(config, port: port)
        let state = try ServerState(store: store, trust: trust, config: config, directory: layout.directory, artifacts: layout.artifacts,
                                    logger: logger, replica: replica)
        if let replica { logger.info("replica", metadata: ["replica": "\(replica)", "lease.seconds": "\(config.replicaLeaseSeconds)"]) }
        // Replicas: another replica's announcements (a phase opened, a round started or ended) wake held heartbeats.
        let listener = Task {
            guard replica != nil, let changes = store.roundsChanged() else { return }
            for await _ in changes { await state.rounds.roundsChangedElsewhere() }
        }
        defer { listener.cancel() }
        // Phases close on time (deadlines, silent workers) even when no report arrives.
        let ticker = Task {
            while !Task.isCancelled {
                await state.rounds.tick()
                try? await Task.sleep(for: .milliseconds(500))
            }
        }
        defer { ticker.cancel() }
        // What no round needs any more is deleted at start and hourly (retention_days).
        let collector = Task {
            while !Task.isCancelled {
                do {
                    _ = try await state.rounds.collectGarbage(retentionDays: config.retentionDays)
                } catch {
                    logger.error("garbage collection failed", metadata: ["error": "\(error)"])
                }
                try? await Task.sleep(for: .seconds(3600))
            }
        }
        defer { collector.cancel() }
        raiseOpenFileLimit(to: config.maxConnections + 256)
        let app = Application(
            router: router(state: state),
            // The idle timeout runs from the TCP accept: it also closes connections that never finish their TLS
            // handshake or their request head. Bodies have their own deadline (body_timeout_seconds).
            server: try .tls(.http1(configuration: .init(idleTimeout: .seconds(Int64(config.idleTimeoutSeconds)))),
                             tlsConfiguration: try tlsConfiguration(layout: layout, trust: trust)),
            configuration: .init(address: .hostname(host, port: port), serverName: "whittle",
                                 availableConnectionsDelegate: MaximumAvailableConnections(config.maxConnections, logger: logger)),
            onServerRunning: { channel in
                let bound = channel.localAddress?.port ?? port
                let url = "https://\(host.contains(":") ? "[\(host)]" : host):\(bound)"
                try? Data((url + "\n").utf8).write(to: URL(fileURLWithPath: layout.listening), options: .atomic)
                logger.info("listening", metadata: ["url": "\(url)"])
                if let next = trust.next {
                    logger.info("CA rotation under way: worker certificates come from the next CA; coordinator ca finish once every worker renewed",
                                metadata: ["ca.next": "\((try? PKI.fingerprint(next.certificate)) ?? "?")"])
                }
                FileHandle.standardOutput.write(Data("listening on \(url)\n".utf8))  // unbuffered, also into a pipe
            },
            logger: logger)
        try await app.runService()
        ticker.cancel()
        await state.rounds.resign()
        try? FileManager.default.removeItem(atPath: layout.listening)
    }

    /// This replica's name in the rounds' lease: `replica_name`, else the host name and the listening port (the
    /// same after a restart, so a restarted replica takes its lease back at once), or with port 0 (any port) the
    /// host name and the process id.
    static func replicaName(_ config: CoordinatorConfig, port: Int) -> String {
        if !config.replicaName.isEmpty { return config.replicaName }
        let host = ProcessInfo.processInfo.hostName
        return port == 0 ? "\(host):pid\(getpid())" : "\(host):\(port)"
    }
}

/// Raises the soft limit on open files towards `wanted` (at most the hard limit), so the connection cap, not the
/// descriptor limit, is what refuses connections; a descriptor-starved process cannot answer /healthz.
func raiseOpenFileLimit(to wanted: Int) {
    var limit = rlimit()
    guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
    let target = min(rlim_t(wanted), limit.rlim_max)
    if limit.rlim_cur < target {
        limit.rlim_cur = target
        _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
    }
}

/// An enrollment token as `token list` shows it: an id (the first 16 hex digits of its hash; the secret itself is
/// never stored), its lifetime, uses and state.
public struct TokenView: Codable, Sendable {
    public var id: String
    public var state: String
    public var createdAt: Date
    public var expiresAt: Date
    public var usesAllowed: Int
    public var usesRemaining: Int
    public var revokedAt: Date?

    init(_ t: TokenRecord, now: Date) {
        id = String(t.hash.prefix(16))
        state = t.state(now: now)
        createdAt = t.createdAt
        expiresAt = t.expiresAt
        usesAllowed = t.usesAllowed
        usesRemaining = t.usesRemaining
        revokedAt = t.revokedAt
    }
}

/// A worker as admin commands show it.
public struct WorkerView: Codable, Sendable {
    public var name: String
    public var state: String
    public var enrolledAt: Date
    public var lastContactAt: Date?
    public var address: String?
    public var certificateSerial: String
    public var certificateExpiresAt: Date
    public var revokedAt: Date?
    public var capabilities: CapabilitiesView?

    init(_ w: WorkerRecord, now: Date) {
        name = w.name
        state = w.state(now: now)
        enrolledAt = w.enrolledAt
        lastContactAt = w.lastContactAt
        address = w.lastAddress
        certificateSerial = w.certificateSerial
        certificateExpiresAt = w.certificateExpiresAt
        revokedAt = w.revokedAt
        capabilities = w.capabilities.flatMap { try? JSONDecoder().decode(CapabilitiesView.self, from: Data($0.utf8)) }
    }
}

public struct CapabilitiesView: Codable, Sendable {
    public var cores: Int
    public var memoryBytes: Int
    public var samples: Int
    public var labels: Bool
    public var version: String
    public var memoryLimitBytes: Int
    /// Held-out samples for evaluation (absent from workers before it existed).
    public var evaluationSamples: Int?
    /// The instruction set and compute threads: the kind of board (absent from workers before it existed).
    public var cpu: String?
    public var threads: Int?
    /// The board cannot time models (`worker run --no-timing`): it takes no latency task.
    public var noTiming: Bool?
    /// The rounds whose secure-aggregation secrets the worker holds.
    public var secureRounds: [String]?

    /// The kind of board, as latency tables name it (nil for a worker that did not say).
    public var boardKind: String? {
        guard let cpu, let threads else { return nil }
        return LatencyTable.kind(machine: cpu, threads: threads)
    }

    package init(cores: Int, memoryBytes: Int, samples: Int, labels: Bool, version: String, memoryLimitBytes: Int,
                 evaluationSamples: Int?) {
        self.cores = cores
        self.memoryBytes = memoryBytes
        self.samples = samples
        self.labels = labels
        self.version = version
        self.memoryLimitBytes = memoryLimitBytes
        self.evaluationSamples = evaluationSamples
    }
}
