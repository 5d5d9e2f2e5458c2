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
        let c = g.inChannels
        var y = [Float](repeating: 0, count: g.batch * c * oh * ow)
        for n in 0..<g.batch {
            for ch in 0..<c {
                let plane = (n * c + ch) * g.height * g.width
                for i in 0..<oh {
                    for j in 0..<ow {
                        var best = -Float.infinity
                        var sum: Float = 0
                        var inside = 0
                        var padded = 0
                        for p in 0..<g.kernelH {
                            let hi = i * g.strideH + p * g.dilationH - g.padTop
                            for q in 0..<g.kernelW {
                                let wi = j * g.strideW + q * g.dilationW - g.padLeft
                                // Positions within the explicit pads count for count_include_pad.
                                if hi >= -g.padTop && hi < g.height + g.padBottom && wi >= -g.padLeft
                                    && wi < g.width + g.padRight { padded += 1 }
                                guard hi >= 0, hi < g.height, wi >= 0, wi < g.width else { continue }
                                let v = x[plane + hi * g.width + wi]
                                best = max(best, v)
                                sum += v
                                inside += 1
                            }
                        }
                        let out: Float
                        switch kind {
                        case .max: out = best
                        case .averageIncludingPad: out = padded > 0 ? sum / Float(padded) : 0
                        case .averageExcludingPad: out = inside > 0 ? sum / Float(inside) : 0
                        }
                        y[((n * c + ch) * oh + i) * ow + j] = out
                    }
                }
            }
        }
        return y
    }
}
