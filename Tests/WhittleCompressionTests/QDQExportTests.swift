import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// Folding batch normalization changes only the rounding of the folded weights.
let foldingTolerance: Float = 1e-4

@Suite struct QDQExportTests {
    static func demo() throws -> (Model, Dataset) {
        let model = try ModelCoding.read(try TestSupport.bytes(TestSupport.root.appendingPathComponent("examples/models/defect_cnn.onnx")))
        let x = try NPY.decode(try TestSupport.bytes(TestSupport.root.appendingPathComponent("examples/data/defects_test_x.npy")))
        let y = try NPY.decode(try TestSupport.bytes(TestSupport.root.appendingPathComponent("examples/data/defects_test_y.npy")))
        let n = 64, size = x.count / x.shape[0]
        return (model, try Dataset(x: Tensor(shape: [n] + Array(x.shape.dropFirst()), floats: Array(x.floats[..<(n * size)])),
                                   labels: Tensor(shape: [n], ints: Array(y.ints[..<n]), dtype: y.dtype)))
    }

    static func quantize(_ policy: QuantizationPolicy) throws -> (Model, QuantizationSummary, Model, Dataset) {
        let (model, data) = try demo()
        let folded = try GraphEditing.foldBatchNormalization(model)
        var job = LocalCompression()
        job.quantization = policy
        let ranges = try job.calibrate(folded, data)
        let (q, summary) = try QDQExport.export(folded, ranges: ranges, policy: policy)
        return (q, summary, folded, data)
    }

    @Test(arguments: ["resnet_bn_op13.onnx", "mobilenetv2_bn_op13.onnx"])
    func foldingBatchNormalizationKeepsOutputs(_ file: String) throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes(file))
        let folded = try GraphEditing.foldBatchNormalization(model)
        #expect(!folded.graph.nodes.contains { $0.opType == "BatchNormalization" })
        let x = try TestSupport.npy(file.replacingOccurrences(of: ".onnx", with: ".input.npy"))
        #expect(TestSupport.relativeError(try InferenceSession(model: folded).run(x).floats,
                                          try InferenceSession(model: model).run(x).floats) < foldingTolerance)
    }

    /// Placement as onnxruntime's QDQ quantizer does it with asymmetric uint8 activations: every Conv and Gemm reads
    /// DequantizeLinear outputs for its input, weight and bias; Relus are gone (the Conv writes their output); the
    /// weights are int8 per channel, the bias int32 with scale s_in · s_w.
    @Test func int8PlacementFollowsOnnxruntime() throws {
        let (q, summary, folded, _) = try Self.quantize(QuantizationPolicy(mode: .int8))
        let producers = Dictionary(q.graph.nodes.flatMap { n in n.outputs.map { ($0, n) } }, uniquingKeysWith: { a, _ in a })
        #expect(!q.graph.nodes.contains { $0.opType == "Relu" })
        #expect(summary.removedNodes.count == folded.graph.nodes.filter { $0.opType == "Relu" }.count)
        let initializers = Dictionary(uniqueKeysWithValues: q.graph.initializers.map { ($0.name, $0) })
        for node in q.graph.nodes where node.opType == "Conv" || node.opType == "Gemm" {
            let dq = node.inputs.map { producers[$0] }
            #expect(dq.allSatisfy { $0?.opType == "DequantizeLinear" }, "\(node.name) reads only dequantized values")
            let weight = initializers[dq[1]!.inputs[0]]!, bias = initializers[dq[2]!.inputs[0]]!
            #expect(weight.elementType == .int8)
            #expect(bias.elementType == .int32)
            #expect(dq[1]!.attribute("axis")?.value.int == 0, "per output channel")
            let sIn = initializers[dq[0]!.inputs[1]]!.tensor!.floats[0]
            let sW = initializers[dq[1]!.inputs[1]]!.tensor!.floats, sB = initializers[dq[2]!.inputs[1]]!.tensor!.floats
            #expect(sB == sW.map { sIn * $0 })
            #expect(weight.tensor!.ints.allSatisfy { (-127...127).contains($0) })
            // The activation feeding the node is quantized by a QuantizeLinear right before.
            #expect(producers[dq[0]!.inputs[0]]?.opType == "QuantizeLinear")
        }
        #expect(summary.layers.allSatisfy { $0.precision == .int8 })
        // The QDQ model is a valid model Whittle can run, and close to the float model.
        let (_, data) = try Self.demo()
        let batch = data.slice(0..<8)
        let zq = try InferenceSession(model: q).firstOutput(batch), zf = try InferenceSession(model: folded).firstOutput(batch)
        var agreement = TaskEvaluation(task: .classification)
        try agreement.add(base: zf, compressed: zq, labels: nil)
        #expect(try #require(agreement.agreementRate) >= 0.75)
    }

    /// With symmetric activations onnxruntime keeps Relu with quantized input and output (the input taking the
    /// output's range), and zero points are the middle of the type.
    /// Transformers (the zoo's ViT): attention MatMuls of two activations are quantized, while Softmax and the erf
    /// GELU compute in float: nothing quantizes a Softmax's input (where attention adds its mask), no element-wise op
    /// of a GELU is quantized on its own account, and the quantized model stays close to the float one.
    @Test func transformersKeepSoftmaxAndGeluInFloat() throws {
        let model = try ModelCoding.read(try TestSupport.bytes(TestSupport.zoo.appendingPathComponent("vit_op17.onnx")))
        let input = try NPY.decode(try TestSupport.bytes(TestSupport.zoo.appendingPathComponent("vit_op17.input.npy")))
        let x = Tensor(shape: [8] + Array(input.shape.dropFirst()), floats: TestSupport.randomFloats(8 * input.count / input.shape[0], seed: 3))
        var job = LocalCompression()
        job.quantization = QuantizationPolicy(mode: .int8)
        let ranges = try job.calibrate(model, try Dataset(x: x, labels: nil))
        let (q, summary) = try QDQExport.export(model, ranges: ranges, policy: QuantizationPolicy(mode: .int8))
        let producers = Dictionary(q.graph.nodes.flatMap { n in n.outputs.map { ($0, n.opType) } }, uniquingKeysWith: { a, _ in a })
        let quantizedTensors = Set(q.graph.nodes.filter { $0.opType == "QuantizeLinear" }.map { $0.inputs[0] })
        let softmaxes = q.graph.nodes.filter { $0.opType == "Softmax" }
        #expect(!softmaxes.isEmpty)
        for node in softmaxes {
            #expect(!quantizedTensors.contains(node.inputs[0]) && producers[node.inputs[0]] != "DequantizeLinear",
                    "\(node.label): its input is quantized")
        }
        // Every GELU's Erf → Add → Mul → Mul: none of their outputs is quantized except for a quantized reader.
        for erf in model.graph.nodes where erf.opType == "Erf" {
            #expect(!quantizedTensors.contains(erf.outputs[0]))
        }
        let attention = q.graph.nodes.filter { $0.opType == "MatMul" && producers[$0.inputs[0]] == "DequantizeLinear"
                                                && producers[$0.inputs[1]] == "DequantizeLinear" }
        #expect(attention.count >= 4, "the scores and context MatMuls of both layers read quantized activations")
        #expect(summary.tensors.contains { $0.role == .weight })
        let y = try InferenceSession(model: model).run(x), yq = try InferenceSession(model: q).run(x)
        #expect(TestSupport.relativeError(yq.floats, y.floats) < 0.2)
    }

    @Test func symmetricActivationsKeepRelu() throws {
        var policy = QuantizationPolicy(mode: .int8)
        policy.symmetricActivations = true
        policy.activationType = .int8
        let (q, summary, _, _) = try Self.quantize(policy)
        #expect(q.graph.nodes.contains { $0.opType == "Relu" })
        #expect(summary.removedNodes.isEmpty)
        for t in summary.tensors where t.role == .activation { #expect(t.zeroPoints == [0]) }
        let relu = q.graph.nodes.first { $0.opType == "Relu" }!
        let scale = { (name: String) in summary.tensors.first { $0.name == name }?.scales }
        #expect(scale(relu.outputs[0]) != nil)
    }

    @Test func int4WeightsAndMixedPolicy() throws {
        let (q4, s4, _, _) = try Self.quantize(QuantizationPolicy(mode: .int4Weights))
        #expect(q4.defaultOpset == 21)
        #expect(s4.layers.first { $0.opType == "Gemm" }?.precision == .int4Weights)
        #expect(s4.layers.filter { $0.opType == "Conv" }.allSatisfy { $0.precision == .float })
        #expect(q4.graph.initializers.contains { $0.elementType == .int4 })
        #expect(!q4.graph.nodes.contains { $0.opType == "QuantizeLinear" }, "weight-only: activations stay float")
        let (_, data) = try Self.demo()
        _ = try InferenceSession(model: q4).firstOutput(data.slice(0..<4))

        let (_, mixed, _, _) = try Self.quantize(QuantizationPolicy(mode: .mixed))
        #expect(mixed.layers.first!.precision == .float)
        #expect(mixed.layers.last!.precision == .float)
        #expect(mixed.layers.dropFirst().dropLast().allSatisfy { $0.precision == .int8 })

        var policy = QuantizationPolicy(mode: .int8)
        let conv = mixed.layers[2].node
        policy.keepFloat = [conv]
        policy.overrides = [mixed.layers.last!.node: .int4Weights]
        let (qo, so, _, _) = try Self.quantize(policy)
        #expect(so.layers.first { $0.node == conv }?.precision == .float)
        #expect(so.layers.last!.precision == .int4Weights)
        let convNode = qo.graph.nodes.first { $0.name == conv }!
        #expect(qo.graph.initializer(named: convNode.inputs[1])?.elementType == .float)
    }

    @Test func badPoliciesAreRefusedClearly() throws {
        var policy = QuantizationPolicy(mode: .int8)
        policy.keepFloat = ["no such node"]
        #expect { _ = try Self.quantize(policy) } throws: { ($0 as? CompressionError)?.message.contains("no such node") == true }
        policy = QuantizationPolicy(mode: .int8)
        policy.percentile = 0
        #expect(throws: CompressionError.self) { try policy.check() }
        // Per-channel scales need opset 13.
        let shapechain = try ModelCoding.read(try TestSupport.fixtureBytes("shapechain_op11.onnx"))
        #expect { _ = try QDQExport.export(shapechain, ranges: [:], policy: QuantizationPolicy(mode: .int8)) } throws: {
            ($0 as? CompressionError)?.message.contains("opset 13") == true
        }
        // NaN data never reaches calibration.
        #expect(throws: CompressionError.self) { _ = try Dataset(x: Tensor(shape: [1, 2], floats: [1, .nan]), labels: nil) }
        #expect(throws: CompressionError.self) {
            _ = try Dataset(x: Tensor(shape: [2, 2], floats: [1, 2, 3, 4]), labels: Tensor(shape: [3], ints: [0, 1, 2]))
        }
    }

    /// The whole local pipeline: prune, quantize, report; the prediction is Whittle's own run of the QDQ model.
    @Test func localCompressionReportsBeforeAndAfter() throws {
        let (model, data) = try Self.demo()
        var job = LocalCompression()
        job.pruning = PruningOptions(ratio: 0.25)
        job.quantization = QuantizationPolicy(mode: .int8)
        job.sensitivity = true
        let (out, report) = try job.run(model: model, modelName: "demo", outputName: "out", calibration: data,
                                        evaluation: nil, training: nil)
        #expect(report.after.parameters < report.before.parameters)
        #expect(report.after.bytes < report.before.bytes / 3)
        #expect(report.after.macs < report.before.macs)
        #expect(report.before.accuracy != nil && report.after.accuracy != nil)
        #expect(report.pruning?.steps.count == 1)
        #expect(report.quantization?.tensors.isEmpty == false)
        #expect(report.sensitivity?.count == report.quantization?.layers.filter { $0.precision != .float }.count)
        var metrics = ClassificationMetrics()
        try metrics.add(logits: try InferenceSession(model: out).run(data.x), labels: data.labels!.ints[...])
        #expect(metrics.accuracy == report.after.accuracy)
    }

    /// A progressive schedule with fine-tuning between steps: each step counts against the original sizes, kept
    /// indices compose into indices of the original channels, fine-tuning runs (by distillation, without labels).
    @Test func progressiveScheduleWithFineTuning() throws {
        let (model, data) = try Self.demo()
        var job = LocalCompression()
        var options = PruningOptions(ratio: 0.5)
        options.roundTo = 2
        job.pruning = options
        job.schedule = [0.25, 0.5]
        job.finetuneEpochs = 1
        job.distill = true
        job.batchSize = 16
        let unlabeled = try Dataset(x: data.x, labels: nil)
        let (out, report) = try job.run(model: model, modelName: "demo", outputName: "out", calibration: data,
                                        evaluation: nil, training: unlabeled)
        let steps = try #require(report.pruning?.steps)
        #expect(steps.count == 2)
        #expect(steps[0].channelsKept < steps[0].channelsBefore)
        #expect(steps[1].channelsBefore == steps[0].channelsKept)
        #expect(steps.allSatisfy { $0.finetuneLoss.count == 1 && $0.accuracyFinetuned != nil })
        for g in report.pruning!.groups {
            #expect(g.keptIndices.count == g.kept)
            #expect(g.keptIndices == g.keptIndices.sorted() && Set(g.keptIndices).count == g.kept)
            #expect(g.keptIndices.allSatisfy { $0 < g.channels })
            #expect(g.kept <= g.channels / 2 + 1 && g.kept % 2 == 0, "\(g.group): \(g.kept) of \(g.channels)")
        }
        #expect(try ModelSummary(model: out).parameters == report.after.parameters)
    }
}
