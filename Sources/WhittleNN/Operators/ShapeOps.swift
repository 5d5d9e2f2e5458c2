import WhittleONNX
import WhittleTensor

/// Ops that change only shape or layout: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity, Dropout,
/// and the shape sources Shape, Constant, ConstantOfShape. They work on every element type Whittle holds.
extension Operators {
    static func registerShapeOps(_ r: inout [String: OperatorDefinition]) {
        r["Identity"] = .simple(infer: { ctx in [try ctx.input(0).withoutConstant] }) { _, inputs in [inputs[0]!] }

        r["Dropout"] = .simple(infer: { ctx in
            let x = try ctx.input(0)
            var outs = [ValueMeta(dtype: x.dtype, shape: x.shape)]
            if ctx.node.outputs.count > 1 { outs.append(ValueMeta(dtype: .bool, shape: x.shape)) }
            return outs
        }) { ctx, inputs in
            // Inference: the identity; the mask (if requested) keeps everything.
            var outs = [inputs[0]!]
            if ctx.node.outputs.count > 1 {
                outs.append(Tensor(shape: inputs[0]!.shape, ints: [Int64](repeating: 1, count: inputs[0]!.count), dtype: .bool))
            }
            return outs
        }

        r["Reshape"] = .simple(infer: { ctx in
            let x = try ctx.input(0)
            let target = try ctx.constantInput(1, "the target shape").asInts
            return [ValueMeta(dtype: x.dtype, shape: try reshapeTarget(ctx, x.shape, target))]
        }) { ctx, inputs in
            let target = try reshapeTarget(ctx, inputs[0]!.shape, inputs[1]!.asInts)
            return [try inputs[0]!.reshaped(target)]
        }

        r["Flatten"] = .simple(infer: { ctx in
            let x = try ctx.input(0)
            return [ValueMeta(dtype: x.dtype, shape: try flattenShape(ctx, x.shape))]
        }) { ctx, inputs in [try inputs[0]!.reshaped(try flattenShape(ctx, inputs[0]!.shape))] }

        r["Transpose"] = .simple(infer: { ctx in
            let x = try ctx.input(0)
            let perm = try transposePerm(ctx, rank: x.rank)
            return [ValueMeta(dtype: x.dtype, shape: perm.map { x.shape[$0] })]
        }) { ctx, inputs in
            let x = inputs[0]!
            let perm = try transposePerm(ctx, rank: x.rank)
            let shape = perm.map { x.shape[$0] }
            if x.dtype.isInteger {
                return [Tensor(shape: shape, ints: Kernels.transpose(x.ints, shape: x.shape, perm: perm), dtype: x.dtype)]
            }
            return [Tensor(shape: shape, floats: Kernels.transpose(x.floats, shape: x.shape, perm: perm))]
        }

        r["Squeeze"] = .simple(infer: { ctx in
            let x = try ctx.input(0)
            return [ValueMeta(dtype: x.dtype, shape: try squeezeShape(ctx, x.shape, nil))]
        }) { ctx, inputs in [try inputs[0]!.reshaped(try squeezeShape(ctx, inputs[0]!.shape, inputs))] }

        r["Unsqueeze"] = .simple(infer: { ctx in
            let x = try ctx.input(0)
            return [ValueMeta(dtype: x.dtype, shape: try unsqueezeShape(ctx, x.shape, nil))]
        }) { ctx, inputs in [try inputs[0]!.reshaped(try unsqueezeShape(ctx, inputs[0]!.shape, inputs))] }

        r["Shape"] = .simple(infer: { ctx in
            let x = try ctx.input(0)
            let dims = try shapeSlice(ctx, x.shape).map { Int64($0) }
            return [ValueMeta(Tensor(shape: [dims.count], ints: dims, dtype: .int64))]
        }) { ctx, inputs in
            let dims = try shapeSlice(ctx, inputs[0]!.shape).map { Int64($0) }
            return [Tensor(shape: [dims.count], ints: dims, dtype: .int64)]
        }

        r["Constant"] = .simple(infer: { ctx in [ValueMeta(try constantValue(ctx))] }) { ctx, _ in [try constantValue(ctx)] }

        r["ConstantOfShape"] = .simple(infer: { ctx in
            // Folded only when small: a large constant is made when the graph runs, not by shape inference.
            let (shape, fill, count) = try constantOfShapeTarget(ctx, nil)
            if count <= ShapeInference.foldingLimit { return [ValueMeta(try constantOfShape(ctx, nil))] }
            return [ValueMeta(dtype: fill.dtype, shape: shape)]
        }) { ctx, inputs in
            [try constantOfShape(ctx, inputs[0])]
        }
    }

    static func reshapeTarget(_ ctx: NodeContext, _ shape: [Int], _ target: [Int64]) throws -> [Int] {
        let allowZero = try ctx.int("allowzero", default: 0) != 0
        var out: [Int] = []
        var inferred: Int?
        for (i, d) in target.enumerated() {
            switch d {
            case -1:
                guard inferred == nil else { throw ctx.error(.invalidAttribute, "target shape \(target) has more than one -1") }
                inferred = i
                out.append(1)
            case 0 where !allowZero:
                guard i < shape.count else { throw ctx.error(.shapeMismatch, "target shape \(target) copies dimension \(i) of \(shape), which does not exist") }
                out.append(shape[i])
            default:
                guard d >= 0 else { throw ctx.error(.invalidAttribute, "target shape \(target) has a negative dimension") }
                out.append(Int(d))
            }
        }
        guard let total = TensorLimits.elementCount(shape) else { throw ctx.error(.tooLarge, TensorLimits.limitMessage(shape, "the input")) }
        guard let known = TensorLimits.elementCount(out) else {
            throw ctx.error(.tooLarge, TensorLimits.limitMessage(out, "the target shape \(target)"))
        }
        if let inferred {
            guard known > 0, total % known == 0 else {
                throw ctx.error(.shapeMismatch, "cannot reshape \(shape) to \(target)")
            }
            out[inferred] = total / known
        }
        guard TensorLimits.elementCount(out) == total else { throw ctx.error(.shapeMismatch, "cannot reshape \(shape) (\(total) elements) to \(target)") }
        return out
    }

    static func flattenShape(_ ctx: NodeContext, _ shape: [Int]) throws -> [Int] {
        var axis = Int(try ctx.int("axis", default: 1))
        if axis < 0 { axis += shape.count }
        guard axis >= 0, axis <= shape.count else { throw ctx.error(.invalidAttribute, "axis \(axis) is out of range for shape \(shape)") }
        return [shape[..<axis].reduce(1, *), shape[axis...].reduce(1, *)]
    }

    static func transposePerm(_ ctx: NodeContext, rank: Int) throws -> [Int] {
        let perm = try ctx.ints("perm") ?? Array((0..<rank).reversed())
        guard perm.sorted() == Array(0..<rank) else {
            throw ctx.error(.invalidAttribute, "perm \(perm) is not a permutation of 0..<\(rank)")
        }
        return perm
    }

    /// Axes from the attribute (before opset 13) or the optional second input (from 13).
    static func axesArgument(_ ctx: NodeContext, _ inputs: [Tensor?]?) throws -> [Int]? {
        if ctx.opset >= 13 {
            guard ctx.optionalInput(1) != nil else { return nil }
            let value = inputs?[1] ?? ctx.optionalInput(1)?.constant
            guard let value else { throw ctx.error(.invalidGraph, "axes (input 1) must be a constant") }
            return value.asInts.map { Int($0) }
        }
        return try ctx.ints("axes")
    }

    static func squeezeShape(_ ctx: NodeContext, _ shape: [Int], _ inputs: [Tensor?]?) throws -> [Int] {
        guard let raw = try axesArgument(ctx, inputs) else { return shape.filter { $0 != 1 } }
        let axes = Set(try raw.map { try ctx.axis($0, rank: shape.count) })
        for a in axes where shape[a] != 1 {
            throw ctx.error(.shapeMismatch, "cannot squeeze axis \(a) of shape \(shape): its size is not 1")
        }
        return shape.enumerated().filter { !axes.contains($0.offset) }.map(\.element)
    }

    static func unsqueezeShape(_ ctx: NodeContext, _ shape: [Int], _ inputs: [Tensor?]?) throws -> [Int] {
        guard let raw = try axesArgument(ctx, inputs) else { throw ctx.error(.invalidAttribute, "axes are required") }
        let rank = shape.count + raw.count
        let axes = try raw.map { try ctx.axis($0, rank: rank) }
        guard Set(axes).count == axes.count else { throw ctx.error(.invalidAttribute, "axes \(raw) repeat an axis") }
        var out: [Int] = []
        var source = shape.makeIterator()
        for i in 0..<rank { out.append(axes.contains(i) ? 1 : source.next()!) }
        return out
    }

    static func shapeSlice(_ ctx: NodeContext, _ shape: [Int]) throws -> [Int] {
        let rank = shape.count
        func clamp(_ v: Int64) -> Int { min(max(Int(v) < 0 ? Int(v) + rank : Int(v), 0), rank) }
        let start = clamp(try ctx.int("start", default: 0))
        let end = clamp(try ctx.int("end", default: Int64(rank)))
        return start < end ? Array(shape[start..<end]) : []
    }

    static func constantValue(_ ctx: NodeContext) throws -> Tensor {
        guard let attribute = ctx.node.attributes.first else {
            throw ctx.error(.invalidAttribute, "Constant has no value attribute")
        }
        switch (attribute.name, attribute.value) {
        case ("value", .tensor(let t)): return t
        case ("value_float", .float(let v)): return Tensor.scalar(v)
        case ("value_floats", .floats(let v)): return Tensor(shape: [v.count], floats: v)
        case ("value_int", .int(let v)): return Tensor(shape: [], ints: [v], dtype: .int64)
        case ("value_ints", .ints(let v)): return Tensor(shape: [v.count], ints: v, dtype: .int64)
        default:
            throw ctx.error(.unsupportedDataType, "Constant attribute '\(attribute.name)' (\(attribute.value.kindName)) is not supported")
        }
    }

    /// The output shape, the fill value and the element count, checked.
    static func constantOfShapeTarget(_ ctx: NodeContext, _ input: Tensor?) throws -> ([Int], Tensor, Int) {
        guard let shapeTensor = input ?? ctx.inputs.first??.constant else {
            throw ctx.error(.invalidGraph, "the shape input must be a constant or computable from shapes")
        }
        let shape = shapeTensor.asInts.map { Int($0) }
        guard shape.allSatisfy({ $0 >= 0 }) else { throw ctx.error(.invalidInput, "shape \(shape) has a negative dimension") }
        guard let count = TensorLimits.elementCount(shape) else {
            throw ctx.error(.tooLarge, TensorLimits.limitMessage(shape, "the output"))
        }
        let fill = ctx.node.attribute("value")?.value.tensor ?? Tensor(shape: [1], floats: [0])
        guard fill.count == 1 else { throw ctx.error(.invalidAttribute, "value must hold one element") }
        return (shape, fill, count)
    }

    static func constantOfShape(_ ctx: NodeContext, _ input: Tensor?) throws -> Tensor {
        let (shape, fill, count) = try constantOfShapeTarget(ctx, input)
        if fill.dtype.isInteger {
            return Tensor(shape: shape, ints: [Int64](repeating: fill.ints[0], count: count), dtype: fill.dtype)
        }
        var t = Tensor(shape: shape, floats: [Float](repeating: fill.floats[0], count: count))
        t.dtype = fill.dtype
        return t
    }
}

extension ValueMeta {
    /// The same type and shape with the constant dropped (so that folding re-derives it).
    var withoutConstant: ValueMeta { ValueMeta(dtype: dtype, shape: shape) }
}
