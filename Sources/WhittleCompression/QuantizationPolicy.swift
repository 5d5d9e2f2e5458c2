import WhittleTensor

/// The calibration methods (ALGORITHMS.md): MinMax needs only ranges; the others need a second pass of
/// fixed-edge histograms.
public enum CalibrationMethod: String, Sendable, Codable, CaseIterable {
    case minmax, percentile, entropy, mse

    public var needsHistograms: Bool { self != .minmax }
}

/// What happens to one weighted node (Conv, Gemm, MatMul).
public enum LayerPrecision: String, Sendable, Codable, CaseIterable {
    /// Left in float32: no QuantizeLinear/DequantizeLinear on its weights or its activations.
    case float
    /// int8 weights (symmetric, per channel or per tensor), quantized input and output activations, int32 bias.
    case int8
    /// int4 weights (symmetric, opset 21 QDQ), activations and bias left in float: weight-only quantization.
    case int4Weights = "int4-weights"
}

/// Whole-model quantization modes of `coordinator model compress --quantize`.
public enum QuantizationMode: String, Sendable, Codable, CaseIterable {
    case none, int8
    /// Gemm and MatMul weights in int4, everything else float.
    case int4Weights = "int4-weights"
    /// The seed article's mixed policy: first and last weighted layers float, Conv int8, fully-connected layers
    /// (Gemm, MatMul) int4 weights.
    case mixed
}

/// How int4 weights are written.
public enum Int4Format: String, Sendable, Codable, CaseIterable {
    /// DequantizeLinear (opset 21) of int4 weights: per output channel, or blocked along K with `int4BlockSize`.
    case qdq
    /// onnxruntime's `MatMulNBits` (domain com.microsoft): MatMul and Gemm weights in 4-bit blocks along K
    /// (`int4BlockSize`, 32 by default), packed as its kernels read them.
    case matMulNBits = "matmulnbits"
}

/// Everything that decides how a model is quantized.
public struct QuantizationPolicy: Sendable {
    public var mode: QuantizationMode
    /// Per-output-channel weight scales (needs opset 13); per-tensor otherwise.
    public var perChannel = true
    /// uint8 (onnxruntime's default for activations) or int8.
    public var activationType: DataType = .uint8
    public var symmetricActivations = false
    /// 7-bit int8 weights ([−64, 64]), onnxruntime's `reduce_range`: its u8×s8 kernels on x86 CPUs without AVX-VNNI
    /// add pairs of products in 16 bits, which saturate with full-range weights and make the deployed model less
    /// accurate than the QDQ graph says. Reduced weights cannot saturate there.
    public var reduceRange = false
    public var calibration: CalibrationMethod = .minmax
    /// Percentile for `.percentile`, in (0, 100].
    public var percentile: Double = 99.999
    public var histogramBins = Histogram.defaultBinCount
    /// Nodes (by name) left entirely in float: no node in the list marks tensors for quantization.
    public var keepFloat: Set<String> = []
    /// Per-node precision by name, overriding the mode.
    public var overrides: [String: LayerPrecision] = [:]
    /// int4 weights in blocks of this many along the reduction axis, each with its own scale (nil: one scale per
    /// output channel in `.qdq`, 32 in `.matMulNBits`).
    public var int4BlockSize: Int?
    public var int4Format: Int4Format = .qdq

    public init(mode: QuantizationMode) {
        self.mode = mode
    }

    public func check() throws {
        guard activationType == .uint8 || activationType == .int8 else {
            throw CompressionError(.invalidArgument, "activations can be uint8 or int8, not \(activationType)")
        }
        guard percentile > 0, percentile <= 100 else {
            throw CompressionError(.invalidArgument, "percentile \(percentile) must be in (0, 100]")
        }
        if let b = int4BlockSize, !BlockwiseInt4.blockSizes.contains(b) {
            throw CompressionError(.invalidArgument, "the int4 block size must be one of \(BlockwiseInt4.blockSizes.map(String.init).joined(separator: ", ")), got \(b)")
        }
        guard histogramBins >= 128 else {
            throw CompressionError(.invalidArgument, "histograms need at least 128 bins, got \(histogramBins)")
        }
    }

    /// The integer range of activations, as onnxruntime takes it (`get_qmin_qmax_for_qType`, symmetric when asked).
    public var activationRange: ClosedRange<Int64> {
        // Both types are valid (checked by `check`), so this cannot fail.
        (try? QuantizationParameters.range(activationType, symmetric: symmetricActivations)) ?? 0...255
    }
}
