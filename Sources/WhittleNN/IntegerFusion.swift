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
        let zeroPoint = ctx.optionalInput(2)
        if zeroPoint != nil, zeroPoint?.constant == nil { return nil }
        let z = zeroPoint?.constant.flatMap { $0.count == 1 ? $0.asInts.first : nil }
        guard zeroPoint == nil || z != nil else { return nil }
        let dtype = ctx.node.opType == "DequantizeLinear" ? ctx.optionalInput(0)?.dtype : (zeroPoint?.dtype ?? .uint8)
        let type: QuantizedType
        switch dtype {
        case .uint8?: type = .uint8
        case .int8?: type = .int8
        default: return nil
        }
        return (s, Int32(z ?? 0), type)
    }

    /// The integer step for the Conv at `i`, or nil when the node is not the core of a QDQ group the integer path
    /// runs exactly (2-D, int8 weights per tensor or per output channel with zero points 0, a per-tensor uint8 or
    /// int8 input; on CPUs without VNNI, weights within 7 bits).
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
        let (x, window, outShape) = try Operators.convSetup(ctx)
        guard x.rank == 4, codes.rank == 4 else { return nil }
        let channels = codes.shape[0]
        // Per tensor, or per output channel along axis 0.
        if weightScales.count != 1 {
            guard weightScales.count == channels, (try contexts[wq].int("axis", default: 1)) == 0 else { return nil }
        }
        let weights = codes.ints.map { Int8(truncatingIfNeeded: $0) }
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
        let groups = Int(try ctx.int("group", default: 1))
        let g = window.geometry(batch: x.shape[0], channels: x.shape[1], spatial: Array(x.shape[2...]),
                                outChannels: channels, groups: groups)
        let requantization = Requantization(scales: productScales.map { $0 / outputScale }, sourceZero: input.zero,
                                            destinationZero: outputZero, post: post)
        let plan: QuantizedConvPlan
        do {
            plan = try QuantizedConvPlan(g, source: input.type, destination: destination, weights: weights, bias: bias,
                                         requantization: requantization)
        } catch {
            return nil  // a geometry or type oneDNN has no integer kernel for: the float path runs it
        }
        let outputType: DataType = destination == .uint8 ? .uint8 : destination == .int8 ? .int8 : .float
        return PlannedStep(position: position, nodes: nodes, inputs: [contexts[d].node.inputs[0]], outputs: [output],
                           kernel: QuantizedConvKernel(plan: plan, outShape: outShape, outputType: outputType))
    }
}

/// A QDQ group as one integer convolution (`StepPlanner.fuseQuantizedConvolution`): reads the quantized input,
/// writes the quantized output (or float).
final class QuantizedConvKernel: NodeKernel, @unchecked Sendable {
    let plan: QuantizedConvPlan
    let outShape: [Int]
    let outputType: DataType

    init(plan: QuantizedConvPlan, outShape: [Int], outputType: DataType) {
        self.plan = plan
        self.outShape = outShape
        self.outputType = outputType
    }

    var implementation: String { plan.implementation }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        guard let x = inputs[0], x.dtype == .uint8 || x.dtype == .int8 else {
            throw ONNXError(.invalidInput, "integer convolution: the input must be uint8 or int8")
        }
        let source = x.ints.withUnsafeBufferPointer { values in
            [UInt8](unsafeUninitializedCapacity: values.count) { buffer, initialized in
                for k in 0..<values.count { buffer[k] = UInt8(truncatingIfNeeded: values[k]) }
                initialized = values.count
            }
        }
        let count = outShape.reduce(1, *)
        if outputType == .float {
            let y = try source.withUnsafeBytes { src in try makeFloats(count) { try plan.run(src.baseAddress!, $0) } }
            return [Tensor(shape: outShape, floats: y)]
        }
        let bytes = try source.withUnsafeBytes { src in
            try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
                try plan.run(src.baseAddress!, buffer.baseAddress!)
                initialized = count
            }
        }
        let values = bytes.withUnsafeBufferPointer { b in
            [Int64](unsafeUninitializedCapacity: b.count) { buffer, initialized in
                if outputType == .uint8 {
                    for k in 0..<b.count { buffer[k] = Int64(b[k]) }
                } else {
                    for k in 0..<b.count { buffer[k] = Int64(Int8(bitPattern: b[k])) }
                }
                initialized = b.count
            }
        }
        return [Tensor(shape: outShape, ints: values, dtype: outputType)]
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
final class QuantizedAddKernel: NodeKernel, @unchecked Sendable {
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
        type = y.type == .uint8 ? .uint8 : .int8
        self.shape = shape
    }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        guard let a = inputs[0], let b = inputs[1], a.dtype.isInteger, b.dtype.isInteger, a.count == b.count else {
            throw ONNXError(.invalidInput, "integer Add: the operands must be quantized tensors of one shape")
        }
        let values = a.ints.withUnsafeBufferPointer { pa in
            b.ints.withUnsafeBufferPointer { pb in
                [Int64](unsafeUninitializedCapacity: pa.count) { buffer, initialized in
                    for k in 0..<pa.count {
                        let v = (Float(pa[k]) - zeroA) * ratioA + (Float(pb[k]) - zeroB) * ratioB + zeroY
                        buffer[k] = Int64(min(max(v.rounded(.toNearestOrEven), low), high))
                    }
                    initialized = pa.count
                }
            }
        }
        return [Tensor(shape: shape, ints: values, dtype: type)]
    }
}
