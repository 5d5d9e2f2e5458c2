import Foundation
import Testing
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

@Suite struct TrainingTests {
    /// Agreement with PyTorch's float32 step: both compute in float32 with different summation orders; gradients
    /// of a 2048-element batch-norm reduction differ by a few ulps of their largest terms.
    static let pytorchTolerance: Float = 2e-4

    static let folder = TestSupport.root.appendingPathComponent("Tests/Fixtures/training")
    static func reference(_ key: String) throws -> Tensor {
        try NPY.decode(try TestSupport.bytes(folder.appendingPathComponent("reference/\(key.replacingOccurrences(of: "/", with: "__")).npy")))
    }
    static func fixture() throws -> (Model, Tensor, Tensor) {
        let model = try ModelCoding.read(try TestSupport.bytes(folder.appendingPathComponent("fixture.onnx")))
        let x = try NPY.decode(try TestSupport.bytes(folder.appendingPathComponent("x.npy")))
        let y = try NPY.decode(try TestSupport.bytes(folder.appendingPathComponent("y.npy")))
        return (model, x, y)
    }

    /// One SGD step (lr 0.1, momentum 0.9, weight decay 1e-4, batch-norm in training mode) equals PyTorch's:
    /// loss, ∂L/∂logits, every parameter gradient, every updated parameter and the running statistics.
    @Test func oneSGDStepMatchesPyTorch() throws {
        let (model, x, y) = try Self.fixture()
        var configuration = TrainingConfiguration()
        configuration.batchSize = 8
        configuration.learningRate = 0.1
        configuration.optimizer = .sgd(momentum: 0.9, nesterov: false, weightDecay: 1e-4)
        let trainer = try Trainer(model: model, configuration: configuration)
        #expect(Set(trainer.parameterNames) == ["conv1.weight", "bn1.weight", "bn1.bias", "dw.weight", "bn2.weight", "bn2.bias",
                                                  "pw.weight", "pw.bias", "res.weight", "res.bias", "fc.weight", "fc.bias"])
        let (loss, grads) = try trainer.gradients(x, labels: y.ints[...], accumulate: false)
        #expect(abs(Float(loss.loss) - (try Self.reference("loss")).floats[0]) < 1e-5)
        #expect(TestSupport.relativeError(loss.dLogits.floats, try Self.reference("dlogits").floats) < Self.pytorchTolerance)
        for name in trainer.parameterNames {
            let expected = try Self.reference("grad/\(name)")
            #expect(TestSupport.relativeError(grads[name]!.floats, expected.floats) < Self.pytorchTolerance, "grad \(name)")
        }
        // Gradients also agree with PyTorch's float64 run (a check independent of float32 ordering).
        for name in trainer.parameterNames {
            #expect(TestSupport.relativeError(grads[name]!.floats, try Self.reference("grad64/\(name)").floats) < 1e-3, "grad64 \(name)")
        }
        // A fresh trainer takes the step (gradients() above already updated the running statistics once).
        let stepper = try Trainer(model: model, configuration: configuration)
        _ = try stepper.step(x, labels: y.ints[...], learningRate: 0.1)
        for name in stepper.parameterNames {
            let expected = try Self.reference("updated/\(name)")
            #expect(TestSupport.relativeError(stepper.parameters[name]!.floats, expected.floats) < Self.pytorchTolerance, "updated \(name)")
        }
        for bn in ["bn1", "bn2"] {
            #expect(TestSupport.relativeError(stepper.runningStatistics["\(bn).running_mean"]!.floats,
                                              try Self.reference("running_mean/\(bn).running_mean").floats) < Self.pytorchTolerance)
            #expect(TestSupport.relativeError(stepper.runningStatistics["\(bn).running_var"]!.floats,
                                              try Self.reference("running_var/\(bn).running_var").floats) < Self.pytorchTolerance)
        }
        // The exported model carries the new weights and statistics.
        let exported = stepper.exportModel()
        #expect(exported.graph.initializer(named: "fc.weight")?.tensor == stepper.parameters["fc.weight"])
        #expect(exported.graph.initializer(named: "bn2.running_var")?.tensor == stepper.runningStatistics["bn2.running_var"])
    }

    /// The PyTorch fixture (8-channel activations: blocked where oneDNN picks 8-channel blocks, as with AVX2, and
    /// plain where it picks 16, as with AVX-512) and a hand-built net of 16 and 32 channels (blocked on every ISA).
    static func blockingCases() throws -> [(name: String, model: Model, x: Tensor, y: Tensor, mustBlock: Bool)] {
        let (model, x, y) = try fixture()
        let wide = Graphs.wideConvNet()
        let wx = Tensor(shape: [8, 3, 8, 8], floats: TestSupport.randomFloats(8 * 3 * 8 * 8, seed: 31))
        let wy = Tensor(shape: [8], ints: (0..<8).map { Int64($0 % 3) })
        return [("fixture", model, x, y, false), ("wide", wide, wx, wy, true)]
    }

    /// Training activations kept in oneDNN's blocked layout give the same loss and gradients as NCHW throughout;
    /// `plain` converts a blocked node-output gradient back to NCHW order. Behaviour, not one ISA's layout choice,
    /// is asserted: the wide net must block on every CPU, the fixture wherever its widths allow.
    @Test(arguments: ["fixture", "wide"]) func blockedTrainingLayoutsAgreeWithPlain(_ which: String) throws {
        let (_, model, x, y, mustBlock) = try Self.blockingCases().first { $0.name == which }!
        let blocked = try TrainingGraph(model: model, batchSize: 8)
        let plain = try TrainingGraph(model: model, batchSize: 8, blockedLayouts: false)
        if mustBlock { #expect(!blocked.blocked.isEmpty) }
        #expect(plain.blocked.isEmpty)
        var parameters: [String: Tensor] = [:]
        for name in blocked.parameterNames { parameters[name] = model.graph.initializer(named: name)!.tensor! }
        func run(_ graph: TrainingGraph) throws -> (Double, [String: Tensor]) {
            var rng = SplitMix64(seed: 1)
            let tape = try graph.forward(x, parameters: parameters, training: true, rng: &rng)
            let loss = try Losses.softmaxCrossEntropy(logits: tape.value("logits")!, labels: y.ints[...])
            return (loss.loss, try graph.backward(tape, seeds: ["logits": loss.dLogits]))
        }
        let (lb, gb) = try run(blocked), (lp, gp) = try run(plain)
        #expect(abs(lb - lp) < 1e-6)
        for name in blocked.parameterNames {
            #expect(TestSupport.relativeError(gb[name]!.floats, gp[name]!.floats) < 1e-4, "\(name)")
        }
        // Batch norm on running statistics is refused on a graph planned for training-mode batch norm (when its
        // batch norm input is blocked).
        var rng = SplitMix64(seed: 1)
        if !blocked.blocked.isEmpty {
            #expect { try blocked.forward(x, parameters: parameters, training: false, rng: &rng) } throws: { "\($0)".contains("blockedLayouts") }
        }
        for name in blocked.blocked.keys where gp[name] != nil {
            #expect(TestSupport.relativeError(blocked.plain(name, gb[name]!).floats, gp[name]!.floats) < 1e-4, "d\(name)")
        }
    }

    @Test func runsAreDeterministicForASeed() throws {
        let (model, x, y) = try Self.fixture()
        var configuration = TrainingConfiguration()
        configuration.batchSize = 3
        configuration.seed = 7
        configuration.optimizer = .adam(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0)
        func train() throws -> [String: Tensor] {
            let trainer = try Trainer(model: model, configuration: configuration)
            _ = try trainer.trainEpoch(0, data: x, labels: y)
            return trainer.parameters
        }
        let a = try train(), b = try train()
        #expect(a == b)
        configuration.seed = 8
        #expect(try train() != a)
    }

    @Test func masksKeepPrunedChannelsAtZero() throws {
        let (model, x, y) = try Self.fixture()
        var configuration = TrainingConfiguration()
        configuration.batchSize = 8
        let w = model.graph.initializer(named: "pw.weight")!.tensor!
        let perChannel = w.count / w.shape[0]
        var mask = [Float](repeating: 1, count: w.count)
        for i in 0..<perChannel { mask[3 * perChannel + i] = 0 }  // prune output channel 3
        configuration.masks = ["pw.weight": Tensor(shape: w.shape, floats: mask),
                               "pw.bias": Tensor(shape: [w.shape[0]], floats: (0..<w.shape[0]).map { $0 == 3 ? 0 : 1 })]
        let trainer = try Trainer(model: model, configuration: configuration)
        for _ in 0..<3 { _ = try trainer.step(x, labels: y.ints[...], learningRate: 0.1) }
        let trained = trainer.parameters["pw.weight"]!
        #expect((0..<perChannel).allSatisfy { trained.floats[3 * perChannel + $0] == 0 })
        #expect(trainer.parameters["pw.bias"]!.floats[3] == 0)
        #expect(trained.floats[0] != w.floats[0])
    }

    @Test func gradientSumsCountSamples() throws {
        let (model, x, y) = try Self.fixture()
        var configuration = TrainingConfiguration()
        configuration.batchSize = 8
        configuration.batchNorm = .frozen
        let trainer = try Trainer(model: model, configuration: configuration)
        let (_, g) = try trainer.gradients(x, labels: y.ints[...])
        _ = try trainer.gradients(x, labels: y.ints[...])
        #expect(trainer.samplesSeen == 16)
        // Frozen batch norm makes the two passes identical: the sum is 2 · 8 · the batch gradient.
        #expect(TestSupport.relativeError(trainer.gradientSums["fc.weight"]!.floats, g["fc.weight"]!.floats.map { $0 * 16 }) < 1e-6)
        // Gradients of node outputs are available too (Taylor importance reads them), in NCHW order even where
        // training keeps the value blocked: they equal those of a graph that never blocks.
        let conv = model.graph.nodes.first { $0.opType == "Conv" }!
        #expect(g[conv.outputs[0]]?.shape == [8, 8, 16, 16])
        let plainGraph = try TrainingGraph(model: model, batchSize: 8, blockedLayouts: false)
        var parameters: [String: Tensor] = [:]
        for name in plainGraph.parameterNames { parameters[name] = model.graph.initializer(named: name)!.tensor! }
        var rng = SplitMix64(seed: 0)
        let tape = try plainGraph.forward(x, parameters: parameters, training: false, batchNorm: .frozen, rng: &rng)
        let loss = try Losses.softmaxCrossEntropy(logits: tape.value("logits")!, labels: y.ints[...])
        let reference = try plainGraph.backward(tape, seeds: ["logits": loss.dLogits])
        #expect(TestSupport.relativeError(g[conv.outputs[0]]!.floats, reference[conv.outputs[0]]!.floats) < 1e-4)
    }

    @Test func distillationGradientMatchesFiniteDifferences() throws {
        let student = Tensor(shape: [2, 3], floats: [0.5, -1, 2, 0.1, 0.2, -0.3])
        let teacher = Tensor(shape: [2, 3], floats: [1, 0, -1, 0.3, 0.1, 0.9])
        let labels: [Int64] = [2, 0]
        let r = try Losses.distillation(student: student, teacher: teacher, labels: labels[...], temperature: 3, alpha: 0.7)
        for i in 0..<6 {
            var plus = student, minus = student
            plus.floats[i] += 1e-3
            minus.floats[i] -= 1e-3
            let numeric = (try Losses.distillation(student: plus, teacher: teacher, labels: labels[...], temperature: 3, alpha: 0.7).loss
                - (try Losses.distillation(student: minus, teacher: teacher, labels: labels[...], temperature: 3, alpha: 0.7).loss)) / 2e-3
            #expect(abs(Double(r.dLogits.floats[i]) - numeric) < 1e-4)
        }
        // Identical logits: the KL term vanishes.
        let same = try Losses.distillation(student: teacher, teacher: teacher, labels: nil, temperature: 2, alpha: 1)
        #expect(abs(same.loss) < 1e-12)
        #expect { try Losses.distillation(student: student, teacher: teacher, labels: nil, temperature: 2, alpha: 0.5) }
            throws: { "\($0)".contains("alpha 1") }
    }

    /// Relative mean squared error by hand: fields on axis 1 of `[1, 2, 3]` (YOLOv8's layout) weigh each row of
    /// three by its own power; on the last axis each column of two.
    @Test func relativeMeanSquaredErrorWeighsEachFieldByItsPower() throws {
        let target = Tensor(shape: [1, 2, 3], floats: [100, 200, 300, 1, 2, 3])
        let student = Tensor(shape: [1, 2, 3], floats: [110, 200, 300, 1, 2, 4])
        // Axis 1: field 0 (100, 200, 300): mean square 140000/3, error 100/3 → 100/140000;
        //         field 1 (1, 2, 3): mean square 14/3, error 1/3 → 1/14. L = (1/2)(100/140000 + 1/14).
        let rows = try Losses.meanSquared(student: student, target: target, fieldAxis: 1).loss
        #expect(abs(rows - 0.5 * (100.0 / 140000 + 1.0 / 14)) < 1e-12)
        // Last axis: field 0 (100, 1): error 100/2 over 10001/2; field 2 (300, 3): error 1/2 over 90009/2; field 1: 0.
        let columns = try Losses.meanSquared(student: student, target: target).loss
        #expect(abs(columns - (100.0 / 10001 + 1.0 / 90009) / 3) < 1e-12)
        #expect(throws: ONNXError.self) { try Losses.meanSquared(student: student, target: target, fieldAxis: 3) }
    }

    /// The task losses (per-pixel distillation and cross-entropy, relative mean squared error, cosine distance)
    /// against central finite differences, and their fixed points.
    @Test func taskLossGradientsMatchFiniteDifferences() throws {
        let student = Tensor(shape: [2, 3, 2, 2], floats: TestSupport.randomFloats(24, seed: 71).map { $0 * 2 })
        let teacher = Tensor(shape: [2, 3, 2, 2], floats: TestSupport.randomFloats(24, seed: 72).map { $0 * 2 })
        let pixels: [Int64] = [0, 1, 2, 1, 2, 2, 0, 1]
        let losses: [(String, (Tensor) throws -> LossResult)] = [
            ("pixel distillation", { try Losses.pixelDistillation(student: $0, teacher: teacher, labels: pixels[...], temperature: 2, alpha: 0.6) }),
            ("pixel cross-entropy", { try Losses.pixelDistillation(student: $0, teacher: nil, labels: pixels[...], temperature: 1, alpha: 0) }),
            ("relative mean squared error", { try Losses.meanSquared(student: $0, target: teacher) }),
            ("relative mean squared error over axis 1", { try Losses.meanSquared(student: $0, target: teacher, fieldAxis: 1) }),
            ("cosine distance", { try Losses.cosineDistance(student: try $0.reshaped([2, 12]), teacher: try teacher.reshaped([2, 12])) }),
        ]
        for (name, loss) in losses {
            let r = try loss(student)
            for i in 0..<24 {
                var plus = student, minus = student
                plus.floats[i] += 1e-3
                minus.floats[i] -= 1e-3
                let numeric = (try loss(plus).loss - loss(minus).loss) / 2e-3
                #expect(abs(Double(r.dLogits.floats[i]) - numeric) < 1e-4, "\(name) [\(i)]: \(r.dLogits.floats[i]) vs \(numeric)")
            }
        }
        #expect(try Losses.pixelDistillation(student: teacher, teacher: teacher, labels: nil, temperature: 2, alpha: 1).loss < 1e-12)
        let agreed = try Losses.pixelDistillation(student: teacher, teacher: teacher, labels: nil, temperature: 2, alpha: 1)
        #expect(agreed.correct == 8 && agreed.counted == 8, "every pixel agrees with itself")
        #expect(try Losses.meanSquared(student: teacher, target: teacher).loss == 0)
        let flat = try teacher.reshaped([2, 12])
        let scaled = Tensor(shape: [2, 12], floats: flat.floats.map { $0 * 3 })
        #expect(abs(try Losses.cosineDistance(student: flat, teacher: scaled).loss) < 1e-12, "cosine ignores scale")
        #expect(TaskKind.inferred(outputShape: [4, 10]) == .classification)
        #expect(TaskKind.inferred(outputShape: [4, 21, 64, 64]) == .segmentation)
        #expect(TaskKind.inferred(outputShape: [4, 252, 8]) == .detection)
        #expect(TaskKind.detection.fieldAxis(outputShape: [4, 252, 8]) == 2, "YOLOv5: [N, anchors, 5 + classes]")
        #expect(TaskKind.detection.fieldAxis(outputShape: [4, 84, 8400]) == 1, "YOLOv8: [N, 4 + classes, anchors]")
        #expect(TaskKind.regression.fieldAxis(outputShape: [4, 3]) == 1)
        #expect { try Losses.pixelDistillation(student: student, teacher: nil, labels: [0, 1], temperature: 1, alpha: 0) }
            throws: { "\($0)".contains("pixel labels") }
    }

    @Test func hintLossGradientsMatchFiniteDifferences() {
        let s = Tensor(shape: [2, 3, 2, 2], floats: TestSupport.randomFloats(24, seed: 50))
        let t = Tensor(shape: [2, 2, 2, 2], floats: TestSupport.randomFloats(16, seed: 51))
        let p = Tensor(shape: [2, 3], floats: TestSupport.randomFloats(6, seed: 52))
        let (_, dP, dS) = Losses.hint(student: s, teacher: t, projection: p, weight: 0.7)
        for i in 0..<6 {
            var plus = p, minus = p
            plus.floats[i] += 1e-3
            minus.floats[i] -= 1e-3
            let numeric = (Losses.hint(student: s, teacher: t, projection: plus, weight: 0.7).0
                - Losses.hint(student: s, teacher: t, projection: minus, weight: 0.7).0) / 2e-3
            #expect(abs(Double(dP.floats[i]) - numeric) < 1e-4)
        }
        for i in stride(from: 0, to: 24, by: 5) {
            var plus = s, minus = s
            plus.floats[i] += 1e-3
            minus.floats[i] -= 1e-3
            let numeric = (Losses.hint(student: plus, teacher: t, projection: p, weight: 0.7).0
                - Losses.hint(student: minus, teacher: t, projection: p, weight: 0.7).0) / 2e-3
            #expect(abs(Double(dS.floats[i]) - numeric) < 1e-4)
        }
    }

    /// Distillation with a hint: the student learns from a teacher (here, a copy of itself) without labels, and
    /// the hint projection trains too.
    @Test func distillationWithHintsTrainsWithoutLabels() throws {
        let (model, x, _) = try Self.fixture()
        let teacher = try InferenceSession(model: model)
        let convs = model.graph.nodes.filter { $0.opType == "Conv" }
        var configuration = TrainingConfiguration()
        configuration.batchSize = 8
        configuration.distillation = (temperature: 2, alpha: 1)
        configuration.hints = [(teacher: convs[2].outputs[0], student: convs[2].outputs[0])]
        configuration.learningRate = 0.02
        let student = try Trainer(model: try Initialization.heInitialized(model, seed: 3), configuration: configuration)
        let observe = Set([convs[2].outputs[0]])
        func teacherOutputs(_ batch: Tensor) throws -> TeacherOutputs {
            var features: [String: Tensor] = [:]
            let logits = try teacher.run(batch) { node, outputs in
                for (name, value) in zip(node.outputs, outputs) where observe.contains(name) { features[name] = value }
            }
            return TeacherOutputs(logits: logits, features: features)
        }
        let first = try student.step(x, labels: nil, teacher: try teacherOutputs(x), learningRate: 0.02).loss
        let projection = student.hintProjections[convs[2].outputs[0]]!
        for _ in 0..<8 { _ = try student.step(x, labels: nil, teacher: try teacherOutputs(x), learningRate: 0.02) }
        let last = try student.gradients(x, labels: nil, teacher: try teacherOutputs(x), accumulate: false).0.loss
        #expect(last < first)
        #expect(student.hintProjections[convs[2].outputs[0]] != projection)
        // The projection is not part of the exported model.
        #expect(student.exportModel().graph.initializers.count == model.graph.initializers.count)
    }

    /// The teacher's logits of a sample do not depend on the rest of its batch except through summation order.
    static let teacherCacheTolerance = 1e-4

    /// With a teacher-logits cache, distillation trains as without it, and the teacher runs once per (sample,
    /// symmetry) for the cache's lifetime: a second trainer drawing the same symmetries runs it not at all.
    @Test func teacherLogitsCacheRunsEachSampleOnceAndTrainsAlike() throws {
        let (model, x, y) = try Self.fixture()
        let session = try InferenceSession(model: model)
        var configuration = TrainingConfiguration()
        configuration.batchSize = 3
        configuration.seed = 5
        configuration.learningRate = 0.02
        configuration.distillation = (temperature: 4, alpha: 0.5)
        configuration.augmentation = .dihedral
        var teacherRuns = 0
        let teacher: (Tensor) throws -> TeacherOutputs = { batch in
            teacherRuns += batch.shape[0]
            return TeacherOutputs(logits: try session.run(batch))
        }
        let student = try Initialization.heInitialized(model, seed: 3)
        let plain = try Trainer(model: student, configuration: configuration)
        let cached = try Trainer(model: student, configuration: configuration)
        let cache = TeacherLogitsCache()
        let epochs = 4, n = x.shape[0]
        for epoch in 0..<epochs {
            let a = try plain.trainEpoch(epoch, data: x, labels: y, teacher: teacher)
            let b = try cached.trainEpoch(epoch, data: x, labels: y, teacher: teacher, teacherCache: cache)
            #expect(abs(a.loss - b.loss) <= Self.teacherCacheTolerance * abs(a.loss), "epoch \(epoch)")
        }
        #expect(teacherRuns == epochs * n + cache.computed)
        #expect(cache.computed < epochs * n, "some (sample, symmetry) pairs came again and were not recomputed")
        for (name, value) in plain.parameters {
            #expect(TestSupport.relativeError(value.floats, cached.parameters[name]!.floats) < Float(Self.teacherCacheTolerance), "\(name)")
        }
        let computed = cache.computed
        let again = try Trainer(model: student, configuration: configuration)
        for epoch in 0..<epochs { _ = try again.trainEpoch(epoch, data: x, labels: y, teacher: teacher, teacherCache: cache) }
        #expect(cache.computed == computed && teacherRuns == epochs * n + computed)
    }

    /// A teacher whose logits do not match the batch (rows or classes) is refused with a clear error.
    @Test func teacherLogitsCacheRefusesMisshapenLogits() throws {
        let (model, x, y) = try Self.fixture()
        var configuration = TrainingConfiguration()
        configuration.batchSize = 4
        configuration.distillation = (temperature: 4, alpha: 0.5)
        let trainer = try Trainer(model: model, configuration: configuration)
        let oneRow: (Tensor) throws -> TeacherOutputs = { _ in TeacherOutputs(logits: Tensor(shape: [1, 5], floats: [Float](repeating: 0, count: 5))) }
        #expect { _ = try trainer.trainEpoch(0, data: x, labels: y, teacher: oneRow, teacherCache: TeacherLogitsCache()) } throws: {
            "\($0)".contains("the teacher gave logits of shape [1, 5] for 4 samples")
        }
        var calls = 0
        let drifting: (Tensor) throws -> TeacherOutputs = { batch in
            calls += 1
            let classes = calls == 1 ? 5 : 3
            return TeacherOutputs(logits: Tensor(shape: [batch.shape[0], classes], floats: [Float](repeating: 0, count: batch.shape[0] * classes)))
        }
        #expect { _ = try trainer.trainEpoch(0, data: x, labels: y, teacher: drifting, teacherCache: TeacherLogitsCache()) } throws: {
            "\($0)".contains("the teacher gave logits of shape [3] per sample, earlier [5]")
        }
    }

    @Test func optimizersFollowPyTorchRules() {
        var p = ["w": Tensor(shape: [2], floats: [1, -2])]
        let g = ["w": Tensor(shape: [2], floats: [0.5, -0.25])]
        var adam = Optimizer(.adam(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0))
        adam.update(&p, gradients: g, lr: 0.1)
        // First Adam step moves each weight by lr · sign(g) (bias-corrected m̂ = g, v̂ = g²).
        #expect(abs(p["w"]!.floats[0] - 0.9) < 1e-6 && abs(p["w"]!.floats[1] + 1.9) < 1e-6)
        var q = ["w": Tensor(shape: [2], floats: [1, -2])]
        var adamW = Optimizer(.adamW(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0.5))
        adamW.update(&q, gradients: g, lr: 0.1)
        #expect(abs(q["w"]!.floats[0] - (1 * 0.95 - 0.1)) < 1e-6)
        var s = ["w": Tensor(shape: [2], floats: [1, -2])]
        var nesterov = Optimizer(.sgd(momentum: 0.9, nesterov: true, weightDecay: 0))
        nesterov.update(&s, gradients: g, lr: 0.1)  // b = g; step = g + 0.9·b = 1.9·g
        #expect(abs(s["w"]!.floats[0] - (1 - 0.1 * 1.9 * 0.5)) < 1e-6)
        nesterov.update(&s, gradients: g, lr: 0.1)  // b = 0.9·g + g = 1.9·g; step = g + 0.9·1.9·g
        #expect(abs(s["w"]!.floats[0] - (1 - 0.095 - 0.1 * 2.71 * 0.5)) < 1e-6)
        #expect(LearningRateSchedule.step(every: 2, gamma: 0.1).rate(base: 1, epoch: 3) == Float(0.1))
        #expect(abs(LearningRateSchedule.cosine(epochs: 10, minimum: 0).rate(base: 1, epoch: 5) - 0.5) < 1e-6)
        var grads = ["a": Tensor(shape: [2], floats: [3, 4])]
        #expect(clipGradients(&grads, maxNorm: 1) == 5)
        #expect(abs(grads["a"]!.floats[0] - 0.6) < 1e-5)
    }

    /// The Fisher sums are per-sample squared gradients: equal to squaring single-sample gradients by hand, and
    /// additive over disjoint sample sets (so workers' sums merge exactly).
    @Test func fisherSumsArePerSampleSquaredGradients() throws {
        let (model, x, y) = try Self.fixture()
        var configuration = TrainingConfiguration()
        configuration.batchSize = 8
        let trainer = try Trainer(model: model, configuration: configuration)
        let (all, n) = try trainer.fisherSums(data: x, labels: y)
        #expect(n == 8)
        let (firstTwo, _) = try trainer.fisherSums(data: x, labels: y, limit: 2)
        var frozen = configuration
        frozen.batchNorm = .frozen
        frozen.batchSize = 1
        let single = try Trainer(model: model, configuration: frozen)
        var expected = [Float](repeating: 0, count: all["fc.weight"]!.count)
        for i in 0..<2 {
            let xi = Tensor(shape: [1, 3, 16, 16], floats: Array(x.floats[(i * 768)..<((i + 1) * 768)]))
            let g = try single.gradients(xi, labels: [y.ints[i]][...], accumulate: false).1["fc.weight"]!
            for k in expected.indices { expected[k] += g.floats[k] * g.floats[k] }
        }
        #expect(TestSupport.relativeError(firstTwo["fc.weight"]!.floats, expected) < 1e-5)
        #expect(all["fc.weight"]!.floats.allSatisfy { $0 >= 0 })
        #expect(zip(all["fc.weight"]!.floats, firstTwo["fc.weight"]!.floats).allSatisfy { $0 >= $1 - 1e-6 })
    }

    @Test func ewcPenaltyAndGradient() {
        let theta = ["w": Tensor(shape: [2], floats: [1, 2])]
        let star = ["w": Tensor(shape: [2], floats: [0, 2])]
        let fisher = ["w": Tensor(shape: [2], floats: [4, 9])]
        let (penalty, grads) = Losses.elasticWeightConsolidation(parameters: theta, reference: star, fisher: fisher, lambda: 0.5)
        #expect(abs(penalty - 1) < 1e-12)  // 0.5/2 · 4 · 1²
        #expect(grads["w"]!.floats == [2, 0])
    }

    /// Quantization-aware training: the gradient of a fake-quantized weight is the gradient at the quantized
    /// weight, masked by the straight-through estimator; and QAT steps still reduce the loss.
    @Test func fakeQuantizationUsesTheStraightThroughEstimator() throws {
        let (model, x, y) = try Self.fixture()
        let graph = try TrainingGraph(model: model, batchSize: 8)
        var parameters: [String: Tensor] = [:]
        for name in graph.parameterNames { parameters[name] = model.graph.initializer(named: name)!.tensor! }
        let w = parameters["pw.weight"]!
        // A deliberately narrow fixed range so some weights clip.
        let quantizer = FakeQuantization(parameters: [QuantizationParameters(scale: 0.002, zeroPoint: 0)], axis: nil, range: -127...127)
        let (wq, mask) = quantizer.apply(w)
        #expect(mask.contains(0) && mask.contains(1))
        func gradients(_ p: [String: Tensor], _ fq: [String: FakeQuantization]) throws -> [String: Tensor] {
            var rng = SplitMix64(seed: 1)
            let tape = try graph.forward(x, parameters: p, training: true, fakeQuantization: fq, rng: &rng)
            let loss = try Losses.softmaxCrossEntropy(logits: tape.value("logits")!, labels: y.ints[...])
            return try graph.backward(tape, seeds: ["logits": loss.dLogits])
        }
        let qat = try gradients(parameters, ["pw.weight": quantizer])
        var substituted = parameters
        substituted["pw.weight"] = wq
        let plain = try gradients(substituted, [:])
        let expected = zip(plain["pw.weight"]!.floats, mask).map(*)
        #expect(TestSupport.relativeError(qat["pw.weight"]!.floats, expected) < 1e-6)
        #expect(TestSupport.relativeError(qat["fc.weight"]!.floats, plain["fc.weight"]!.floats) < 1e-6)

        var configuration = TrainingConfiguration()
        configuration.batchSize = 8
        configuration.batchNorm = .frozen
        configuration.weightQuantization = (.int8, true)
        let trainer = try Trainer(model: model, configuration: configuration)
        let first = try trainer.step(x, labels: y.ints[...], learningRate: 0.05).loss
        for _ in 0..<5 { _ = try trainer.step(x, labels: y.ints[...], learningRate: 0.05) }
        #expect(try trainer.gradients(x, labels: y.ints[...]).0.loss < first)
    }

    @Test func badInputIsRefusedClearly() throws {
        let (model, x, y) = try Self.fixture()
        var configuration = TrainingConfiguration()
        configuration.batchSize = 8
        let trainer = try Trainer(model: model, configuration: configuration)
        let wrongLabels: [Int64] = [0, 1, 2, 3, 4, 5, 0, 1]
        #expect { try trainer.step(x, labels: wrongLabels[...], learningRate: 0.1) } throws: { "\($0)".contains("label 5") }
        #expect { try trainer.trainEpoch(0, data: x, labels: Tensor(shape: [3], ints: [0, 1, 2])) } throws: { "\($0)".contains("3 labels") }
        // A learning rate this large drives the loss to infinity; the error names epoch and step.
        configuration.learningRate = 1e30
        configuration.optimizer = .sgd(momentum: 0, nesterov: false, weightDecay: 0)
        let wild = try Trainer(model: model, configuration: configuration)
        #expect { for e in 0..<5 { _ = try wild.trainEpoch(e, data: x, labels: y) } } throws: { error in
            "\(error)".contains("epoch") && "\(error)".contains("step")
        }
        // No parameters to train.
        let bare = Graph(name: "g", nodes: [Node(opType: "Relu", name: "r", inputs: ["x"], outputs: ["y"])],
                         inputs: [ValueInfo(name: "x", elementType: .float, shape: [.symbol("N"), .value(3)])],
                         outputs: [ValueInfo(name: "y", elementType: .float, shape: nil)])
        #expect { try Trainer(model: Model(graph: bare, opset: 13), configuration: TrainingConfiguration()) }
            throws: { "\($0)".contains("no trainable parameters") }
    }
}
