import WhittleONNX
import WhittleTensor

/// Ops that move elements: Concat, Gather, Slice, Pad, and Cast. They work on every element type Whittle holds.
extension Operators {
    static func registerTensorOps(_ r: inout [String: OperatorDefinition]) {
        r["Concat"] = .simple(infer: { ctx in
            let parts = try (0..<ctx.inputs.count).map { try ctx.input($0) }
            guard let first = parts.first else { throw ctx.error(.invalidGraph, "Concat needs at least one input") }
            guard let rawAxis = try ctx.int("axis") else { throw ctx.error(.invalidAttribute, "attribute 'axis' is required") }
            let axis = try ctx.axis(Int(rawAxis), rank: first.rank)
            var shape = first.shape
            shape[axis] = 0
            for p in parts {
                guard p.rank == first.rank, p.dtype == first.dtype,
                    p.shape.enumerated().allSatisfy({ $0.offset == axis || $0.element == first.shape[$0.offset] })
                else {
                    throw ctx.error(.shapeMismatch, "inputs \(parts.map(\.shape)) cannot be concatenated along axis \(axis)")
                }
                shape[axis] += p.shape[axis]
            }
            return [ValueMeta(dtype: first.dtype, shape: shape)]
        }) { ctx, inputs in
            let parts = inputs.map { $0! }
            let axis = try ctx.axis(Int(try ctx.int("axis")!), rank: parts[0].rank)
            let outer = parts[0].shape[..<axis].reduce(1, *)
            var shape = parts[0].shape
            shape[axis] = parts.reduce(0) { $0 + $1.shape[axis] }
            let blocks = parts.map { $0.shape[axis...].reduce(1, *) }
            if parts[0].dtype.isInteger {
                var out: [Int64] = []
                out.reserveCapacity(shape.reduce(1, *))
                for o in 0..<outer { for (p, b) in zip(parts, blocks) { out += p.ints[(o * b)..<((o + 1) * b)] } }
                return [Tensor(shape: shape, ints: out, dtype: parts[0].dtype)]
            }
            var out: [Float] = []
            out.reserveCapacity(shape.reduce(1, *))
            for o in 0..<outer { for (p, b) in zip(parts, blocks) { out += p.floats[(o * b)..<((o + 1) * b)] } }
            var t = Tensor(shape: shape, floats: out)
            t.dtype = parts[0].dtype
            return [t]
        }

        r["Gather"] = .simple(infer: { ctx in
            let data = try ctx.input(0), indices = try ctx.input(1)
            guard indices.dtype == .int64 || indices.dtype == .int32 else {
                throw ctx.error(.unsupportedDataType, "indices have element type \(indices.dtype); int32 or int64 is required")
            }
            guard data.rank >= 1 else { throw ctx.error(.shapeMismatch, "data must have rank ≥ 1") }
            let axis = try ctx.axis(Int(try ctx.int("axis", default: 0)), rank: data.rank)
            return [ValueMeta(dtype: data.dtype, shape: Array(data.shape[..<axis]) + indices.shape + Array(data.shape[(axis + 1)...]))]
        }) { ctx, inputs in
            let (shape, sources) = try gatherSources(ctx, inputs[0]!.shape, inputs[1]!)
            return [inputs[0]!.gathered(shape: shape, sources: sources)]
        }

        r["Cast"] = .simple(infer: { ctx in
            let x = try ctx.input(0)
            return [ValueMeta(dtype: try castTarget(ctx), shape: x.shape)]
        }) { ctx, inputs in
            let x = inputs[0]!, to = try castTarget(ctx)
            if to.isInteger {
                let values: [Int64] = x.dtype.isInteger ? x.ints : x.floats.map { $0.isFinite ? Int64(exactly: $0.rounded(.towardZero)) ?? 0 : 0 }
                let range = to.integerRange!
                let wrapped = to == .bool ? values.map { $0 != 0 ? 1 : 0 } : values.map { wrap($0, to: range) }
                return [Tensor(shape: x.shape, ints: wrapped, dtype: to)]
            }
            var t = Tensor(shape: x.shape, floats: x.asFloats)
            t.dtype = to
            return [t]
        }

        r["Slice"] = .simple(minimumOpset: 10, infer: { ctx in
            let data = try ctx.input(0)
            let plan = try slicePlan(ctx, data.shape, nil)
            return [ValueMeta(dtype: data.dtype, shape: plan.shape)]
        }) { ctx, inputs in
            let data = inputs[0]!
            let plan = try slicePlan(ctx, data.shape, inputs)
            return [data.gathered(shape: plan.shape, sources: plan.sources())]
        }

        r["Pad"] = .simple(minimumOpset: 11, infer: { ctx in
            let data = try ctx.input(0)
            let (begin, end) = try padAmounts(ctx, rank: data.rank, nil)
            let shape = try (0..<data.rank).map { i -> Int in
                let d = data.shape[i] + begin[i] + end[i]
                guard d >= 0 else { throw ctx.error(.shapeMismatch, "pads make axis \(i) negative") }
                return d
            }
            return [ValueMeta(dtype: data.dtype, shape: shape)]
        }) { ctx, inputs in
            let data = inputs[0]!
            let (shape, sources) = try padSources(ctx, data.shape, inputs)
            let fill = ctx.optionalInput(2) != nil ? inputs[2]!.asFloats.first ?? 0 : 0
            guard !data.dtype.isInteger || fill.isFinite else {
                throw ctx.error(.invalidInput, "constant_value \(fill) is not an integer of the data's type")
            }
            return [data.gathered(shape: shape, sources: sources, fill: fill)]
        }
    }

    /// Gather's output shape and, per output element, the flat index of the data element it copies.
    static func gatherSources(_ ctx: NodeContext, _ dataShape: [Int], _ indices: Tensor) throws -> ([Int], [Int]) {
        let axis = try ctx.axis(Int(try ctx.int("axis", default: 0)), rank: dataShape.count)
        let outer = dataShape[..<axis].reduce(1, *), size = dataShape[axis]
        let inner = dataShape[(axis + 1)...].reduce(1, *)
        let shape = Array(dataShape[..<axis]) + indices.shape + Array(dataShape[(axis + 1)...])
        var sources: [Int] = []
        sources.reserveCapacity(shape.reduce(1, *))
        for o in 0..<outer {
            for raw in indices.ints {
                let i = raw < 0 ? Int(raw) + size : Int(raw)
                guard i >= 0, i < size else {
                    throw ctx.error(.invalidInput, "index \(raw) is out of range for axis \(axis) of size \(size)")
                }
                for j in 0..<inner { sources.append((o * size + i) * inner + j) }
            }
        }
        return (shape, sources)
    }

    /// Pad's output shape and, per output element, the flat index of the input element it copies (-1: the fill).
    static func padSources(_ ctx: NodeContext, _ dataShape: [Int], _ inputs: [Tensor?]?) throws -> ([Int], [Int]) {
        let (begin, end) = try padAmounts(ctx, rank: dataShape.count, inputs)
        let mode = try ctx.string("mode", default: "constant")
        let shape = (0..<dataShape.count).map { dataShape[$0] + begin[$0] + end[$0] }
        let inStrides = stridesOf(dataShape)
        var sources: [Int] = []
        sources.reserveCapacity(shape.reduce(1, *))
        if mode == "reflect" {
            for (i, d) in dataShape.enumerated() where (begin[i] > 0 || end[i] > 0) && d < 2 {
                throw ctx.error(.invalidInput, "reflect padding needs at least 2 elements along axis \(i)")
            }
        }
        guard ["constant", "reflect", "edge"].contains(mode) else {
            throw ctx.error(.invalidAttribute, "mode '\(mode)' is not supported (constant, reflect, edge)")
        }
        var index = [Int](repeating: 0, count: shape.count)
        let total = shape.reduce(1, *)
        for _ in 0..<total {
            var offset = 0
            var outside = false
            for axis in 0..<shape.count {
                var s = index[axis] - begin[axis]
                let n = dataShape[axis]
                if s < 0 || s >= n {
                    switch mode {
                    case "edge": s = min(max(s, 0), n - 1)
                    case "reflect":
                        let period = 2 * (n - 1)
                        s = ((s % period) + period) % period
                        if s >= n { s = period - s }
                    default: outside = true
                    }
                }
                offset += s * inStrides[axis]
            }
            sources.append(outside ? -1 : offset)
            Kernels.advance(&index, in: shape)
        }
        return (shape, sources)
    }

    static func wrap(_ v: Int64, to range: ClosedRange<Int64>) -> Int64 {
        if range.contains(v) { return v }
        let span = range.upperBound &- range.lowerBound &+ 1
        guard span > 0 else { return v }
        return ((v &- range.lowerBound) % span + span) % span &+ range.lowerBound
    }

    static func castTarget(_ ctx: NodeContext) throws -> DataType {
        guard let raw = try ctx.int("to"), let to = DataType(rawValue: Int32(truncatingIfNeeded: raw)),
            to.isInteger || to.isFloatingPoint
        else { throw ctx.error(.unsupportedDataType, "Cast target type \((try? ctx.int("to")).map { "\($0)" } ?? "(missing)") is not supported") }
        return to
    }

    struct SlicePlan {
        var shape: [Int]
        var inShape: [Int]
        var starts: [Int]
        var steps: [Int]
        func sources() -> [Int] {
            let inStrides = stridesOf(inShape)
            let count = shape.reduce(1, *)
            let base = zip(starts, inStrides).reduce(0) { $0 + $1.0 * $1.1 }
            let strides = zip(steps, inStrides).map { $0 * $1 }
            return Kernels.broadcastLoop(count: count, shape: shape.isEmpty ? [1] : shape,
                                         aStrides: shape.isEmpty ? [0] : strides,
                                         bStrides: [Int](repeating: 0, count: max(shape.count, 1))) { ia, _ in base + ia }
        }
    }

    /// Slice (opset ≥ 10): starts, ends, axes and steps are inputs; values are clamped as the spec describes.
    static func slicePlan(_ ctx: NodeContext, _ shape: [Int], _ inputs: [Tensor?]?) throws -> SlicePlan {
        func arg(_ i: Int, _ what: String) throws -> [Int64]? {
            guard ctx.optionalInput(i) != nil else { return nil }
            guard let v = inputs?[i] ?? ctx.optionalInput(i)?.constant else {
                throw ctx.error(.invalidGraph, "\(what) (input \(i)) must be a constant or computable from shapes")
            }
            return v.asInts
        }
        guard let starts = try arg(1, "starts"), let ends = try arg(2, "ends"), starts.count == ends.count else {
            throw ctx.error(.invalidAttribute, "starts and ends are required and must have equal length")
        }
        let axes = try arg(3, "axes")?.map { try ctx.axis(Int($0), rank: shape.count) } ?? Array(0..<starts.count)
        let steps = try arg(4, "steps") ?? [Int64](repeating: 1, count: starts.count)
        guard axes.count == starts.count, steps.count == starts.count, Set(axes).count == axes.count else {
            throw ctx.error(.invalidAttribute, "axes and steps must match starts")
        }
        var plan = SlicePlan(shape: shape, inShape: shape, starts: [Int](repeating: 0, count: shape.count),
                             steps: [Int](repeating: 1, count: shape.count))
        for (k, axis) in axes.enumerated() {
            let n = Int64(shape[axis])
            guard steps[k] != 0 else { throw ctx.error(.invalidAttribute, "slice step 0") }
            var s = starts[k] < 0 ? starts[k] + n : starts[k]
            var e = ends[k] < 0 ? ends[k] + n : ends[k]
            // A step longer than the axis takes at most one element: clamping it keeps the arithmetic in range.
            let step = min(max(steps[k], -(n + 1)), n + 1)
            if step > 0 {
                s = min(max(s, 0), n)
                e = min(max(e, 0), n)
            } else {
                s = min(max(s, 0), n - 1)
                e = min(max(e, -1), n - 1)
            }
            let length = step > 0 ? max(0, (e - s + step - 1) / step) : max(0, (s - e - step - 1) / -step)
            plan.shape[axis] = Int(length)
            plan.starts[axis] = Int(s)
            plan.steps[axis] = Int(step)
        }
        return plan
    }

    static func padAmounts(_ ctx: NodeContext, rank: Int, _ inputs: [Tensor?]?) throws -> ([Int], [Int]) {
        guard let raw = (inputs?[1] ?? ctx.optionalInput(1)?.constant)?.asInts.map({ Int($0) }) else {
            throw ctx.error(.invalidGraph, "pads (input 1) must be a constant or computable from shapes")
        }
        let pads = try ctx.checkedSizes(raw, "pads")
        let axes: [Int]
        if ctx.optionalInput(3) != nil {
            guard let a = (inputs?[3] ?? ctx.optionalInput(3)?.constant)?.asInts else {
                throw ctx.error(.invalidGraph, "axes (input 3) must be a constant")
            }
            axes = try a.map { try ctx.axis(Int($0), rank: rank) }
        } else {
            axes = Array(0..<rank)
        }
        guard pads.count == 2 * axes.count else {
            throw ctx.error(.invalidAttribute, "pads has \(pads.count) values, expected \(2 * axes.count)")
        }
        var begin = [Int](repeating: 0, count: rank), end = begin
        for (k, axis) in axes.enumerated() {
            begin[axis] = pads[k]
            end[axis] = pads[k + axes.count]
        }
        return (begin, end)
    }
}

extension Tensor {
    /// A tensor of `shape` whose element i is this tensor's element at `sources[i]`, or `fill` where the source is -1.
    func gathered(shape: [Int], sources: [Int], fill: Float = 0) -> Tensor {
        if dtype.isInteger {
            let f = Int64(fill)
            return Tensor(shape: shape, ints: sources.map { $0 < 0 ? f : ints[$0] }, dtype: dtype)
        }
        var t = Tensor(shape: shape, floats: sources.map { $0 < 0 ? fill : floats[$0] })
        t.dtype = dtype
        return t
    }
}
