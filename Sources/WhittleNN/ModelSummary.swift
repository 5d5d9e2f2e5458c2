import WhittleONNX
import WhittleTensor

/// What `model inspect` reports: inputs and outputs with shapes, op counts, parameters and MACs per layer.
public struct ModelSummary: Codable, Sendable {
    public struct Value: Codable, Sendable {
        public var name: String
        public var elementType: String
        /// Declared dimensions as text (numbers or symbols).
        public var shape: [String]
    }

    public struct Layer: Codable, Sendable {
        public var name: String
        public var opType: String
        public var outputShape: [Int]
        public var parameters: Int
        public var macs: Int
    }

    public var irVersion: Int64
    public var opset: Int64
    public var producer: String
    public var inputs: [Value]
    public var outputs: [Value]
    public var nodeCount: Int
    public var opCounts: [String: Int]
    public var parameters: Int
    public var parameterBytes: Int
    /// MACs for one sample (batch size 1), or for the given input shapes.
    public var macs: Int
    /// Layers that carry weights or MACs (Conv, Gemm, MatMul, BatchNormalization), in execution order.
    public var layers: [Layer]

    /// `inputShapes`: every runtime input's type and shape (for inputs with free dimensions besides the batch, such
    /// as a sequence length); the declared shapes at batch size 1 otherwise.
    public init(model: Model, inputShapes given: [String: (DataType, [Int])]? = nil) throws {
        try ModelCoding.checkOpset(model)
        let opset = model.defaultOpset!
        irVersion = model.irVersion
        self.opset = opset
        producer = [model.producerName, model.producerVersion].filter { !$0.isEmpty }.joined(separator: " ")
        func describe(_ info: ValueInfo) -> Value {
            let (type, shape) = info.tensorType ?? (.undefined, nil)
            return Value(name: info.name, elementType: type.description, shape: shape?.map(\.description) ?? [])
        }
        inputs = model.graph.runtimeInputs.map(describe)
        outputs = model.graph.outputs.map(describe)
        nodeCount = model.graph.nodes.count
        opCounts = model.graph.nodes.reduce(into: [:]) { $0[$1.opType, default: 0] += 1 }
        let inferred = try ShapeInference.infer(model.graph, opset: opset,
                                                inputs: try given ?? ShapeInference.inputShapes(model, batchSize: 1))
        let initializers = model.graph.initializerIndex
        var total = 0, bytes = 0
        for initializer in model.graph.initializers {
            total += initializer.shape.reduce(1, *)
            bytes += initializer.shape.reduce(1, *) * Self.elementBytes(initializer.elementType)
        }
        parameters = total
        parameterBytes = bytes
        macs = inferred.macs.reduce(0, +)
        layers = inferred.contexts.enumerated().compactMap { i, ctx in
            let node = ctx.node
            let params = node.inputs.dropFirst().reduce(0) { sum, name in
                guard let index = initializers[name] else { return sum }
                return sum + model.graph.initializers[index].shape.reduce(1, *)
            }
            guard inferred.macs[i] > 0 || params > 0, !inferred.folded[i] else { return nil }
            return Layer(name: node.name.isEmpty ? node.outputs.first ?? "" : node.name, opType: node.opType,
                         outputShape: inferred.outputs[i].first?.shape ?? [], parameters: params, macs: inferred.macs[i])
        }
    }

    public static func elementBytes(_ type: DataType) -> Int {
        switch type {
        case .int64, .double, .uint64, .complex64: 8
        case .float, .int32, .uint32: 4
        case .float16, .bfloat16, .int16, .uint16: 2
        case .complex128: 16
        default: 1
        }
    }
}

/// Classification metrics over logits `[N, classes]`.
public struct ClassificationMetrics: Codable, Sendable, Equatable {
    public var samples: Int
    public var correct: Int
    /// Sum over samples of −log softmax(logits)[label], accumulated in Double.
    public var crossEntropySum: Double

    public init() {
        samples = 0
        correct = 0
        crossEntropySum = 0
    }

    public var accuracy: Double { samples == 0 ? 0 : Double(correct) / Double(samples) }
    public var meanCrossEntropy: Double { samples == 0 ? 0 : crossEntropySum / Double(samples) }

    /// Adds a batch of logits `[N, classes]` (or `[N, classes, 1, 1]`) with labels `[N]`.
    public mutating func add(logits: Tensor, labels: ArraySlice<Int64>) throws {
        guard logits.rank >= 2, logits.shape[2...].allSatisfy({ $0 == 1 }) else {
            throw ONNXError(.shapeMismatch, "the model output has shape \(logits.shape); classification needs [N, classes]")
        }
        let n = logits.shape[0], classes = logits.shape[1]
        guard labels.count == n else {
            throw ONNXError(.invalidInput, "\(labels.count) labels for a batch of \(n) samples")
        }
        let values = logits.asFloats
        for (row, label) in zip(0..<n, labels) {
            guard label >= 0, label < classes else {
                throw ONNXError(.invalidInput, "label \(label) is out of range for \(classes) classes")
            }
            let z = values[(row * classes)..<((row + 1) * classes)]
            let peak = z.max()!
            let logSum = Double(peak) + log(z.reduce(0.0) { $0 + exp(Double($1 - peak)) })
            crossEntropySum += logSum - Double(z[z.startIndex + Int(label)])
            if z.firstIndex(of: peak)! - z.startIndex == Int(label) { correct += 1 }
            samples += 1
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
