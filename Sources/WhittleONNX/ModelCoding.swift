import Foundation
import SwiftProtobuf
import WhittleTensor

/// Reading and writing ONNX models as bytes. Files are the caller's business (see `ExternalDataLoader`).
public enum ModelCoding {
    /// Opsets of the default domain Whittle accepts.
    public static let supportedOpsets: ClosedRange<Int64> = 11...21

    /// Parses a serialized `ModelProto`.
    public static func read(_ bytes: [UInt8], externalData: ExternalDataLoader? = nil) throws -> Model {
        guard !bytes.isEmpty else { throw ONNXError(.malformedModel, "the model file is empty") }
        let proto: Onnx_ModelProto
        do {
            var options = BinaryDecodingOptions()
            options.messageDepthLimit = 64
            proto = try Onnx_ModelProto(serializedBytes: bytes, extensions: nil, partial: true, options: options)
        } catch {
            throw ONNXError(.malformedModel, "not a valid ONNX model (protobuf decoding failed: \(error))")
        }
        guard proto.hasGraph else {
            throw ONNXError(.malformedModel, "not a valid ONNX model: it has no graph")
        }
        guard proto.hasIrVersion, proto.irVersion >= 3 else {
            throw ONNXError(.malformedModel, "not a valid ONNX model: IR version \(proto.irVersion) is missing or too old")
        }
        let graph = try readGraph(proto.graph, externalData: externalData)
        try checkStructure(graph)
        let model = Model(proto: proto, graph: graph)
        return model
    }

    /// The main graph's structure: at least one output, and each value produced once (a graph input may also be an
    /// initializer, as IR versions before 4 require; a node output may be neither, nor another node's output).
    static func checkStructure(_ graph: Graph) throws {
        guard !graph.outputs.isEmpty else { throw ONNXError(.invalidGraph, "the graph declares no outputs") }
        var produced = Set(graph.inputs.map(\.name)).union(graph.initializers.map(\.name))
        for node in graph.nodes {
            for output in node.outputs where !output.isEmpty {
                guard produced.insert(output).inserted else {
                    throw ONNXError(.invalidGraph, "\(node.label) produces '\(output)', which another node, input or initializer already provides")
                }
            }
        }
        var seen = Set<String>()
        for output in graph.outputs where !seen.insert(output.name).inserted {
            throw ONNXError(.invalidGraph, "the graph lists output '\(output.name)' twice")
        }
    }

    /// Checks that the model imports a default-domain opset Whittle supports.
    public static func checkOpset(_ model: Model) throws {
        guard let opset = model.defaultOpset else {
            throw ONNXError(.malformedModel, "the model imports no opset of the default ONNX domain")
        }
        guard supportedOpsets.contains(opset) else {
            throw ONNXError(.unsupportedOperator,
                "opset \(opset) is not supported (Whittle runs opsets \(supportedOpsets.lowerBound) through \(supportedOpsets.upperBound))")
        }
    }

    /// Serializes `model` to `ModelProto` bytes, with all tensor data inline.
    public static func write(_ model: Model) throws -> [UInt8] {
        let proto = modelProto(model)
        do {
            return try proto.serializedBytes()
        } catch {
            throw ONNXError(.malformedModel, "could not serialize the model: \(error)")
        }
    }

    // MARK: Proto → IR

    static func readGraph(_ proto: Onnx_GraphProto, externalData: ExternalDataLoader?) throws -> Graph {
        var graph = Graph(name: proto.name, nodes: [], inputs: [], outputs: [])
        graph.docString = proto.docString
        graph.inputs = proto.input.map(ValueInfo.init(proto:))
        graph.outputs = proto.output.map(ValueInfo.init(proto:))
        graph.valueInfo = proto.valueInfo.map(ValueInfo.init(proto:))
        graph.initializers = try proto.initializer.map { try Initializer(proto: $0, externalData: externalData) }
        graph.nodes = try proto.node.map { try readNode($0, externalData: externalData) }
        var preserved = proto
        preserved.node = []
        preserved.initializer = []
        preserved.input = []
        preserved.output = []
        preserved.valueInfo = []
        graph.preserved = preserved
        return graph
    }

    static func readNode(_ proto: Onnx_NodeProto, externalData: ExternalDataLoader?) throws -> Node {
        var node = Node(opType: proto.opType, name: proto.name, inputs: proto.input, outputs: proto.output,
                        domain: proto.domain)
        node.docString = proto.docString
        node.attributes = try proto.attribute.map { try readAttribute($0, node: proto, externalData: externalData) }
        var preserved = proto
        preserved.attribute = []
        node.preserved = preserved
        return node
    }

    static func readAttribute(_ proto: Onnx_AttributeProto, node: Onnx_NodeProto,
                              externalData: ExternalDataLoader?) throws -> Attribute {
        func tensor(_ t: Onnx_TensorProto) throws -> Tensor {
            var t = t
            if t.dataLocation == .external { t = try TensorCoding.inlineExternalData(t, loader: externalData) }
            guard let decoded = try TensorCoding.decodeIfSupported(t) else {
                throw ONNXError(.unsupportedDataType,
                    "attribute '\(proto.name)' of \(node.opType) node '\(node.name)' holds a tensor of element type \(t.dataType), which Whittle does not read")
            }
            return decoded
        }
        let value: AttributeValue
        if proto.hasRefAttrName && !proto.refAttrName.isEmpty {
            value = .reference(proto.refAttrName)
        } else {
            switch proto.type {
            case .float: value = .float(proto.f)
            case .int: value = .int(proto.i)
            case .string: value = .string([UInt8](proto.s))
            case .tensor: value = .tensor(try tensor(proto.t))
            case .graph: value = .graph(try readGraph(proto.g, externalData: externalData))
            case .sparseTensor: value = .sparseTensor(proto.sparseTensor)
            case .typeProto: value = .typeProto(proto.tp)
            case .floats: value = .floats(proto.floats)
            case .ints: value = .ints(proto.ints)
            case .strings: value = .strings(proto.strings.map { [UInt8]($0) })
            case .tensors: value = .tensors(try proto.tensors.map(tensor))
            case .graphs: value = .graphs(try proto.graphs.map { try readGraph($0, externalData: externalData) })
            case .sparseTensors: value = .sparseTensors(proto.sparseTensors)
            case .typeProtos: value = .typeProtos(proto.typeProtos)
            case .undefined:
                throw ONNXError(.invalidAttribute,
                    "attribute '\(proto.name)' of \(node.opType) node '\(node.name)' has no type")
            }
        }
        var attribute = Attribute(proto.name, value)
        attribute.docString = proto.docString
        attribute.preserved = proto
        return attribute
    }

    // MARK: IR → proto
    // Each writer starts from the proto the value was read from and assigns a field only when it changed, so that
    // presence of optional fields survives a round trip.

    static func modelProto(_ model: Model) -> Onnx_ModelProto {
        var p = model.preserved
        if p.irVersion != model.irVersion || !p.hasIrVersion { p.irVersion = model.irVersion }
        let imports = model.opsetImports.map { i -> Onnx_OperatorSetIdProto in
            var o = Onnx_OperatorSetIdProto()
            o.domain = i.domain
            o.version = i.version
            return o
        }
        if p.opsetImport.map({ OpsetImport(domain: $0.domain, version: $0.version) }) != model.opsetImports {
            p.opsetImport = imports
        }
        if p.producerName != model.producerName { p.producerName = model.producerName }
        if p.producerVersion != model.producerVersion { p.producerVersion = model.producerVersion }
        if p.domain != model.domain { p.domain = model.domain }
        if p.modelVersion != model.modelVersion { p.modelVersion = model.modelVersion }
        if p.docString != model.docString { p.docString = model.docString }
        let metadata = p.metadataProps.map { (key: $0.key, value: $0.value) }
        if !metadata.elementsEqual(model.metadata, by: { $0.key == $1.key && $0.value == $1.value }) {
            p.metadataProps = model.metadata.map { entry in
                var e = Onnx_StringStringEntryProto()
                e.key = entry.key
                e.value = entry.value
                return e
            }
        }
        p.graph = graphProto(model.graph)
        return p
    }

    static func graphProto(_ graph: Graph) -> Onnx_GraphProto {
        var p = graph.preserved
        if p.name != graph.name { p.name = graph.name }
        if p.docString != graph.docString { p.docString = graph.docString }
        p.input = graph.inputs.map(valueInfoProto)
        p.output = graph.outputs.map(valueInfoProto)
        p.valueInfo = graph.valueInfo.map(valueInfoProto)
        p.initializer = graph.initializers.map(\.proto)
        p.node = graph.nodes.map(nodeProto)
        return p
    }

    static func valueInfoProto(_ info: ValueInfo) -> Onnx_ValueInfoProto {
        var p = info.preserved
        if p.name != info.name || !p.hasName { p.name = info.name }
        if p.docString != info.docString { p.docString = info.docString }
        let current = ValueType(proto: p.type, present: p.hasType)
        if !sameType(current, info.type) {
            switch info.type {
            case .none: p.clearType()
            case .other(let t): p.type = t
            case .tensor(let elementType, let shape):
                var t = Onnx_TypeProto.Tensor()
                t.elemType = elementType.rawValue
                if let shape {
                    var s = Onnx_TensorShapeProto()
                    s.dim = shape.map { d in
                        var dim = Onnx_TensorShapeProto.Dimension()
                        switch d {
                        case .value(let v): dim.dimValue = Int64(v)
                        case .symbol(let name): dim.dimParam = name
                        case .unknown: break
                        }
                        return dim
                    }
                    t.shape = s
                }
                var type = Onnx_TypeProto()
                type.tensorType = t
                p.type = type
            }
        }
        return p
    }

    private static func sameType(_ a: ValueType, _ b: ValueType) -> Bool {
        switch (a, b) {
        case (.none, .none): return true
        case (.other(let x), .other(let y)): return x == y
        case (.tensor(let e1, let s1), .tensor(let e2, let s2)): return e1 == e2 && s1 == s2
        default: return false
        }
    }

    static func nodeProto(_ node: Node) -> Onnx_NodeProto {
        var p = node.preserved
        if p.name != node.name { p.name = node.name }
        if p.opType != node.opType || !p.hasOpType { p.opType = node.opType }
        if p.domain != node.domain { p.domain = node.domain }
        if p.docString != node.docString { p.docString = node.docString }
        p.input = node.inputs
        p.output = node.outputs
        p.attribute = node.attributes.map(attributeProto)
        return p
    }

    static func attributeProto(_ attribute: Attribute) -> Onnx_AttributeProto {
        var p = attribute.preserved
        if p.name != attribute.name || !p.hasName { p.name = attribute.name }
        if p.docString != attribute.docString { p.docString = attribute.docString }
        // Values are re-encoded only when they differ from what was read; graphs are always rebuilt (they may
        // hold edited nodes).
        switch attribute.value {
        case .float(let v): if p.type != .float || p.f != v || !p.hasF { p.type = .float; p.f = v }
        case .int(let v): if p.type != .int || p.i != v || !p.hasI { p.type = .int; p.i = v }
        case .string(let v): if p.type != .string || [UInt8](p.s) != v { p.type = .string; p.s = Data(v) }
        case .tensor(let t):
            if p.type != .tensor || (try? TensorCoding.decode(p.t)) != t {
                p.type = .tensor
                p.t = TensorCoding.encode(t, name: p.t.name)
            }
        case .graph(let g): p.type = .graph; p.g = graphProto(g)
        case .sparseTensor(let v): p.type = .sparseTensor; p.sparseTensor = v
        case .typeProto(let v): p.type = .typeProto; p.tp = v
        case .floats(let v): if p.type != .floats || p.floats != v { p.type = .floats; p.floats = v }
        case .ints(let v): if p.type != .ints || p.ints != v { p.type = .ints; p.ints = v }
        case .strings(let v):
            if p.type != .strings || p.strings.map({ [UInt8]($0) }) != v { p.type = .strings; p.strings = v.map { Data($0) } }
        case .tensors(let v):
            if p.type != .tensors || p.tensors.compactMap({ try? TensorCoding.decode($0) }) != v {
                p.type = .tensors
                p.tensors = v.map { TensorCoding.encode($0, name: "") }
            }
        case .graphs(let v): p.type = .graphs; p.graphs = v.map(graphProto)
        case .sparseTensors(let v): p.type = .sparseTensors; p.sparseTensors = v
        case .typeProtos(let v): p.type = .typeProtos; p.typeProtos = v
        case .reference(let name): p.refAttrName = name
        }
        return p
    }
}
