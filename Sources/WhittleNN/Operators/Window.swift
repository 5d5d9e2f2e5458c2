import WhittleONNX
import WhittleTensor

/// Resolved geometry of a sliding window (Conv, MaxPool, AveragePool) over 1 or 2 spatial dimensions.
struct Window {
    var kernel: [Int]
    var strides: [Int]
    var dilations: [Int]
    /// Begin pads then end pads, as ONNX lists them: [h_begin, w_begin, h_end, w_end].
    var pads: [Int]
    var output: [Int]

    /// Reads kernel_shape, strides, dilations, pads and auto_pad; `spatial` are the input's spatial sizes.
    /// With `ceilMode`, output sizes round up (and a last window starting in the end padding is dropped, as
    /// onnxruntime and PyTorch do).
    static func resolve(_ ctx: NodeContext, spatial: [Int], kernel: [Int], ceilMode: Bool = false) throws -> Window {
        let n = spatial.count
        guard kernel.count == n, kernel.allSatisfy({ $0 >= 1 }) else {
            throw ctx.error(.invalidAttribute, "kernel_shape \(kernel) does not match \(n) spatial dimensions")
        }
        let strides = try ctx.ints("strides") ?? [Int](repeating: 1, count: n)
        let dilations = try ctx.ints("dilations") ?? [Int](repeating: 1, count: n)
        guard strides.count == n, strides.allSatisfy({ $0 >= 1 }) else {
            throw ctx.error(.invalidAttribute, "strides \(strides) must be \(n) positive values")
        }
        guard dilations.count == n, dilations.allSatisfy({ $0 >= 1 }) else {
            throw ctx.error(.invalidAttribute, "dilations \(dilations) must be \(n) positive values")
        }
        // Bounded so that the sums and products below cannot overflow (kernel sizes come from a checked weight shape).
        try ctx.checkedSizes(kernel + strides + dilations, "kernel_shape, strides and dilations")
        let autoPad = try ctx.string("auto_pad", default: "NOTSET")
        var pads = try ctx.checkedSizes(try ctx.ints("pads") ?? [Int](repeating: 0, count: 2 * n), "pads")
        guard pads.count == 2 * n, pads.allSatisfy({ $0 >= 0 }) else {
            throw ctx.error(.invalidAttribute, "pads \(pads) must be \(2 * n) non-negative values")
        }
        var output = [Int](repeating: 0, count: n)
        for i in 0..<n {
            let effective = (kernel[i] - 1) * dilations[i] + 1
            switch autoPad {
            case "NOTSET", "":
                let span = spatial[i] + pads[i] + pads[i + n] - effective
                guard span >= 0 else {
                    throw ctx.error(.shapeMismatch, "window \(kernel) does not fit input \(spatial) with pads \(pads)")
                }
                if ceilMode {
                    var out = (span + strides[i] - 1) / strides[i] + 1
                    if (out - 1) * strides[i] >= spatial[i] + pads[i] { out -= 1 }
                    output[i] = out
                } else {
                    output[i] = span / strides[i] + 1
                }
            case "VALID":
                pads[i] = 0
                pads[i + n] = 0
                guard spatial[i] >= effective else {
                    throw ctx.error(.shapeMismatch, "window \(kernel) does not fit input \(spatial)")
                }
                output[i] = (spatial[i] - effective) / strides[i] + 1
            case "SAME_UPPER", "SAME_LOWER":
                let out = (spatial[i] + strides[i] - 1) / strides[i]
                let total = max(0, (out - 1) * strides[i] + effective - spatial[i])
                let small = total / 2
                pads[i] = autoPad == "SAME_UPPER" ? small : total - small
                pads[i + n] = total - pads[i]
                output[i] = out
            default:
                throw ctx.error(.invalidAttribute, "auto_pad '\(autoPad)' is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER")
            }
        }
        return Window(kernel: kernel, strides: strides, dilations: dilations, pads: pads, output: output)
    }

    /// The 2-D geometry for a rank-4 (or rank-3, viewed as height 1) input.
    func geometry(batch: Int, channels: Int, spatial: [Int], outChannels: Int, groups: Int) -> Conv2DGeometry {
        if spatial.count == 1 {
            return Conv2DGeometry(batch: batch, inChannels: channels, height: 1, width: spatial[0],
                                  outChannels: outChannels, kernelH: 1, kernelW: kernel[0], groups: groups,
                                  strides: (1, strides[0]), dilations: (1, dilations[0]),
                                  pads: (0, pads[0], 0, pads[1]))
        }
        return Conv2DGeometry(batch: batch, inChannels: channels, height: spatial[0], width: spatial[1],
                              outChannels: outChannels, kernelH: kernel[0], kernelW: kernel[1], groups: groups,
                              strides: (strides[0], strides[1]), dilations: (dilations[0], dilations[1]),
                              pads: (pads[0], pads[1], pads[2], pads[3]))
    }

    /// Output height and width of the 2-D view.
    var output2D: (Int, Int) { output.count == 1 ? (1, output[0]) : (output[0], output[1]) }
}

/// Allocates a float buffer of `count` elements and lets `body` fill all of it.
@inline(__always)
func makeFloats(_ count: Int, _ body: (UnsafeMutablePointer<Float>) throws -> Void) rethrows -> [Float] {
    try [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
        try body(buffer.baseAddress!)
        initialized = count
    }
}
