import Foundation
import Logging

/// How long-running commands (`coordinator serve`, `worker run`) write their logs on standard error.
public enum LogFormat: String, CaseIterable, Sendable {
    /// `2026-11-29T17:00:00Z info whittle.coordinator: report accepted round.id=… worker.name=…`
    case text
    /// One JSON object per line: `ts`, `level`, `logger`, `message`, and each metadata key (`round.id`, …) as a field.
    case json

    /// Installs the format for the process's loggers (once per process, before the first logger is made).
    public func bootstrap() {
        let json = self == .json
        LoggingSystem.bootstrap { label in LineLogHandler(label: label, json: json) }
    }
}

/// One line per event on standard error, as text (`key=value` metadata, sorted) or as a JSON object.
public struct LineLogHandler: LogHandler {
    public let label: String
    public let json: Bool
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?

    public init(label: String, json: Bool) {
        self.label = label
        self.json = json
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { _, new in new } }
        if let extra = event.metadata { all.merge(extra) { _, new in new } }
        FileHandle.standardError.write(Data((Self.line(label: label, level: event.level, message: "\(event.message)", metadata: all,
                                                       json: json, at: Date()) + "\n").utf8))
    }

    /// The formatted line (pure, for tests).
    public static func line(label: String, level: Logger.Level, message: String, metadata: Logger.Metadata, json: Bool,
                            at date: Date) -> String {
        let time = date.formatted(.iso8601)
        if json {
            var object: [String: String] = [:]
            for (key, value) in metadata { object[key] = "\(value)" }
            object["ts"] = time
            object["level"] = level.rawValue
            object["logger"] = label
            object["message"] = message
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            return (try? String(decoding: encoder.encode(object), as: UTF8.self)) ?? "{}"
        }
        let fields = metadata.keys.sorted().map { "\($0)=\(metadata[$0]!)" }.joined(separator: " ")
        return "\(time) \(level.rawValue) \(label): \(message)\(fields.isEmpty ? "" : " " + fields)"
    }
}
