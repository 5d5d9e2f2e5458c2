import CWhittleDNNL

/// Element type of an integer plan's activations.
public enum QuantizedType: Sendable, Equatable {
    case uint8, int8, float

    var c: wk_qtype_t {
        switch self {
        case .uint8: WK_U8
        case .int8: WK_S8
        case .float: WK_F32
        }
    }

    /// The quantized type of a tensor element type (uint8 or int8), nil for any other.
    public init?(_ dtype: DataType) {
        switch dtype {
        case .uint8: self = .uint8
        case .int8: self = .int8
        default: return nil
        }
    }

    /// The tensor element type that holds this type's values.
    public var dataType: DataType {
        switch self {
        case .uint8: .uint8
        case .int8: .int8
        case .float: .float
        }
    }

    /// The saturation range of an integer type.
    public var range: ClosedRange<Float>? {
        switch self {
        case .uint8: 0...255
        case .int8: -128...127
        case .float: nil
        }
    }
}

/// How an integer convolution turns its int32 accumulator into its output, as a QDQ group
/// `DequantizeLinear → Conv → QuantizeLinear` computes it: with `a = bias[o] + Σ (x − sourceZero) · w`,
/// `y = saturate(round_half_even(post(scales[o] · a)) + destinationZero)`. For input scale `s_x`, weight scales
/// `s_w[o]` and output scale `s_y`, `scales[o] = s_x · s_w[o] / s_y`, the bias is the int32 bias of scale
/// `s_x · s_w[o]`, and `post` works on `y / s_y` (a Clip's bounds divided by `s_y`); a float output takes
/// `scales[o] = s_x · s_w[o]` and no zero point.
public struct Requantization: Sendable, Equatable {
    /// One scale, or one per output channel.
    public var scales: [Float]
    public var sourceZero: Int32
    public var destinationZero: Int32
    public var post: PostOp

    public init(scales: [Float], sourceZero: Int32, destinationZero: Int32, post: PostOp = .none) {
        self.scales = scales
        self.sourceZero = sourceZero
        self.destinationZero = destinationZero
        self.post = post
    }
}

/// A oneDNN integer convolution for fixed geometry, s8 weights and requantization (`Requantization`): u8 or s8
/// activations in, u8, s8 or f32 out, int32 accumulation; weights are reordered once into oneDNN's layout.
/// On CPUs without VNNI, u8 × s8 pairs are summed in saturating int16 (`Kernels.integerDotProductsAreExact`).
public final class QuantizedConvPlan: @unchecked Sendable {
    public let geometry: Conv2DGeometry
    public let source: QuantizedType
    public let destination: QuantizedType
    private let handle: OpaquePointer

    /// `weights` as `[OC, C/groups, KH, KW]`, `bias` `[OC]` or nil.
    public init(_ g: Conv2DGeometry, source: QuantizedType, destination: QuantizedType, weights: [Int8], bias: [Int32]?,
                requantization r: Requantization) throws {
        try g.validate()
        guard source != .float else { throw TensorError(.invalidArgument, "an integer convolution reads uint8 or int8") }
        guard weights.count == g.weightShape.reduce(1, *) else {
            throw TensorError(.shapeMismatch, "convolution weight has \(weights.count) values, expected \(g.weightShape)")
        }
        if let bias, bias.count != g.outChannels {
            throw TensorError(.shapeMismatch, "convolution bias has \(bias.count) values, expected \(g.outChannels)")
        }
        guard r.scales.count == 1 || r.scales.count == g.outChannels, r.scales.allSatisfy({ $0.isFinite && $0 > 0 }) else {
            throw TensorError(.invalidArgument, "requantization needs 1 or \(g.outChannels) positive finite scales, got \(r.scales.count)")
        }
        geometry = g
        self.source = source
        self.destination = destination
        handle = try withErrorBuffer { err, len in
            weights.withUnsafeBufferPointer { w in
                r.scales.withUnsafeBufferPointer { s in
                    withOptionalPointer(bias) { b in
                        wk_qconv_create(
                            Int64(g.batch), Int64(g.inChannels), Int64(g.height), Int64(g.width), Int64(g.outChannels),
                            Int64(g.outHeight), Int64(g.outWidth), Int64(g.kernelH), Int64(g.kernelW), Int64(g.groups),
                            Int64(g.strideH), Int64(g.strideW), Int64(g.dilationH), Int64(g.dilationW),
                            Int64(g.padTop), Int64(g.padLeft), Int64(g.padBottom), Int64(g.padRight),
                            source.c, destination.c, w.baseAddress, b, s.baseAddress, Int64(s.count),
                            r.sourceZero, destination == .float ? 0 : r.destinationZero, r.post.c, err, len)
                    }
                }
            }
        }
    }

    deinit { wk_qconv_destroy(handle) }

    /// oneDNN's name for the implementation it chose (for example `brgconv:avx512_core_vnni`).
    public var implementation: String { String(cString: wk_qconv_impl(handle)) }

    /// Runs on `src` (`[N, C, H, W]` of `source`) into `dst` (`[N, OC, OH, OW]` of `destination`); with
    /// `sourceChannelsLast` / `destinationChannelsLast`, that side is in NHWC order, which the plan must compute in
    /// (`computesSourceChannelsLast`, `computesDestinationChannelsLast`), and is not converted.
    public func run(_ src: UnsafeRawPointer, _ dst: UnsafeMutableRawPointer, sourceChannelsLast: Bool = false,
                    destinationChannelsLast: Bool = false) throws {
        try runChecked { err, len in
            wk_qconv_run_layout(handle, src, dst, sourceChannelsLast ? 1 : 0, destinationChannelsLast ? 1 : 0, err, len)
        }
    }

    /// oneDNN computes the source in NHWC order (integer kernels usually do).
    public var computesSourceChannelsLast: Bool { wk_qconv_nhwc(handle) & 1 != 0 }
    /// oneDNN computes the destination in NHWC order.
    public var computesDestinationChannelsLast: Bool { wk_qconv_nhwc(handle) & 2 != 0 }
}

/// Calls `body` with a pointer to the array's storage, or with nil.
func withOptionalPointer<R>(_ array: [Int32]?, _ body: (UnsafePointer<Int32>?) -> R) -> R {
    guard let array else { return body(nil) }
    return array.withUnsafeBufferPointer { body($0.baseAddress) }
}

extension Kernels {
    /// Whether the CPU's u8 × s8 dot products accumulate exactly in int32 (VNNI: AVX-512 VNNI, AVX-VNNI, AMX), as
    /// oneDNN dispatches (`DNNL_MAX_CPU_ISA` lowers it). Without VNNI, pairs of products are summed in saturating
    /// int16 first, exact only for weights within ±63 (`--reduce-range`).
    public static var integerDotProductsAreExact: Bool { wk_cpu_has_vnni() != 0 }

    /// oneDNN's name for the instruction set it dispatches to (`avx512_core_vnni`, `avx2`…).
    public static var cpuInstructionSet: String { String(cString: wk_cpu_isa_name()) }

    /// The largest |weight| whose u8 × s8 products cannot saturate without VNNI: two products of 255 · 63 sum to
    /// 32,130, within int16.
    public static let sevenBitWeightLimit: Int8 = 63

    /// Integer convolution by definition, the reference twin of `QuantizedConvPlan`: int32 accumulation of
    /// `(x − sourceZero) · w` over the window (padding contributes nothing) plus the bias, then the float scale, the
    /// post-op, rounding half to even, the zero point and saturation to the destination type (none for float).
    /// `x` holds the source values (uint8 or int8) widened to Int32.
    public static func quantizedConv2dReference(_ g: Conv2DGeometry, input x: [Int32], weights w: [Int8], bias: [Int32]?,
                                                requantization r: Requantization, destination: QuantizedType) -> [Float] {
        let oh = g.outHeight, ow = g.outWidth
        let cPerGroup = g.inChannels / g.groups, oPerGroup = g.outChannels / g.groups
        var y = [Float](repeating: 0, count: g.batch * g.outChannels * oh * ow)
        for n in 0..<g.batch {
            for o in 0..<g.outChannels {
                let group = o / oPerGroup
                let scale = r.scales.count == 1 ? r.scales[0] : r.scales[o]
                for i in 0..<oh {
                    for j in 0..<ow {
                        var acc: Int32 = bias?[o] ?? 0
                        for c in 0..<cPerGroup {
                            let ci = group * cPerGroup + c
                            for p in 0..<g.kernelH {
                                let hi = i * g.strideH + p * g.dilationH - g.padTop
                                guard hi >= 0, hi < g.height else { continue }
                                for q in 0..<g.kernelW {
                                    let wi = j * g.strideW + q * g.dilationW - g.padLeft
                                    guard wi >= 0, wi < g.width else { continue }
                                    let xv = x[((n * g.inChannels + ci) * g.height + hi) * g.width + wi] - r.sourceZero
                                    acc &+= xv &* Int32(w[((o * cPerGroup + c) * g.kernelH + p) * g.kernelW + q])
                                }
                            }
                        }
                        var v = r.post.apply(Float(acc) * scale)
                        if let range = destination.range {
                            v = min(max(v.rounded(.toNearestOrEven) + Float(r.destinationZero), range.lowerBound), range.upperBound)
                        }
                        y[((n * g.outChannels + o) * oh + i) * ow + j] = v
                    }
                }
            }
        }
        return y
    }
}
