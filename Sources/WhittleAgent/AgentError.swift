/// What the worker's agent refuses or cannot do outside the pure core (whose errors it passes on): a data directory
/// not enrolled or damaged, a coordinator answer it cannot use, a setting out of range.
public struct AgentError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// The data directory holds no enrollment (`worker enroll` has not run there).
        case notEnrolled
        /// A file of the data directory is damaged or cannot be read.
        case dataDirectory
        /// The coordinator refused a request, or answered with something unusable (a certificate that does not
        /// parse or is not for this board's key).
        case coordinatorRefused
        /// A task names something the protocol does not allow (a malformed artifact name), or an artifact does not
        /// match its digest.
        case badTask
        /// A setting's value is out of its range or not of its type.
        case invalidSetting
        /// No setting has that name.
        case unknownSetting
        /// A settings line that is not `key = value`.
        case malformedSetting
    }

    public let code: Code
    public let message: String
    public let file: String
    public let line: Int

    public init(_ code: Code, _ message: String, file: String = #fileID, line: Int = #line) {
        self.code = code
        self.message = message
        self.file = file
        self.line = line
    }

    /// The same error, its message prefixed with where it came from (`line 3`, `WHITTLE_WORKER_THREADS`).
    public func within(_ source: String) -> AgentError { AgentError(code, "\(source): \(message)", file: file, line: line) }

    public var description: String { message }
}
