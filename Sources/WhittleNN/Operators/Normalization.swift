import WhittleONNX
import WhittleTensor

/// BatchNormalization(X, scale, B, input_mean, input_var; epsilon) in inference mode:
/// `Y = scale · (X − mean) / √(var + ε) + B` per channel (axis 1). Training mode belongs to the training engine.
extension Operators {
    static func registerNormalization(_ r: inout [String: OperatorDefinition]) {
        r["BatchNormalization"] = OperatorDefinition(
            infer: { ctx in
                let x = try ctx.floatInput(0)
                guard x.rank >= 2 else { throw ctx.error(.shapeMismatch, "input X has shape \(x.shape); rank ≥ 2 is required") }
                for i in 1...4 {
                    let p = try ctx.floatInput(i)
                    guard p.shape == [x.shape[1]] else {
                        throw ctx.error(.shapeMismatch, "parameter input \(i) has shape \(p.shape), expected [\(x.shape[1])]")
                    }
                }
                if try ctx.int("training_mode", default: 0) != 0 {
                    throw ctx.error(.invalidAttribute, "training_mode = 1 is not supported for inference")
                }
                if ctx.node.outputs.dropFirst().contains(where: { !$0.isEmpty }) {
                    throw ctx.error(.invalidGraph, "running mean/variance outputs are only produced in training mode")
                }
                return [ValueMeta(dtype: x.dtype, shape: x.shape)]
            },
            compile: { ctx, outputs, options in
                let shape = outputs[0].shape
                let epsilon = try ctx.float("epsilon", default: 1e-5)
                let params = (1...4).map { ctx.optionalInput($0)?.constant?.asFloats }
                let batch = shape[0], channels = shape[1], spatial = shape[2...].reduce(1, *)
                var plan: BatchNormPlan?
                if options.fast, params.allSatisfy({ $0 != nil }), shape.reduce(1, *) > 0 {
                    plan = try BatchNormPlan(batch: batch, channels: channels, spatial: spatial, epsilon: epsilon,
                                             scale: params[0]!, bias: params[1]!, mean: params[2]!, variance: params[3]!)
                }
                return ClosureKernel { [plan] inputs in
                    let x = inputs[0]!
                    if let plan {
                        let y = try x.floats.withUnsafeBufferPointer { src in
                            try makeFloats(x.count) { try plan.run(src.baseAddress!, $0) }
                        }
                        return [Tensor(shape: shape, floats: y)]
                    }
                    let p = (1...4).map { inputs[$0]!.asFloats }
                    return [Tensor(shape: shape, floats: Kernels.batchNormReference(
                        batch: batch, channels: channels, spatial: spatial, epsilon: epsilon, scale: p[0], bias: p[1],
                        mean: p[2], variance: p[3], input: x.floats))]
                }
            })
    }
}
