import Crypto
import Foundation
import Hummingbird
import NIOCore
import WhittleIO
import WhittlePKI
import WhittleStore

/// Browser sessions for the dashboard. An admin (holding the admin certificate) asks for a one-time login link;
/// opening it within `linkLifetime` trades it for a session cookie valid `sessionLifetime`. Only hashes are kept:
/// links in memory (a restart spends them), sessions in the store (a restart of `serve` keeps browsers logged in).
actor DashboardSessions {
    static let linkLifetime: TimeInterval = 600
    static let sessionLifetime: TimeInterval = 12 * 3600
    static let cookie = "whittle_session"

    let store: any CoordinatorStore
    var links: [String: Date] = [:]

    init(store: any CoordinatorStore) { self.store = store }

    static func secret() -> String { PKI.randomHex(32) }

    static func hash(_ secret: String) -> String { PKI.hex(SHA256.hash(data: Data(secret.utf8))) }

    func newLink(now: Date = Date()) async throws -> (token: String, expiresAt: Date) {
        try await purge(now)
        let token = Self.secret()
        links[Self.hash(token)] = now.addingTimeInterval(Self.linkLifetime)
        return (token, now.addingTimeInterval(Self.linkLifetime))
    }

    /// A session for a valid, unused link token (the link is spent), else nil.
    func redeem(_ token: String, now: Date = Date()) async throws -> String? {
        try await purge(now)
        guard links.removeValue(forKey: Self.hash(token)) != nil else { return nil }
        let session = Self.secret()
        try await store.addDashboardSession(hash: Self.hash(session), expiresAt: now.addingTimeInterval(Self.sessionLifetime))
        return session
    }

    func isValid(_ session: String, now: Date = Date()) async throws -> Bool {
        guard let expiry = try await store.dashboardSession(hash: Self.hash(session)) else { return false }
        return expiry > now
    }

    func purge(_ now: Date) async throws {
        links = links.filter { $0.value > now }
        try await store.removeDashboardSessions(expiredBefore: now)
    }
}

/// Admits the admin certificate or a dashboard session cookie; read-only routes only.
struct DashboardAuthMiddleware: RouterMiddleware {
    let state: ServerState

    func handle(_ request: Request, context: WhittleContext,
                next: (Request, WhittleContext) async throws -> Response) async throws -> Response {
        var admitted = false
        if let session = DashboardRoutes.cookie(request, DashboardSessions.cookie) { admitted = try await state.dashboard.isValid(session) }
        if !admitted { admitted = try await CoordinatorServer.presentsAdminCertificate(request, context, state) }
        if admitted {
            // The API's JSON answers too: never cached, never framed.
            var response = try await next(request, context)
            for field in DashboardRoutes.securityHeaders where response.headers[field.name] == nil { response.headers.append(field) }
            return response
        }
        if request.uri.path.hasPrefix("/dashboard/api/") {
            throw APIError(.unauthorized, "dashboard_login_required",
                           "the dashboard needs a session: run `coordinator dashboard --dir DIR` and open the link it prints")
        }
        return DashboardRoutes.page(status: .unauthorized, DashboardAssets.loginPage)
    }
}

enum DashboardRoutes {
    /// Every dashboard answer: no caching, no framing, no referrer (a login link carries its token), scripts and
    /// styles from this origin only.
    static var securityHeaders: HTTPFields {
        var h = HTTPFields()
        h[.cacheControl] = "no-store"
        h[.init("Content-Security-Policy")!] = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        h[.init("X-Content-Type-Options")!] = "nosniff"
        h[.init("Referrer-Policy")!] = "no-referrer"
        h[.init("X-Frame-Options")!] = "DENY"
        return h
    }

    static func page(status: HTTPResponse.Status = .ok, _ text: String, type: String = "text/html; charset=utf-8") -> Response {
        var headers = securityHeaders
        headers[.contentType] = type
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
    }

    static func cookie(_ request: Request, _ name: String) -> String? {
        for header in request.headers[values: .cookie] {
            for pair in header.split(separator: ";") {
                let parts = pair.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
                if parts.count == 2, parts[0] == name { return parts[1] }
            }
        }
        return nil
    }

    static func add(to router: Router<WhittleContext>, admin: RouterGroup<WhittleContext>, state: ServerState) {
        // The login link: spent on first use, answered with the session cookie and a redirect to the dashboard.
        router.get("/dashboard/login") { request, _ -> Response in
            guard let token = request.uri.queryParameters.get("token"), let session = try await state.dashboard.redeem(token) else {
                return page(status: .unauthorized, DashboardAssets.loginPage)
            }
            var headers = securityHeaders
            headers[.location] = "/dashboard"
            headers[.setCookie] = "\(DashboardSessions.cookie)=\(session); Path=/dashboard; Max-Age=\(Int(DashboardSessions.sessionLifetime)); Secure; HttpOnly; SameSite=Strict"
            state.logger.info("dashboard session opened", metadata: ["http.authority": "\(request.head.authority ?? "?")"])
            return Response(status: .seeOther, headers: headers)
        }
        // The style sheet holds nothing private, and the login page uses it too.
        router.get("/dashboard/app.css") { _, _ in page(DashboardAssets.style, type: "text/css; charset=utf-8") }
        let dashboard = router.group("/dashboard").add(middleware: DashboardAuthMiddleware(state: state))
        dashboard.get("/") { _, _ in page(DashboardAssets.html) }
        dashboard.get("/app.js") { _, _ in page(DashboardAssets.script, type: "text/javascript; charset=utf-8") }
        dashboard.get("/api/workers") { _, _ in try CoordinatorServer.json(try await CoordinatorServer.workerViews(state)) }
        dashboard.get("/api/rounds") { _, _ in try CoordinatorServer.json(try await CoordinatorServer.roundViews(state)) }
        dashboard.get("/api/rounds/:id/report") { _, context in
            try CoordinatorServer.json(try await state.rounds.report(context.parameters.get("id") ?? ""))
        }
        admin.post("/dashboard/links") { _, _ -> Response in
            let (token, expiresAt) = try await state.dashboard.newLink()
            return try CoordinatorServer.json(DashboardLink(path: "/dashboard/login?token=\(token)", expiresAt: expiresAt))
        }
    }
}

/// What `POST /admin/v1/dashboard/links` answers: a one-time path and when it expires.
package struct DashboardLink: Codable {
    package var path: String
    package var expiresAt: Date
}
