import WhittleONNX
import WhittleTensor

/// Einsum(inputs…; equation) on float tensors, for the forms exporters write (attention's "bhid,bhjd->bhij" and
/// "bhij,bhjd->bhid", "bid,bjd->bij", transposes, reductions, "..." for leading axes). Two operands run as one
/// batched GEMM: each operand is permuted to [batch, free, contracted] and the product permuted to the output's
/// order; any other form (one operand, three or more) runs the reference loop over every index.
extension Operators {
    struct EinsumPlan {
        /// Per operand, its letters (an ellipsis expanded to letters of its own).
        var inputs: [[Character]]
        var output: [Character]
        var sizes: [Character: Int]
    }

    static func einsumPlan(_ ctx: NodeContext, shapes: [[Int]]) throws -> EinsumPlan {
        let equation = try ctx.string("equation", default: "").filter { !$0.isWhitespace }
        guard !equation.isEmpty else { throw ctx.error(.invalidAttribute, "attribute 'equation' is required") }
        let parts = equation.components(separatedBy: "->")
        guard parts.count <= 2 else { throw ctx.error(.invalidAttribute, "equation '\(equation)' has more than one '->'") }
        let terms = parts[0].components(separatedBy: ",")
        guard terms.count == shapes.count else {
            throw ctx.error(.invalidAttribute, "equation '\(equation)' names \(terms.count) operands, the node has \(shapes.count)")
        }
        // "..." stands for the leading axes an operand has beyond its letters, given letters no equation can use.
        let ellipsisLetters = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZ".reversed())
        var ellipsisRank = 0
        var inputs: [[Character]] = []
        for (term, shape) in zip(terms, shapes) {
            let letters = Array(term.replacingOccurrences(of: "...", with: ""))
            guard letters.allSatisfy({ $0.isLetter && $0.isLowercase || $0.isUppercase }) else {
                throw ctx.error(.invalidAttribute, "equation term '\(term)' must use letters only")
            }
            if term.contains("...") {
                let extra = shape.count - letters.count
                guard extra >= 0 else { throw ctx.error(.shapeMismatch, "term '\(term)' has more letters than its operand's rank \(shape.count)") }
                ellipsisRank = max(ellipsisRank, extra)
                let at = term.components(separatedBy: "...")[0].count
                inputs.append(Array(letters[..<at]) + Array(ellipsisLetters.prefix(extra).reversed()) + Array(letters[at...]))
            } else {
                guard letters.count == shape.count else {
                    throw ctx.error(.shapeMismatch, "term '\(term)' has \(letters.count) letters for an operand of rank \(shape.count)")
                }
                inputs.append(letters)
            }
        }
        var sizes: [Character: Int] = [:]
        for (letters, shape) in zip(inputs, shapes) {
            for (c, d) in zip(letters, shape) {
                if let known = sizes[c], known != d {
                    guard known == 1 || d == 1 else {
                        throw ctx.error(.shapeMismatch, "index '\(c)' has sizes \(known) and \(d) in equation '\(equation)'")
                    }
                    sizes[c] = max(known, d)
                } else if sizes[c] == nil {
                    sizes[c] = d
                }
            }
        }
        var output: [Character]
        if parts.count == 2 {
            let term = parts[1]
            let letters = Array(term.replacingOccurrences(of: "...", with: ""))
            if term.contains("...") {
                let at = term.components(separatedBy: "...")[0].count
                output = Array(letters[..<at]) + Array(ellipsisLetters.prefix(ellipsisRank).reversed()) + Array(letters[at...])
            } else {
                output = letters
            }
            guard output.allSatisfy({ sizes[$0] != nil }), Set(output).count == output.count else {
                throw ctx.error(.invalidAttribute, "output '\(term)' uses an index that no operand has, or repeats one")
            }
        } else {
            // Implicit output: the ellipsis, then the letters that appear once, in alphabetical order.
            let counts = inputs.flatMap { $0 }.reduce(into: [Character: Int]()) { $0[$1, default: 0] += 1 }
            output = Array(ellipsisLetters.prefix(ellipsisRank).reversed())
                + counts.filter { $0.value == 1 && $0.key.isLowercase }.keys.sorted()
        }
        // The work is the product of every index's size, which the operands' and output's sizes do not bound
        // ("ik,jk->ij" with three sizes of 2¹⁵): a hostile equation is refused instead of running for days.
        var work = 1
        for d in sizes.values {
            let (product, overflow) = work.multipliedReportingOverflow(by: d)
            guard !overflow, product <= Self.einsumWorkLimit else {
                throw ctx.error(.tooLarge, "equation '\(equation)' needs more than \(Self.einsumWorkLimit) multiply-adds")
            }
            work = product
        }
        return EinsumPlan(inputs: inputs, output: output, sizes: sizes)
    }

    /// Most multiply-adds one Einsum may take (2³⁶: attention of BERT-large at sequence 512 and batch 32 is 2³³).
    static let einsumWorkLimit = 1 << 36

    static func registerEinsum(_ r: inout [String: OperatorDefinition]) {
        r["Einsum"] = .simple(minimumOpset: 12, infer: { ctx in
            let operands = try (0..<ctx.inputs.count).map { try ctx.floatInput($0) }
            let plan = try einsumPlan(ctx, shapes: operands.map(\.shape))
            return [ValueMeta(dtype: operands[0].dtype, shape: try ctx.checkedShape(plan.output.map { plan.sizes[$0]! }, "output"))]
        }) { ctx, inputs in
            let operands = inputs.map { $0! }
            let plan = try einsumPlan(ctx, shapes: operands.map(\.shape))
            if operands.count == 2, let y = try Kernels.einsumByGemm(plan, operands[0], operands[1]) { return [y] }
            return [Kernels.einsumReference(plan, operands)]
        }
    }
}

extension Kernels {
    /// Two operands as one batched GEMM, when no index needs broadcasting: nil otherwise.
    static func einsumByGemm(_ plan: Operators.EinsumPlan, _ a: Tensor, _ b: Tensor) throws -> Tensor? {
        let (la, lb, out) = (plan.inputs[0], plan.inputs[1], plan.output)
        guard Set(la).count == la.count, Set(lb).count == lb.count,
              zip(la, a.shape).allSatisfy({ plan.sizes[$0] == $1 }), zip(lb, b.shape).allSatisfy({ plan.sizes[$0] == $1 }) else { return nil }
        let batch = la.filter { lb.contains($0) && out.contains($0) }
        let contracted = la.filter { lb.contains($0) && !out.contains($0) }
        let left = la.filter { !lb.contains($0) }, right = lb.filter { !la.contains($0) }
        // Letters of one operand that appear nowhere else are summed away first; leave those to the reference.
        guard left.allSatisfy(out.contains), right.allSatisfy(out.contains) else { return nil }
        func size(_ letters: [Character]) -> Int { letters.reduce(1) { $0 * plan.sizes[$1]! } }
        func permuted(_ t: Tensor, _ letters: [Character], _ order: [Character]) -> [Float] {
            let perm = order.map { letters.firstIndex(of: $0)! }
            return perm == Array(0..<perm.count) ? t.floats : Kernels.transpose(t.floats, shape: t.shape, perm: perm)
        }
        let (nb, m, k, n) = (size(batch), size(left), size(contracted), size(right))
        let pa = permuted(a, la, batch + left + contracted), pb = permuted(b, lb, batch + contracted + right)
        var c = [Float](repeating: 0, count: nb * m * n)
        try pa.withUnsafeBufferPointer { x in
            try pb.withUnsafeBufferPointer { y in
                try c.withUnsafeMutableBufferPointer { z in
                    for i in 0..<nb where m * n > 0 {
                        try gemm(transA: false, transB: false, m: m, n: n, k: k, a: x.baseAddress! + i * m * k,
                                 b: y.baseAddress! + i * k * n, c: z.baseAddress! + i * m * n)
                    }
                }
            }
        }
        let produced = batch + left + right
        let shape = produced.map { plan.sizes[$0]! }
        let perm = out.map { produced.firstIndex(of: $0)! }
        let values = perm == Array(0..<perm.count) ? c : Kernels.transpose(c, shape: shape, perm: perm)
        return Tensor(shape: out.map { plan.sizes[$0]! }, floats: values)
    }

    /// Every index combination, summed in Double: the reference twin (and the path for one or three operands).
    static func einsumReference(_ plan: Operators.EinsumPlan, _ operands: [Tensor]) -> Tensor {
        let outShape = plan.output.map { plan.sizes[$0]! }
        var out = [Double](repeating: 0, count: outShape.reduce(1, *))
        forEachEinsumTerm(plan, operands.map(\.shape), output: outShape) { offsets, o in
            var product = 1.0
            for (k, t) in operands.enumerated() { product *= Double(t.floats[offsets[k]]) }
            out[o] += product
        }
        return Tensor(shape: outShape, floats: out.map(Float.init))
    }

    /// Visits every combination of an einsum's indices: `body(offset in each operand, offset in the output)`.
    /// Size-1 axes an index broadcasts over read offset 0; a letter repeated in one operand reads its diagonal.
    static func forEachEinsumTerm(_ plan: Operators.EinsumPlan, _ shapes: [[Int]], output outShape: [Int],
                                  _ body: ([Int], Int) -> Void) {
        let letters = Array(Set(plan.inputs.flatMap { $0 } + plan.output)).sorted()
        let dims = letters.map { plan.sizes[$0]! }
        func strides(_ own: [Character], _ shape: [Int]) -> [Int] {
            let s = stridesOf(shape)
            return letters.map { c in own.indices.filter { own[$0] == c }.reduce(0) { $0 + (shape[$1] == 1 ? 0 : s[$1]) } }
        }
        let operandStrides = zip(plan.inputs, shapes).map { strides($0, $1) }
        let outStrides = strides(plan.output, outShape)
        var index = [Int](repeating: 0, count: letters.count)
        var offsets = [Int](repeating: 0, count: shapes.count)
        for _ in 0..<max(dims.reduce(1, *), 0) {
            for k in offsets.indices {
                var offset = 0
                for (i, s) in operandStrides[k].enumerated() { offset += index[i] * s }
                offsets[k] = offset
            }
            var o = 0
            for (i, s) in outStrides.enumerated() { o += index[i] * s }
            body(offsets, o)
            advance(&index, in: dims)
        }
    }

    /// ∂L/∂operand k of an einsum, given ∂L/∂Y. With two operands whose indices all appear in the other operand or
    /// the output (attention's forms, projections) it is one batched GEMM, `einsum(dY, other → k)`; otherwise the
    /// reference loop adds dY times the other operands into every element of operand k (repeated and broadcast
    /// indices included).
    static func einsumGradient(_ plan: Operators.EinsumPlan, _ operands: [Tensor], _ dy: Tensor, _ k: Int) throws -> Tensor {
        let target = plan.inputs[k], shape = operands[k].shape
        if operands.count == 2, Set(target).count == target.count, shape == target.map({ plan.sizes[$0]! }) {
            let other = 1 - k
            if target.allSatisfy({ plan.output.contains($0) || plan.inputs[other].contains($0) }) {
                let gradient = Operators.EinsumPlan(inputs: [plan.output, plan.inputs[other]], output: target, sizes: plan.sizes)
                if let d = try einsumByGemm(gradient, dy, operands[other]) { return d }
            }
        }
        var d = [Double](repeating: 0, count: operands[k].count)
        forEachEinsumTerm(plan, operands.map(\.shape), output: dy.shape) { offsets, o in
            var product = Double(dy.floats[o])
            for (j, t) in operands.enumerated() where j != k { product *= Double(t.floats[offsets[j]]) }
            d[offsets[k]] += product
        }
        return Tensor(shape: shape, floats: d.map(Float.init))
    }
}
