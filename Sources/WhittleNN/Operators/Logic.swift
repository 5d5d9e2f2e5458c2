import WhittleONNX
import WhittleTensor

/// Comparisons (Equal, Less, Greater, LessOrEqual, GreaterOrEqual) on float, integer or bool tensors, giving bool;
/// Not, And, Or, Xor on bool; and Where(condition, X, Y), all with NumPy broadcasting. These build attention masks
/// (`input_ids == pad`, `where(mask, 0, -inf)`) and are usually folded into constants before the model runs.
extension Operators {
    static func registerLogic(_ r: inout [String: OperatorDefinition]) {
        func comparison(_ name: String, minimumOpset: Int64 = 1, _ f: @escaping @Sendable (Float, Float) -> Bool,
                        _ g: @escaping @Sendable (Int64, Int64) -> Bool) -> OperatorDefinition {
            .simple(minimumOpset: minimumOpset, infer: { ctx in
                let a = try ctx.input(0), b = try ctx.input(1)
                guard a.dtype.isFloatingPoint == b.dtype.isFloatingPoint, a.dtype.isFloatingPoint || a.dtype.isInteger else {
                    throw ctx.error(.unsupportedDataType, "operands have element types \(a.dtype) and \(b.dtype)")
                }
                return [ValueMeta(dtype: .bool, shape: try broadcastOutput(ctx, a.shape, b.shape))]
            }) { _, inputs in
                let a = inputs[0]!, b = inputs[1]!
                if a.dtype.isFloatingPoint {
                    let (values, shape) = try Kernels.broadcastFloat(a.floats, a.shape, b.floats, b.shape) { f($0, $1) ? 1 : 0 }
                    return [Tensor(shape: shape, ints: values.map { Int64($0) }, dtype: .bool)]
                }
                let (values, shape) = try Kernels.broadcastInt(a.ints, a.shape, b.ints, b.shape) { g($0, $1) ? 1 : 0 }
                return [Tensor(shape: shape, ints: values, dtype: .bool)]
            }
        }
        r["Equal"] = comparison("Equal", { $0 == $1 }, { $0 == $1 })
        r["Less"] = comparison("Less", { $0 < $1 }, { $0 < $1 })
        r["Greater"] = comparison("Greater", { $0 > $1 }, { $0 > $1 })
        r["LessOrEqual"] = comparison("LessOrEqual", minimumOpset: 12, { $0 <= $1 }, { $0 <= $1 })
        r["GreaterOrEqual"] = comparison("GreaterOrEqual", minimumOpset: 12, { $0 >= $1 }, { $0 >= $1 })

        func logical(_ f: @escaping @Sendable (Bool, Bool) -> Bool) -> OperatorDefinition {
            .simple(infer: { ctx in
                let a = try boolInput(ctx, 0), b = try boolInput(ctx, 1)
                return [ValueMeta(dtype: .bool, shape: try broadcastOutput(ctx, a.shape, b.shape))]
            }) { _, inputs in
                let a = inputs[0]!, b = inputs[1]!
                let (values, shape) = try Kernels.broadcastInt(a.ints, a.shape, b.ints, b.shape) { f($0 != 0, $1 != 0) ? 1 : 0 }
                return [Tensor(shape: shape, ints: values, dtype: .bool)]
            }
        }
        r["And"] = logical { $0 && $1 }
        r["Or"] = logical { $0 || $1 }
        r["Xor"] = logical { $0 != $1 }
        r["Not"] = .simple(infer: { ctx in
            let x = try boolInput(ctx, 0)
            return [ValueMeta(dtype: .bool, shape: x.shape)]
        }) { _, inputs in
            [Tensor(shape: inputs[0]!.shape, ints: inputs[0]!.ints.map { $0 == 0 ? 1 : 0 }, dtype: .bool)]
        }
        r["Where"] = .simple(infer: { ctx in
            let c = try boolInput(ctx, 0), x = try ctx.input(1), y = try ctx.input(2)
            guard x.dtype == y.dtype else {
                throw ctx.error(.unsupportedDataType, "X has element type \(x.dtype) and Y \(y.dtype); they must match")
            }
            let shape = try broadcastOutput(ctx, try broadcastOutput(ctx, c.shape, x.shape), y.shape)
            return [ValueMeta(dtype: x.dtype, shape: shape)]
        }) { _, inputs in
            let c = inputs[0]!, x = inputs[1]!, y = inputs[2]!
            let shape = try broadcastShape(try broadcastShape(c.shape, x.shape), y.shape)
            let ci = Kernels.broadcastIndices(c.shape, to: shape), xi = Kernels.broadcastIndices(x.shape, to: shape),
                yi = Kernels.broadcastIndices(y.shape, to: shape)
            let count = shape.reduce(1, *)
            if x.dtype.isFloatingPoint {
                let (xs, ys, cs) = (x.floats, y.floats, c.ints)
                return [Tensor(shape: shape, floats: (0..<count).map { cs[ci[$0]] != 0 ? xs[xi[$0]] : ys[yi[$0]] })]
            }
            let (xs, ys, cs) = (x.ints, y.ints, c.ints)
            return [Tensor(shape: shape, ints: (0..<count).map { cs[ci[$0]] != 0 ? xs[xi[$0]] : ys[yi[$0]] }, dtype: x.dtype)]
        }
    }

    /// Input `i`, which must be a bool tensor.
    static func boolInput(_ ctx: NodeContext, _ i: Int) throws -> ValueMeta {
        let meta = try ctx.input(i)
        guard meta.dtype == .bool else {
            throw ctx.error(.unsupportedDataType, "input \(i) ('\(ctx.node.inputs[i])') has element type \(meta.dtype); bool is required")
        }
        return meta
    }

    /// The broadcast of two shapes, or an error naming the node.
    static func broadcastOutput(_ ctx: NodeContext, _ a: [Int], _ b: [Int]) throws -> [Int] {
        do {
            return try broadcastShape(a, b)
        } catch {
            throw ctx.error(.shapeMismatch, "shapes \(a) and \(b) cannot be broadcast together")
        }
    }
}

extension Kernels {
    /// For every element of `target` in row-major order, the offset of the element of a tensor of `shape` that
    /// broadcasting reads there. `shape` must broadcast to `target`.
    public static func broadcastIndices(_ shape: [Int], to target: [Int]) -> [Int] {
        let count = target.reduce(1, *)
        if shape.reduce(1, *) == count { return Array(0..<count) }
        return broadcastLoop(count: count, shape: target, aStrides: broadcastStrides(shape, to: target),
                             bStrides: [Int](repeating: 0, count: target.count)) { ia, _ in ia }
    }
}
