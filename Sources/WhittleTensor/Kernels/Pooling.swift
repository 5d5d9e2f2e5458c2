import CWhittleDNNL

/// Pooling kind, with ONNX's `count_include_pad` folded into the average variants.
public enum PoolKind: Sendable {
    case max
    case averageIncludingPad
    case averageExcludingPad
}

/// A oneDNN 2-D pooling for fixed geometry. `geometry.outChannels` must equal `inChannels`; `groups` is ignored.
/// Input `[N, C, H, W]` → output `[N, C, OH, OW]`; OH and OW may be given explicitly (ONNX `ceil_mode`).
public final class PoolPlan: @unchecked Sendable {
    public let geometry: Conv2DGeometry
    public let outHeight: Int, outWidth: Int
    private let handle: OpaquePointer

    public init(_ kind: PoolKind, _ g: Conv2DGeometry, outHeight: Int? = nil, outWidth: Int? = nil) throws {
        var checked = g
        checked.groups = 1
        try checked.validate()
        geometry = g
        self.outHeight = outHeight ?? g.outHeight
        self.outWidth = outWidth ?? g.outWidth
        let oh = self.outHeight, ow = self.outWidth
        // oneDNN derives the output size from the right/bottom padding: extend it for ceil_mode outputs.
        let padBottom = (oh - 1) * g.strideH + g.dilationH * (g.kernelH - 1) + 1 - g.height - g.padTop
        let padRight = (ow - 1) * g.strideW + g.dilationW * (g.kernelW - 1) + 1 - g.width - g.padLeft
        let alg: wk_pool_t = switch kind {
        case .max: WK_POOL_MAX
        case .averageIncludingPad: WK_POOL_AVG_INCLUDE_PAD
        case .averageExcludingPad: WK_POOL_AVG_EXCLUDE_PAD
        }
        handle = try withErrorBuffer { err, len in
            wk_pool_create(alg, Int64(g.batch), Int64(g.inChannels), Int64(g.height), Int64(g.width), Int64(oh),
                           Int64(ow), Int64(g.kernelH), Int64(g.kernelW), Int64(g.strideH), Int64(g.strideW),
                           Int64(g.dilationH), Int64(g.dilationW), Int64(g.padTop), Int64(g.padLeft),
                           Int64(max(padBottom, 0)), Int64(max(padRight, 0)), err, len)
        }
    }

    deinit { wk_pool_destroy(handle) }

    /// False when oneDNN would count positions differently from ONNX: an average that includes padding, with
    /// ceil_mode windows reaching past the explicit end pads (ONNX counts only the explicit pads; oneDNN would
    /// count the extension too).
    public static func supports(_ kind: PoolKind, _ g: Conv2DGeometry, outHeight: Int, outWidth: Int) -> Bool {
        guard kind == .averageIncludingPad else { return true }
        let needBottom = (outHeight - 1) * g.strideH + g.dilationH * (g.kernelH - 1) + 1 - g.height - g.padTop
        let needRight = (outWidth - 1) * g.strideW + g.dilationW * (g.kernelW - 1) + 1 - g.width - g.padLeft
        return needBottom <= g.padBottom && needRight <= g.padRight
    }

    public func run(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>) throws {
        try runChecked { err, len in wk_pool_run(handle, src, dst, err, len) }
    }
}

extension Kernels {
    /// Reference pooling. Windows are clipped to the input; `averageIncludingPad` divides by the window size
    /// counted over input plus explicit pads (ONNX `count_include_pad = 1`), `averageExcludingPad` by the number of
    /// input elements in the window.
    public static func pool2dReference(_ kind: PoolKind, _ g: Conv2DGeometry, input x: [Float],
                                       outHeight: Int? = nil, outWidth: Int? = nil) -> [Float] {
        let oh = outHeight ?? g.outHeight, ow = outWidth ?? g.outWidth
        var y = [Float](repeating: 0, count: g.batch * g.inChannels * oh * ow)
        forEachPoolWindow(g, outHeight: oh, outWidth: ow) { output, inputs, padded in
            let out: Float
            switch kind {
            case .max: out = inputs.map { x[$0] }.max() ?? -.infinity
            case .averageIncludingPad: out = padded > 0 ? inputs.reduce(0) { $0 + x[$1] } / Float(padded) : 0
            case .averageExcludingPad: out = inputs.isEmpty ? 0 : inputs.reduce(0) { $0 + x[$1] } / Float(inputs.count)
            }
            y[output] = out
        }
        return y
    }

    /// Visits every pooling window of input `[N, C, H, W]` (flat output index, in order): the flat indices of the
    /// input elements it covers in scan order, and how many of its positions lie within the input plus the
    /// explicit pads (the divisor of ONNX `count_include_pad = 1`). Forward and backward pooling share it.
    public static func forEachPoolWindow(_ g: Conv2DGeometry, outHeight oh: Int, outWidth ow: Int,
                                         _ body: (_ output: Int, _ inputs: [Int], _ paddedCount: Int) -> Void) {
        var inputs: [Int] = []
        inputs.reserveCapacity(g.kernelH * g.kernelW)
        for plane in 0..<(g.batch * g.inChannels) {
            let base = plane * g.height * g.width
            for i in 0..<oh {
                for j in 0..<ow {
                    inputs.removeAll(keepingCapacity: true)
                    var padded = 0
                    for p in 0..<g.kernelH {
                        let h = i * g.strideH + p * g.dilationH - g.padTop
                        for q in 0..<g.kernelW {
                            let w = j * g.strideW + q * g.dilationW - g.padLeft
                            if h >= -g.padTop && h < g.height + g.padBottom && w >= -g.padLeft && w < g.width + g.padRight {
                                padded += 1
                            }
                            if h >= 0, h < g.height, w >= 0, w < g.width { inputs.append(base + h * g.width + w) }
                        }
                    }
                    body((plane * oh + i) * ow + j, inputs, padded)
                }
            }
        }
    }
}
