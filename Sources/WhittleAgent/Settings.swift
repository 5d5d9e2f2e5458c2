import Foundation
import Logging
import WhittleIO

/// `worker run`'s settings: `DIR/worker.conf` (`key = value` lines, `#` comments; optional), overridden by
/// `WHITTLE_WORKER_KEY` environment variables, overridden by the command's flags.
public struct WorkerSettings: Equatable, Sendable {
    public var data: String?
    public var labels: String?
    public var evalData: String?
    public var evalLabels: String?
    public var memoryLimit: String?
    public var threads: Int?
    /// The board cannot time models: it takes no latency task (`no_timing = true`).
    public var noTiming = false
    public var logFormat: String?
    public var logLevel: String?

    public init() {}

    package static let documentation: [(key: String, comment: String)] = [
        ("data", "The board's local samples: NCHW float32 .npy, or .npz with one array per model input (required here, in the environment or as --data)."),
        ("labels", "Labels of the samples, int .npy ([N], or per pixel [N, H, W]); without them the board takes part through distillation and statistics."),
        ("eval_data", "Held-out samples (.npy or .npz) for the evaluation phase; default: data."),
        ("eval_labels", "Labels of eval_data (.npy)."),
        ("memory_limit", "Memory budget for jobs, e.g. 1GB (the batch size shrinks to fit); default: none."),
        ("threads", "Compute threads for jobs; default: all cores."),
        ("no_timing", "true when this board cannot time models (a shared or throttled machine): it takes no latency task of an architecture search; default: false."),
        ("log_format", "text or json (one JSON object per line on standard error); default: text."),
        ("log_level", "trace, debug, info, notice, warning, error or critical; default: info."),
    ]

    /// The environment variable for `key`: `WHITTLE_WORKER_` and the key in capitals.
    public static func environmentName(_ key: String) -> String { "WHITTLE_WORKER_" + key.uppercased() }

    public mutating func set(_ key: String, _ value: String) throws {
        switch key {
        case "data": data = value
        case "labels": labels = value
        case "eval_data": evalData = value
        case "eval_labels": evalLabels = value
        case "memory_limit":
            guard parseByteSize(value) != nil else { throw AgentError(.invalidSetting, "memory_limit '\(value)' is not a size like 1GB") }
            memoryLimit = value
        case "threads":
            guard let n = Int(value), n >= 1 else { throw AgentError(.invalidSetting, "threads must be a positive integer, not '\(value)'") }
            threads = n
        case "no_timing":
            guard let b = ["true": true, "false": false, "1": true, "0": false, "yes": true, "no": false][value.lowercased()] else {
                throw AgentError(.invalidSetting, "no_timing must be true or false, not '\(value)'")
            }
            noTiming = b
        case "log_format":
            guard LogFormat(rawValue: value) != nil else { throw AgentError(.invalidSetting, "log_format must be text or json, not '\(value)'") }
            logFormat = value
        case "log_level":
            guard Logger.Level(rawValue: value) != nil else { throw AgentError(.invalidSetting, "log_level '\(value)' is not a log level") }
            logLevel = value
        default:
            throw AgentError(.unknownSetting, "unknown setting '\(key)' (known: \(Self.documentation.map(\.key).joined(separator: ", ")))")
        }
    }

    public static func parse(_ text: String) throws -> WorkerSettings {
        var settings = WorkerSettings()
        let (lines, bad) = settingLines(text)
        for (number, key, value) in lines {
            do { try settings.set(key, value) } catch let error as AgentError { throw error.within("line \(number)") }
        }
        if let bad { throw AgentError(.malformedSetting, "line \(bad.number): expected key = value, got '\(bad.text)'") }
        return settings
    }

    /// `DIR/worker.conf` if it exists, then the environment.
    public static func load(file: String, environment: [String: String]) throws -> WorkerSettings {
        var settings = WorkerSettings()
        if FileManager.default.fileExists(atPath: file) {
            do {
                settings = try parse(try String(contentsOfFile: file, encoding: .utf8))
            } catch let error as AgentError {
                throw error.within(file)
            }
        }
        for (key, _) in documentation {
            if let value = environment[environmentName(key)] {
                do { try settings.set(key, value) } catch let error as AgentError { throw error.within(environmentName(key)) }
            }
        }
        return settings
    }

    /// The file `worker enroll` writes: every setting documented and commented out.
    public static var template: String {
        var out = "# Whittle worker settings for `worker run` (flags override these, and WHITTLE_WORKER_KEY environment\n"
        out += "# variables override this file). Uncomment to set.\n"
        for (key, comment) in documentation { out += "\n# \(comment)\n# \(key) =\n" }
        return out
    }
}

/// The agent's messages: in text form as before (progress on standard output, problems on standard error), or
/// as JSON lines through swift-log with dotted metadata (`worker.name`, `round.id`, `phase`, `task.kind`).
package struct AgentLog: Sendable {
    package let json: Bool
    package let logger: Logger

    package init(format: LogFormat, level: Logger.Level, worker: String) {
        json = format == .json
        var logger = Logger(label: "whittle.worker")
        logger.logLevel = level
        logger[metadataKey: "worker.name"] = "\(worker)"
        self.logger = logger
    }

    package func info(_ message: String, _ metadata: Logger.Metadata = [:]) {
        if json { logger.info("\(message)", metadata: metadata) } else if logger.logLevel <= .info { print(message) }
    }

    package func warning(_ message: String, _ metadata: Logger.Metadata = [:]) {
        if json {
            logger.warning("\(message)", metadata: metadata)
        } else if logger.logLevel <= .warning {
            FileHandle.standardError.write(Data("\(message)\n".utf8))
        }
    }
}
