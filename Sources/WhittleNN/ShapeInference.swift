import WhittleONNX
import WhittleTensor

/// Static shape inference for a graph with concrete input shapes (typically: the declared shapes with the batch
/// dimension set). Values computable before running — initializers, Constant nodes, Shape → Gather → Unsqueeze →
/// Concat chains — are folded, so Reshape targets computed from shapes resolve statically.
public struct InferredGraph: Sendable {
    /// Every value's type and shape (and constant value where known), by name.
    public var values: [String: ValueMeta]
    /// One context per node, in execution order, with its inputs' metas.
    public var contexts: [NodeContext]
    /// Per node: the inferred output metas.
    public var outputs: [[ValueMeta]]
    /// Per node: its definition.
    public var definitions: [OperatorDefinition]
    /// Per node: true when all of its outputs were folded into constants (the node need not run).
    public var folded: [Bool]
    /// Per node: multiply-accumulates of one run.
    public var macs: [Int]
}

extension InferredGraph {
    /// The same graph with constant values only for `names` (every other value keeps its type and shape).
    func keepingConstants(_ names: Set<String>) -> InferredGraph {
        func kept(_ name: String, _ meta: ValueMeta?) -> ValueMeta? {
            guard var meta, meta.constant != nil, !names.contains(name) else { return meta }
            meta.constant = nil
            return meta
        }
        var out = self
        out.values = Dictionary(uniqueKeysWithValues: values.map { ($0.key, kept($0.key, $0.value)!) })
        out.contexts = contexts.map { ctx in
            NodeContext(node: ctx.node, inputs: ctx.inputs.enumerated().map { k, meta in
                k < ctx.node.inputs.count ? kept(ctx.node.inputs[k], meta) : meta
            }, opset: ctx.opset)
        }
        out.outputs = zip(contexts, outputs).map { ctx, metas in
            metas.enumerated().map { k, meta in k < ctx.node.outputs.count ? kept(ctx.node.outputs[k], meta)! : meta }
        }
        return out
    }
}

public enum ShapeInference {
    /// Largest output (in elements) folded into a constant; bigger values are computed at run time. A
    /// DequantizeLinear of constants (a QDQ model's weights) is always folded, so quantized weights are expanded once.
    public static let foldingLimit = 1 << 16
    /// Ops never folded even with constant inputs (they are the model's real work).
    static let heavyOps: Set<String> = ["Conv", "Gemm", "MatMul", "BatchNormalization", "MaxPool", "AveragePool",
                                        "GlobalAveragePool", "Resize"]

    /// Input shapes of `model` with every leading symbolic or unknown dimension set to `batchSize`.
    /// Shapes for analyses that hold at any size (which values are float, how channels flow, which nodes an export
    /// touches): batch 1, and every other free dimension (a sequence length) at 8.
    public static func analysisShapes(_ model: Model) throws -> [String: (DataType, [Int])] {
        var shapes: [String: (DataType, [Int])] = [:]
        for input in model.graph.runtimeInputs {
            guard let (dtype, declared) = input.tensorType, let declared else {
                return try inputShapes(model, batchSize: 1)
            }
            shapes[input.name] = (dtype, declared.enumerated().map { axis, dim in
                if case .value(let v) = dim, v > 0 { return axis == 0 ? 1 : v }
                return axis == 0 ? 1 : 8
            })
        }
        return shapes
    }

    /// Shapes of one sample for counting MACs: each input's size from `sizes` (all its dimensions, batch first) or,
    /// without, its declared shape at batch size 1. A free dimension besides the batch must be given (a sequence
    /// length); the error names the input and `flag`, the option that gives sizes.
    public static func sampleShapes(_ model: Model, sizes: [String: [Int]], flag: String = "--shape") throws -> [String: (DataType, [Int])] {
        var sizes = sizes
        var out: [String: (DataType, [Int])] = [:]
        for input in model.graph.runtimeInputs {
            if let dims = sizes.removeValue(forKey: input.name) {
                guard let (dtype, declared) = input.tensorType, let declared else {
                    throw ONNXError(.invalidInput, "graph input '\(input.name)' declares no shape; Whittle needs ranked inputs")
                }
                guard dims.count == declared.count, dims.allSatisfy({ $0 >= 1 }) else {
                    throw ONNXError(.invalidInput, "\(flag) \(input.name) has \(dims.count) sizes; the input has rank \(declared.count)")
                }
                guard TensorLimits.elementCount(dims) != nil else {
                    throw ONNXError(.tooLarge, TensorLimits.limitMessage(dims, "graph input '\(input.name)'"))
                }
                out[input.name] = (dtype, dims)
            } else {
                out[input.name] = try declaredShape(input, batchSize: 1, flag: flag)
            }
        }
        if let unknown = sizes.keys.sorted().first { throw ONNXError(.invalidInput, "\(flag) names '\(unknown)', which is not an input of the model") }
        return out
    }

    public static func inputShapes(_ model: Model, batchSize: Int) throws -> [String: (DataType, [Int])] {
        var shapes: [String: (DataType, [Int])] = [:]
        for input in model.graph.runtimeInputs { shapes[input.name] = try declaredShape(input, batchSize: batchSize, flag: nil) }
        return shapes
    }

    /// An input's declared shape with the batch axis at `batchSize`. Any other free dimension is refused; with
    /// `flag`, the error says how to give its size.
    static func declaredShape(_ input: ValueInfo, batchSize: Int, flag: String?) throws -> (DataType, [Int]) {
        guard let (elementType, declared) = input.tensorType else {
            throw ONNXError(.unsupportedDataType, "graph input '\(input.name)' is not a tensor")
        }
        guard let declared else {
            throw ONNXError(.invalidInput, "graph input '\(input.name)' declares no shape; Whittle needs ranked inputs")
        }
        var shape: [Int] = []
        for (axis, dim) in declared.enumerated() {
            switch dim {
            case .value(let v) where v > 0: shape.append(axis == 0 ? batchSize : v)
            default:
                guard axis == 0 else {
                    throw ONNXError(.invalidInput, "graph input '\(input.name)' has a free dimension '\(dim)' at axis \(axis); "
                        + (flag.map { "give its size with \($0) \(input.name)=…" } ?? "only the batch axis may be free"))
                }
                shape.append(batchSize)
            }
        }
        guard TensorLimits.elementCount(shape) != nil else {
            throw ONNXError(.tooLarge, TensorLimits.limitMessage(shape, "graph input '\(input.name)'"))
        }
        return (elementType, shape)
    }

    /// Infers every value of `graph` given the runtime inputs' element types and shapes. Initializers named in
    /// `variables` (trainable parameters) are treated as values that change between runs: never folded.
    public static func infer(_ graph: Graph, opset: Int64, inputs: [String: (DataType, [Int])],
                             variables: Set<String> = []) throws -> InferredGraph {
        var values: [String: ValueMeta] = [:]
        for initializer in graph.initializers {
            guard let tensor = initializer.tensor else { continue }
            values[initializer.name] = variables.contains(initializer.name)
                ? ValueMeta(dtype: tensor.dtype, shape: tensor.shape) : ValueMeta(tensor)
        }
        for input in graph.runtimeInputs {
            guard let (dtype, shape) = inputs[input.name] else {
                throw ONNXError(.invalidInput, "no shape given for graph input '\(input.name)'")
            }
            guard TensorLimits.elementCount(shape) != nil else {
                throw ONNXError(.tooLarge, TensorLimits.limitMessage(shape, "graph input '\(input.name)'"))
            }
            values[input.name] = ValueMeta(dtype: dtype, shape: shape)
        }
        var result = InferredGraph(values: [:], contexts: [], outputs: [], definitions: [], folded: [], macs: [])
        for node in try topologicalOrder(graph) {
            let definition = try Operators.definition(for: node, opset: opset)
            let metas: [ValueMeta?] = try node.inputs.map { name in
                if name.isEmpty { return nil }
                guard let meta = values[name] else {
                    throw ONNXError(.invalidGraph, "\(node.label) reads '\(name)', which no node, input or initializer provides")
                }
                return meta
            }
            let ctx = NodeContext(node: node, inputs: metas, opset: opset)
            var outs = try definition.infer(ctx)
            guard outs.count >= node.outputs.filter({ !$0.isEmpty }).count else {
                throw ctx.error(.invalidGraph, "has \(node.outputs.count) outputs, Whittle produces \(outs.count)")
            }
            // Every shape below this point (kernels, memory plans, MACs) is bounded: products cannot overflow.
            for (i, out) in outs.enumerated() { try ctx.checkedShape(out.shape, "output \(i)") }
            var folded = outs.allSatisfy { $0.constant != nil }
            let present = metas.compactMap { $0 }
            if !folded, !heavyOps.contains(node.opType), present.allSatisfy({ $0.constant != nil }),
                outs.allSatisfy({ $0.count <= foldingLimit }) || node.opType == "DequantizeLinear" {
                let kernel = try definition.compile(ctx, outs, KernelOptions(fast: false))
                let produced = try kernel.run(metas.map { $0?.constant })
                for (i, tensor) in produced.enumerated() where i < outs.count { outs[i] = ValueMeta(tensor) }
                folded = true
            }
            for (name, meta) in zip(node.outputs, outs) where !name.isEmpty {
                values[name] = meta
            }
            result.contexts.append(ctx)
            result.outputs.append(outs)
            result.definitions.append(definition)
            result.folded.append(folded)
            result.macs.append(folded ? 0 : definition.macs(ctx, outs))
        }
        for output in graph.outputs where values[output.name] == nil {
            throw ONNXError(.invalidGraph, "graph output '\(output.name)' is produced by no node")
        }
        result.values = values
        return result
    }

    /// Nodes in an order where every value is produced before it is read. ONNX requires file order to be one;
    /// graphs that are not are reordered, and cycles are refused.
    public static func topologicalOrder(_ graph: Graph) throws -> [Node] {
        var available = Set(graph.initializers.map(\.name)).union(graph.inputs.map(\.name))
        available.insert("")
        if graph.nodes.allSatisfy({ node in
            defer { available.formUnion(node.outputs) }
            return node.inputs.allSatisfy(available.contains)
        }) {
            return graph.nodes
        }
        available = Set(graph.initializers.map(\.name)).union(graph.inputs.map(\.name))
        available.insert("")
        var remaining = graph.nodes
        var ordered: [Node] = []
        while !remaining.isEmpty {
            guard let next = remaining.firstIndex(where: { $0.inputs.allSatisfy(available.contains) }) else {
                let stuck = remaining[0]
                let missing = stuck.inputs.first { !available.contains($0) } ?? "?"
                throw ONNXError(.invalidGraph,
                    "\(stuck.label) reads '\(missing)', which is never produced (or the graph has a cycle)")
            }
            let node = remaining.remove(at: next)
            available.formUnion(node.outputs)
            ordered.append(node)
        }
        return ordered
    }
}
