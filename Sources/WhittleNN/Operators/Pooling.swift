import WhittleONNX
import WhittleTensor

/// MaxPool, AveragePool (auto_pad, ceil_mode, count_include_pad, dilations, kernel_shape, pads, strides) and
/// GlobalAveragePool, for 1-D and 2-D inputs X `[N, C, (H,) W]`.
extension Operators {
    /// The input and the resolved window of a MaxPool or AveragePool (1-D or 2-D; no Indices output).
    static func poolSetup(_ ctx: NodeContext) throws -> (ValueMeta, Window) {
        let x = try ctx.floatInput(0)
        guard x.rank == 3 || x.rank == 4 else {
            throw ctx.error(.shapeMismatch, "input X has shape \(x.shape); Whittle pools 1-D and 2-D inputs (rank 3 or 4)")
        }
        guard let kernel = try ctx.ints("kernel_shape") else {
            throw ctx.error(.invalidAttribute, "attribute 'kernel_shape' is required")
        }
        if ctx.node.outputs.count > 1, !ctx.node.outputs[1].isEmpty {
            throw ctx.error(.unsupportedOperator, "the Indices output of MaxPool is not supported")
        }
        let ceil = try ctx.int("ceil_mode", default: 0) != 0
        return (x, try Window.resolve(ctx, spatial: Array(x.shape[2...]), kernel: kernel, ceilMode: ceil))
    }

    static func registerPooling(_ r: inout [String: OperatorDefinition]) {
        func pool(_ kindOf: @escaping @Sendable (NodeContext) throws -> PoolKind) -> OperatorDefinition {
            OperatorDefinition(
                infer: { ctx in
                    let (x, window) = try poolSetup(ctx)
                    return [ValueMeta(dtype: x.dtype, shape: Array(x.shape[0...1]) + window.output)]
                },
                compile: { ctx, outputs, options in
                    let (x, window) = try poolSetup(ctx)
                    let g = window.geometry(batch: x.shape[0], channels: x.shape[1], spatial: Array(x.shape[2...]),
                                            outChannels: x.shape[1], groups: 1)
                    let (oh, ow) = window.output2D
                    return try PoolKernel(kind: try kindOf(ctx), geometry: g, outHeight: oh, outWidth: ow,
                                          outShape: outputs[0].shape, fast: options.fast)
                })
        }
        r["MaxPool"] = pool { ctx in
            if try ctx.int("storage_order", default: 0) != 0 {
                throw ctx.error(.invalidAttribute, "storage_order = 1 only affects the Indices output, which is not supported")
            }
            return .max
        }
        r["AveragePool"] = pool { ctx in
            try ctx.int("count_include_pad", default: 0) != 0 ? .averageIncludingPad : .averageExcludingPad
        }
        r["GlobalAveragePool"] = OperatorDefinition(
            infer: { ctx in
                let x = try ctx.floatInput(0)
                guard x.rank >= 3 else { throw ctx.error(.shapeMismatch, "input X has shape \(x.shape); rank ≥ 3 is required") }
                return [ValueMeta(dtype: x.dtype, shape: Array(x.shape[0...1]) + [Int](repeating: 1, count: x.rank - 2))]
            },
            compile: { ctx, outputs, options in
                let x = try ctx.floatInput(0)
                let planes = x.shape[0] * x.shape[1], size = x.shape[2...].reduce(1, *)
                let shape = outputs[0].shape
                var plan: PoolPlan?
                if options.fast, x.rank == 4, planes > 0, size > 0 {
                    let g = Conv2DGeometry(batch: x.shape[0], inChannels: x.shape[1], height: x.shape[2], width: x.shape[3],
                                           outChannels: x.shape[1], kernelH: x.shape[2], kernelW: x.shape[3])
                    plan = try PoolPlan(.averageExcludingPad, g)
                }
                return ClosureKernel { [plan] inputs in
                    let v = inputs[0]!.floats
                    if let plan {
                        let y = try v.withUnsafeBufferPointer { src in try makeFloats(planes) { try plan.run(src.baseAddress!, $0) } }
                        return [Tensor(shape: shape, floats: y)]
                    }
                    let y = (0..<planes).map { p in
                        Float(v[(p * size)..<((p + 1) * size)].reduce(0.0) { $0 + Double($1) } / Double(size))
                    }
                    return [Tensor(shape: shape, floats: y)]
                }
            })
    }
}

final class PoolKernel: NodeKernel, @unchecked Sendable {
    let kind: PoolKind
    let geometry: Conv2DGeometry
    let outHeight: Int, outWidth: Int
    let outShape: [Int]
    let plan: PoolPlan?

    init(kind: PoolKind, geometry: Conv2DGeometry, outHeight: Int, outWidth: Int, outShape: [Int], fast: Bool) throws {
        self.kind = kind
        self.geometry = geometry
        self.outHeight = outHeight
        self.outWidth = outWidth
        self.outShape = outShape
        plan = fast && PoolPlan.supports(kind, geometry, outHeight: outHeight, outWidth: outWidth)
            ? try PoolPlan(kind, geometry, outHeight: outHeight, outWidth: outWidth) : nil
    }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        let x = inputs[0]!
        let count = outShape.reduce(1, *)
        if let plan {
            let y = try x.floats.withUnsafeBufferPointer { src in try makeFloats(count) { try plan.run(src.baseAddress!, $0) } }
            return [Tensor(shape: outShape, floats: y)]
        }
        return [Tensor(shape: outShape, floats: Kernels.pool2dReference(kind, geometry, input: x.floats,
                                                                         outHeight: outHeight, outWidth: outWidth))]
    }
}
