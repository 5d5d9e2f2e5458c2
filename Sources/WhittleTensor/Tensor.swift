/// A dense tensor in C (row-major) order.
///
/// Floating-point types live in `floats` as Float32; integer and boolean types live in `ints` widened to Int64
/// (int4 and uint4 included). Exactly one of the two arrays is used, chosen by `dtype`. Activations are NCHW.
public struct Tensor: Sendable, Equatable {
    public var dtype: DataType
    public var shape: [Int]
    public var floats: [Float]
    public var ints: [Int64]

    /// A float32 tensor; `floats.count` must equal the product of `shape`.
    public init(shape: [Int], floats: [Float]) {
        precondition(floats.count == shape.reduce(1, *), "element count \(floats.count) does not match shape \(shape)")
        self.dtype = .float
        self.shape = shape
        self.floats = floats
        self.ints = []
    }

    /// An integer tensor of the given integer `dtype`.
    public init(shape: [Int], ints: [Int64], dtype: DataType = .int64) {
        precondition(dtype.isInteger, "\(dtype) is not an integer type")
        precondition(ints.count == shape.reduce(1, *), "element count \(ints.count) does not match shape \(shape)")
        self.dtype = dtype
        self.shape = shape
        self.floats = []
        self.ints = ints
    }

    /// A float32 tensor of zeros.
    public static func zeros(_ shape: [Int]) -> Tensor {
        Tensor(shape: shape, floats: [Float](repeating: 0, count: shape.reduce(1, *)))
    }

    /// A float32 scalar (rank 0).
    public static func scalar(_ value: Float) -> Tensor { Tensor(shape: [], floats: [value]) }

    public var rank: Int { shape.count }
    public var count: Int { shape.reduce(1, *) }

    /// The values as Float, converting integer tensors.
    public var asFloats: [Float] { dtype.isInteger ? ints.map { Float($0) } : floats }

    /// The values as Int64, truncating floating-point tensors toward zero.
    /// NaN becomes 0 and values beyond Int64's range saturate (a hostile file's float shape must not trap).
    public var asInts: [Int64] { dtype.isInteger ? ints : floats.map(Self.saturatingInt64) }

    /// `value` truncated toward zero; NaN is 0, values beyond Int64's range saturate.
    public static func saturatingInt64(_ value: Float) -> Int64 {
        if value.isNaN { return 0 }
        if value >= 9.223372e18 { return .max }
        if value <= -9.223372e18 { return .min }
        return Int64(value)
    }

    /// The same data under another shape with the same element count.
    public func reshaped(_ newShape: [Int]) throws -> Tensor {
        guard TensorLimits.elementCount(newShape) == count else {
            throw TensorError(.shapeMismatch, "cannot reshape \(shape) (\(count) elements) to \(newShape)")
        }
        var copy = self
        copy.shape = newShape
        return copy
    }
}

/// Row-major strides of a shape, in elements.
public func stridesOf(_ shape: [Int]) -> [Int] {
    var strides = [Int](repeating: 1, count: shape.count)
    var running = 1
    for axis in stride(from: shape.count - 1, through: 0, by: -1) {
        strides[axis] = running
        running *= shape[axis]
    }
    return strides
}
