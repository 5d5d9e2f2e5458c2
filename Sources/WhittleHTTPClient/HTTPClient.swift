import CWhittleCurl
import Crypto
import Foundation

/// An HTTP response: status, headers (names lowercased) and body.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var headers: [String: String]
    public var body: [UInt8]

    public var text: String { String(decoding: body, as: UTF8.self) }

    /// Seconds from a `Retry-After: N` header.
    public var retryAfter: Double? { headers["retry-after"].flatMap { Double($0.trimmingCharacters(in: .whitespaces)) } }
}

/// A transport failure (no HTTP response): connection refused, TLS handshake refused, timeout…
public struct HTTPClientError: Error, CustomStringConvertible, Sendable {
    public let curlCode: Int
    public let description: String
}

/// TLS material, in memory (PEM). Without `caPEM` the system's trust store is used; `verifyPeer` false is only
/// for fetching a CA whose fingerprint the caller then checks.
public struct TLSCredentials: Sendable {
    public var caPEM: String?
    public var certificatePEM: String?
    public var privateKeyPEM: String?
    public var verifyPeer = true

    public init(caPEM: String? = nil, certificatePEM: String? = nil, privateKeyPEM: String? = nil, verifyPeer: Bool = true) {
        self.caPEM = caPEM
        self.certificatePEM = certificatePEM
        self.privateKeyPEM = privateKeyPEM
        self.verifyPeer = verifyPeer
    }
}

/// When and how often to retry: exponential backoff with full jitter, honouring a server's Retry-After.
public struct RetryPolicy: Sendable {
    public var attempts: Int
    public var baseDelay: Double
    public var maximumDelay: Double

    public init(attempts: Int = 5, baseDelay: Double = 0.5, maximumDelay: Double = 30) {
        self.attempts = attempts
        self.baseDelay = baseDelay
        self.maximumDelay = maximumDelay
    }

    public static let none = RetryPolicy(attempts: 1)

    /// The delay before retry number `attempt` (1-based): uniform in [0, min(max, base · 2^(attempt−1))], or the
    /// server's Retry-After when it gave one (capped at the maximum).
    public func delay(attempt: Int, retryAfter: Double?, random: Double = Double.random(in: 0...1)) -> Double {
        if let retryAfter { return min(max(retryAfter, 0), maximumDelay) }
        return random * min(maximumDelay, baseDelay * pow(2, Double(attempt - 1)))
    }

    /// Statuses worth retrying: overload and temporary unavailability.
    public static func isRetryable(status: Int) -> Bool { [408, 429, 502, 503, 504].contains(status) }
}

/// An HTTP/1.1 client on libcurl. One easy handle is kept per client, so connections (and TLS sessions) are
/// reused between requests; requests are serialised by a lock. `curl_easy_perform` blocks: call this from a
/// thread of your own (the worker agent's loop), never from Swift's cooperative pool.
public final class HTTPClient: @unchecked Sendable {
    public let baseURL: String
    /// The TLS identity and trust (read and replaced under `lock`).
    var currentCredentials: TLSCredentials
    public var credentials: TLSCredentials {
        lock.lock()
        defer { lock.unlock() }
        return currentCredentials
    }
    public var connectTimeout: Double = 10
    public var timeout: Double = 60
    public var userAgent = "whittle"
    let lock = NSLock()
    var handle: UnsafeMutableRawPointer?
    let errorBuffer = UnsafeMutablePointer<CChar>.allocate(capacity: WK_CURL_ERROR_SIZE + 1)

    public init(baseURL: String, credentials: TLSCredentials = TLSCredentials()) {
        _ = Self.globalInit
        self.baseURL = baseURL.hasSuffix("/") ? String(baseURL.dropLast()) : baseURL
        currentCredentials = credentials
        errorBuffer.initialize(repeating: 0, count: WK_CURL_ERROR_SIZE + 1)
    }

    deinit {
        if let handle { wk_curl_easy_cleanup(handle) }
        errorBuffer.deallocate()
    }

    static let globalInit: Void = { _ = wk_curl_global_init() }()

    /// Uses `credentials` from the next request on (a renewed certificate): the cached connection, made with the
    /// old identity, is closed.
    public func replaceCredentials(_ credentials: TLSCredentials) {
        lock.lock()
        defer { lock.unlock() }
        currentCredentials = credentials
        if let handle { wk_curl_easy_cleanup(handle) }
        handle = nil
    }

    /// One request, no retries.
    public func request(_ method: String, _ path: String, body: [UInt8]? = nil, contentType: String? = nil,
                        headers: [String: String] = [:]) throws -> HTTPResponse {
        lock.lock()
        defer { lock.unlock() }
        if handle == nil { handle = wk_curl_easy_init() }
        guard let h = handle else { throw HTTPClientError(curlCode: -1, description: "libcurl could not create a handle") }
        wk_curl_easy_reset(h)  // keeps the connection cache; clears options
        var slist: UnsafeMutablePointer<curl_slist>?
        defer { wk_curl_slist_free(slist) }
        var allHeaders = headers
        if let contentType { allHeaders["Content-Type"] = contentType }
        allHeaders["Expect"] = ""  // no 100-continue round trip
        for (name, value) in allHeaders { slist = wk_curl_slist_append(slist, "\(name): \(value)") }

        let sink = ResponseSink()
        let source = body.map { RequestSource($0) }
        let sinkPointer = Unmanaged.passUnretained(sink).toOpaque()
        var codes: [Int32] = []
        func check(_ code: Int32) { codes.append(code) }
        commonOptions(h, path, check)
        check(wk_curl_set_long(h, option(WK_CURLOPT_TIMEOUT_MS), Int(timeout * 1000)))
        check(wk_curl_set_slist(h, option(WK_CURLOPT_HTTPHEADER), slist))
        check(wk_curl_set_write(h, { data, size, count, user in
            let sink = Unmanaged<ResponseSink>.fromOpaque(user!).takeUnretainedValue()
            let n = size * count
            if let data { sink.body.append(contentsOf: UnsafeRawBufferPointer(start: data, count: n)) }
            return n
        }, sinkPointer))
        check(wk_curl_set_header(h, { data, size, count, user in
            let sink = Unmanaged<ResponseSink>.fromOpaque(user!).takeUnretainedValue()
            let n = size * count
            if let data {
                let line = String(decoding: UnsafeRawBufferPointer(start: data, count: n), as: UTF8.self)
                if line.hasPrefix("HTTP/") { sink.headers = [:] }  // a new response (after a redirect or 100)
                if let colon = line.firstIndex(of: ":") {
                    let name = line[..<colon].lowercased()
                    sink.headers[name] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespacesAndNewlines)
                }
            }
            return n
        }, sinkPointer))
        switch (method, source) {
        case ("GET", nil):
            check(wk_curl_set_long(h, option(WK_CURLOPT_HTTPGET), 1))
        case (_, let source?):
            // Streamed from the caller's buffer, never copied a second time.
            check(wk_curl_set_long(h, option(WK_CURLOPT_POST), 1))
            check(wk_curl_set_offset(h, option(WK_CURLOPT_POSTFIELDSIZE_LARGE), curl_off_t(source.bytes.count)))
            check(wk_curl_set_read(h, { data, size, count, user in
                let source = Unmanaged<RequestSource>.fromOpaque(user!).takeUnretainedValue()
                return source.read(into: data, capacity: size * count)
            }, Unmanaged.passUnretained(source).toOpaque()))
            if method != "POST" { check(wk_curl_set_string(h, option(WK_CURLOPT_CUSTOMREQUEST), method)) }
        default:
            check(wk_curl_set_string(h, option(WK_CURLOPT_CUSTOMREQUEST), method))
        }
        try configureTLS(h, check)
        if let bad = codes.first(where: { $0 != 0 }) {
            throw HTTPClientError(curlCode: Int(bad), description: "libcurl refused an option: \(String(cString: wk_curl_strerror(bad)))")
        }
        let code = withExtendedLifetime((sink, source)) { wk_curl_perform(h) }
        guard code == 0 else {
            let detail = String(cString: errorBuffer)
            throw HTTPClientError(curlCode: Int(code), description: "\(method) \(baseURL + path): "
                                  + (detail.isEmpty ? String(cString: wk_curl_strerror(code)) : detail))
        }
        return HTTPResponse(status: wk_curl_response_code(h), headers: sink.headers, body: sink.body)
    }

    /// A request retried on transport errors and on 408/429/502/503/504, with backoff and jitter.
    public func send(_ method: String, _ path: String, body: [UInt8]? = nil, contentType: String? = nil,
                     headers: [String: String] = [:], retry: RetryPolicy = RetryPolicy(),
                     sleep: (Double) -> Void = { Thread.sleep(forTimeInterval: $0) }) throws -> HTTPResponse {
        var attempt = 1
        while true {
            do {
                let response = try request(method, path, body: body, contentType: contentType, headers: headers)
                guard RetryPolicy.isRetryable(status: response.status), attempt < retry.attempts else { return response }
                sleep(retry.delay(attempt: attempt, retryAfter: response.retryAfter))
            } catch let error as HTTPClientError {
                guard attempt < retry.attempts else { throw error }
                sleep(retry.delay(attempt: attempt, retryAfter: nil))
            }
            attempt += 1
        }
    }

    /// Downloads `path` into the file at `destination`, resuming a partial file with an HTTP Range request, and
    /// verifies the whole file's SHA-256 (lowercase hex) before returning; a mismatch deletes the file and throws.
    /// The body is written to disk as it arrives, never held whole in memory.
    /// `progress` is called as bytes arrive with the file's bytes so far and its full size once known.
    public func download(_ path: String, to destination: String, sha256 expected: String,
                         retry: RetryPolicy = RetryPolicy(), progress: ((_ have: Int, _ total: Int?) -> Void)? = nil) throws {
        let fm = FileManager.default
        var attempt = 1
        while true {
            let have = ((try? fm.attributesOfItem(atPath: destination))?[.size] as? NSNumber)?.intValue ?? 0
            do {
                let status = try fetch(path, to: destination, from: have, progress: progress)
                if status == 416, have > 0 {
                    // Asked past the end: the partial file was complete (or stale); check it below.
                } else if status != 200 && status != 206 {
                    guard RetryPolicy.isRetryable(status: status), attempt < retry.attempts else {
                        throw HTTPClientError(curlCode: 0, description: "GET \(baseURL + path): HTTP \(status)")
                    }
                    Thread.sleep(forTimeInterval: retry.delay(attempt: attempt, retryAfter: nil))
                    attempt += 1
                    continue
                }
            } catch let error as HTTPClientError where error.curlCode != 0 {
                // A broken transfer keeps what arrived; the next attempt resumes from there.
                guard attempt < retry.attempts else { throw error }
                Thread.sleep(forTimeInterval: retry.delay(attempt: attempt, retryAfter: nil))
                attempt += 1
                continue
            }
            let actual = try FileDigest.sha256(destination)
            guard actual == expected.lowercased() else {
                try? fm.removeItem(atPath: destination)
                throw HTTPClientError(curlCode: 0, description: "\(baseURL + path): SHA-256 \(actual) differs from the expected \(expected); the file was discarded")
            }
            return
        }
    }

    /// One GET appending to `destination` from byte `offset` (206) or rewriting it (200); returns the status.
    func fetch(_ path: String, to destination: String, from offset: Int,
               progress: ((_ have: Int, _ total: Int?) -> Void)? = nil) throws -> Int {
        lock.lock()
        defer { lock.unlock() }
        if handle == nil { handle = wk_curl_easy_init() }
        guard let h = handle else { throw HTTPClientError(curlCode: -1, description: "libcurl could not create a handle") }
        wk_curl_easy_reset(h)
        let sink = FileSink(path: destination, offset: offset)
        sink.progress = progress
        defer { sink.close() }
        var codes: [Int32] = []
        func check(_ code: Int32) { codes.append(code) }
        commonOptions(h, path, check)
        // Large files: no overall deadline, but abort when slower than 1 kB/s for a minute.
        check(wk_curl_set_long(h, option(WK_CURLOPT_LOW_SPEED_LIMIT), 1024))
        check(wk_curl_set_long(h, option(WK_CURLOPT_LOW_SPEED_TIME), 60))
        if offset > 0 { check(wk_curl_set_string(h, option(WK_CURLOPT_RANGE), "\(offset)-")) }
        let pointer = Unmanaged.passUnretained(sink).toOpaque()
        check(wk_curl_set_header(h, { data, size, count, user in
            let sink = Unmanaged<FileSink>.fromOpaque(user!).takeUnretainedValue()
            let n = size * count
            if let data {
                let line = String(decoding: UnsafeRawBufferPointer(start: data, count: n), as: UTF8.self)
                if line.hasPrefix("HTTP/") { sink.status = Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0 }
                if line.lowercased().hasPrefix("content-length:"), let n = Int(line.dropFirst(15).trimmingCharacters(in: .whitespacesAndNewlines)) {
                    sink.total = (sink.status == 206 ? sink.offset : 0) + n
                }
            }
            return n
        }, pointer))
        check(wk_curl_set_write(h, { data, size, count, user in
            let sink = Unmanaged<FileSink>.fromOpaque(user!).takeUnretainedValue()
            let n = size * count
            guard let data else { return 0 }
            return sink.write(UnsafeRawBufferPointer(start: data, count: n)) ? n : 0
        }, pointer))
        try configureTLS(h, check)
        if let bad = codes.first(where: { $0 != 0 }) {
            throw HTTPClientError(curlCode: Int(bad), description: "libcurl refused an option: \(String(cString: wk_curl_strerror(bad)))")
        }
        let code = withExtendedLifetime(sink) { wk_curl_perform(h) }
        guard code == 0 else {
            let detail = String(cString: errorBuffer)
            throw HTTPClientError(curlCode: Int(code), description: "GET \(baseURL + path): " + (detail.isEmpty ? String(cString: wk_curl_strerror(code)) : detail))
        }
        return wk_curl_response_code(h)
    }

    /// What every request sets: URL, HTTP/1.1, no signals, connect timeout, user agent, error buffer, and TLS.
    func commonOptions(_ h: UnsafeMutableRawPointer, _ path: String, _ check: (Int32) -> Void) {
        check(wk_curl_set_string(h, option(WK_CURLOPT_URL), baseURL + path))
        check(wk_curl_set_long(h, option(WK_CURLOPT_HTTP_VERSION), WK_CURL_HTTP_VERSION_1_1))
        check(wk_curl_set_long(h, option(WK_CURLOPT_NOSIGNAL), 1))
        check(wk_curl_set_long(h, option(WK_CURLOPT_CONNECTTIMEOUT_MS), Int(connectTimeout * 1000)))
        check(wk_curl_set_string(h, option(WK_CURLOPT_USERAGENT), userAgent))
        check(wk_curl_set_pointer(h, option(WK_CURLOPT_ERRORBUFFER), errorBuffer))
        errorBuffer[0] = 0
    }

    func configureTLS(_ h: UnsafeMutableRawPointer, _ check: (Int32) -> Void) throws {
        if !currentCredentials.verifyPeer {
            check(wk_curl_set_long(h, option(WK_CURLOPT_SSL_VERIFYPEER), 0))
            check(wk_curl_set_long(h, option(WK_CURLOPT_SSL_VERIFYHOST), 0))
        }
        func blob(_ o: Int, _ text: String) {
            let bytes = Array(text.utf8)
            check(bytes.withUnsafeBytes { wk_curl_set_blob(h, option(o), $0.baseAddress, $0.count) })
        }
        if let ca = currentCredentials.caPEM { blob(WK_CURLOPT_CAINFO_BLOB, ca) }
        if let certificate = currentCredentials.certificatePEM, let key = currentCredentials.privateKeyPEM {
            check(wk_curl_set_string(h, option(WK_CURLOPT_SSLCERTTYPE), "PEM"))
            check(wk_curl_set_string(h, option(WK_CURLOPT_SSLKEYTYPE), "PEM"))
            blob(WK_CURLOPT_SSLCERT_BLOB, certificate)
            blob(WK_CURLOPT_SSLKEY_BLOB, key)
        }
    }
}

func option(_ o: Int) -> CURLoption { CURLoption(rawValue: UInt32(o)) }

final class ResponseSink {
    var body: [UInt8] = []
    var headers: [String: String] = [:]
}

final class RequestSource {
    let bytes: [UInt8]
    var offset = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    func read(into destination: UnsafeMutablePointer<CChar>?, capacity: Int) -> Int {
        guard let destination else { return 0 }
        let n = min(capacity, bytes.count - offset)
        bytes.withUnsafeBytes { source in
            UnsafeMutableRawPointer(destination).copyMemory(from: source.baseAddress! + offset, byteCount: n)
        }
        offset += n
        return n
    }
}

/// Writes a download's body: appended after `offset` on 206, the file restarted on 200, nothing kept otherwise.
final class FileSink {
    let path: String
    let offset: Int
    var status = 0
    /// The whole file's size, from Content-Length (plus the offset of a 206).
    var total: Int?
    var written = 0
    var progress: ((Int, Int?) -> Void)?
    var handle: FileHandle?
    var opened = false

    init(path: String, offset: Int) {
        self.path = path
        self.offset = offset
    }

    func write(_ bytes: UnsafeRawBufferPointer) -> Bool {
        if !opened {
            opened = true
            guard status == 200 || status == 206 else { return true }  // an error body: discarded
            let fm = FileManager.default
            if status == 200 || !fm.fileExists(atPath: path) { _ = fm.createFile(atPath: path, contents: nil) }
            handle = FileHandle(forWritingAtPath: path)
            if status == 206 { _ = try? handle?.seekToEnd() } else { try? handle?.truncate(atOffset: 0) }
        }
        guard status == 200 || status == 206 else { return true }
        guard let handle else { return false }
        do {
            try handle.write(contentsOf: Data(bytes))
            written += bytes.count
            progress?((status == 206 ? offset : 0) + written, total)
            return true
        } catch {
            return false
        }
    }

    func close() {
        try? handle?.synchronize()
        try? handle?.close()
    }
}

/// SHA-256 of a file, read in chunks.
enum FileDigest {
    static func sha256(_ path: String) throws -> String {
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw HTTPClientError(curlCode: 0, description: "cannot read \(path)")
        }
        defer { try? handle.close() }
        var hasher = SHA256()
        while let chunk = try handle.read(upToCount: 1 << 20), !chunk.isEmpty { hasher.update(data: chunk) }
        return hasher.finalize().map { String(format: "%02x", $0) }.joined()
    }
}
