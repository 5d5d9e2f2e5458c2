import WhittleONNX
import WhittleTensor

/// ReduceMean, ReduceSum, ReduceMax, ReduceMin, ReduceProd, ReduceL2, ReduceSumSquare (data[, axes]; axes,
/// keepdims, noop_with_empty_axes): over the given axes (all axes when none are given). Axes are an attribute
/// before opset 18 (13 for ReduceSum) and an optional input from then on. Sums accumulate in Double. ArgMax and
/// ArgMin (axis, keepdims, select_last_index) give int64 positions.
extension Operators {
    static func registerReduce(_ r: inout [String: OperatorDefinition]) {
        func reduce(_ kind: Kernels.Reduction, axesInputFrom: Int64 = 18, integers: Bool = false) -> OperatorDefinition {
            .simple(infer: { ctx in
                let x = try ctx.input(0)
                guard x.dtype.isFloatingPoint || (integers && x.dtype.isInteger && x.dtype != .bool) else {
                    throw ctx.error(.unsupportedDataType, "input has element type \(x.dtype)")
                }
                let (reduced, keep) = try reduceAxes(ctx, rank: x.rank, axesInputFrom: axesInputFrom, nil)
                return [ValueMeta(dtype: x.dtype, shape: Kernels.reducedShape(x.shape, axes: reduced, keepDims: keep))]
            }) { ctx, inputs in
                let x = inputs[0]!
                let (reduced, keep) = try reduceAxes(ctx, rank: x.rank, axesInputFrom: axesInputFrom, inputs)
                return [Kernels.reduce(kind, x, axes: reduced, keepDims: keep)]
            }
        }
        r["ReduceMean"] = reduce(.mean)
        r["ReduceSum"] = reduce(.sum, axesInputFrom: 13, integers: true)
        r["ReduceMax"] = reduce(.max, integers: true)
        r["ReduceMin"] = reduce(.min, integers: true)
        r["ReduceProd"] = reduce(.prod, integers: true)
        r["ReduceL2"] = reduce(.l2)
        r["ReduceSumSquare"] = reduce(.sumSquare)

        func argument(_ last: Bool) -> OperatorDefinition {
            .simple(infer: { ctx in
                let x = try ctx.input(0)
                guard x.dtype.isFloatingPoint || x.dtype.isInteger, x.rank >= 1 else {
                    throw ctx.error(.unsupportedDataType, "input must be a numeric tensor of rank ≥ 1, got \(x.dtype) \(x.shape)")
                }
                let axis = try ctx.axis(Int(try ctx.int("axis", default: 0)), rank: x.rank)
                let keep = try ctx.int("keepdims", default: 1) != 0
                return [ValueMeta(dtype: .int64, shape: Kernels.reducedShape(x.shape, axes: [axis], keepDims: keep))]
            }) { ctx, inputs in
                let x = inputs[0]!
                let axis = try ctx.axis(Int(try ctx.int("axis", default: 0)), rank: x.rank)
                let keep = try ctx.int("keepdims", default: 1) != 0
                let selectLast = try ctx.int("select_last_index", default: 0) != 0
                guard x.shape[axis] > 0 else { throw ctx.error(.invalidInput, "cannot take the \(last ? "ArgMin" : "ArgMax") of an empty axis") }
                let values = x.asFloats
                let outer = x.shape[..<axis].reduce(1, *), size = x.shape[axis], inner = x.shape[(axis + 1)...].reduce(1, *)
                var out = [Int64](repeating: 0, count: outer * inner)
                for o in 0..<outer {
                    for i in 0..<inner {
                        var best = 0
                        var bestValue = values[o * size * inner + i]
                        for k in 1..<size {
                            let v = values[(o * size + k) * inner + i]
                            let better = last ? (v < bestValue || (selectLast && v == bestValue))
                                : (v > bestValue || (selectLast && v == bestValue))
                            if better || (v.isNaN && !bestValue.isNaN) {
                                best = k
                                bestValue = v
                            }
                        }
                        out[o * inner + i] = Int64(best)
                    }
                }
                return [Tensor(shape: Kernels.reducedShape(x.shape, axes: [axis], keepDims: keep), ints: out, dtype: .int64)]
            }
        }
        r["ArgMax"] = argument(false)
        r["ArgMin"] = argument(true)
    }

    /// The sorted, unique axes to reduce and keepdims. No axes (attribute or input) means all of them, or none with
    /// noop_with_empty_axes.
    static func reduceAxes(_ ctx: NodeContext, rank: Int, axesInputFrom: Int64, _ inputs: [Tensor?]?) throws -> ([Int], Bool) {
        let keep = try ctx.int("keepdims", default: 1) != 0
        let raw: [Int]?
        if ctx.opset >= axesInputFrom {
            if ctx.optionalInput(1) == nil {
                raw = nil
            } else {
                guard let value = inputs?[1] ?? ctx.optionalInput(1)?.constant else {
                    throw ctx.error(.invalidGraph, "axes (input 1) must be a constant or computable from shapes")
                }
                raw = value.asInts.map { Int($0) }
            }
        } else {
            raw = try ctx.ints("axes")
        }
        guard let raw, !raw.isEmpty else {
            return (try ctx.int("noop_with_empty_axes", default: 0) != 0 ? [] : Array(0..<rank), keep)
        }
        let normalized = try raw.map { try ctx.axis($0, rank: rank, "axis") }
        guard Set(normalized).count == normalized.count else {
            throw ctx.error(.invalidAttribute, "axes \(raw) repeat an axis")
        }
        return (normalized.sorted(), keep)
    }
}

extension Kernels {
    public enum Reduction: Sendable {
        case mean, sum, max, min, prod, l2, sumSquare
    }

    /// The shape after reducing `axes`, with ones in their place when `keepDims`.
    public static func reducedShape(_ shape: [Int], axes: [Int], keepDims: Bool) -> [Int] {
        shape.enumerated().compactMap { i, d in axes.contains(i) ? (keepDims ? 1 : nil) : d }
    }

    /// `kind` over `axes` (sorted, unique). Float sums accumulate in Double; integer tensors (sum, max, min, prod)
    /// stay integers, with wrapping arithmetic as onnxruntime's.
    public static func reduce(_ kind: Reduction, _ x: Tensor, axes: [Int], keepDims: Bool) -> Tensor {
        let outShape = reducedShape(x.shape, axes: axes, keepDims: keepDims)
        let keptShape = reducedShape(x.shape, axes: axes, keepDims: true)
        let outCount = keptShape.reduce(1, *)
        let reducedCount = axes.map { x.shape[$0] }.reduce(1, *)
        // Each input element goes to the output slot with the reduced coordinates set to 0.
        let outStrides = stridesOf(keptShape).enumerated().map { axes.contains($0.offset) ? 0 : $0.element }
        let inStrides = stridesOf(x.shape)
        if x.dtype.isInteger {
            let start: Int64 = switch kind {
            case .max: .min
            case .min: .max
            case .prod: 1
            default: 0
            }
            var acc = [Int64](repeating: start, count: outCount)
            let values = x.ints
            _ = broadcastLoop(count: x.count, shape: x.shape, aStrides: inStrides, bStrides: outStrides) { ia, ib in
                switch kind {
                case .max: acc[ib] = Swift.max(acc[ib], values[ia])
                case .min: acc[ib] = Swift.min(acc[ib], values[ia])
                case .prod: acc[ib] = acc[ib] &* values[ia]
                default: acc[ib] = acc[ib] &+ values[ia]
                }
            }
            return Tensor(shape: outShape, ints: acc, dtype: x.dtype)
        }
        let start: Double = switch kind {
        case .max: -.infinity
        case .min: .infinity
        case .prod: 1
        default: 0
        }
        var acc = [Double](repeating: start, count: outCount)
        let values = x.floats
        _ = broadcastLoop(count: x.count, shape: x.shape, aStrides: inStrides, bStrides: outStrides) { ia, ib in
            let v = Double(values[ia])
            switch kind {
            case .max: acc[ib] = v.isNaN || acc[ib].isNaN ? .nan : Swift.max(acc[ib], v)
            case .min: acc[ib] = v.isNaN || acc[ib].isNaN ? .nan : Swift.min(acc[ib], v)
            case .prod: acc[ib] *= v
            case .l2, .sumSquare: acc[ib] += v * v
            case .mean, .sum: acc[ib] += v
            }
        }
        let divisor = Double(Swift.max(reducedCount, 1))
        let result: [Float] = acc.map { a in
            switch kind {
            case .mean: Float(a / divisor)
            case .l2: Float(a.squareRoot())
            default: Float(a)
            }
        }
        var t = Tensor(shape: outShape, floats: result)
        t.dtype = x.dtype
        return t
    }
}
