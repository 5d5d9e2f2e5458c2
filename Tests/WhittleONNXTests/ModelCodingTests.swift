import Foundation
import Testing
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

@Suite struct ModelCodingTests {
    static let fixtures = ["resnet_bn_op13.onnx", "resnet_folded_op17.onnx", "mobilenetv2_bn_op13.onnx",
                           "mobilenetv2_folded_op17.onnx", "smallcnn_dynamo.onnx", "shapechain_op11.onnx",
                           "opzoo_a_op13.onnx", "opzoo_b_op17.onnx", "handbuilt_dropout_identity_op13.onnx"]

    /// Reading then writing an unchanged model reproduces the file byte for byte.
    @Test(arguments: fixtures)
    func roundTripIsByteIdentical(_ name: String) throws {
        let bytes = try TestSupport.fixtureBytes(name)
        let model = try ModelCoding.read(bytes)
        #expect(try ModelCoding.write(model) == bytes)
    }

    /// Edited models keep names, opset imports, metadata and doc strings.
    @Test func editedModelKeepsMetadata() throws {
        var model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        model.docString = "edited by a test"
        model.metadata.append((key: "whittle.test", value: "yes"))
        let firstConv = model.graph.nodes.firstIndex { $0.opType == "Conv" }!
        model.graph.nodes[firstConv].docString = "first conv"
        let index = model.graph.initializerIndex[model.graph.nodes[firstConv].inputs[1]]!
        var weights = model.graph.initializers[index].tensor!
        weights.floats[0] = 123
        model.graph.initializers[index].setTensor(weights)

        let again = try ModelCoding.read(try ModelCoding.write(model))
        #expect(again.docString == "edited by a test")
        #expect(again.metadata.last?.key == "whittle.test")
        #expect(again.opsetImports == model.opsetImports)
        #expect(again.producerName == "pytorch")
        #expect(again.graph.nodes.map(\.name) == model.graph.nodes.map(\.name))
        #expect(again.graph.nodes[firstConv].docString == "first conv")
        #expect(again.graph.initializers[index].tensor?.floats[0] == 123)
        #expect(again.graph.inputs.map(\.name) == model.graph.inputs.map(\.name))
    }

    @Test func readsExternalData() throws {
        let folder = TestSupport.fixtures.appendingPathComponent("external")
        let bytes = try TestSupport.bytes(folder.appendingPathComponent("resnet_ext.onnx"))
        let model = try ModelCoding.read(bytes) { location in
            try TestSupport.bytes(folder.appendingPathComponent(location))
        }
        let reference = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        for (a, b) in zip(model.graph.initializers, reference.graph.initializers) {
            #expect(a.name == b.name)
            #expect(a.tensor == b.tensor)
        }
        // Without a loader the error says where the data lives.
        #expect { try ModelCoding.read(bytes) } throws: { ($0 as? ONNXError)?.code == .externalData }
    }

    @Test func refusesExternalDataOutsideTheModelFolder() throws {
        var tensor = Onnx_TensorProto()
        tensor.name = "w"
        tensor.dims = [1]
        tensor.dataType = 1
        tensor.dataLocation = .external
        var location = Onnx_StringStringEntryProto()
        location.key = "location"
        location.value = "../../etc/passwd"
        tensor.externalData = [location]
        let bytes = modelBytes(initializers: [tensor])
        #expect { try ModelCoding.read(bytes) { _ in [] } } throws: { error in
            (error as? ONNXError)?.code == .externalData && "\(error)".contains("outside")
        }
    }

    @Test func decodesTypedFieldsAndPackedInt4() throws {
        var t = Onnx_TensorProto()
        t.dims = [2, 2]
        t.dataType = 1
        t.floatData = [1, 2, 3, 4]
        #expect(try TensorCoding.decode(t).floats == [1, 2, 3, 4])

        var q = Onnx_TensorProto()
        q.dims = [3]
        q.dataType = DataType.int4.rawValue
        q.rawData = Data([0x8F, 0x07])  // -1 (0xF), -8 (0x8), 7
        #expect(try TensorCoding.decode(q).ints == [-1, -8, 7])
        let encoded = TensorCoding.encode(try TensorCoding.decode(q), name: "")
        #expect([UInt8](encoded.rawData) == [0x8F, 0x07])

        var h = Onnx_TensorProto()
        h.dims = [2]
        h.dataType = DataType.float16.rawValue
        h.int32Data = [0x3C00, 0xC000]  // 1.0, -2.0
        #expect(try TensorCoding.decode(h).floats == [1, -2])
    }

    /// Quantized codes are kept as their encoded bytes and decoded on access, unchanged; a value its type cannot hold
    /// keeps the initializer decoded, so it is not silently truncated.
    @Test func quantizedInitializersRoundTripThroughTheirBytes() throws {
        for (type, values) in [(DataType.int8, [Int64(-128), -1, 0, 127]), (.uint8, [0, 1, 200, 255]), (.int4, [-8, -1, 0, 7]), (.uint4, [0, 3, 9, 15])] {
            let i = Initializer(name: "w", tensor: Tensor(shape: [2, 2], ints: values, dtype: type))
            #expect(i.tensor?.ints == values && i.tensor?.dtype == type && i.tensor?.shape == [2, 2], "\(type)")
        }
        let wide = Initializer(name: "z", tensor: Tensor(shape: [], ints: [256], dtype: .uint8))
        #expect(wide.tensor?.ints == [256])
    }

    @Test func refusesTensorsWhoseDataDoesNotMatchTheirShape() {
        var t = Onnx_TensorProto()
        t.name = "w"
        t.dims = [2, 3]
        t.dataType = 1
        t.rawData = Data(count: 20)
        #expect { try TensorCoding.decode(t) } throws: { error in
            (error as? ONNXError)?.code == .malformedTensor && "\(error)".contains("'w'")
        }
        t.rawData = Data()
        t.dims = [-1]
        #expect(throws: ONNXError.self) { try TensorCoding.decode(t) }
    }

    /// int32_data carries int8, uint8, int16 and uint16 values; one the element type cannot hold is refused, not
    /// truncated (a uint8 zero point 300 would otherwise read as 44).
    @Test(arguments: [(DataType.uint8, Int32(300)), (.uint8, -1), (.int8, 128), (.int8, -129), (.int16, 40_000), (.uint16, 70_000)])
    func refusesInt32DataOutsideTheElementType(_ type: DataType, _ value: Int32) {
        var t = Onnx_TensorProto()
        t.name = "zero_point"
        t.dataType = type.rawValue
        t.int32Data = [value]
        #expect { try TensorCoding.decode(t) } throws: { error in
            (error as? ONNXError)?.code == .malformedTensor && "\(error)".contains("\(value)") && "\(error)".contains("'zero_point'")
        }
        t.int32Data = [type == .int8 || type == .int16 ? -5 : 5]
        #expect((try? TensorCoding.decode(t).ints) == [Int64(t.int32Data[0])])
    }

    @Test(arguments: [
        ("empty", [UInt8]()),
        ("garbage", Array("this is not a protobuf at all, just text".utf8)),
        ("random", TestSupport.randomFloats(64, seed: 3).map { UInt8(truncatingIfNeeded: Int($0 * 1000)) }),
    ])
    func refusesGarbage(_ name: String, _ bytes: [UInt8]) {
        #expect { try ModelCoding.read(bytes) } throws: { ($0 as? ONNXError)?.code == .malformedModel }
    }

    @Test func refusesTruncatedModels() throws {
        let bytes = try TestSupport.fixtureBytes("resnet_bn_op13.onnx")
        for fraction in [0.1, 0.5, 0.9, 0.999] {
            let cut = Array(bytes.prefix(Int(Double(bytes.count) * fraction)))
            #expect(throws: ONNXError.self) { try ModelCoding.read(cut) }
        }
    }

    @Test func refusesUnsupportedOpsets() throws {
        var model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        model.opsetImports = [OpsetImport(domain: "", version: 9)]
        #expect { try ModelCoding.checkOpset(model) } throws: { "\($0)".contains("opset 9") }
    }

    /// Bounded fuzzing of the protobuf reader: mutated fixtures decode or throw, never crash.
    @Test func fuzzedModelsNeverCrash() throws {
        let valid = try TestSupport.fixtureBytes("shapechain_op11.onnx")
        var state: UInt64 = 99
        func next() -> Int {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Int(state >> 33)
        }
        for _ in 0..<400 {
            var bytes = valid
            for _ in 0..<(1 + next() % 8) {
                bytes[next() % bytes.count] = UInt8(truncatingIfNeeded: next())
            }
            if next() % 4 == 0 { bytes.removeLast(next() % bytes.count) }
            _ = try? ModelCoding.read(bytes)
        }
    }

    func modelBytes(initializers: [Onnx_TensorProto]) -> [UInt8] {
        var graph = Onnx_GraphProto()
        graph.name = "g"
        graph.initializer = initializers
        var opset = Onnx_OperatorSetIdProto()
        opset.version = 13
        var model = Onnx_ModelProto()
        model.irVersion = 8
        model.opsetImport = [opset]
        model.graph = graph
        return try! model.serializedBytes()
    }
}
