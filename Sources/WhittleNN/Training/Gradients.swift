import WhittleONNX
import WhittleTensor

/// What a node's backward pass sees.
public struct GradientContext {
    public let ctx: NodeContext
    /// The forward inputs (nil for omitted optional inputs).
    public let inputs: [Tensor?]
    /// The forward outputs.
    public let outputs: [Tensor]
    /// ∂L/∂output for each output (nil when no gradient reaches it).
    public let dOutputs: [Tensor?]
    /// Values the training-mode forward saved (batch statistics, dropout masks).
    public let saved: [Tensor]
    /// Which inputs need a gradient.
    public let needs: [Bool]
    /// Use the fast kernels rather than the reference loops.
    public let fast: Bool
    /// oneDNN's training primitives for this node, when it is a convolution and `fast` is on.
    let convolutionPlan: ConvTrainingPlan?
    /// oneDNN's batch-normalization training primitives, when this is a BatchNormalization node in fast mode.
    let batchNormPlan: BatchNormTrainingPlan?
    /// Which convolution activation buffers are in the plan's blocked layout.
    let convolutionLayouts: ConvTrainingPlan.Layouts

    func x(_ i: Int) throws -> Tensor {
        guard i < inputs.count, let t = inputs[i] else { throw ctx.error(.invalidGraph, "input \(i) is missing in backward") }
        return t
    }
    /// ∂L/∂output 0 as floats (zeros when nothing flows).
    var dy: [Float] { dOutputs.first??.floats ?? [Float](repeating: 0, count: outputs[0].count) }
}

/// How one op type propagates gradients: which inputs can carry one, and the backward function returning
/// ∂L/∂input for each input (nil where none is needed).
public struct GradientDefinition: Sendable {
    public let differentiable: Set<Int>
    public let backward: @Sendable (GradientContext) throws -> [Tensor?]
}

public enum Gradients {
    public static let registry: [String: GradientDefinition] = {
        var r: [String: GradientDefinition] = [:]
        func define(_ op: String, _ inputs: Set<Int>, _ f: @escaping @Sendable (GradientContext) throws -> [Tensor?]) {
            r[op] = GradientDefinition(differentiable: inputs, backward: f)
        }
        define("Conv", [0, 1, 2], convolution)
        define("Gemm", [0, 1, 2], gemm)
        define("MatMul", [0, 1], matMul)
        define("BatchNormalization", [0, 1, 2], batchNorm)
        define("Relu", [0]) { g in [unary(g) { x, _, d in x > 0 ? d : 0 }] }
        define("LeakyRelu", [0]) { g in
            let alpha = try g.ctx.float("alpha", default: 0.01)
            return [unary(g) { x, _, d in x < 0 ? alpha * d : d }]
        }
        define("Clip", [0]) { g in
            let (low, high) = try Operators.clipBounds(g.ctx, g.inputs) ?? (-.greatestFiniteMagnitude, .greatestFiniteMagnitude)
            return [unary(g) { x, _, d in x > low && x < high ? d : 0 }]
        }
        define("Sigmoid", [0]) { g in [unary(g) { _, y, d in d * y * (1 - y) }] }
        define("Tanh", [0]) { g in [unary(g) { _, y, d in d * (1 - y * y) }] }
        define("HardSwish", [0]) { g in [unary(g) { x, _, d in x < -3 ? 0 : x <= 3 ? d * (x / 3 + 0.5) : d }] }
        define("HardSigmoid", [0]) { g in
            let alpha = try g.ctx.float("alpha", default: 0.2), beta = try g.ctx.float("beta", default: 0.5)
            return [unary(g) { x, _, d in let v = alpha * x + beta; return v > 0 && v < 1 ? alpha * d : 0 }]
        }
        define("PRelu", [0, 1]) { g in
            let x = try g.x(0), slope = try g.x(1), dy = g.dy
            let (s, _) = try Kernels.broadcastFloat(x.floats, x.shape, slope.floats, slope.shape) { _, s in s }
            let dx = (0..<x.count).map { x.floats[$0] < 0 ? s[$0] * dy[$0] : dy[$0] }
            let dsFull = (0..<x.count).map { x.floats[$0] < 0 ? x.floats[$0] * dy[$0] : 0 }
            return [Tensor(shape: x.shape, floats: dx),
                    Tensor(shape: slope.shape, floats: reduceSum(dsFull, from: x.shape, to: slope.shape))]
        }
        define("Softmax", [0]) { g in
            let y = g.outputs[0], dy = g.dy, shape = y.shape
            let axis = try g.ctx.axis(Int(try g.ctx.int("axis", default: g.ctx.opset >= 13 ? -1 : 1)), rank: shape.count)
            let outer = shape[..<axis].reduce(1, *)
            let (middle, inner) = g.ctx.opset >= 13 ? (shape[axis], shape[(axis + 1)...].reduce(1, *)) : (shape[axis...].reduce(1, *), 1)
            var dx = [Float](repeating: 0, count: y.count)
            for o in 0..<outer {
                for i in 0..<inner {
                    var dot: Float = 0
                    for a in 0..<middle { let k = (o * middle + a) * inner + i; dot += dy[k] * y.floats[k] }
                    for a in 0..<middle { let k = (o * middle + a) * inner + i; dx[k] = y.floats[k] * (dy[k] - dot) }
                }
            }
            return [Tensor(shape: shape, floats: dx)]
        }
        define("MaxPool", [0]) { g in [try pooling(g, max: true)] }
        define("AveragePool", [0]) { g in [try pooling(g, max: false)] }
        define("GlobalAveragePool", [0]) { g in
            let x = try g.x(0), dy = g.dy
            let size = x.shape[2...].reduce(1, *)
            let scale = 1 / Float(size)
            return [Tensor(shape: x.shape, floats: (0..<x.count).map { dy[$0 / size] * scale })]
        }
        define("ReduceMean", [0]) { g in
            let x = try g.x(0), y = g.outputs[0]
            let keptShape = try reducedKeptShape(g, x.shape)
            let count = x.count / max(y.count, 1)
            let strides = broadcastStrides(keptShape, to: x.shape)
            let dy = g.dy
            let scale = 1 / Float(count)
            let dx = Kernels.broadcastLoop(count: x.count, shape: x.shape, aStrides: strides,
                                           bStrides: [Int](repeating: 0, count: x.rank)) { i, _ in dy[i] * scale }
            return [Tensor(shape: x.shape, floats: dx)]
        }
        for op in ["Add", "Sub", "Mul", "Div"] { define(op, [0, 1]) { g in try arithmetic(g, op) } }
        define("Concat", Set(0..<64)) { g in
            let dy = g.dy, shape = g.outputs[0].shape
            let axis = try g.ctx.axis(Int(try g.ctx.int("axis")!), rank: shape.count)
            let outer = shape[..<axis].reduce(1, *), total = shape[axis...].reduce(1, *)
            var offset = 0
            return try g.inputs.indices.map { i in
                let part = try g.x(i)
                let block = part.shape[axis...].reduce(1, *)
                defer { offset += block }
                guard g.needs[i] else { return nil }
                var out = [Float](); out.reserveCapacity(part.count)
                for o in 0..<outer { out += dy[(o * total + offset)..<(o * total + offset + block)] }
                return Tensor(shape: part.shape, floats: out)
            }
        }
        for op in ["Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity"] {
            define(op, [0]) { g in [Tensor(shape: try g.x(0).shape, floats: g.dy)] }
        }
        define("Transpose", [0]) { g in
            let x = try g.x(0)
            let perm = try Operators.transposePerm(g.ctx, rank: x.rank)
            var inverse = [Int](repeating: 0, count: perm.count)
            for (i, p) in perm.enumerated() { inverse[p] = i }
            return [Tensor(shape: x.shape, floats: Kernels.transpose(g.dy, shape: g.outputs[0].shape, perm: inverse))]
        }
        define("Dropout", [0]) { g in
            guard let mask = g.saved.first else { return [Tensor(shape: try g.x(0).shape, floats: g.dy)] }
            let dy = g.dy
            return [Tensor(shape: mask.shape, floats: (0..<dy.count).map { dy[$0] * mask.floats[$0] })]
        }
        registerMath(&r)
        registerIndexing(&r)
        return r
    }()

    // MARK: Shared helpers

    /// `f(x, y, dy)` element-wise for single-input activations.
    static func unary(_ g: GradientContext, _ f: (Float, Float, Float) -> Float) -> Tensor {
        let x = g.inputs[0]!, y = g.outputs[0], dy = g.dy
        let count = x.count
        let out = x.floats.withUnsafeBufferPointer { px in
            y.floats.withUnsafeBufferPointer { py in
                dy.withUnsafeBufferPointer { pd in
                    [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
                        for i in 0..<count { buffer[i] = f(px[i], py[i], pd[i]) }
                        initialized = count
                    }
                }
            }
        }
        return Tensor(shape: x.shape, floats: out)
    }

    /// Sums a gradient of `shape` over the axes along which `target` was broadcast, giving `target`'s shape.
    public static func reduceSum(_ grad: [Float], from shape: [Int], to target: [Int]) -> [Float] {
        if shape == target { return grad }
        var out = [Float](repeating: 0, count: target.reduce(1, *))
        let strides = broadcastStrides(target, to: shape)
        _ = Kernels.broadcastLoop(count: grad.count, shape: shape, aStrides: stridesOf(shape), bStrides: strides) { i, j in
            out[j] += grad[i]
        }
        return out
    }

    static func arithmetic(_ g: GradientContext, _ op: String) throws -> [Tensor?] {
        let a = try g.x(0), b = try g.x(1), dy = g.dy, shape = g.outputs[0].shape
        /// An operand's values broadcast to the output shape (only Mul and Div need them).
        func expanded(_ t: Tensor) throws -> [Float] {
            t.shape == shape ? t.floats : try Kernels.broadcastFloat(t.floats, t.shape, dy, shape) { x, _ in x }.0
        }
        var da: [Float], db: [Float]
        switch op {
        case "Add": da = dy; db = dy
        case "Sub": da = dy; db = dy.map { -$0 }
        case "Mul":
            let av = try expanded(a), bv = try expanded(b)
            da = (0..<dy.count).map { dy[$0] * bv[$0] }
            db = (0..<dy.count).map { dy[$0] * av[$0] }
        default:
            let av = try expanded(a), bv = try expanded(b)
            da = (0..<dy.count).map { dy[$0] / bv[$0] }
            db = (0..<dy.count).map { -dy[$0] * av[$0] / (bv[$0] * bv[$0]) }
        }
        return [g.needs[0] ? Tensor(shape: a.shape, floats: reduceSum(da, from: shape, to: a.shape)) : nil,
                g.needs[1] ? Tensor(shape: b.shape, floats: reduceSum(db, from: shape, to: b.shape)) : nil]
    }

    static func reducedKeptShape(_ g: GradientContext, _ shape: [Int]) throws -> [Int] {
        let raw: [Int]?
        if g.ctx.opset >= 18 {
            raw = g.inputs.count > 1 ? g.inputs[1]?.asInts.map { Int($0) } : nil
        } else {
            raw = try g.ctx.ints("axes")
        }
        let axes = try (raw ?? Array(0..<shape.count)).map { try g.ctx.axis($0, rank: shape.count) }
        return shape.enumerated().map { axes.contains($0.offset) ? 1 : $0.element }
    }

    // MARK: Convolution, GEMM, MatMul

    static func convolution(_ g: GradientContext) throws -> [Tensor?] {
        let (x, window, _) = try Operators.convSetup(g.ctx)
        let w = try g.x(1)
        let geometry = window.geometry(batch: x.shape[0], channels: x.shape[1], spatial: Array(x.shape[2...]),
                                       outChannels: w.shape[0], groups: Int(try g.ctx.int("group", default: 1)))
        let input = try g.x(0).floats, dy = g.dy
        let dx: [Float]?, dw: [Float]?, db: [Float]
        if let plan = g.convolutionPlan {
            let needBias = g.needs.count > 2 && g.needs[2]
            let r = try plan.backward(input: input, weights: w.floats, dY: dy, needInput: g.needs[0], needWeights: g.needs[1],
                                      needBias: needBias, layouts: g.convolutionLayouts)
            (dx, dw, db) = (r.dX, r.dW, r.dB ?? [])
        } else if g.fast {
            (dx, dw, db) = try Kernels.conv2dBackward(geometry, input: input, weights: w.floats, dY: dy,
                                                      needInput: g.needs[0], needWeights: g.needs[1])
        } else {
            let r = Kernels.conv2dBackwardReference(geometry, input: input, weights: w.floats, dY: dy)
            (dx, dw, db) = (r.dX, r.dW, r.dB)
        }
        return [dx.flatMap { g.needs[0] ? Tensor(shape: x.shape, floats: $0) : nil },
                dw.flatMap { g.needs[1] ? Tensor(shape: w.shape, floats: $0) : nil },
                g.needs.count > 2 && g.needs[2] ? Tensor(shape: [w.shape[0]], floats: db) : nil]
    }

    static func gemm(_ g: GradientContext) throws -> [Tensor?] {
        let a = try g.x(0), b = try g.x(1), dy = g.dy
        let (m, k, n) = try Operators.gemmSizes(g.ctx)
        let transA = try g.ctx.int("transA", default: 0) != 0, transB = try g.ctx.int("transB", default: 0) != 0
        let alpha = try g.ctx.float("alpha", default: 1), beta = try g.ctx.float("beta", default: 1)
        func mm(_ x: [Float], _ tx: Bool, _ y: [Float], _ ty: Bool, _ rows: Int, _ cols: Int, _ inner: Int) throws -> [Float] {
            if !g.fast {
                return Kernels.gemmReference(transA: tx, transB: ty, m: rows, n: cols, k: inner, alpha: alpha, a: x, b: y,
                                             c: [Float](repeating: 0, count: rows * cols))
            }
            var out = [Float](repeating: 0, count: rows * cols)
            try x.withUnsafeBufferPointer { px in
                try y.withUnsafeBufferPointer { py in
                    try out.withUnsafeMutableBufferPointer { po in
                        try Kernels.gemm(transA: tx, transB: ty, m: rows, n: cols, k: inner, alpha: alpha,
                                         a: px.baseAddress!, b: py.baseAddress!, c: po.baseAddress!)
                    }
                }
            }
            return out
        }
        var da: Tensor?, db: Tensor?, dc: Tensor?
        if g.needs[0] {
            // op(A) is [M, K]: dOp(A) = dY · op(B)ᵀ.
            let values = transA ? try mm(b.floats, transB, dy, true, k, m, n) : try mm(dy, false, b.floats, !transB, m, k, n)
            da = Tensor(shape: a.shape, floats: values)
        }
        if g.needs[1] {
            // op(B) is [K, N]: dOp(B) = op(A)ᵀ · dY.
            let values = transB ? try mm(dy, true, a.floats, transA, n, k, m) : try mm(a.floats, !transA, dy, false, k, n, m)
            db = Tensor(shape: b.shape, floats: values)
        }
        if g.needs.count > 2, g.needs[2], let c = g.inputs.count > 2 ? g.inputs[2] : nil {
            dc = Tensor(shape: c.shape, floats: reduceSum(dy.map { $0 * beta }, from: [m, n], to: c.shape))
        }
        return [da, db, dc]
    }

    static func matMul(_ g: GradientContext) throws -> [Tensor?] {
        let a = try g.x(0), b = try g.x(1), dy = g.dy
        let s = try Operators.matMulShapes(g.ctx)
        let batch = s.batch.reduce(1, *)
        let aBatch = Array(s.a.dropLast(2)), bBatch = Array(s.b.dropLast(2))
        let pairs = Kernels.broadcastLoop(count: batch, shape: s.batch.isEmpty ? [1] : s.batch,
            aStrides: s.batch.isEmpty ? [0] : broadcastStrides(aBatch, to: s.batch),
            bStrides: s.batch.isEmpty ? [0] : broadcastStrides(bBatch, to: s.batch)) { ($0, $1) }
        var da = [Float](repeating: 0, count: a.count), db = [Float](repeating: 0, count: b.count)
        for (index, (ia, ib)) in pairs.enumerated() {
            let aStart = ia * s.m * s.k, bStart = ib * s.k * s.n, yStart = index * s.m * s.n
            try dy.withUnsafeBufferPointer { pdy in
                try a.floats.withUnsafeBufferPointer { pa in
                    try b.floats.withUnsafeBufferPointer { pb in
                        if g.needs[0] {
                            try da.withUnsafeMutableBufferPointer { pda in
                                try Kernels.gemm(transA: false, transB: true, m: s.m, n: s.k, k: s.n, a: pdy.baseAddress! + yStart,
                                                 b: pb.baseAddress! + bStart, beta: 1, c: pda.baseAddress! + aStart)
                            }
                        }
                        if g.needs[1] {
                            try db.withUnsafeMutableBufferPointer { pdb in
                                try Kernels.gemm(transA: true, transB: false, m: s.k, n: s.n, k: s.m, a: pa.baseAddress! + aStart,
                                                 b: pdy.baseAddress! + yStart, beta: 1, c: pdb.baseAddress! + bStart)
                            }
                        }
                    }
                }
            }
        }
        return [g.needs[0] ? Tensor(shape: a.shape, floats: da) : nil, g.needs[1] ? Tensor(shape: b.shape, floats: db) : nil]
    }

    // MARK: Batch normalization

    /// Training mode (saved = [batch mean, inverse std]): `dx = γ·σ⁻¹/M · (M·dy − Σdy − x̂·Σ(dy·x̂))`,
    /// `dγ = Σ dy·x̂`, `dβ = Σ dy`, sums over the M = N·S values of a channel. Frozen mode (nothing saved) uses the
    /// running statistics: `dx = dy·γ·σ⁻¹`.
    static func batchNorm(_ g: GradientContext) throws -> [Tensor?] {
        let x = try g.x(0), gamma = try g.x(1).floats, dy = g.dy
        let n = x.shape[0], c = x.shape[1], s = x.shape[2...].reduce(1, *)
        if let plan = g.batchNormPlan, g.saved.count == 3 {
            let r = try plan.backward(x.floats, dY: dy, scale: gamma, shift: try g.x(2).floats, mean: g.saved[0].floats,
                                      variance: g.saved[2].floats)
            return [g.needs[0] ? Tensor(shape: x.shape, floats: r.dX) : nil, Tensor(shape: [x.shape[1]], floats: r.dScale),
                    Tensor(shape: [x.shape[1]], floats: r.dShift), nil, nil]
        }
        let mean: [Float], invStd: [Float]
        let training = g.saved.count >= 2
        if training {
            mean = g.saved[0].floats
            invStd = g.saved[1].floats
        } else {
            let epsilon = try g.ctx.float("epsilon", default: 1e-5)
            mean = try g.x(3).floats
            invStd = try g.x(4).floats.map { 1 / ($0 + epsilon).squareRoot() }
        }
        var dx = [Float](repeating: 0, count: x.count), dgamma = [Float](repeating: 0, count: c), dbeta = dgamma
        let m = Float(n * s)
        for ch in 0..<c {
            var sumDy: Double = 0, sumDyXhat: Double = 0
            for b in 0..<n {
                let base = (b * c + ch) * s
                for i in 0..<s {
                    let xhat = (x.floats[base + i] - mean[ch]) * invStd[ch]
                    sumDy += Double(dy[base + i])
                    sumDyXhat += Double(dy[base + i] * xhat)
                }
            }
            dgamma[ch] = Float(sumDyXhat)
            dbeta[ch] = Float(sumDy)
            guard g.needs[0] else { continue }
            let k = gamma[ch] * invStd[ch]
            for b in 0..<n {
                let base = (b * c + ch) * s
                for i in 0..<s {
                    if training {
                        let xhat = (x.floats[base + i] - mean[ch]) * invStd[ch]
                        dx[base + i] = k / m * (m * dy[base + i] - Float(sumDy) - xhat * Float(sumDyXhat))
                    } else {
                        dx[base + i] = k * dy[base + i]
                    }
                }
            }
        }
        return [g.needs[0] ? Tensor(shape: x.shape, floats: dx) : nil, Tensor(shape: [c], floats: dgamma),
                Tensor(shape: [c], floats: dbeta), nil, nil]
    }

    // MARK: Pooling

    /// MaxPool routes each output's gradient to the first maximum of its window (PyTorch's choice on ties);
    /// AveragePool spreads it evenly over the positions the forward pass divided by.
    static func pooling(_ g: GradientContext, max isMax: Bool) throws -> Tensor {
        let x = try g.x(0), dy = g.dy
        guard let kernel = try g.ctx.ints("kernel_shape") else { throw g.ctx.error(.invalidAttribute, "kernel_shape is required") }
        let window = try Window.resolve(g.ctx, spatial: Array(x.shape[2...]), kernel: kernel,
                                        ceilMode: try g.ctx.int("ceil_mode", default: 0) != 0)
        let geo = window.geometry(batch: x.shape[0], channels: x.shape[1], spatial: Array(x.shape[2...]),
                                  outChannels: x.shape[1], groups: 1)
        let (oh, ow) = window.output2D
        let includePad = try g.ctx.int("count_include_pad", default: 0) != 0
        var dx = [Float](repeating: 0, count: x.count)
        Kernels.forEachPoolWindow(geo, outHeight: oh, outWidth: ow) { output, inputs, padded in
            let d = dy[output]
            if isMax {
                // The first maximum in scan order takes the gradient (PyTorch's choice on ties).
                var best = -1
                for index in inputs where best < 0 || x.floats[index] > x.floats[best] { best = index }
                if best >= 0 { dx[best] += d }
            } else {
                let count = includePad ? padded : inputs.count
                for index in inputs { dx[index] += d / Float(max(count, 1)) }
            }
        }
        return Tensor(shape: x.shape, floats: dx)
    }
}
