import CWhittleDNNL

/// A oneDNN element-wise operation over `count` contiguous floats (in place allowed).
public final class EltwisePlan: @unchecked Sendable {
    public let op: PostOp
    public let count: Int
    private let handle: OpaquePointer

    public init(_ op: PostOp, count: Int) throws {
        guard op != .none else { throw TensorError(.invalidArgument, "element-wise plan needs an operation") }
        guard count >= 1 else { throw TensorError(.invalidArgument, "element-wise plan needs at least one element") }
        self.op = op
        self.count = count
        handle = try withErrorBuffer { err, len in wk_eltwise_create(op.c, Int64(count), err, len) }
    }

    deinit { wk_eltwise_destroy(handle) }

    public func run(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>) throws {
        try runChecked { err, len in wk_eltwise_run(handle, src, dst, err, len) }
    }
}

extension Kernels {
    /// Reference twin of `EltwisePlan`.
    public static func eltwiseReference(_ op: PostOp, _ x: [Float]) -> [Float] { x.map(op.apply) }
}

/// A oneDNN element-wise binary operation with NumPy broadcasting over fixed shapes: `dst = a ∘ b`, where `a` has
/// the output's shape and `b` the output's rank with sizes equal to the output's or 1. Vectorized and threaded.
public final class BinaryPlan: @unchecked Sendable {
    public enum Kind: Int32, Sendable { case add = 0, sub = 1, mul = 2, div = 3 }
    public let kind: Kind
    public let shape: [Int], operandShape: [Int]
    private let handle: OpaquePointer

    /// `operandShape` is `b`'s shape aligned to the output's rank (leading 1s added).
    public init(_ kind: Kind, shape: [Int], operandShape: [Int]) throws {
        guard !shape.isEmpty, shape.count <= 6, operandShape.count == shape.count,
              zip(shape, operandShape).allSatisfy({ $1 == $0 || $1 == 1 }), shape.allSatisfy({ $0 >= 1 }) else {
            throw TensorError(.invalidArgument, "binary plan: operand \(operandShape) does not broadcast to \(shape)")
        }
        self.kind = kind
        self.shape = shape
        self.operandShape = operandShape
        let dims = shape.map(Int64.init), dims1 = operandShape.map(Int64.init)
        handle = try withErrorBuffer { err, len in wk_binary_create(kind.rawValue, Int32(dims.count), dims, dims1, err, len) }
    }

    deinit { wk_binary_destroy(handle) }

    public func run(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>) throws {
        try runChecked { err, len in wk_binary_run(handle, a, b, dst, err, len) }
    }
}
