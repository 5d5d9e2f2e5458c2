import Foundation
import WhittleONNX
import WhittleTensor

/// Backward passes of the element-wise math, selection, reduction and normalization ops that transformers,
/// detectors and segmenters put on the gradient's path (GELU as Erf or Gelu, LayerNorm, attention masks by Where,
/// box decoding by Pow). Each is checked against finite differences in `GradientTests`.
extension Gradients {
    static func registerMath(_ r: inout [String: GradientDefinition]) {
        func define(_ op: String, _ inputs: Set<Int>, _ f: @escaping @Sendable (GradientContext) throws -> [Tensor?]) {
            r[op] = GradientDefinition(differentiable: inputs, backward: f)
        }
        // ∂L/∂X_k: the einsum of ∂L/∂Y with every other operand, onto X_k's indices (summed over the indices X_k lacks,
        // and over the axes it broadcasts).
        define("Einsum", Set(0..<64)) { g in
            let operands = try (0..<g.ctx.node.inputs.count).map { try g.x($0) }
            let plan = try Operators.einsumPlan(g.ctx, shapes: operands.map(\.shape))
            let dy = Tensor(shape: plan.output.map { plan.sizes[$0]! }, floats: g.dy)
            return try operands.indices.map { k in k < g.needs.count && g.needs[k] ? try Kernels.einsumGradient(plan, operands, dy, k) : nil }
        }
        let twoOverRootPi: Float = 1.1283791670955126
        define("Erf", [0]) { g in [unary(g) { x, _, d in d * twoOverRootPi * expf(-x * x) }] }
        define("Gelu", [0]) { g in
            let op = try Operators.geluOp(g.ctx)
            return [unary(g) { x, _, d in d * geluDerivative(x, tanh: op == .geluTanh) }]
        }
        define("Sqrt", [0]) { g in [unary(g) { _, y, d in d * 0.5 / y }] }
        define("Exp", [0]) { g in [unary(g) { _, y, d in d * y }] }
        define("Log", [0]) { g in [unary(g) { x, _, d in d / x }] }
        define("Abs", [0]) { g in [unary(g) { x, _, d in x > 0 ? d : x < 0 ? -d : 0 }] }
        define("Neg", [0]) { g in [unary(g) { _, _, d in -d }] }
        define("Reciprocal", [0]) { g in [unary(g) { _, y, d in -d * y * y }] }
        for op in ["Floor", "Ceil"] { define(op, [0]) { g in [unary(g) { _, _, _ in 0 }] } }
        define("Cast", [0]) { g in
            guard g.outputs[0].dtype.isFloatingPoint, try g.x(0).dtype.isFloatingPoint else { return [nil] }
            return [Tensor(shape: try g.x(0).shape, floats: g.dy)]
        }
        // The exponent is a constant of the formula (x², √x): no gradient flows to it.
        define("Pow", [0]) { g in
            let x = try g.x(0), p = try g.x(1), y = g.outputs[0], dy = g.dy, shape = y.shape
            let xs = try Kernels.broadcastFloat(x.floats, x.shape, dy, shape) { a, _ in a }.0
            let ps = try Kernels.broadcastFloat(p.asFloats, p.shape, dy, shape) { a, _ in a }.0
            let dx = (0..<dy.count).map { i in ps[i] == 0 ? 0 : dy[i] * ps[i] * powf(xs[i], ps[i] - 1) }
            return [Tensor(shape: x.shape, floats: reduceSum(dx, from: shape, to: x.shape)), nil]
        }
        // Max and Min pass the gradient to the operand that was selected (the first on ties); Sum to every one.
        for op in ["Max", "Min", "Sum"] {
            define(op, Set(0..<64)) { g in
                let y = g.outputs[0], dy = g.dy, shape = y.shape
                var taken = [Bool](repeating: false, count: y.count)
                return try g.inputs.indices.map { k in
                    let x = try g.x(k)
                    let xs = try Kernels.broadcastFloat(x.floats, x.shape, dy, shape) { a, _ in a }.0
                    var d = [Float](repeating: 0, count: y.count)
                    for i in 0..<y.count {
                        if op == "Sum" { d[i] = dy[i] } else if !taken[i] && xs[i] == y.floats[i] { d[i] = dy[i]; taken[i] = true }
                    }
                    return g.needs[k] ? Tensor(shape: x.shape, floats: reduceSum(d, from: shape, to: x.shape)) : nil
                }
            }
        }
        define("Where", [1, 2]) { g in
            let c = try g.x(0), dy = g.dy, shape = g.outputs[0].shape
            let ci = Kernels.broadcastIndices(c.shape, to: shape)
            func part(_ k: Int, _ chosen: Bool) throws -> Tensor? {
                guard g.needs[k] else { return nil }
                let x = try g.x(k)
                let d = (0..<dy.count).map { i in (c.ints[ci[i]] != 0) == chosen ? dy[i] : 0 }
                return Tensor(shape: x.shape, floats: reduceSum(d, from: shape, to: x.shape))
            }
            return [nil, try part(1, true), try part(2, false)]
        }
        for (op, from) in [("ReduceSum", Int64(13)), ("ReduceMax", 18), ("ReduceMin", 18), ("ReduceL2", 18), ("ReduceSumSquare", 18)] {
            define(op, [0]) { g in
                let x = try g.x(0), y = g.outputs[0], dy = g.dy
                let (axes, _) = try Operators.reduceAxes(g.ctx, rank: x.rank, axesInputFrom: from, g.inputs)
                let kept = Kernels.reducedShape(x.shape, axes: axes, keepDims: true)
                let map = Kernels.broadcastIndices(kept, to: x.shape)
                var dx = [Float](repeating: 0, count: x.count)
                var taken = [Bool](repeating: false, count: y.count)
                for i in 0..<x.count {
                    let j = map[i], v = x.floats[i]
                    switch op {
                    case "ReduceSum": dx[i] = dy[j]
                    case "ReduceSumSquare": dx[i] = 2 * v * dy[j]
                    case "ReduceL2": dx[i] = y.floats[j] == 0 ? 0 : dy[j] * v / y.floats[j]
                    default:
                        if !taken[j] && v == y.floats[j] { dx[i] = dy[j]; taken[j] = true }
                    }
                }
                return [Tensor(shape: x.shape, floats: dx)]
            }
        }
        define("LayerNormalization", [0, 1, 2]) { g in
            let x = try g.x(0), shape = x.shape
            let (axis, inner) = try Operators.layerNormAxis(g.ctx, shape)
            let outer = shape[..<axis].reduce(1, *), normalized = Array(shape[axis...])
            let epsilon = try g.ctx.float("epsilon", default: 1e-5)
            let scaleTensor = try g.x(1)
            let scale = Kernels.broadcastIndices(scaleTensor.shape, to: normalized).map { scaleTensor.floats[$0] }
            let (dx, dScale, dBias) = normalizationBackward(x.floats, dy: g.dy, rows: outer, size: inner, epsilon: epsilon,
                                                            parameters: inner) { _, i in (scale[i], i) }
            let b = g.inputs.count > 2 ? g.inputs[2] : nil
            return [Tensor(shape: shape, floats: dx),
                    g.needs[1] ? Tensor(shape: scaleTensor.shape, floats: reduceSum(dScale, from: normalized, to: scaleTensor.shape)) : nil,
                    g.needs.count > 2 && g.needs[2] ? b.map { Tensor(shape: $0.shape, floats: reduceSum(dBias, from: normalized, to: $0.shape)) } : nil]
        }
        for op in ["InstanceNormalization", "GroupNormalization"] {
            define(op, [0, 1, 2]) { g in
                let x = try g.x(0), shape = x.shape
                let channels = shape[1], spatial = shape[2...].reduce(1, *), batch = shape[0]
                let groups = op == "InstanceNormalization" ? channels : try Operators.groupCount(g.ctx, shape)
                let perChannel = op == "InstanceNormalization" || g.ctx.opset >= 21
                let per = channels / groups, size = per * spatial
                let scale = try g.x(1).floats
                let (dx, dScale, dBias) = normalizationBackward(x.floats, dy: g.dy, rows: batch * groups, size: size,
                                                                epsilon: try g.ctx.float("epsilon", default: 1e-5),
                                                                parameters: perChannel ? channels : groups) { row, i in
                    let c = (row % groups) * per + i / spatial
                    let k = perChannel ? c : c / per
                    return (scale[k], k)
                }
                return [Tensor(shape: shape, floats: dx), Tensor(shape: [dScale.count], floats: dScale),
                        Tensor(shape: [dBias.count], floats: dBias)]
            }
        }
    }

    static func geluDerivative(_ x: Float, tanh approximate: Bool) -> Float {
        if approximate {
            let k: Float = 0.79788456080286536, c: Float = 0.044715
            let u = k * (x + c * x * x * x), t = tanhf(u)
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * c * x * x)
        }
        let cdf = 0.5 * (1 + erff(x * 0.70710678118654752))
        let pdf = expf(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    }

    /// Normalization over `rows` of `size` values each, then an affine map whose scale for (row, i) comes from
    /// `affine` with the index of its parameter: returns ∂L/∂x, and ∂L/∂scale, ∂L/∂shift per parameter.
    /// `dx = γ·σ⁻¹/M · (M·dy − Σdy − x̂·Σ(dy·x̂))` with dy weighted by γ, statistics in Double.
    static func normalizationBackward(_ x: [Float], dy: [Float], rows: Int, size: Int, epsilon: Float, parameters: Int,
                                      _ affine: (Int, Int) -> (Float, Int)) -> ([Float], [Float], [Float]) {
        var dx = [Float](repeating: 0, count: x.count)
        var dScale = [Double](repeating: 0, count: parameters), dShift = dScale
        let m = Double(max(size, 1))
        for row in 0..<rows {
            let base = row * size
            var mean = 0.0
            for i in 0..<size { mean += Double(x[base + i]) }
            mean /= m
            var variance = 0.0
            for i in 0..<size { let d = Double(x[base + i]) - mean; variance += d * d }
            variance /= m
            let inverse = 1 / (variance + Double(epsilon)).squareRoot()
            var sumG = 0.0, sumGX = 0.0
            var gs = [Double](repeating: 0, count: size), xhat = gs
            for i in 0..<size {
                let (gamma, k) = affine(row, i)
                xhat[i] = (Double(x[base + i]) - mean) * inverse
                gs[i] = Double(dy[base + i]) * Double(gamma)
                sumG += gs[i]
                sumGX += gs[i] * xhat[i]
                dScale[k] += Double(dy[base + i]) * xhat[i]
                dShift[k] += Double(dy[base + i])
            }
            for i in 0..<size { dx[base + i] = Float(inverse / m * (m * gs[i] - sumG - xhat[i] * sumGX)) }
        }
        return (dx, dScale.map(Float.init), dShift.map(Float.init))
    }
}
