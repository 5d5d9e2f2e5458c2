import WhittleONNX
import WhittleTensor

/// Runs a model's graph in float32 for fixed input shapes.
///
/// Compilation infers shapes, folds constants and prepares each node's kernel (oneDNN plans with reordered weights).
/// A run feeds the inputs through the nodes in order and frees every intermediate value after its last reader, so
/// peak memory is the schedule's live set, not the sum of all activations. An observer sees each node's outputs as
/// they are produced.
public final class CompiledGraph: @unchecked Sendable {
    public let inferred: InferredGraph
    public let inputNames: [String]
    public let outputNames: [String]
    let steps: [PlannedStep]
    /// Convolution steps that hand their output to the next step in oneDNN's blocked layout (for tests).
    package var blockedConvolutionSteps: Int { steps.filter { ($0.kernel as? ConvKernel)?.keepDestinationBlocked == true }.count }
    /// QDQ groups running as integer convolutions.
    public var integerSteps: Int { steps.filter { $0.kernel is IntegerStepKernel }.count }
    let inputSlots: [[Int]]
    let outputSlots: [[Int]]
    let freeAfter: [[Int]]
    let slotOf: [String: Int]
    let slotBytes: [Int]
    let constants: [Int: Tensor]

    /// `observable` values are kept whole like graph outputs — never fused away, always in NCHW order — so an
    /// observer of a fused run sees them.
    public init(graph: Graph, opset: Int64, inputs: [String: (DataType, [Int])], options: KernelOptions = KernelOptions(),
                observable: Set<String> = []) throws {
        let planned = try ShapeInference.infer(graph, opset: opset, inputs: inputs)
        inputNames = graph.runtimeInputs.map(\.name)
        outputNames = graph.outputs.map(\.name)
        steps = try StepPlanner.plan(planned, graphOutputs: Set(outputNames).union(observable), options: options)
        // Constants no step reads (weights a kernel holds in its own layout, the float copies of quantized weights
        // folded from their DequantizeLinear) are not kept: a quantized model's float weights do not stay resident.
        let inferred = planned.keepingConstants(Set(steps.flatMap(\.inputs)).union(outputNames))
        self.inferred = inferred
        var slotOf: [String: Int] = [:]
        func slot(_ name: String) -> Int {
            if let s = slotOf[name] { return s }
            let s = slotOf.count
            slotOf[name] = s
            return s
        }
        var constants: [Int: Tensor] = [:]
        for (name, meta) in inferred.values {
            if let value = meta.constant { constants[slot(name)] = value }
        }
        for name in inputNames { _ = slot(name) }
        inputSlots = steps.map { $0.inputs.map { $0.isEmpty ? -1 : slot($0) } }
        outputSlots = steps.map { $0.outputs.map { $0.isEmpty ? -1 : slot($0) } }
        // Last reader of each non-constant slot; graph outputs are never freed.
        let keep = Set(outputNames.compactMap { slotOf[$0] })
        var lastUse: [Int: Int] = [:]
        for (i, slots) in inputSlots.enumerated() {
            for s in slots where s >= 0 && constants[s] == nil { lastUse[s] = i }
        }
        var freeAfter = [[Int]](repeating: [], count: steps.count)
        for (s, i) in lastUse where !keep.contains(s) { freeAfter[i].append(s) }
        var slotBytes = [Int](repeating: 0, count: slotOf.count)
        for (name, s) in slotOf { slotBytes[s] = inferred.values[name]?.bytes ?? 0 }
        self.freeAfter = freeAfter
        self.slotOf = slotOf
        self.slotBytes = slotBytes
        self.constants = constants
    }

    /// Runs on `inputs` (by graph input name), returning the graph outputs by name. `observe` is called after each
    /// step with the last node it computes and that node's outputs (compile with `fuse: false` to see every node).
    public func run(_ inputs: [String: Tensor], observe: ((Node, [Tensor]) throws -> Void)? = nil) throws -> [String: Tensor] {
        var slots = [Tensor?](repeating: nil, count: slotOf.count)
        for (s, value) in constants { slots[s] = value }
        for name in inputNames {
            guard let value = inputs[name] else { throw ONNXError(.invalidInput, "missing input '\(name)'") }
            slots[slotOf[name]!] = value
        }
        for (i, step) in steps.enumerated() {
            let args = inputSlots[i].map { $0 >= 0 ? slots[$0] : nil }
            let produced = try step.kernel.run(args)
            for (s, value) in zip(outputSlots[i], produced) where s >= 0 { slots[s] = value }
            if let observe { try observe(inferred.contexts[step.nodes.last!].node, produced) }
            for s in freeAfter[i] { slots[s] = nil }
        }
        var result: [String: Tensor] = [:]
        for name in outputNames { result[name] = slots[slotOf[name]!] }
        return result
    }

    /// Runs once and returns, per step, the node labels it computes, the kernel's implementation and its seconds.
    public func profile(_ inputs: [String: Tensor]) throws -> [(label: String, implementation: String, seconds: Double)] {
        var rows: [(String, String, Double)] = []
        let clock = ContinuousClock()
        var slots = [Tensor?](repeating: nil, count: slotOf.count)
        for (s, value) in constants { slots[s] = value }
        for name in inputNames { slots[slotOf[name]!] = inputs[name] }
        for (i, step) in steps.enumerated() {
            let args = inputSlots[i].map { $0 >= 0 ? slots[$0] : nil }
            let start = clock.now
            let produced = try step.kernel.run(args)
            let elapsed = clock.now - start
            for (s, value) in zip(outputSlots[i], produced) where s >= 0 { slots[s] = value }
            for s in freeAfter[i] { slots[s] = nil }
            let label = step.nodes.map { inferred.contexts[$0].node.opType }.joined(separator: "+") + " "
                + (inferred.contexts[step.nodes[0]].node.name)
            let implementation = (step.kernel as? ConvKernel)?.plan?.implementation
                ?? (step.kernel as? IntegerStepKernel).map { "int8 " + $0.integerImplementation }
                ?? (step.kernel as? Int4MatMulKernel)?.implementation
                ?? (step.kernel is QuantizeKernel ? "int8 quantize" : "")
            rows.append((label, implementation,
                         Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) * 1e-18))
        }
        return rows
    }

    /// Number of kernels a run executes (after folding and fusion).
    public var stepCount: Int { steps.count }

    /// Peak bytes of activations alive at once during a run (inputs and outputs included, constants excluded),
    /// following the same free-after-last-use schedule as `run`.
    public var peakActivationBytes: Int {
        var live = inputNames.reduce(0) { $0 + slotBytes[slotOf[$1]!] }
        var peak = live
        for i in steps.indices {
            for s in outputSlots[i] where s >= 0 { live += slotBytes[s] }
            peak = max(peak, live)
            for s in freeAfter[i] { live -= slotBytes[s] }
        }
        return peak
    }
}

/// A model ready to run at any batch size: compiled graphs are cached per input shape.
public final class InferenceSession: @unchecked Sendable {
    public let model: Model
    public let options: KernelOptions
    public let opset: Int64
    private var cache: [CacheKey: CompiledGraph] = [:]

    public init(model: Model, options: KernelOptions = KernelOptions()) throws {
        try ModelCoding.checkOpset(model)
        self.model = model
        self.options = options
        self.opset = model.defaultOpset!
        // Refuse unsupported operators up front, naming the first one.
        for node in model.graph.nodes { _ = try Operators.definition(for: node, opset: opset) }
        guard model.graph.runtimeInputs.count >= 1 else {
            throw ONNXError(.invalidGraph, "the model has no runtime inputs")
        }
    }

    /// The single runtime input (Whittle's commands feed one input tensor).
    public var primaryInput: ValueInfo { model.graph.runtimeInputs[0] }
    public var primaryOutput: String { model.graph.outputs[0].name }

    /// The compiled graph for a batch size (inputs' declared shapes with the batch axis set). With `fused` false,
    /// every node runs on its own, so an observer sees every node's outputs.
    /// The compiled graph for a batch size (inputs' declared shapes with the batch axis set). With `fused` false,
    /// every node runs on its own, so an observer sees every node's outputs; with `observable` values, fusion stays
    /// on but never hides those values.
    public func compiled(batchSize: Int, fused: Bool = true, observable: Set<String> = []) throws -> CompiledGraph {
        try compiled(shapes: try ShapeInference.inputShapes(model, batchSize: batchSize), fused: fused, observable: observable)
    }

    /// The compiled graph for given shapes of every runtime input (free dimensions such as a sequence length set).
    public func compiled(shapes: [String: (DataType, [Int])], fused: Bool = true, observable: Set<String> = []) throws -> CompiledGraph {
        let key = CacheKey(shapes: model.graph.runtimeInputs.map { shapes[$0.name]!.1 }, fused: fused, observable: observable)
        if let graph = cache[key] { return graph }
        var options = self.options
        options.fuse = options.fuse && fused
        let graph = try CompiledGraph(graph: model.graph, opset: opset, inputs: shapes, options: options, observable: observable)
        cache[key] = graph
        // Planning decoded and folded every weight (a quantized model's codes widened, their float copies); what the
        // compiled graph does not keep goes back to the system rather than staying in the heap.
        ComputeThreads.releaseFreeMemory()
        return graph
    }

    struct CacheKey: Hashable {
        var shapes: [[Int]]
        var fused: Bool
        var observable: Set<String>
    }

    /// Runs one batch given as the single primary input; returns the first graph output.
    /// Inputs are checked for element type, rank, shape against the declaration, and NaN/infinite values.
    /// With `observing`, the run stays fused and the observer sees at least those values (in NCHW order); without,
    /// an observer makes the run unfused so that it sees every node's outputs.
    public func run(_ input: Tensor, observing: Set<String>? = nil, observe: ((Node, [Tensor]) throws -> Void)? = nil) throws -> Tensor {
        try validate(input)
        let graph = try observing.map { try compiled(batchSize: input.shape[0], observable: $0) }
            ?? compiled(batchSize: input.shape[0], fused: observe == nil)
        guard model.graph.runtimeInputs.count == 1 else {
            throw ONNXError(.invalidInput, "the model has \(model.graph.runtimeInputs.count) inputs; Whittle's run feeds one")
        }
        let outputs = try graph.run([primaryInput.name: input], observe: observe)
        return outputs[primaryOutput]!
    }

    /// Runs one batch given as named tensors, one per runtime input (several inputs, such as a transformer's
    /// `input_ids` and `attention_mask`, or one); returns every graph output by name. Free dimensions of the
    /// declared shapes (batch, sequence length) take the given tensors' sizes.
    public func run(inputs: [String: Tensor], observe: ((Node, [Tensor]) throws -> Void)? = nil) throws -> [String: Tensor] {
        let expected = model.graph.runtimeInputs.map(\.name)
        for name in inputs.keys where !expected.contains(name) {
            throw ONNXError(.invalidInput, "the model has no input '\(name)'; its inputs are \(expected.joined(separator: ", "))")
        }
        for name in expected where inputs[name] == nil {
            throw ONNXError(.invalidInput, "the model's input '\(name)' is missing (it needs \(expected.joined(separator: ", ")))")
        }
        return try run(fed: inputs, observing: nil, observe: observe)
    }

    /// Runs a batch of samples (see `Samples.feed` for how tensors meet inputs); returns every graph output by name.
    /// With `observing`, the run stays fused and the observer sees at least those values; without, an observer makes
    /// the run unfused so that it sees every node's outputs.
    public func run(_ samples: Samples, observing: Set<String>? = nil,
                    observe: ((Node, [Tensor]) throws -> Void)? = nil) throws -> [String: Tensor] {
        try run(fed: try samples.feed(model.graph), observing: observing, observe: observe)
    }

    /// The first graph output for a batch of samples.
    public func firstOutput(_ samples: Samples) throws -> Tensor {
        try run(samples)[primaryOutput]!
    }

    /// Checks every input of a batch of samples (see `validate(_:for:)`) and that each is fed.
    public func validate(_ samples: Samples) throws {
        let fed = try samples.feed(model.graph)
        for info in model.graph.runtimeInputs { try validate(fed[info.name]!, for: info) }
    }

    func run(fed inputs: [String: Tensor], observing: Set<String>?, observe: ((Node, [Tensor]) throws -> Void)?) throws -> [String: Tensor] {
        var shapes: [String: (DataType, [Int])] = [:]
        var fed: [String: Tensor] = [:]
        for info in model.graph.runtimeInputs {
            var tensor = inputs[info.name]!
            try validate(tensor, for: info)
            if let (elementType, _) = info.tensorType, elementType.isInteger { tensor.dtype = elementType }
            shapes[info.name] = (tensor.dtype, tensor.shape)
            fed[info.name] = tensor
        }
        let graph = try observing.map { try compiled(shapes: shapes, observable: $0) }
            ?? compiled(shapes: shapes, fused: observe == nil)
        return try graph.run(fed, observe: observe)
    }

    /// Checks a batch for the primary input.
    public func validate(_ input: Tensor) throws { try validate(input, for: primaryInput) }

    /// Checks a batch for one runtime input: element type (float data for float inputs, integers for integer ones),
    /// rank, every fixed dimension of the declaration, a batch of at least one, and finite values.
    public func validate(_ input: Tensor, for info: ValueInfo) throws {
        guard let (elementType, declared) = info.tensorType else {
            throw ONNXError(.invalidInput, "input '\(info.name)' is not a tensor")
        }
        guard elementType.isFloatingPoint == input.dtype.isFloatingPoint, elementType.isInteger == input.dtype.isInteger else {
            throw ONNXError(.invalidInput, "input '\(info.name)' expects \(elementType) data, got \(input.dtype)")
        }
        if let declared {
            guard declared.count == input.rank else {
                throw ONNXError(.invalidInput,
                    "input '\(info.name)' expects rank \(declared.count) \(declared), got shape \(input.shape)")
            }
            for (axis, dim) in declared.enumerated().dropFirst() {
                if let v = dim.fixedValue, v != input.shape[axis] {
                    throw ONNXError(.invalidInput,
                        "input '\(info.name)' expects shape \(declared) (batch first), got \(input.shape): axis \(axis) differs")
                }
            }
        }
        guard input.rank >= 1, input.shape[0] >= 1 else {
            throw ONNXError(.invalidInput, "input '\(info.name)' must have a batch axis of size ≥ 1, got shape \(input.shape)")
        }
        if input.dtype.isFloatingPoint, let bad = input.floats.firstIndex(where: { !$0.isFinite }) {
            throw ONNXError(.invalidInput,
                "input '\(info.name)' contains a non-finite value (\(input.floats[bad])) at flat index \(bad)")
        }
    }

    /// The largest batch size whose peak activation memory plus the model's weights fits in `bytes`
    /// (searched up to `limit`). Returns nil when even batch size 1 does not fit.
    /// `sampleShapes` gives one sample of each input (batch 1) where the declared shapes have free dimensions
    /// besides the batch (a sequence length); the batch axis is scaled from it.
    public func largestBatch(fittingIn bytes: Int, limit: Int = 4096,
                             sampleShapes: [String: (DataType, [Int])]? = nil) throws -> Int? {
        let weights = model.graph.initializers.reduce(0) { $0 + ($1.tensor?.count ?? 0) * 4 }
        func fits(_ batch: Int) throws -> Bool {
            let shapes = try sampleShapes.map { $0.mapValues { ($0.0, [batch] + Array($0.1.dropFirst())) } }
                ?? ShapeInference.inputShapes(model, batchSize: batch)
            // Planned with the reference kernels (nothing fused, no oneDNN plans created): a slight over-estimate.
            let graph = try CompiledGraph(graph: model.graph, opset: opset, inputs: shapes, options: KernelOptions(fast: false))
            // oneDNN kernels hold a second copy of the weights (reordered into their layout).
            return graph.peakActivationBytes + 2 * weights <= bytes
        }
        guard try fits(1) else { return nil }
        var low = 1, high = 1
        while high < limit, try fits(min(high * 2, limit)) { high = min(high * 2, limit); low = high }
        if high == limit { return limit }
        high = min(high * 2, limit)
        while high - low > 1 {
            let mid = (low + high) / 2
            if try fits(mid) { low = mid } else { high = mid }
        }
        return low
    }
}
