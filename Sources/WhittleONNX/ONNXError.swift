/// The error type of WhittleONNX and of the graph layers built on it: a code tests match on, a message for people,
/// and where it was raised.
public struct ONNXError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// The bytes are not a valid ONNX ModelProto.
        case malformedModel
        /// A node's op type (or domain, or opset) is not one Whittle runs.
        case unsupportedOperator
        /// A tensor has an element type Whittle cannot compute with.
        case unsupportedDataType
        /// A tensor's stored data does not match its declared shape or type.
        case malformedTensor
        /// External weight data is missing, out of bounds or outside the model's directory.
        case externalData
        /// A node refers to a value nobody produces, or the graph is not a DAG.
        case invalidGraph
        /// Shapes are inconsistent.
        case shapeMismatch
        /// An attribute is missing or has an unusable value.
        case invalidAttribute
        /// A caller-provided input is wrong (rank, type, shape, NaN).
        case invalidInput
        /// A shape, size or offset overflows or exceeds `TensorLimits` (a hostile or corrupt file).
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
