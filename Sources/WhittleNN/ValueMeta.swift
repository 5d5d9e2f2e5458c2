import WhittleONNX
import WhittleTensor

/// What static shape inference knows about a value: its element type, its concrete shape (for a given batch size)
/// and, for values computable before any input is seen (initializers, Constant nodes, Shape chains), its value.
public struct ValueMeta: Sendable, Equatable {
    public var dtype: DataType
    public var shape: [Int]
    public var constant: Tensor?

    public init(dtype: DataType, shape: [Int], constant: Tensor? = nil) {
        self.dtype = dtype
        self.shape = shape
        self.constant = constant
    }

    public init(_ tensor: Tensor) {
        self.dtype = tensor.dtype
        self.shape = tensor.shape
        self.constant = tensor
    }

    public var count: Int { shape.reduce(1, *) }
    public var rank: Int { shape.count }
    /// Bytes the value occupies in Whittle's memory (float types as Float32, integer types as Int64).
    public var bytes: Int { count * (dtype.isInteger ? 8 : 4) }
}
