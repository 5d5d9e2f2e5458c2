import Foundation
import Testing
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// One node per case (scripts/make_op_fixtures.py): every output equals onnxruntime's, with the fast kernels and
/// with the reference kernels. Floats within `onnxruntimeTolerance` of the output's largest magnitude; integers,
/// booleans, shapes and element types exactly.
@Suite struct OperatorParityTests {
    static let onnxruntimeTolerance: Float = 1e-5
    static let folder = TestSupport.root.appendingPathComponent("Tests/Fixtures/ops")

    static let cases: [String] = {
        guard let data = try? Data(contentsOf: folder.appendingPathComponent("MANIFEST.json")),
              let manifest = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let cases = manifest["cases"] as? [[String: Any]] else { return [] }
        return cases.compactMap { $0["name"] as? String }
    }()

    static func arrays(_ file: String) throws -> [String: Tensor] {
        Dictionary(uniqueKeysWithValues: try NPZ.decode(try TestSupport.bytes(folder.appendingPathComponent(file))).map { ($0.name, $0.tensor) })
    }

    @Test func everyCaseIsListed() { #expect(Self.cases.count >= 70) }

    @Test(arguments: cases, [true, false])
    func matchesOnnxRuntime(_ name: String, fast: Bool) throws {
        let model = try ModelCoding.read(try TestSupport.bytes(Self.folder.appendingPathComponent("\(name).onnx")))
        let session = try InferenceSession(model: model, options: KernelOptions(fast: fast))
        let outputs = try session.run(inputs: try Self.arrays("\(name).inputs.npz"))
        let expected = try Self.arrays("\(name).outputs.npz")
        #expect(Set(outputs.keys) == Set(expected.keys), "\(name)")
        for (key, want) in expected {
            let got = try #require(outputs[key], "\(name): no output \(key)")
            #expect(got.shape == want.shape, "\(name).\(key): shape \(got.shape), onnxruntime \(want.shape)")
            #expect(got.dtype == want.dtype, "\(name).\(key): \(got.dtype), onnxruntime \(want.dtype)")
            guard got.shape == want.shape else { continue }
            if want.dtype.isInteger {
                #expect(got.ints == want.ints, "\(name).\(key)")
            } else {
                let error = TestSupport.relativeError(got.floats, want.floats)
                #expect(error < Self.onnxruntimeTolerance, "\(name).\(key): relative error \(error)")
            }
        }
    }

    /// An Einsum whose work (the product of every index's size) is unbounded by its operands is refused, naming it.
    @Test func hostileEinsumIsRefused() throws {
        // Shapes only: shape inference refuses the node before anything is allocated.
        func infer(_ equation: String, _ a: [Int], _ b: [Int]) throws -> InferredGraph {
            let graph = Graph(name: "einsum", nodes: [Node(opType: "Einsum", name: "e", inputs: ["a", "b"], outputs: ["y"],
                                                           attributes: [Attribute("equation", .string(Array(equation.utf8)))])],
                              inputs: [ValueInfo(name: "a", elementType: .float, shape: a.map { .value($0) }),
                                       ValueInfo(name: "b", elementType: .float, shape: b.map { .value($0) })],
                              outputs: [ValueInfo(name: "y", elementType: .float, shape: nil)], initializers: [])
            return try ShapeInference.infer(graph, opset: 17, inputs: ["a": (.float, a), "b": (.float, b)])
        }
        #expect { _ = try infer("ik,jk->ij", [1 << 15, 1 << 15], [1 << 15, 1 << 15]) }
            throws: { "\($0)".contains("multiply-adds") && "\($0)".contains("Einsum") }
        #expect { _ = try infer("ij,jk", [3, 4], [5, 6]) } throws: { "\($0)".contains("index 'j' has sizes 4 and 5") }
        #expect(try infer("ij,jk->ik", [2, 3], [3, 4]).values["y"]?.shape == [2, 4])
    }

    /// Range's length must be known before running, so it is folded from constants: hand-computed cases.
    @Test func rangeIsFoldedFromConstants() throws {
        func range(_ start: Tensor, _ limit: Tensor, _ delta: Tensor) throws -> Tensor? {
            let graph = Graph(name: "range", nodes: [Node(opType: "Range", name: "r", inputs: ["s", "l", "d"], outputs: ["y"])],
                              inputs: [], outputs: [ValueInfo(name: "y", elementType: start.dtype, shape: nil)],
                              initializers: [Initializer(name: "s", tensor: start), Initializer(name: "l", tensor: limit),
                                             Initializer(name: "d", tensor: delta)])
            return try ShapeInference.infer(graph, opset: 17, inputs: [:]).values["y"]?.constant
        }
        let ints = try #require(try range(Tensor(shape: [], ints: [2]), Tensor(shape: [], ints: [17]), Tensor(shape: [], ints: [3])))
        #expect(ints.ints == [2, 5, 8, 11, 14] && ints.dtype == .int64)
        let floats = try #require(try range(.scalar(1), .scalar(-2), .scalar(-0.75)))
        #expect(floats.floats == [1, 0.25, -0.5, -1.25])
        #expect(try range(Tensor(shape: [], ints: [5]), Tensor(shape: [], ints: [1]), Tensor(shape: [], ints: [1]))?.count == 0)
        #expect(throws: ONNXError.self) { try range(.scalar(0), .scalar(1), .scalar(0)) }
        #expect(throws: ONNXError.self) { try range(.scalar(0), .scalar(3e38), .scalar(1e-30)) }
    }
}
