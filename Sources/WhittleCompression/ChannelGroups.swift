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
    /// through, whose groups must stay equal, or an attention head's size); 1 otherwise.
    public var unit: Int = 1
    /// The statistics tensor carries the channels on its last axis (`[N, S, D]` features), not axis 1.
    public var statisticsOnLastAxis = false

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
    /// Reshapes whose targets must follow pruned channel counts (see `ReshapeRewrite`).
    public var reshapeRewrites: [ReshapeRewrite] = []
    /// Per group id, the residual branch the group lives inside (`ResidualBranch`): keeping none of its channels
    /// removes the branch (the search's skippable blocks).
    public var branches: [Int: ResidualBranch] = [:]

    static let passThrough: Set<String> = ["Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
        "Elu", "Selu", "Softplus", "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
        "GlobalMaxPool", "Resize", "Upsample", "Neg", "Abs", "Erf", "Gelu", "Mish", "PRelu", "Cast", "Sqrt", "Exp",
        "Log", "Reciprocal", "Floor", "Ceil", "Softsign", "ThresholdedRelu"]
    /// Reductions that keep the channel axis when it is not among their axes (squeeze-and-excitation's pooling as
    /// the dynamo exporter writes it).
    static let reductions: Set<String> = ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceSumSquare"]
    static let activations: Set<String> = ["Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                                           "Elu", "Selu", "Softplus", "Gelu", "Mish", "PRelu"]
    static let elementwise: Set<String> = ["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow", "Where"]
    /// Ops that work on the spatial axes of NCHW tensors: the channels must be on axis 1.
    static let spatial: Set<String> = ["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample"]

    /// A run of a tensor's channel axis belonging to one space: `count` channels of the space, each spread over
    /// `factor` consecutive entries (a Flatten spreads a channel over its spatial features), or `block` channels
    /// per entry (an attention head: a reshape splits D features into H heads of `block` = D/H).
    struct Segment: Equatable {
        var space: Int
        var count: Int
        var factor: Int
        var block: Int = 1
        /// Entries along the axis.
        var entries: Int { count * factor / block }
    }

    /// A tensor's channels: the axis that carries them and its segments.
    struct Channels {
        var axis: Int
        var segments: [Segment]
        var plain: Bool { segments.allSatisfy { $0.factor == 1 && $0.block == 1 } }
    }

    /// A Reshape that channels pass through (split into attention heads, merged back, or moved between [N, C, 1, 1]
    /// and [N, C]): pruning gives it this target, which copies the leading axes (0), infers the channels' axis (-1)
    /// and names the trailing sizes, so that it follows any kept count. The rewrite does not change what the model
    /// computes, whatever is pruned.
    public struct ReshapeRewrite: Sendable, Equatable {
        public var node: String
        public var target: [Int64]
    }

    /// Analyses `model` (shapes inferred at batch size 1; free sequence dimensions at their declared size or 1).
    public init(model: Model) throws {
        guard let opset = model.defaultOpset else { throw CompressionError(.invalidArgument, "the model imports no default opset") }
        let graph = model.graph
        let inferred = try ShapeInference.infer(graph, opset: opset, inputs: try Self.analysisShapes(model))
        let index = GraphIndex(graph)
        func shape(_ name: String) -> [Int]? { inferred.values[name]?.shape }
        func folded(_ name: String) -> Tensor? { inferred.values[name]?.constant }

        // Spaces: union-find over channel index spaces.
        var parent: [Int] = [], sizes: [Int] = [], frozen: [String?] = [], producers: [[String]] = [], units: [Int] = []
        var members: [[ChannelMember]] = [], tensors: [[String]] = [], activationTensors: [[String]] = []
        var lastAxisTensors: [[String]] = []
        func newSpace(_ size: Int, producer: String, frozenBecause reason: String? = nil) -> Int {
            parent.append(parent.count)
            sizes.append(size)
            units.append(1)
            frozen.append(reason)
            producers.append([producer])
            members.append([])
            tensors.append([])
            activationTensors.append([])
            lastAxisTensors.append([])
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
        func lcm(_ a: Int, _ b: Int) -> Int {
            var (x, y) = (a, b)
            while y != 0 { (x, y) = (y, x % y) }
            return a / x * b
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
            lastAxisTensors[ra] += lastAxisTensors[rb]
        }
        func requireUnit(_ s: Int, _ unit: Int) {
            let r = find(s)
            units[r] = lcm(units[r], unit)
        }
        var channels: [String: Channels] = [:]
        var grouped: [String: Int] = [:]
        var rewrites: [ReshapeRewrite] = []
        func rewrite(_ node: Node, axis: Int, trailing: ArraySlice<Int>) {
            rewrites.append(ReshapeRewrite(node: node.name, target: [Int64](repeating: 0, count: axis) + [-1] + trailing.map { Int64($0) }))
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
        func freezeAll(_ c: Channels?, _ reason: String) { for seg in c?.segments ?? [] { freeze(seg.space, reason) } }
        func total(_ segs: [Segment]) -> Int { segs.reduce(0) { $0 + $1.entries } }

        for input in graph.runtimeInputs {
            guard let s = shape(input.name), s.count >= 2, inferred.values[input.name]?.dtype.isFloatingPoint == true else { continue }
            channels[input.name] = Channels(axis: 1, segments: [Segment(space: newSpace(s[1], producer: input.name,
                frozenBecause: "the channels of graph input '\(input.name)' are kept"), count: s[1], factor: 1)])
        }
        for node in try ShapeInference.topologicalOrder(graph) {
            let op = node.opType
            let inputChannels = node.inputs.map { channels[$0] }
            let label = node.label
            func constant(_ i: Int) -> Tensor? { i < node.inputs.count ? index.constant(graph, node.inputs[i]) : nil }
            func unsupported(_ why: String) {
                for c in inputChannels { freezeAll(c, "\(label) \(why)") }
            }
            func output(_ c: Channels, _ name: String? = nil) {
                let t = name ?? node.outputs[0]
                channels[t] = c
                guard c.segments.count == 1, c.plain, let s = shape(t), c.axis < s.count, s[c.axis] == c.segments[0].count else { return }
                let r = find(c.segments[0].space)
                if c.axis == 1 {
                    tensors[r].append(t)
                    if Self.activations.contains(op) { activationTensors[r].append(t) }
                } else if c.axis == s.count - 1 {
                    lastAxisTensors[r].append(t)
                }
            }
            /// A new space for the output's channels on `axis`, left whole for `reason` (nil: prunable).
            func fresh(axis: Int, _ reason: String?) {
                guard let out = shape(node.outputs[0]), axis < out.count else { return }
                output(Channels(axis: axis, segments: [Segment(space: newSpace(out[axis], producer: node.name, frozenBecause: reason),
                                                               count: out[axis], factor: 1)]))
            }
            let first = inputChannels.first ?? nil
            switch op {
            case "Conv":
                let group = Int(node.attribute("group")?.value.int ?? 1)
                guard let w = constant(1), w.rank >= 3, let out = shape(node.outputs[0]) else {
                    unsupported("has weights that are not an initializer, so its channels cannot be edited")
                    fresh(axis: 1, "\(label) has weights that are not an initializer")
                    continue
                }
                if let first, first.axis != 1 || !first.segments.allSatisfy({ $0.block == 1 }) {
                    unsupported("reads channels that are not on axis 1")
                    fresh(axis: 1, "\(label) reads channels that are not on axis 1")
                    continue
                }
                let inSegs = first?.segments ?? []
                let cin = shape(node.inputs[0])?[1] ?? 0
                if node.inputs.count > 2, !node.inputs[2].isEmpty, constant(2) == nil {
                    unsupported("has a bias that is not an initializer, so its channels cannot be edited")
                    fresh(axis: 1, "\(label) has a bias that is not an initializer")
                    continue
                }
                if group == 1 {
                    attach(inSegs, node: node, tensor: node.inputs[1], axis: 1, role: .inputWeights)
                    let s = newSpace(out[1], producer: node.name)
                    members[s].append(ChannelMember(node: node.name, tensor: node.inputs[1], axis: 0, offset: 0, factor: 1, role: .outputWeights))
                    if let b = constant(2), b.count == out[1] {
                        members[s].append(ChannelMember(node: node.name, tensor: node.inputs[2], axis: 0, offset: 0, factor: 1, role: .bias))
                    }
                    output(Channels(axis: 1, segments: [Segment(space: s, count: out[1], factor: 1)]))
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
                        requireUnit(seg.space, width)
                    }
                    output(Channels(axis: 1, segments: inSegs))
                } else {
                    unsupported("is a grouped convolution (group \(group)) whose groups tie channels together")
                    fresh(axis: 1, "\(label) is a grouped convolution")
                }
            case "ConvTranspose":
                // Weights [C_in, C_out / group, k…]: input channels on axis 0, output channels on axis 1.
                let group = Int(node.attribute("group")?.value.int ?? 1)
                guard let w = constant(1), w.rank >= 3, let out = shape(node.outputs[0]), group == 1 else {
                    unsupported(group != 1 ? "is a grouped transposed convolution" : "has weights that are not an initializer")
                    fresh(axis: 1, "\(label) " + (group != 1 ? "is a grouped transposed convolution" : "has weights that are not an initializer"))
                    continue
                }
                if let first, first.axis != 1 || !first.segments.allSatisfy({ $0.block == 1 }) {
                    unsupported("reads channels that are not on axis 1")
                    fresh(axis: 1, "\(label) reads channels that are not on axis 1")
                    continue
                }
                if node.inputs.count > 2, !node.inputs[2].isEmpty, constant(2) == nil {
                    unsupported("has a bias that is not an initializer, so its channels cannot be edited")
                    fresh(axis: 1, "\(label) has a bias that is not an initializer")
                    continue
                }
                attach(first?.segments ?? [], node: node, tensor: node.inputs[1], axis: 0, role: .inputWeights)
                let s = newSpace(out[1], producer: node.name)
                members[s].append(ChannelMember(node: node.name, tensor: node.inputs[1], axis: 1, offset: 0, factor: 1, role: .outputWeights))
                if let b = constant(2), b.count == out[1] {
                    members[s].append(ChannelMember(node: node.name, tensor: node.inputs[2], axis: 0, offset: 0, factor: 1, role: .bias))
                }
                output(Channels(axis: 1, segments: [Segment(space: s, count: out[1], factor: 1)]))
            case "Gemm", "MatMul":
                guard let out = shape(node.outputs[0]), let a = shape(node.inputs[0]), a.count >= 2, out.count >= 2 else {
                    unsupported("is a matrix product Whittle cannot follow")
                    continue
                }
                let transA = node.attribute("transA")?.value.int ?? 0, transB = node.attribute("transB")?.value.int ?? 0
                if op == "MatMul", constant(1) == nil, let b = shape(node.inputs[1]), a.count >= 3, b.count == a.count {
                    // Two activations (attention: scores = Q·Kᵀ, context = P·V): channels may only sit on a batch
                    // axis (the heads), the same one in both; the spaces are tied head by head.
                    let batchAxes = 0..<(a.count - 2)
                    let second = inputChannels.count > 1 ? inputChannels[1] : nil
                    guard let ca = first, let cb = second, batchAxes.contains(ca.axis), ca.axis == cb.axis,
                          ca.segments.count == 1, cb.segments.count == 1, ca.segments[0].entries == cb.segments[0].entries,
                          ca.segments[0].factor == 1, cb.segments[0].factor == 1 else {
                        unsupported("multiplies activations along their channels")
                        continue
                    }
                    let (sa, sb) = (ca.segments[0], cb.segments[0])
                    requireUnit(sa.space, sa.block)
                    requireUnit(sb.space, sb.block)
                    union(sa.space, sb.space)
                    output(Channels(axis: ca.axis, segments: [sa]))
                    continue
                }
                let last = a.count - 1
                guard let w = constant(1), w.rank == 2, transA == 0 else {
                    unsupported("multiplies by a weight that is not a 2-D initializer")
                    fresh(axis: out.count - 1, "\(label) has no constant weight")
                    continue
                }
                if let first, !(first.axis == last && first.segments.allSatisfy({ $0.block == 1 }) && total(first.segments) == a[last]) {
                    unsupported("reads features that do not map to whole channels")
                } else if let first {
                    attach(first.segments, node: node, tensor: node.inputs[1], axis: transB != 0 ? 1 : 0, role: .inputWeights)
                }
                let s = newSpace(out[out.count - 1], producer: node.name)
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
                output(Channels(axis: out.count - 1, segments: [Segment(space: s, count: out[out.count - 1], factor: 1)]))
            case "BatchNormalization":
                guard let first else { continue }
                guard first.axis == 1, (1...4).allSatisfy({ constant($0) != nil }) else {
                    unsupported(first.axis == 1 ? "has parameters that are not initializers" : "normalizes another axis than the channels'")
                    continue
                }
                attach(first.segments, node: node, tensor: node.inputs[1], axis: 0, role: .normalizationScale)
                for i in 2...4 { attach(first.segments, node: node, tensor: node.inputs[i], axis: 0, role: .normalizationStatistics) }
                output(first)
            case "LayerNormalization":
                guard let first, let x = shape(node.inputs[0]) else { continue }
                let raw = Int(node.attribute("axis")?.value.int ?? -1)
                let from = raw < 0 ? raw + x.count : raw
                guard first.axis < from else {
                    unsupported("normalizes over the channels (the residual width is left alone)")
                    continue
                }
                output(first)
            case "Softmax", "LogSoftmax":
                guard let first, let x = shape(node.inputs[0]) else { continue }
                let raw = Int(node.attribute("axis")?.value.int ?? (opset >= 13 ? -1 : 1))
                let axis = raw < 0 ? raw + x.count : raw
                guard first.axis != axis, opset >= 13 || first.axis < axis else {
                    unsupported("normalizes over the channels")
                    continue
                }
                output(first)
            case _ where Self.passThrough.contains(op):
                guard let first else { continue }
                if op == "PRelu" {
                    guard let slope = constant(1), slope.count == 1 else {
                        unsupported("has per-channel slopes, which Whittle does not edit")
                        continue
                    }
                }
                guard let s = shape(node.outputs[0]), s.count >= 2, first.axis < s.count else {
                    unsupported("changes the tensor's rank")
                    continue
                }
                if Self.spatial.contains(op) && first.axis != 1 {
                    unsupported("pools over the channels' axis")
                    continue
                }
                output(first)
            case _ where Self.reductions.contains(op):
                guard let first else { continue }
                guard let x = shape(node.inputs[0]), let out = shape(node.outputs[0]), x.count >= 2 else { continue }
                let keep = (node.attribute("keepdims")?.value.int ?? 1) != 0
                let axes: [Int]?
                if let a = node.attribute("axes")?.value.ints {
                    axes = a.map { Int($0) < 0 ? Int($0) + x.count : Int($0) }
                } else if node.inputs.count > 1, !node.inputs[1].isEmpty {
                    axes = (constant(1) ?? folded(node.inputs[1]))?.asInts.map { Int($0) < 0 ? Int($0) + x.count : Int($0) }
                } else {
                    axes = nil  // every axis
                }
                guard let axes, !axes.contains(first.axis) else {
                    unsupported("reduces over the channel axis")
                    continue
                }
                let axis = keep ? first.axis : first.axis - axes.filter { $0 < first.axis }.count
                guard axis < out.count, out[axis] == x[first.axis] else {
                    unsupported("reduces over the channel axis")
                    continue
                }
                output(Channels(axis: axis, segments: first.segments))
            case _ where Self.elementwise.contains(op):
                guard let out = shape(node.outputs[0]), out.count >= 1 else { continue }
                // The channel axis in output coordinates, from the first input that carries channels.
                var outAxis: Int?
                var full: [[Segment]] = []
                var ok = true
                for (k, name) in node.inputs.enumerated() where !name.isEmpty {
                    guard let c = inputChannels[k], let s = shape(name) else { continue }
                    let aligned = c.axis + (out.count - s.count)
                    if outAxis == nil { outAxis = aligned }
                    if aligned != outAxis || s[c.axis] != out[aligned] || (op == "Div" && k == 1) { ok = false }
                    full.append(c.segments)
                }
                guard let axis = outAxis, ok, let firstSegs = full.first,
                      full.allSatisfy({ $0.map(\.count) == firstSegs.map(\.count) && $0.map(\.factor) == firstSegs.map(\.factor)
                                        && $0.map(\.block) == firstSegs.map(\.block) }) else {
                    if outAxis != nil || inputChannels.contains(where: { $0 != nil }) {
                        unsupported("combines tensors whose channels Whittle cannot line up")
                        if outAxis == 1 || outAxis == nil { fresh(axis: 1, "\(label) cannot be pruned through") }
                    }
                    continue
                }
                // Every operand without channels must broadcast along the channel axis, or be a per-channel constant.
                var constants: [(String, Int)] = []
                for (k, name) in node.inputs.enumerated() where !name.isEmpty && inputChannels[k] == nil {
                    guard let s = shape(name) else { continue }
                    let own = axis - (out.count - s.count)
                    let dim = own >= 0 && own < s.count ? s[own] : 1
                    if dim == 1 { continue }
                    if constant(k) != nil && firstSegs.allSatisfy({ $0.block == 1 }) { constants.append((name, own)); continue }
                    ok = false
                }
                guard ok else {
                    unsupported("combines tensors whose channels Whittle cannot line up")
                    if axis == 1 { fresh(axis: 1, "\(label) cannot be pruned through") }
                    continue
                }
                for segs in full.dropFirst() { for (a, b) in zip(firstSegs, segs) { union(a.space, b.space) } }
                for (name, own) in constants { attach(firstSegs, node: node, tensor: name, axis: own, role: .constant) }
                output(Channels(axis: axis, segments: firstSegs))
            case "Concat":
                guard let out = shape(node.outputs[0]) else { continue }
                let raw = Int(node.attribute("axis")?.value.int ?? 0)
                let axis = raw < 0 ? raw + out.count : raw
                let present = inputChannels.compactMap { $0 }
                guard let firstPresent = present.first else { continue }
                if axis == firstPresent.axis {
                    guard present.allSatisfy({ $0.axis == axis && $0.segments.allSatisfy { $0.block == 1 } }) else {
                        unsupported("concatenates tensors whose channels sit on different axes")
                        continue
                    }
                    var segs: [Segment] = []
                    for (k, name) in node.inputs.enumerated() {
                        if let c = inputChannels[k] { segs += c.segments } else if let s = shape(name) {
                            segs.append(Segment(space: newSpace(s[axis], producer: node.name, frozenBecause: "\(label) concatenates a tensor whose channels Whittle does not track"), count: s[axis], factor: 1))
                        }
                    }
                    output(Channels(axis: axis, segments: segs))
                } else {
                    guard present.count == node.inputs.count,
                          present.allSatisfy({ $0.axis == firstPresent.axis && $0.segments.map(\.count) == firstPresent.segments.map(\.count)
                                               && $0.segments.map(\.block) == firstPresent.segments.map(\.block) }) else {
                        unsupported("concatenates along axis \(raw) tensors whose channels differ")
                        continue
                    }
                    for c in present.dropFirst() { for (a, b) in zip(firstPresent.segments, c.segments) { union(a.space, b.space) } }
                    output(firstPresent)
                }
            case "Transpose":
                guard let first, let x = shape(node.inputs[0]) else { continue }
                let perm = node.attribute("perm")?.value.ints?.map { Int($0) } ?? Array((0..<x.count).reversed())
                guard let axis = perm.firstIndex(of: first.axis) else { continue }
                output(Channels(axis: axis, segments: first.segments))
            case "Squeeze", "Unsqueeze":
                guard let first, let x = shape(node.inputs[0]), let out = shape(node.outputs[0]) else { continue }
                // The channel axis keeps its place among the axes that are neither removed nor inserted.
                let listed = (node.inputs.count > 1 && !node.inputs[1].isEmpty ? (constant(1) ?? folded(node.inputs[1]))?.asInts.map { Int($0) } : nil)
                    ?? node.attribute("axes")?.value.ints?.map { Int($0) }
                let axis: Int?
                if op == "Squeeze" {
                    let removed = listed.map { $0.map { $0 < 0 ? $0 + x.count : $0 } } ?? (0..<x.count).filter { x[$0] == 1 }
                    axis = removed.contains(first.axis) ? nil : first.axis - removed.filter { $0 < first.axis }.count
                } else {
                    var a = first.axis
                    for i in (listed ?? []).map({ $0 < 0 ? $0 + out.count : $0 }).sorted() where i <= a { a += 1 }
                    axis = a
                }
                guard let axis, axis < out.count, out[axis] == x[first.axis] else {
                    unsupported("squeezes the channel axis")
                    continue
                }
                output(Channels(axis: axis, segments: first.segments))
            case "Flatten", "Reshape":
                guard let first, let x = shape(node.inputs[0]), let out = shape(node.outputs[0]), x.count >= 2 else { continue }
                let axis = first.axis
                if axis == 1, first.segments.allSatisfy({ $0.block == 1 }) {
                    let inner = x[2...].reduce(1, *)
                    if out.count == 2 && out[1] == x[1] * inner && (op != "Flatten" || (node.attribute("axis")?.value.int ?? 1) == 1) {
                        if op == "Reshape" {
                            if inner == 1 {
                                rewrite(node, axis: 1, trailing: [])  // [N, C, 1, 1] → [N, C]
                                output(first)
                                continue
                            }
                            guard let target = constant(1), target.count == 2, target.asInts[1] == -1 else {
                                unsupported("reshapes to a fixed feature count, which would be wrong after pruning")
                                continue
                            }
                        }
                        output(Channels(axis: 1, segments: first.segments.map { Segment(space: $0.space, count: $0.count, factor: $0.factor * inner) }))
                        continue
                    }
                }
                guard op == "Reshape" else {
                    unsupported("reshapes the channel axis")
                    continue
                }
                // The axes before the channel axis are kept as they are (batch, sequence, heads).
                let prefixKept = axis <= out.count && Array(x[..<axis]) == Array(out[..<min(axis, out.count)])
                if prefixKept, axis == x.count - 1, out.count == x.count + 1, first.segments.count == 1, first.plain,
                   out[axis] * out[axis + 1] == x[axis], out[axis] > 1 {
                    // Split into heads: [.., D] → [.., H, D/H]; whole heads go together.
                    let seg = first.segments[0], head = out[axis + 1]
                    requireUnit(seg.space, head)
                    rewrite(node, axis: axis, trailing: [head])
                    output(Channels(axis: axis, segments: [Segment(space: seg.space, count: seg.count, factor: 1, block: head)]))
                } else if prefixKept, out.count == x.count - 1, axis == x.count - 2, first.segments.count == 1,
                          first.segments[0].block == x[axis + 1], first.segments[0].factor == 1, out[axis] == x[axis] * x[axis + 1] {
                    // Heads merged back: [.., H, D/H] → [.., D].
                    rewrite(node, axis: axis, trailing: [])
                    output(Channels(axis: axis, segments: [Segment(space: first.segments[0].space, count: first.segments[0].count, factor: 1)]))
                } else if prefixKept, axis < out.count, out[axis...] == x[axis...] {
                    rewrite(node, axis: axis, trailing: out[(axis + 1)...])
                    output(first)
                } else {
                    unsupported("reshapes the channel axis")
                }
            case "Shape", "Size":
                // Reading a size follows the pruned size at run time; the reshapes whose targets are computed from it
                // are rewritten (`reshapeRewrites`), and the final shape check catches anything else.
                continue
            case "Gather":
                guard let data = first ?? nil, let x = shape(node.inputs[0]), let idx = shape(node.inputs[1]) else {
                    continue
                }
                let raw = Int(node.attribute("axis")?.value.int ?? 0)
                let axis = raw < 0 ? raw + x.count : raw
                guard axis != data.axis else {
                    unsupported("gathers along the channel axis")
                    continue
                }
                output(Channels(axis: axis < data.axis ? data.axis - 1 + idx.count : data.axis, segments: data.segments))
            case "Slice":
                guard let first else { continue }
                let axesValue = node.inputs.count > 3 && !node.inputs[3].isEmpty ? (constant(3) ?? folded(node.inputs[3]))?.asInts : nil
                let rank = shape(node.inputs[0])?.count ?? 0
                let sliced = (axesValue ?? (0..<Int64(rank)).map { $0 }).map { Int($0) < 0 ? Int($0) + rank : Int($0) }
                if let x = shape(node.inputs[0]), let out = shape(node.outputs[0]), x[first.axis] == out[first.axis]
                    || !sliced.contains(first.axis) {
                    output(first)
                } else {
                    unsupported("slices the channel axis")
                }
            default:
                unsupported("reads the channels, and Whittle does not know how \(op) maps them")
            }
        }
        for output in graph.outputs {
            freezeAll(channels[output.name], "they reach graph output '\(output.name)'")
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
            let lastAxis = activationTensors[s].isEmpty && tensors[s].isEmpty
            let statistics = activationTensors[s].last ?? tensors[s].last ?? lastAxisTensors[s].last
            var group = ChannelGroup(id: groups.count, channels: sizes[s], producers: names, members: members[s],
                                     tensors: tensors[s], statisticsTensor: statistics, frozenReason: frozenReason)
            group.statisticsOnLastAxis = lastAxis && statistics != nil
            group.unit = units[s]
            if frozenReason == nil, sizes[s] % units[s] != 0 || sizes[s] / units[s] < 2 {
                group.frozenReason = "its \(sizes[s]) channels go in blocks of \(units[s]) (grouped convolutions or attention heads), too few to remove one"
            }
            groups.append(group)
        }
        // Graph-input spaces carry no parameters of their own; keep them out of reports unless something else joined.
        let inputs = Set(graph.runtimeInputs.map(\.name))
        self.groups = groups.filter { !($0.members.isEmpty && inputs.contains($0.name)) }
        for i in self.groups.indices { self.groups[i].id = i }
        self.groupedNodes = grouped
        self.reshapeRewrites = rewrites
        self.branches = Self.residualBranches(graph, groups: self.groups, shape: shape)
    }

    /// Shapes for the analysis (`ShapeInference.analysisShapes`).
    public static func analysisShapes(_ model: Model) throws -> [String: (DataType, [Int])] {
        try ShapeInference.analysisShapes(model)
    }

    public var prunable: [ChannelGroup] { groups.filter(\.prunable) }
}
