import Foundation
import Logging
import Testing
import WhittleCLI
import WhittleIO
import WhittleServer

/// Settings: file, then environment, then flags; log lines as text and JSON.
@Suite struct ConfigTests {
    @Test func theEnvironmentOverridesTheFileAndFlagsOverrideBoth() throws {
        var config = try CoordinatorConfig.parse("heartbeat_seconds = 7\nenroll_burst = 4\nlisten = 0.0.0.0:9000\n")
        try config.override(environment: ["WHITTLE_HEARTBEAT_SECONDS": "5", "WHITTLE_LISTEN": "10.0.0.1:8443", "HOME": "/root"],
                            settings: ["heartbeat_seconds=3", "metrics_token = s3cret"])
        #expect(config.heartbeatSeconds == 3)
        #expect(config.listen == "10.0.0.1:8443")
        #expect(config.enrollBurst == 4)
        #expect(config.metricsToken == "s3cret")
        // Every documented key can be set from the environment, under WHITTLE_ and its name in capitals.
        #expect(CoordinatorConfig.environmentName("report_body_limit") == "WHITTLE_REPORT_BODY_LIMIT")
        #expect(CoordinatorConfig.documentation.count == CoordinatorConfig().values.count)
    }

    @Test func badOverridesNameTheirSource() throws {
        var config = CoordinatorConfig()
        #expect { try config.override(environment: ["WHITTLE_HEARTBEAT_SECONDS": "0"], settings: []) } throws: {
            ($0 as? ServerError)?.code == .invalidSetting
                && "\($0)" == "WHITTLE_HEARTBEAT_SECONDS: heartbeat_seconds must be a positive integer, not '0'"
        }
        #expect { try config.override(environment: [:], settings: ["enroll_burst"]) } throws: { ($0 as? ServerError)?.code == .malformedSetting }
        #expect { try config.override(environment: [:], settings: ["nope=1"]) } throws: {
            ($0 as? ServerError)?.code == .unknownSetting && "\($0)".hasPrefix("--set nope=1: ")
        }
        #expect { try CoordinatorConfig.parse("# c\n\nenroll_rate_per_second = -1\n") } throws: {
            ($0 as? ServerError)?.code == .invalidSetting && "\($0)".hasPrefix("line 3: ")
        }
        #expect { try CoordinatorConfig.parse("heartbeat_seconds = 5\njust words\n") } throws: {
            ($0 as? ServerError)?.code == .malformedSetting && "\($0)".hasPrefix("line 2: ")
        }
    }

    /// A replica's name goes into the lease table and the logs; its lease has a bounded length.
    @Test func replicaSettingsAreChecked() throws {
        var config = CoordinatorConfig()
        try config.set("replica_name", "coord-eu-1")
        try config.set("replica_lease_seconds", "2")
        #expect(config.replicaName == "coord-eu-1" && config.replicaLeaseSeconds == 2)
        for bad in ["two words", "tab\there", String(repeating: "x", count: 201), "r\u{e9}plica", "line\nbreak"] {
            #expect(throws: ServerError.self, "\(bad)") { try config.set("replica_name", bad) }
        }
        for bad in ["1", "0", "-5", "3601", "ten"] {
            #expect(throws: ServerError.self, "\(bad)") { try config.set("replica_lease_seconds", bad) }
        }
        #expect(config.replicaName == "coord-eu-1" && config.replicaLeaseSeconds == 2, "a refused value changes nothing")
    }

    @Test func logLinesCarryTheirMetadataAsTextOrJSON() throws {
        let at = Date(timeIntervalSince1970: 1_800_000_000)
        let metadata: Logger.Metadata = ["worker.name": "cam-1", "round.id": "r1", "phase": "finetune 2/10"]
        let text = LineLogHandler.line(label: "whittle.coordinator", level: .info, message: "report accepted", metadata: metadata,
                                       json: false, at: at)
        #expect(text == "2027-01-15T08:00:00Z info whittle.coordinator: report accepted phase=finetune 2/10 round.id=r1 worker.name=cam-1")
        let json = LineLogHandler.line(label: "whittle.coordinator", level: .warning, message: "report \"refused\"", metadata: metadata,
                                       json: true, at: at)
        let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: String]
        #expect(object == ["ts": "2027-01-15T08:00:00Z", "level": "warning", "logger": "whittle.coordinator",
                           "message": "report \"refused\"", "worker.name": "cam-1", "round.id": "r1", "phase": "finetune 2/10"])
        #expect(try LogFormat.resolve(nil, environment: ["WHITTLE_LOG_FORMAT": "json"]) == .json)
        #expect(try LogFormat.level(nil, environment: [:]) == .info)
        #expect { try LogFormat.resolve("xml", environment: [:]) } throws: { "\($0)".contains("text or json") }  // the command line's message
    }
}

/// The enrollment rate limiter, driven with an explicit clock.
@Suite struct RateLimiterTests {
    @Test func bucketsLimitAnAddressAndRefilledOnesAreForgotten() async {
        let limiter = RateLimiter(rate: 5, burst: 3)
        let t0 = ContinuousClock.now
        for _ in 0..<3 { #expect(await limiter.take("a", now: t0) == nil) }
        #expect(await limiter.take("a", now: t0) == 1, "the burst is spent: wait a second")
        #expect(await limiter.take("a", now: t0 + .milliseconds(250)) == nil, "refilled by rate × elapsed")
        // Thousands of addresses seen once: still draining, they are kept (sweeps double the threshold) ...
        for i in 0..<3000 { _ = await limiter.take("10.0.\(i / 256).\(i % 256)", now: t0) }
        #expect(await limiter.bucketCount == 3001)
        // ... and once they have refilled, the next sweep (at 4,096 buckets) forgets them: only the new remain.
        for i in 0..<1200 { _ = await limiter.take("later-\(i)", now: t0 + .seconds(2)) }
        #expect(await limiter.bucketCount <= 1200)
        // An address still draining keeps its bucket through a sweep.
        for _ in 0..<3 { _ = await limiter.take("busy", now: t0 + .seconds(10)) }
        for i in 0..<2000 { _ = await limiter.take("x\(i)", now: t0 + .seconds(10)) }
        #expect(await limiter.take("busy", now: t0 + .seconds(10)) != nil)
    }
}
