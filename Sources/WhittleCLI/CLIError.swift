/// An error for the person at the terminal: the message says what is wrong and, where possible, what to do.
/// Errors of the libraries below (`FileError`, `ServerError`, `AgentError`, `ONNXError`…) reach the terminal as they
/// are; this one is for what only a command knows.
public struct CLIError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// Flags that do not fit together or a value out of range.
        case invalidArguments
        /// The data directory is missing or not what the command needs.
        case dataDirectory
        /// The coordinator (or the model) refused what the command asked.
        case refused
    }

    public let code: Code
    public let description: String
    public let file: String
    public let line: Int

    public init(_ message: String, code: Code = .invalidArguments, file: String = #fileID, line: Int = #line) {
        self.code = code
        description = message
        self.file = file
        self.line = line
    }
}
