import WhittleONNX
import WhittleTensor

/// Ops that copy elements by computed indices: Expand, Tile, Split, GatherElements, and Range. They work on every
/// element type Whittle holds; shapes come from constant inputs (usually folded from Shape chains).
extension Operators {
    static func registerIndexing(_ r: inout [String: OperatorDefinition]) {
        r["Expand"] = .simple(minimumOpset: 8, infer: { ctx in
            let x = try ctx.input(0)
            let target = try ctx.checkedShape(try expandTarget(ctx, try ctx.constantInput(1, "the shape").asInts, x.shape), "output")
            return [ValueMeta(dtype: x.dtype, shape: target)]
        }) { ctx, inputs in
            let x = inputs[0]!
            let target = try expandTarget(ctx, inputs[1]!.asInts, x.shape)
            return [x.gathered(shape: target, sources: Kernels.broadcastIndices(x.shape, to: target))]
        }

        r["Tile"] = .simple(minimumOpset: 6, infer: { ctx in
            let x = try ctx.input(0)
            let repeats = try tileRepeats(ctx, try ctx.constantInput(1, "repeats"), rank: x.rank)
            return [ValueMeta(dtype: x.dtype, shape: try ctx.checkedShape(zip(x.shape, repeats).map { $0 * $1 }, "output"))]
        }) { ctx, inputs in
            let x = inputs[0]!
            let (shape, sources) = tileSources(x.shape, try tileRepeats(ctx, inputs[1]!, rank: x.rank))
            return [x.gathered(shape: shape, sources: sources)]
        }

        r["Split"] = .simple(minimumOpset: 11, infer: { ctx in
            let x = try ctx.input(0)
            let (axis, sizes) = try splitSizes(ctx, x.shape, nil)
            return sizes.map { size in
                var shape = x.shape
                shape[axis] = size
                return ValueMeta(dtype: x.dtype, shape: shape)
            }
        }) { ctx, inputs in
            let x = inputs[0]!
            let (axis, sizes) = try splitSizes(ctx, x.shape, inputs)
            let outer = x.shape[..<axis].reduce(1, *), inner = x.shape[(axis + 1)...].reduce(1, *)
            var start = 0
            return sizes.map { size in
                var shape = x.shape
                shape[axis] = size
                var sources: [Int] = []
                sources.reserveCapacity(outer * size * inner)
                for o in 0..<outer {
                    let base = (o * x.shape[axis] + start) * inner
                    sources.append(contentsOf: base..<(base + size * inner))
                }
                start += size
                return x.gathered(shape: shape, sources: sources)
            }
        }

        r["GatherElements"] = .simple(minimumOpset: 11, infer: { ctx in
            let data = try ctx.input(0), indices = try ctx.input(1)
            guard indices.dtype == .int64 || indices.dtype == .int32 else {
                throw ctx.error(.unsupportedDataType, "indices have element type \(indices.dtype); int32 or int64 is required")
            }
            guard indices.rank == data.rank, data.rank >= 1 else {
                throw ctx.error(.shapeMismatch, "indices \(indices.shape) must have the rank of data \(data.shape)")
            }
            _ = try ctx.axis(Int(try ctx.int("axis", default: 0)), rank: data.rank)
            return [ValueMeta(dtype: data.dtype, shape: indices.shape)]
        }) { ctx, inputs in
            let data = inputs[0]!, indices = inputs[1]!
            return [data.gathered(shape: indices.shape, sources: try gatherElementsSources(ctx, data.shape, indices))]
        }

        r["Range"] = .simple(minimumOpset: 11, infer: { ctx in
            let start = try ctx.input(0)
            guard start.dtype.isFloatingPoint || [.int64, .int32, .int16].contains(start.dtype) else {
                throw ctx.error(.unsupportedDataType, "Range of element type \(start.dtype) is not supported")
            }
            if let s = start.constant, let l = ctx.optionalInput(1)?.constant, let d = ctx.optionalInput(2)?.constant {
                return [ValueMeta(dtype: start.dtype, shape: [try rangeCount(ctx, s, l, d)])]
            }
            throw ctx.error(.invalidGraph, "start, limit and delta must be constants or computable from shapes (the output's length depends on them)")
        }) { ctx, inputs in
            let start = inputs[0]!, limit = inputs[1]!, delta = inputs[2]!
            let count = try rangeCount(ctx, start, limit, delta)
            if start.dtype.isInteger {
                let s = start.ints[0], d = delta.ints[0]
                return [Tensor(shape: [count], ints: (0..<count).map { s &+ Int64($0) &* d }, dtype: start.dtype)]
            }
            let s = start.floats[0], d = delta.floats[0]
            var t = Tensor(shape: [count], floats: (0..<count).map { s + Float($0) * d })
            t.dtype = start.dtype
            return [t]
        }
    }

    /// Tile's output shape and, per output element, the input element it copies: (i₀ … iₙ) reads
    /// (i₀ mod d₀ … iₙ mod dₙ).
    static func tileSources(_ shape: [Int], _ repeats: [Int]) -> ([Int], [Int]) {
        let out = zip(shape, repeats).map { $0 * $1 }
        let strides = stridesOf(shape)
        var sources: [Int] = []
        sources.reserveCapacity(out.reduce(1, *))
        var index = [Int](repeating: 0, count: out.count)
        for _ in 0..<out.reduce(1, *) {
            var offset = 0
            for axis in 0..<out.count { offset += (index[axis] % shape[axis]) * strides[axis] }
            sources.append(offset)
            Kernels.advance(&index, in: out)
        }
        return (out, sources)
    }

    /// GatherElements: per index position, the flat index of the data element it reads (its axis coordinate
    /// replaced by the index).
    static func gatherElementsSources(_ ctx: NodeContext, _ dataShape: [Int], _ indices: Tensor) throws -> [Int] {
        let axis = try ctx.axis(Int(try ctx.int("axis", default: 0)), rank: dataShape.count)
        for (a, (d, i)) in zip(dataShape, indices.shape).enumerated() where a != axis && i > d {
            throw ctx.error(.shapeMismatch, "indices \(indices.shape) exceed data \(dataShape) along axis \(a)")
        }
        let dataStrides = stridesOf(dataShape), size = dataShape[axis]
        var sources: [Int] = []
        sources.reserveCapacity(indices.count)
        var index = [Int](repeating: 0, count: indices.rank)
        for raw in indices.ints {
            let i = raw < 0 ? Int(raw) + size : Int(raw)
            guard i >= 0, i < size else {
                throw ctx.error(.invalidInput, "index \(raw) is out of range for axis \(axis) of size \(size)")
            }
            var offset = 0
            for a in 0..<index.count { offset += (a == axis ? i : index[a]) * dataStrides[a] }
            sources.append(offset)
            Kernels.advance(&index, in: indices.shape)
        }
        return sources
    }

    /// Expand's output: the input and the requested shape broadcast together (either may hold the 1s).
    static func expandTarget(_ ctx: NodeContext, _ requested: [Int64], _ shape: [Int]) throws -> [Int] {
        guard requested.allSatisfy({ $0 >= 0 && $0 <= Int64(TensorLimits.maximumElements) }) else {
            throw ctx.error(.invalidInput, "shape \(requested) has a negative or oversized dimension")
        }
        return try broadcastOutput(ctx, shape, requested.map { Int($0) })
    }

    static func tileRepeats(_ ctx: NodeContext, _ value: Tensor, rank: Int) throws -> [Int] {
        let repeats = value.asInts
        guard repeats.count == rank else {
            throw ctx.error(.shapeMismatch, "repeats has \(repeats.count) values for an input of rank \(rank)")
        }
        guard repeats.allSatisfy({ $0 >= 0 && $0 <= Int64(TensorLimits.maximumElements) }) else {
            throw ctx.error(.invalidInput, "repeats \(repeats) must be non-negative and within the size limit")
        }
        return repeats.map { Int($0) }
    }

    /// Split's axis and part sizes: the `split` input (opset 13+) or attribute (11–12), else `num_outputs`
    /// (opset 18+; the last part is smaller when the axis does not divide), else equal parts, one per output.
    static func splitSizes(_ ctx: NodeContext, _ shape: [Int], _ inputs: [Tensor?]?) throws -> (Int, [Int]) {
        let axis = try ctx.axis(Int(try ctx.int("axis", default: 0)), rank: shape.count)
        let length = shape[axis], outputs = ctx.node.outputs.count
        var sizes: [Int]
        if ctx.opset >= 13, ctx.optionalInput(1) != nil {
            guard let value = inputs?[1] ?? ctx.optionalInput(1)?.constant else {
                throw ctx.error(.invalidGraph, "split (input 1) must be a constant or computable from shapes")
            }
            sizes = value.asInts.map { Int(clamping: $0) }
        } else if ctx.opset < 13, let attribute = try ctx.ints("split") {
            sizes = attribute
        } else {
            let parts = ctx.opset >= 18 ? Int(try ctx.int("num_outputs", default: Int64(outputs))) : outputs
            guard parts >= 1 else { throw ctx.error(.invalidAttribute, "num_outputs must be at least 1") }
            let chunk = (length + parts - 1) / parts
            sizes = (0..<parts).map { k in max(0, min(chunk, length - k * chunk)) }
            if ctx.opset >= 18, try ctx.int("num_outputs") == nil, length % parts != 0 {
                throw ctx.error(.invalidAttribute, "axis \(axis) of size \(length) does not split evenly into \(parts) outputs")
            }
        }
        guard sizes.count == outputs else {
            throw ctx.error(.invalidAttribute, "split gives \(sizes.count) parts for \(outputs) outputs")
        }
        guard sizes.allSatisfy({ $0 >= 0 }), sizes.reduce(0, +) == length else {
            throw ctx.error(.shapeMismatch, "split sizes \(sizes) do not add up to axis \(axis) of size \(length)")
        }
        return (axis, sizes)
    }

    static func rangeCount(_ ctx: NodeContext, _ start: Tensor, _ limit: Tensor, _ delta: Tensor) throws -> Int {
        guard start.count == 1, limit.count == 1, delta.count == 1 else {
            throw ctx.error(.shapeMismatch, "start, limit and delta must be scalars")
        }
        let s = start.asFloats[0], l = limit.asFloats[0], d = delta.asFloats[0]
        guard d != 0, s.isFinite, l.isFinite, d.isFinite else { throw ctx.error(.invalidInput, "delta must be non-zero and all values finite") }
        let count: Double
        if start.dtype.isInteger {
            let (si, li, di) = (Double(start.ints[0]), Double(limit.ints[0]), Double(delta.ints[0]))
            count = max(0, ((li - si) / di).rounded(.up))
        } else {
            count = max(0, (Double(l) - Double(s)) / Double(d)).rounded(.up)
        }
        guard count <= Double(TensorLimits.maximumElements) else {
            throw ctx.error(.tooLarge, "Range would produce \(count) elements (at most \(TensorLimits.maximumElements))")
        }
        return Int(count)
    }
}
