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
