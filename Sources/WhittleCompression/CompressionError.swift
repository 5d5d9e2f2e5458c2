/// The error type of WhittleCompression: a code tests match on, a message for people, and where it was raised.
public struct CompressionError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// Statistics collected with different settings (bin edges, channel counts) cannot be merged.
        case incompatibleStatistics
        /// Statistics contain NaN or infinite values, or no samples.
        case invalidStatistics
        case invalidArgument
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

    public var description: String { message }
}
