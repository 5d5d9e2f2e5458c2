import WhittleNN
import WhittleONNX
import WhittleTensor

/// One tensor's quantization in an exported model.
public struct QuantizedTensor: Sendable, Codable, Equatable {
    public enum Role: String, Sendable, Codable { case activation, weight, bias }
    public var name: String
    public var role: Role
    public var type: String
    /// The calibrated (activations) or observed (weights) range the parameters were computed from.
    public var min: Float?
    public var max: Float?
    public var scales: [Float]
    public var zeroPoints: [Int64]
    /// The per-channel axis, nil for per-tensor; for blocked int4 weights the axis the blocks run along.
    public var axis: Int?
    /// Blocked int4 weights: the block size (their scales, one per block, are not listed).
    public var blockSize: Int?
    /// For activations whose parameters are shared with another tensor (outputs of Reshape, MaxPool…).
    public var sharedWith: String?
}

/// The precision a weighted node ended with.
public struct QuantizedLayer: Sendable, Codable, Equatable {
    public var node: String
    public var opType: String
    public var precision: LayerPrecision
}

/// What `QDQExport` did: per layer precision and per tensor parameters.
public struct QuantizationSummary: Sendable, Codable {
    public var mode: QuantizationMode
    public var calibration: CalibrationMethod
    public var percentile: Double?
    public var perChannel: Bool
    public var activationType: String
    public var symmetricActivations: Bool
    public var reduceRange: Bool
    public var opset: Int64
    public var layers: [QuantizedLayer]
    public var tensors: [QuantizedTensor]
    /// Nodes removed because their quantized output range does their work (Relu/Clip after a quantized producer).
    public var removedNodes: [String]
    /// Biases whose int32 values were clipped (the bias is too large for s_input · s_weight).
    public var clippedBiases: [String]
    /// int4 weights: `qdq` or `matmulnbits`, and the block size (nil: per output channel).
    public var int4Format: Int4Format?
    public var int4BlockSize: Int?
}

/// Writes a quantized model in ONNX's QDQ format, with QuantizeLinear/DequantizeLinear placed as onnxruntime's
/// QDQ quantizer (`quantize_static`, `QuantFormat.QDQ`) places them, so onnxruntime's graph optimizer turns
/// DQ → Conv → Q into QLinearConv and so on:
/// - Conv, Gemm: input and output activations get a Q→DQ pair; weights are stored quantized (int8 symmetric, per
///   output channel or per tensor) behind a lone DequantizeLinear; the bias is int32 with scale `s_in · s_w`.
/// - MatMul: constant operands as weights (per channel on axis 1), the others and the output as activations.
/// - Relu, Clip: skipped when their input is not quantized; with asymmetric activations removed, the producer
///   writing their output directly (the quantized range clips for them); otherwise input and output quantized,
///   the input taking the output's range.
/// - Reshape, Flatten, Transpose, Squeeze, Unsqueeze, MaxPool (opset ≥ 12), AveragePool, Slice, Resize, Gather,
///   Split: when their input is quantized, their outputs share its parameters.
/// - Add, Mul, Concat, GlobalAveragePool, Sigmoid, LeakyRelu, Where: every float input and output quantized.
/// - Softmax, LayerNormalization and GELU (Erf) stay in float, and so does the element-wise op that feeds only a
///   Softmax (an attention mask's Add): onnxruntime's quantizer quantizes Softmax, which with an additive mask of
///   −3.4e38 leaves BERT-style encoders at 0.30 relative error (0.04 with these left in float).
/// Each tensor is quantized once; all its readers read the DequantizeLinear output. The model must have its
/// BatchNormalizations folded (`GraphEditing.foldBatchNormalization`) and `ranges` must cover its activations.
public enum QDQExport {
    static let weightedOps: Set<String> = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
    static let removableActivations: Set<String> = ["Relu", "Clip"]
    static let directOps: Set<String> = ["Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool",
                                         "AveragePool", "Slice", "Resize", "Gather", "Split"]
    static let generalOps: Set<String> = ["Add", "Mul", "Concat", "GlobalAveragePool", "Sigmoid", "LeakyRelu",
                                          "Softmax", "Where"]
    /// Ops whose signature changed between opset 13 and 21, so a model holding them cannot be lifted to 21 for int4.
    static let opsetSensitive: Set<String> = ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                                              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]

    /// The weighted nodes (Conv, Gemm, MatMul with a constant weight operand), in order.
    public static func weightedNodes(_ graph: Graph) -> [Node] {
        let constants = Set(graph.initializers.map(\.name))
        return graph.nodes.filter { node in
            weightedOps.contains(node.opType) && node.inputs.count >= 2
                && (constants.contains(node.inputs[1]) || (node.opType == "MatMul" && constants.contains(node.inputs[0])))
        }
    }

    /// The precision `policy` gives each weighted node, by node name.
    public static func precisions(_ graph: Graph, policy: QuantizationPolicy) throws -> [String: LayerPrecision] {
        let weighted = weightedNodes(graph)
        let names = Set(graph.nodes.map(\.name))
        for name in policy.keepFloat.union(policy.overrides.keys) where !names.contains(name) {
            throw CompressionError(.invalidArgument, "no node is called '\(name)' (named by --keep-float or an override)")
        }
        var out: [String: LayerPrecision] = [:]
        for (i, node) in weighted.enumerated() {
            var p: LayerPrecision
            switch policy.mode {
            case .none: p = .float
            case .int8: p = .int8
            case .int4Weights: p = node.opType.hasPrefix("Conv") ? .float : .int4Weights
            case .mixed: p = i == 0 || i == weighted.count - 1 ? .float : node.opType.hasPrefix("Conv") ? .int8 : .int4Weights
            }
            if let o = policy.overrides[node.name] { p = o }
            if policy.keepFloat.contains(node.name) { p = .float }
            // A grouped transposed convolution's weight axis 1 holds C_out / group channels while its bias holds
            // C_out: per-channel scales would not line up with the bias, so it stays float.
            if node.opType == "ConvTranspose", (node.attribute("group")?.value.int ?? 1) != 1 { p = .float }
            if p == .int4Weights && node.opType.hasPrefix("Conv") {
                throw CompressionError(.invalidArgument, "\(node.label): int4 weight-only quantization is for Gemm and MatMul")
            }
            out[node.name] = p
        }
        return out
    }

    /// The exported QDQ model and what was quantized. `ranges` maps activation tensors to their calibrated
    /// [min, max].
    public static func export(_ model: Model, ranges: [String: (min: Float, max: Float)], policy: QuantizationPolicy)
        throws -> (Model, QuantizationSummary) {
        try export(model, ranges: ranges, policy: policy, activationsOnly: false)
    }

    /// With `activationsOnly`, stops once the activations to quantize are chosen (the summary lists them; the model
    /// is returned unchanged), without quantizing a weight: what `calibrationTensors` needs, at a fraction of the cost.
    static func export(_ model: Model, ranges: [String: (min: Float, max: Float)], policy: QuantizationPolicy,
                       activationsOnly: Bool) throws -> (Model, QuantizationSummary) {
        try policy.check()
        guard var opset = model.defaultOpset else { throw CompressionError(.invalidArgument, "the model imports no default opset") }
        var graph = model.graph
        let inferred = try ShapeInference.infer(graph, opset: opset, inputs: try ShapeInference.analysisShapes(model))
        func isFloat(_ name: String) -> Bool { inferred.values[name]?.dtype == .float }
        let declaredPrecision = try precisions(graph, policy: policy)
        var layerPrecision = declaredPrecision
        var used = Set(graph.initializers.map(\.name)).union(graph.nodes.flatMap { $0.inputs + $0.outputs })
            .union(graph.nodes.map(\.name)).union(graph.inputs.map(\.name))
        var nBitsTensors: [QuantizedTensor] = []
        if policy.int4Format == .matMulNBits {
            // Those layers leave the QDQ pass as float nodes of the rewritten graph.
            let layers = layerPrecision.filter { $0.value == .int4Weights }.map(\.key).sorted()
            nBitsTensors = try rewriteAsMatMulNBits(&graph, layers: Set(layers), blockSize: policy.int4BlockSize ?? 32, used: &used)
            for name in layers { layerPrecision[name] = .float }
        }
        let quantizesActivations = policy.mode == .int8 || policy.mode == .mixed || layerPrecision.values.contains(.int8)
        let usesInt4 = layerPrecision.values.contains(.int4Weights)
        let anyPerChannel = policy.perChannel && layerPrecision.values.contains { $0 != .float }
        if anyPerChannel && opset < 13 {
            throw CompressionError(.invalidArgument,
                "per-channel quantization needs opset 13 or later; the model uses opset \(opset): quantize --per-tensor")
        }
        if usesInt4 && opset < 21 {
            if opset < 13 {
                throw CompressionError(.invalidArgument, "int4 weights need opset 21; the model's opset \(opset) cannot be lifted safely")
            }
            if let node = graph.nodes.first(where: { opsetSensitive.contains($0.opType) }) {
                throw CompressionError(.invalidArgument,
                    "int4 weights need opset 21, and \(node.label) changed meaning between opset \(opset) and 21")
            }
            opset = 21
        }
        var ranges = ranges
        var index = GraphIndex(graph)
        let keepFloat = policy.keepFloat.union(policy.overrides.filter { $0.value == .float }.map(\.key))

        /// Softmax stays in float (as LayerNorm and GELU do, never being quantized), and so does an element-wise op
        /// whose every reader is a Softmax: attention adds its mask there, whose fill value (−10⁴, or float32's
        /// minimum) would take the whole int8 range and round every real score to zero.
        func feedsOnlySoftmax(_ node: Node) -> Bool {
            guard ["Add", "Sub", "Mul", "Div", "Where"].contains(node.opType), let out = node.outputs.first,
                  let readers = index.readers[out], !readers.isEmpty, !index.graphOutputs.contains(out) else { return false }
            return readers.allSatisfy { graph.nodes[$0].opType == "Softmax" }
        }
        // The element-wise ops of an erf GELU (Erf → Add(1) → Mul(x) → Mul(½)) stay in float with it.
        var geluParts = Set<String>()
        for erf in graph.nodes where erf.opType == "Erf" {
            var current = erf.outputs[0]
            for op in ["Add", "Mul", "Mul"] {
                guard let readers = index.readers[current], readers.count == 1, graph.nodes[readers[0]].opType == op else { break }
                geluParts.insert(graph.nodes[readers[0]].name)
                current = graph.nodes[readers[0]].outputs[0]
            }
        }
        // A LayerNorm that opsets before 17 spell out (ReduceMean → Sub → Pow → ReduceMean → Add(ε) → Sqrt → Div,
        // then Mul(γ)) stays in float up to its scale, as LayerNormalization does; its output (after β) is quantized
        // like LayerNormalization's.
        var layerNormParts = Set<String>()
        func only(_ value: String, _ op: String) -> Node? {
            guard let readers = index.readers[value], readers.count == 1, graph.nodes[readers[0]].opType == op else { return nil }
            return graph.nodes[readers[0]]
        }
        for mean in graph.nodes where mean.opType == "ReduceMean" {
            guard let readers = index.readers[mean.outputs[0]], readers.count == 1 else { continue }
            let sub = graph.nodes[readers[0]]
            guard sub.opType == "Sub", sub.inputs.count == 2, sub.inputs[0] == mean.inputs[0], sub.inputs[1] == mean.outputs[0],
                  let centredReaders = index.readers[sub.outputs[0]], centredReaders.count == 2 else { continue }
            let centredOps = centredReaders.map { graph.nodes[$0] }
            guard let pow = centredOps.first(where: { $0.opType == "Pow" }), let div = centredOps.first(where: { $0.opType == "Div" }),
                  let variance = only(pow.outputs[0], "ReduceMean"), let epsilon = only(variance.outputs[0], "Add"),
                  let sqrt = only(epsilon.outputs[0], "Sqrt"), div.inputs.count == 2, div.inputs[1] == sqrt.outputs[0] else { continue }
            layerNormParts.formUnion([mean, sub, pow, variance, epsilon, sqrt, div].map(\.name))
            if let scale = only(div.outputs[0], "Mul") { layerNormParts.insert(scale.name) }
        }
        func shouldQuantize(_ node: Node) -> Bool {
            if let p = layerPrecision[node.name] { return p != .float }
            if node.opType == "Softmax" || feedsOnlySoftmax(node) || geluParts.contains(node.name)
                || layerNormParts.contains(node.name) { return false }
            return quantizesActivations && !keepFloat.contains(node.name)
        }
        // onnxruntime's adjust_tensor_ranges: a Relu/Clip input read only by it takes the output's range; Softmax
        // outputs are [0, 1].
        for node in graph.nodes where shouldQuantize(node) {
            if removableActivations.contains(node.opType), index.readers[node.inputs[0]]?.count == 1,
                let r = ranges[node.outputs[0]] {
                ranges[node.inputs[0]] = r
            } else if node.opType == "Softmax", ranges[node.outputs[0]] != nil {
                ranges[node.outputs[0]] = (0, 1)
            }
        }

        struct WeightPlan { var axis: Int?; var type: DataType; var symmetric: Bool; var block: (size: Int, axis: Int)? = nil }
        var marked: [String: String?] = [:]  // activation → the tensor it shares parameters with
        var markOrder: [String] = []
        var weights: [String: WeightPlan] = [:]
        var biases: [(node: Int, bias: String, weight: String, beta: Float)] = []
        var removed = Set<Int>()
        var removedNames: [String] = []

        func isQuantized(_ t: String) -> Bool { marked[t] != nil || weights[t] != nil }
        func markActivation(_ t: String) {
            guard !t.isEmpty, isFloat(t) else { return }
            if let i = index.initializers[t] {
                guard weights[t] == nil, graph.initializers[i].tensor?.dtype == .float else { return }
                weights[t] = WeightPlan(axis: nil, type: policy.activationType, symmetric: policy.symmetricActivations)
                return
            }
            guard ranges[t] != nil, marked[t] == nil else { return }
            marked[t] = .some(nil)
            markOrder.append(t)
        }
        func markShared(_ t: String, from source: String) {
            guard !t.isEmpty, isFloat(t), index.initializers[t] == nil else { return }
            if marked[t] == nil { markOrder.append(t) }
            marked[t] = .some(source)
        }
        /// `axis` is the output-channel axis; `reduction` the axis blocks run along (int4 with a block size).
        func markWeight(_ t: String, axis: Int, reduction: Int, precision: LayerPrecision) {
            guard let i = index.initializers[t], let w = graph.initializers[i].tensor, w.dtype == .float else { return }
            weights[t] = WeightPlan(axis: policy.perChannel && w.rank > axis ? axis : nil,
                                    type: precision == .int4Weights ? .int4 : .int8, symmetric: true)
            if precision == .int4Weights, let size = policy.int4BlockSize, w.rank == 2 { weights[t]!.block = (size, reduction) }
        }

        for (i, node) in graph.nodes.enumerated() where shouldQuantize(node) {
            let op = node.opType
            if let precision = layerPrecision[node.name] {
                let transB = node.attribute("transB")?.value.int ?? 0
                switch op {
                case "Conv", "ConvTranspose", "Gemm":
                    if precision == .int8 {
                        markActivation(node.inputs[0])
                        markActivation(node.outputs[0])
                    }
                    // Output channels: Conv's weight axis 0, ConvTranspose's axis 1 ([C_in, C_out / group, k…]).
                    markWeight(node.inputs[1], axis: op == "ConvTranspose" ? 1 : op == "Conv" || transB != 0 ? 0 : 1,
                               reduction: transB != 0 ? 1 : 0, precision: precision)
                    if precision == .int8, node.inputs.count > 2, !node.inputs[2].isEmpty, index.initializers[node.inputs[2]] != nil {
                        biases.append((i, node.inputs[2], node.inputs[1], node.attribute("beta")?.value.float ?? 1))
                    }
                default:  // MatMul
                    for t in node.inputs {
                        if index.initializers[t] != nil { markWeight(t, axis: 1, reduction: 0, precision: precision) }
                        else if precision == .int8 { markActivation(t) }
                    }
                    if precision == .int8 { markActivation(node.outputs[0]) }
                }
            } else if removableActivations.contains(op) {
                let input = node.inputs[0], output = node.outputs[0]
                guard isQuantized(input) else { continue }
                // (onnxruntime also asks for the input's range, which every tensor has there; it is never used.)
                if !policy.symmetricActivations, ranges[output] != nil,
                    index.readers[input]?.count == 1, !index.graphOutputs.contains(input), !index.graphInputs.contains(input),
                    let p = index.producer[input] {
                    // The producer writes the activation's output; the activation goes.
                    for k in graph.nodes[p].outputs.indices where graph.nodes[p].outputs[k] == input {
                        graph.nodes[p].outputs[k] = output
                    }
                    if marked[input] != nil {
                        marked[input] = nil
                        markOrder.removeAll { $0 == input }
                    }
                    removed.insert(i)
                    removedNames.append(node.name)
                    index.producer[output] = p
                } else {
                    markActivation(input)
                }
                markActivation(output)
            } else if directOps.contains(op) {
                if op == "MaxPool" && opset < 12 { continue }
                guard isQuantized(node.inputs[0]), marked[node.inputs[0]] != nil else { continue }
                markActivation(node.inputs[0])
                for t in node.outputs { markShared(t, from: node.inputs[0]) }
            } else if generalOps.contains(op) {
                for t in node.inputs + node.outputs { markActivation(t) }
            }
        }

        // Parameters.
        var summary = QuantizationSummary(
            mode: policy.mode, calibration: policy.calibration,
            percentile: policy.calibration == .percentile ? policy.percentile : nil, perChannel: policy.perChannel,
            activationType: policy.activationType.description, symmetricActivations: policy.symmetricActivations,
            reduceRange: policy.reduceRange, opset: opset,
            layers: weightedNodes(model.graph).map { QuantizedLayer(node: $0.name, opType: $0.opType, precision: declaredPrecision[$0.name] ?? .float) },
            tensors: nBitsTensors, removedNodes: removedNames, clippedBiases: [])
        if declaredPrecision.values.contains(.int4Weights) {
            summary.int4Format = policy.int4Format
            summary.int4BlockSize = policy.int4Format == .matMulNBits ? policy.int4BlockSize ?? 32 : policy.int4BlockSize
        }
        used.formUnion(graph.nodes.flatMap { $0.inputs + $0.outputs })
        var newInitializers: [Initializer] = []
        var activationParameters: [String: (QuantizationParameters, scale: String, zero: String)] = [:]
        func root(_ t: String) -> String {
            var t = t
            while let source = marked[t] ?? nil { t = source }
            return t
        }
        let activationRange = policy.activationRange
        for t in markOrder where (marked[t] ?? nil) == nil {
            let r = ranges[t]!
            let p: QuantizationParameters
            do {
                p = try QuantizationParameters.compute(min: r.min, max: r.max, range: activationRange, symmetric: policy.symmetricActivations)
            } catch {
                throw CompressionError(.invalidStatistics, "tensor '\(t)': range [\(r.min), \(r.max)] is not usable")
            }
            let scale = GraphEditing.uniqueName(t + "_scale", &used), zero = GraphEditing.uniqueName(t + "_zero_point", &used)
            newInitializers.append(Initializer(name: scale, tensor: Tensor.scalar(p.scale)))
            newInitializers.append(Initializer(name: zero, tensor: Tensor(shape: [], ints: [p.zeroPoint], dtype: policy.activationType)))
            activationParameters[t] = (p, scale, zero)
            summary.tensors.append(QuantizedTensor(name: t, role: .activation, type: policy.activationType.description,
                                                   min: r.min, max: r.max, scales: [p.scale], zeroPoints: [p.zeroPoint]))
        }
        for t in markOrder {
            guard let source = marked[t] ?? nil, let shared = activationParameters[root(source)] else { continue }
            activationParameters[t] = shared
            summary.tensors.append(QuantizedTensor(name: t, role: .activation, type: policy.activationType.description,
                                                   scales: [shared.0.scale], zeroPoints: [shared.0.zeroPoint], sharedWith: root(source)))
        }

        if activationsOnly { return (model, summary) }

        var prefix: [Node] = []
        var weightScales: [String: [Float]] = [:]
        var replacement: [String: String] = [:]
        for (name, plan) in weights.sorted(by: { $0.key < $1.key }) {
            let w = graph.initializers[index.initializers[name]!].tensor!
            if let block = plan.block {
                // Blocked int4 (opset 21): scales and zero points of the weight's rank, ceil(K / block) along K.
                let (codes, scales, shape) = try blockedInt4(w, blockSize: block.size, reductionAxis: block.axis)
                let qName = GraphEditing.uniqueName(name + "_quantized", &used)
                let scale = GraphEditing.uniqueName(name + "_scale", &used), zero = GraphEditing.uniqueName(name + "_zero_point", &used)
                let dqOut = GraphEditing.uniqueName(name + "_DequantizeLinear_Output", &used)
                newInitializers.append(Initializer(name: qName, tensor: Tensor(shape: w.shape, ints: codes, dtype: .int4)))
                newInitializers.append(Initializer(name: scale, tensor: Tensor(shape: shape, floats: scales)))
                newInitializers.append(Initializer(name: zero, tensor: Tensor(shape: shape, ints: [Int64](repeating: 0, count: scales.count), dtype: .int4)))
                prefix.append(Node(opType: "DequantizeLinear", name: GraphEditing.uniqueName(name + "_DequantizeLinear", &used),
                                   inputs: [qName, scale, zero], outputs: [dqOut],
                                   attributes: [Attribute("axis", .int(Int64(block.axis))), Attribute("block_size", .int(Int64(block.size)))]))
                replacement[name] = dqOut
                summary.tensors.append(QuantizedTensor(name: name, role: .weight, type: "int4", min: w.floats.min(), max: w.floats.max(),
                                                       scales: [], zeroPoints: [], axis: block.axis, blockSize: block.size))
                continue
            }
            let fake = try FakeQuantization.fromRange(of: w, type: plan.type, symmetric: plan.symmetric, axis: plan.axis,
                                                      reduceRange: policy.reduceRange && plan.type == .int8 && plan.symmetric)
            let parameters = fake.parameters, range = fake.range
            let inner = plan.axis.map { w.shape[($0 + 1)...].reduce(1, *) } ?? 1
            let size = plan.axis.map { w.shape[$0] } ?? 1
            var q = [Int64](repeating: 0, count: w.count)
            for i in 0..<w.count {
                q[i] = parameters[plan.axis == nil ? 0 : (i / inner) % size].quantize(w.floats[i], range: range)
            }
            let qName = GraphEditing.uniqueName(name + "_quantized", &used)
            let scale = GraphEditing.uniqueName(name + "_scale", &used), zero = GraphEditing.uniqueName(name + "_zero_point", &used)
            let dqOut = GraphEditing.uniqueName(name + "_DequantizeLinear_Output", &used)
            let scales = parameters.map(\.scale), zeros = parameters.map(\.zeroPoint)
            newInitializers.append(Initializer(name: qName, tensor: Tensor(shape: w.shape, ints: q, dtype: plan.type)))
            newInitializers.append(Initializer(name: scale, tensor: plan.axis == nil ? .scalar(scales[0]) : Tensor(shape: [size], floats: scales)))
            newInitializers.append(Initializer(name: zero, tensor: Tensor(shape: plan.axis == nil ? [] : [size], ints: zeros, dtype: plan.type)))
            prefix.append(dequantize(GraphEditing.uniqueName(name + "_DequantizeLinear", &used), qName, scale, zero, dqOut, axis: plan.axis))
            replacement[name] = dqOut
            weightScales[name] = scales
            summary.tensors.append(QuantizedTensor(name: name, role: .weight, type: plan.type.description,
                                                   min: w.floats.min(), max: w.floats.max(), scales: scales, zeroPoints: zeros, axis: plan.axis))
        }
        for (nodeIndex, bias, weight, beta) in biases {
            let input = graph.nodes[nodeIndex].inputs[0]
            guard let inputParameters = activationParameters[input], let ws = weightScales[weight],
                let b = graph.initializers[index.initializers[bias]!].tensor, b.dtype == .float else { continue }
            let scales = b.count == ws.count ? ws.map { inputParameters.0.scale * $0 * beta }
                : [Float](repeating: inputParameters.0.scale * ws[0] * beta, count: 1)
            var clipped = false
            let q: [Int64] = b.floats.enumerated().map { k, v in
                let s = scales[scales.count == 1 ? 0 : k]
                let x = (v / s).rounded(.toNearestOrEven)
                guard x.isFinite, abs(x) <= Float(Int32.max) - 128 else { clipped = true; return x < 0 ? Int64(Int32.min) : Int64(Int32.max) }
                return Int64(x)
            }
            if clipped { summary.clippedBiases.append(bias) }
            let qName = GraphEditing.uniqueName(bias + "_quantized", &used)
            let scale = GraphEditing.uniqueName(bias + "_quantized_scale", &used)
            let zero = GraphEditing.uniqueName(bias + "_quantized_zero_point", &used)
            let dqOut = GraphEditing.uniqueName(bias + "_DequantizeLinear_Output", &used)
            let axis: Int? = scales.count > 1 ? 0 : nil
            newInitializers.append(Initializer(name: qName, tensor: Tensor(shape: b.shape, ints: q, dtype: .int32)))
            newInitializers.append(Initializer(name: scale, tensor: axis == nil ? .scalar(scales[0]) : Tensor(shape: [scales.count], floats: scales)))
            newInitializers.append(Initializer(name: zero, tensor: Tensor(shape: axis == nil ? [] : [scales.count],
                                                                          ints: [Int64](repeating: 0, count: scales.count), dtype: .int32)))
            prefix.append(dequantize(GraphEditing.uniqueName(bias + "_DequantizeLinear", &used), qName, scale, zero, dqOut, axis: axis))
            replacement[bias] = dqOut
            if beta != 1 {
                graph.nodes[nodeIndex].attributes.removeAll { $0.name == "beta" }
            }
            summary.tensors.append(QuantizedTensor(name: bias, role: .bias, type: "int32", min: b.floats.min(), max: b.floats.max(),
                                                   scales: scales, zeroPoints: [Int64](repeating: 0, count: scales.count), axis: axis))
        }

        // Q → DQ pairs for activations, right after their producer (graph inputs first).
        var pairs: [String: [Node]] = [:]
        var renamedOutputs: [String: String] = [:]
        for t in markOrder {
            guard let parameters = activationParameters[t] else { continue }
            var qInput = t
            var dqOutput = GraphEditing.uniqueName(t + "_DequantizeLinear_Output", &used)
            if index.graphOutputs.contains(t) {
                qInput = GraphEditing.uniqueName(t + "_QuantizeLinear_Input", &used)
                renamedOutputs[t] = qInput
                dqOutput = t
            } else {
                replacement[t] = dqOutput
            }
            let qOut = GraphEditing.uniqueName(t + "_QuantizeLinear_Output", &used)
            let quantize = Node(opType: "QuantizeLinear", name: GraphEditing.uniqueName(t + "_QuantizeLinear", &used),
                                inputs: [qInput, parameters.scale, parameters.zero], outputs: [qOut])
            pairs[t] = [quantize, dequantize(GraphEditing.uniqueName(t + "_DequantizeLinear", &used), qOut, parameters.scale,
                                             parameters.zero, dqOutput, axis: nil)]
        }
        var nodes = prefix
        for t in graph.runtimeInputs.map(\.name) { nodes += pairs[t] ?? [] }
        for (i, var node) in graph.nodes.enumerated() where !removed.contains(i) {
            node.inputs = node.inputs.map { replacement[$0] ?? $0 }
            let outputs = node.outputs
            node.outputs = node.outputs.map { renamedOutputs[$0] ?? $0 }
            nodes.append(node)
            for t in outputs { nodes += pairs[t] ?? [] }
        }
        graph.nodes = nodes
        graph.initializers += newInitializers
        graph.removeUnusedInitializers()
        graph.valueInfo = []
        var out = model
        out.graph = graph
        if let k = out.opsetImports.firstIndex(where: { $0.domain == "" || $0.domain == "ai.onnx" }) {
            out.opsetImports[k].version = opset
        }
        if out.irVersion < 7 { out.irVersion = 7 }
        if usesInt4 && out.irVersion < 10 { out.irVersion = 10 }
        if !nBitsTensors.isEmpty, !out.opsetImports.contains(where: { $0.domain == "com.microsoft" }) {
            out.opsetImports.append(OpsetImport(domain: "com.microsoft", version: 1))
        }
        return (out, summary)
    }

    /// Blocked int4 codes of a rank-2 weight in its own layout, and the scales in DequantizeLinear's blocked layout
    /// (the weight's rank, `ceil(K / blockSize)` along the reduction axis); see `BlockwiseInt4`.
    static func blockedInt4(_ w: Tensor, blockSize: Int, reductionAxis: Int) throws -> (codes: [Int64], scales: [Float], shape: [Int]) {
        let (k, n) = reductionAxis == 0 ? (w.shape[0], w.shape[1]) : (w.shape[1], w.shape[0])
        let blocks = BlockwiseInt4.blocks(k: k, blockSize: blockSize)
        let rows = reductionAxis == 1 ? w.floats : transposed(w.floats, rows: k, columns: n)
        let (codes, scales) = try BlockwiseInt4.quantize(rows: rows, n: n, k: k, blockSize: blockSize)
        if reductionAxis == 1 { return (codes, scales, [n, blocks]) }
        return (transposed(codes, rows: n, columns: k), transposed(scales, rows: n, columns: blocks), [blocks, n])
    }

    static func transposed<T>(_ values: [T], rows: Int, columns: Int) -> [T] {
        Kernels.transpose(values, shape: [rows, columns], perm: [1, 0])
    }

    /// Rewrites the int4 `layers` (MatMul with a constant right operand `[K, N]`; Gemm without transA, with a constant
    /// B) as onnxruntime's MatMulNBits, weights in blocks of `blockSize` along K (`BlockwiseInt4`); a Gemm's alpha is
    /// folded into the weights and its `beta · C` becomes an Add. Layers of another form stay float.
    static func rewriteAsMatMulNBits(_ graph: inout Graph, layers: Set<String>, blockSize: Int, used: inout Set<String>) throws -> [QuantizedTensor] {
        let initializers = Dictionary(graph.initializers.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var rows: [QuantizedTensor] = []
        var nodes: [Node] = []
        for node in graph.nodes {
            guard layers.contains(node.name), node.inputs.count >= 2, initializers[node.inputs[0]] == nil,
                  let w = initializers[node.inputs[1]]?.tensor, w.dtype == .float, w.rank == 2,
                  node.opType == "MatMul" || (node.opType == "Gemm" && (node.attribute("transA")?.value.int ?? 0) == 0) else {
                nodes.append(node)
                continue
            }
            let transB = node.opType == "Gemm" && (node.attribute("transB")?.value.int ?? 0) != 0
            let alpha = node.opType == "Gemm" ? node.attribute("alpha")?.value.float ?? 1 : 1
            let (k, n) = transB ? (w.shape[1], w.shape[0]) : (w.shape[0], w.shape[1])
            var weights = transB ? w.floats : transposed(w.floats, rows: k, columns: n)
            if alpha != 1 { weights = weights.map { $0 * alpha } }
            let (codes, scales) = try BlockwiseInt4.quantize(rows: weights, n: n, k: k, blockSize: blockSize)
            let packed = BlockwiseInt4.pack(codes: codes, n: n, k: k, blockSize: blockSize)
            let bName = GraphEditing.uniqueName(node.inputs[1] + "_int4_blocks", &used)
            let sName = GraphEditing.uniqueName(node.inputs[1] + "_int4_scales", &used)
            graph.initializers.append(Initializer(name: bName, tensor: Tensor(shape: [n, BlockwiseInt4.blocks(k: k, blockSize: blockSize), blockSize / 2],
                                                                             ints: packed.map { Int64($0) }, dtype: .uint8)))
            graph.initializers.append(Initializer(name: sName, tensor: Tensor(shape: [scales.count], floats: scales)))
            var output = node.outputs[0]
            let bias = node.opType == "Gemm" && node.inputs.count > 2 && !node.inputs[2].isEmpty ? node.inputs[2] : nil
            if bias != nil { output = GraphEditing.uniqueName(node.outputs[0] + "_nbits", &used) }
            nodes.append(Node(opType: "MatMulNBits", name: node.name, inputs: [node.inputs[0], bName, sName], outputs: [output],
                              attributes: [Attribute("K", .int(Int64(k))), Attribute("N", .int(Int64(n))), Attribute("bits", .int(4)),
                                           Attribute("block_size", .int(Int64(blockSize)))],
                              domain: "com.microsoft"))
            if var c = bias {
                let beta = node.attribute("beta")?.value.float ?? 1
                if beta != 1, let t = initializers[c]?.tensor, t.dtype == .float {
                    c = GraphEditing.uniqueName(c + "_beta", &used)
                    graph.initializers.append(Initializer(name: c, tensor: Tensor(shape: t.shape, floats: t.floats.map { $0 * beta })))
                } else if beta != 1 {
                    let scaled = GraphEditing.uniqueName(c + "_beta", &used), betaName = GraphEditing.uniqueName(c + "_beta_value", &used)
                    graph.initializers.append(Initializer(name: betaName, tensor: .scalar(beta)))
                    nodes.append(Node(opType: "Mul", name: GraphEditing.uniqueName(node.name + "_beta", &used), inputs: [c, betaName], outputs: [scaled]))
                    c = scaled
                }
                nodes.append(Node(opType: "Add", name: GraphEditing.uniqueName(node.name + "_bias", &used), inputs: [output, c], outputs: [node.outputs[0]]))
            }
            rows.append(QuantizedTensor(name: node.inputs[1], role: .weight, type: "int4", min: w.floats.min(), max: w.floats.max(),
                                        scales: [], zeroPoints: [], axis: transB ? 1 : 0, blockSize: blockSize))
        }
        graph.nodes = nodes
        return rows
    }

    /// The activations whose calibrated ranges `export` reads under `policy` (shared parameters and constants
    /// excluded): found by planning the export with placeholder ranges, so calibration observes only those.
    public static func calibrationTensors(_ model: Model, policy: QuantizationPolicy) throws -> Set<String> {
        guard let opset = model.defaultOpset else { return [] }
        let inferred = try ShapeInference.infer(model.graph, opset: opset, inputs: try ShapeInference.analysisShapes(model))
        var placeholder: [String: (min: Float, max: Float)] = [:]
        for (name, meta) in inferred.values where meta.dtype == .float && meta.constant == nil { placeholder[name] = (0, 1) }
        let (_, summary) = try export(model, ranges: placeholder, policy: policy, activationsOnly: true)
        return Set(summary.tensors.filter { $0.role == .activation && $0.sharedWith == nil }.map(\.name))
    }

    static func dequantize(_ name: String, _ input: String, _ scale: String, _ zero: String, _ output: String, axis: Int?) -> Node {
        Node(opType: "DequantizeLinear", name: name, inputs: [input, scale, zero], outputs: [output],
             attributes: axis.map { [Attribute("axis", .int(Int64($0)))] } ?? [])
    }
}
