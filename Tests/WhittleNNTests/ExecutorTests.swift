import Foundation
import Testing
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

@Suite struct ExecutorTests {
    /// Whittle's outputs must match onnxruntime's within this error relative to the output's magnitude.
    static let onnxruntimeTolerance: Float = 1e-4
    /// The reference kernels against the oneDNN kernels on the same model.
    static let referenceTolerance: Float = 1e-4

    static let fixtures = ["resnet_bn_op13", "resnet_folded_op17", "mobilenetv2_bn_op13", "mobilenetv2_folded_op17",
                           "smallcnn_dynamo", "shapechain_op11", "opzoo_a_op13", "opzoo_b_op17",
                           "handbuilt_dropout_identity_op13"]

    static func session(_ name: String, fast: Bool = true) throws -> InferenceSession {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("\(name).onnx"))
        return try InferenceSession(model: model, options: KernelOptions(fast: fast))
    }

    @Test(arguments: fixtures)
    func matchesOnnxRuntime(_ name: String) throws {
        let input = try TestSupport.npy("\(name).input.npy")
        let expected = try TestSupport.npy("\(name).ort_output.npy")
        let output = try Self.session(name).run(input)
        #expect(output.shape == expected.shape)
        #expect(TestSupport.relativeError(output.floats, expected.floats) < Self.onnxruntimeTolerance)
    }

    @Test(arguments: ["resnet_bn_op13", "mobilenetv2_bn_op13", "opzoo_a_op13", "opzoo_b_op17"])
    func referenceKernelsAgree(_ name: String) throws {
        let input = try TestSupport.npy("\(name).input.npy")
        let fast = try Self.session(name).run(input)
        let reference = try Self.session(name, fast: false).run(input)
        #expect(TestSupport.relativeError(fast.floats, reference.floats) < Self.referenceTolerance)
    }

    /// One sample at a time gives the same answers as the whole batch (batch-size-specific compilation).
    @Test func batchSizesAgree() throws {
        let session = try Self.session("mobilenetv2_bn_op13")
        let input = try TestSupport.npy("mobilenetv2_bn_op13.input.npy")
        let whole = try session.run(input)
        let per = input.count / input.shape[0]
        for i in 0..<input.shape[0] {
            let one = Tensor(shape: [1] + input.shape.dropFirst(), floats: Array(input.floats[(i * per)..<((i + 1) * per)]))
            let y = try session.run(one)
            #expect(TestSupport.relativeError(y.floats, Array(whole.floats[(i * 10)..<((i + 1) * 10)])) < 1e-5)
        }
    }

    @Test func observerSeesEveryRunNode() throws {
        let session = try Self.session("resnet_bn_op13")
        let input = try TestSupport.npy("resnet_bn_op13.input.npy")
        var seen: [String: [Int]] = [:]
        _ = try session.run(input) { node, outputs in seen[node.name] = outputs[0].shape }
        let convs = session.model.graph.nodes.filter { $0.opType == "Conv" }
        #expect(convs.allSatisfy { seen[$0.name]?.first == 4 })
        #expect(seen.count == session.model.graph.nodes.count)
    }

    /// Conv+BatchNormalization+Add+Relu run as one oneDNN step each; the fused run still matches onnxruntime
    /// (matchesOnnxRuntime runs fused) and the unfused run.
    @Test func fusionMergesConvPatterns() throws {
        let session = try Self.session("resnet_bn_op13")
        let fused = try session.compiled(batchSize: 4)
        let unfused = try session.compiled(batchSize: 4, fused: false)
        let nodes = session.model.graph.nodes
        let convs = nodes.filter { $0.opType == "Conv" }.count
        let absorbed = nodes.filter { ["BatchNormalization", "Relu", "Add"].contains($0.opType) }.count
        #expect(unfused.stepCount == nodes.count)
        #expect(fused.stepCount == nodes.count - absorbed)
        #expect(fused.stepCount >= convs)
        // Convolution chains pass tensors in oneDNN's blocked layout.
        #expect(fused.blockedConvolutionSteps >= convs / 2)
        let input = try TestSupport.npy("resnet_bn_op13.input.npy")
        let a = try fused.run(["input": input])["logits"]!, b = try unfused.run(["input": input])["logits"]!
        #expect(TestSupport.relativeError(a.floats, b.floats) < Self.referenceTolerance)
    }

    @Test func shapeChainsFoldStatically() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("shapechain_op11.onnx"))
        let inferred = try ShapeInference.infer(model.graph, opset: 11,
                                                inputs: try ShapeInference.inputShapes(model, batchSize: 7))
        let reshape = inferred.contexts.firstIndex { $0.node.opType == "Reshape" }!
        #expect(inferred.outputs[reshape][0].shape.first == 7)
        #expect(inferred.values[model.graph.outputs[0].name]?.shape == [7, 10])
        // The Shape → Gather → Unsqueeze → Concat chain was folded, so it does not run.
        let shapeNode = inferred.contexts.firstIndex { $0.node.opType == "Shape" }!
        #expect(inferred.folded[shapeNode])
    }

    @Test func unknownOperatorNamesOpNodeAndOpset() throws {
        var model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        model.graph.nodes[2].opType = "FancyAttention"
        let name = model.graph.nodes[2].name
        #expect { try InferenceSession(model: model) } throws: { error in
            let text = "\(error)"
            return (error as? ONNXError)?.code == .unsupportedOperator && text.contains("FancyAttention")
                && text.contains(name) && text.contains("opset 13")
        }
    }

    @Test func refusesWrongInputs() throws {
        let session = try Self.session("resnet_bn_op13")
        let wrongRank = Tensor(shape: [2, 3, 32], floats: [Float](repeating: 0, count: 192))
        #expect { try session.run(wrongRank) } throws: { "\($0)".contains("rank 4") }
        let wrongShape = Tensor(shape: [2, 3, 16, 16], floats: [Float](repeating: 0, count: 1536))
        #expect { try session.run(wrongShape) } throws: { "\($0)".contains("axis 2") }
        let ints = Tensor(shape: [1, 3, 32, 32], ints: [Int64](repeating: 0, count: 3072))
        #expect { try session.run(ints) } throws: { "\($0)".contains("int64") }
        var nan = [Float](repeating: 0, count: 3072)
        nan[17] = .nan
        #expect { try session.run(Tensor(shape: [1, 3, 32, 32], floats: nan)) } throws: { "\($0)".contains("index 17") }
    }

    @Test func refusesInconsistentWeights() throws {
        var model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        let conv = model.graph.nodes.first { $0.opType == "Conv" }!
        let index = model.graph.initializerIndex[conv.inputs[1]]!
        var w = model.graph.initializers[index].tensor!
        w = Tensor(shape: [w.shape[0], w.shape[1] + 1] + w.shape.dropFirst(2),
                   floats: [Float](repeating: 0, count: w.count / w.shape[1] * (w.shape[1] + 1)))
        model.graph.initializers[index].setTensor(w)
        let session = try InferenceSession(model: model)
        #expect { try session.run(try TestSupport.npy("resnet_bn_op13.input.npy")) } throws: { error in
            (error as? ONNXError)?.code == .shapeMismatch && "\(error)".contains(conv.name)
        }
    }

    @Test func memoryAwareBatching() throws {
        let session = try Self.session("mobilenetv2_bn_op13")
        // largestBatch plans without fusion (a slight over-estimate), so compare against unfused schedules.
        let one = try session.compiled(batchSize: 1, fused: false).peakActivationBytes
        let eight = try session.compiled(batchSize: 8, fused: false).peakActivationBytes
        #expect(try session.compiled(batchSize: 8).peakActivationBytes <= eight)
        #expect(eight == 8 * one)
        let weights = session.model.graph.initializers.reduce(0) { $0 + ($1.tensor?.count ?? 0) * 4 }
        let budget = 2 * weights + 20 * one + one / 2
        #expect(try session.largestBatch(fittingIn: budget) == 20)
        #expect(try session.largestBatch(fittingIn: 2 * weights) == nil)
    }

    @Test func inspectsMacsAndParameters() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        let summary = try ModelSummary(model: model)
        // Conv MACs by hand: output elements × (C/groups · kH · kW) for the first 3×3 conv on a 32×32 input.
        let first = summary.layers.first { $0.opType == "Conv" }!
        #expect(first.macs == first.outputShape.reduce(1, *) * 3 * 3 * 3)
        #expect(summary.macs == summary.layers.reduce(0) { $0 + $1.macs })
        #expect(summary.parameters == model.graph.initializers.reduce(0) { $0 + $1.shape.reduce(1, *) })
        #expect(summary.opCounts["Conv"] == model.graph.nodes.filter { $0.opType == "Conv" }.count)
    }
}
