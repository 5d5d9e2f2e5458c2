import WhittleTensor

/// An ONNX model as Whittle edits it. The IR mirrors ONNX's `ModelProto`: everything Whittle interprets is a plain
/// Swift value, and each level keeps the proto it was read from (`preserved`) so that fields Whittle does not
/// interpret (training info, functions, sparse initializers, annotations, unknown fields) are written back unchanged.
public struct Model: Sendable {
    public var irVersion: Int64
    public var opsetImports: [OpsetImport]
    public var producerName: String
    public var producerVersion: String
    public var domain: String
    public var modelVersion: Int64
    public var docString: String
    /// `metadata_props`, in file order.
    public var metadata: [(key: String, value: String)]
    public var graph: Graph
    var preserved: Onnx_ModelProto

    /// A new model around `graph`, importing the default domain at `opset`.
    public init(graph: Graph, opset: Int64, irVersion: Int64 = 8, producerName: String = "whittle") {
        self.irVersion = irVersion
        self.opsetImports = [OpsetImport(domain: "", version: opset)]
        self.producerName = producerName
        self.producerVersion = ""
        self.domain = ""
        self.modelVersion = 0
        self.docString = ""
        self.metadata = []
        self.graph = graph
        self.preserved = Onnx_ModelProto()
    }

    init(proto: Onnx_ModelProto, graph: Graph) {
        irVersion = proto.irVersion
        opsetImports = proto.opsetImport.map { OpsetImport(domain: $0.domain, version: $0.version) }
        producerName = proto.producerName
        producerVersion = proto.producerVersion
        domain = proto.domain
        modelVersion = proto.modelVersion
        docString = proto.docString
        metadata = proto.metadataProps.map { (key: $0.key, value: $0.value) }
        self.graph = graph
        preserved = proto
        preserved.graph = Onnx_GraphProto()  // the graph lives in `graph`
    }

    /// The opset version of the default ("" or "ai.onnx") domain.
    public var defaultOpset: Int64? {
        opsetImports.first { $0.domain == "" || $0.domain == "ai.onnx" }?.version
    }
}

public struct OpsetImport: Sendable, Equatable {
    public var domain: String
    public var version: Int64
    public init(domain: String, version: Int64) {
        self.domain = domain
        self.version = version
    }
}

/// A computation graph: nodes in file order (ONNX requires topological order; `Graph.topologicalOrder` checks).
public struct Graph: Sendable {
    public var name: String
    public var docString: String
    public var inputs: [ValueInfo]
    public var outputs: [ValueInfo]
    public var valueInfo: [ValueInfo]
    public var nodes: [Node]
    public var initializers: [Initializer]
    var preserved: Onnx_GraphProto

    public init(name: String, nodes: [Node], inputs: [ValueInfo], outputs: [ValueInfo],
                initializers: [Initializer] = [], valueInfo: [ValueInfo] = []) {
        self.name = name
        self.docString = ""
        self.nodes = nodes
        self.inputs = inputs
        self.outputs = outputs
        self.initializers = initializers
        self.valueInfo = valueInfo
        self.preserved = Onnx_GraphProto()
    }

    /// Initializers by name.
    public var initializerIndex: [String: Int] {
        var index: [String: Int] = [:]
        for (i, initializer) in initializers.enumerated() { index[initializer.name] = i }
        return index
    }

    /// The initializer called `name`, if any.
    public func initializer(named name: String) -> Initializer? {
        initializers.first { $0.name == name }
    }

    /// Graph inputs that are not initializers (the values a caller feeds).
    public var runtimeInputs: [ValueInfo] {
        let names = Set(initializers.map(\.name))
        return inputs.filter { !names.contains($0.name) }
    }
}

/// A named, typed value (graph input, output or intermediate annotation).
public struct ValueInfo: Sendable {
    public var name: String
    public var type: ValueType
    public var docString: String
    var preserved: Onnx_ValueInfoProto

    public init(name: String, elementType: DataType, shape: [Dimension]?) {
        self.name = name
        self.type = .tensor(elementType: elementType, shape: shape)
        self.docString = ""
        self.preserved = Onnx_ValueInfoProto()
    }

    init(proto: Onnx_ValueInfoProto) {
        name = proto.name
        docString = proto.docString
        preserved = proto
        type = ValueType(proto: proto.type, present: proto.hasType)
    }

    /// The element type and shape when this is a tensor.
    public var tensorType: (elementType: DataType, shape: [Dimension]?)? {
        if case .tensor(let elementType, let shape) = type { return (elementType, shape) }
        return nil
    }
}

/// One dimension of a declared shape.
public enum Dimension: Sendable, Equatable, CustomStringConvertible {
    case value(Int)
    case symbol(String)
    case unknown

    public var description: String {
        switch self {
        case .value(let v): "\(v)"
        case .symbol(let s): s
        case .unknown: "?"
        }
    }

    public var fixedValue: Int? {
        if case .value(let v) = self { return v }
        return nil
    }
}

/// The type of a value: a tensor (the only kind Whittle computes with) or anything else, kept as read.
public enum ValueType: Sendable {
    case tensor(elementType: DataType, shape: [Dimension]?)
    case other(Onnx_TypeProto)
    case none

    init(proto: Onnx_TypeProto, present: Bool) {
        guard present else {
            self = .none
            return
        }
        guard case .tensorType(let t)? = proto.value else {
            self = .other(proto)
            return
        }
        let elementType = DataType(rawValue: t.elemType) ?? .undefined
        guard t.hasShape else {
            self = .tensor(elementType: elementType, shape: nil)
            return
        }
        let dims: [Dimension] = t.shape.dim.map { dim in
            switch dim.value {
            case .dimValue(let v)?: .value(Int(v))
            case .dimParam(let p)?: .symbol(p)
            case nil: .unknown
            }
        }
        self = .tensor(elementType: elementType, shape: dims)
    }
}

/// A node: an operator applied to named inputs, producing named outputs. An empty input name is an omitted
/// optional input, as in ONNX.
public struct Node: Sendable {
    public var name: String
    public var opType: String
    public var domain: String
    public var inputs: [String]
    public var outputs: [String]
    public var attributes: [Attribute]
    public var docString: String
    var preserved: Onnx_NodeProto

    public init(opType: String, name: String, inputs: [String], outputs: [String], attributes: [Attribute] = [],
                domain: String = "") {
        self.name = name
        self.opType = opType
        self.domain = domain
        self.inputs = inputs
        self.outputs = outputs
        self.attributes = attributes
        self.docString = ""
        self.preserved = Onnx_NodeProto()
    }

    /// The attribute called `name`, if present.
    public func attribute(_ name: String) -> Attribute? { attributes.first { $0.name == name } }

    /// A label for messages: `Conv node 'conv1'`.
    public var label: String { "\(opType) node '\(name.isEmpty ? outputs.first ?? "?" : name)'" }
}

/// A node attribute.
public struct Attribute: Sendable {
    public var name: String
    public var value: AttributeValue
    public var docString: String
    var preserved: Onnx_AttributeProto

    public init(_ name: String, _ value: AttributeValue) {
        self.name = name
        self.value = value
        self.docString = ""
        self.preserved = Onnx_AttributeProto()
    }
}

/// Every ONNX attribute kind. Sparse tensors and type protos are kept as read.
public enum AttributeValue: Sendable {
    case float(Float)
    case int(Int64)
    case string([UInt8])
    case tensor(Tensor)
    case graph(Graph)
    case sparseTensor(Onnx_SparseTensorProto)
    case typeProto(Onnx_TypeProto)
    case floats([Float])
    case ints([Int64])
    case strings([[UInt8]])
    case tensors([Tensor])
    case graphs([Graph])
    case sparseTensors([Onnx_SparseTensorProto])
    case typeProtos([Onnx_TypeProto])
    /// A reference to an attribute of the enclosing function (`ref_attr_name`).
    case reference(String)

    public var int: Int64? { if case .int(let v) = self { return v } else { return nil } }
    public var float: Float? { if case .float(let v) = self { return v } else { return nil } }
    public var ints: [Int64]? { if case .ints(let v) = self { return v } else { return nil } }
    public var floats: [Float]? { if case .floats(let v) = self { return v } else { return nil } }
    public var tensor: Tensor? { if case .tensor(let v) = self { return v } else { return nil } }
    public var string: String? {
        if case .string(let v) = self { return String(decoding: v, as: UTF8.self) } else { return nil }
    }

    /// The ONNX kind name, for messages.
    public var kindName: String {
        switch self {
        case .float: "FLOAT"
        case .int: "INT"
        case .string: "STRING"
        case .tensor: "TENSOR"
        case .graph: "GRAPH"
        case .sparseTensor: "SPARSE_TENSOR"
        case .typeProto: "TYPE_PROTO"
        case .floats: "FLOATS"
        case .ints: "INTS"
        case .strings: "STRINGS"
        case .tensors: "TENSORS"
        case .graphs: "GRAPHS"
        case .sparseTensors: "SPARSE_TENSORS"
        case .typeProtos: "TYPE_PROTOS"
        case .reference: "REFERENCE"
        }
    }
}

/// A constant tensor stored in the graph (weights, biases, shape constants).
///
/// `tensor` is the decoded value, nil for element types Whittle does not compute with (strings, complex, float8);
/// such initializers are still written back exactly as read.
public struct Initializer: Sendable {
    public let name: String
    /// The decoded value (nil for element types Whittle does not decode). Quantized codes (int8, uint8, int4, uint4)
    /// are kept only as their stored bytes and decoded on each access (`Tensor` holds integers as Int64, eight times
    /// an int8 weight), so a quantized model stays resident at a byte, or half of one, per weight.
    public var tensor: Tensor? {
        if let decoded { return decoded }
        return Self.keptAsBytes(elementType) ? try? TensorCoding.decodeIfSupported(proto) : nil
    }
    private var decoded: Tensor?
    /// The declared element type (also for tensors Whittle does not decode).
    public private(set) var elementType: DataType
    /// The declared shape.
    public private(set) var shape: [Int]
    var proto: Onnx_TensorProto

    /// Element types kept as stored bytes and decoded on access (see `tensor`).
    static func keptAsBytes(_ type: DataType) -> Bool { [.int8, .uint8, .int4, .uint4].contains(type) }

    /// Whether `tensor` is kept only as its encoded bytes: a quantized type whose values all fit it (an in-memory
    /// tensor may hold a value its type cannot, which encoding would truncate; it is kept decoded, so the value
    /// stays what it was and the operators refuse it).
    static func keptAsBytes(_ tensor: Tensor) -> Bool {
        guard keptAsBytes(tensor.dtype), let range = tensor.dtype.integerRange else { return false }
        return tensor.ints.allSatisfy { range.contains($0) }
    }

    /// A new initializer holding `tensor`.
    public init(name: String, tensor: Tensor) {
        self.name = name
        self.elementType = tensor.dtype
        self.shape = tensor.shape
        self.proto = TensorCoding.encode(tensor, name: name)
        self.decoded = Self.keptAsBytes(tensor) ? nil : tensor
    }

    init(proto: Onnx_TensorProto, externalData: ExternalDataLoader?) throws {
        var proto = proto
        if proto.dataLocation == .external {
            proto = try TensorCoding.inlineExternalData(proto, loader: externalData)
        }
        self.name = proto.name
        self.proto = proto
        self.elementType = DataType(rawValue: proto.dataType) ?? .undefined
        self.shape = try TensorCoding.shape(of: proto)
        // Decoded once here either way, so malformed data is refused when the model is read.
        let value = try TensorCoding.decodeIfSupported(proto)
        self.decoded = Self.keptAsBytes(elementType) ? nil : value
    }

    /// The same initializer under another name.
    public func renamed(_ newName: String) -> Initializer {
        var proto = self.proto
        proto.name = newName
        return Initializer(name: newName, tensor: tensor, elementType: elementType, shape: shape, proto: proto)
    }

    init(name: String, tensor: Tensor?, elementType: DataType, shape: [Int], proto: Onnx_TensorProto) {
        self.name = name
        self.decoded = tensor.map { Self.keptAsBytes($0) } ?? false ? nil : tensor
        self.elementType = elementType
        self.shape = shape
        self.proto = proto
    }

    /// Replaces the value (for example after pruning); the proto written back is re-encoded from it.
    public mutating func setTensor(_ newValue: Tensor) {
        let docString = proto.docString
        decoded = Self.keptAsBytes(newValue) ? nil : newValue
        elementType = newValue.dtype
        shape = newValue.shape
        proto = TensorCoding.encode(newValue, name: name)
        if !docString.isEmpty { proto.docString = docString }
    }
}

/// Loads the bytes of an external-data file named by a tensor's `location` entry (relative to the model's folder).
/// Implemented by callers that do I/O; the pure core only calls it.
public typealias ExternalDataLoader = @Sendable (_ location: String) throws -> [UInt8]
