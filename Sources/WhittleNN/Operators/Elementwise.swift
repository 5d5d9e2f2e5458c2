import WhittleONNX
import WhittleTensor

/// Add, Sub, Mul, Div with NumPy broadcasting, on float tensors and (for shape arithmetic) integer tensors.
/// Integer division truncates toward zero, as onnxruntime does. Float operations of at least `binaryPlanMinimum`
/// elements run on oneDNN's binary primitive when `fast` is set.
extension Operators {
    static let binaryPlanMinimum = 4096

    static func registerElementwise(_ r: inout [String: OperatorDefinition]) {
        func binary(_ name: String, _ f: @escaping @Sendable (Float, Float) -> Float,
                    _ g: @escaping @Sendable (Int64, Int64) -> Int64?, kind: BinaryPlan.Kind) -> OperatorDefinition {
            @Sendable func run(_ ctx: NodeContext, _ inputs: [Tensor?]) throws -> [Tensor] {
                let a = inputs[0]!, b = inputs[1]!
                if a.dtype.isInteger {
                    var failed = false
                    let (values, shape) = try Kernels.broadcastInt(a.ints, a.shape, b.ints, b.shape) { x, y in
                        if let v = g(x, y) { return v }
                        failed = true
                        return 0
                    }
                    if failed { throw ctx.error(.invalidInput, "integer \(name) failed (division by zero, or the quotient overflows)") }
                    return [Tensor(shape: shape, ints: values, dtype: a.dtype)]
                }
                let (values, shape) = try Kernels.broadcastFloat(a.floats, a.shape, b.floats, b.shape, f)
                return [Tensor(shape: shape, floats: values)]
            }
            return OperatorDefinition(infer: { ctx in
                let a = try ctx.input(0), b = try ctx.input(1)
                guard a.dtype.isFloatingPoint == b.dtype.isFloatingPoint else {
                    throw ctx.error(.unsupportedDataType, "operands have element types \(a.dtype) and \(b.dtype)")
                }
                do {
                    return [ValueMeta(dtype: a.dtype, shape: try broadcastShape(a.shape, b.shape))]
                } catch {
                    throw ctx.error(.shapeMismatch, "shapes \(a.shape) and \(b.shape) cannot be broadcast together")
                }
            }, compile: { ctx, outputs, options in
                // Large float operations on oneDNN's binary primitive: the output-shaped operand first (either one
                // for Add and Mul), the other broadcast.
                let out = outputs[0]
                if options.fast, out.dtype.isFloatingPoint, out.count >= Self.binaryPlanMinimum, out.rank <= 6,
                   let a = ctx.optionalInput(0), let b = ctx.optionalInput(1) {
                    func aligned(_ s: [Int]) -> [Int] { [Int](repeating: 1, count: out.rank - s.count) + s }
                    let swap = a.shape != out.shape && b.shape == out.shape && (kind == .add || kind == .mul)
                    if a.shape == out.shape || swap, let plan = try? BinaryPlan(kind, shape: out.shape, operandShape: aligned(swap ? a.shape : b.shape)) {
                        return ClosureKernel { inputs in
                            let (x, y) = swap ? (inputs[1]!, inputs[0]!) : (inputs[0]!, inputs[1]!)
                            let values = try x.floats.withUnsafeBufferPointer { px in
                                try y.floats.withUnsafeBufferPointer { py in
                                    try makeFloats(out.count) { try plan.run(px.baseAddress!, py.baseAddress!, $0) }
                                }
                            }
                            return [Tensor(shape: out.shape, floats: values)]
                        }
                    }
                }
                return ClosureKernel { inputs in try run(ctx, inputs) }
            })
        }
        r["Add"] = binary("Add", { $0 + $1 }, { $0 &+ $1 }, kind: .add)
        r["Sub"] = binary("Sub", { $0 - $1 }, { $0 &- $1 }, kind: .sub)
        r["Mul"] = binary("Mul", { $0 * $1 }, { $0 &* $1 }, kind: .mul)
        r["Div"] = binary("Div", { $0 / $1 }, { a, b in
            let (q, overflow) = a.dividedReportingOverflow(by: b)  // b = 0 also reports overflow
            return overflow ? nil : q
        }, kind: .div)
    }
}

/// Activations: Relu, LeakyRelu, PRelu, Clip, Sigmoid, HardSigmoid, HardSwish, Tanh; and Softmax.
/// Relu, LeakyRelu, Clip, Sigmoid, HardSwish and Tanh run on oneDNN's eltwise primitive when `fast` is set.
extension Operators {
    static func registerActivations(_ r: inout [String: OperatorDefinition]) {
        @Sendable func sameAsInput(_ ctx: NodeContext) throws -> [ValueMeta] {
            let x = try ctx.floatInput(0)
            return [ValueMeta(dtype: x.dtype, shape: x.shape)]
        }
        func eltwise(_ op: @escaping @Sendable (NodeContext) throws -> PostOp) -> OperatorDefinition {
            OperatorDefinition(infer: sameAsInput, compile: { ctx, outputs, options in
                try EltwiseKernel(op: try op(ctx), count: outputs[0].count, shape: outputs[0].shape, fast: options.fast)
            })
        }
        r["Relu"] = eltwise { _ in .relu(alpha: 0) }
        r["LeakyRelu"] = eltwise { ctx in .relu(alpha: try ctx.float("alpha", default: 0.01)) }
        r["Sigmoid"] = eltwise { _ in .sigmoid }
        r["Tanh"] = eltwise { _ in .tanh }
        r["HardSwish"] = OperatorDefinition(minimumOpset: 14, infer: sameAsInput, compile: { ctx, outputs, options in
            try EltwiseKernel(op: .hardSwish, count: outputs[0].count, shape: outputs[0].shape, fast: options.fast)
        })
        r["Clip"] = OperatorDefinition(infer: sameAsInput, compile: { ctx, outputs, options in
            if let bounds = try clipBounds(ctx, nil) {
                return try EltwiseKernel(op: .clip(low: bounds.0, high: bounds.1), count: outputs[0].count,
                                         shape: outputs[0].shape, fast: options.fast)
            }
            return ClosureKernel { inputs in
                let (low, high) = try clipBounds(ctx, inputs)!
                return [Tensor(shape: inputs[0]!.shape, floats: inputs[0]!.floats.map { min(max($0, low), high) })]
            }
        })
        r["HardSigmoid"] = .simple(infer: sameAsInput) { ctx, inputs in
            let alpha = try ctx.float("alpha", default: 0.2), beta = try ctx.float("beta", default: 0.5)
            return [Tensor(shape: inputs[0]!.shape, floats: inputs[0]!.floats.map { max(0, min(1, alpha * $0 + beta)) })]
        }
        r["PRelu"] = .simple(infer: { ctx in
            let x = try ctx.floatInput(0), slope = try ctx.floatInput(1)
            guard (try? broadcastShape(x.shape, slope.shape)) == x.shape else {
                throw ctx.error(.shapeMismatch, "slope \(slope.shape) cannot be broadcast to X \(x.shape)")
            }
            return [ValueMeta(dtype: x.dtype, shape: x.shape)]
        }) { ctx, inputs in
            let x = inputs[0]!, slope = inputs[1]!
            let (values, shape) = try Kernels.broadcastFloat(x.floats, x.shape, slope.floats, slope.shape) { v, s in
                v < 0 ? s * v : v
            }
            return [Tensor(shape: shape, floats: values)]
        }
        r["Softmax"] = OperatorDefinition(infer: { ctx in
            let outs = try sameAsInput(ctx)
            _ = try ctx.axis(Int(try ctx.int("axis", default: ctx.opset >= 13 ? -1 : 1)), rank: outs[0].rank)
            return outs
        }, compile: { ctx, outputs, options in
            let shape = outputs[0].shape
            let defaultAxis: Int64 = ctx.opset >= 13 ? -1 : 1
            let axis = try ctx.axis(Int(try ctx.int("axis", default: defaultAxis)), rank: shape.count)
            let outer = shape[..<axis].reduce(1, *)
            // Before opset 13 the input is coerced to 2-D [outer, rest]; from 13 the softmax runs along one axis.
            let (middle, inner) = ctx.opset >= 13
                ? (shape[axis], shape[(axis + 1)...].reduce(1, *)) : (shape[axis...].reduce(1, *), 1)
            let plan = options.fast && shape.reduce(1, *) > 0 ? try SoftmaxPlan(outer: outer, axis: middle, inner: inner) : nil
            return ClosureKernel { inputs in
                let x = inputs[0]!
                if let plan {
                    let y = try x.floats.withUnsafeBufferPointer { src in
                        try makeFloats(x.count) { try plan.run(src.baseAddress!, $0) }
                    }
                    return [Tensor(shape: shape, floats: y)]
                }
                return [Tensor(shape: shape, floats: Kernels.softmaxReference(outer: outer, axis: middle, inner: inner, x.floats))]
            }
        })
    }

    /// Clip's bounds: attributes before opset 11, optional inputs from 11. Nil when an input bound is not constant
    /// and no run-time inputs were given.
    static func clipBounds(_ ctx: NodeContext, _ inputs: [Tensor?]?) throws -> (Float, Float)? {
        if ctx.opset < 11 {
            return (try ctx.float("min", default: -Float.greatestFiniteMagnitude),
                    try ctx.float("max", default: Float.greatestFiniteMagnitude))
        }
        func bound(_ i: Int, _ fallback: Float) throws -> Float? {
            guard i < ctx.node.inputs.count, !ctx.node.inputs[i].isEmpty else { return fallback }
            if let value = inputs?[i] ?? ctx.optionalInput(i)?.constant {
                guard value.count == 1 else { throw ctx.error(.shapeMismatch, "clip bound input \(i) must be a scalar") }
                return value.asFloats[0]
            }
            return nil
        }
        guard let low = try bound(1, -Float.greatestFiniteMagnitude), let high = try bound(2, Float.greatestFiniteMagnitude)
        else { return nil }
        return (low, high)
    }
}

/// An element-wise activation: oneDNN eltwise when `fast`, the scalar reference otherwise.
final class EltwiseKernel: NodeKernel, @unchecked Sendable {
    let op: PostOp
    let shape: [Int]
    let plan: EltwisePlan?

    init(op: PostOp, count: Int, shape: [Int], fast: Bool) throws {
        self.op = op
        self.shape = shape
        plan = fast && count > 0 ? try EltwisePlan(op, count: count) : nil
    }

    func run(_ inputs: [Tensor?]) throws -> [Tensor] {
        let x = inputs[0]!
        guard let plan else { return [Tensor(shape: shape, floats: Kernels.eltwiseReference(op, x.floats))] }
        let y = try x.floats.withUnsafeBufferPointer { src in try makeFloats(x.count) { try plan.run(src.baseAddress!, $0) } }
        return [Tensor(shape: shape, floats: y)]
    }
}
