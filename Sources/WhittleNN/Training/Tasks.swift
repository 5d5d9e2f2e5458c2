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
    /// Raw detection heads (any shape, e.g. YOLOv5's `[N, anchors, 5 + classes]`, YOLOv8's `[N, 4 + classes,
    /// anchors]`): distillation by mean squared error against the teacher's heads, relative per field
    /// (`fieldAxis`); relative error against the base model.
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
              let shapes = try? ShapeInference.analysisShapes(model),
              let shape = (try? ShapeInference.infer(model.graph, opset: opset, inputs: shapes))?.values[output]?.shape
        else { return .classification }
        return inferred(outputShape: shape, outputName: output)
    }

    /// As `inferred(outputShape:)`, except that a `[N, D]` output named as an embedding (`sentence_embedding`,
    /// `embeddings`, `pooler_output`…) is one: its values are features, not class scores.
    public static func inferred(outputShape shape: [Int], outputName: String) -> TaskKind {
        let name = outputName.lowercased()
        if shape.count == 2, ["embed", "pooler", "pooled", "features"].contains(where: name.contains) { return .embedding }
        return inferred(outputShape: shape)
    }

    /// The distillation temperature: softened classes (T = 4, Hinton's) for classifiers; per-pixel distributions as
    /// they are (T = 1) for segmenters, whose pixels are often confident in one class and carry their information
    /// in the argmax. (Mean squared error and cosine distance take none.)
    public var distillationTemperature: Float { self == .segmentation ? 1 : 4 }

    /// The axis of an output's fields (box coordinates, objectness, class scores) that relative mean squared error
    /// weighs equally: for rank-3 detection heads the shorter of the last two axes (YOLOv5 writes
    /// `[N, anchors, 5 + classes]`, YOLOv8 `[N, 4 + classes, anchors]`), else the last axis.
    public func fieldAxis(outputShape shape: [Int]) -> Int {
        if self == .detection, shape.count == 3, shape[1] < shape[2] { return 1 }
        return max(shape.count - 1, 0)
    }

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
        guard student.rank == 4, student.shape[1] >= 1 else {
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

    /// Mean squared error relative to the target's power per field (raw detection heads, regression):
    /// `L = (1/K) Σ_k mean_k((s − t)²) / mean_k(t²)` over the K fields of `fieldAxis` (default: the last axis).
    /// Detection heads mix boxes in pixels (hundreds), objectness and class scores (below one): each field weighs the
    /// same, and heads at every scale train at the same learning rates. `correct` counts samples whose output is
    /// within 10 % (relative to the target's largest magnitude) of the target.
    public static func meanSquared(student: Tensor, target: Tensor, fieldAxis: Int? = nil) throws -> LossResult {
        guard student.shape == target.shape else {
            throw ONNXError(.shapeMismatch, "the target \(target.shape) and the model output \(student.shape) differ")
        }
        let axis = fieldAxis ?? max(student.rank - 1, 0)
        guard student.rank == 0 || (0..<student.rank).contains(axis) else {
            throw ONNXError(.invalidInput, "field axis \(axis) of an output of rank \(student.rank)")
        }
        let fields = max(student.rank == 0 ? 1 : student.shape[axis], 1), rows = student.count / fields
        let inner = student.rank == 0 ? 1 : student.shape[(axis + 1)...].reduce(1, *)
        func field(_ i: Int) -> Int { (i / inner) % fields }
        var power = [Double](repeating: 0, count: fields)
        for i in 0..<target.count { power[field(i)] += Double(target.floats[i]) * Double(target.floats[i]) }
        power = power.map { max($0 / Double(max(rows, 1)), 1e-12) }
        var loss = 0.0
        var d = [Float](repeating: 0, count: student.count)
        for i in 0..<student.count {
            let k = field(i), scale = Double(fields) * Double(max(rows, 1)) * power[k]
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

/// How a compressed model compares with its base model on some samples, for the model's task, as sums that merge
/// across batches and across workers by addition (a worker reports these; the coordinator adds them up).
///
/// Units are samples, or pixels for segmentation. Agreement counts units where the compressed model gives the base
/// model's answer: the same top class (classification), the same class at the pixel (segmentation), an output within
/// `toleranceRelative` of the base output's largest magnitude at every element (detection, regression), a cosine
/// similarity of at least `toleranceCosine` (embedding). With labels, `baseCorrect` and `compressedCorrect` count
/// correct units and, for segmentation, per-class intersections and unions give the mean IoU.
public struct TaskEvaluation: Codable, Sendable, Equatable {
    public var task: TaskKind
    public var samples = 0
    public var units = 0
    public var agreement = 0
    public var labelled = false
    public var baseCorrect = 0
    public var compressedCorrect = 0
    /// Per class: pixels labelled and predicted as the class (intersection), labelled or predicted (union).
    public var baseIntersection: [Int] = []
    public var baseUnion: [Int] = []
    public var compressedIntersection: [Int] = []
    public var compressedUnion: [Int] = []
    /// Σ (compressed − base)² and Σ base² over every output element.
    public var squaredError = 0.0
    public var squaredReference = 0.0
    /// Σ over samples of cos(compressed, base).
    public var cosineSum = 0.0

    /// A detection or regression output agrees when every element is within this fraction of the base output's
    /// largest magnitude (the same test as the training loss's `correct`).
    public static let toleranceRelative: Float = 0.1
    /// An embedding agrees when its cosine similarity with the base embedding is at least this.
    public static let toleranceCosine = 0.9

    public init(task: TaskKind) { self.task = task }

    /// Adds a batch: the base and compressed models' first outputs, and labels `[N]` (classification) or `[N·H·W]`
    /// (segmentation) when the data has them.
    public mutating func add(base: Tensor, compressed: Tensor, labels: ArraySlice<Int64>?) throws {
        guard base.shape == compressed.shape, let n = base.shape.first, n >= 1 else {
            throw ONNXError(.shapeMismatch, "the base model's output \(base.shape) and the compressed model's \(compressed.shape) differ")
        }
        let per = base.count / n
        guard per >= 1 else { throw ONNXError(.shapeMismatch, "the models' output \(base.shape) holds no values per sample") }
        for i in 0..<base.count {
            let d = Double(compressed.floats[i]) - Double(base.floats[i])
            squaredError += d * d
            squaredReference += Double(base.floats[i]) * Double(base.floats[i])
        }
        samples += n
        if labels != nil { labelled = true }
        switch task {
        case .classification:
            if let labels, labels.count != n { throw ONNXError(.invalidInput, "\(labels.count) labels for \(n) samples") }
            for b in 0..<n {
                let zb = Self.argmax(base.floats[(b * per)..<((b + 1) * per)])
                let zc = Self.argmax(compressed.floats[(b * per)..<((b + 1) * per)])
                units += 1
                if zb == zc { agreement += 1 }
                if let labels {
                    let y = Int(labels[labels.startIndex + b])
                    if zb == y { baseCorrect += 1 }
                    if zc == y { compressedCorrect += 1 }
                }
            }
        case .segmentation:
            guard base.rank == 4, base.shape[1] >= 1 else {
                throw ONNXError(.shapeMismatch, "segmentation needs per-pixel logits [N, classes, H, W], the model gives \(base.shape)")
            }
            let (c, hw) = (base.shape[1], base.shape[2] * base.shape[3])
            if let labels {
                guard labels.count == n * hw else { throw ONNXError(.invalidInput, "\(labels.count) pixel labels for \(n) images of \(hw) pixels") }
                if baseIntersection.isEmpty {
                    baseIntersection = [Int](repeating: 0, count: c)
                    baseUnion = baseIntersection
                    compressedIntersection = baseIntersection
                    compressedUnion = baseIntersection
                }
                guard baseIntersection.count == c else {
                    throw ONNXError(.shapeMismatch, "the output has \(c) classes, earlier batches \(baseIntersection.count)")
                }
            }
            for b in 0..<n {
                for p in 0..<hw {
                    var zb = 0, zc = 0
                    for k in 1..<c {
                        if base.floats[(b * c + k) * hw + p] > base.floats[(b * c + zb) * hw + p] { zb = k }
                        if compressed.floats[(b * c + k) * hw + p] > compressed.floats[(b * c + zc) * hw + p] { zc = k }
                    }
                    units += 1
                    if zb == zc { agreement += 1 }
                    guard let labels else { continue }
                    let y = Int(labels[labels.startIndex + b * hw + p])
                    guard y >= 0, y < c else { throw ONNXError(.invalidInput, "pixel label \(y) is out of range for \(c) classes") }
                    if zb == y { baseCorrect += 1; baseIntersection[y] += 1; baseUnion[y] += 1 } else {
                        baseUnion[y] += 1; baseUnion[zb] += 1
                    }
                    if zc == y { compressedCorrect += 1; compressedIntersection[y] += 1; compressedUnion[y] += 1 } else {
                        compressedUnion[y] += 1; compressedUnion[zc] += 1
                    }
                }
            }
        case .detection, .regression:
            for b in 0..<n {
                let zb = base.floats[(b * per)..<((b + 1) * per)], zc = compressed.floats[(b * per)..<((b + 1) * per)]
                let scale = max(zb.map(abs).max() ?? 0, 1e-6)
                units += 1
                if zip(zb, zc).allSatisfy({ abs($0 - $1) <= Self.toleranceRelative * scale }) { agreement += 1 }
            }
        case .embedding:
            for b in 0..<n {
                var dot = 0.0, nb = 0.0, nc = 0.0
                for i in (b * per)..<((b + 1) * per) {
                    let x = Double(base.floats[i]), y = Double(compressed.floats[i])
                    dot += x * y; nb += x * x; nc += y * y
                }
                let cosine = dot / max((nb * nc).squareRoot(), 1e-24)
                cosineSum += cosine
                units += 1
                if cosine >= Self.toleranceCosine { agreement += 1 }
            }
        }
    }

    /// Adds another part's sums (another batch, another worker).
    public mutating func merge(_ other: TaskEvaluation) throws {
        guard other.task == task else { throw ONNXError(.invalidInput, "cannot merge a \(other.task.rawValue) evaluation into a \(task.rawValue) one") }
        func add(_ a: [Int], _ b: [Int]) throws -> [Int] {
            if a.isEmpty { return b }
            if b.isEmpty { return a }
            guard a.count == b.count else { throw ONNXError(.shapeMismatch, "per-class counts for \(a.count) and \(b.count) classes") }
            return zip(a, b).map(+)
        }
        samples += other.samples
        units += other.units
        agreement += other.agreement
        labelled = labelled || other.labelled
        baseCorrect += other.baseCorrect
        compressedCorrect += other.compressedCorrect
        baseIntersection = try add(baseIntersection, other.baseIntersection)
        baseUnion = try add(baseUnion, other.baseUnion)
        compressedIntersection = try add(compressedIntersection, other.compressedIntersection)
        compressedUnion = try add(compressedUnion, other.compressedUnion)
        squaredError += other.squaredError
        squaredReference += other.squaredReference
        cosineSum += other.cosineSum
    }

    /// The fraction of units where the compressed model agrees with the base model.
    public var agreementRate: Double? { units > 0 ? Double(agreement) / Double(units) : nil }
    /// With labels: top-1 accuracy (classification) or pixel accuracy (segmentation).
    public var baseAccuracy: Double? { labelled && units > 0 && hasClasses ? Double(baseCorrect) / Double(units) : nil }
    public var compressedAccuracy: Double? { labelled && units > 0 && hasClasses ? Double(compressedCorrect) / Double(units) : nil }
    /// With per-pixel labels: the mean over classes present (labelled or predicted) of intersection / union.
    public var baseMeanIoU: Double? { Self.meanIoU(baseIntersection, baseUnion) }
    public var compressedMeanIoU: Double? { Self.meanIoU(compressedIntersection, compressedUnion) }
    /// ‖compressed − base‖ / ‖base‖ over every output element.
    public var relativeError: Double? { squaredReference > 0 ? (squaredError / squaredReference).squareRoot() : nil }
    /// Mean cosine similarity with the base model's embeddings.
    public var meanCosine: Double? { task == .embedding && samples > 0 ? cosineSum / Double(samples) : nil }

    var hasClasses: Bool { task == .classification || task == .segmentation }

    static func meanIoU(_ intersection: [Int], _ union: [Int]) -> Double? {
        let present = zip(intersection, union).filter { $0.1 > 0 }
        guard !present.isEmpty else { return nil }
        return present.reduce(0.0) { $0 + Double($1.0) / Double($1.1) } / Double(present.count)
    }

    static func argmax(_ z: ArraySlice<Float>) -> Int {
        var best = z.startIndex
        for i in z.indices where z[i] > z[best] { best = i }
        return best - z.startIndex
    }
}

extension TaskKind {
    /// The kind a model's first output suggests for the shapes of `samples` (which may set free dimensions such as
    /// a sequence length); classification when it cannot be inferred.
    public static func inferred(model: Model, samples: Samples) -> TaskKind {
        guard samples.count > 0, let opset = model.defaultOpset, let output = model.graph.outputs.first?.name,
              let shapes = try? samples.sampleShapes(for: model.graph) else { return inferred(model: model) }
        guard let shape = (try? ShapeInference.infer(model.graph, opset: opset, inputs: shapes))?.values[output]?.shape else {
            return .classification
        }
        return inferred(outputShape: shape, outputName: output)
    }
}
