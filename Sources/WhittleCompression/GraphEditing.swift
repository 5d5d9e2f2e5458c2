import WhittleONNX
import WhittleTensor

/// Who reads and who writes each value of a graph (node indices into `graph.nodes`).
struct GraphIndex {
    var producer: [String: Int] = [:]
    var readers: [String: [Int]] = [:]
    let graphOutputs: Set<String>
    let graphInputs: Set<String>
    let initializers: [String: Int]

    init(_ graph: Graph) {
        for (i, node) in graph.nodes.enumerated() {
            for name in node.inputs where !name.isEmpty { readers[name, default: []].append(i) }
            for name in node.outputs where !name.isEmpty { producer[name] = i }
        }
        graphOutputs = Set(graph.outputs.map(\.name))
        graphInputs = Set(graph.runtimeInputs.map(\.name))
        initializers = graph.initializerIndex
    }

    /// The initializer a node input names, if it is one.
    func constant(_ graph: Graph, _ name: String) -> Tensor? {
        initializers[name].flatMap { graph.initializers[$0].tensor }
    }
}

/// Model rewrites shared by quantization and pruning.
public enum GraphEditing {
    /// Folds every BatchNormalization that follows a Conv (whose output nothing else reads) into the Conv's weights
    /// and bias, `W' = W · γ/√(σ²+ε)`, `b' = (b − μ) · γ/√(σ²+ε) + β` per output channel, as onnxruntime's optimizer
    /// and `quant_pre_process` do before quantization. The Conv takes over the normalization's output name.
    public static func foldBatchNormalization(_ model: Model) throws -> Model {
        var graph = model.graph
        var removed = Set<Int>()
        let index = GraphIndex(graph)
        var used = Set(graph.initializers.map(\.name))
        for (i, node) in graph.nodes.enumerated() where node.opType == "BatchNormalization" {
            guard node.outputs.filter({ !$0.isEmpty }).count == 1, let p = index.producer[node.inputs[0]],
                graph.nodes[p].opType == "Conv", !removed.contains(p),
                index.readers[node.inputs[0]]?.count == 1, !index.graphOutputs.contains(node.inputs[0]) else { continue }
            let conv = graph.nodes[p]
            guard let w = index.constant(graph, conv.inputs[1]), w.dtype == .float,
                (index.readers[conv.inputs[1]] ?? []).count == 1,
                let gamma = index.constant(graph, node.inputs[1]), let beta = index.constant(graph, node.inputs[2]),
                let mean = index.constant(graph, node.inputs[3]), let variance = index.constant(graph, node.inputs[4])
            else { continue }
            let c = w.shape[0]
            guard [gamma, beta, mean, variance].allSatisfy({ $0.count == c && $0.dtype == .float }) else { continue }
            let bias: Tensor?
            if conv.inputs.count > 2, !conv.inputs[2].isEmpty {
                guard let b = index.constant(graph, conv.inputs[2]), b.count == c,
                    (index.readers[conv.inputs[2]] ?? []).count == 1 else { continue }
                bias = b
            } else {
                bias = nil
            }
            let epsilon = node.attribute("epsilon")?.value.float ?? 1e-5
            let inner = w.count / c
            var weights = w.floats, folded = [Float](repeating: 0, count: c)
            for k in 0..<c {
                let factor = gamma.floats[k] / (variance.floats[k] + epsilon).squareRoot()
                for j in 0..<inner { weights[k * inner + j] *= factor }
                folded[k] = ((bias?.floats[k] ?? 0) - mean.floats[k]) * factor + beta.floats[k]
            }
            graph.initializers[index.initializers[conv.inputs[1]]!].setTensor(Tensor(shape: w.shape, floats: weights))
            let biasTensor = Tensor(shape: [c], floats: folded)
            if bias != nil {
                graph.initializers[index.initializers[conv.inputs[2]]!].setTensor(biasTensor)
            } else {
                let name = uniqueName((conv.name.isEmpty ? conv.outputs[0] : conv.name) + ".bias", &used)
                graph.initializers.append(Initializer(name: name, tensor: biasTensor))
                graph.nodes[p].inputs = Array(conv.inputs.prefix(2)) + [name]
            }
            graph.nodes[p].outputs[0] = node.outputs[0]
            removed.insert(i)
        }
        graph.nodes = graph.nodes.enumerated().filter { !removed.contains($0.offset) }.map(\.element)
        graph.removeUnusedInitializers()
        graph.valueInfo = []
        var out = model
        out.graph = graph
        return out
    }

    /// Turns constant-producing nodes into initializers: every Identity of an initializer (PyTorch's exporter
    /// shares one initializer among layers whose folded constants are equal, such as the zero biases of folded
    /// BatchNorms, through Identity nodes) becomes its own copy named by the Identity's output, and every Constant
    /// node holding a tensor becomes an initializer. Each layer then owns its parameters, so pruning can edit them.
    /// Values that are graph outputs keep their nodes. Returns the model and whether anything changed.
    public static func materializeConstants(_ model: Model) -> (Model, changed: Bool) {
        var graph = model.graph
        let outputs = Set(graph.outputs.map(\.name))
        var tensors: [String: Tensor] = [:]
        for initializer in graph.initializers { if let t = initializer.tensor { tensors[initializer.name] = t } }
        var added: [Initializer] = []
        var kept: [Node] = []
        for node in graph.nodes {
            guard node.outputs.count == 1, !outputs.contains(node.outputs[0]), node.domain.isEmpty || node.domain == "ai.onnx" else {
                kept.append(node)
                continue
            }
            var value: Tensor?
            switch node.opType {
            case "Identity" where node.inputs.count == 1: value = tensors[node.inputs[0]]
            case "Constant":
                if node.attributes.count == 1, node.attributes[0].name == "value", case .tensor(let t) = node.attributes[0].value { value = t }
            default: break
            }
            guard let value else {
                kept.append(node)
                continue
            }
            tensors[node.outputs[0]] = value
            added.append(Initializer(name: node.outputs[0], tensor: value))
        }
        guard !added.isEmpty else { return (model, false) }
        graph.nodes = kept
        graph.initializers += added
        graph.removeUnusedInitializers()
        var out = model
        out.graph = graph
        return (out, true)
    }

    static func uniqueName(_ base: String, _ used: inout Set<String>) -> String {
        var name = base, k = 1
        while used.contains(name) {
            name = "\(base)_\(k)"
            k += 1
        }
        used.insert(name)
        return name
    }
}

extension Graph {
    /// Drops nodes whose outputs nothing reads (a shape computation a rewrite left behind), then the initializers
    /// only they read. Graphs with subgraphs (If, Loop) are left alone.
    mutating func removeDeadNodes() {
        guard !nodes.contains(where: { $0.attributes.contains { if case .graph = $0.value { true } else { false } } }) else { return }
        let outputNames = Set(outputs.map(\.name))
        while true {
            let read = Set(nodes.flatMap(\.inputs)).union(outputNames)
            let before = nodes.count
            nodes.removeAll { node in node.outputs.allSatisfy { $0.isEmpty || !read.contains($0) } }
            if nodes.count == before { break }
        }
        removeUnusedInitializers()
    }

    /// Drops initializers no node reads and no graph output names (and their graph-input declarations).
    mutating func removeUnusedInitializers() {
        var read = Set(nodes.flatMap(\.inputs)).union(outputs.map(\.name))
        // Subgraph attributes (If, Loop) may read outer values: keep everything if there are any.
        if nodes.contains(where: { $0.attributes.contains { if case .graph = $0.value { true } else { false } } }) {
            read.formUnion(initializers.map(\.name))
        }
        let dropped = Set(initializers.map(\.name)).subtracting(read)
        guard !dropped.isEmpty else { return }
        initializers.removeAll { dropped.contains($0.name) }
        inputs.removeAll { dropped.contains($0.name) }
    }
}

extension GraphEditing {
    /// Short names ("t0", "t1", … for values, "n0", … for nodes) for everything but the graph's runtime inputs
    /// and outputs: on a small quantized model the names the exporter and the QDQ convention produce
    /// ("features.4.0.weight_DequantizeLinear_Output", twice per tensor) weigh as much as the int8 weights. Returns
    /// the model and the map from old to new value names. Graphs with subgraphs (If, Loop, Scan), whose bodies may
    /// refer to outer values, are returned unchanged.
    public static func compactNames(_ model: Model) -> (Model, [String: String]) {
        let graph = model.graph
        let hasSubgraphs = graph.nodes.contains { node in
            node.attributes.contains { if case .graph = $0.value { return true }; if case .graphs = $0.value { return true }; return false }
        }
        guard !hasSubgraphs else { return (model, [:]) }
        let initializerNames = Set(graph.initializers.map(\.name))
        var keep = Set(graph.outputs.map(\.name))
        for input in graph.inputs where !initializerNames.contains(input.name) { keep.insert(input.name) }
        var map: [String: String] = [:]
        func name(_ old: String) -> String {
            if old.isEmpty || keep.contains(old) { return old }
            if let new = map[old] { return new }
            let new = "t\(map.count)"
            map[old] = new
            return new
        }
        var out = model
        for i in out.graph.initializers.indices { out.graph.initializers[i] = out.graph.initializers[i].renamed(name(out.graph.initializers[i].name)) }
        for i in out.graph.nodes.indices {
            out.graph.nodes[i].name = "n\(i)"
            out.graph.nodes[i].inputs = out.graph.nodes[i].inputs.map(name)
            out.graph.nodes[i].outputs = out.graph.nodes[i].outputs.map(name)
        }
        for i in out.graph.inputs.indices { out.graph.inputs[i].name = name(out.graph.inputs[i].name) }
        out.graph.valueInfo = out.graph.valueInfo.compactMap { v in
            guard let new = map[v.name] else { return nil }
            var v = v
            v.name = new
            return v
        }
        return (out, map)
    }
}
