import WhittleNN
import WhittleONNX
import WhittleTensor

/// A slice of a parameter tied to a channel group: along `axis`, the group's channel k owns the entries
/// `offset + k·factor ..< offset + (k + 1)·factor` (`factor` > 1 where a Flatten spreads a channel over features).
public struct ChannelMember: Sendable, Equatable {
    public enum Role: String, Sendable, Codable {
        /// Output rows of a Conv, Gemm or MatMul producing the channels.
        case outputWeights
        /// Input columns of a layer reading the channels.
        case inputWeights
        /// Rows of a depthwise Conv passing the channels through.
        case depthwiseWeights
        case bias
        case normalizationScale
        /// BatchNormalization's shift, mean and variance.
        case normalizationStatistics
        /// A constant operand of an elementwise op, broadcast along the channels.
        case constant
    }
    public var node: String
    public var tensor: String
    public var axis: Int
    public var offset: Int
    public var factor: Int
    public var role: Role

    /// Whether the member counts for magnitude and Taylor importance (weights and BatchNorm scales, not biases).
    public var scored: Bool { [.outputWeights, .inputWeights, .depthwiseWeights, .normalizationScale].contains(role) }
}

/// Channels that must be removed together, found from the ONNX graph: a layer's output channels with the
/// BatchNormalization and activations after it, depthwise convolutions passing them through, every summand of a
/// residual Add, the input columns of every layer reading them (Concat maps them by offset, Flatten into Gemm
/// spreads each over its spatial features).
public struct ChannelGroup: Sendable {
    public var id: Int
    public var channels: Int
    /// The nodes that produce the channels (for messages and reports); the first names the group.
    public var producers: [String]
    public var members: [ChannelMember]
    /// Activation tensors `[N, C, …]` that carry exactly this group's channels, in graph order.
    public var tensors: [String]
    /// The tensor activation statistics are taken from: the last of `tensors` written by an activation function,
    /// else the last one.
    public var statisticsTensor: String?
    /// Why the group cannot be pruned (nil when it can).
    public var frozenReason: String?
    /// Channels are removed in aligned blocks of this many (the group width of a grouped convolution they pass
    /// through, whose groups must stay equal); 1 otherwise.
    public var unit: Int = 1

    public var name: String { producers.first ?? "group \(id)" }
    public var prunable: Bool { frozenReason == nil }
}

/// The dependency analysis of a graph: every channel group, and the depthwise and grouped convolutions whose
/// `group` attribute follows their channel count.
public struct ChannelGroups: Sendable {
    public var groups: [ChannelGroup]
    /// Depthwise (width 1) and grouped convolutions passing channels through, with their group width: after
    /// pruning, `group` = output channels / width.
    public var groupedNodes: [String: Int]
    public var depthwiseNodes: Set<String> { Set(groupedNodes.filter { $0.value == 1 }.keys) }

    static let passThrough: Set<String> = ["Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
        "Elu", "Selu", "Softplus", "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
        "GlobalMaxPool", "Resize", "Upsample", "Neg", "Abs", "Erf", "Gelu", "Mish", "PRelu", "Cast", "Sqrt", "Exp",
        "Log", "Reciprocal", "Floor", "Ceil", "Softsign", "ThresholdedRelu"]
    /// Reductions that keep the channel axis when it is not among their axes (squeeze-and-excitation's pooling as
    /// the dynamo exporter writes it).
    static let reductions: Set<String> = ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceSumSquare"]
    static let activations: Set<String> = ["Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                                           "Elu", "Selu", "Softplus", "Gelu", "Mish", "PRelu"]
    static let elementwise: Set<String> = ["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum"]

    /// A run of channels in a tensor's channel axis belonging to one space.
    struct Segment: Equatable {
        var space: Int
        var count: Int
        var factor: Int
    }

    /// Analyses `model` (shapes inferred at batch size 1).
    public init(model: Model) throws {
        guard let opset = model.defaultOpset else { throw CompressionError(.invalidArgument, "the model imports no default opset") }
        let graph = model.graph
        let inferred = try ShapeInference.infer(graph, opset: opset, inputs: try ShapeInference.inputShapes(model, batchSize: 1))
        let index = GraphIndex(graph)
        func shape(_ name: String) -> [Int]? { inferred.values[name]?.shape }

        // Spaces: union-find over channel index spaces.
        var parent: [Int] = [], sizes: [Int] = [], frozen: [String?] = [], producers: [[String]] = [], units: [Int] = []
        var members: [[ChannelMember]] = [], tensors: [[String]] = [], activationTensors: [[String]] = []
        func newSpace(_ size: Int, producer: String, frozenBecause reason: String? = nil) -> Int {
            parent.append(parent.count)
            sizes.append(size)
            units.append(1)
            frozen.append(reason)
            producers.append([producer])
            members.append([])
            tensors.append([])
            activationTensors.append([])
            return parent.count - 1
        }
        func find(_ s: Int) -> Int {
            var s = s
            while parent[s] != s { parent[s] = parent[parent[s]]; s = parent[s] }
            return s
        }
        func freeze(_ s: Int, _ reason: String) {
            let r = find(s)
            if frozen[r] == nil { frozen[r] = reason }
        }
        func union(_ a: Int, _ b: Int) {
            let ra = find(a), rb = find(b)
            guard ra != rb else { return }
            parent[rb] = ra
            frozen[ra] = frozen[ra] ?? frozen[rb]
            units[ra] = lcm(units[ra], units[rb])
            producers[ra] += producers[rb]
            members[ra] += members[rb]
            tensors[ra] += tensors[rb]
            activationTensors[ra] += activationTensors[rb]
        }
        var segments: [String: [Segment]] = [:]
        var grouped: [String: Int] = [:]
        func lcm(_ a: Int, _ b: Int) -> Int {
            var (x, y) = (a, b)
            while y != 0 { (x, y) = (y, x % y) }
            return a / x * b
        }
        func attach(_ segs: [Segment], node: Node, tensor: String, axis: Int, role: ChannelMember.Role, factor extra: Int = 1) {
            var offset = 0
            for seg in segs {
                let f = seg.factor * extra
                members[find(seg.space)].append(ChannelMember(node: node.name, tensor: tensor, axis: axis, offset: offset,
                                                              factor: f, role: role))
                offset += seg.count * f
            }
        }
        func freezeAll(_ segs: [Segment]?, _ reason: String) { for seg in segs ?? [] { freeze(seg.space, reason) } }
        func total(_ segs: [Segment]) -> Int { segs.reduce(0) { $0 + $1.count * $1.factor } }

        for input in graph.runtimeInputs {
            guard let s = shape(input.name), s.count >= 2 else { continue }
            segments[input.name] = [Segment(space: newSpace(s[1], producer: input.name,
                                                            frozenBecause: "the channels of graph input '\(input.name)' are kept"),
                                             count: s[1], factor: 1)]
        }
        for node in try ShapeInference.topologicalOrder(graph) {
            let op = node.opType
            let inputSegs = node.inputs.map { segments[$0] }
            let label = node.label
            func constant(_ i: Int) -> Tensor? { i < node.inputs.count ? index.constant(graph, node.inputs[i]) : nil }
            func unsupported(_ why: String) {
                for segs in inputSegs { freezeAll(segs, "\(label) \(why)") }
            }
            func output(_ segs: [Segment], _ name: String? = nil) {
                let t = name ?? node.outputs[0]
                segments[t] = segs
                if segs.count == 1, segs[0].factor == 1, let s = shape(t), s.count >= 2, s[1] == segs[0].count {
                    tensors[find(segs[0].space)].append(t)
                    if Self.activations.contains(op) { activationTensors[find(segs[0].space)].append(t) }
                }
            }
            switch op {
            case "Conv":
                let group = Int(node.attribute("group")?.value.int ?? 1)
                guard let w = constant(1), w.rank >= 3, let out = shape(node.outputs[0]) else {
                    unsupported("has weights that are not an initializer, so its channels cannot be edited")
                    if let out = shape(node.outputs[0]) {
                        output([Segment(space: newSpace(out[1], producer: node.name, frozenBecause: "\(label) has weights that are not an initializer"), count: out[1], factor: 1)])
                    }
                    continue
                }
                let inSegs = inputSegs[0] ?? []
                let cin = shape(node.inputs[0])?[1] ?? 0
                if node.inputs.count > 2, !node.inputs[2].isEmpty, constant(2) == nil {
                    unsupported("has a bias that is not an initializer, so its channels cannot be edited")
                    output([Segment(space: newSpace(out[1], producer: node.name, frozenBecause: "\(label) has a bias that is not an initializer"), count: out[1], factor: 1)])
                    continue
                }
                if group == 1 {
                    attach(inSegs, node: node, tensor: node.inputs[1], axis: 1, role: .inputWeights)
                    let s = newSpace(out[1], producer: node.name)
                    members[s].append(ChannelMember(node: node.name, tensor: node.inputs[1], axis: 0, offset: 0, factor: 1, role: .outputWeights))
                    if let b = constant(2), b.count == out[1] {
                        members[s].append(ChannelMember(node: node.name, tensor: node.inputs[2], axis: 0, offset: 0, factor: 1, role: .bias))
                    }
                    output([Segment(space: s, count: out[1], factor: 1)])
                } else if group > 1, cin % group == 0, w.shape[0] == cin, w.shape[1] == cin / group,
                          inSegs.allSatisfy({ $0.factor == 1 }), inSegs.allSatisfy({ $0.count % (cin / group) == 0 }) {
                    // Depthwise (width 1) or grouped with as many outputs as inputs per group: output channel i
                    // belongs with input channel i, and whole groups go together (the groups stay equal).
                    let width = cin / group
                    attach(inSegs, node: node, tensor: node.inputs[1], axis: 0, role: .depthwiseWeights)
                    grouped[node.name] = width
                    if constant(2) != nil { attach(inSegs, node: node, tensor: node.inputs[2], axis: 0, role: .bias) }
                    for seg in inSegs {
                        producers[find(seg.space)].append(node.name)
                        let r = find(seg.space)
                        units[r] = lcm(units[r], width)
                    }
                    output(inSegs)
                } else {
                    unsupported("is a grouped convolution (group \(group)) whose groups tie channels together")
                    output([Segment(space: newSpace(out[1], producer: node.name, frozenBecause: "\(label) is a grouped convolution"), count: out[1], factor: 1)])
                }
            case "Gemm", "MatMul":
                guard let out = shape(node.outputs[0]), out.count == 2, let a = shape(node.inputs[0]), a.count == 2 else {
                    unsupported("is a matrix product on tensors of rank other than 2")
                    continue
                }
                let transA = node.attribute("transA")?.value.int ?? 0, transB = node.attribute("transB")?.value.int ?? 0
                guard let w = constant(1), w.rank == 2, transA == 0 else {
                    unsupported("multiplies by a weight that is not a 2-D initializer")
                    output([Segment(space: newSpace(out[1], producer: node.name, frozenBecause: "\(label) has no constant weight"), count: out[1], factor: 1)])
                    continue
                }
                let inSegs = inputSegs[0] ?? []
                if !inSegs.isEmpty && total(inSegs) != a[1] {
                    unsupported("reads features that do not map to whole channels")
                } else {
                    attach(inSegs, node: node, tensor: node.inputs[1], axis: transB != 0 ? 1 : 0, role: .inputWeights)
                }
                let s = newSpace(out[1], producer: node.name)
                members[s].append(ChannelMember(node: node.name, tensor: node.inputs[1], axis: transB != 0 ? 0 : 1, offset: 0, factor: 1, role: .outputWeights))
                if op == "Gemm", node.inputs.count > 2, !node.inputs[2].isEmpty {
                    if let b = constant(2), b.count == out[1], b.rank >= 1 {
                        members[s].append(ChannelMember(node: node.name, tensor: node.inputs[2], axis: b.rank - 1, offset: 0, factor: 1, role: .bias))
                    } else if let b = constant(2), b.count == 1 {
                        // A broadcast scalar bias needs no edit.
                    } else {
                        freeze(s, "\(label) has a bias that is not a per-feature constant")
                    }
                }
                output([Segment(space: s, count: out[1], factor: 1)])
            case _ where Self.reductions.contains(op):
                guard let inSegs = inputSegs[0] else { continue }
                guard let x = shape(node.inputs[0]), let out = shape(node.outputs[0]), x.count >= 2 else { continue }
                let keep = (node.attribute("keepdims")?.value.int ?? 1) != 0
                let axes: [Int]?
                if let a = node.attribute("axes")?.value.ints {
                    axes = a.map { Int($0) < 0 ? Int($0) + x.count : Int($0) }
                } else if node.inputs.count > 1, !node.inputs[1].isEmpty {
                    axes = constant(1)?.asInts.map { Int($0) < 0 ? Int($0) + x.count : Int($0) }
                } else {
                    axes = nil  // every axis
                }
                // The channel axis stays axis 1 when it is not reduced and nothing before it is dropped.
                guard let axes, !axes.contains(1), !axes.contains(0) || keep, out.count >= 2, out[1] == x[1] else {
                    unsupported("reduces over the channel axis")
                    continue
                }
                output(inSegs)
            case "BatchNormalization":
                guard let inSegs = inputSegs[0] else { continue }
                guard (1...4).allSatisfy({ constant($0) != nil }) else {
                    unsupported("has parameters that are not initializers")
                    continue
                }
                attach(inSegs, node: node, tensor: node.inputs[1], axis: 0, role: .normalizationScale)
                for i in 2...4 { attach(inSegs, node: node, tensor: node.inputs[i], axis: 0, role: .normalizationStatistics) }
                output(inSegs)
            case _ where Self.passThrough.contains(op):
                guard let inSegs = inputSegs[0] else { continue }
                if op == "PRelu" {
                    guard let slope = constant(1), slope.count == 1 else {
                        unsupported("has per-channel slopes, which Whittle does not edit")
                        continue
                    }
                }
                guard let s = shape(node.outputs[0]), s.count >= 2 else {
                    unsupported("changes the tensor's rank")
                    continue
                }
                output(inSegs)
            case _ where Self.elementwise.contains(op):
                guard let out = shape(node.outputs[0]) else { continue }
                let channelAxis = 1
                var full: [[Segment]] = []
                var ok = out.count >= 2
                for (k, name) in node.inputs.enumerated() where !name.isEmpty {
                    guard let s = shape(name) else { continue }
                    let aligned = s.count - (out.count - channelAxis)  // the input's axis broadcast onto the channel axis
                    let dim = aligned >= 0 && aligned < s.count ? s[aligned] : 1
                    if let segs = inputSegs[k] {
                        if op == "Div" && k == 1 { ok = false; break }
                        if dim == out[channelAxis] && s.count == out.count { full.append(segs) } else if dim != 1 { ok = false }
                    } else if dim != 1 {
                        if constant(k) != nil, out.count >= 2 { continue }  // a per-channel constant: attached below
                        ok = false
                    }
                }
                guard ok, let first = full.first, full.allSatisfy({ $0.map(\.count) == first.map(\.count) && $0.map(\.factor) == first.map(\.factor) }) else {
                    unsupported("combines tensors whose channels Whittle cannot line up")
                    if let out = shape(node.outputs[0]), out.count >= 2 {
                        output([Segment(space: newSpace(out[1], producer: node.name, frozenBecause: "\(label) cannot be pruned through"), count: out[1], factor: 1)])
                    }
                    continue
                }
                for segs in full.dropFirst() { for (a, b) in zip(first, segs) { union(a.space, b.space) } }
                for (k, name) in node.inputs.enumerated() where inputSegs[k] == nil {
                    guard constant(k) != nil, let s = shape(name) else { continue }
                    let aligned = s.count - (out.count - channelAxis)
                    if aligned >= 0 && aligned < s.count && s[aligned] == out[channelAxis] {
                        attach(first, node: node, tensor: name, axis: aligned, role: .constant)
                    }
                }
                output(first)
            case "Concat":
                guard let out = shape(node.outputs[0]) else { continue }
                let axis = Int(node.attribute("axis")?.value.int ?? 0)
                let normalized = axis < 0 ? axis + out.count : axis
                if normalized == 1 {
                    var segs: [Segment] = []
                    for (k, name) in node.inputs.enumerated() {
                        if let s = inputSegs[k] { segs += s } else if let s = shape(name) {
                            segs.append(Segment(space: newSpace(s[1], producer: node.name, frozenBecause: "\(label) concatenates a tensor whose channels Whittle does not track"), count: s[1], factor: 1))
                        }
                    }
                    output(segs)
                } else {
                    let present = inputSegs.compactMap { $0 }
                    guard let first = present.first, present.count == node.inputs.count,
                        present.allSatisfy({ $0.map(\.count) == first.map(\.count) }) else {
                        unsupported("concatenates along axis \(axis) tensors whose channels differ")
                        continue
                    }
                    for segs in present.dropFirst() { for (a, b) in zip(first, segs) { union(a.space, b.space) } }
                    output(first)
                }
            case "Flatten", "Reshape", "Squeeze", "Unsqueeze":
                guard let inSegs = inputSegs[0] else { continue }
                guard let s = shape(node.inputs[0]), let out = shape(node.outputs[0]), s.count >= 2 else { continue }
                let inner = s[2...].reduce(1, *)
                if out.count == 2 && out[1] == s[1] * inner && (op != "Flatten" || (node.attribute("axis")?.value.int ?? 1) == 1) {
                    if op == "Reshape" {
                        guard let target = constant(1), target.count == 2, target.asInts[1] == -1 else {
                            unsupported("reshapes to a fixed feature count, which would be wrong after pruning")
                            continue
                        }
                    }
                    output(inSegs.map { Segment(space: $0.space, count: $0.count, factor: $0.factor * inner) })
                } else if out.count >= 2 && out[1] == s[1] && out.count != s.count && inSegs.allSatisfy({ $0.factor == 1 })
                            && (op == "Squeeze" || op == "Unsqueeze") {
                    output(inSegs)
                } else {
                    unsupported("reshapes the channel axis")
                }
            default:
                unsupported("reads the channels, and Whittle does not know how \(op) maps them")
            }
        }
        for output in graph.outputs {
            freezeAll(segments[output.name], "they reach graph output '\(output.name)'")
        }

        for s in parent.indices where find(s) == s {
            for m in members[s] where (index.readers[m.tensor]?.count ?? 0) > 1 {
                freeze(s, "initializer '\(m.tensor)' is shared by several nodes")
            }
        }
        var groups: [ChannelGroup] = []
        for s in parent.indices where find(s) == s {
            var seenProducers = Set<String>()
            let names = producers[s].filter { seenProducers.insert($0).inserted }
            var frozenReason = frozen[s]
            if frozenReason == "" { frozenReason = "the channels cannot be mapped" }
            let statistics = activationTensors[s].last ?? tensors[s].last
            var group = ChannelGroup(id: groups.count, channels: sizes[s], producers: names, members: members[s],
                                     tensors: tensors[s], statisticsTensor: statistics, frozenReason: frozenReason)
            group.unit = units[s]
            if frozenReason == nil, sizes[s] % units[s] != 0 || sizes[s] / units[s] < 2 {
                group.frozenReason = "its \(sizes[s]) channels pass through grouped convolutions in groups of \(units[s]), which cannot be removed whole"
            }
            groups.append(group)
        }
        // Graph-input spaces carry no parameters of their own; keep them out of reports unless something else joined.
        let inputs = Set(graph.runtimeInputs.map(\.name))
        self.groups = groups.filter { !($0.members.isEmpty && inputs.contains($0.name)) }
        for i in self.groups.indices { self.groups[i].id = i }
        self.groupedNodes = grouped
    }

    public var prunable: [ChannelGroup] { groups.filter(\.prunable) }
}
