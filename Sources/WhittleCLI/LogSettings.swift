import Foundation
import Logging
import WhittleIO

extension LogFormat {
    /// From `--log-format`, else `WHITTLE_LOG_FORMAT`, else text.
    public static func resolve(_ flag: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> LogFormat {
        let text = flag ?? environment["WHITTLE_LOG_FORMAT"] ?? "text"
        guard let format = LogFormat(rawValue: text) else { throw CLIError("the log format must be text or json, not '\(text)'") }
        return format
    }

    /// From `--log-level`, else `WHITTLE_LOG_LEVEL` (or `LOG_LEVEL`), else info.
    public static func level(_ flag: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws -> Logger.Level {
        let text = flag ?? environment["WHITTLE_LOG_LEVEL"] ?? environment["LOG_LEVEL"] ?? "info"
        guard let level = Logger.Level(rawValue: text) else {
            throw CLIError("the log level must be one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")), not '\(text)'")
        }
        return level
    }
}
