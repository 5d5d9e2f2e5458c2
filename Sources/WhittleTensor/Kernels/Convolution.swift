import CWhittleDNNL

/// Geometry of a 2-D convolution or pooling window.
///
/// Layout: input `[N, C, H, W]`, weight `[OC, C/groups, KH, KW]`, output `[N, OC, OH, OW]` with
/// `OH = (H + padTop + padBottom − dilationH · (KH − 1) − 1) / strideH + 1` (floor), and likewise for OW.
public struct Conv2DGeometry: Sendable, Equatable, Hashable {
    public var batch: Int, inChannels: Int, height: Int, width: Int
    public var outChannels: Int, kernelH: Int, kernelW: Int
    public var groups: Int = 1
    public var strideH: Int = 1, strideW: Int = 1
    public var dilationH: Int = 1, dilationW: Int = 1
    public var padTop: Int = 0, padLeft: Int = 0, padBottom: Int = 0, padRight: Int = 0

    public init(batch: Int, inChannels: Int, height: Int, width: Int, outChannels: Int, kernelH: Int, kernelW: Int,
                groups: Int = 1, strides: (Int, Int) = (1, 1), dilations: (Int, Int) = (1, 1),
                pads: (top: Int, left: Int, bottom: Int, right: Int) = (0, 0, 0, 0)) {
        self.batch = batch; self.inChannels = inChannels; self.height = height; self.width = width
        self.outChannels = outChannels; self.kernelH = kernelH; self.kernelW = kernelW; self.groups = groups
        self.strideH = strides.0; self.strideW = strides.1; self.dilationH = dilations.0; self.dilationW = dilations.1
        self.padTop = pads.top; self.padLeft = pads.left; self.padBottom = pads.bottom; self.padRight = pads.right
    }

    public var outHeight: Int { (height + padTop + padBottom - dilationH * (kernelH - 1) - 1) / strideH + 1 }
    public var outWidth: Int { (width + padLeft + padRight - dilationW * (kernelW - 1) - 1) / strideW + 1 }
    public var inputShape: [Int] { [batch, inChannels, height, width] }
    public var weightShape: [Int] { [outChannels, inChannels / groups, kernelH, kernelW] }
    public var outputShape: [Int] { [batch, outChannels, outHeight, outWidth] }

    /// Multiply-accumulates of one forward pass.
    public var macs: Int { batch * outChannels * outHeight * outWidth * (inChannels / groups) * kernelH * kernelW }

    /// Checks that the geometry is consistent; throws a message naming the first problem.
    public func validate() throws {
        guard batch >= 1, inChannels >= 1, height >= 1, width >= 1, outChannels >= 1, kernelH >= 1, kernelW >= 1 else {
            throw TensorError(.invalidArgument, "convolution dimensions must be positive: \(self)")
        }
        guard groups >= 1, inChannels % groups == 0, outChannels % groups == 0 else {
            throw TensorError(.invalidArgument,
                "group \(groups) must divide input channels \(inChannels) and output channels \(outChannels)")
        }
        guard strideH >= 1, strideW >= 1, dilationH >= 1, dilationW >= 1 else {
            throw TensorError(.invalidArgument, "strides and dilations must be at least 1")
        }
        guard padTop >= 0, padLeft >= 0, padBottom >= 0, padRight >= 0 else {
            throw TensorError(.invalidArgument, "pads must be non-negative")
        }
        guard outHeight >= 1, outWidth >= 1 else {
            throw TensorError(.shapeMismatch,
                "kernel \(kernelH)x\(kernelW) (dilation \(dilationH)x\(dilationW)) does not fit input \(height)x\(width) with pads")
        }
    }
}

/// A oneDNN convolution for fixed geometry and weights: weights are reordered once into oneDNN's preferred layout.
/// Optionally fuses `dst += input` (a residual add) and an element-wise post-op.
public final class ConvPlan: @unchecked Sendable {
    public let geometry: Conv2DGeometry
    public let fusesSum: Bool
    private let handle: OpaquePointer

    /// `weights` as `[OC, C/groups, KH, KW]`, `bias` `[OC]` or nil.
    public init(_ g: Conv2DGeometry, weights: [Float], bias: [Float]?, post: PostOp = .none, fuseSum: Bool = false) throws {
        try g.validate()
        guard weights.count == g.weightShape.reduce(1, *) else {
            throw TensorError(.shapeMismatch, "convolution weight has \(weights.count) values, expected \(g.weightShape)")
        }
        if let bias, bias.count != g.outChannels {
            throw TensorError(.shapeMismatch, "convolution bias has \(bias.count) values, expected \(g.outChannels)")
        }
        geometry = g
        fusesSum = fuseSum
        handle = try withErrorBuffer { err, len in
            weights.withUnsafeBufferPointer { w in
                withOptionalPointer(bias) { b in
                    wk_conv_create(
                        Int64(g.batch), Int64(g.inChannels), Int64(g.height), Int64(g.width), Int64(g.outChannels),
                        Int64(g.outHeight), Int64(g.outWidth), Int64(g.kernelH), Int64(g.kernelW), Int64(g.groups),
                        Int64(g.strideH), Int64(g.strideW), Int64(g.dilationH), Int64(g.dilationW),
                        Int64(g.padTop), Int64(g.padLeft), Int64(g.padBottom), Int64(g.padRight),
                        w.baseAddress, b, post.c, fuseSum ? 1 : 0, err, len)
                }
            }
        }
    }

    deinit { wk_conv_destroy(handle) }

    /// oneDNN's name for the implementation it chose (for example `brgconv:avx512_core`).
    public var implementation: String { String(cString: wk_conv_impl(handle)) }

    /// Runs on `src` (`[N, C, H, W]`) into `dst` (`[N, OC, OH, OW]`). With `fuseSum`, `dst` must hold the summand.
    public func run(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>) throws {
        try runChecked { err, len in wk_conv_run(handle, src, dst, err, len) }
    }

    /// Runs with `src` and/or `dst` already in this plan's blocked layouts (`blockedSourceBytes`,
    /// `blockedDestinationBytes`), skipping the conversion on that side. Used to chain convolutions without
    /// converting to NCHW between them.
    public func run(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>, sourceBlocked: Bool,
                    destinationBlocked: Bool) throws {
        try runChecked { err, len in
            wk_conv_run_layout(handle, src, dst, sourceBlocked ? 1 : 0, destinationBlocked ? 1 : 0, err, len)
        }
    }

    /// Bytes of the blocked layout oneDNN computes the source in, or 0 when it uses plain NCHW.
    public var blockedSourceBytes: Int { Int(wk_conv_blocked_src_bytes(handle)) }
    /// Bytes of the blocked layout oneDNN computes the destination in, or 0 when it uses plain NCHW.
    public var blockedDestinationBytes: Int { Int(wk_conv_blocked_dst_bytes(handle)) }

    /// True when this plan's destination layout is `consumer`'s source layout (or, `asSummand`, its destination
    /// layout), so a blocked tensor can pass between them unconverted.
    public func layoutMatches(_ consumer: ConvPlan, asSummand: Bool) -> Bool {
        wk_conv_layouts_match(handle, consumer.handle, asSummand ? 1 : 0) != 0
    }
}

/// Calls `body` with a pointer to the array's storage, or with nil.
func withOptionalPointer<R>(_ array: [Float]?, _ body: (UnsafePointer<Float>?) -> R) -> R {
    guard let array else { return body(nil) }
    return array.withUnsafeBufferPointer { body($0.baseAddress) }
}

extension Kernels {
    /// Direct convolution, the reference twin of `ConvPlan`: `y[n, o, i, j] = b[o] + Σ_{c ∈ group(o), p, q}
    /// x[n, c, i·sH + p·dH − padT, j·sW + q·dW − padL] · w[o, c − group start, p, q]`, zero outside the input.
    public static func conv2dReference(_ g: Conv2DGeometry, input x: [Float], weights w: [Float], bias: [Float]?,
                                       post: PostOp = .none) -> [Float] {
        let oh = g.outHeight, ow = g.outWidth
        let cPerGroup = g.inChannels / g.groups, oPerGroup = g.outChannels / g.groups
        var y = [Float](repeating: 0, count: g.batch * g.outChannels * oh * ow)
        for n in 0..<g.batch {
            for o in 0..<g.outChannels {
                let group = o / oPerGroup
                for i in 0..<oh {
                    for j in 0..<ow {
                        var acc: Float = bias?[o] ?? 0
                        for c in 0..<cPerGroup {
                            let ci = group * cPerGroup + c
                            for p in 0..<g.kernelH {
                                let hi = i * g.strideH + p * g.dilationH - g.padTop
                                if hi < 0 || hi >= g.height { continue }
                                for q in 0..<g.kernelW {
                                    let wi = j * g.strideW + q * g.dilationW - g.padLeft
                                    if wi < 0 || wi >= g.width { continue }
                                    acc += x[((n * g.inChannels + ci) * g.height + hi) * g.width + wi]
                                        * w[((o * cPerGroup + c) * g.kernelH + p) * g.kernelW + q]
                                }
                            }
                        }
                        y[((n * g.outChannels + o) * oh + i) * ow + j] = post.apply(acc)
                    }
                }
            }
        }
        return y
    }
}

/// Namespace of the reference kernels and simple loops that need no library.
public enum Kernels {}
