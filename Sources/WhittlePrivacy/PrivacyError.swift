/// The error type of WhittlePrivacy: a code tests match on, a message for people, and where it was raised.
public struct PrivacyError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        case invalidArgument
        /// Bytes that do not decode: a share, an envelope, a key.
        case malformed
        /// A message out of the protocol's order, or from or about a party it does not involve.
        case protocolViolation
        /// A request that would reveal what the protocol hides (both mask secrets of one party).
        case refused
        /// Fewer shares or survivors than the threshold.
        case notEnoughShares
        /// A reconstructed secret does not match what its owner committed to.
        case verificationFailed
        /// A value outside what the fixed-point ring can hold.
        case outOfRange
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
