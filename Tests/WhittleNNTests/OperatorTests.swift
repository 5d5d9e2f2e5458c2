import Testing
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// Single-operator graphs checked against hand-computed values.
@Suite struct OperatorTests {
    func run(_ node: Node, inputs: [(String, Tensor)], initializers: [(String, Tensor)] = [], opset: Int64 = 13,
             outputs: Int = 1) throws -> [Tensor] {
        let graph = Graph(
            name: "t", nodes: [node],
            inputs: inputs.map { ValueInfo(name: $0.0, elementType: $0.1.dtype, shape: $0.1.shape.map { .value($0) }) },
            outputs: node.outputs.prefix(outputs).map { ValueInfo(name: $0, elementType: .float, shape: nil) },
            initializers: initializers.map { Initializer(name: $0.0, tensor: $0.1) })
        var values: [String: Tensor] = [:]
        for (name, t) in inputs { values[name] = t }
        let compiled = try CompiledGraph(graph: graph, opset: opset,
                                         inputs: Dictionary(uniqueKeysWithValues: inputs.map { ($0.0, ($0.1.dtype, $0.1.shape)) }))
        let result = try compiled.run(values)
        return node.outputs.prefix(outputs).map { result[$0]! }
    }

    /// The GEMM + col2im transposed convolution against its reference twin (the scatter loop), over 1-D and 2-D
    /// geometries with groups, strides, dilations, asymmetric pads and output padding.
    @Test func transposedConvolutionGemmMatchesItsReference() throws {
        let cases: [(x: [Int], w: [Int], attributes: [Attribute])] = [
            ([2, 4, 5, 6], [4, 3, 3, 3], [Attribute("strides", .ints([2, 2])), Attribute("pads", .ints([1, 0, 0, 1]))]),
            ([1, 6, 4, 4], [6, 2, 3, 2], [Attribute("group", .int(3)), Attribute("strides", .ints([3, 2])),
                                          Attribute("dilations", .ints([2, 1])), Attribute("output_padding", .ints([1, 1]))]),
            ([2, 3, 7], [3, 5, 4], [Attribute("strides", .ints([2])), Attribute("pads", .ints([1, 2]))]),
        ]
        for (k, c) in cases.enumerated() {
            let x = Tensor(shape: c.x, floats: TestSupport.randomFloats(c.x.reduce(1, *), seed: UInt64(80 + k)))
            let w = Tensor(shape: c.w, floats: TestSupport.randomFloats(c.w.reduce(1, *), seed: UInt64(90 + k)))
            let outChannels = c.w[1] * Int((c.attributes.first { $0.name == "group" }?.value.int) ?? 1)
            let b = Tensor(shape: [outChannels], floats: TestSupport.randomFloats(outChannels, seed: UInt64(100 + k)))
            let node = Node(opType: "ConvTranspose", name: "t", inputs: ["x", "w", "b"], outputs: ["y"], attributes: c.attributes)
            var outputs: [Tensor] = []
            for fast in [true, false] {
                let graph = Graph(name: "t", nodes: [node], inputs: [ValueInfo(name: "x", elementType: .float, shape: c.x.map { .value($0) })],
                                  outputs: [ValueInfo(name: "y", elementType: .float, shape: nil)],
                                  initializers: [Initializer(name: "w", tensor: w), Initializer(name: "b", tensor: b)])
                let compiled = try CompiledGraph(graph: graph, opset: 17, inputs: ["x": (.float, c.x)], options: KernelOptions(fast: fast))
                outputs.append(try compiled.run(["x": x])["y"]!)
            }
            #expect(outputs[0].shape == outputs[1].shape)
            #expect(TestSupport.relativeError(outputs[0].floats, outputs[1].floats) < 1e-5, "case \(k)")
        }
    }

    /// Malformed 4-bit weights are refused with what is wrong: MatMulNBits with other bit widths, block sizes that
    /// are not powers of two, a packed B of the wrong shape, too few scales; blocked DequantizeLinear with scales of
    /// the wrong shape or below opset 21. A well-formed MatMulNBits equals A · dequantize(B)ᵀ.
    @Test func malformedFourBitWeightsAreRefused() throws {
        let a = Tensor(shape: [2, 32], floats: TestSupport.randomFloats(64, seed: 3))
        let (codes, scales) = try BlockwiseInt4.quantize(rows: TestSupport.randomFloats(3 * 32, seed: 4), n: 3, k: 32, blockSize: 16)
        let packed = Tensor(shape: [3, 2, 8], ints: BlockwiseInt4.pack(codes: codes, n: 3, k: 32, blockSize: 16).map { Int64($0) }, dtype: .uint8)
        func nbits(_ attributes: [Attribute], b: Tensor = packed, s: Tensor = Tensor(shape: [6], floats: scales)) throws -> Tensor {
            var node = Node(opType: "MatMulNBits", name: "q", inputs: ["a", "b", "s"], outputs: ["y"], attributes: attributes)
            node.domain = "com.microsoft"
            return try run(node, inputs: [("a", a)], initializers: [("b", b), ("s", s)], opset: 17)[0]
        }
        let good: [Attribute] = [Attribute("K", .int(32)), Attribute("N", .int(3)), Attribute("bits", .int(4)), Attribute("block_size", .int(16))]
        let y = try nbits(good)
        let w = BlockwiseInt4.dequantize(packed: packed.ints, scales: scales, zeroPoints: nil, n: 3, k: 32, blockSize: 16)
        let expected = Kernels.gemmReference(transA: false, transB: true, m: 2, n: 3, k: 32, a: a.floats, b: w, c: [Float](repeating: 0, count: 6))
        #expect(y.shape == [2, 3] && TestSupport.relativeError(y.floats, expected) < 1e-5)
        let bad: [([Attribute], Tensor?, Tensor?, String)] = [
            ([Attribute("K", .int(32)), Attribute("N", .int(3)), Attribute("bits", .int(8)), Attribute("block_size", .int(16))], nil, nil, "4-bit"),
            ([Attribute("K", .int(32)), Attribute("N", .int(3)), Attribute("block_size", .int(24))], nil, nil, "power of two"),
            (good, Tensor(shape: [3, 4, 4], ints: [Int64](repeating: 0, count: 48), dtype: .uint8), nil, "B must be uint8"),
            (good, nil, Tensor(shape: [5], floats: Array(scales.prefix(5))), "scales must hold"),
            ([Attribute("K", .int(16)), Attribute("N", .int(3)), Attribute("block_size", .int(16))], nil, nil, "must end in K"),
        ]
        for (attributes, b, s, needle) in bad {
            #expect { _ = try nbits(attributes, b: b ?? packed, s: s ?? Tensor(shape: [6], floats: scales)) } throws: { "\($0)".contains(needle) }
        }
        let q = Tensor(shape: [4, 2], ints: [1, -2, 3, -4, 5, -6, 7, -8], dtype: .int4)
        func blocked(_ scale: Tensor, opset: Int64) throws -> Tensor {
            try run(Node(opType: "DequantizeLinear", name: "dq", inputs: ["q", "s"], outputs: ["y"],
                         attributes: [Attribute("axis", .int(0)), Attribute("block_size", .int(2))]),
                    inputs: [("q", q)], initializers: [("s", scale)], opset: opset)[0]
        }
        #expect(try blocked(Tensor(shape: [2, 2], floats: [1, 2, -1, 0.5]), opset: 21).floats == [1, -4, 3, -8, -5, -3, -7, -4])
        #expect { _ = try blocked(Tensor(shape: [4, 1], floats: [1, 1, 1, 1]), opset: 21) } throws: { "\($0)".contains("blocked scale has shape") }
        #expect { _ = try blocked(Tensor(shape: [2, 2], floats: [1, 2, 1, 2]), opset: 13) } throws: { "\($0)".contains("opset 21") }
        #expect { _ = try blocked(Tensor(shape: [2, 2], floats: [1, 0, 1, 2]), opset: 21) } throws: { "\($0)".contains("non-zero") }
    }

    @Test func quantizeRoundsHalfToEvenAndSaturates() throws {
        let x = Tensor(shape: [6], floats: [0.5, 1.5, 2.5, -0.5, 1000, -1000])
        let node = Node(opType: "QuantizeLinear", name: "q", inputs: ["x", "s", "z"], outputs: ["y"])
        let y = try run(node, inputs: [("x", x)], initializers: [("s", .scalar(1)),
            ("z", Tensor(shape: [], ints: [0], dtype: .int8))])
        #expect(y[0].ints == [0, 2, 2, 0, 127, -128])
        #expect(y[0].dtype == .int8)
    }

    @Test func int4NeedsOpset21() throws {
        let x = Tensor(shape: [4], floats: [-9, -2.4, 3.5, 100])
        let node = Node(opType: "QuantizeLinear", name: "q4", inputs: ["x", "s", "z"], outputs: ["y"])
        let zero = Tensor(shape: [], ints: [0], dtype: .int4)
        let y = try run(node, inputs: [("x", x)], initializers: [("s", .scalar(1)), ("z", zero)], opset: 21)
        #expect(y[0].ints == [-8, -2, 4, 7])
        #expect(y[0].dtype == .int4)
        #expect { try run(node, inputs: [("x", x)], initializers: [("s", .scalar(1)), ("z", zero)], opset: 13) }
            throws: { "\($0)".contains("opset 21") }
    }

    @Test func perAxisDequantize() throws {
        let q = Tensor(shape: [2, 2], ints: [10, 20, 30, 40], dtype: .uint8)
        let node = Node(opType: "DequantizeLinear", name: "dq", inputs: ["q", "s", "z"], outputs: ["y"],
                        attributes: [Attribute("axis", .int(0))])
        let y = try run(node, inputs: [("q", q)], initializers: [("s", Tensor(shape: [2], floats: [0.5, 2])),
            ("z", Tensor(shape: [2], ints: [10, 0], dtype: .uint8))])
        #expect(y[0].floats == [0, 5, 60, 80])
    }

    @Test func resizeNearestAndLinear() throws {
        let x = Tensor(shape: [1, 1, 2, 2], floats: [1, 2, 3, 4])
        let scales = Tensor(shape: [4], floats: [1, 1, 2, 2])
        let nearest = Node(opType: "Resize", name: "r", inputs: ["x", "", "scales"], outputs: ["y"],
                           attributes: [Attribute("mode", .string(Array("nearest".utf8)))])
        let y = try run(nearest, inputs: [("x", x)], initializers: [("scales", scales)])
        #expect(y[0].floats == [1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4])
        let linear = Node(opType: "Resize", name: "r", inputs: ["x", "", "scales"], outputs: ["y"],
                          attributes: [Attribute("mode", .string(Array("linear".utf8)))])
        let z = try run(linear, inputs: [("x", x)], initializers: [("scales", scales)])
        // half_pixel: output row 0 maps to source -0.25 (clamped to 0), row 1 to 0.25, row 2 to 0.75, row 3 to 1.25.
        #expect(Array(z[0].floats[0..<4]) == [1, 1.25, 1.75, 2])
        #expect(Array(z[0].floats[4..<8]) == [1.5, 1.75, 2.25, 2.5])
    }

    @Test func padModes() throws {
        let x = Tensor(shape: [1, 3], floats: [1, 2, 3])
        let pads = Tensor(shape: [4], ints: [0, 2, 0, 1], dtype: .int64)
        for (mode, expected) in [("constant", [Float]([9, 9, 1, 2, 3, 9])), ("reflect", [3, 2, 1, 2, 3, 2]),
                                 ("edge", [1, 1, 1, 2, 3, 3])] {
            let node = Node(opType: "Pad", name: "p", inputs: ["x", "pads", "v"], outputs: ["y"],
                            attributes: [Attribute("mode", .string(Array(mode.utf8)))])
            let y = try run(node, inputs: [("x", x)], initializers: [("pads", pads), ("v", .scalar(9))])
            #expect(y[0].floats == expected, "mode \(mode)")
        }
    }

    @Test func sliceGatherConcatTranspose() throws {
        let x = Tensor(shape: [2, 3], floats: [1, 2, 3, 4, 5, 6])
        let slice = Node(opType: "Slice", name: "s", inputs: ["x", "st", "en", "ax", "sp"], outputs: ["y"])
        let y = try run(slice, inputs: [("x", x)], initializers: [
            ("st", Tensor(shape: [1], ints: [-1], dtype: .int64)), ("en", Tensor(shape: [1], ints: [-100], dtype: .int64)),
            ("ax", Tensor(shape: [1], ints: [1], dtype: .int64)), ("sp", Tensor(shape: [1], ints: [-2], dtype: .int64))])
        #expect(y[0].shape == [2, 2])
        #expect(y[0].floats == [3, 1, 6, 4])
        let gather = Node(opType: "Gather", name: "g", inputs: ["x", "i"], outputs: ["y"], attributes: [Attribute("axis", .int(1))])
        let g = try run(gather, inputs: [("x", x)], initializers: [("i", Tensor(shape: [2], ints: [2, -3], dtype: .int64))])
        #expect(g[0].floats == [3, 1, 6, 4])
        let concat = Node(opType: "Concat", name: "c", inputs: ["x", "x"], outputs: ["y"], attributes: [Attribute("axis", .int(1))])
        #expect(try run(concat, inputs: [("x", x)])[0].floats == [1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6])
        let transpose = Node(opType: "Transpose", name: "t", inputs: ["x"], outputs: ["y"])
        #expect(try run(transpose, inputs: [("x", x)])[0].floats == [1, 4, 2, 5, 3, 6])
    }

    @Test func maxPoolCeilModeAndAutoPad() throws {
        let x = Tensor(shape: [1, 1, 3, 3], floats: [1, 2, 3, 4, 5, 6, 7, 8, 9])
        let ceil = Node(opType: "MaxPool", name: "m", inputs: ["x"], outputs: ["y"], attributes: [
            Attribute("kernel_shape", .ints([2, 2])), Attribute("strides", .ints([2, 2])), Attribute("ceil_mode", .int(1))])
        let y = try run(ceil, inputs: [("x", x)])
        #expect(y[0].shape == [1, 1, 2, 2])
        #expect(y[0].floats == [5, 6, 8, 9])
        let same = Node(opType: "AveragePool", name: "a", inputs: ["x"], outputs: ["y"], attributes: [
            Attribute("kernel_shape", .ints([2, 2])), Attribute("auto_pad", .string(Array("SAME_UPPER".utf8)))])
        let z = try run(same, inputs: [("x", x)])
        #expect(z[0].shape == [1, 1, 3, 3])
        #expect(z[0].floats == [3, 4, 4.5, 6, 7, 7.5, 7.5, 8.5, 9])
    }

    @Test func gemmGeneralForm() throws {
        let a = Tensor(shape: [2, 2], floats: [1, 2, 3, 4])
        let node = Node(opType: "Gemm", name: "g", inputs: ["a", "b", "c"], outputs: ["y"], attributes: [
            Attribute("alpha", .float(2)), Attribute("beta", .float(0.5)), Attribute("transA", .int(1))])
        let y = try run(node, inputs: [("a", a)], initializers: [("b", Tensor(shape: [2, 2], floats: [1, 0, 0, 1])),
                                                                  ("c", Tensor(shape: [1, 2], floats: [10, 20]))])
        // 2 · Aᵀ · I + 0.5 · C
        #expect(y[0].floats == [7, 16, 9, 18])
    }

    @Test func errorsNameTheNode() {
        let x = Tensor(shape: [1, 3], floats: [1, 2, 3])
        let node = Node(opType: "Reshape", name: "bad_reshape", inputs: ["x", "shape"], outputs: ["y"])
        #expect { try run(node, inputs: [("x", x)], initializers: [("shape", Tensor(shape: [1], ints: [4], dtype: .int64))]) }
            throws: { "\($0)".contains("Reshape node 'bad_reshape'") }
    }
}
