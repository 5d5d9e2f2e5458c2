import WhittleONNX
import WhittleTensor

/// QuantizeLinear(x, y_scale, y_zero_point; axis) and DequantizeLinear(x, x_scale, x_zero_point; axis),
/// per tensor or per axis, for int8, uint8, int4 and uint4 (and int32 for dequantizing biases).
/// `q = clamp(round_half_even(x / s) + z, qmin, qmax)` and `x = (q − z) · s`.
extension Operators {
    static func registerQuantization(_ r: inout [String: OperatorDefinition]) {
        r["QuantizeLinear"] = .simple(infer: { ctx in
            let x = try ctx.floatInput(0)
            let type = try quantizedType(ctx)
            _ = try quantAxis(ctx, x.shape)
            try checkConstantParameters(ctx, quantized: type, blocked: false)
            return [ValueMeta(dtype: type, shape: x.shape)]
        }) { ctx, inputs in
            let x = inputs[0]!
            let type = try quantizedType(ctx)
            let (scales, zeros, axisInfo) = try quantParameters(ctx, x.shape, inputs)
            let range = type.integerRange!
            let low = Float(range.lowerBound), high = Float(range.upperBound)
            var q = [Int64](repeating: 0, count: x.count)
            x.floats.withUnsafeBufferPointer { xs in
                q.withUnsafeMutableBufferPointer { qs in
                    forEachChannelRun(x.count, axisInfo) { c, run in
                        let scale = scales[c], zero = Float(zeros[c])
                        for i in run {
                            let v = (xs[i] / scale).rounded(.toNearestOrEven)
                            let shifted = v.isNaN ? zero : v + zero
                            qs[i] = Int64(min(max(shifted, low), high))
                        }
                    }
                }
            }
            return [Tensor(shape: x.shape, ints: q, dtype: type)]
        }
        r["DequantizeLinear"] = .simple(infer: { ctx in
            let x = try ctx.input(0)
            guard [.int8, .uint8, .int32, .int4, .uint4, .int16, .uint16].contains(x.dtype) else {
                throw ctx.error(.unsupportedDataType, "input x has element type \(x.dtype); an integer type is required")
            }
            let blocked = try blockLayout(ctx, x.shape) != nil
            if !blocked { _ = try quantAxis(ctx, x.shape) }
            try checkConstantParameters(ctx, quantized: x.dtype, blocked: blocked)
            return [ValueMeta(dtype: .float, shape: x.shape)]
        }) { ctx, inputs in
            let x = inputs[0]!
            if let blocks = try blockLayout(ctx, x.shape) {
                // Opset 21 blocked quantization: element (o, i, r) of [outer, axis, inner] reads parameter
                // (o, i / block, r) of [outer, ceil(axis / block), inner].
                // Block-wise quantizers (onnxruntime's among them) map each block's largest value to −8, so a scale
                // is negative when that value is positive: any finite non-zero scale is valid here.
                let scales = inputs[1]!.floats
                guard scales.allSatisfy({ $0.isFinite && $0 != 0 }) else { throw ctx.error(.invalidInput, "scales must be finite and non-zero") }
                let zeros = try zeroPoints(ctx, inputs, count: scales.count)
                if let range = x.dtype.integerRange, let bad = zeros.first(where: { !range.contains($0) }) {
                    throw ctx.error(.invalidInput, "zero point \(bad) is outside the range of \(x.dtype)")
                }
                var y = [Float](repeating: 0, count: x.count)
                let (outer, dim, inner, block) = blocks
                let counted = (dim + block - 1) / block
                for o in 0..<outer {
                    for i in 0..<dim {
                        let base = (o * dim + i) * inner, parameters = (o * counted + i / block) * inner
                        for r in 0..<inner { y[base + r] = Float(x.ints[base + r] - zeros[parameters + r]) * scales[parameters + r] }
                    }
                }
                return [Tensor(shape: x.shape, floats: y)]
            }
            let (scales, zeros, axisInfo) = try quantParameters(ctx, x.shape, inputs)
            var y = [Float](repeating: 0, count: x.count)
            x.ints.withUnsafeBufferPointer { xs in
                y.withUnsafeMutableBufferPointer { ys in
                    forEachChannelRun(x.count, axisInfo) { c, run in
                        let scale = scales[c], zero = zeros[c]
                        for i in run { ys[i] = Float(xs[i] - zero) * scale }
                    }
                }
            }
            return [Tensor(shape: x.shape, floats: y)]
        }
    }

    /// Refuses, when the model is loaded, constant scales that are zero, negative (except in blocked
    /// DequantizeLinear, whose quantizers write negative scales) or not finite, and constant zero points outside the
    /// quantized type's range: the same checks the kernels make on computed parameters.
    static func checkConstantParameters(_ ctx: NodeContext, quantized: DataType, blocked: Bool) throws {
        if let zp = ctx.optionalInput(2), !zp.dtype.isInteger {
            throw ctx.error(.invalidInput, "zero point '\(ctx.node.inputs[2])' is \(zp.dtype); it must be an integer tensor")
        }
        if let scales = ctx.optionalInput(1)?.constant?.asFloats,
           let bad = scales.firstIndex(where: { !$0.isFinite || $0 == 0 || (!blocked && $0 < 0) }) {
            let requirement = blocked ? "finite and non-zero" : "positive and finite"
            throw ctx.error(.invalidInput, "scale \(scales[bad])\(scales.count > 1 ? " (element \(bad))" : "") of input '\(ctx.node.inputs[1])' is invalid: scales must be \(requirement)")
        }
        if let zeros = ctx.optionalInput(2)?.constant?.asInts, let range = quantized.integerRange,
           let bad = zeros.firstIndex(where: { !range.contains($0) }) {
            throw ctx.error(.invalidInput, "zero point \(zeros[bad]) of input '\(ctx.node.inputs[2])' is outside the range of \(quantized) (\(range.lowerBound)…\(range.upperBound))")
        }
    }

    /// Calls `body(channel, flat index range)` for each contiguous run of elements sharing one scale (the whole
    /// tensor when per-tensor).
    static func forEachChannelRun(_ count: Int, _ axis: (size: Int, inner: Int)?, _ body: (Int, Range<Int>) -> Void) {
        guard let axis else { return body(0, 0..<count) }
        var start = 0, c = 0
        while start < count {
            body(c, start..<min(start + axis.inner, count))
            start += axis.inner
            c = (c + 1) % axis.size
        }
    }

    /// The quantized type: the zero point's type, else `output_dtype` (opset 21), else uint8.
    static func quantizedType(_ ctx: NodeContext) throws -> DataType {
        let type: DataType
        if let zp = ctx.optionalInput(2) {
            type = zp.dtype
        } else if let raw = try ctx.int("output_dtype"), raw != 0 {
            guard let t = DataType(rawValue: Int32(raw)) else { throw ctx.error(.unsupportedDataType, "output_dtype \(raw) is unknown") }
            type = t
        } else {
            type = .uint8
        }
        guard [.int8, .uint8, .int4, .uint4, .int16, .uint16].contains(type) else {
            throw ctx.error(.unsupportedDataType, "quantizing to \(type) is not supported (int8, uint8, int16, uint16, int4, uint4)")
        }
        if (type == .int4 || type == .uint4) && ctx.opset < 21 {
            throw ctx.error(.unsupportedDataType, "4-bit quantization needs opset 21, the model uses \(ctx.opset)")
        }
        return type
    }

    /// Blocked layout (opset 21 `block_size` of DequantizeLinear): the sizes before, along and after the axis, and
    /// the block size, with the scale (and zero point) of the input's rank, `ceil(size / block)` along the axis and
    /// equal elsewhere. Nil when the node is not blocked.
    static func blockLayout(_ ctx: NodeContext, _ shape: [Int]) throws -> (outer: Int, dim: Int, inner: Int, block: Int)? {
        let block = Int(try ctx.int("block_size", default: 0))
        guard block != 0 else { return nil }
        guard ctx.node.opType == "DequantizeLinear" else {
            throw ctx.error(.unsupportedOperator, "blocked quantization (block_size) is supported for DequantizeLinear only")
        }
        guard block > 0, ctx.opset >= 21 else { throw ctx.error(.invalidInput, "block_size \(block) needs opset 21 and a positive size") }
        let scale = try ctx.floatInput(1)
        let axis = try ctx.axis(Int(try ctx.int("axis", default: 1)), rank: shape.count)
        var expected = shape
        expected[axis] = (shape[axis] + block - 1) / block
        guard scale.shape == expected else {
            throw ctx.error(.shapeMismatch, "blocked scale has shape \(scale.shape); input \(shape) in blocks of \(block) along axis \(axis) needs \(expected)")
        }
        if let zp = ctx.optionalInput(2), zp.shape != scale.shape {
            throw ctx.error(.shapeMismatch, "zero point shape \(zp.shape) differs from scale shape \(scale.shape)")
        }
        return (shape[..<axis].reduce(1, *), shape[axis], shape[(axis + 1)...].reduce(1, *), block)
    }

    /// Per-axis layout (axis size and the stride of the axis) when the scale is a vector, nil for per-tensor.
    static func quantAxis(_ ctx: NodeContext, _ shape: [Int]) throws -> (size: Int, inner: Int)? {
        let scale = try ctx.floatInput(1)
        if try ctx.int("block_size", default: 0) != 0 {
            throw ctx.error(.unsupportedOperator, "blocked quantization (block_size) is supported for DequantizeLinear only")
        }
        if let zp = ctx.optionalInput(2), zp.count != scale.count || (zp.rank > 1) != (scale.rank > 1) {
            throw ctx.error(.shapeMismatch, "zero point shape \(zp.shape) differs from scale shape \(scale.shape)")
        }
        if scale.count == 1 && scale.rank <= 1 { return nil }
        guard scale.rank == 1 else { throw ctx.error(.shapeMismatch, "scale must be a scalar or a 1-D tensor, got \(scale.shape)") }
        let axis = try ctx.axis(Int(try ctx.int("axis", default: 1)), rank: shape.count)
        guard shape[axis] == scale.count else {
            throw ctx.error(.shapeMismatch, "scale has \(scale.count) values, axis \(axis) of \(shape) has \(shape[axis])")
        }
        return (shape[axis], shape[(axis + 1)...].reduce(1, *))
    }

    /// The zero points (input 2), one per scale: an integer tensor (a float one has no integer values to read), or
    /// zeros when absent.
    static func zeroPoints(_ ctx: NodeContext, _ inputs: [Tensor?], count: Int) throws -> [Int64] {
        guard inputs.count > 2, let zp = inputs[2] else { return [Int64](repeating: 0, count: count) }
        guard zp.dtype.isInteger else {
            throw ctx.error(.invalidInput, "zero point '\(ctx.node.inputs[2])' is \(zp.dtype); it must be an integer tensor")
        }
        let zeros = zp.ints
        guard zeros.count == count else {
            throw ctx.error(.shapeMismatch, "zero point '\(ctx.node.inputs[2])' has \(zeros.count) values for \(count) scales")
        }
        return zeros
    }

    static func quantParameters(_ ctx: NodeContext, _ shape: [Int], _ inputs: [Tensor?]) throws
        -> ([Float], [Int64], (size: Int, inner: Int)?) {
        let axisInfo = try quantAxis(ctx, shape)
        let scales = inputs[1]!.floats
        guard scales.allSatisfy({ $0.isFinite && $0 > 0 }) else {
            throw ctx.error(.invalidInput, "scales must be positive and finite")
        }
        let zeros = try zeroPoints(ctx, inputs, count: scales.count)
        // The zero point lies in the quantized type's range (the quantized input's for DequantizeLinear).
        let quantized = ctx.node.opType == "DequantizeLinear" ? inputs[0]!.dtype : try quantizedType(ctx)
        if let range = quantized.integerRange, let bad = zeros.first(where: { !range.contains($0) }) {
            throw ctx.error(.invalidInput, "zero point \(bad) is outside the range of \(quantized) (\(range.lowerBound)…\(range.upperBound))")
        }
        return (scales, zeros, axisInfo)
    }
}
