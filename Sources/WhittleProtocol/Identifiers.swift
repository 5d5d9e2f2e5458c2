/// The grammar of the identifiers that cross the wire and may name a file on either side: every one is checked
/// against it before it touches a path (a worker trusts nothing a coordinator sends beyond what the protocol defines).
public enum Identifiers {
    /// The longest round id accepted.
    public static let maximumRoundIDLength = 64

    /// Round ids as coordinators make them (`r20261206T030000Z-1a2b3c4d`): 1 to 64 ASCII letters, digits, `-` and
    /// `_`, starting with a letter or digit. No `/`, `.`, NUL or other byte that could leave a folder.
    public static func isRoundID(_ id: String) -> Bool {
        guard let first = id.utf8.first, id.utf8.count <= maximumRoundIDLength, isAlphanumeric(first) else { return false }
        return id.utf8.allSatisfy { isAlphanumeric($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") }
    }

    /// A SHA-256 digest as Whittle writes it: 64 lowercase hexadecimal digits (artifact names).
    public static func isSHA256(_ text: String) -> Bool {
        text.utf8.count == 64 && text.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }

    /// Why `task` cannot be taken, or nil when every identifier in it is well formed.
    public static func problem(in task: Whittle_Task) -> String? {
        guard isRoundID(task.roundID) else {
            return "the task's round id is malformed (\(task.roundID.utf8.count) bytes; 1 to \(maximumRoundIDLength) letters, digits, '-' or '_' are allowed)"
        }
        for (what, sha) in [("model", task.modelSha256), ("teacher", task.teacherSha256), ("EWC state", task.ewcSha256)]
        where !(sha.isEmpty && what != "model") && !isSHA256(sha) {
            return "the task's \(what) artifact is not a SHA-256 (64 lowercase hex digits)"
        }
        return nil
    }

    private static func isAlphanumeric(_ c: UInt8) -> Bool {
        (0x30...0x39).contains(c) || (0x41...0x5A).contains(c) || (0x61...0x7A).contains(c)
    }
}
