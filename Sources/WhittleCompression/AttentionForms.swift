import WhittleNN
import WhittleONNX
import WhittleTensor

extension GraphEditing {
    /// The model as pruning analyses it: every layer owns its parameters (`materializeConstants`), and attention
    /// written with merged axes is spelled head by head (`separateAttention`). Returns whether anything changed.
    /// The result computes what the model computes.
    public static func prepareForPruning(_ model: Model) throws -> (Model, Bool) {
        let (owned, materialized) = materializeConstants(model)
        let (separated, respelled) = try separateAttention(owned)
        return (separated, materialized || respelled)
    }

    /// Respells, without changing what the model computes, the forms in which PyTorch's exporters write
    /// `nn.MultiheadAttention` (torchvision's VisionTransformer), so that the channel analysis follows whole heads
    /// the way it does in BERT-style encoders:
    /// 1. the fused in-projection — one MatMul to `[.., 3D]`, Reshape to `[.., 3, D]`, Unsqueeze, Transpose,
    ///    Squeeze and a Gather of each third — becomes one MatMul (+ Add) per third;
    /// 2. heads split with the batch merged into them — `[L, N, D]` → `[L, N·H, d]` → Transpose (1, 0, 2) →
    ///    `[N, H, L, d]` — becomes `[L, N, H, d]` → Transpose (1, 2, 0, 3);
    /// 3. the last two axes swapped through a merged leading axis — `[N, H, L, d]` → `[N·H, L, d]` → Transpose
    ///    (0, 2, 1) → `[N, H, d, L]` — becomes Transpose (0, 1, 3, 2);
    /// 4. a Gemm over merged leading axes — `[L, N, H, d]` → `[L·N, D]` → Gemm → `[L, N, D']` — becomes
    ///    `[L, N, D]` → MatMul (+ Add).
    /// Shapes are matched at the analysis sizes (batch 1). Each form is matched end to end, from the tensor before
    /// the merge to the tensor after the split, so the rewrite holds at every batch size: with a batch of 1 the
    /// orders that would differ (heads before batch, batch before sequence) give different shapes and do not match.
    /// A rewrite whose old nodes would stay alive (something else reads them) is not made.
    public static func separateAttention(_ model: Model) throws -> (Model, Bool) {
        guard let opset = model.defaultOpset else { return (model, false) }
        var current = model
        var changed = false
        for form in AttentionForm.allCases {
            let inferred: InferredGraph
            do {
                inferred = try ShapeInference.infer(current.graph, opset: opset, inputs: try ShapeInference.analysisShapes(current))
            } catch {
                return (current, changed)  // the analysis reports what it cannot infer
            }
            var editor = AttentionEditor(graph: current.graph, shapes: inferred)
            editor.rewrite(form)
            guard let graph = editor.finished() else { continue }
            current.graph = graph
            changed = true
        }
        return (current, changed)
    }
}

enum AttentionForm: CaseIterable {
    case fusedInProjection, batchMergedHeads, mergedTranspose, mergedGemm
}

/// One pass of one form over a graph: the matches are collected, each match's last node is replaced by the new
/// nodes (their inputs are all computed before it), and the old nodes are left to dead-node removal.
private struct AttentionEditor {
    var graph: Graph
    let values: [String: ValueMeta]
    let index: GraphIndex
    var replacements: [Int: [Node]] = [:]
    /// Values the old nodes wrote, which no node may write once the rewrite is made (else it is abandoned).
    var replaced: Set<String> = []
    var usedNodes: Set<String>
    var usedValues: Set<String>

    init(graph: Graph, shapes: InferredGraph) {
        self.graph = graph
        self.values = shapes.values
        self.index = GraphIndex(graph)
        usedNodes = Set(graph.nodes.map(\.name))
        usedValues = Set(graph.nodes.flatMap { $0.inputs + $0.outputs }).union(graph.initializers.map(\.name))
            .union(graph.inputs.map(\.name))
    }

    func shape(_ name: String) -> [Int]? { values[name]?.shape }

    /// The node writing `value`, if `value` is read by `reader` and otherwise only by Shape and Size nodes (whose
    /// readers go with the shape computations the rewrite leaves dead).
    /// `alsoReadBy` names another op that may read it (the Gathers of the other thirds).
    func producer(of value: String, readBy reader: Int, _ op: String, alsoReadBy: String = "Shape") -> (Int, Node)? {
        guard !index.graphOutputs.contains(value), let p = index.producer[value], graph.nodes[p].opType == op,
              graph.nodes[p].domain.isEmpty || graph.nodes[p].domain == "ai.onnx" else { return nil }
        let others = (index.readers[value] ?? []).filter { $0 != reader }
        guard others.allSatisfy({ ["Shape", "Size", alsoReadBy].contains(graph.nodes[$0].opType) }) else { return nil }
        return (p, graph.nodes[p])
    }

    func ints(_ node: Node, input: Int, attribute: String) -> [Int]? {
        if input < node.inputs.count, !node.inputs[input].isEmpty {
            return index.constant(graph, node.inputs[input])?.asInts.map { Int($0) }
        }
        return node.attribute(attribute)?.value.ints?.map { Int($0) }
    }

    func perm(_ node: Node) -> [Int]? { node.attribute("perm")?.value.ints?.map { Int($0) } }

    mutating func nodeName(_ base: String) -> String { GraphEditing.uniqueName(base, &usedNodes) }
    mutating func valueName(_ base: String) -> String { GraphEditing.uniqueName(base, &usedValues) }

    mutating func constant(_ base: String, _ tensor: Tensor) -> String {
        let name = valueName(base)
        graph.initializers.append(Initializer(name: name, tensor: tensor))
        return name
    }

    /// `Reshape(input, target)` with a constant target (0 copies the input's size, so no `allowzero`).
    mutating func reshape(_ input: String, _ target: [Int64], like node: Node) -> Node {
        let shape = constant(node.name + "_shape", Tensor(shape: [target.count], ints: target, dtype: .int64))
        return Node(opType: "Reshape", name: nodeName(node.name), inputs: [input, shape], outputs: [valueName(node.outputs[0] + "_heads")])
    }

    /// `MatMul(input, weight)` then `Add(bias)` when there is one, writing `output`.
    mutating func linear(_ input: String, weight: Tensor, bias: Tensor?, output: String, name: String) -> [Node] {
        let w = constant(name + "_weight", weight)
        guard let bias else { return [Node(opType: "MatMul", name: nodeName(name), inputs: [input, w], outputs: [output])] }
        let product = valueName(output + "_product")
        let b = constant(name + "_bias", bias)
        return [Node(opType: "MatMul", name: nodeName(name + "_MatMul"), inputs: [input, w], outputs: [product]),
                Node(opType: "Add", name: nodeName(name + "_Add"), inputs: [product, b], outputs: [output])]
    }

    mutating func rewrite(_ form: AttentionForm) {
        for (i, node) in graph.nodes.enumerated() {
            switch form {
            case .fusedInProjection: fusedInProjection(i, node)
            case .batchMergedHeads: batchMergedHeads(i, node)
            case .mergedTranspose: mergedTranspose(i, node)
            case .mergedGemm: mergedGemm(i, node)
            }
        }
    }

    /// Form 1, matched from each `Gather(i)` of a third back to the projection.
    mutating func fusedInProjection(_ g: Int, _ gather: Node) {
        guard gather.opType == "Gather", (gather.attribute("axis")?.value.int ?? 0) == 0,
              let which = index.constant(graph, gather.inputs[1]), which.rank == 0, let third = which.asInts.first,
              (0...2).contains(third),
              let (s, squeeze) = producer(of: gather.inputs[0], readBy: g, "Squeeze", alsoReadBy: "Gather"),
              let (t, transpose) = producer(of: squeeze.inputs[0], readBy: s, "Transpose"),
              let (u, unsqueeze) = producer(of: transpose.inputs[0], readBy: t, "Unsqueeze"),
              let (r, split) = producer(of: unsqueeze.inputs[0], readBy: u, "Reshape"),
              let x = shape(split.inputs[0]), let out = shape(split.outputs[0]), x.count >= 2,
              out == Array(x.dropLast()) + [3, x[x.count - 1] / 3], x[x.count - 1] % 3 == 0 else { return }
        let k = x.count, width = x[k - 1] / 3
        // [.., 3, D] → [1, .., 3, D] → [3, .., 1, D] → [3, .., D]: the third moves to the front.
        guard ints(unsqueeze, input: 1, attribute: "axes") == [0],
              perm(transpose) == [k] + Array(1..<k) + [0, k + 1],
              ints(squeeze, input: 1, attribute: "axes").map({ $0.map { $0 < 0 ? $0 + k + 2 : $0 } }) == [k] else { return }
        // The projection: MatMul by a constant [D_in, 3D], then an optional Add of a constant [3D].
        var bias: Tensor?
        var projectionNode: Node
        var biasNode: Node?
        if let (a, add) = producer(of: split.inputs[0], readBy: r, "Add") {
            let constants = add.inputs.map { index.constant(graph, $0) }
            guard let c = constants.firstIndex(where: { $0 != nil }), let b = constants[c], b.dtype == .float,
                  b.shape == [3 * width], let (_, matmul) = producer(of: add.inputs[1 - c], readBy: a, "MatMul") else { return }
            bias = b
            projectionNode = matmul
            biasNode = add
        } else if let (_, matmul) = producer(of: split.inputs[0], readBy: r, "MatMul") {
            projectionNode = matmul
        } else {
            return
        }
        guard let w = index.constant(graph, projectionNode.inputs[1]), w.dtype == .float, w.rank == 2, w.shape[1] == 3 * width,
              (index.readers[projectionNode.inputs[1]] ?? []).count == 1 else { return }
        let rows = w.shape[0], first = Int(third) * width
        var columns = [Float]()
        columns.reserveCapacity(rows * width)
        for row in 0..<rows {
            let start = row * 3 * width + first
            columns += w.floats[start..<(start + width)]
        }
        let thirdBias = bias.map { Tensor(shape: [width], floats: Array($0.floats[first..<(first + width)])) }
        let label = ["q", "k", "v"][Int(third)]
        replacements[g] = linear(projectionNode.inputs[0], weight: Tensor(shape: [rows, width], floats: columns), bias: thirdBias,
                                 output: gather.outputs[0], name: projectionNode.name + "_" + label)
        replaced.formUnion([squeeze, transpose, unsqueeze, split, projectionNode].map { $0.outputs[0] })
        if let biasNode { replaced.insert(biasNode.outputs[0]) }
    }

    /// Form 2, matched from the split `[N, H, L, d]` back to the merge.
    mutating func batchMergedHeads(_ r2: Int, _ split: Node) {
        guard split.opType == "Reshape", let out = shape(split.outputs[0]), out.count == 4,
              let (t, transpose) = producer(of: split.inputs[0], readBy: r2, "Transpose"), perm(transpose) == [1, 0, 2],
              let (_, merge) = producer(of: transpose.inputs[0], readBy: t, "Reshape"),
              let x = shape(merge.inputs[0]), let merged = shape(merge.outputs[0]), x.count == 3, merged.count == 3 else { return }
        let (length, batch, width) = (x[0], x[1], x[2]), (heads, size) = (out[1], out[3])
        guard out[0] == batch, out[2] == length, heads * size == width, merged == [length, batch * heads, size] else { return }
        let heads4 = reshape(merge.inputs[0], [0, 0, Int64(heads), Int64(size)], like: merge)
        replacements[r2] = [heads4, Node(opType: "Transpose", name: nodeName(split.name), inputs: [heads4.outputs[0]],
                                         outputs: [split.outputs[0]], attributes: [Attribute("perm", .ints([1, 2, 0, 3]))])]
        replaced.formUnion([transpose, merge].map { $0.outputs[0] })
    }

    /// Form 3, matched from the split `[N, H, d, L]` back to the merge.
    mutating func mergedTranspose(_ r2: Int, _ split: Node) {
        guard split.opType == "Reshape", let out = shape(split.outputs[0]), out.count == 4,
              let (t, transpose) = producer(of: split.inputs[0], readBy: r2, "Transpose"), perm(transpose) == [0, 2, 1],
              let (_, merge) = producer(of: transpose.inputs[0], readBy: t, "Reshape"),
              let y = shape(merge.inputs[0]), let merged = shape(merge.outputs[0]), y.count == 4,
              merged == [y[0] * y[1], y[2], y[3]], out == [y[0], y[1], y[3], y[2]] else { return }
        replacements[r2] = [Node(opType: "Transpose", name: nodeName(split.name), inputs: [merge.inputs[0]],
                                 outputs: [split.outputs[0]], attributes: [Attribute("perm", .ints([0, 1, 3, 2]))])]
        replaced.formUnion([transpose, merge].map { $0.outputs[0] })
    }

    /// Form 4, matched from the Reshape after the Gemm back to the merge before it.
    mutating func mergedGemm(_ r2: Int, _ split: Node) {
        guard split.opType == "Reshape", let out = shape(split.outputs[0]), out.count >= 2,
              let (g, gemm) = producer(of: split.inputs[0], readBy: r2, "Gemm"),
              (gemm.attribute("transA")?.value.int ?? 0) == 0,
              let (_, merge) = producer(of: gemm.inputs[0], readBy: g, "Reshape"),
              let z = shape(merge.inputs[0]), let merged = shape(merge.outputs[0]), merged.count == 2, z.count >= 3,
              let w = index.constant(graph, gemm.inputs[1]), w.dtype == .float, w.rank == 2,
              (index.readers[gemm.inputs[1]] ?? []).count == 1 else { return }
        // The leading axes kept: the merge flattens z[..<j] into one axis and the split restores them.
        let j = out.count - 1
        guard j >= 1, j < z.count, Array(z[..<j]) == Array(out[..<j]), merged == [z[..<j].reduce(1, *), z[j...].reduce(1, *)] else { return }
        let transB = (gemm.attribute("transB")?.value.int ?? 0) != 0
        let alpha = gemm.attribute("alpha")?.value.float ?? 1, beta = gemm.attribute("beta")?.value.float ?? 1
        var weight = transB ? Tensor(shape: [w.shape[1], w.shape[0]], floats: Kernels.transpose(w.floats, shape: w.shape, perm: [1, 0])) : w
        guard weight.shape[0] == merged[1], out[j] == weight.shape[1] else { return }
        if alpha != 1 { weight = Tensor(shape: weight.shape, floats: weight.floats.map { $0 * alpha }) }
        var bias: Tensor?
        if gemm.inputs.count > 2, !gemm.inputs[2].isEmpty {
            guard let c = index.constant(graph, gemm.inputs[2]), c.dtype == .float, c.count == weight.shape[1] || c.count == 1,
                  (index.readers[gemm.inputs[2]] ?? []).count == 1 else { return }
            let values = c.count == 1 ? [Float](repeating: c.floats[0], count: weight.shape[1]) : c.floats
            bias = Tensor(shape: [weight.shape[1]], floats: values.map { $0 * beta })
        }
        var nodes: [Node] = []
        var input = merge.inputs[0]
        if j < z.count - 1 {
            let flat = reshape(input, [Int64](repeating: 0, count: j) + [-1], like: merge)
            nodes.append(flat)
            input = flat.outputs[0]
        }
        nodes += linear(input, weight: weight, bias: bias, output: split.outputs[0], name: gemm.name)
        replacements[r2] = nodes
        replaced.formUnion([gemm, merge].map { $0.outputs[0] })
    }

    /// The rewritten graph, or nil when nothing matched or an old node would stay alive.
    func finished() -> Graph? {
        guard !replacements.isEmpty else { return nil }
        var out = graph
        out.nodes = []
        for (i, node) in graph.nodes.enumerated() { out.nodes += replacements[i] ?? [node] }
        out.removeDeadNodes()
        guard !out.nodes.contains(where: { $0.outputs.contains(where: replaced.contains) }) else { return nil }
        let produced = Set(out.nodes.flatMap(\.outputs))
        out.valueInfo = out.valueInfo.filter { produced.contains($0.name) }
        return out
    }
}
