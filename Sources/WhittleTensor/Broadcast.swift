/// NumPy-style broadcasting: shapes are aligned at the right; each dimension pair must be equal or contain a 1.
public func broadcastShape(_ a: [Int], _ b: [Int]) throws -> [Int] {
    let rank = max(a.count, b.count)
    var out = [Int](repeating: 1, count: rank)
    for i in 0..<rank {
        let da = i < rank - a.count ? 1 : a[i - (rank - a.count)]
        let db = i < rank - b.count ? 1 : b[i - (rank - b.count)]
        guard da == db || da == 1 || db == 1 else {
            throw TensorError(.shapeMismatch, "shapes \(a) and \(b) cannot be broadcast together")
        }
        out[i] = da == 1 ? db : da
    }
    return out
}

/// Strides (in elements) to read a tensor of `shape` as if broadcast to `target`: 0 along broadcast dimensions.
public func broadcastStrides(_ shape: [Int], to target: [Int]) -> [Int] {
    let own = stridesOf(shape)
    let offset = target.count - shape.count
    return (0..<target.count).map { i in
        i < offset || shape[i - offset] == 1 ? 0 : own[i - offset]
    }
}

extension Kernels {
    /// Element-wise `f(a, b)` with broadcasting, for float32 tensors. Fast paths: equal shapes, scalar operand,
    /// and a contiguous run along the innermost axis.
    public static func broadcastFloat(_ a: [Float], _ aShape: [Int], _ b: [Float], _ bShape: [Int],
                                      _ f: (Float, Float) -> Float) throws -> ([Float], [Int]) {
        let shape = try broadcastShape(aShape, bShape)
        let count = shape.reduce(1, *)
        if aShape == bShape {
            return (zip(a, b).map(f), shape)
        }
        if b.count == 1, a.count == count {
            let s = b[0]
            return (a.map { f($0, s) }, shape)
        }
        if a.count == 1, b.count == count {
            let s = a[0]
            return (b.map { f(s, $0) }, shape)
        }
        let out = broadcastLoop(count: count, shape: shape, aStrides: broadcastStrides(aShape, to: shape),
                                bStrides: broadcastStrides(bShape, to: shape)) { ia, ib in f(a[ia], b[ib]) }
        return (out, shape)
    }

    /// Element-wise `f(a, b)` with broadcasting, for integer tensors (shape arithmetic).
    public static func broadcastInt(_ a: [Int64], _ aShape: [Int], _ b: [Int64], _ bShape: [Int],
                                    _ f: (Int64, Int64) -> Int64) throws -> ([Int64], [Int]) {
        let shape = try broadcastShape(aShape, bShape)
        let count = shape.reduce(1, *)
        let out = broadcastLoop(count: count, shape: shape, aStrides: broadcastStrides(aShape, to: shape),
                                bStrides: broadcastStrides(bShape, to: shape)) { ia, ib in f(a[ia], b[ib]) }
        return (out, shape)
    }

    /// Steps a multi-index to the next position of `shape` in row-major order (the last axis fastest), wrapping to
    /// all zeros after the last position.
    public static func advance(_ index: inout [Int], in shape: [Int]) {
        var axis = shape.count - 1
        while axis >= 0 {
            index[axis] += 1
            if index[axis] < shape[axis] { return }
            index[axis] = 0
            axis -= 1
        }
    }

    /// Walks every index of `shape` in row-major order, passing the matching offsets into both operands.
    public static func broadcastLoop<T>(count: Int, shape: [Int], aStrides: [Int], bStrides: [Int],
                                 _ body: (Int, Int) -> T) -> [T] {
        var out: [T] = []
        out.reserveCapacity(count)
        guard count > 0 else { return out }
        let rank = shape.count
        if rank == 0 { return [body(0, 0)] }
        var index = [Int](repeating: 0, count: rank)
        var ia = 0, ib = 0
        let inner = shape[rank - 1], sa = aStrides[rank - 1], sb = bStrides[rank - 1]
        while out.count < count {
            var pa = ia, pb = ib
            for _ in 0..<inner {
                out.append(body(pa, pb))
                pa += sa
                pb += sb
            }
            // Advance the outer index (all but the innermost axis).
            var axis = rank - 2
            while axis >= 0 {
                index[axis] += 1
                ia += aStrides[axis]
                ib += bStrides[axis]
                if index[axis] < shape[axis] { break }
                ia -= aStrides[axis] * shape[axis]
                ib -= bStrides[axis] * shape[axis]
                index[axis] = 0
                axis -= 1
            }
            if axis < 0 { break }
        }
        return out
    }

    /// Gathers `values` (of `shape`) into the layout `shape` permuted by `perm`.
    public static func transpose<T>(_ values: [T], shape: [Int], perm: [Int]) -> [T] {
        let outShape = perm.map { shape[$0] }
        let inStrides = stridesOf(shape)
        let strides = perm.map { inStrides[$0] }
        // The last axis stays last (heads split or merged: [N, S, H, D] ↔ [N, H, S, D]): copy contiguous runs.
        if shape.count >= 2, perm.last == shape.count - 1, let inner = shape.last, inner > 1 {
            let bases = broadcastLoop(count: values.count / inner, shape: Array(outShape.dropLast()), aStrides: Array(strides.dropLast()),
                                      bStrides: [Int](repeating: 0, count: perm.count - 1)) { ia, _ in ia }
            return [T](unsafeUninitializedCapacity: values.count) { buffer, initialized in
                values.withUnsafeBufferPointer { source in
                    for (k, base) in bases.enumerated() {
                        (buffer.baseAddress! + k * inner).initialize(from: source.baseAddress! + base, count: inner)
                    }
                }
                initialized = values.count
            }
        }
        return broadcastLoop(count: values.count, shape: outShape, aStrides: strides,
                             bStrides: [Int](repeating: 0, count: perm.count)) { ia, _ in values[ia] }
    }
}
