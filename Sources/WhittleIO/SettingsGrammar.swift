import Foundation

// The grammar shared by the settings files (coordinator.conf, worker.conf) and the size flags.

/// Parses sizes such as "1GB", "512MB", "64KiB" or "1048576" into bytes (K/M/G are powers of 1024).
public func parseByteSize(_ text: String) -> Int? {
    let trimmed = text.trimmingCharacters(in: .whitespaces).uppercased()
    let digits = trimmed.prefix { $0.isNumber || $0 == "." }
    guard let value = Double(digits), value > 0 else { return nil }
    let unit = trimmed.dropFirst(digits.count).replacingOccurrences(of: "IB", with: "B")
    let multipliers: [String: Double] = ["": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1_048_576, "MB": 1_048_576,
                                         "G": 1_073_741_824, "GB": 1_073_741_824]
    guard let multiplier = multipliers[unit] else { return nil }
    return Int(value * multiplier)
}

/// A settings file's `key = value` lines (blank lines and `#` comments skipped), each with its 1-based line number;
/// `bad` is the first line that is neither (reading stops there).
public func settingLines(_ text: String) -> (lines: [(number: Int, key: String, value: String)], bad: (number: Int, text: String)?) {
    var out: [(number: Int, key: String, value: String)] = []
    for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
        let line = raw.trimmingCharacters(in: .whitespaces)
        if line.isEmpty || line.hasPrefix("#") { continue }
        let parts = line.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
        guard parts.count == 2 else { return (out, (index + 1, line)) }
        out.append((index + 1, parts[0], parts[1]))
    }
    return (out, nil)
}
