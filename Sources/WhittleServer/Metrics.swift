import Foundation
import Hummingbird
import Prometheus
import WhittleRounds
import WhittleStore

/// The coordinator's Prometheus metrics, in one registry per server (text exposition at `GET /metrics`).
///
/// Counters and histograms are updated where things happen (requests, enrollments, reports, closed phases);
/// the fleet gauges (workers by state, rounds by state) are read from the store at each scrape.
package final class CoordinatorMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()

    static let requestBuckets: [Duration] = [.milliseconds(1), .milliseconds(5), .milliseconds(10), .milliseconds(25),
                                             .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
                                             .seconds(1), .seconds(2.5), .seconds(5), .seconds(10)]
    static let phaseBuckets: [Double] = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
    static let aggregationBuckets: [Double] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

    static func name(_ metric: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "whittle", metricName: metric, unitName: unit, helpText: help)
    }

    // MetricNameDescriptor is a struct of constants that swift-prometheus does not mark Sendable.
    nonisolated(unsafe) static let requests = name("http_requests", "total", "HTTP requests answered, by route pattern, method and status code.")
    nonisolated(unsafe) static let requestSeconds = name("http_request_duration", "seconds", "Time to answer an HTTP request, by route pattern.")
    nonisolated(unsafe) static let bytesIn = name("http_received", "bytes_total", "Request body bytes received, by route pattern.")
    nonisolated(unsafe) static let bytesOut = name("artifact_sent", "bytes_total", "Artifact bytes sent to workers and admins (models, states).")
    nonisolated(unsafe) static let enrollments = name("enrollments", "total", "Enrollment attempts, by result (enrolled or the refusal's code).")
    nonisolated(unsafe) static let heartbeats = name("heartbeats", "total", "Heartbeats accepted from enrolled workers.")
    nonisolated(unsafe) static let tasks = name("tasks_assigned", "total", "Round tasks handed to workers, by phase kind.")
    nonisolated(unsafe) static let reports = name("reports", "total", "Task reports, by result: accepted, duplicate, or refused with its reason code.")
    nonisolated(unsafe) static let reportBytes = name("report_accepted", "bytes_total", "Bytes of accepted task reports.")
    nonisolated(unsafe) static let phaseSeconds = name("phase_duration", "seconds", "Wall time of closed round phases, by phase kind.")
    nonisolated(unsafe) static let aggregationSeconds = name("phase_aggregation", "seconds",
                                         "Coordinator time spent folding reports and closing a phase, by phase kind.")
    nonisolated(unsafe) static let roundsEnded = name("rounds_ended", "total", "Rounds that ended, by final state.")
    nonisolated(unsafe) static let workers = name("workers", "", "Enrolled workers by state (enrolled and never seen, online, offline, expired, revoked), at scrape time.")
    nonisolated(unsafe) static let rounds = name("rounds", "", "Rounds by state, at scrape time.")
    nonisolated(unsafe) static let owner = name("round_lease_held", "", "1 while this replica holds the rounds' lease (closes phases, ends rounds); a coordinator running alone always does.")

    package init() {
        registry.makeGauge(descriptor: Self.owner).set(1.0)
    }

    func ownsRounds(_ held: Bool) { registry.makeGauge(descriptor: Self.owner).set(held ? 1.0 : 0.0) }

    func request(route: String, method: String, status: Int, seconds: Duration, bodyBytes: Int) {
        registry.makeCounter(descriptor: Self.requests, labels: [("route", route), ("method", method), ("status", "\(status)")]).increment()
        registry.makeDurationHistogram(descriptor: Self.requestSeconds, labels: [("route", route)], buckets: Self.requestBuckets)
            .record(seconds)
        if bodyBytes > 0 { registry.makeCounter(descriptor: Self.bytesIn, labels: [("route", route)]).increment(by: Int64(bodyBytes)) }
    }

    func enrollment(_ result: String) {
        registry.makeCounter(descriptor: Self.enrollments, labels: [("result", result)]).increment()
    }

    func heartbeat() { registry.makeCounter(descriptor: Self.heartbeats).increment() }

    func taskAssigned(kind: String) {
        registry.makeCounter(descriptor: Self.tasks, labels: [("kind", kind)]).increment()
    }

    /// A report's outcome: `accepted`, `duplicate`, or `refused` with the refusal's code as the reason.
    func report(result: String, reason: String = "", bytes: Int = 0) {
        registry.makeCounter(descriptor: Self.reports, labels: [("result", result), ("reason", reason)]).increment()
        if result == "accepted" { registry.makeCounter(descriptor: Self.reportBytes).increment(by: Int64(bytes)) }
    }

    func artifactSent(bytes: Int) {
        registry.makeCounter(descriptor: Self.bytesOut).increment(by: Int64(bytes))
    }

    func phaseClosed(kind: String, seconds: Double, aggregationSeconds: Double) {
        registry.makeValueHistogram(descriptor: Self.phaseSeconds, labels: [("kind", kind)], buckets: Self.phaseBuckets)
            .record(seconds)
        registry.makeValueHistogram(descriptor: Self.aggregationSeconds, labels: [("kind", kind)], buckets: Self.aggregationBuckets)
            .record(aggregationSeconds)
    }

    func roundEnded(state: String) {
        registry.makeCounter(descriptor: Self.roundsEnded, labels: [("state", state)]).increment()
    }

    /// The exposition text, with the fleet gauges refreshed from `store`.
    func render(store: any CoordinatorStore, now: Date = Date()) async throws -> String {
        var workers = ["enrolled": 0, "online": 0, "offline": 0, "expired": 0, "revoked": 0]
        for w in try await store.workers() { workers[w.state(now: now), default: 0] += 1 }
        for (state, count) in workers {
            registry.makeGauge(descriptor: Self.workers, labels: [("state", state)]).set(Double(count))
        }
        var rounds = Dictionary(uniqueKeysWithValues: RoundState.allCases.map { ($0.rawValue, 0) })
        for r in try await store.rounds() { rounds[r.roundState.rawValue, default: 0] += 1 }
        for (state, count) in rounds {
            registry.makeGauge(descriptor: Self.rounds, labels: [("state", state)]).set(Double(count))
        }
        return registry.emitToString()
    }
}

/// Counts and times every request by its route pattern (`/v1/worker/artifacts/{sha256}`, not the path, so the
/// label set stays small); refusals count with the status they are answered with.
struct MetricsMiddleware: RouterMiddleware {
    let metrics: CoordinatorMetrics

    func handle(_ request: Request, context: WhittleContext,
                next: (Request, WhittleContext) async throws -> Response) async throws -> Response {
        let clock = ContinuousClock()
        let start = clock.now
        let bodyBytes = request.headers[.contentLength].flatMap { Int($0) } ?? 0
        do {
            let response = try await next(request, context)
            metrics.request(route: context.endpointPath ?? "unmatched", method: "\(request.method)", status: response.status.code,
                            seconds: clock.now - start, bodyBytes: bodyBytes)
            return response
        } catch {
            let status = (error as? any HTTPResponseError)?.status.code ?? 500
            metrics.request(route: context.endpointPath ?? "unmatched", method: "\(request.method)", status: status,
                            seconds: clock.now - start, bodyBytes: bodyBytes)
            throw error
        }
    }
}
