import Foundation
import WhittleONNX
import WhittleTensor

/// Element-wise math: Sqrt, Exp, Log, Abs, Neg, Reciprocal, Erf, Gelu, Floor, Ceil (unary); Pow, Mod (binary, with
/// broadcasting); Max, Min, Sum (variadic, with broadcasting). Sqrt, Exp, Log, Abs and Gelu, and Pow with a
/// constant exponent of 2 or 0.5, run on oneDNN's eltwise primitive when `fast` is set; the rest are scalar loops.
extension Operators {
    static func registerMath(_ r: inout [String: OperatorDefinition]) {
        @Sendable func sameAsFloatInput(_ ctx: NodeContext) throws -> [ValueMeta] {
            let x = try ctx.floatInput(0)
            return [ValueMeta(dtype: x.dtype, shape: x.shape)]
        }
        /// A float op with a oneDNN algorithm.
        func eltwise(_ op: PostOp) -> OperatorDefinition {
            OperatorDefinition(infer: sameAsFloatInput, compile: { _, outputs, options in
                try EltwiseKernel(op: op, count: outputs[0].count, shape: outputs[0].shape, fast: options.fast)
            })
        }
        /// A float op computed by a scalar function.
        func scalar(minimumOpset: Int64 = 1, _ f: @escaping @Sendable (Float) -> Float) -> OperatorDefinition {
            .simple(minimumOpset: minimumOpset, infer: sameAsFloatInput) { _, inputs in
                [Tensor(shape: inputs[0]!.shape, floats: inputs[0]!.floats.map(f))]
            }
        }
        /// An op on float or integer tensors (Abs, Neg): floats through `floatOp`, integers through `intOp`.
        func signed(_ floatOp: PostOp, _ intOp: @escaping @Sendable (Int64) -> Int64) -> OperatorDefinition {
            OperatorDefinition(infer: { ctx in
                let x = try ctx.input(0)
                guard x.dtype.isFloatingPoint || (x.dtype.isInteger && x.dtype != .bool) else {
                    throw ctx.error(.unsupportedDataType, "input has element type \(x.dtype)")
                }
                return [ValueMeta(dtype: x.dtype, shape: x.shape)]
            }, compile: { ctx, outputs, options in
                guard outputs[0].dtype.isFloatingPoint else {
                    return ClosureKernel { inputs in
                        [Tensor(shape: inputs[0]!.shape, ints: inputs[0]!.ints.map(intOp), dtype: inputs[0]!.dtype)]
                    }
                }
                return try EltwiseKernel(op: floatOp, count: outputs[0].count, shape: outputs[0].shape, fast: options.fast)
            })
        }
        r["Sqrt"] = eltwise(.sqrt)
        r["Exp"] = eltwise(.exp)
        r["Log"] = eltwise(.log)
        r["Abs"] = signed(.abs) { $0 == .min ? .max : Swift.abs($0) }
        r["Neg"] = signed(.linear(alpha: -1, beta: 0)) { 0 &- $0 }
        r["Reciprocal"] = scalar { 1 / $0 }
        r["Erf"] = scalar { erff($0) }
        r["Floor"] = scalar { $0.rounded(.down) }
        r["Ceil"] = scalar { $0.rounded(.up) }
        r["Gelu"] = OperatorDefinition(minimumOpset: 20, infer: { ctx in
            _ = try geluOp(ctx)
            return try sameAsFloatInput(ctx)
        }, compile: { ctx, outputs, options in
            try EltwiseKernel(op: try geluOp(ctx), count: outputs[0].count, shape: outputs[0].shape, fast: options.fast)
        })
        r["Pow"] = OperatorDefinition(infer: { ctx in
            let x = try ctx.floatInput(0), y = try ctx.input(1)
            guard y.dtype.isFloatingPoint || y.dtype.isInteger else {
                throw ctx.error(.unsupportedDataType, "exponent has element type \(y.dtype)")
            }
            do {
                return [ValueMeta(dtype: x.dtype, shape: try broadcastShape(x.shape, y.shape))]
            } catch {
                throw ctx.error(.shapeMismatch, "shapes \(x.shape) and \(y.shape) cannot be broadcast together")
            }
        }, compile: { ctx, outputs, options in
            // x² and √x (LayerNorm and RMSNorm written out by exporters) as one oneDNN pass.
            if let exponent = ctx.optionalInput(1)?.constant, exponent.count == 1, try ctx.input(0).shape == outputs[0].shape {
                switch exponent.asFloats[0] {
                case 2: return try EltwiseKernel(op: .square, count: outputs[0].count, shape: outputs[0].shape, fast: options.fast)
                case 0.5: return try EltwiseKernel(op: .sqrt, count: outputs[0].count, shape: outputs[0].shape, fast: options.fast)
                default: break
                }
            }
            return ClosureKernel { inputs in
                let x = inputs[0]!, y = inputs[1]!
                let (values, shape) = try Kernels.broadcastFloat(x.floats, x.shape, y.asFloats, y.shape) { powf($0, $1) }
                return [Tensor(shape: shape, floats: values)]
            }
        })
        r["Mod"] = .simple(infer: { ctx in
            let a = try ctx.input(0), b = try ctx.input(1)
            guard a.dtype == b.dtype else {
                throw ctx.error(.unsupportedDataType, "operands have element types \(a.dtype) and \(b.dtype)")
            }
            if a.dtype.isFloatingPoint, try ctx.int("fmod", default: 0) == 0 {
                throw ctx.error(.invalidAttribute, "fmod must be 1 for floating-point operands")
            }
            do {
                return [ValueMeta(dtype: a.dtype, shape: try broadcastShape(a.shape, b.shape))]
            } catch {
                throw ctx.error(.shapeMismatch, "shapes \(a.shape) and \(b.shape) cannot be broadcast together")
            }
        }) { ctx, inputs in
            let a = inputs[0]!, b = inputs[1]!
            if a.dtype.isFloatingPoint {
                let (values, shape) = try Kernels.broadcastFloat(a.floats, a.shape, b.floats, b.shape) { fmodf($0, $1) }
                return [Tensor(shape: shape, floats: values)]
            }
            let truncated = try ctx.int("fmod", default: 0) != 0
            var failed = false
            let (values, shape) = try Kernels.broadcastInt(a.ints, a.shape, b.ints, b.shape) { x, y in
                let (r, overflow) = x.remainderReportingOverflow(dividingBy: y)  // y = 0 also reports overflow
                if overflow {
                    if y == 0 { failed = true }
                    return 0
                }
                // Without fmod the result takes the divisor's sign, as Python's and NumPy's % do.
                return !truncated && r != 0 && (r < 0) != (y < 0) ? r + y : r
            }
            if failed { throw ctx.error(.invalidInput, "integer Mod by zero") }
            return [Tensor(shape: shape, ints: values, dtype: a.dtype)]
        }
        func variadic(_ name: String, _ f: @escaping @Sendable (Float, Float) -> Float,
                      _ g: @escaping @Sendable (Int64, Int64) -> Int64) -> OperatorDefinition {
            .simple(infer: { ctx in
                guard !ctx.inputs.isEmpty else { throw ctx.error(.invalidGraph, "\(name) needs at least one input") }
                let first = try ctx.input(0)
                var shape = first.shape
                for i in ctx.inputs.indices {
                    let x = try ctx.input(i)
                    guard x.dtype == first.dtype else {
                        throw ctx.error(.unsupportedDataType, "inputs have element types \(first.dtype) and \(x.dtype)")
                    }
                    do { shape = try broadcastShape(shape, x.shape) } catch {
                        throw ctx.error(.shapeMismatch, "input \(i) of shape \(x.shape) cannot be broadcast with \(shape)")
                    }
                }
                return [ValueMeta(dtype: first.dtype, shape: shape)]
            }) { _, inputs in
                var acc = inputs[0]!
                for x in inputs.dropFirst().map({ $0! }) {
                    if acc.dtype.isFloatingPoint {
                        let (values, shape) = try Kernels.broadcastFloat(acc.floats, acc.shape, x.floats, x.shape, f)
                        acc = Tensor(shape: shape, floats: values)
                    } else {
                        let (values, shape) = try Kernels.broadcastInt(acc.ints, acc.shape, x.ints, x.shape, g)
                        acc = Tensor(shape: shape, ints: values, dtype: acc.dtype)
                    }
                }
                return [acc]
            }
        }
        // NaN propagates through Max and Min, as in onnxruntime.
        r["Max"] = variadic("Max", { $0.isNaN || $1.isNaN ? .nan : Swift.max($0, $1) }, { Swift.max($0, $1) })
        r["Min"] = variadic("Min", { $0.isNaN || $1.isNaN ? .nan : Swift.min($0, $1) }, { Swift.min($0, $1) })
        r["Sum"] = variadic("Sum", { $0 + $1 }, { $0 &+ $1 })
    }

    /// Gelu's `approximate` attribute: "none" (erf) or "tanh".
    static func geluOp(_ ctx: NodeContext) throws -> PostOp {
        switch try ctx.string("approximate", default: "none") {
        case "none": return .geluErf
        case "tanh": return .geluTanh
        case let other: throw ctx.error(.invalidAttribute, "approximate '\(other)' is not 'none' or 'tanh'")
        }
    }
}
