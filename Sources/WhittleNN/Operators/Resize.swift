import WhittleONNX
import WhittleTensor

/// Resize(X, roi, scales, sizes; mode, coordinate_transformation_mode, nearest_mode) for modes "nearest" and
/// "linear", separable along every axis. Coordinate modes: half_pixel (default), pytorch_half_pixel, align_corners,
/// asymmetric, half_pixel_symmetric. Linear sources are clamped to the input, as onnxruntime does.
extension Operators {
    static func registerResize(_ r: inout [String: OperatorDefinition]) {
        r["Resize"] = .simple(minimumOpset: 11, infer: { ctx in
            let x = try ctx.floatInput(0)
            let (shape, _) = try resizeTarget(ctx, x.shape, nil)
            return [ValueMeta(dtype: x.dtype, shape: shape)]
        }) { ctx, inputs in
            let x = inputs[0]!
            if let y = try bilinearImage(ctx, x, inputs) { return [y] }
            var values = x.floats
            var current = x.shape
            for (axis, taps) in try resizeTaps(ctx, x.shape, inputs) {
                values = resample(values, shape: current, axis: axis, taps: taps)
                current[axis] = taps.count
            }
            return [Tensor(shape: current, floats: values)]
        }
    }

    /// The separable resampling Resize does: per resized axis (in order), output index i mixes input indices
    /// taps[i].0 and taps[i].1 with weight taps[i].2.
    static func resizeTaps(_ ctx: NodeContext, _ inShape: [Int], _ inputs: [Tensor?]?) throws -> [(Int, [(Int, Int, Float)])] {
        let (shape, scales) = try resizeTarget(ctx, inShape, inputs)
        let mode = try ctx.string("mode", default: "nearest")
        let transform = try ctx.string("coordinate_transformation_mode", default: "half_pixel")
        let nearestMode = try ctx.string("nearest_mode", default: "round_prefer_floor")
        var out: [(Int, [(Int, Int, Float)])] = []
        for axis in 0..<inShape.count where shape[axis] != inShape[axis] || scales[axis] != 1 {
            let n = inShape[axis], m = shape[axis]
            out.append((axis, try (0..<m).map { i -> (Int, Int, Float) in
                let source = try sourceCoordinate(ctx, Float(i), scale: scales[axis], inSize: n, outSize: m, transform)
                if mode == "nearest" {
                    let index = try nearestIndex(ctx, source, nearestMode)
                    let clamped = min(max(index, 0), n - 1)
                    return (clamped, clamped, 0)
                }
                let s = min(max(source, 0), Float(n - 1))
                let lo = Int(s.rounded(.down))
                return (lo, min(lo + 1, n - 1), s - Float(lo))
            }))
        }
        return out
    }

    /// The adjoint of `resample`: spreads a gradient of the resampled axis back onto the `n` input indices.
    static func resampleBackward(_ dy: [Float], shape: [Int], axis: Int, inSize n: Int, taps: [(Int, Int, Float)]) -> [Float] {
        let outer = shape[..<axis].reduce(1, *), m = shape[axis], inner = shape[(axis + 1)...].reduce(1, *)
        var dx = [Float](repeating: 0, count: outer * n * inner)
        for o in 0..<outer {
            for (i, tap) in taps.enumerated() {
                let a = (o * n + tap.0) * inner, b = (o * n + tap.1) * inner, src = (o * m + i) * inner
                let w = tap.2
                for j in 0..<inner {
                    dx[a + j] += (1 - w) * dy[src + j]
                    dx[b + j] += w * dy[src + j]
                }
            }
        }
        return dx
    }

    /// Output shape and per-axis scales from `sizes` or `scales` (and opset-18 `axes`).
    static func resizeTarget(_ ctx: NodeContext, _ shape: [Int], _ inputs: [Tensor?]?) throws -> ([Int], [Float]) {
        let mode = try ctx.string("mode", default: "nearest")
        guard mode == "nearest" || mode == "linear" else {
            throw ctx.error(.unsupportedOperator, "Resize mode '\(mode)' is not supported (nearest, linear)")
        }
        if try ctx.int("antialias", default: 0) != 0 {
            throw ctx.error(.unsupportedOperator, "Resize with antialias is not supported")
        }
        let transform = try ctx.string("coordinate_transformation_mode", default: "half_pixel")
        guard ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric"].contains(transform) else {
            throw ctx.error(.unsupportedOperator, "coordinate_transformation_mode '\(transform)' is not supported")
        }
        let axes = try ctx.ints("axes")?.map { try ctx.axis($0, rank: shape.count) } ?? Array(0..<shape.count)
        func value(_ i: Int) throws -> Tensor? {
            guard ctx.optionalInput(i) != nil else { return nil }
            guard let v = inputs?[i] ?? ctx.optionalInput(i)?.constant else {
                throw ctx.error(.invalidGraph, "input \(i) of Resize must be a constant or computable from shapes")
            }
            return v.count == 0 ? nil : v
        }
        var out = shape
        var scales = [Float](repeating: 1, count: shape.count)
        if let sizes = try value(3) {
            guard sizes.count == axes.count else { throw ctx.error(.shapeMismatch, "sizes has \(sizes.count) values for \(axes.count) axes") }
            for (k, axis) in axes.enumerated() {
                guard shape[axis] > 0 else { throw ctx.error(.shapeMismatch, "cannot resize axis \(axis) of shape \(shape): it is empty") }
                out[axis] = Int(sizes.asInts[k])
                try ctx.checkedShape(out, "the output")
                scales[axis] = Float(out[axis]) / Float(shape[axis])
            }
        } else if let given = try value(2) {
            guard given.count == axes.count else { throw ctx.error(.shapeMismatch, "scales has \(given.count) values for \(axes.count) axes") }
            for (k, axis) in axes.enumerated() {
                let s = given.asFloats[k]
                guard s > 0, s.isFinite else { throw ctx.error(.invalidInput, "scale \(s) must be positive") }
                scales[axis] = s
                guard let size = TensorLimits.integer(Double((Float(shape[axis]) * s).rounded(.down))) else {
                    throw ctx.error(.tooLarge, "scale \(s) makes axis \(axis) of shape \(shape) larger than the \(TensorLimits.maximumElements) elements one tensor may hold")
                }
                out[axis] = size
            }
        } else {
            throw ctx.error(.invalidGraph, "Resize needs scales or sizes")
        }
        guard out.allSatisfy({ $0 >= 1 }) else { throw ctx.error(.shapeMismatch, "Resize output \(out) has an empty axis") }
        return (out, scales)
    }

    static func sourceCoordinate(_ ctx: NodeContext, _ x: Float, scale: Float, inSize: Int, outSize: Int,
                                 _ transform: String) throws -> Float {
        switch transform {
        case "asymmetric": return x / scale
        case "align_corners": return outSize == 1 ? 0 : x * Float(inSize - 1) / Float(outSize - 1)
        case "pytorch_half_pixel": return outSize > 1 ? (x + 0.5) / scale - 0.5 : 0
        case "half_pixel_symmetric":
            let adjustment = Float(outSize) / (Float(inSize) * scale)
            let offset = Float(inSize) / 2 * (1 - adjustment)
            return offset + (x + 0.5) / scale - 0.5
        default: return (x + 0.5) / scale - 0.5
        }
    }

    static func nearestIndex(_ ctx: NodeContext, _ x: Float, _ mode: String) throws -> Int {
        switch mode {
        case "floor": return Int(x.rounded(.down))
        case "ceil": return Int(x.rounded(.up))
        case "round_prefer_ceil": return Int(x.rounded(.toNearestOrAwayFromZero) == x.rounded(.down) + 0.5 ? x.rounded(.up) : x.rounded(.toNearestOrAwayFromZero))
        case "round_prefer_floor":
            return x - x.rounded(.down) == 0.5 ? Int(x.rounded(.down)) : Int(x.rounded(.toNearestOrAwayFromZero))
        default: throw ctx.error(.invalidAttribute, "nearest_mode '\(mode)' is not supported")
        }
    }

    /// Linear resizing of the last two axes of an `[N, C, H, W]` tensor, in onnxruntime's arithmetic (its
    /// UpsampleBilinear): per output row and column the source coordinate clamped to the image, the two neighbours and
    /// their distances d1 = |s − lo|, d2 = |s − hi| (½ each at the last row or column), and
    /// `y = dx2·dy2·X[lo, lo] + dx1·dy2·X[lo, hi] + dx2·dy1·X[hi, lo] + dx1·dy1·X[hi, hi]` evaluated in that order, so
    /// a quantized model's values round as they do there. Nil for other resizes (the separable path runs them).
    static func bilinearImage(_ ctx: NodeContext, _ x: Tensor, _ inputs: [Tensor?]) throws -> Tensor? {
        guard x.rank == 4, try ctx.string("mode", default: "nearest") == "linear" else { return nil }
        let (shape, scales) = try resizeTarget(ctx, x.shape, inputs)
        guard shape[0] == x.shape[0], shape[1] == x.shape[1], scales[0] == 1, scales[1] == 1 else { return nil }
        let transform = try ctx.string("coordinate_transformation_mode", default: "half_pixel")
        func neighbours(_ axis: Int) throws -> [(lo: Int, hi: Int, d1: Float, d2: Float)] {
            let n = x.shape[axis], m = shape[axis]
            return try (0..<m).map { i in
                var s = scales[axis] == 1 ? Float(i)
                    : try sourceCoordinate(ctx, Float(i), scale: scales[axis], inSize: n, outSize: m, transform)
                s = Swift.max(0, Swift.min(s, Float(n - 1)))
                let lo = Swift.min(Int(s), n - 1), hi = Swift.min(lo + 1, n - 1)
                return lo == hi ? (lo, hi, 0.5, 0.5) : (lo, hi, abs(s - Float(lo)), abs(s - Float(hi)))
            }
        }
        let rows = try neighbours(2), columns = try neighbours(3)
        let (planes, h, w) = (x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
        let (outH, outW) = (shape[2], shape[3])
        let values = makeFloats(planes * outH * outW) { y in
            x.floats.withUnsafeBufferPointer { xs in
                for p in 0..<planes {
                    let plane = p * h * w
                    for (r, row) in rows.enumerated() {
                        let top = plane + row.lo * w, bottom = plane + row.hi * w
                        for (c, column) in columns.enumerated() {
                            y[(p * outH + r) * outW + c] = column.d2 * row.d2 * xs[top + column.lo]
                                + column.d1 * row.d2 * xs[top + column.hi]
                                + column.d2 * row.d1 * xs[bottom + column.lo]
                                + column.d1 * row.d1 * xs[bottom + column.hi]
                        }
                    }
                }
            }
        }
        return Tensor(shape: shape, floats: values)
    }

    /// Resamples along `axis`: output index i mixes input indices taps[i].0 and taps[i].1 with weight taps[i].2.
    static func resample(_ x: [Float], shape: [Int], axis: Int, taps: [(Int, Int, Float)]) -> [Float] {
        let outer = shape[..<axis].reduce(1, *), n = shape[axis], inner = shape[(axis + 1)...].reduce(1, *)
        let m = taps.count
        var out = [Float](repeating: 0, count: outer * m * inner)
        for o in 0..<outer {
            for (i, tap) in taps.enumerated() {
                let a = (o * n + tap.0) * inner, b = (o * n + tap.1) * inner, dst = (o * m + i) * inner
                let w = tap.2
                for j in 0..<inner { out[dst + j] = x[a + j] + w * (x[b + j] - x[a + j]) }
            }
        }
        return out
    }
}
