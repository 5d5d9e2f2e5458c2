import WhittleONNX
import WhittleTensor

/// ReduceMean(data[, axes]; axes, keepdims, noop_with_empty_axes): mean over the given axes (all axes when none are
/// given). Axes are an attribute before opset 18 and an optional input from 18.
extension Operators {
    static func registerReduce(_ r: inout [String: OperatorDefinition]) {
        @Sendable func axes(_ ctx: NodeContext, rank: Int) throws -> [Int]? {
            let raw: [Int]?
            if ctx.opset >= 18 {
                raw = ctx.optionalInput(1) == nil ? nil : try ctx.constantInput(1, "axes").asInts.map { Int($0) }
            } else {
                raw = try ctx.ints("axes")
            }
            guard let raw, !raw.isEmpty else {
                return try ctx.int("noop_with_empty_axes", default: 0) != 0 ? [] : nil
            }
            let normalized = try raw.map { try ctx.axis($0, rank: rank, "axis") }
            guard Set(normalized).count == normalized.count else {
                throw ctx.error(.invalidAttribute, "axes \(raw) repeat an axis")
            }
            return normalized.sorted()
        }
        r["ReduceMean"] = .simple(infer: { ctx in
            let x = try ctx.floatInput(0)
            let reduced = try axes(ctx, rank: x.rank) ?? Array(0..<x.rank)
            let keep = try ctx.int("keepdims", default: 1) != 0
            var shape: [Int] = []
            for (i, d) in x.shape.enumerated() {
                if reduced.contains(i) { if keep { shape.append(1) } } else { shape.append(d) }
            }
            return [ValueMeta(dtype: x.dtype, shape: shape)]
        }) { ctx, inputs in
            let x = inputs[0]!
            let reduced = try axes(ctx, rank: x.rank) ?? Array(0..<x.rank)
            let keep = try ctx.int("keepdims", default: 1) != 0
            return [Kernels.reduceMean(x, axes: reduced, keepDims: keep)]
        }
    }
}

extension Kernels {
    /// Mean over `axes` (sorted, unique), accumulated in Double.
    static func reduceMean(_ x: Tensor, axes: [Int], keepDims: Bool) -> Tensor {
        var outShape: [Int] = []
        var keptShape: [Int] = []
        for (i, d) in x.shape.enumerated() {
            if axes.contains(i) {
                keptShape.append(1)
                if keepDims { outShape.append(1) }
            } else {
                keptShape.append(d)
                outShape.append(d)
            }
        }
        let outCount = keptShape.reduce(1, *)
        let reducedCount = axes.map { x.shape[$0] }.reduce(1, *)
        var sums = [Double](repeating: 0, count: outCount)
        // Each input element adds into the output slot with the reduced coordinates set to 0.
        let outStrides = stridesOf(keptShape).enumerated().map { axes.contains($0.offset) ? 0 : $0.element }
        let values = x.floats
        _ = broadcastLoop(count: x.count, shape: x.shape, aStrides: stridesOf(x.shape), bStrides: outStrides) { ia, ib in
            sums[ib] += Double(values[ia])
        }
        let divisor = Double(max(reducedCount, 1))
        return Tensor(shape: outShape, floats: sums.map { Float($0 / divisor) })
    }
}
