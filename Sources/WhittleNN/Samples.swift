import WhittleONNX
import WhittleTensor

/// Samples of a model's runtime inputs: one tensor per input, by name, each with the samples on its first axis
/// (an image model's `input [N, C, H, W]`; a transformer's `input_ids [N, S]` and `attention_mask [N, S]`).
///
/// A single tensor read from a `.npy` file has no name (`""`): it feeds a model's only runtime input, whatever that
/// input is called. Named tensors (from a `.npz` file) feed the inputs of the same names.
public struct Samples: Sendable {
    /// Input names in the order given.
    public let names: [String]
    public let tensors: [String: Tensor]

    /// The unnamed samples of a single-input model.
    public init(_ tensor: Tensor) {
        names = [""]
        tensors = ["": tensor]
    }

    /// Named tensors with the same number of samples (at least one), each of rank ≥ 1.
    public init(_ named: [(name: String, tensor: Tensor)]) throws {
        guard let first = named.first else { throw ONNXError(.invalidInput, "no input tensors were given") }
        var tensors: [String: Tensor] = [:]
        for (name, tensor) in named {
            guard tensors[name] == nil else { throw ONNXError(.invalidInput, "input '\(name)' is given twice") }
            guard tensor.rank >= 1, tensor.shape[0] == first.tensor.shape.first else {
                throw ONNXError(.invalidInput,
                    "input '\(name)' has shape \(tensor.shape) but '\(first.name)' has \(first.tensor.shape): every input needs the same number of samples on its first axis")
            }
            tensors[name] = tensor
        }
        names = named.map(\.name)
        self.tensors = tensors
    }

    /// The number of samples.
    public var count: Int { tensors[names[0]]!.shape.first ?? 0 }

    /// The first tensor (the only one for a single-input model).
    public var first: Tensor { tensors[names[0]]! }

    public subscript(name: String) -> Tensor? { tensors[name] }

    /// The tensors in the order given.
    public var named: [(name: String, tensor: Tensor)] { names.map { ($0, tensors[$0]!) } }

    /// Samples at `indices` (a range or any list), in that order, of every input.
    public func rows(_ indices: some Collection<Int>) -> Samples {
        map { t in
            let size = t.count / max(t.shape[0], 1)
            var out = t
            out.shape = [indices.count] + Array(t.shape.dropFirst())
            if t.dtype.isInteger {
                out.ints = indices.flatMap { t.ints[($0 * size)..<(($0 + 1) * size)] }
            } else {
                var values: [Float] = []
                values.reserveCapacity(indices.count * size)
                for i in indices { values += t.floats[(i * size)..<((i + 1) * size)] }
                out.floats = values
            }
            return out
        }
    }

    /// Every tensor transformed, names kept.
    public func map(_ transform: (Tensor) throws -> Tensor) rethrows -> Samples {
        var tensors: [String: Tensor] = [:]
        for name in names { tensors[name] = try transform(self.tensors[name]!) }
        return Samples(names: names, tensors: tensors)
    }

    init(names: [String], tensors: [String: Tensor]) {
        self.names = names
        self.tensors = tensors
    }

    /// Integer arrays given for float inputs (8-bit images, say) converted to float; everything else as it is.
    public func conformed(to graph: Graph) -> Samples {
        let declared = Dictionary(graph.runtimeInputs.compactMap { i in i.tensorType.map { (i.name, $0.0) } }, uniquingKeysWith: { a, _ in a })
        let single = names == [""] && graph.runtimeInputs.count == 1 ? graph.runtimeInputs[0].name : nil
        var tensors = self.tensors
        for name in names {
            guard let type = declared[single ?? name], type.isFloatingPoint, let t = tensors[name], t.dtype.isInteger else { continue }
            tensors[name] = Tensor(shape: t.shape, floats: t.asFloats)
        }
        return Samples(names: names, tensors: tensors)
    }

    /// Element types and shapes of the graph's inputs that these samples feed, for one sample (integer inputs take
    /// the declared integer type).
    public func sampleShapes(for graph: Graph) throws -> [String: (DataType, [Int])] {
        Self.shapes(try rows(0..<1).feed(graph), for: graph)
    }

    /// Element types and shapes of tensors fed to the graph's inputs (`feed`): integer data takes the input's
    /// declared integer type.
    public static func shapes(_ fed: [String: Tensor], for graph: Graph) -> [String: (DataType, [Int])] {
        var shapes: [String: (DataType, [Int])] = [:]
        for info in graph.runtimeInputs {
            guard let t = fed[info.name] else { continue }
            let declared = info.tensorType?.0
            shapes[info.name] = (t.dtype.isInteger && declared?.isInteger == true ? declared! : t.dtype, t.shape)
        }
        return shapes
    }

    /// The tensors keyed by the graph's runtime input names: an unnamed single tensor feeds a single-input graph;
    /// otherwise each input is matched by name, and a missing or unknown input is an error that lists the graph's
    /// inputs.
    public func feed(_ graph: Graph) throws -> [String: Tensor] {
        let expected = graph.runtimeInputs.map(\.name)
        if names == [""] {
            guard expected.count == 1 else {
                throw ONNXError(.invalidInput,
                    "the model has \(expected.count) inputs (\(expected.joined(separator: ", "))) but the data is one unnamed array: give a .npz file with an array named after each input")
            }
            return [expected[0]: tensors[""]!]
        }
        if expected.count == 1, names.count == 1, tensors[expected[0]] == nil {
            throw ONNXError(.invalidInput, "the model's input is '\(expected[0])'; the data names '\(names[0])'")
        }
        for name in names where !expected.contains(name) {
            throw ONNXError(.invalidInput, "the model has no input '\(name)'; its inputs are \(expected.joined(separator: ", "))")
        }
        var fed: [String: Tensor] = [:]
        for name in expected {
            guard let tensor = tensors[name] else {
                throw ONNXError(.invalidInput,
                    "the model's input '\(name)' is missing from the data (it needs \(expected.joined(separator: ", ")); the data has \(names.joined(separator: ", ")))")
            }
            fed[name] = tensor
        }
        return fed
    }
}
