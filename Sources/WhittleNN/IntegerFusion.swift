import WhittleONNX
import WhittleTensor

/// QDQ groups run as integer kernels, as onnxruntime's QDQ transformer turns them into QLinearConv:
/// `DequantizeLinear(x_q) → Conv(·, DequantizeLinear(W_q), DequantizeLinear(B_q)) → [Relu | Clip] →
/// QuantizeLinear → y_q` becomes one oneDNN integer convolution from `x_q` (uint8 or int8) to `y_q`, with int8
/// weights, int32 accumulation and the requantization `s_x · s_w[o] / s_y` fused; without a QuantizeLinear after it,
/// the convolution writes float (`s_x · s_w[o] · a`). The float-simulation path (each node on its own) stays the
/// reference twin (`KernelOptions.integer` off).
extension StepPlanner {
    /// How far a bias's scale may be from s_x · s_w[o] (float rounding of the product that wrote it).
    static let biasScaleTolerance: Float = 1e-6

    /// Per-tensor scale and zero point of a QuantizeLinear or DequantizeLinear node, when both are constant scalars.
    static func scalarQuantization(_ ctx: NodeContext) -> (scale: Float, zero: Int32, type: QuantizedType)? {
        guard let scale = ctx.optionalInput(1)?.constant, scale.count == 1, let s = scale.asFloats.first, s.isFinite, s > 0
        else { return nil }
        // A zero point, when given, must be a constant scalar.
        let zeroPoint = ctx.optionalInput(2)
        let z = zeroPoint?.constant.flatMap { $0.count == 1 ? $0.asInts.first : nil }
        guard zeroPoint == nil || z != nil else { return nil }
        // QuantizeLinear's type: its zero point's, else opset 21's output_dtype, else uint8.
        let dtype = ctx.node.opType == "DequantizeLinear" ? ctx.optionalInput(0)?.dtype : try? Operators.quantizedType(ctx)
        guard let type = dtype.flatMap(QuantizedType.init) else { return nil }
        return (s, Int32(z ?? 0), type)
    }

    /// The integer step for the Conv, Gemm or MatMul at `i`, or nil when the node is not the core of a QDQ group the
    /// integer path runs exactly (2-D convolutions; Gemm without transA, alpha or beta; MatMul with a constant right
    /// operand; int8 weights per tensor or per output channel with zero points 0, a per-tensor uint8 or int8 input;
    /// on CPUs without VNNI, weights within 7 bits).
    static func fuseQuantizedConvolution(_ i: Int, _ inferred: InferredGraph, soleReader: (String) -> Int?,
                                         producer: [String: Int]) throws -> PlannedStep? {
        let contexts = inferred.contexts
        let ctx = contexts[i]
        guard ctx.node.inputs.count >= 2,
              let d = producer[ctx.node.inputs[0]], contexts[d].node.opType == "DequantizeLinear", !inferred.folded[d],
              let input = scalarQuantization(contexts[d]),
              let wq = producer[ctx.node.inputs[1]], contexts[wq].node.opType == "DequantizeLinear",
              let codes = contexts[wq].optionalInput(0)?.constant, codes.dtype == .int8,
              let weightScales = contexts[wq].optionalInput(1)?.constant?.asFloats,
              weightScales.allSatisfy({ $0.isFinite && $0 > 0 }),
              contexts[wq].optionalInput(2)?.constant.map({ $0.ints.allSatisfy { $0 == 0 } }) ?? true,
              ctx.optionalInput(2).map({ $0.constant != nil }) ?? true
        else { return nil }
        // The convolution's geometry and its weights in OIHW order; a Gemm is a 1 × 1 convolution of [N, K, 1, 1]
        // (onnxruntime's QGemm), its weights [M, K] (transB) or [K, M] transposed.
        let g: Conv2DGeometry, outShape: [Int], weights: [Int8], channelAxis: Int
        if ctx.node.opType == "MatMul" {
            // [… , K] · [K, N]: the leading dimensions are the batch of a 1 × 1 convolution (onnxruntime's
            // QLinearMatMul / MatMulIntegerToFloat with a constant right operand).
            guard let x = ctx.optionalInput(0), x.rank >= 2, codes.rank == 2, x.shape.last == codes.shape[0] else { return nil }
            let (k, m) = (codes.shape[0], codes.shape[1])
            let rows = x.shape.dropLast().reduce(1, *)
            g = Conv2DGeometry(batch: rows, inChannels: k, height: 1, width: 1, outChannels: m, kernelH: 1, kernelW: 1,
                               groups: 1, strides: (1, 1), dilations: (1, 1), pads: (0, 0, 0, 0))
            outShape = Array(x.shape.dropLast()) + [m]
            let values = codes.ints
            weights = (0..<(m * k)).map { i in Int8(truncatingIfNeeded: values[(i % k) * m + i / k]) }
            channelAxis = 1
        } else if ctx.node.opType == "Gemm" {
            guard let x = ctx.optionalInput(0), x.rank == 2, codes.rank == 2,
                  try ctx.float("alpha", default: 1) == 1, try ctx.float("beta", default: 1) == 1,
                  try ctx.int("transA", default: 0) == 0 else { return nil }
            let transposed = try ctx.int("transB", default: 0) != 0
            let (k, m) = transposed ? (codes.shape[1], codes.shape[0]) : (codes.shape[0], codes.shape[1])
            guard x.shape[1] == k else { return nil }
            g = Conv2DGeometry(batch: x.shape[0], inChannels: k, height: 1, width: 1, outChannels: m, kernelH: 1, kernelW: 1,
                               groups: 1, strides: (1, 1), dilations: (1, 1), pads: (0, 0, 0, 0))
            outShape = [x.shape[0], m]
            let values = codes.ints
            weights = transposed ? values.map { Int8(truncatingIfNeeded: $0) }
                : (0..<(m * k)).map { i in Int8(truncatingIfNeeded: values[(i % k) * m + i / k]) }
            channelAxis = transposed ? 0 : 1
        } else {
            let (x, window, convOut) = try Operators.convSetup(ctx)
            guard x.rank == 4, codes.rank == 4 else { return nil }
            g = window.geometry(batch: x.shape[0], channels: x.shape[1], spatial: Array(x.shape[2...]),
                                outChannels: codes.shape[0], groups: Int(try ctx.int("group", default: 1)))
            outShape = convOut
            weights = codes.ints.map { Int8(truncatingIfNeeded: $0) }
            channelAxis = 0
        }
        let channels = g.outChannels
        // Per tensor, or per output channel.
        if weightScales.count != 1 {
            guard weightScales.count == channels, (try contexts[wq].int("axis", default: 1)) == channelAxis else { return nil }
        }
        if !Kernels.integerDotProductsAreExact, weights.contains(where: { abs(Int($0)) > Int(Kernels.sevenBitWeightLimit) }) {
            return nil  // u8 × s8 pairs would saturate in int16 without VNNI: the float path is exact
        }
        let productScales = (0..<channels).map { input.scale * weightScales[weightScales.count == 1 ? 0 : $0] }
        // The bias: absent, or int32 codes of scale s_x · s_w[o] and zero point 0 through a DequantizeLinear, as QDQ
        // export writes it (a float bias would be rounded here; the float path keeps it exact, as onnxruntime does).
        var bias: [Int32]?
        if ctx.node.inputs.count > 2, !ctx.node.inputs[2].isEmpty {
            guard let bq = producer[ctx.node.inputs[2]], contexts[bq].node.opType == "DequantizeLinear",
                  let codes = contexts[bq].optionalInput(0)?.constant, codes.dtype == .int32, codes.count == channels,
                  let scales = contexts[bq].optionalInput(1)?.constant?.asFloats,
                  scales.count == channels || scales.count == 1,
                  contexts[bq].optionalInput(2)?.constant.map({ $0.ints.allSatisfy { $0 == 0 } }) ?? true,
                  productScales.indices.allSatisfy({ abs(scales[scales.count == 1 ? 0 : $0] - productScales[$0]) <= Self.biasScaleTolerance * productScales[$0] })
            else { return nil }
            bias = codes.ints.map { Int32(truncatingIfNeeded: $0) }
        }
        var nodes = [i]
        var output = ctx.node.outputs[0]
        var position = i
        var activation: PostOp?
        if let j = soleReader(output), contexts[j].node.inputs[0] == output, let op = try postOp(contexts[j]) {
            switch op {
            case .relu(alpha: 0), .clip: activation = op
            default: break
            }
            if activation != nil {
                nodes.append(j)
                output = contexts[j].node.outputs[0]
                position = j
            }
        }
        var destination = QuantizedType.float, outputScale: Float = 1, outputZero: Int32 = 0
        if let q = soleReader(output), contexts[q].node.opType == "QuantizeLinear", contexts[q].node.inputs[0] == output,
           let quantization = scalarQuantization(contexts[q]) {
            destination = quantization.type
            outputScale = quantization.scale
            outputZero = quantization.zero
            nodes.append(q)
            output = contexts[q].node.outputs[0]
            position = q
        }
        let post: PostOp
        switch activation {
        case .clip(let low, let high)?: post = .clip(low: low / outputScale, high: high / outputScale)
        case let op?: post = op
        case nil: post = .none
        }
        let requantization = Requantization(scales: productScales.map { $0 / outputScale }, sourceZero: input.zero,
                                            destinationZero: outputZero, post: post)
        let plan: QuantizedConvPlan
        do {
            plan = try QuantizedConvPlan(g, source: input.type, destination: destination, weights: weights, bias: bias,
                                         requantization: requantization)
        } catch {
            return nil  // a geometry or type oneDNN has no integer kernel for: the float path runs it
        }
        return PlannedStep(position: position, nodes: nodes, inputs: [contexts[d].node.inputs[0]], outputs: [output],
                           kernel: QuantizedConvKernel(plan: plan, outShape: outShape))
    }
}

/// A kernel of the integer path: it reads quantized bytes, packed (`PackedBytes`) when their producer is an integer
/// step too, and writes them packed when every reader is one (`StepPlanner.packIntegerValues`).
protocol IntegerStepKernel: NodeKernel {
    /// What `CompiledGraph.profile` shows after "int8 ".
    var integerImplementation: String { get }
    /// Operand `position` arrives as packed bytes.
    func setSourcePacked(_ position: Int)
    /// Every reader takes packed bytes (not called for a step that writes float).
    func setDestinationPacked()
    /// Reads operand `position` in NHWC order (its producer computes in it): true when the step can.
    func readsChannelsLast(_ position: Int) -> Bool
    /// Operand `position` arrives in NHWC order (only called where `readsChannelsLast` said it can).
    func setSourceChannelsLast(_ position: Int)
}

extension IntegerStepKernel {
    /// Nothing to set for a step that reads any order alike (an Add) or never NHWC.
    func setSourceChannelsLast(_ position: Int) {}
}

/// A QDQ group as one integer convolution (`StepPlanner.fuseQuantizedConvolution`): reads the quantized input,
/// writes the quantized output (or float).
final class QuantizedConvKernel: IntegerStepKernel, @unchecked Sendable {
    let plan: QuantizedConvPlan
    let outShape: [Int]
    var outputType: DataType { plan.destination.dataType }

    init(plan: QuantizedConvPlan, outShape: [Int]) {
        self.plan = plan
        self.outShape = outShape
    }

    var implementation: String { plan.implementation }
    var integerImplementation: String { plan.implementation }
    func setSourcePacked(_ position: Int) { sourcePacked = true }
    func setDestinationPacked() { destinationPacked = true }
    func readsChannelsLast(_ position: Int) -> Bool { plan.computesSourceChannelsLast }
    func setSourceChannelsLast(_ position: Int) { sourceChannelsLast = true }

    /// Set by the step planner (`StepPlanner.packIntegerValues`): the input arrives as packed bytes.
    var sourcePacked = false
    /// Set by the step planner: every reader of the output is an integer step, which takes packed bytes.
    var destinationPacked = false
    /// Set by the step planner: packed bytes in NHWC order (the plan's own layout), on the source side / the output.
    var sourceChannelsLast = false
    var destinationChannelsLast = false

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        guard let x = inputs[0] else { throw ONNXError(.invalidInput, "integer convolution: missing input") }
        let count = outShape.reduce(1, *)
        let (inNHWC, outNHWC) = (sourceChannelsLast, destinationChannelsLast)
        return try PackedBytes.reading(x, packed: sourcePacked, count: plan.geometry.inputShape.reduce(1, *)) { src in
            if outputType == .float {
                return [Tensor(shape: outShape, floats: try makeFloats(count) {
                    try plan.run(src, $0, sourceChannelsLast: inNHWC)
                })]
            }
            return [try PackedBytes.writing(count: count, shape: outShape, type: outputType, packed: destinationPacked) {
                try plan.run(src, $0, sourceChannelsLast: inNHWC, destinationChannelsLast: outNHWC)
            }]
        }
    }
}

/// Quantized activations passed between integer steps as bytes (uint8, or int8 bit patterns) in plain NCHW order,
/// held in an opaque float array of ⌈count / 4⌉ words that only integer steps read (as the blocked float buffers
/// between convolutions, `StepPlanner.propagateLayouts`); anything else reads quantized tensors (`Tensor.ints`).
enum PackedBytes {
    /// Calls `body` with the bytes of `x`: its packed words, or its integer values narrowed to bytes.
    static func reading<R>(_ x: Tensor, packed: Bool, count: Int, _ body: (UnsafeRawPointer) throws -> R) throws -> R {
        if packed {
            guard x.dtype == .float, x.count * 4 >= count else {
                throw ONNXError(.invalidInput, "integer step: the packed input holds \(x.count * 4) bytes, expected \(count)")
            }
            return try x.floats.withUnsafeBytes { try body($0.baseAddress!) }
        }
        guard x.dtype == .uint8 || x.dtype == .int8, x.count == count else {
            throw ONNXError(.invalidInput, "integer step: the input must be \(count) uint8 or int8 values, got \(x.count) of \(x.dtype)")
        }
        let bytes = x.ints.withUnsafeBufferPointer { values in
            [UInt8](unsafeUninitializedCapacity: values.count) { buffer, initialized in
                for k in 0..<values.count { buffer[k] = UInt8(truncatingIfNeeded: values[k]) }
                initialized = values.count
            }
        }
        return try bytes.withUnsafeBytes { try body($0.baseAddress!) }
    }

    /// A tensor of `count` bytes written by `fill`: packed words, or the quantized tensor of `type` and `shape`.
    static func writing(count: Int, shape: [Int], type: DataType, packed: Bool,
                        _ fill: (UnsafeMutableRawPointer) throws -> Void) throws -> Tensor {
        if packed {
            let words = try makeFloats((count + 3) / 4) { try fill(UnsafeMutableRawPointer($0)) }
            return Tensor(shape: [words.count], floats: words)
        }
        let bytes = try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            try fill(buffer.baseAddress!)
            initialized = count
        }
        let values = bytes.withUnsafeBufferPointer { b in
            [Int64](unsafeUninitializedCapacity: b.count) { buffer, initialized in
                if type == .uint8 {
                    for k in 0..<b.count { buffer[k] = Int64(b[k]) }
                } else {
                    for k in 0..<b.count { buffer[k] = Int64(Int8(bitPattern: b[k])) }
                }
                initialized = b.count
            }
        }
        return Tensor(shape: shape, ints: values, dtype: type)
    }
}

extension StepPlanner {
    /// `DequantizeLinear(a_q) + DequantizeLinear(b_q) → QuantizeLinear → y_q` (per-tensor, same shapes) as one
    /// integer step, computed as onnxruntime's QLinearAdd does: `y = saturate(round_half_even((a − z_a) · s_a/s_y +
    /// (b − z_b) · s_b/s_y + z_y))`, in float, element by element.
    static func fuseQuantizedAdd(_ i: Int, _ inferred: InferredGraph, soleReader: (String) -> Int?,
                                 producer: [String: Int]) -> PlannedStep? {
        let contexts = inferred.contexts
        let add = contexts[i]
        guard add.node.inputs.count == 2, let out = inferred.outputs[i].first,
              let pa = producer[add.node.inputs[0]], let pb = producer[add.node.inputs[1]],
              contexts[pa].node.opType == "DequantizeLinear", contexts[pb].node.opType == "DequantizeLinear",
              !inferred.folded[pa], !inferred.folded[pb],
              let a = scalarQuantization(contexts[pa]), let b = scalarQuantization(contexts[pb]),
              contexts[pa].optionalInput(0)?.shape == out.shape, contexts[pb].optionalInput(0)?.shape == out.shape,
              let q = soleReader(add.node.outputs[0]), contexts[q].node.opType == "QuantizeLinear",
              let y = scalarQuantization(contexts[q]) else { return nil }
        let kernel = QuantizedAddKernel(a: a, b: b, y: y, shape: out.shape)
        return PlannedStep(position: q, nodes: [i, q], inputs: [contexts[pa].node.inputs[0], contexts[pb].node.inputs[0]],
                           outputs: contexts[q].node.outputs, kernel: kernel)
    }
}

/// The integer residual sum (`StepPlanner.fuseQuantizedAdd`).
final class QuantizedAddKernel: IntegerStepKernel, @unchecked Sendable {
    let ratioA: Float, ratioB: Float, zeroA: Float, zeroB: Float, zeroY: Float
    let low: Float, high: Float
    let type: DataType
    let shape: [Int]

    init(a: (scale: Float, zero: Int32, type: QuantizedType), b: (scale: Float, zero: Int32, type: QuantizedType),
         y: (scale: Float, zero: Int32, type: QuantizedType), shape: [Int]) {
        ratioA = a.scale / y.scale
        ratioB = b.scale / y.scale
        zeroA = Float(a.zero)
        zeroB = Float(b.zero)
        zeroY = Float(y.zero)
        (low, high) = (y.type.range!.lowerBound, y.type.range!.upperBound)
        type = y.type.dataType
        inputTypes = [a.type, b.type]
        self.shape = shape
    }

    let inputTypes: [QuantizedType]

    /// The loops on their own, over raw pointers and scalar constants, so that they vectorize.
    @inline(never)
    static func addUnsigned(_ a: UnsafePointer<UInt8>, _ b: UnsafePointer<UInt8>, _ y: UnsafeMutablePointer<UInt8>, _ count: Int,
                            _ ra: Float, _ rb: Float, _ za: Float, _ zb: Float, _ zy: Float, _ low: Float, _ high: Float) {
        // Bounds hoisted out of the loop (see RoundToEven).
        let lo = low - 1, hi = high + 1, smallest = Int32(low), largest = Int32(high)
        for k in 0..<count {
            let v = (Float(a[k]) - za) * ra + (Float(b[k]) - zb) * rb + zy
            let c = v < lo ? lo : (v > hi ? hi : v)
            let n = Int32(bitPattern: (c + RoundToEven.magic).bitPattern) &- 0x4B40_0000
            y[k] = UInt8(truncatingIfNeeded: n < smallest ? smallest : (n > largest ? largest : n))
        }
    }

    @inline(never)
    static func addSigned(_ a: UnsafePointer<UInt8>, _ b: UnsafePointer<UInt8>, _ y: UnsafeMutablePointer<UInt8>, _ count: Int,
                          _ signedA: Bool, _ signedB: Bool, _ ra: Float, _ rb: Float, _ za: Float, _ zb: Float, _ zy: Float,
                          _ low: Float, _ high: Float) {
        let lo = low - 1, hi = high + 1, smallest = Int32(low), largest = Int32(high)
        for k in 0..<count {
            let x = signedA ? Float(Int8(bitPattern: a[k])) : Float(a[k])
            let w = signedB ? Float(Int8(bitPattern: b[k])) : Float(b[k])
            let v = (x - za) * ra + (w - zb) * rb + zy
            let c = v < lo ? lo : (v > hi ? hi : v)
            let n = Int32(bitPattern: (c + RoundToEven.magic).bitPattern) &- 0x4B40_0000
            y[k] = UInt8(truncatingIfNeeded: n < smallest ? smallest : (n > largest ? largest : n))
        }
    }

    /// Set by the step planner: which operands arrive as packed bytes, and whether the output is written packed.
    var sourcePacked = [false, false]
    var destinationPacked = false
    var integerImplementation: String { "add" + (sourcePacked.allSatisfy { $0 } ? "" : " (unpacked operand)") }
    func setSourcePacked(_ position: Int) { sourcePacked[position] = true }
    func setDestinationPacked() { destinationPacked = true }
    /// Element by element, in any order: the same for its operands and its sum (`packIntegerValues`).
    func readsChannelsLast(_ position: Int) -> Bool { true }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        guard let a = inputs[0], let b = inputs[1] else { throw ONNXError(.invalidInput, "integer Add: missing operand") }
        let count = shape.reduce(1, *)
        // The output's signedness is in its bounds (low, high): its bit pattern is written either way.
        let signedA = inputTypes[0] == .int8, signedB = inputTypes[1] == .int8
        return try PackedBytes.reading(a, packed: sourcePacked[0], count: count) { pa in
            try PackedBytes.reading(b, packed: sourcePacked[1], count: count) { pb in
                [try PackedBytes.writing(count: count, shape: shape, type: type, packed: destinationPacked) { py in
                    let (ua, ub, uy) = (pa.assumingMemoryBound(to: UInt8.self), pb.assumingMemoryBound(to: UInt8.self),
                                        py.assumingMemoryBound(to: UInt8.self))
                    if !signedA && !signedB {
                        Self.addUnsigned(ua, ub, uy, count, ratioA, ratioB, zeroA, zeroB, zeroY, low, high)
                    } else {
                        Self.addSigned(ua, ub, uy, count, signedA, signedB, ratioA, ratioB, zeroA, zeroB, zeroY, low, high)
                    }
                }]
            }
        }
    }
}

extension StepPlanner {
    /// Lets quantized values pass between integer steps as packed bytes (`PackedBytes`) when every reader is an
    /// integer step and the value is not a graph output, so no step widens them to Int64 and back.
    static func packIntegerValues(_ steps: [PlannedStep], graphOutputs: Set<String>) {
        var readers: [String: [(step: Int, position: Int)]] = [:]
        for (i, step) in steps.enumerated() {
            for (position, name) in step.inputs.enumerated() where !name.isEmpty {
                readers[name, default: []].append((i, position))
            }
        }
        func integer(_ i: Int) -> IntegerStepKernel? { steps[i].kernel as? IntegerStepKernel }
        var producer: [String: Int] = [:]
        var packed = Set<String>()
        for (i, step) in steps.enumerated() where integer(i) != nil || step.kernel is QuantizeKernel {
            let name = step.outputs[0]
            if let conv = step.kernel as? QuantizedConvKernel, conv.outputType == .float { continue }
            guard !graphOutputs.contains(name), let uses = readers[name], !uses.isEmpty,
                  uses.allSatisfy({ integer($0.step) != nil }) else { continue }
            packed.insert(name)
            producer[name] = i
            integer(i)?.setDestinationPacked()
            (step.kernel as? QuantizeKernel)?.destinationPacked = true
            for use in uses { integer(use.step)?.setSourcePacked(use.position) }
        }
        // Packed values stay in NHWC order (what oneDNN's integer convolutions compute in) when their producer
        // computes in it and every reader can read it; an Add works in any order, the same for its operands and its
        // sum.
        var channelsLast = packed.filter { name in
            guard let conv = steps[producer[name]!].kernel as? QuantizedConvKernel, conv.plan.computesDestinationChannelsLast
            else { return false }  // a quantize or a pooling step writes NCHW order
            return readers[name]!.allSatisfy { integer($0.step)!.readsChannelsLast($0.position) }
        }
        var changed = true
        while changed {
            changed = false
            for step in steps where step.kernel is QuantizedAddKernel {
                let values = step.inputs + step.outputs
                let inLayout = values.map { channelsLast.contains($0) }
                if inLayout.contains(true) && inLayout.contains(false) {
                    for v in values where channelsLast.remove(v) != nil { changed = true }
                }
            }
        }
        for name in channelsLast {
            (steps[producer[name]!].kernel as? QuantizedConvKernel)?.destinationChannelsLast = true
            for use in readers[name]! { integer(use.step)!.setSourceChannelsLast(use.position) }
        }
    }
}

/// Rounding half to even without a libm call per element (Swift's baseline x86-64 code has no vector rounding
/// instruction, so `rounded(.toNearestOrEven)` calls `rintf`): for |v| < 2²², adding 1.5 · 2²³ leaves
/// round_half_even(v) in the low mantissa bits, exactly (the bit pattern minus 0x4B40_0000). The loops using it clamp
/// v first, hoist their bounds (a checked Float → Int32 conversion inside keeps a loop scalar) and vectorize.
enum RoundToEven {
    static let magic: Float = 12_582_912  // 1.5 · 2²³, bit pattern 0x4B40_0000
}

extension StepPlanner {
    /// A per-tensor `QuantizeLinear` to uint8 or int8 of a float tensor, as a step that can hand packed bytes to
    /// integer steps (`packIntegerValues`).
    static func quantizeStep(_ i: Int, _ inferred: InferredGraph) -> PlannedStep? {
        let ctx = inferred.contexts[i]
        guard ctx.node.opType == "QuantizeLinear", ctx.optionalInput(0)?.dtype == .float,
              let q = scalarQuantization(ctx), let out = inferred.outputs[i].first else { return nil }
        return PlannedStep(position: i, nodes: [i], inputs: [ctx.node.inputs[0]], outputs: ctx.node.outputs,
                           kernel: QuantizeKernel(scale: q.scale, zero: q.zero, type: q.type, shape: out.shape))
    }
}

/// `QuantizeLinear` per tensor: `clamp(round_half_even(x / s) + z)`, NaN to the zero point.
final class QuantizeKernel: NodeKernel, @unchecked Sendable {
    let scale: Float, zero: Int32, low: Float, high: Float
    let type: DataType
    let shape: [Int]
    var destinationPacked = false

    @inline(never)
    static func quantize(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<UInt8>, _ count: Int, _ scale: Float, _ zero: Int32,
                         _ low: Float, _ high: Float) {
        // Bounds hoisted out of the loop (see RoundToEven).
        let lo = low - Float(zero) - 1, hi = high - Float(zero) + 1, smallest = Int32(low), largest = Int32(high)
        for k in 0..<count {
            let v = x[k] / scale
            let c = v.isNaN ? 0 : (v < lo ? lo : (v > hi ? hi : v))
            let n = (Int32(bitPattern: (c + RoundToEven.magic).bitPattern) &- 0x4B40_0000) &+ zero
            y[k] = UInt8(truncatingIfNeeded: n < smallest ? smallest : (n > largest ? largest : n))
        }
    }

    init(scale: Float, zero: Int32, type: QuantizedType, shape: [Int]) {
        self.scale = scale
        self.zero = zero
        (low, high) = (type.range!.lowerBound, type.range!.upperBound)
        self.type = type.dataType
        self.shape = shape
    }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        guard let x = inputs[0], x.dtype == .float else { throw ONNXError(.invalidInput, "QuantizeLinear: missing float input") }
        let (s, z, lo, hi) = (scale, zero, low, high)
        return [try PackedBytes.writing(count: x.count, shape: shape, type: type, packed: destinationPacked) { py in
            let out = py.assumingMemoryBound(to: UInt8.self)
            x.floats.withUnsafeBufferPointer { xs in Self.quantize(xs.baseAddress!, out, xs.count, s, z, lo, hi) }
        }]
    }
}

extension StepPlanner {
    /// The per-tensor quantization around node `i`: `DequantizeLinear(x_q) → node → QuantizeLinear → y_q`, with the
    /// QuantizeLinear the node's sole reader. The DequantizeLinear and QuantizeLinear nodes, their parameters, the
    /// quantized input's shape and the output's.
    typealias Sandwich = (dequantize: Int, x: (scale: Float, zero: Int32, type: QuantizedType), inShape: [Int],
                          quantize: Int, y: (scale: Float, zero: Int32, type: QuantizedType), outShape: [Int])
    static func quantizedSandwich(_ i: Int, _ inferred: InferredGraph, soleReader: (String) -> Int?,
                                  producer: [String: Int]) -> Sandwich? {
        let contexts = inferred.contexts
        let node = contexts[i].node
        guard let d = producer[node.inputs[0]], contexts[d].node.opType == "DequantizeLinear", !inferred.folded[d],
              let x = scalarQuantization(contexts[d]), let inShape = contexts[d].optionalInput(0)?.shape,
              let q = soleReader(node.outputs[0]), contexts[q].node.opType == "QuantizeLinear",
              let y = scalarQuantization(contexts[q]), let out = inferred.outputs[q].first else { return nil }
        return (d, x, inShape, q, y, out.shape)
    }

    /// The step of a sandwich around node `i` (reading the quantized input, writing the quantized output).
    static func step(_ i: Int, _ sandwich: Sandwich, _ inferred: InferredGraph, kernel: any NodeKernel) -> PlannedStep {
        PlannedStep(position: sandwich.quantize, nodes: [i, sandwich.quantize],
                    inputs: [inferred.contexts[sandwich.dequantize].node.inputs[0]],
                    outputs: inferred.contexts[sandwich.quantize].node.outputs, kernel: kernel)
    }

    /// `DequantizeLinear(x_q) → GlobalAveragePool → QuantizeLinear → y_q` (per tensor, uint8 or int8) as one integer
    /// step (onnxruntime's QLinearGlobalAveragePool).
    static func fuseQuantizedGlobalAveragePool(_ i: Int, _ inferred: InferredGraph, soleReader: (String) -> Int?,
                                               producer: [String: Int]) -> PlannedStep? {
        guard let s = quantizedSandwich(i, inferred, soleReader: soleReader, producer: producer), s.inShape.count >= 3
        else { return nil }
        let size = s.inShape[2...].reduce(1, *)
        guard size > 0, size < 1 << 24 else { return nil }
        return step(i, s, inferred, kernel: QuantizedGlobalAveragePoolKernel(x: s.x, y: s.y, batch: s.inShape[0], channels: s.inShape[1],
                                                                            size: size, outShape: s.outShape))
    }

    /// The 2-D window of a MaxPool or AveragePool the integer pools run (explicit pads, no dilation), or nil.
    static func integerPoolWindow(_ ctx: NodeContext, _ s: Sandwich) throws -> Window? {
        guard s.inShape.count == 4, s.outShape.count == 4, try ctx.string("auto_pad", default: "NOTSET") == "NOTSET"
        else { return nil }
        let (_, window) = try Operators.poolSetup(ctx)
        guard window.kernel.count == 2, window.dilations.allSatisfy({ $0 == 1 }),
              window.output == Array(s.outShape[2...]) else { return nil }
        return window
    }
}

extension Window {
    /// Calls `body(output index, rows, columns)` for each window over one `height × width` plane (2-D windows): the
    /// rows and columns of the image it covers, empty where it lies in the padding.
    func forEachWindow(height: Int, width: Int, _ body: (Int, Range<Int>, Range<Int>) -> Void) {
        let (outH, outW) = (output[0], output[1])
        for oh in 0..<outH {
            let top = oh * strides[0] - pads[0]
            let rows = Swift.max(top, 0)..<Swift.max(Swift.min(top + kernel[0], height), Swift.max(top, 0))
            for ow in 0..<outW {
                let left = ow * strides[1] - pads[1]
                let columns = Swift.max(left, 0)..<Swift.max(Swift.min(left + kernel[1], width), Swift.max(left, 0))
                body(oh * outW + ow, rows, columns)
            }
        }
    }
}

/// The integer global average pool (`StepPlanner.fuseQuantizedGlobalAveragePool`), as onnxruntime's MLAS computes
/// it: per image and channel the int32 sum of the codes, then `y = round_half_even(clamp((Σx − z_x · HW) · m,
/// qmin − z_y, qmax − z_y)) + z_y` in float with `m = s_x / (s_y · HW)`.
final class QuantizedGlobalAveragePoolKernel: IntegerStepKernel, @unchecked Sendable {
    let batch: Int, channels: Int, size: Int
    let multiplier: Float
    let bias: Int32
    let zero: Int32, low: Float, high: Float
    let sourceSigned: Bool
    let type: DataType
    let outShape: [Int]
    var sourcePacked = false, destinationPacked = false
    /// Set by the step planner: the packed input is in NHWC order.
    var sourceChannelsLast = false

    init(x: (scale: Float, zero: Int32, type: QuantizedType), y: (scale: Float, zero: Int32, type: QuantizedType),
         batch: Int, channels: Int, size: Int, outShape: [Int]) {
        (self.batch, self.channels, self.size, self.outShape) = (batch, channels, size, outShape)
        multiplier = x.scale / (y.scale * Float(size))
        bias = -x.zero * Int32(size)
        zero = y.zero
        (low, high) = (y.type.range!.lowerBound - Float(y.zero), y.type.range!.upperBound - Float(y.zero))
        sourceSigned = x.type == .int8
        type = y.type.dataType
    }

    var integerImplementation: String { "global average pool" + (sourceChannelsLast ? " (nhwc)" : "") }
    func setSourcePacked(_ position: Int) { sourcePacked = true }
    func setDestinationPacked() { destinationPacked = true }
    func readsChannelsLast(_ position: Int) -> Bool { true }
    func setSourceChannelsLast(_ position: Int) { sourceChannelsLast = true }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        guard let x = inputs[0] else { throw ONNXError(.invalidInput, "integer GlobalAveragePool: missing input") }
        let (n, c, hw) = (batch, channels, size)
        return try PackedBytes.reading(x, packed: sourcePacked, count: n * c * hw) { source in
            let bytes = source.assumingMemoryBound(to: UInt8.self)
            // Σ per (image, channel): along each channel's run in NCHW order, or pixel by pixel over the channels'
            // row in NHWC order (contiguous either way, so the loops vectorize).
            var sums = [Int32](repeating: bias, count: n * c)
            sums.withUnsafeMutableBufferPointer { sums in
                for b in 0..<n {
                    if sourceChannelsLast {
                        let row = sums.baseAddress! + b * c
                        for p in 0..<hw {
                            let pixel = bytes + (b * hw + p) * c
                            if sourceSigned {
                                for ch in 0..<c { row[ch] &+= Int32(Int8(bitPattern: pixel[ch])) }
                            } else {
                                for ch in 0..<c { row[ch] &+= Int32(pixel[ch]) }
                            }
                        }
                    } else {
                        for ch in 0..<c {
                            let run = bytes + (b * c + ch) * hw
                            var sum: Int32 = 0
                            if sourceSigned {
                                for p in 0..<hw { sum &+= Int32(Int8(bitPattern: run[p])) }
                            } else {
                                for p in 0..<hw { sum &+= Int32(run[p]) }
                            }
                            sums[b * c + ch] &+= sum
                        }
                    }
                }
            }
            return [try PackedBytes.writing(count: n * c, shape: outShape, type: type, packed: destinationPacked) { out in
                let y = out.assumingMemoryBound(to: UInt8.self)
                for k in 0..<(n * c) {
                    let v = Swift.min(Swift.max(Float(sums[k]) * multiplier, low), high)
                    y[k] = UInt8(truncatingIfNeeded: Int32(v.rounded(.toNearestOrEven)) + zero)
                }
            }]
        }
    }
}

extension StepPlanner {
    /// `DequantizeLinear(x_q) → AveragePool → QuantizeLinear → y_q` (per tensor, 2-D) as one integer step
    /// (onnxruntime's QLinearAveragePool).
    static func fuseQuantizedAveragePool(_ i: Int, _ inferred: InferredGraph, soleReader: (String) -> Int?,
                                         producer: [String: Int]) throws -> PlannedStep? {
        let pool = inferred.contexts[i]
        guard let s = quantizedSandwich(i, inferred, soleReader: soleReader, producer: producer),
              let window = try integerPoolWindow(pool, s) else { return nil }
        return step(i, s, inferred, kernel: QuantizedAveragePoolKernel(
            x: s.x, y: s.y, inShape: s.inShape, outShape: s.outShape, window: window,
            countIncludePad: try pool.int("count_include_pad", default: 0) != 0))
    }
}

/// The integer average pool (`StepPlanner.fuseQuantizedAveragePool`), computed as onnxruntime's QLinearAveragePool:
/// each code dequantized (`s_x · (x − z_x)`), summed in float in window order, divided by the window's count (the
/// kernel's size with `count_include_pad`, else the in-image part), then `y = nearbyint(v / s_y + z_y)` saturated:
/// the zero point added before rounding, unlike QuantizeLinear.
final class QuantizedAveragePoolKernel: IntegerStepKernel, @unchecked Sendable {
    let inShape: [Int], outShape: [Int]
    let window: Window
    let countIncludePad: Bool
    /// The 256 dequantized values a code can take, as onnxruntime computes each (`s_x · (x − z_x)`).
    let dequantized: [Float]
    let outputScale: Float, outputZero: Float, low: Float, high: Float
    let type: DataType
    var sourcePacked = false, destinationPacked = false

    init(x: (scale: Float, zero: Int32, type: QuantizedType), y: (scale: Float, zero: Int32, type: QuantizedType),
         inShape: [Int], outShape: [Int], window: Window, countIncludePad: Bool) {
        (self.inShape, self.outShape, self.window, self.countIncludePad) = (inShape, outShape, window, countIncludePad)
        dequantized = (0..<256).map { b in
            let code = x.type == .int8 ? Int32(Int8(bitPattern: UInt8(b))) : Int32(b)
            return x.scale * Float(code - x.zero)
        }
        (outputScale, outputZero) = (y.scale, Float(y.zero))
        (low, high) = (y.type.range!.lowerBound, y.type.range!.upperBound)
        type = y.type.dataType
    }

    var integerImplementation: String { "average pool" }
    func setSourcePacked(_ position: Int) { sourcePacked = true }
    func setDestinationPacked() { destinationPacked = true }
    func readsChannelsLast(_ position: Int) -> Bool { false }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        guard let x = inputs[0] else { throw ONNXError(.invalidInput, "integer AveragePool: missing input") }
        let (planes, height, width) = (inShape[0] * inShape[1], inShape[2], inShape[3])
        let outputs = outShape[2] * outShape[3], kernelSize = window.kernel[0] * window.kernel[1]
        return try PackedBytes.reading(x, packed: sourcePacked, count: inShape.reduce(1, *)) { source in
            let bytes = source.assumingMemoryBound(to: UInt8.self)
            return [try PackedBytes.writing(count: planes * outputs, shape: outShape, type: type, packed: destinationPacked) { out in
                let y = out.assumingMemoryBound(to: UInt8.self)
                for p in 0..<planes {
                    let plane = bytes + p * height * width
                    window.forEachWindow(height: height, width: width) { k, rows, columns in
                        var sum: Float = 0
                        for h in rows {
                            for w in columns { sum += dequantized[Int(plane[h * width + w])] }
                        }
                        let count = countIncludePad ? kernelSize : rows.count * columns.count
                        let v = (sum / Float(max(count, 1)) / outputScale + outputZero).rounded(.toNearestOrEven)
                        let c = v.isNaN ? outputZero : Swift.min(Swift.max(v, low), high)
                        y[p * outputs + k] = UInt8(truncatingIfNeeded: Int32(c))
                    }
                }
            }]
        }
    }
}

extension StepPlanner {
    /// `DequantizeLinear(x_q) → MaxPool → QuantizeLinear → y_q` with the same scale, zero point and type on both sides
    /// (as QDQ export writes it): the maximum of the codes, exactly (quantization is monotonic), as onnxruntime's
    /// integer MaxPool computes it. 2-D, no dilation, one output.
    static func fuseQuantizedMaxPool(_ i: Int, _ inferred: InferredGraph, soleReader: (String) -> Int?,
                                     producer: [String: Int]) throws -> PlannedStep? {
        let pool = inferred.contexts[i]
        guard pool.node.outputs.dropFirst().allSatisfy(\.isEmpty),
              let s = quantizedSandwich(i, inferred, soleReader: soleReader, producer: producer),
              s.x.scale == s.y.scale, s.x.zero == s.y.zero, s.x.type == s.y.type,
              let window = try integerPoolWindow(pool, s) else { return nil }
        return step(i, s, inferred, kernel: QuantizedMaxPoolKernel(type: s.x.type, inShape: s.inShape, outShape: s.outShape,
                                                                   window: window))
    }
}

/// The integer max pool (`StepPlanner.fuseQuantizedMaxPool`): per window the largest code (as int8 or uint8).
final class QuantizedMaxPoolKernel: IntegerStepKernel, @unchecked Sendable {
    let inShape: [Int], outShape: [Int]
    let window: Window
    let signed: Bool
    let type: DataType
    var sourcePacked = false, destinationPacked = false

    init(type: QuantizedType, inShape: [Int], outShape: [Int], window: Window) {
        (self.inShape, self.outShape, self.window) = (inShape, outShape, window)
        signed = type == .int8
        self.type = type.dataType
    }

    var integerImplementation: String { "max pool" }
    func setSourcePacked(_ position: Int) { sourcePacked = true }
    func setDestinationPacked() { destinationPacked = true }
    func readsChannelsLast(_ position: Int) -> Bool { false }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        guard let x = inputs[0] else { throw ONNXError(.invalidInput, "integer MaxPool: missing input") }
        let (planes, height, width) = (inShape[0] * inShape[1], inShape[2], inShape[3])
        let outputs = outShape[2] * outShape[3]
        // Signed codes compare as unsigned after flipping the sign bit (−128…127 → 0…255); a window entirely in the
        // padding gives the type's least value.
        let flip: UInt8 = signed ? 0x80 : 0
        return try PackedBytes.reading(x, packed: sourcePacked, count: inShape.reduce(1, *)) { source in
            let bytes = source.assumingMemoryBound(to: UInt8.self)
            return [try PackedBytes.writing(count: planes * outputs, shape: outShape, type: type, packed: destinationPacked) { out in
                let y = out.assumingMemoryBound(to: UInt8.self)
                for p in 0..<planes {
                    let plane = bytes + p * height * width
                    window.forEachWindow(height: height, width: width) { k, rows, columns in
                        var best: UInt8 = 0
                        for h in rows {
                            for w in columns { best = Swift.max(best, plane[h * width + w] ^ flip) }
                        }
                        y[p * outputs + k] = best ^ flip
                    }
                }
            }]
        }
    }
}
