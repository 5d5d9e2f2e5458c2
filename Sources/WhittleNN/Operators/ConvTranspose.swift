import WhittleONNX
import WhittleTensor

/// ConvTranspose(X, W[, B]; strides, pads, dilations, group, output_padding, output_shape, auto_pad) in 1-D and 2-D:
/// the adjoint of Conv, as segmentation decoders and upsampling heads use it. W is `[C_in, C_out/group, k…]`.
/// Output size per axis: `stride·(in − 1) + output_padding + (k − 1)·dilation + 1 − pad_begin − pad_end`, or
/// `output_shape` with the total padding derived from it (SAME_UPPER puts the odd pixel at the end, as onnxruntime).
/// Scatter form: every input pixel adds its weighted kernel into the output.
extension Operators {
    struct TransposedGeometry {
        var groups: Int
        var kernel: [Int], strides: [Int], dilations: [Int]
        /// Begin pads, then end pads.
        var pads: [Int]
        var input: [Int], output: [Int]
        var inChannels: Int, outChannels: Int

        /// Input, output, kernel, stride, dilation and begin-pad sizes as height and width (1-D: height 1, no pad).
        var planar: (ih: Int, iw: Int, oh: Int, ow: Int, kh: Int, kw: Int, sh: Int, sw: Int, dh: Int, dw: Int, ph: Int, pw: Int) {
            guard input.count == 2 else {
                return (1, input[0], 1, output[0], 1, kernel[0], 1, strides[0], 1, dilations[0], 0, pads[0])
            }
            return (input[0], input[1], output[0], output[1], kernel[0], kernel[1], strides[0], strides[1],
                    dilations[0], dilations[1], pads[0], pads[1])
        }
    }

    static func convTransposeGeometry(_ ctx: NodeContext) throws -> TransposedGeometry {
        let x = try ctx.floatInput(0), w = try ctx.floatInput(1)
        guard x.rank == 3 || x.rank == 4, w.rank == x.rank else {
            throw ctx.error(.shapeMismatch, "input X \(x.shape) and weight W \(w.shape): Whittle supports 1-D and 2-D transposed convolutions")
        }
        let n = x.rank - 2
        let groups = Int(try ctx.int("group", default: 1))
        guard groups >= 1, x.shape[1] % groups == 0, w.shape[0] == x.shape[1] else {
            throw ctx.error(.shapeMismatch, "weight W \(w.shape) must have X's \(x.shape[1]) input channels first, divisible by group \(groups)")
        }
        let outChannels = w.shape[1] * groups
        if let b = ctx.optionalInput(2), b.shape != [outChannels] {
            throw ctx.error(.shapeMismatch, "bias B has shape \(b.shape), expected [\(outChannels)]")
        }
        let kernel = Array(w.shape[2...])
        if let k = try ctx.ints("kernel_shape"), k != kernel {
            throw ctx.error(.shapeMismatch, "kernel_shape \(k) does not match weight W \(w.shape)")
        }
        let strides = try ctx.checkedSizes(try ctx.ints("strides") ?? [Int](repeating: 1, count: n), "strides")
        let dilations = try ctx.checkedSizes(try ctx.ints("dilations") ?? [Int](repeating: 1, count: n), "dilations")
        let outputPadding = try ctx.checkedSizes(try ctx.ints("output_padding") ?? [Int](repeating: 0, count: n), "output_padding")
        var pads = try ctx.checkedSizes(try ctx.ints("pads") ?? [Int](repeating: 0, count: 2 * n), "pads")
        let counted = strides.count == n && dilations.count == n && outputPadding.count == n && pads.count == 2 * n
        let positive = strides.allSatisfy { $0 >= 1 } && dilations.allSatisfy { $0 >= 1 } && pads.allSatisfy { $0 >= 0 }
        var paddingFits = counted
        if counted { for i in 0..<n where outputPadding[i] < 0 || outputPadding[i] >= max(strides[i], dilations[i]) { paddingFits = false } }
        guard counted, positive, paddingFits else {
            throw ctx.error(.invalidAttribute, "strides \(strides), dilations \(dilations), pads \(pads) or output_padding \(outputPadding) are invalid")
        }
        let input = Array(x.shape[2...])
        var full: [Int] = []
        for i in 0..<n {
            let stretched: Int = strides[i] * (input[i] - 1) + outputPadding[i]
            let span: Int = (kernel[i] - 1) * dilations[i] + 1
            full.append(stretched + span)
        }
        var output: [Int]
        let autoPad = try ctx.string("auto_pad", default: "NOTSET")
        if let shape = try ctx.ints("output_shape") {
            let spatial = shape.count == n ? shape : Array(shape.suffix(n))
            guard spatial.count == n, (0..<n).allSatisfy({ spatial[$0] >= 1 && spatial[$0] <= full[$0] }) else {
                throw ctx.error(.invalidAttribute, "output_shape \(shape) cannot be reached from input \(input)")
            }
            output = spatial
            for i in 0..<n {
                // As the ONNX specification gives it: the larger half at the end only for SAME_UPPER.
                let total: Int = full[i] - spatial[i]
                let begin: Int = autoPad == "SAME_UPPER" ? total / 2 : total - total / 2
                pads[i] = begin
                pads[i + n] = total - begin
            }
        } else if autoPad == "SAME_UPPER" || autoPad == "SAME_LOWER" {
            output = (0..<n).map { input[$0] * strides[$0] }
            for i in 0..<n {
                let total: Int = Swift.max(0, full[i] - output[i])
                let begin: Int = autoPad == "SAME_UPPER" ? total / 2 : total - total / 2
                pads[i] = begin
                pads[i + n] = total - begin
            }
        } else {
            output = []
            for i in 0..<n {
                let size: Int = full[i] - pads[i] - pads[i + n]
                output.append(size)
            }
            guard output.allSatisfy({ $0 >= 1 }) else {
                throw ctx.error(.shapeMismatch, "pads \(pads) leave no output for input \(input)")
            }
        }
        try ctx.checkedShape([x.shape[0], outChannels] + output, "output")
        return TransposedGeometry(groups: groups, kernel: kernel, strides: strides, dilations: dilations, pads: pads,
                                  input: input, output: output, inChannels: x.shape[1], outChannels: outChannels)
    }

    static func registerConvTranspose(_ r: inout [String: OperatorDefinition]) {
        r["ConvTranspose"] = OperatorDefinition(infer: { ctx in
            let g = try convTransposeGeometry(ctx)
            return [ValueMeta(dtype: try ctx.input(0).dtype, shape: [try ctx.input(0).shape[0], g.outChannels] + g.output)]
        }, compile: { ctx, outputs, options in
            let g = try convTransposeGeometry(ctx)
            return ClosureKernel { inputs in
                let x = inputs[0]!, w = inputs[1]!, bias = inputs.count > 2 ? inputs[2]?.floats : nil
                let y = options.fast ? try Kernels.convTransposeGemm(g, batch: x.shape[0], x: x.floats, w: w.floats, bias: bias)
                    : Kernels.convTransposeReference(g, batch: x.shape[0], x: x.floats, w: w.floats, bias: bias)
                return [Tensor(shape: outputs[0].shape, floats: y)]
            }
        }, macs: { ctx, outputs in
            guard let x = ctx.optionalInput(0), let w = ctx.optionalInput(1) else { return 0 }
            return x.count * w.shape[1...].reduce(1, *)
        })
    }
}

extension Kernels {
    /// Visits every (input element, weight element, output element) triple of a transposed convolution over
    /// 1-D or 2-D spatial axes (1-D as height 1): `body(xIndex, wIndex, yIndex)`.
    static func forEachTransposedTap(_ g: Operators.TransposedGeometry, batch: Int, _ body: (Int, Int, Int) -> Void) {
        let (ih, iw, oh, ow, kh, kw, sh, sw, dh, dw, ph, pw) = g.planar
        let perGroupIn = g.inChannels / g.groups, perGroupOut = g.outChannels / g.groups
        for n in 0..<batch {
            for ic in 0..<g.inChannels {
                let group = ic / perGroupIn
                for y in 0..<ih {
                    for x in 0..<iw {
                        let xIndex = ((n * g.inChannels + ic) * ih + y) * iw + x
                        for o in 0..<perGroupOut {
                            let oc = group * perGroupOut + o
                            for a in 0..<kh {
                                let oy = y * sh + a * dh - ph
                                guard oy >= 0 && oy < oh else { continue }
                                for b in 0..<kw {
                                    let ox = x * sw + b * dw - pw
                                    guard ox >= 0 && ox < ow else { continue }
                                    body(xIndex, ((ic * perGroupOut + o) * kh + a) * kw + b, ((n * g.outChannels + oc) * oh + oy) * ow + ox)
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Transposed convolution, `y[n, oc, o] = b[oc] + Σ x[n, ic, i]·w[ic, oc, k]` over o = i·stride + k·dilation − pad.
    static func convTransposeReference(_ g: Operators.TransposedGeometry, batch: Int, x: [Float], w: [Float], bias: [Float]?) -> [Float] {
        let spatial = g.output.reduce(1, *)
        var y = [Float](repeating: 0, count: batch * g.outChannels * spatial)
        if let bias {
            for n in 0..<batch { for c in 0..<g.outChannels { for s in 0..<spatial { y[(n * g.outChannels + c) * spatial + s] = bias[c] } } }
        }
        forEachTransposedTap(g, batch: batch) { xi, wi, yi in y[yi] += x[xi] * w[wi] }
        return y
    }

    /// The fast twin of `convTransposeReference`: per image and group one GEMM (oneDNN's sgemm),
    /// `cols[C_out/g · kH · kW, H · W] = W_gᵀ[C_out/g · k, C_in/g] · X_g[C_in/g, H · W]`, then each column's kernel
    /// window added into the output (col2im).
    static func convTransposeGemm(_ g: Operators.TransposedGeometry, batch: Int, x: [Float], w: [Float], bias: [Float]?) throws -> [Float] {
        let (ih, iw, oh, ow, kh, kw, sh, sw, dh, dw, ph, pw) = g.planar
        let perGroupIn = g.inChannels / g.groups, perGroupOut = g.outChannels / g.groups
        let rows = perGroupOut * kh * kw, pixels = ih * iw, outPlane = oh * ow
        var y = [Float](repeating: 0, count: batch * g.outChannels * outPlane)
        var cols = [Float](repeating: 0, count: rows * pixels)
        for n in 0..<batch {
            for group in 0..<g.groups {
                try w.withUnsafeBufferPointer { pw in
                    try x.withUnsafeBufferPointer { px in
                        try cols.withUnsafeMutableBufferPointer { pc in
                            // W_g is [C_in/g, rows] (stored as A transposed), X_g is [C_in/g, pixels].
                            try gemm(transA: true, transB: false, m: rows, n: pixels, k: perGroupIn,
                                     a: pw.baseAddress! + group * perGroupIn * rows,
                                     b: px.baseAddress! + (n * g.inChannels + group * perGroupIn) * pixels,
                                     c: pc.baseAddress!)
                        }
                    }
                }
                y.withUnsafeMutableBufferPointer { py in
                    cols.withUnsafeBufferPointer { pc in
                        for o in 0..<perGroupOut {
                            let plane = (n * g.outChannels + group * perGroupOut + o) * outPlane
                            for a in 0..<kh {
                                for b in 0..<kw {
                                    let row = ((o * kh + a) * kw + b) * pixels
                                    // Input columns j whose output column j·sw + b·dw − pw lies in [0, ow).
                                    let offset = b * dw - pw
                                    let jFirst = offset >= 0 ? 0 : (-offset + sw - 1) / sw
                                    let jEnd = min(iw, ow - offset <= 0 ? 0 : (ow - offset - 1) / sw + 1)
                                    guard jFirst < jEnd else { continue }
                                    for i in 0..<ih {
                                        let oy = i * sh + a * dh - ph
                                        guard oy >= 0 && oy < oh else { continue }
                                        let src = row + i * iw, dst = plane + oy * ow + offset
                                        for j in jFirst..<jEnd { py[dst + j * sw] += pc[src + j] }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if let bias {
            for n in 0..<batch { for c in 0..<g.outChannels { for s in 0..<outPlane { y[(n * g.outChannels + c) * outPlane + s] += bias[c] } } }
        }
        return y
    }
}
