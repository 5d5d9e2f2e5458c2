/// The error type of WhittleTensor: a code tests can match on, a message for people, and where it was raised.
public struct TensorError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        case shapeMismatch
        case unsupportedDataType
        case malformedNPY
        case kernelFailure
        case invalidArgument
        /// A shape or size is negative, overflows, or exceeds `TensorLimits`.
        case tooLarge
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
