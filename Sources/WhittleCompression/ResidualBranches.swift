import WhittleONNX
import WhittleTensor

/// A residual block's branch that one channel group lives inside: the group's channels are made by `nodes` and read
/// by exactly one layer of them, whose output runs (through batch norm and activations only) into one input of an
/// `Add` whose other input does not depend on the branch. Removing the group whole (keeping 0 of its channels)
/// removes the branch: the block becomes its shortcut (`Add(branch(x), shortcut(x))` → `shortcut(x)`), as in
/// the skippable residual blocks of once-for-all and depth-searching NAS.
public struct ResidualBranch: Sendable, Equatable {
    /// The output of the Add the branch ends in (values, unlike node names, are always named and unique).
    public var add: String
    /// Which input of the Add the branch computes (0 or 1); the other is the shortcut.
    public var branchInput: Int
    /// The branch's nodes, in graph order, by their first output: they are deleted when the group is removed.
    public var nodes: [String]
}

extension ChannelGroups {
    /// Ops a branch may run through between the layer that reads the group and the Add: batch norm and activations
    /// that map 0 to 0, whose other inputs are initializers (so the masked branch, `Pruning.mask`, adds nothing).
    static let branchTail: Set<String> = ["BatchNormalization", "Relu", "LeakyRelu", "Clip", "HardSwish", "Tanh", "Elu",
                                          "Selu", "Gelu", "Identity", "Dropout"]

    /// The residual branch of each prunable group that has one (see `ResidualBranch`).
    static func residualBranches(_ graph: Graph, groups: [ChannelGroup], shape: (String) -> [Int]?) -> [Int: ResidualBranch] {
        let index = GraphIndex(graph)
        var out: [Int: ResidualBranch] = [:]
        for g in groups where g.prunable {
            if let branch = residualBranch(g, graph: graph, index: index, shape: shape) { out[g.id] = branch }
        }
        return out
    }

    static func residualBranch(_ g: ChannelGroup, graph: Graph, index: GraphIndex, shape: (String) -> [Int]?) -> ResidualBranch? {
        let nodes = graph.nodes
        // Members name their nodes; an unnamed reader cannot be told apart from other unnamed nodes.
        let readers = Set(g.members.filter { $0.role == .inputWeights }.map(\.node))
        guard readers.count == 1, let name = readers.first, !name.isEmpty,
              nodes.filter({ $0.name == name }).count == 1, let reader = nodes.firstIndex(where: { $0.name == name }),
              ["Conv", "Gemm", "MatMul"].contains(nodes[reader].opType) else { return nil }
        // Upstream: the nodes writing the group's activation tensors; every reader of those tensors is one of them
        // or the reading layer (nothing outside the branch sees the channels).
        let carried = Set(g.tensors)
        guard !carried.isEmpty else { return nil }
        var inside = Set<Int>()
        for t in carried {
            guard let p = index.producer[t], !index.graphOutputs.contains(t) else { return nil }
            inside.insert(p)
        }
        for t in carried {
            for r in index.readers[t] ?? [] where r != reader && !inside.contains(r) { return nil }
        }
        guard nodes[reader].inputs.first.map({ carried.contains($0) }) == true else { return nil }
        inside.insert(reader)
        // Downstream: one reader at a time, through per-channel ops, to an Add.
        var tensor = nodes[reader].outputs.first ?? ""
        var add: Int?
        for _ in 0..<16 {
            guard !tensor.isEmpty, !index.graphOutputs.contains(tensor), let next = index.readers[tensor], next.count == 1 else { return nil }
            let n = nodes[next[0]]
            if n.opType == "Add" {
                add = next[0]
                break
            }
            guard Self.branchTail.contains(n.opType), n.inputs.first == tensor,
                  n.inputs.dropFirst().allSatisfy({ $0.isEmpty || index.initializers[$0] != nil }),
                  n.outputs.filter({ !$0.isEmpty }).count == 1 else { return nil }
            inside.insert(next[0])
            tensor = n.outputs[0]
        }
        guard let add, nodes[add].inputs.count == 2, nodes[add].inputs[0] != nodes[add].inputs[1] else { return nil }
        let branchInput = nodes[add].inputs[0] == tensor ? 0 : 1
        let shortcut = nodes[add].inputs[1 - branchInput]
        // The shortcut alone has the Add's shape (no broadcast the branch supplied) and does not depend on the branch.
        guard let s = shape(shortcut), let o = shape(nodes[add].outputs[0]), s == o else { return nil }
        var ancestors = Set<Int>(), stack = [shortcut]
        while let t = stack.popLast() {
            guard let p = index.producer[t], ancestors.insert(p).inserted else { continue }
            if inside.contains(p) { return nil }
            stack += nodes[p].inputs.filter { !$0.isEmpty }
        }
        return ResidualBranch(add: nodes[add].outputs[0], branchInput: branchInput, nodes: inside.sorted().map { nodes[$0].outputs[0] })
    }
}
