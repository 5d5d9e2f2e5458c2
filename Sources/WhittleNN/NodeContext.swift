import WhittleONNX
import WhittleTensor

/// A node together with what is known about its inputs, handed to an operator's shape inference and kernel
/// builder. Attribute readers apply ONNX defaults and throw errors that name the node.
public struct NodeContext: Sendable {
    public let node: Node
    /// One entry per declared input; nil for an omitted optional input (empty name).
    public let inputs: [ValueMeta?]
    /// The opset version of the default domain.
    public let opset: Int64

    public init(node: Node, inputs: [ValueMeta?], opset: Int64) {
        self.node = node
        self.inputs = inputs
        self.opset = opset
    }

    // MARK: Inputs

    /// Input `i`, which must be present.
    public func input(_ i: Int) throws -> ValueMeta {
        guard i < inputs.count, let meta = inputs[i] else {
            throw error(.invalidGraph, "input \(i) is required but missing")
        }
        return meta
    }

    /// Input `i` when present.
    public func optionalInput(_ i: Int) -> ValueMeta? { i < inputs.count ? inputs[i] : nil }

    /// The constant value of input `i`, which must be known before running (for example a Reshape target shape).
    public func constantInput(_ i: Int, _ what: String) throws -> Tensor {
        let meta = try input(i)
        guard let value = meta.constant else {
            throw error(.invalidGraph, "\(what) (input \(i), '\(node.inputs[i])') must be a constant or computable from shapes")
        }
        return value
    }

    /// Input `i` must be a float tensor of the given rank (nil: any rank).
    public func floatInput(_ i: Int, rank: Int? = nil) throws -> ValueMeta {
        let meta = try input(i)
        guard meta.dtype.isFloatingPoint else {
            throw error(.unsupportedDataType, "input \(i) ('\(node.inputs[i])') has element type \(meta.dtype); a float tensor is required")
        }
        if let rank, meta.rank != rank {
            throw error(.shapeMismatch, "input \(i) ('\(node.inputs[i])') has shape \(meta.shape); rank \(rank) is required")
        }
        return meta
    }

    // MARK: Attributes

    public func int(_ name: String, default value: Int64) throws -> Int64 {
        guard let attribute = node.attribute(name) else { return value }
        guard let v = attribute.value.int else { throw wrongKind(attribute, "INT") }
        return v
    }

    public func int(_ name: String) throws -> Int64? {
        guard let attribute = node.attribute(name) else { return nil }
        guard let v = attribute.value.int else { throw wrongKind(attribute, "INT") }
        return v
    }

    public func float(_ name: String, default value: Float) throws -> Float {
        guard let attribute = node.attribute(name) else { return value }
        guard let v = attribute.value.float else { throw wrongKind(attribute, "FLOAT") }
        return v
    }

    public func float(_ name: String) throws -> Float? {
        guard let attribute = node.attribute(name) else { return nil }
        guard let v = attribute.value.float else { throw wrongKind(attribute, "FLOAT") }
        return v
    }

    public func ints(_ name: String) throws -> [Int]? {
        guard let attribute = node.attribute(name) else { return nil }
        guard let v = attribute.value.ints else { throw wrongKind(attribute, "INTS") }
        return v.map { Int($0) }
    }

    public func floats(_ name: String) throws -> [Float]? {
        guard let attribute = node.attribute(name) else { return nil }
        guard let v = attribute.value.floats else { throw wrongKind(attribute, "FLOATS") }
        return v
    }

    public func string(_ name: String, default value: String) throws -> String {
        guard let attribute = node.attribute(name) else { return value }
        guard let v = attribute.value.string else { throw wrongKind(attribute, "STRING") }
        return v
    }

    /// Normalizes a possibly negative axis for a tensor of `rank`.
    public func axis(_ value: Int, rank: Int, _ what: String = "axis") throws -> Int {
        let normalized = value < 0 ? value + rank : value
        guard normalized >= 0, normalized < max(rank, 1) else {
            throw error(.invalidAttribute, "\(what) \(value) is out of range for rank \(rank)")
        }
        return normalized
    }

    // MARK: Sizes

    /// `shape` when every dimension is non-negative and its element count is within `TensorLimits`; otherwise an
    /// error naming the node and `what` (an output, a target shape).
    @discardableResult
    public func checkedShape(_ shape: [Int], _ what: String) throws -> [Int] {
        guard TensorLimits.elementCount(shape) != nil else {
            throw error(.tooLarge, TensorLimits.limitMessage(shape, what))
        }
        return shape
    }

    /// Integer attribute values used as sizes (pads, strides, kernel extents), each within ±`TensorLimits.maximumElements`
    /// so that sums and products of a few of them cannot overflow.
    @discardableResult
    public func checkedSizes(_ values: [Int], _ what: String) throws -> [Int] {
        guard values.allSatisfy({ $0 >= -TensorLimits.maximumElements && $0 <= TensorLimits.maximumElements }) else {
            throw error(.tooLarge, "\(what) \(values) exceed the largest size Whittle accepts (\(TensorLimits.maximumElements))")
        }
        return values
    }

    // MARK: Errors

    /// An error whose message starts with the node's op type and name.
    public func error(_ code: ONNXError.Code, _ message: String) -> ONNXError {
        ONNXError(code, "\(node.label): \(message)")
    }

    private func wrongKind(_ attribute: Attribute, _ expected: String) -> ONNXError {
        error(.invalidAttribute, "attribute '\(attribute.name)' is \(attribute.value.kindName), expected \(expected)")
    }
}
