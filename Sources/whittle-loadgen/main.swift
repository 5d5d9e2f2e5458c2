import Crypto
import Foundation
import WhittleHTTPClient
import WhittlePKI
import WhittleProtocol
import X509

/// Load generator for benchmarks/heartbeats.py: enrolls many worker identities with one token, then sends
/// heartbeats over mutual TLS from concurrent connections and prints throughput and latency as JSON.
///
///   whittle-loadgen --coordinator URL [--coordinator URL…] --ca CA.pem --token T --workers N --concurrency C
///                   --seconds S [--period P]
///
/// With --period P each of the N workers sends one heartbeat every P seconds (a fleet polling); without it, C
/// connections send heartbeats back to back for S seconds. A polling fleet is spread evenly over the period, as boards
/// started at different times are: worker g of N is due at start + P × (cycle + g / N); C threads send for them, and
/// `p99LagMilliseconds` says how late the sends were against that schedule (large: too few threads). The first cycle
/// opens every worker's connection (a fleet connecting at once, as after a restart): it is not measured, and its
/// figures are reported apart (`connect…`); the --seconds measured follow it. With several coordinators (replicas on one database),
/// worker k enrolls with and heartbeats to coordinator k mod their count.
struct Options {
    var coordinators: [String] = []
    var ca = ""
    var token = ""
    var workers = 1
    var concurrency = 1
    var seconds = 5.0
    var period: Double?

    init(_ arguments: [String]) {
        var i = 1
        func value() -> String {
            i += 1
            guard i < arguments.count else { fail("missing value for \(arguments[i - 1])") }
            return arguments[i]
        }
        while i < arguments.count {
            switch arguments[i] {
            case "--coordinator": coordinators.append(value())
            case "--ca": ca = value()
            case "--token": token = value()
            case "--workers": workers = Int(value()) ?? 1
            case "--concurrency": concurrency = Int(value()) ?? 1
            case "--seconds": seconds = Double(value()) ?? 5
            case "--period": period = Double(value())
            default: fail("unknown argument \(arguments[i])")
            }
            i += 1
        }
        if coordinators.isEmpty { fail("give --coordinator URL") }
    }

    /// The coordinator worker `k` talks to.
    func coordinator(_ k: Int) -> String { coordinators[k % coordinators.count] }
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("whittle-loadgen: \(message)\n".utf8))
    exit(1)
}

let options = Options(CommandLine.arguments)
let caPEM = (try? String(contentsOfFile: options.ca, encoding: .utf8)) ?? { fail("cannot read \(options.ca)") }()
let run = UUID().uuidString.prefix(8)

/// Values written by concurrent lanes.
final class Shared<T>: @unchecked Sendable {
    let lock = NSLock()
    var value: T
    init(_ value: T) { self.value = value }
    func update(_ body: (inout T) -> Void) {
        lock.lock()
        body(&value)
        lock.unlock()
    }
}

/// Enrolls `count` identities, eight at a time.
func enroll(_ count: Int) -> [TLSCredentials] {
    let identities = Shared([TLSCredentials?](repeating: nil, count: count))
    let lanes = min(count, 8)
    DispatchQueue.concurrentPerform(iterations: lanes) { lane in
        var clients: [String: HTTPClient] = [:]
        for k in stride(from: lane, to: count, by: lanes) {
            let url = options.coordinator(k)
            let client = clients[url] ?? HTTPClient(baseURL: url, credentials: TLSCredentials(caPEM: caPEM))
            clients[url] = client
            let key = P256.Signing.PrivateKey()
            var request = Whittle_EnrollRequest()
            request.protocolVersion = 1
            request.token = options.token
            request.csrDer = Data((try? PKI.makeCSR(name: "load-\(run)-\(k)", key: key)) ?? [])
            guard let body: [UInt8] = try? request.serializedBytes(),
                let response = try? client.send("POST", "/v1/enroll", body: body, contentType: "application/x-protobuf",
                                                retry: RetryPolicy(attempts: 20, baseDelay: 0.05, maximumDelay: 1)),
                response.status == 200,
                let answer = try? Whittle_EnrollResponse(serializedBytes: response.body),
                let certificate = try? Certificate(derEncoded: Array(answer.certificateDer)),
                let pem = try? certificate.serializeAsPEM().pemString
            else { fail("enrollment \(k) failed") }
            identities.update { $0[k] = TLSCredentials(caPEM: caPEM, certificatePEM: pem, privateKeyPEM: key.pemRepresentation) }
        }
    }
    return identities.value.map { $0! }
}

var heartbeat = Whittle_Heartbeat()
heartbeat.protocolVersion = 1
heartbeat.capabilities.cores = 2
heartbeat.capabilities.samples = 1000
heartbeat.capabilities.version = "loadgen"
let body: [UInt8] = (try? heartbeat.serializedBytes()) ?? []

let enrollStart = Date()
let identities = enroll(options.workers)
let enrollSeconds = Date().timeIntervalSince(enrollStart)

let clients = identities.enumerated().map { HTTPClient(baseURL: options.coordinator($0.offset), credentials: $0.element) }
let latencies = Shared([[Double]](repeating: [], count: options.concurrency))
let errors = Shared([Int](repeating: 0, count: options.concurrency))
let lags = Shared([[Double]](repeating: [], count: options.concurrency))
let connecting = Shared((latencies: [Double](), errors: 0))
let start = Date()
/// Polling: one unmeasured cycle first.
let warmup = options.period ?? 0
let deadline = start.addingTimeInterval(warmup + options.seconds)
/// Runs `body(lane)` on `count` threads of its own at once (concurrentPerform would cap them at the core count).
func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let group = DispatchGroup()
    for lane in 0..<count {
        group.enter()
        let thread = Thread {
            body(lane)
            group.leave()
        }
        thread.stackSize = 1 << 20
        thread.start()
    }
    group.wait()
}

onThreads(options.concurrency) { lane in
    let mine = stride(from: lane, to: clients.count, by: options.concurrency).map { clients[$0] }
    guard !mine.isEmpty else { return }
    var local: [Double] = [], lateness: [Double] = [], failed = 0, k = 0
    var early: [Double] = [], earlyFailed = 0
    while Date() < deadline {
        let measured = options.period == nil || k >= mine.count
        let client = mine[k % mine.count]
        if let period = options.period {
            // This worker's turn: global index lane + j × C of N, in cycle k / |mine|.
            let g = lane + (k % mine.count) * options.concurrency
            let due = start.addingTimeInterval(period * (Double(k / mine.count) + Double(g) / Double(clients.count)))
            let wait = due.timeIntervalSinceNow
            if wait > 0 {
                guard due < deadline else { break }
                Thread.sleep(forTimeInterval: wait)
            }
            if measured { lateness.append(max(0, -wait) * 1000) }
        }
        let t0 = DispatchTime.now().uptimeNanoseconds
        let ok = (try? client.request("POST", "/v1/worker/heartbeat", body: body, contentType: "application/x-protobuf"))?.status == 200
        let milliseconds = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6
        switch (measured, ok) {
        case (true, true): local.append(milliseconds)
        case (true, false): failed += 1
        case (false, true): early.append(milliseconds)
        case (false, false): earlyFailed += 1
        }
        k += 1
    }
    latencies.update { $0[lane] = local }
    lags.update { $0[lane] = lateness }
    connecting.update {
        $0.latencies += early
        $0.errors += earlyFailed
    }
    errors.update { $0[lane] = failed }
}
let elapsed = Date().timeIntervalSince(start) - warmup
let connected = connecting.value.latencies.sorted()
let all = latencies.value.flatMap { $0 }.sorted()
func percentile(_ p: Double, of values: [Double] = all) -> Double {
    values.isEmpty ? 0 : values[min(values.count - 1, Int(Double(values.count) * p))]
}
let lagged = lags.value.flatMap { $0 }.sorted()
let report: [String: Double] = [
    "workers": Double(options.workers), "concurrency": Double(options.concurrency), "seconds": elapsed,
    "requests": Double(all.count), "errors": Double(errors.value.reduce(0, +)), "requestsPerSecond": Double(all.count) / elapsed,
    "p50Milliseconds": percentile(0.5), "p99Milliseconds": percentile(0.99), "enrollSeconds": enrollSeconds,
    "p99LagMilliseconds": percentile(0.99, of: lagged),
    "connectRequests": Double(connected.count), "connectErrors": Double(connecting.value.errors),
    "connectP99Milliseconds": percentile(0.99, of: connected),
]
let data = try! JSONSerialization.data(withJSONObject: report, options: [.sortedKeys])
print(String(decoding: data, as: UTF8.self))
