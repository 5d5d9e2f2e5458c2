import Crypto
import Foundation
import Hummingbird
import HummingbirdTesting
import Testing
import WhittleHTTPClient
import WhittleTestSupport

/// Whittle's libcurl client against a real HTTP server on a local port (Hummingbird's live test server): bodies and
/// headers both ways, Retry-After, retries with backoff on the statuses worth retrying and none on the others,
/// downloads resumed with a Range request and verified by SHA-256, and a refused connection. TLS and client
/// certificates are the interop tests' (`test_hostile_peers.py`).
@Suite(.serialized) struct HTTPClientTests {
    /// 300 kB of a fixed pattern, served whole or from an offset.
    static let blob = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }
    static let blobSHA = SHA256.hash(data: blob).map { String(format: "%02x", $0) }.joined()

    /// Counts requests per path, so a test can see how often the client tried.
    actor Counter {
        var counts: [String: Int] = [:]
        func next(_ path: String) -> Int {
            counts[path, default: 0] += 1
            return counts[path]!
        }
    }

    static func app(_ counter: Counter) -> some ApplicationProtocol {
        let router = Router()
        router.post("/echo") { request, _ -> Response in
            let body = try await request.body.collect(upTo: 1 << 20)
            var headers: HTTPFields = [.contentType: request.headers[.contentType] ?? "none"]
            headers[.init("x-seen-user-agent")!] = request.headers[.userAgent] ?? ""
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: body))
        }
        // Busy (503, Retry-After: 2) for the first two requests, then fine.
        router.get("/busy") { _, _ -> Response in
            let n = await counter.next("/busy")
            return n <= 2 ? Response(status: .serviceUnavailable, headers: [.retryAfter: "2"]) : Response(status: .ok)
        }
        // Always busy.
        router.get("/down") { _, _ -> Response in Response(status: .serviceUnavailable, headers: [.retryAfter: "1"]) }
        router.get("/missing") { _, _ -> Response in
            _ = await counter.next("/missing")
            return Response(status: .notFound)
        }
        router.get("/blob") { request, _ -> Response in
            _ = await counter.next("/blob")
            if let range = request.headers[.range], range.hasPrefix("bytes="), let from = Int(range.dropFirst(6).dropLast()) {
                guard from < blob.count else { return Response(status: .rangeNotSatisfiable) }
                return Response(status: .partialContent, headers: [.contentRange: "bytes \(from)-\(blob.count - 1)/\(blob.count)"],
                                body: .init(byteBuffer: ByteBuffer(bytes: blob[from...])))
            }
            return Response(status: .ok, body: .init(byteBuffer: ByteBuffer(bytes: blob)))
        }
        return Application(router: router)
    }

    static func temporary() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("whittle-http-\(UUID().uuidString)").path
    }

    @Test func bodiesAndHeadersGoBothWays() async throws {
        try await Self.app(Counter()).test(.live) { client in
            let http = HTTPClient(baseURL: "http://127.0.0.1:\(client.port!)/")
            http.userAgent = "whittle-test"
            let body = Array("hello, coordinator".utf8)
            let response = try await TestSupport.offThePool { try http.request("POST", "/echo", body: body, contentType: "application/x-protobuf") }
            #expect(response.status == 200 && response.body == body)
            #expect(response.headers["content-type"] == "application/x-protobuf")
            #expect(response.headers["x-seen-user-agent"] == "whittle-test")
            #expect(response.retryAfter == nil)
        }
    }

    @Test func retryableStatusesAreRetriedWithTheServersDelay() async throws {
        let counter = Counter()
        try await Self.app(counter).test(.live) { client in
            let http = HTTPClient(baseURL: "http://127.0.0.1:\(client.port!)")
            let (response, slept) = try await TestSupport.offThePool { () -> (WhittleHTTPClient.HTTPResponse, [Double]) in
                var slept: [Double] = []
                let r = try http.send("GET", "/busy", retry: RetryPolicy(attempts: 5, baseDelay: 0.5, maximumDelay: 30)) { slept.append($0) }
                return (r, slept)
            }
            #expect(response.status == 200)
            #expect(slept == [2, 2], "Retry-After honoured, twice")
            // Not worth retrying: answered at once.
            let (missing, sleptAgain) = try await TestSupport.offThePool { () -> (WhittleHTTPClient.HTTPResponse, [Double]) in
                var slept: [Double] = []
                let r = try http.send("GET", "/missing", retry: RetryPolicy(attempts: 5)) { slept.append($0) }
                return (r, slept)
            }
            #expect(missing.status == 404 && sleptAgain.isEmpty)
            #expect(await counter.counts["/missing"] == 1)
            // Out of attempts: the last answer is returned, after one wait per retry.
            let (gaveUp, waits) = try await TestSupport.offThePool { () -> (WhittleHTTPClient.HTTPResponse, [Double]) in
                var slept: [Double] = []
                let r = try http.send("GET", "/down", retry: RetryPolicy(attempts: 3)) { slept.append($0) }
                return (r, slept)
            }
            #expect(gaveUp.status == 503 && waits == [1, 1])
        }
    }

    @Test func downloadsResumeAndAreVerified() async throws {
        let counter = Counter()
        try await Self.app(counter).test(.live) { client in
            let http = HTTPClient(baseURL: "http://127.0.0.1:\(client.port!)")
            let path = Self.temporary()
            defer { try? FileManager.default.removeItem(atPath: path) }
            /// The progress calls of one download: (bytes so far, full size).
            func download(_ sha: String) async throws -> [[Int]] {
                try await TestSupport.offThePool { () -> [[Int]] in
                    var seen: [[Int]] = []
                    try http.download("/blob", to: path, sha256: sha) { seen.append([$0, $1 ?? -1]) }
                    return seen
                }
            }
            var seen = try await download(Self.blobSHA)
            #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(Self.blob))
            #expect(seen.last == [Self.blob.count, Self.blob.count])
            // A partial file (a transfer that broke) is resumed from where it stopped: only the rest is sent.
            try Data(Self.blob.prefix(123_456)).write(to: URL(fileURLWithPath: path))
            seen = try await download(Self.blobSHA)
            #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(Self.blob))
            #expect(seen.first.map { $0[0] > 123_456 && $0[1] == Self.blob.count } == true)
            // A complete file asked past its end (416) is checked as it is.
            _ = try await download(Self.blobSHA)
            // The wrong digest: the file is discarded.
            await #expect { _ = try await download(String(repeating: "0", count: 64)) } throws: {
                "\($0)".contains("differs from the expected")
            }
            #expect(!FileManager.default.fileExists(atPath: path))
            #expect(await counter.counts["/blob"] == 4)
        }
    }

    @Test func aRefusedConnectionIsATransportError() throws {
        // Port 1 on the loopback: nothing listens there.
        let http = HTTPClient(baseURL: "http://127.0.0.1:1")
        http.connectTimeout = 2
        #expect { _ = try http.request("GET", "/") } throws: { error in
            guard let e = error as? HTTPClientError else { return false }
            return e.curlCode == 7  // CURLE_COULDNT_CONNECT
        }
    }

    @Test func backoffGrowsWithinItsBoundsAndHonoursRetryAfter() {
        let policy = RetryPolicy(attempts: 10, baseDelay: 0.5, maximumDelay: 8)
        #expect((1...6).map { policy.delay(attempt: $0, retryAfter: nil, random: 1) } == [0.5, 1, 2, 4, 8, 8])
        #expect(policy.delay(attempt: 3, retryAfter: nil, random: 0) == 0)
        #expect(policy.delay(attempt: 1, retryAfter: 3, random: 0.5) == 3)
        #expect(policy.delay(attempt: 1, retryAfter: 100) == 8 && policy.delay(attempt: 1, retryAfter: -4) == 0)
        #expect([408, 429, 502, 503, 504].allSatisfy(RetryPolicy.isRetryable) && ![400, 401, 403, 404, 413, 500].contains(where: RetryPolicy.isRetryable))
    }
}
