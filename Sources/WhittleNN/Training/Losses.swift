import WhittleONNX
import WhittleTensor

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A loss value for a batch, its gradient with respect to the logits, and the batch's correct predictions.
public struct LossResult: Sendable {
    public var loss: Double
    public var dLogits: Tensor
    public var correct: Int
    /// What `correct` counts out of, when not the samples (pixels, for segmentation).
    public var counted: Int?
}

/// Losses over logits `[N, C]`, mean-reduced over the batch (PyTorch's default), computed in Double.
public enum Losses {
    /// Row-wise softmax of `z / temperature`, in Double.
    static func softmax(_ z: ArraySlice<Float>, temperature: Double = 1) -> [Double] {
        let peak = Double(z.max() ?? 0) / temperature
        let e = z.map { exp(Double($0) / temperature - peak) }
        let total = e.reduce(0, +)
        return e.map { $0 / total }
    }

    static func check(_ logits: Tensor, _ count: Int?) throws -> (Int, Int) {
        guard logits.rank == 2 else {
            throw ONNXError(.shapeMismatch, "the model output has shape \(logits.shape); training needs logits [N, classes]")
        }
        if let count, count != logits.shape[0] {
            throw ONNXError(.invalidInput, "\(count) labels for a batch of \(logits.shape[0]) samples")
        }
        return (logits.shape[0], logits.shape[1])
    }

    /// `L = −(1/N) Σ log softmax(z)[y]`; `∂L/∂z = (softmax(z) − onehot(y)) / N`.
    public static func softmaxCrossEntropy(logits: Tensor, labels: ArraySlice<Int64>) throws -> LossResult {
        let (n, c) = try check(logits, labels.count)
        var loss = 0.0, correct = 0
        var d = [Float](repeating: 0, count: n * c)
        for (row, label) in zip(0..<n, labels) {
            guard label >= 0, label < c else {
                throw ONNXError(.invalidInput, "label \(label) is out of range for \(c) classes")
            }
            let z = logits.floats[(row * c)..<((row + 1) * c)]
            let p = softmax(z)
            loss -= log(max(p[Int(label)], .leastNormalMagnitude))
            if p.indices.max(by: { p[$0] < p[$1] }) == Int(label) { correct += 1 }
            for k in 0..<c { d[row * c + k] = Float((p[k] - (k == Int(label) ? 1 : 0)) / Double(n)) }
        }
        return LossResult(loss: loss / Double(n), dLogits: Tensor(shape: logits.shape, floats: d), correct: correct)
    }

    /// Knowledge distillation (Hinton et al.): `L = (1 − α)·CE(y, softmax(z_s)) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`.
    /// With no labels α must be 1. `∂/∂z_s` of the KL term is `α·T·(softmax(z_s/T) − softmax(z_t/T)) / N`.
    /// `correct` counts agreement with the labels when given, else with the teacher's top-1.
    public static func distillation(student: Tensor, teacher: Tensor, labels: ArraySlice<Int64>?, temperature: Float,
                                    alpha: Float) throws -> LossResult {
        let (n, c) = try check(student, labels?.count)
        guard teacher.shape == student.shape else {
            throw ONNXError(.shapeMismatch, "teacher logits \(teacher.shape) and student logits \(student.shape) differ")
        }
        guard temperature > 0, alpha >= 0, alpha <= 1 else {
            throw ONNXError(.invalidInput, "distillation needs temperature > 0 and alpha in [0, 1]")
        }
        guard labels != nil || alpha == 1 else {
            throw ONNXError(.invalidInput, "distillation without labels needs --distill-alpha 1")
        }
        var result = LossResult(loss: 0, dLogits: Tensor.zeros(student.shape), correct: 0)
        if let labels, alpha < 1 {
            let ce = try softmaxCrossEntropy(logits: student, labels: labels)
            result.loss = Double(1 - alpha) * ce.loss
            result.dLogits = Tensor(shape: student.shape, floats: ce.dLogits.floats.map { $0 * (1 - alpha) })
        }
        let t = Double(temperature), a = Double(alpha)
        var d = result.dLogits.floats
        for row in 0..<n {
            let zs = student.floats[(row * c)..<((row + 1) * c)], zt = teacher.floats[(row * c)..<((row + 1) * c)]
            let ps = softmax(zs, temperature: t), pt = softmax(zt, temperature: t)
            var kl = 0.0
            for k in 0..<c where pt[k] > 0 { kl += pt[k] * (log(pt[k]) - log(max(ps[k], .leastNormalMagnitude))) }
            result.loss += a * t * t * kl / Double(n)
            for k in 0..<c { d[row * c + k] += Float(a * t * (ps[k] - pt[k]) / Double(n)) }
            let top = Array(zs).indices.max { zs[zs.startIndex + $0] < zs[zs.startIndex + $1] }!
            if let labels {
                if top == Int(labels[labels.startIndex + row]) { result.correct += 1 }
            } else if top == Array(zt).indices.max(by: { zt[zt.startIndex + $0] < zt[zt.startIndex + $1] })! {
                result.correct += 1
            }
        }
        result.dLogits = Tensor(shape: student.shape, floats: d)
        return result
    }

    /// FitNets hint: `L = w · mean((P ⋆ s − t)²)` with `P` a 1×1 convolution `[C_t, C_s]` applied to the student map
    /// `s [N, C_s, H, W]`, against the teacher map `t [N, C_t, H, W]`. Returns L, ∂L/∂P and ∂L/∂s.
    public static func hint(student s: Tensor, teacher t: Tensor, projection p: Tensor, weight: Float) -> (Double, Tensor, Tensor) {
        let n = s.shape[0], cs = s.shape[1], ct = t.shape[1], hw = s.shape[2...].reduce(1, *)
        var loss = 0.0
        var dP = [Float](repeating: 0, count: ct * cs), dS = [Float](repeating: 0, count: s.count)
        let scale = 2 * weight / Float(t.count)
        for b in 0..<n {
            for o in 0..<ct {
                for i in 0..<hw {
                    var projected: Float = 0
                    for c in 0..<cs { projected += p.floats[o * cs + c] * s.floats[(b * cs + c) * hw + i] }
                    let d = projected - t.floats[(b * ct + o) * hw + i]
                    loss += Double(weight) * Double(d * d) / Double(t.count)
                    let g = scale * d
                    for c in 0..<cs {
                        dP[o * cs + c] += g * s.floats[(b * cs + c) * hw + i]
                        dS[(b * cs + c) * hw + i] += g * p.floats[o * cs + c]
                    }
                }
            }
        }
        return (loss, Tensor(shape: p.shape, floats: dP), Tensor(shape: s.shape, floats: dS))
    }

    /// EWC penalty `Σ_i (λ/2)·F_i·(θ_i − θ*_i)²` and its gradient `λ·F_i·(θ_i − θ*_i)`, per parameter.
    public static func elasticWeightConsolidation(parameters: [String: Tensor], reference: [String: Tensor],
                                                  fisher: [String: Tensor], lambda: Float) -> (Double, [String: Tensor]) {
        var penalty = 0.0
        var grads: [String: Tensor] = [:]
        for (name, theta) in parameters {
            guard let star = reference[name], let f = fisher[name], star.count == theta.count, f.count == theta.count else { continue }
            var g = [Float](repeating: 0, count: theta.count)
            for i in 0..<theta.count {
                let diff = theta.floats[i] - star.floats[i]
                penalty += Double(lambda) / 2 * Double(f.floats[i]) * Double(diff * diff)
                g[i] = lambda * f.floats[i] * diff
            }
            grads[name] = Tensor(shape: theta.shape, floats: g)
        }
        return (penalty, grads)
    }
}
