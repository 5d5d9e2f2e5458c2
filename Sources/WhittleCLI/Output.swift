import Foundation

/// Prints `value` as pretty JSON with sorted keys on standard output.
public func printJSON<T: Encodable>(_ value: T) throws {
    print(String(decoding: try jsonBytes(value), as: UTF8.self))
}

/// `value` as pretty JSON with sorted keys.
public func jsonBytes<T: Encodable>(_ value: T) throws -> [UInt8] {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
    return [UInt8](try encoder.encode(value))
}

/// Formats a count with thousands separators: 1234567 → "1,234,567".
func grouped(_ n: Int) -> String {
    let digits = String(n.magnitude)
    var out = ""
    for (i, c) in digits.enumerated() {
        if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
        out.append(c)
    }
    return n < 0 ? "-" + out : out
}

/// Formats a byte count: 1536 → "1.5 KiB".
public func byteSize(_ bytes: Int) -> String {
    let units = ["B", "KiB", "MiB", "GiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    return unit == 0 ? "\(bytes) B" : String(format: "%.1f %@", value, units[unit])
}

/// Pads `s` on the right (or left) to `width` characters.
func pad(_ s: String, _ width: Int, right: Bool = false) -> String {
    let fill = String(repeating: " ", count: max(0, width - s.count))
    return right ? fill + s : s + fill
}

/// Renders rows as an aligned text table; columns whose index is in `numeric` align right.
public func table(_ header: [String], _ rows: [[String]], numeric: Set<Int> = []) -> String {
    let widths = header.indices.map { i in ([header[i]] + rows.map { $0[i] }).map(\.count).max() ?? 0 }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { pad($0.element, widths[$0.offset], right: numeric.contains($0.offset)) }
            .joined(separator: "  ")
    }
    return ([line(header), widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ")]
        + rows.map(line)).joined(separator: "\n")
}

/// A one-line progress bar on standard error, drawn only when standard error is a terminal (so logs, pipes and CI
/// stay quiet), redrawn at most ten times a second.
public final class ProgressBar: @unchecked Sendable {
    public let enabled: Bool
    var drawn = false
    var last = ContinuousClock.now - .seconds(1)

    public init(enabled: Bool = true) { self.enabled = enabled && isatty(STDERR_FILENO) != 0 }

    public func update(_ label: String, _ done: Int, _ total: Int, _ detail: String = "", force: Bool = false) {
        guard enabled else { return }
        let now = ContinuousClock.now
        // The last step of a known total is always drawn; anything else at most every 100 ms.
        guard force || (total > 0 && done >= total) || now - last >= .milliseconds(100) else { return }
        last = now
        let width = 30
        let filled = total > 0 ? min(width, width * max(done, 0) / total) : 0
        let bar = String(repeating: "█", count: filled) + String(repeating: "·", count: width - filled)
        FileHandle.standardError.write(Data("\r\u{1B}[2K\(label) \(bar) \(detail)".utf8))
        drawn = true
    }

    /// Bytes: "3.1/12.0 MiB".
    public func bytes(_ label: String, _ done: Int, _ total: Int?) {
        let mib = { (n: Int) in String(format: "%.1f", Double(n) / 1_048_576) }
        update(label, done, total ?? 0, total.map { "\(mib(done))/\(mib($0)) MiB" } ?? "\(mib(done)) MiB")
    }

    public func finish() {
        guard enabled, drawn else { return }
        FileHandle.standardError.write(Data("\r\u{1B}[2K".utf8))
        drawn = false
    }
}
