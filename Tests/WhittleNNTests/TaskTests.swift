import Foundation
import Testing
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// Named samples for models with several inputs, the task metrics (hand-computed cases), and training from token
/// ids and attention masks.
@Suite struct TaskTests {
    /// Metrics computed from integer counts agree with the hand-computed fractions to this.
    static let metricTolerance = 1e-12
    /// Finite-difference step and tolerance for the whole encoder's gradients (relative to max(1, |numeric|)).
    static let step: Float = 1e-2
    static let gradientTolerance = 2e-2

    static func ids(_ rows: [[Int64]]) -> Tensor { Tensor(shape: [rows.count, rows[0].count], ints: rows.flatMap { $0 }) }

    // MARK: Samples

    @Test func samplesFeedInputsByNameAndSayWhatIsMissing() throws {
        let bert = try TestSupport.zooModel("bert_cls_op17")
        let tokens = Self.ids([[1, 5, 6, 0], [1, 7, 0, 0]]), mask = Self.ids([[1, 1, 1, 0], [1, 1, 0, 0]])
        let samples = try Samples([("attention_mask", mask), ("input_ids", tokens)])
        let fed = try samples.feed(bert.graph)
        #expect(fed["input_ids"] == tokens && fed["attention_mask"] == mask)
        #expect(samples.count == 2)
        #expect(samples.rows([1]).tensors["input_ids"]!.ints == [1, 7, 0, 0])
        #expect(samples.rows(1..<2).tensors["attention_mask"]!.shape == [1, 4])
        #expect { try Samples([("input_ids", tokens)]).feed(bert.graph) } throws: {
            "\($0)".contains("'attention_mask' is missing")
        }
        #expect { try Samples(tokens).feed(bert.graph) } throws: { "\($0)".contains("give a .npz file") }
        #expect { try Samples([("input_ids", tokens), ("attention_mask", mask), ("extra", mask)]).feed(bert.graph) } throws: {
            "\($0)".contains("no input 'extra'")
        }
        #expect { try Samples([("input_ids", tokens), ("attention_mask", Self.ids([[1, 1, 1, 1]]))]) } throws: {
            "\($0)".contains("same number of samples")
        }
        // One unnamed array feeds a single-input model, whatever its input is called; uint8 images become float.
        let cnn = try ModelCoding.read(try TestSupport.bytes(TestSupport.root.appendingPathComponent("examples/models/defect_cnn.onnx")))
        let pixels = Tensor(shape: [1, 3, 32, 32], ints: [Int64](repeating: 7, count: 3 * 32 * 32), dtype: .uint8)
        let conformed = Samples(pixels).conformed(to: cnn.graph)
        #expect(conformed.first.dtype == .float && conformed.first.floats.allSatisfy { $0 == 7 })
        #expect(try conformed.feed(cnn.graph).count == 1)
    }

    /// The task each zoo family's output suggests: class logits, per-pixel logits, raw detection heads, and a
    /// sentence embedding by its output's name (its shape alone reads as classification).
    @Test func tasksAreInferredFromTheOutput() throws {
        let expected: [(String, TaskKind)] = [("resnet50_op17", .classification), ("lraspp_op17", .segmentation),
                                              ("yolov5_op17", .detection), ("bert_cls_op17", .classification),
                                              ("bert_embed_op17", .embedding), ("bert_embed_dynamo", .embedding)]
        for (name, task) in expected {
            #expect(TaskKind.inferred(model: try TestSupport.zooModel(name)) == task, "\(name)")
        }
    }

    // MARK: Task metrics, hand-computed

    @Test func classificationCountsTopOneAgreementAndAccuracy() throws {
        var e = TaskEvaluation(task: .classification)
        let base = Tensor(shape: [3, 2], floats: [1, 0, 0, 1, 1, 0]), compressed = Tensor(shape: [3, 2], floats: [1, 0, 1, 0, 0, 1])
        try e.add(base: base, compressed: compressed, labels: [0, 1, 1])
        #expect(e.units == 3 && e.agreement == 1 && e.baseCorrect == 2 && e.compressedCorrect == 2)
        #expect(abs(e.agreementRate! - 1.0 / 3) < Self.metricTolerance)
        #expect(abs(e.compressedAccuracy! - 2.0 / 3) < Self.metricTolerance)
        #expect(e.baseMeanIoU == nil && e.meanCosine == nil)
    }

    /// One 2×2 image, two classes. Base argmax [0 0; 1 1], compressed [0 1; 1 0], labels [0 1; 1 1]:
    /// both 3/4 pixels right; class 0 IoU 1/2 (pixel 0 of pixels 0, 1 or 0, 3), class 1 IoU 2/3; mean 7/12; the two
    /// models agree on pixels 0 and 2.
    @Test func segmentationCountsPixelsAndMeanIoU() throws {
        func logits(_ classes: [Int]) -> Tensor {
            // [1, 2, 2, 2]: channel k is 1 where the class is k.
            Tensor(shape: [1, 2, 2, 2], floats: (0..<2).flatMap { k in classes.map { $0 == k ? 1 : 0 } })
        }
        var e = TaskEvaluation(task: .segmentation)
        try e.add(base: logits([0, 0, 1, 1]), compressed: logits([0, 1, 1, 0]), labels: [0, 1, 1, 1])
        #expect(e.units == 4 && e.agreement == 2)
        #expect(e.baseIntersection == [1, 2] && e.baseUnion == [2, 3])
        #expect(e.compressedIntersection == [1, 2] && e.compressedUnion == [2, 3])
        #expect(abs(e.baseAccuracy! - 0.75) < Self.metricTolerance && abs(e.compressedAccuracy! - 0.75) < Self.metricTolerance)
        #expect(abs(e.baseMeanIoU! - 7.0 / 12) < Self.metricTolerance)
        #expect(abs(e.compressedMeanIoU! - 7.0 / 12) < Self.metricTolerance)
        #expect { try e.add(base: logits([0, 0, 0, 0]), compressed: logits([0, 0, 0, 0]), labels: [0, 2, 0, 0]) } throws: {
            "\($0)".contains("pixel label 2")
        }
    }

    @Test func regressionAndEmbeddingCompareWithTheBaseOutput() throws {
        var r = TaskEvaluation(task: .regression)
        try r.add(base: Tensor(shape: [2, 2], floats: [1, 2, 4, 0]), compressed: Tensor(shape: [2, 2], floats: [1.1, 2, 3, 0]), labels: nil)
        // Σ(diff²) = 0.01 + 1, Σ base² = 1 + 4 + 16; sample 0 within 10 % of 2, sample 1 off by 1 of 4.
        #expect(abs(r.relativeError! - ((0.01 + 1.0) / 21).squareRoot()) < 1e-7)
        #expect(r.agreement == 1 && r.units == 2 && r.baseAccuracy == nil)
        var m = TaskEvaluation(task: .embedding)
        try m.add(base: Tensor(shape: [2, 2], floats: [1, 0, 0, 2]), compressed: Tensor(shape: [2, 2], floats: [1, 1, 0, 3]), labels: nil)
        #expect(abs(m.meanCosine! - (0.5.squareRoot() + 1) / 2) < 1e-7)
        #expect(m.agreement == 1)
    }

    @Test func partsMergeToTheWhole() throws {
        let base = Tensor(shape: [4, 3, 1, 2], floats: TestSupport.randomFloats(24, seed: 3))
        let compressed = Tensor(shape: [4, 3, 1, 2], floats: TestSupport.randomFloats(24, seed: 4))
        let labels: [Int64] = [0, 1, 2, 2, 1, 0, 0, 0]
        var whole = TaskEvaluation(task: .segmentation), a = whole, b = whole
        try whole.add(base: base, compressed: compressed, labels: labels[...])
        func rows(_ t: Tensor, _ r: Range<Int>) -> Tensor { Tensor(shape: [r.count, 3, 1, 2], floats: Array(t.floats[(r.lowerBound * 6)..<(r.upperBound * 6)])) }
        try a.add(base: rows(base, 0..<1), compressed: rows(compressed, 0..<1), labels: labels[0..<2])
        try b.add(base: rows(base, 1..<4), compressed: rows(compressed, 1..<4), labels: labels[2..<8])
        try a.merge(b)
        #expect(a.units == whole.units && a.agreement == whole.agreement && a.baseUnion == whole.baseUnion
                && a.compressedIntersection == whole.compressedIntersection && a.compressedCorrect == whole.compressedCorrect)
        #expect(abs(a.squaredError - whole.squaredError) < 1e-9 && a.compressedMeanIoU == whole.compressedMeanIoU)
        #expect { try a.merge(TaskEvaluation(task: .classification)) } throws: { "\($0)".contains("cannot merge") }
    }

    // MARK: Training from several inputs

    /// The whole BERT-style encoder (token embedding by Gather on int64 ids, masks built with Equal/Where, LayerNorm,
    /// GELU, attention) differentiated with token ids and an attention mask as its two inputs: gradients of
    /// parameters across the graph match central finite differences of `Σ r·y`.
    @Test func encoderGradientsFromTokenIdsAndMasksMatchFiniteDifferences() throws {
        let model = try TestSupport.zooModel("bert_embed_op17")
        let inputs = try TestSupport.zooInputs("bert_embed_op17", model: model.graph.runtimeInputs.map(\.name))
        let shapes = inputs.mapValues { ($0.dtype, $0.shape) }
        let graph = try TrainingGraph(model: model, inputs: shapes, fast: true)
        var parameters: [String: Tensor] = [:]
        for name in graph.parameterNames { parameters[name] = model.graph.initializer(named: name)!.tensor! }
        func forward(_ p: [String: Tensor]) throws -> TrainingGraph.Tape {
            var rng = SplitMix64(seed: 1)
            return try graph.forward(inputs: inputs, parameters: p, training: false, rng: &rng)
        }
        let tape = try forward(parameters)
        let y = try #require(tape.value(graph.outputName))
        let r = TestSupport.randomFloats(y.count, seed: 8)
        let grads = try graph.backward(tape, seeds: [graph.outputName: Tensor(shape: y.shape, floats: r)])
        func loss(_ p: [String: Tensor]) throws -> Double {
            zip(try forward(p).value(graph.outputName)!.floats, r).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
        }
        // The token table (rows of the ids used), a LayerNorm scale, a query bias, an FFN bias, the last weight.
        let names = ["word_embeddings.weight"] + ["layers.0.attention.norm.weight", "layers.0.attention.query.bias",
                                                   "layers.1.intermediate.bias"].filter(graph.parameterNames.contains)
            + [graph.parameterNames.last { $0.hasPrefix("onnx::MatMul") }].compactMap { $0 }
        #expect(names.count == 5 && graph.parameterNames.contains(names[0]), "parameters \(graph.parameterNames)")
        let usedToken = Int(inputs["input_ids"]!.ints[1])
        for name in names {
            let value = parameters[name]!, analytic = try #require(grads[name], "no gradient for \(name)")
            let width = value.shape.last ?? 1
            let indices = name == names[0] ? Array((usedToken * width)..<(usedToken * width + 4))
                : Array(stride(from: 0, to: value.count, by: max(1, value.count / 6)))
            for i in indices {
                var plus = parameters, minus = parameters
                plus[name]!.floats[i] += Self.step
                minus[name]!.floats[i] -= Self.step
                let numeric = (try loss(plus) - loss(minus)) / Double(2 * Self.step)
                let error = abs(Double(analytic.floats[i]) - numeric) / max(1, abs(numeric))
                #expect(error < Self.gradientTolerance, "d\(name)[\(i)]: analytic \(analytic.floats[i]), numeric \(numeric)")
            }
        }
    }

    /// Distillation from a teacher, with token ids and masks fed by name, lowers the loss of an encoder whose
    /// weights were disturbed; the epoch runs over Samples and the teacher sees the same named batches.
    @Test func anEncoderDistilsFromNamedInputs() throws {
        let teacherModel = try TestSupport.zooModel("bert_embed_op17")
        var student = teacherModel
        for (k, initializer) in student.graph.initializers.enumerated() where initializer.elementType == .float && initializer.shape.count == 2 {
            let t = initializer.tensor!
            let noise = TestSupport.randomFloats(t.count, seed: UInt64(k))
            student.graph.initializers[k].setTensor(Tensor(shape: t.shape, floats: zip(t.floats, noise).map { $0 + 0.05 * $1 }))
        }
        var rng = SplitMix64(seed: 2)
        let n = 16, seq = 12
        let tokens = Tensor(shape: [n, seq], ints: (0..<(n * seq)).map { _ in Int64(rng.next() % 100) })
        let mask = Tensor(shape: [n, seq], ints: (0..<(n * seq)).map { Int64($0 % seq < 4 + ($0 / seq) % 8 ? 1 : 0) })
        let data = try Samples([("input_ids", tokens), ("attention_mask", mask)])
        let teacher = try InferenceSession(model: teacherModel)
        var configuration = TrainingConfiguration()
        configuration.batchSize = 8
        configuration.learningRate = 0.002
        configuration.optimizer = .adam(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0)
        configuration.task = .embedding
        configuration.distillation = (1, 1)
        let trainer = try Trainer(model: student, configuration: configuration)
        let cache = TeacherLogitsCache()
        var losses: [Double] = []
        for epoch in 0..<8 {
            losses.append(try trainer.trainEpoch(epoch, data: data, labels: nil, teacher: { batch in
                TeacherOutputs(logits: try teacher.firstOutput(batch))
            }, teacherCache: cache).loss)
        }
        #expect(losses.last! < 0.5 * losses.first!, "losses \(losses)")
        #expect(cache.computed == n)
    }
}
