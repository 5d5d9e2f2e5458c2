import Foundation
import WhittleONNX
import WhittleTensor

/// What a model's first output means, which decides the training loss, the distillation loss and the metric.
public enum TaskKind: String, Sendable, Codable, CaseIterable {
    /// Logits `[N, classes]`: cross-entropy; distillation by softened KL; top-1.
    case classification
    /// Per-pixel logits `[N, classes, H, W]`: per-pixel cross-entropy against labels `[N, H, W]`; distillation by
    /// per-pixel softened KL; pixel accuracy, mean IoU and pixel agreement with the base model.
    case segmentation
    /// Raw detection heads (any shape, e.g. YOLO's `[N, anchors, 5 + classes]`): distillation by mean squared error
    /// against the teacher's heads, relative per field; relative error against the base model.
    case detection
    /// Any real-valued output: mean squared error; relative error.
    case regression
    /// Embeddings `[N, D]`: distillation by cosine distance; mean cosine similarity with the base model.
    case embedding

    /// The kind an output shape suggests when the plan does not say: `[N, K]` classification, `[N, C, H, W]` (C ≥ 2)
    /// segmentation, rank 3 detection heads, anything else regression.
    /// The kind a model's first output suggests (its shape at batch size 1); classification when it cannot be
    /// inferred.
    public static func inferred(model: Model) -> TaskKind {
        guard let opset = model.defaultOpset, let output = model.graph.outputs.first?.name,
              let shapes = try? ShapeInference.inputShapes(model, batchSize: 1),
              let shape = (try? ShapeInference.infer(model.graph, opset: opset, inputs: shapes))?.values[output]?.shape
        else { return .classification }
        return inferred(outputShape: shape)
    }

    /// The distillation temperature: softened classes (T = 4, Hinton's) for classifiers; per-pixel distributions as
    /// they are (T = 1) for segmenters, whose pixels are often confident in one class and carry their information
    /// in the argmax. (Mean squared error and cosine distance take none.)
    public var distillationTemperature: Float { self == .segmentation ? 1 : 4 }

    public static func inferred(outputShape shape: [Int]) -> TaskKind {
        switch shape.count {
        case 2: .classification
        case 4 where shape[1] >= 2: .segmentation
        case 3: .detection
        default: .regression
        }
    }
}

extension Losses {
    /// Per-pixel distillation for `[N, C, H, W]` logits: softened KL over the channel axis at every pixel, averaged
    /// over pixels, plus (1 − α) per-pixel cross-entropy when labels `[N·H·W]` are given. `correct` counts pixels
    /// whose top class matches the labels (or the teacher's).
    public static func pixelDistillation(student: Tensor, teacher: Tensor?, labels: ArraySlice<Int64>?, temperature: Float,
                                         alpha: Float) throws -> LossResult {
        guard student.rank == 4 else {
            throw ONNXError(.shapeMismatch, "segmentation needs per-pixel logits [N, classes, H, W], the model gives \(student.shape)")
        }
        if let teacher, teacher.shape != student.shape {
            throw ONNXError(.shapeMismatch, "teacher output \(teacher.shape) and student output \(student.shape) differ")
        }
        let (n, c, hw) = (student.shape[0], student.shape[1], student.shape[2] * student.shape[3])
        if let labels, labels.count != n * hw {
            throw ONNXError(.invalidInput, "\(labels.count) pixel labels for \(n) images of \(hw) pixels")
        }
        guard teacher != nil || labels != nil else { throw ONNXError(.invalidInput, "segmentation training needs labels or a teacher") }
        let pixels = Double(n * hw), t = Double(temperature)
        let a = teacher == nil ? 0 : (labels == nil ? 1 : Double(alpha))
        var loss = 0.0, correct = 0
        var d = [Float](repeating: 0, count: student.count)
        var zs = [Float](repeating: 0, count: c), zt = zs
        for b in 0..<n {
            for p in 0..<hw {
                for k in 0..<c { zs[k] = student.floats[(b * c + k) * hw + p] }
                let ps = softmax(zs[...])
                var top = 0
                for k in 1..<c where zs[k] > zs[top] { top = k }
                var target: Int?
                if let labels {
                    let y = Int(labels[labels.startIndex + b * hw + p])
                    guard y >= 0, y < c else { throw ONNXError(.invalidInput, "pixel label \(y) is out of range for \(c) classes") }
                    target = y
                    if a < 1 {
                        loss -= (1 - a) * log(max(ps[y], .leastNormalMagnitude)) / pixels
                        for k in 0..<c { d[(b * c + k) * hw + p] += Float((1 - a) * (ps[k] - (k == y ? 1 : 0)) / pixels) }
                    }
                }
                if let teacher, a > 0 {
                    for k in 0..<c { zt[k] = teacher.floats[(b * c + k) * hw + p] }
                    let pst = softmax(zs[...], temperature: t), ptt = softmax(zt[...], temperature: t)
                    var kl = 0.0
                    for k in 0..<c where ptt[k] > 0 { kl += ptt[k] * (log(ptt[k]) - log(max(pst[k], .leastNormalMagnitude))) }
                    loss += a * t * t * kl / pixels
                    for k in 0..<c { d[(b * c + k) * hw + p] += Float(a * t * (pst[k] - ptt[k]) / pixels) }
                    if target == nil {
                        var best = 0
                        for k in 1..<c where zt[k] > zt[best] { best = k }
                        target = best
                    }
                }
                if top == target { correct += 1 }
            }
        }
        return LossResult(loss: loss, dLogits: Tensor(shape: student.shape, floats: d), correct: correct, counted: n * hw)
    }

    /// Mean squared error relative to the target's power per field of the last axis (raw detection heads,
    /// regression): `L = (1/K) Σ_k mean_k((s − t)²) / mean_k(t²)` over the K fields of the last axis. Detection heads
    /// mix boxes in pixels (hundreds), objectness and class scores (below one): each field weighs the same, and
    /// heads at every scale train at the same learning rates. `correct` counts samples whose output is within 10 %
    /// (relative to the target's largest magnitude) of the target.
    public static func meanSquared(student: Tensor, target: Tensor) throws -> LossResult {
        guard student.shape == target.shape else {
            throw ONNXError(.shapeMismatch, "the target \(target.shape) and the model output \(student.shape) differ")
        }
        let fields = max(student.shape.last ?? 1, 1), rows = student.count / fields
        var power = [Double](repeating: 0, count: fields)
        for i in 0..<target.count { power[i % fields] += Double(target.floats[i]) * Double(target.floats[i]) }
        power = power.map { max($0 / Double(max(rows, 1)), 1e-12) }
        var loss = 0.0
        var d = [Float](repeating: 0, count: student.count)
        for i in 0..<student.count {
            let k = i % fields, scale = Double(fields) * Double(max(rows, 1)) * power[k]
            let diff = Double(student.floats[i]) - Double(target.floats[i])
            loss += diff * diff / scale
            d[i] = Float(2 * diff / scale)
        }
        let n = student.shape.first ?? 1, per = student.count / max(n, 1)
        var correct = 0
        for b in 0..<n {
            let s = student.floats[(b * per)..<((b + 1) * per)], t = target.floats[(b * per)..<((b + 1) * per)]
            let scale = max(t.map(abs).max() ?? 0, 1e-6)
            if zip(s, t).allSatisfy({ abs($0 - $1) <= 0.1 * scale }) { correct += 1 }
        }
        return LossResult(loss: loss, dLogits: Tensor(shape: student.shape, floats: d), correct: correct)
    }

    /// `L = mean over samples of (1 − cos(s, t))` for embeddings `[N, D]`. `correct` counts samples with cosine
    /// similarity above 0.9.
    public static func cosineDistance(student: Tensor, teacher: Tensor) throws -> LossResult {
        guard student.shape == teacher.shape, student.rank >= 2 else {
            throw ONNXError(.shapeMismatch, "teacher embeddings \(teacher.shape) and student embeddings \(student.shape) differ")
        }
        let n = student.shape[0], dim = student.count / max(n, 1)
        var loss = 0.0, correct = 0
        var d = [Float](repeating: 0, count: student.count)
        for b in 0..<n {
            let s = student.floats[(b * dim)..<((b + 1) * dim)].map(Double.init)
            let t = teacher.floats[(b * dim)..<((b + 1) * dim)].map(Double.init)
            let ns = max(sqrt(s.reduce(0) { $0 + $1 * $1 }), 1e-12), nt = max(sqrt(t.reduce(0) { $0 + $1 * $1 }), 1e-12)
            let dot = zip(s, t).reduce(0) { $0 + $1.0 * $1.1 }
            let cosine = dot / (ns * nt)
            loss += (1 - cosine) / Double(n)
            if cosine > 0.9 { correct += 1 }
            // ∂cos/∂s = t/(|s||t|) − cos·s/|s|².
            for k in 0..<dim { d[b * dim + k] = Float(-(t[k] / (ns * nt) - cosine * s[k] / (ns * ns)) / Double(n)) }
        }
        return LossResult(loss: loss, dLogits: Tensor(shape: student.shape, floats: d), correct: correct)
    }
}
