import WhittleNN
import WhittleONNX
import WhittleTensor

/// One layer of a latency table: a node with MACs and a constant weight (Conv, Gemm, MatMul), timed alone — with
/// the batch norm and activation the runtime fuses into it — at a grid of output and input channel counts.
public struct LayerLatency: Codable, Sendable, Equatable {
    /// The node's name (its first output when unnamed) and op.
    public var node: String
    public var opType: String
    /// Output channels timed, ascending.
    public var outputs: [Int]
    /// Input channels timed, ascending (one entry when the input is fixed or tied to the output, as in a depthwise
    /// convolution).
    public var inputs: [Int]
    /// Median milliseconds, `[output index][input index]`.
    public var milliseconds: [[Double]]

    public init(node: String, opType: String, outputs: [Int], inputs: [Int], milliseconds: [[Double]]) {
        self.node = node
        self.opType = opType
        self.outputs = outputs
        self.inputs = inputs
        self.milliseconds = milliseconds
    }

    /// The table made non-decreasing along both axes (each point the largest time of the points at or below it):
    /// noise that makes a wider layer look faster than a narrower one would otherwise be a hole the search finds and
    /// exploits, and the search would pick architectures whose latency is underestimated. (A width the kernels
    /// block well can be truly faster than a narrower one; the envelope then overestimates it a little.)
    public var monotone: LayerLatency {
        var out = self
        for r in milliseconds.indices {
            for c in milliseconds[r].indices {
                var m = milliseconds[r][c]
                if r > 0 { m = max(m, out.milliseconds[r - 1][c]) }
                if c > 0 { m = max(m, out.milliseconds[r][c - 1]) }
                out.milliseconds[r][c] = m
            }
        }
        return out
    }

    /// Bilinear interpolation between the timed points (clamped to the grid): exact for a cost that is bilinear in
    /// the two channel counts, as a convolution's MACs are.
    public func predict(outputs o: Int, inputs i: Int) -> Double {
        func bracket(_ grid: [Int], _ v: Int) -> (Int, Int, Double) {
            guard grid.count > 1 else { return (0, 0, 0) }
            let x = min(max(v, grid[0]), grid[grid.count - 1])
            let upper = grid.firstIndex { $0 >= x } ?? grid.count - 1
            guard upper > 0 else { return (0, 0, 0) }
            let lower = upper - 1
            let t = Double(x - grid[lower]) / Double(max(grid[upper] - grid[lower], 1))
            return (lower, upper, t)
        }
        let (r0, r1, tr) = bracket(outputs, o)
        let (c0, c1, tc) = bracket(inputs, i)
        let m = milliseconds
        let top = m[r0][c0] * (1 - tc) + m[r0][c1] * tc
        let bottom = m[r1][c0] * (1 - tc) + m[r1][c1] * tc
        return top * (1 - tr) + bottom * tr
    }
}

/// How long a model's architectures take on one machine: a latency per layer at a grid of widths, and end-to-end
/// times of the uniform architectures at the same grid positions (`anchors`), from which `LatencyModel` fits how
/// the layers' sum relates to the whole (what the layers leave out: pooling, residual additions, copies, dispatch;
/// and a layer timed alone is not exactly a layer among others). Built once per kind of machine (`machine`,
/// `threads`) and batch size, and kept: `mismatch` tells whether a stored table still describes a model and a
/// machine.
public struct LatencyTable: Codable, Sendable, Equatable {
    /// An end-to-end time: the uniform architecture at `fraction` of every group's ladder (0 the narrowest, 1 the
    /// original).
    public struct Anchor: Codable, Sendable, Equatable {
        public var fraction: Double
        public var milliseconds: Double
        public init(fraction: Double, milliseconds: Double) {
            self.fraction = fraction
            self.milliseconds = milliseconds
        }
    }

    /// The CPU's instruction set as the runtime reports it (`Kernels.cpuInstructionSet`) and the compute threads.
    public var machine: String
    public var threads: Int
    public var batch: Int
    public var layers: [LayerLatency]
    /// Ascending fractions; the last is the original (1).
    public var anchors: [Anchor]

    public init(machine: String, threads: Int, batch: Int, layers: [LayerLatency], anchors: [Anchor]) {
        self.machine = machine
        self.threads = threads
        self.batch = batch
        self.layers = layers
        self.anchors = anchors
    }

    /// The original model's end-to-end time.
    public var fullMilliseconds: Double { anchors.last?.milliseconds ?? 0 }

    /// The median of `v` (at least one value; the mean of the middle two for an even count).
    /// The median (the mean of the middle two for an even count); `v` must not be empty.
    public static func median(_ v: [Double]) -> Double {
        let s = v.sorted()
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }

    /// The board kind a table describes.
    public var kind: String { Self.kind(machine: machine, threads: threads) }

    /// A kind of board: the instruction set its kernels use and the threads its jobs run on.
    public static func kind(machine: String, threads: Int) -> String { "\(machine), \(threads) threads" }

    /// Several boards' tables of one kind (the same machine, threads, batch, layers, grid and anchors) as one: each
    /// point the median of the boards' times (the mean of the middle two for an even count). Nil for no table;
    /// throws when they do not describe the same grid.
    public static func merged(_ tables: [LatencyTable]) throws -> LatencyTable? {
        guard var out = tables.first else { return nil }
        for t in tables.dropFirst() {
            guard t.machine == out.machine, t.threads == out.threads, t.batch == out.batch,
                  t.layers.map({ [$0.node, "\($0.outputs)", "\($0.inputs)"] }) == out.layers.map({ [$0.node, "\($0.outputs)", "\($0.inputs)"] }),
                  t.anchors.map(\.fraction) == out.anchors.map(\.fraction) else {
                throw CompressionError(.incompatibleStatistics, "latency tables of \(out.kind) disagree in their grid")
            }
        }
        for l in out.layers.indices {
            for r in out.layers[l].milliseconds.indices {
                for c in out.layers[l].milliseconds[r].indices { out.layers[l].milliseconds[r][c] = Self.median(tables.map { $0.layers[l].milliseconds[r][c] }) }
            }
            out.layers[l] = out.layers[l].monotone
        }
        for a in out.anchors.indices { out.anchors[a].milliseconds = Self.median(tables.map { $0.anchors[a].milliseconds }) }
        return out
    }

    /// Whether this table was built for `model`'s layers and grid (`expected`, from `LatencyModel.grid`) on
    /// `machine` with `threads` at `batch`; nil when it matches, else the reason.
    public func mismatch(machine: String, threads: Int, batch: Int, expected: [LayerLatency]) -> String? {
        if machine != self.machine { return "built on \(self.machine), this machine is \(machine)" }
        if threads != self.threads { return "built with \(self.threads) threads, not \(threads)" }
        if batch != self.batch { return "built at batch \(self.batch), not \(batch)" }
        let mine = layers.map { [$0.node, $0.opType, "\($0.outputs)", "\($0.inputs)"] }
        let theirs = expected.map { [$0.node, $0.opType, "\($0.outputs)", "\($0.inputs)"] }
        if mine != theirs { return "built for other layers or widths" }
        return nil
    }
}

/// Predicts an architecture's latency from a `LatencyTable`: the sum of its layers' interpolated latencies at their
/// channel counts, plus the work outside the layers, linear in the layers' activation elements between the two
/// end-to-end measurements. Pure: it reads the table and shapes only.
public struct LatencyModel: Sendable {
    /// A layer of the base model as the table keys it.
    struct Layer: Sendable {
        var node: Int
        var name: String
        var opType: String
        var weight: String
        var weightShape: [Int]
        /// The weight axes holding the output and input channels.
        var outputAxis: Int
        var inputAxis: Int
        /// A grouped convolution (depthwise among them): its groups follow its output channels, so its input
        /// channels are tied to them.
        var grouped: Bool
        var baseOutputs: Int
        var baseInputs: Int
        /// Output elements per output channel for one sample.
        var positions: Int
    }

    let costs: CostModel
    let layers: [Layer]
    public let table: LatencyTable
    let byName: [String: LayerLatency]
    /// The fit of the anchors' end-to-end times: `layers · Σ layer times + constant + perElement · activation
    /// elements` (least squares; see `fit`).
    public private(set) var fit = (layers: 1.0, constant: 0.0, perElement: 0.0)
    /// Every prediction is multiplied by this: the machine's speed now against when the table was measured (the
    /// original's end-to-end time now over the table's), so a table kept from another day (another host load,
    /// another clock speed) is re-anchored by one measurement.
    public var scale = 1.0

    /// The layers of `model` a table times (every Conv, Gemm and MatMul whose weight is an initializer).
    static func layers(of model: Model) throws -> [Layer] {
        let inferred = try ShapeInference.infer(model.graph, opset: model.defaultOpset ?? 13,
                                                inputs: try ShapeInference.inputShapes(model, batchSize: 1))
        let initializers = model.graph.initializerIndex
        var out: [Layer] = []
        for (i, ctx) in inferred.contexts.enumerated() where inferred.macs[i] > 0 && !inferred.folded[i] {
            let node = ctx.node
            guard ["Conv", "Gemm", "MatMul"].contains(node.opType), node.inputs.count > 1,
                  let w = initializers[node.inputs[1]] else { continue }
            let shape = model.graph.initializers[w].shape
            guard shape.count >= 2, let result = inferred.outputs[i].first else { continue }
            let (outputAxis, inputAxis): (Int, Int)
            switch node.opType {
            case "Conv": (outputAxis, inputAxis) = (0, 1)
            case "Gemm": (outputAxis, inputAxis) = node.attribute("transB")?.value.int == 1 ? (0, 1) : (1, 0)
            default:
                guard shape.count == 2 else { continue }
                (outputAxis, inputAxis) = (1, 0)
            }
            let group = Int(node.attribute("group")?.value.int ?? 1)
            let baseOutputs = shape[outputAxis]
            let baseInputs = node.opType == "Conv" ? shape[1] * group : shape[inputAxis]
            out.append(Layer(node: i, name: node.name.isEmpty ? node.outputs.first ?? "?" : node.name, opType: node.opType,
                             weight: node.inputs[1], weightShape: shape, outputAxis: outputAxis, inputAxis: inputAxis,
                             grouped: node.opType == "Conv" && group > 1, baseOutputs: baseOutputs, baseInputs: baseInputs,
                             positions: result.shape.reduce(1, *) / max(baseOutputs, 1)))
        }
        return out
    }

    /// A layer's output and input channels in `widths`.
    func channels(_ l: Layer, widths: [Int]) -> (outputs: Int, inputs: Int) { Self.channels(l, widths: widths, costs: costs) }

    static func channels(_ l: Layer, widths: [Int], costs: CostModel) -> (outputs: Int, inputs: Int) {
        let o = costs.size(of: l.weight, axis: l.outputAxis, widths: widths, base: l.baseOutputs)
        if l.grouped { return (o, max(1, o * l.baseInputs / max(l.baseOutputs, 1))) }
        return (o, costs.size(of: l.weight, axis: l.inputAxis, widths: widths, base: l.baseInputs))
    }

    /// The uniform architecture at `fraction` of every group's ladder of kept widths (no block skipped).
    static func uniform(_ space: SearchSpace, fraction: Double) -> Architecture {
        Architecture(levels: space.dimensions.map { d in
            d.narrowestKept + Int((fraction * Double(d.widths.count - 1 - d.narrowestKept)).rounded())
        })
    }

    /// The ladder fractions of the grid and the anchors: `points` evenly spaced from 0 to 1.
    static func fractions(_ points: Int) -> [Double] {
        (0..<max(points, 2)).map { Double($0) / Double(max(points, 2) - 1) }
    }

    /// The grid each layer is timed at (the table's layers, without times): the channel counts of the uniform
    /// architectures at `points` evenly spaced ladder positions, from the narrowest to the full one.
    static func grid(layers: [Layer], costs: CostModel, points: Int) -> [LayerLatency] {
        let architectures = fractions(points).map { uniform(costs.space, fraction: $0) }
        return layers.map { l in
            let sizes = architectures.map { channels(l, widths: costs.widths($0), costs: costs) }
            let outputs = Array(Set(sizes.map(\.outputs))).sorted()
            let inputs = l.grouped ? [l.baseInputs] : Array(Set(sizes.map(\.inputs))).sorted()
            return LayerLatency(node: l.name, opType: l.opType, outputs: outputs, inputs: inputs, milliseconds: [])
        }
    }

    init(costs: CostModel, layers: [Layer], table: LatencyTable) {
        self.costs = costs
        self.layers = layers
        self.table = table
        byName = Dictionary(table.layers.map { ($0.node, $0) }, uniquingKeysWith: { a, _ in a })
        guard table.layers.count == layers.count, !table.anchors.isEmpty else { return }
        let rows = table.anchors.map { anchor -> (Double, Double, Double) in
            let a = Self.uniform(costs.space, fraction: anchor.fraction)
            return (layerMilliseconds(widths: costs.widths(a)), Double(activationElements(a)), anchor.milliseconds)
        }
        fit = Self.fit(rows)
    }

    /// Least squares of `time ≈ g · layers + c + e · elements` over the anchors, with the layers' factor `g` kept
    /// positive: when the three-term fit is degenerate or gives `g ≤ 0`, `g` is fixed at 1 and the rest is a line
    /// in the elements (or a constant).
    public static func fit(_ rows: [(layers: Double, elements: Double, time: Double)]) -> (layers: Double, constant: Double, perElement: Double) {
        func solve(_ a: [[Double]], _ b: [Double]) -> [Double]? {
            // Normal equations, Gaussian elimination with partial pivoting.
            let n = a[0].count
            var m = (0..<n).map { i in (0..<n).map { j in a.indices.reduce(0.0) { $0 + a[$1][i] * a[$1][j] } } + [a.indices.reduce(0.0) { $0 + a[$1][i] * b[$1] }] }
            for col in 0..<n {
                guard let pivot = (col..<n).max(by: { abs(m[$0][col]) < abs(m[$1][col]) }), abs(m[pivot][col]) > 1e-12 * max(1, abs(m[col][col])) else { return nil }
                m.swapAt(col, pivot)
                for r in 0..<n where r != col {
                    let f = m[r][col] / m[col][col]
                    for c in col...n { m[r][c] -= f * m[col][c] }
                }
            }
            return (0..<n).map { m[$0][n] / m[$0][$0] }
        }
        if rows.count >= 3, let x = solve(rows.map { [$0.layers, 1, $0.elements] }, rows.map(\.time)), x[0] > 0, x.allSatisfy(\.isFinite) {
            return (x[0], x[1], x[2])
        }
        let rest = rows.map { $0.time - $0.layers }
        if rows.count >= 2, let x = solve(rows.map { [1, $0.elements] }, rest), x.allSatisfy(\.isFinite) { return (1, x[0], x[1]) }
        return (1, rest.reduce(0, +) / Double(max(rest.count, 1)), 0)
    }

    /// A model of `base`'s architectures from a table built for it (`LatencyTableBuilder`, or a stored one that
    /// `mismatch` accepted).
    public init(base: Model, costs: CostModel, table: LatencyTable) throws {
        let layers = try Self.layers(of: base)
        for l in layers where !table.layers.contains(where: { $0.node == l.name }) {
            throw CompressionError(.invalidArgument, "the latency table has no entry for \(l.opType) node '\(l.name)'")
        }
        self.init(costs: costs, layers: layers, table: table)
    }

    /// The layers' activation elements (output channels times positions, one sample) of `a`.
    public func activationElements(_ a: Architecture) -> Int {
        let widths = costs.widths(a)
        return layers.reduce(0) { sum, l in
            let (o, i) = channels(l, widths: widths)
            return i == 0 ? sum : sum + o * l.positions  // a layer without inputs is in a skipped block
        }
    }

    /// The layers' summed latency in `a`, milliseconds.
    func layerMilliseconds(widths: [Int]) -> Double {
        layers.reduce(0.0) { sum, l in
            let (o, i) = channels(l, widths: widths)
            guard o > 0, i > 0 else { return sum }  // in a skipped block
            let entry = byName[l.name]!
            return sum + entry.predict(outputs: o, inputs: l.grouped ? entry.inputs[0] : i)
        }
    }

    /// Predicted latency of `a` at the table's batch, milliseconds (never negative).
    public func predict(_ a: Architecture) -> Double {
        let layers = layerMilliseconds(widths: costs.widths(a))
        return scale * max(0, fit.layers * layers + fit.constant + fit.perElement * Double(activationElements(a)))
    }
}

/// Builds a `LatencyTable` on this machine: each layer alone at every grid point, and the full and narrowest
/// architectures end to end. How one run is timed is the caller's (`measure`: median milliseconds of a session on
/// its inputs, `LatencyProbe.median` on a real clock), so building stays testable without a clock.
public struct LatencyTableBuilder {
    public var batch = 1
    /// Grid points per channel axis (from the narrowest to the full width).
    public var points = 6
    /// Passes over every point (each point's figure is the median of its passes).
    public var passes = 3
    public var machine: String
    public var threads: Int
    public var measure: (InferenceSession, [String: Tensor]) throws -> Double

    public init(machine: String, threads: Int, measure: @escaping (InferenceSession, [String: Tensor]) throws -> Double) {
        self.machine = machine
        self.threads = threads
        self.measure = measure
    }

    /// The grid `build` would time for `base` (what a stored table is compared with).
    public func grid(base: Model, costs: CostModel) throws -> [LayerLatency] {
        LatencyModel.grid(layers: try LatencyModel.layers(of: base), costs: costs, points: points)
    }

    /// The uniform architectures at `points` ladder fractions (the table's anchors), as widths per group name.
    public func anchors(costs: CostModel) -> [(fraction: Double, widths: [String: Int])] {
        LatencyModel.fractions(points).map { ($0, costs.space.describe(LatencyModel.uniform(costs.space, fraction: $0))) }
    }

    /// Times every layer of `base` over its grid and the anchors end to end (`model`: the pruned model of an
    /// architecture). `progress` sees (points timed, points to time).
    public func build(base: Model, costs: CostModel, model: (Architecture) throws -> Model,
                      progress: ((Int, Int) -> Void)? = nil) throws -> LatencyTable {
        let fractions = LatencyModel.fractions(points)
        let anchors = try fractions.map { f in (f, f == 1 ? base : try model(LatencyModel.uniform(costs.space, fraction: f))) }
        return try build(base: base, anchors: anchors, progress: progress)
    }

    /// The grid a table over `anchors` has: each layer's channel counts in each anchor (no time in it).
    public func grid(base: Model, anchors: [Model]) throws -> [LayerLatency] {
        let layers = try LatencyModel.layers(of: base)
        guard !layers.isEmpty else {
            throw CompressionError(.invalidArgument, "the model has no Conv, Gemm or MatMul with a constant weight to time")
        }
        let inAnchors = try anchors.map { a in Dictionary(try LatencyModel.layers(of: a).map { ($0.name, $0) }, uniquingKeysWith: { x, _ in x }) }
        return try layers.map { l in
            let sizes = try inAnchors.map { found -> (Int, Int) in
                guard let m = found[l.name] else {
                    throw CompressionError(.invalidArgument, "an anchor of the latency table lacks \(l.opType) node '\(l.name)'")
                }
                return (m.baseOutputs, m.baseInputs)
            }
            return LayerLatency(node: l.name, opType: l.opType, outputs: Array(Set(sizes.map(\.0))).sorted(),
                                inputs: l.grouped ? [l.baseInputs] : Array(Set(sizes.map(\.1))).sorted(), milliseconds: [])
        }
    }

    /// Whether a kept table is one `build` would have made here over `anchors`' grid: this machine, threads and
    /// batch, the same layers and channel counts, and a positive, finite time at every point.
    public func fits(_ table: LatencyTable, grid: [LayerLatency], anchors: Int) -> Bool {
        func plausible(_ v: Double) -> Bool { v.isFinite && v > 0 }
        return table.machine == machine && table.threads == threads && table.batch == batch && table.anchors.count == anchors
            && table.anchors.allSatisfy { plausible($0.milliseconds) } && table.layers.count == grid.count
            && zip(table.layers, grid).allSatisfy { t, g in
                t.node == g.node && t.opType == g.opType && t.outputs == g.outputs && t.inputs == g.inputs
                    && t.milliseconds.count == g.outputs.count && t.milliseconds.allSatisfy { $0.count == g.inputs.count && $0.allSatisfy(plausible) }
            }
    }

    /// Times every layer of `base` at the channel counts it has in the anchor models (pruned copies of `base`, the
    /// uniform architectures at `fraction` of the ladder, ascending, the last `base` itself), and the anchors end to
    /// end. A worker builds its table this way from the anchors' widths alone.
    public func build(base: Model, anchors: [(fraction: Double, model: Model)],
                      progress: ((Int, Int) -> Void)? = nil) throws -> LatencyTable {
        guard batch >= 1, passes >= 1, anchors.count >= 2 else {
            throw CompressionError(.invalidArgument, "a latency table needs batch ≥ 1, at least 2 anchors and a pass")
        }
        let layers = try LatencyModel.layers(of: base)
        let grid = try self.grid(base: base, anchors: anchors.map(\.model))
        let fractions = anchors.map(\.fraction)
        let inferred = try ShapeInference.infer(base.graph, opset: base.defaultOpset ?? 13,
                                                inputs: try ShapeInference.inputShapes(base, batchSize: batch))
        // Every point to time: each layer at each grid point, then the uniform architectures end to end.
        enum Point { case layer(Int, Int, Int), anchor(Int) }
        var schedule: [Point] = []
        for (k, entry) in grid.enumerated() {
            for (r, _) in entry.outputs.enumerated() { for (c, _) in entry.inputs.enumerated() { schedule.append(.layer(k, r, c)) } }
        }
        schedule += fractions.indices.map { .anchor($0) }
        func endToEnd(_ m: Model) throws -> Double {
            let shapes = try ShapeInference.inputShapes(m, batchSize: batch)
            var inputs: [String: Tensor] = [:]
            for (name, (_, shape)) in shapes { inputs[name] = Self.filler(shape) }
            return try measure(try InferenceSession(model: m), inputs)
        }
        // `passes` passes over all points, alternately forward and backward, each point's figure the median of its
        // passes: a machine whose speed drifts (a shared host, a warming CPU) then shifts every point alike instead
        // of bending the table.
        var figures = [[Double]](repeating: [], count: schedule.count)
        for pass in 0..<passes {
            for index in (pass % 2 == 0 ? Array(schedule.indices) : schedule.indices.reversed()) {
                progress?(pass * schedule.count + (pass % 2 == 0 ? index : schedule.count - 1 - index), passes * schedule.count)
                switch schedule[index] {
                case let .layer(k, r, c):
                    let (m, inputs) = try Self.layerModel(layers[k], base: base, inferred: inferred,
                                                          outputs: grid[k].outputs[r], inputs: grid[k].inputs[c])
                    figures[index].append(try measure(try InferenceSession(model: m), inputs))
                case let .anchor(k): figures[index].append(try endToEnd(anchors[k].model))
                }
            }
        }
        progress?(passes * schedule.count, passes * schedule.count)
        var timed = grid
        for k in timed.indices {
            timed[k].milliseconds = timed[k].outputs.map { _ in [Double](repeating: 0, count: timed[k].inputs.count) }
        }
        var ends: [Double] = []
        for (index, point) in schedule.enumerated() {
            if case let .layer(k, r, c) = point { timed[k].milliseconds[r][c] = LatencyTable.median(figures[index]) } else { ends.append(LatencyTable.median(figures[index])) }
        }
        timed = timed.map(\.monotone)
        return LatencyTable(machine: machine, threads: threads, batch: batch, layers: timed,
                            anchors: zip(fractions, ends).map { LatencyTable.Anchor(fraction: $0, milliseconds: $1) })
    }

    /// `model`'s median milliseconds end to end at `batch` on filler inputs (`probe` times it).
    public static func endToEnd(_ model: Model, batch: Int, probe: LatencyProbe) throws -> Double {
        var inputs: [String: Tensor] = [:]
        for (name, (_, shape)) in try ShapeInference.inputShapes(model, batchSize: batch) { inputs[name] = filler(shape) }
        return try probe.median(try InferenceSession(model: model), inputs: inputs)
    }

    /// Deterministic non-zero values (a kernel may take shortcuts on zeros).
    static func filler(_ shape: [Int]) -> Tensor {
        let n = shape.reduce(1, *)
        return Tensor(shape: shape, floats: (0..<n).map { Float(($0 * 7919) % 251) / 251 - 0.5 })
    }

    /// One layer of `base` alone, at `outputs` × `inputs` channels, with the batch normalization and activation
    /// that follow it (the runtime fuses them into the layer), and an input to run it on.
    static func layerModel(_ l: LatencyModel.Layer, base: Model, inferred: InferredGraph, outputs o: Int,
                           inputs i: Int) throws -> (Model, [String: Tensor]) {
        let nodes = base.graph.nodes
        let ctx = inferred.contexts[l.node]
        guard let input = ctx.inputs.first ?? nil else {
            throw CompressionError(.invalidArgument, "\(l.opType) node '\(l.name)' has no input shape")
        }
        var inputShape = input.shape
        var node = ctx.node
        var weightShape = l.weightShape
        weightShape[l.outputAxis] = o
        var group = 1
        if l.opType == "Conv" {
            inputShape[1] = i
            if l.grouped {
                // The groups follow the output channels (`i` is ignored).
                let perGroup = l.weightShape[1]
                group = max(1, o * l.baseInputs / max(l.baseOutputs, 1) / max(perGroup, 1))
                inputShape[1] = group * perGroup
                node.attributes.removeAll { $0.name == "group" }
                node.attributes.append(Attribute("group", .int(Int64(group))))
            } else {
                weightShape[1] = i
            }
        } else {
            inputShape[inputShape.count - 1] = i
            weightShape[l.inputAxis] = i
        }
        var initializers = [Initializer(name: "w", tensor: filler(weightShape))]
        var inputs = ["x", "w"]
        if node.inputs.count > 2, !node.inputs[2].isEmpty {
            initializers.append(Initializer(name: "b", tensor: filler([o])))
            inputs.append("b")
        }
        node.inputs = inputs
        node.outputs = ["y0"]
        var chain = [node]
        // The nodes the runtime fuses into a layer: a batch normalization (Conv only), then an activation, each the
        // sole reader of the value before it.
        var readers: [String: [Int]] = [:]
        for (k, n) in nodes.enumerated() { for v in n.inputs where !v.isEmpty { readers[v, default: []].append(k) } }
        let graphOutputs = Set(base.graph.outputs.map(\.name))
        var value = ctx.node.outputs.first ?? ""
        func soleReader(_ v: String) -> Node? {
            guard !graphOutputs.contains(v), let r = readers[v], r.count == 1 else { return nil }
            return nodes[r[0]]
        }
        let constants = base.graph.initializerIndex
        if l.opType == "Conv", let bn = soleReader(value), bn.opType == "BatchNormalization" {
            var n = bn
            n.inputs = ["y0"] + (1..<min(bn.inputs.count, 5)).map { "bn\($0)" }
            n.outputs = ["y1"]
            n.attributes.removeAll { $0.name == "training_mode" }
            for k in 1..<min(bn.inputs.count, 5) {
                // scale, bias, mean, variance: values a trained normalization could have (the variance positive).
                initializers.append(Initializer(name: "bn\(k)", tensor: Tensor(shape: [o], floats: [Float](repeating: k == 4 ? 1 : 0.5, count: o))))
            }
            chain.append(n)
            value = bn.outputs.first ?? ""
        }
        if let act = soleReader(value), ["Relu", "LeakyRelu", "HardSwish", "Sigmoid", "Tanh", "Clip", "Elu", "Gelu"].contains(act.opType) {
            var n = act
            n.outputs = ["y\(chain.count)"]
            var actInputs = ["y\(chain.count - 1)"]
            for (k, extra) in act.inputs.enumerated().dropFirst() {
                guard !extra.isEmpty, let c = constants[extra], let t = base.graph.initializers[c].tensor else {
                    actInputs.append("")
                    continue
                }
                initializers.append(Initializer(name: "a\(k)", tensor: t))
                actInputs.append("a\(k)")
            }
            while actInputs.last == "" { actInputs.removeLast() }
            n.inputs = actInputs
            chain.append(n)
        }
        let output = chain.last!.outputs[0]
        let graph = Graph(name: "layer", nodes: chain,
                          inputs: [ValueInfo(name: "x", elementType: .float, shape: inputShape.map { .value($0) })],
                          outputs: [ValueInfo(name: output, elementType: .float, shape: nil)],
                          initializers: initializers)
        return (Model(graph: graph, opset: base.defaultOpset ?? 13), ["x": filler(inputShape)])
    }
}
