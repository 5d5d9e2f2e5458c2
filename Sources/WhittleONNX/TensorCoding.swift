import Foundation
import WhittleTensor

/// Conversion between ONNX `TensorProto` and `Tensor`.
///
/// Decoding accepts both `raw_data` (little-endian, 4-bit types packed two per byte, low nibble first) and the typed
/// repeated fields (`float_data`, `int32_data` — which also carries int8/uint8/int16/uint16/bool/float16/bfloat16
/// and packed 4-bit values — `int64_data`, `double_data`, `uint64_data`). Encoding always writes `raw_data`.
public enum TensorCoding {
    /// The declared shape, checked for negative dimensions, overflow and `TensorLimits`.
    static func shape(of proto: Onnx_TensorProto) throws -> [Int] {
        let shape = proto.dims.map { Int($0) }
        if let dim = shape.first(where: { $0 < 0 }) {
            throw ONNXError(.malformedTensor, "tensor '\(proto.name)' has a negative dimension \(dim)")
        }
        guard TensorLimits.elementCount(shape) != nil else {
            throw ONNXError(.tooLarge, TensorLimits.limitMessage(shape, "tensor '\(proto.name)'"))
        }
        return shape
    }

    /// Decodes `proto`; throws for malformed data and for element types Whittle does not compute with.
    public static func decode(_ proto: Onnx_TensorProto) throws -> Tensor {
        guard let tensor = try decodeIfSupported(proto) else {
            let type = DataType(rawValue: proto.dataType).map(\.description) ?? "type \(proto.dataType)"
            throw ONNXError(.unsupportedDataType, "tensor '\(proto.name)' has element type \(type), which Whittle does not compute with")
        }
        return tensor
    }

    /// Decodes `proto`, or returns nil when its element type is one Whittle keeps but does not compute with.
    static func decodeIfSupported(_ proto: Onnx_TensorProto) throws -> Tensor? {
        if proto.dataLocation == .external {
            throw ONNXError(.externalData, "tensor '\(proto.name)' stores its data externally; load it with an external-data loader")
        }
        if proto.hasSegment {
            throw ONNXError(.malformedTensor, "tensor '\(proto.name)' is a segment of a larger tensor, which Whittle does not support")
        }
        let shape = try shape(of: proto)
        let count = shape.reduce(1, *)
        guard let dtype = DataType(rawValue: proto.dataType) else {
            throw ONNXError(.malformedTensor, "tensor '\(proto.name)' has unknown element type \(proto.dataType)")
        }
        let raw = proto.hasRawData ? [UInt8](proto.rawData) : nil
        func mismatch(_ have: Int, _ unit: String) -> ONNXError {
            ONNXError(.malformedTensor,
                "tensor '\(proto.name)' (\(dtype), shape \(shape)) holds \(have) \(unit), expected data for \(count) elements")
        }
        func rawWords<T: FixedWidthInteger>(_: T.Type) throws -> [T] {
            guard let raw else { throw mismatch(0, "bytes") }
            let size = MemoryLayout<T>.size
            guard raw.count == count * size else { throw mismatch(raw.count, "bytes") }
            var out = [T](repeating: 0, count: count)
            out.withUnsafeMutableBytes { dst in raw.withUnsafeBytes { dst.copyMemory(from: $0) } }
            #if _endian(big)
            for i in out.indices { out[i] = T(littleEndian: out[i]) }
            #endif
            return out
        }
        func int32Field() throws -> [Int32] {
            guard proto.int32Data.count == count else { throw mismatch(proto.int32Data.count, "int32_data values") }
            return proto.int32Data
        }
        /// int32_data narrowed to a smaller integer type, refusing a value the type cannot hold (a writer that
        /// truncates would silently change it, a zero point 300 of a uint8 becoming 44).
        func narrowed<T: FixedWidthInteger>(_: T.Type) throws -> [Int64] {
            let values = try int32Field()
            if let bad = values.first(where: { T(exactly: $0) == nil }) {
                throw ONNXError(.malformedTensor, "tensor '\(proto.name)' (\(dtype)) holds \(bad) in int32_data, outside the range of \(dtype) (\(T.min)…\(T.max))")
            }
            return values.map { Int64($0) }
        }

        switch dtype {
        case .float:
            if raw != nil { return Tensor(shape: shape, floats: try rawWords(UInt32.self).map(Float.init(bitPattern:))) }
            guard proto.floatData.count == count else { throw mismatch(proto.floatData.count, "float_data values") }
            return Tensor(shape: shape, floats: proto.floatData)
        case .double:
            if raw != nil {
                return floatTensor(shape, dtype, try rawWords(UInt64.self).map { Float(Double(bitPattern: $0)) })
            }
            guard proto.doubleData.count == count else { throw mismatch(proto.doubleData.count, "double_data values") }
            return floatTensor(shape, dtype, proto.doubleData.map { Float($0) })
        case .float16:
            let bits = raw != nil ? try rawWords(UInt16.self) : try int32Field().map { UInt16(truncatingIfNeeded: $0) }
            return floatTensor(shape, dtype, bits.map(halfToFloat))
        case .bfloat16:
            let bits = raw != nil ? try rawWords(UInt16.self) : try int32Field().map { UInt16(truncatingIfNeeded: $0) }
            return floatTensor(shape, dtype, bits.map { Float(bitPattern: UInt32($0) << 16) })
        case .int8:
            let v = raw != nil ? try rawWords(UInt8.self).map { Int64(Int8(bitPattern: $0)) } : try narrowed(Int8.self)
            return Tensor(shape: shape, ints: v, dtype: dtype)
        case .uint8, .bool:
            let v = raw != nil ? try rawWords(UInt8.self).map { Int64($0) } : try narrowed(UInt8.self)
            return Tensor(shape: shape, ints: v, dtype: dtype)
        case .int16:
            let v = raw != nil ? try rawWords(UInt16.self).map { Int64(Int16(bitPattern: $0)) } : try narrowed(Int16.self)
            return Tensor(shape: shape, ints: v, dtype: dtype)
        case .uint16:
            let v = raw != nil ? try rawWords(UInt16.self).map { Int64($0) } : try narrowed(UInt16.self)
            return Tensor(shape: shape, ints: v, dtype: dtype)
        case .int32:
            let v = raw != nil ? try rawWords(UInt32.self).map { Int64(Int32(bitPattern: $0)) } : try int32Field().map { Int64($0) }
            return Tensor(shape: shape, ints: v, dtype: dtype)
        case .int64:
            if raw != nil { return Tensor(shape: shape, ints: try rawWords(UInt64.self).map { Int64(bitPattern: $0) }, dtype: dtype) }
            guard proto.int64Data.count == count else { throw mismatch(proto.int64Data.count, "int64_data values") }
            return Tensor(shape: shape, ints: proto.int64Data, dtype: dtype)
        case .uint32:
            let v = raw != nil ? try rawWords(UInt32.self).map { Int64($0) } : proto.uint64Data.map { Int64(truncatingIfNeeded: $0) }
            guard v.count == count else { throw mismatch(v.count, "uint64_data values") }
            return Tensor(shape: shape, ints: v, dtype: dtype)
        case .uint64:
            let v = raw != nil ? try rawWords(UInt64.self).map { Int64(bitPattern: $0) } : proto.uint64Data.map { Int64(bitPattern: $0) }
            guard v.count == count else { throw mismatch(v.count, "uint64_data values") }
            return Tensor(shape: shape, ints: v, dtype: dtype)
        case .int4, .uint4:
            let packed: [UInt8]
            if let raw { packed = raw } else { packed = proto.int32Data.map { UInt8(truncatingIfNeeded: $0) } }
            guard packed.count == (count + 1) / 2 else { throw mismatch(packed.count, "packed bytes") }
            var values = [Int64](repeating: 0, count: count)
            for i in 0..<count {
                let nibble = (i % 2 == 0 ? packed[i / 2] : packed[i / 2] >> 4) & 0x0F
                values[i] = dtype == .int4 ? Int64(Int8(bitPattern: nibble << 4) >> 4) : Int64(nibble)
            }
            return Tensor(shape: shape, ints: values, dtype: dtype)
        case .string, .complex64, .complex128, .float8e4m3fn, .float8e4m3fnuz, .float8e5m2, .float8e5m2fnuz:
            return nil
        case .undefined:
            throw ONNXError(.malformedTensor, "tensor '\(proto.name)' has no element type")
        }
    }

    private static func floatTensor(_ shape: [Int], _ dtype: DataType, _ values: [Float]) -> Tensor {
        var t = Tensor(shape: shape, floats: values)
        t.dtype = dtype
        return t
    }

    /// Encodes `tensor` as a `TensorProto` with `raw_data` in its own element type.
    public static func encode(_ tensor: Tensor, name: String) -> Onnx_TensorProto {
        var proto = Onnx_TensorProto()
        proto.name = name
        proto.dims = tensor.shape.map { Int64($0) }
        proto.dataType = tensor.dtype.rawValue
        var bytes: [UInt8] = []
        func append<T: FixedWidthInteger>(_ values: [T]) {
            bytes.reserveCapacity(values.count * MemoryLayout<T>.size)
            for v in values {
                var le = v.littleEndian
                withUnsafeBytes(of: &le) { bytes.append(contentsOf: $0) }
            }
        }
        switch tensor.dtype {
        case .float: append(tensor.floats.map(\.bitPattern))
        case .double: append(tensor.floats.map { Double($0).bitPattern })
        case .float16: append(tensor.floats.map(floatToHalf))
        case .bfloat16: append(tensor.floats.map(floatToBFloat16))
        case .int8, .uint8, .bool: append(tensor.ints.map { UInt8(truncatingIfNeeded: $0) })
        case .int16, .uint16: append(tensor.ints.map { UInt16(truncatingIfNeeded: $0) })
        case .int32, .uint32: append(tensor.ints.map { UInt32(truncatingIfNeeded: $0) })
        case .int64, .uint64: append(tensor.ints.map { UInt64(bitPattern: $0) })
        case .int4, .uint4:
            bytes = [UInt8](repeating: 0, count: (tensor.count + 1) / 2)
            for (i, v) in tensor.ints.enumerated() {
                let nibble = UInt8(truncatingIfNeeded: v) & 0x0F
                bytes[i / 2] |= i % 2 == 0 ? nibble : nibble << 4
            }
        default:
            preconditionFailure("Tensor cannot hold \(tensor.dtype)")
        }
        proto.rawData = Data(bytes)
        return proto
    }

    /// Replaces an external-data reference by the bytes it points to.
    static func inlineExternalData(_ proto: Onnx_TensorProto, loader: ExternalDataLoader?) throws -> Onnx_TensorProto {
        var entries: [String: String] = [:]
        for entry in proto.externalData { entries[entry.key] = entry.value }
        guard let location = entries["location"], !location.isEmpty else {
            throw ONNXError(.externalData, "tensor '\(proto.name)' is external but names no location")
        }
        let components = location.split(separator: "/", omittingEmptySubsequences: false)
        guard !location.hasPrefix("/"), !components.contains(".."), !location.contains("\\"), !location.contains("\0") else {
            throw ONNXError(.externalData,
                "tensor '\(proto.name)' points outside the model's folder (location '\(location)'); refused")
        }
        guard let loader else {
            throw ONNXError(.externalData, "tensor '\(proto.name)' stores its data in '\(location)', but no external-data loader was given")
        }
        let offset = Int(entries["offset"] ?? "0")
        let length = entries["length"].map { Int($0) } ?? nil
        guard let offset, offset >= 0, entries["length"] == nil || (length ?? -1) >= 0 else {
            throw ONNXError(.externalData, "tensor '\(proto.name)' has a malformed external offset or length")
        }
        let file = try loader(location)
        let end = length.map { TensorLimits.sum(offset, $0) ?? Int.max } ?? file.count
        guard offset <= file.count, end <= file.count, offset <= end else {
            throw ONNXError(.externalData,
                "tensor '\(proto.name)' reads \(entries["length"].map { "\($0) bytes" } ?? "to the end") from offset \(offset) of '\(location)', which has \(file.count) bytes")
        }
        var inline = proto
        inline.externalData = []
        inline.clearDataLocation()
        inline.rawData = Data(file[offset..<end])
        return inline
    }
}

/// IEEE 754 half (binary16) bits to Float.
func halfToFloat(_ bits: UInt16) -> Float {
    let sign = UInt32(bits & 0x8000) << 16
    let exponent = Int((bits >> 10) & 0x1F)
    let mantissa = UInt32(bits & 0x3FF)
    if exponent == 0 {
        let magnitude = Float(mantissa) * Float(sign: .plus, exponent: -24, significand: 1)
        return sign != 0 ? -magnitude : magnitude
    }
    if exponent == 31 { return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13)) }
    return Float(bitPattern: sign | UInt32(exponent + 112) << 23 | mantissa << 13)
}

/// Float to IEEE 754 half bits, rounding to nearest even (via Swift's Float16 where available).
func floatToHalf(_ value: Float) -> UInt16 {
    #if arch(x86_64) || arch(arm64) || arch(aarch64)
    return Float16(value).bitPattern
    #else
    return 0
    #endif
}

/// Float to bfloat16 bits, rounding to nearest even.
func floatToBFloat16(_ value: Float) -> UInt16 {
    if value.isNaN { return 0x7FC0 }
    let bits = value.bitPattern
    let rounding = 0x7FFF + ((bits >> 16) & 1)
    return UInt16(truncatingIfNeeded: (bits &+ rounding) >> 16)
}
