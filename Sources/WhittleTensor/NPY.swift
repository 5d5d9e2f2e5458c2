/// NumPy `.npy` files (format versions 1.0, 2.0 and 3.0), parsed from and written to bytes (no file I/O here).
///
/// Supported element types: little-endian float32 (`<f4`), float64 (`<f8`, converted to float32), uint8 (`|u1`),
/// int8 (`|i1`), int32 (`<i4`), int64 (`<i8`), bool (`|b1`). C order only. Anything else is refused with a message
/// that names what was found.
public enum NPY {
    /// Largest header accepted, in bytes: a guard against hostile files that claim a huge header.
    public static let maximumHeaderLength = 1 << 20
    private static let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59]  // "\x93NUMPY"

    public static func decode(_ bytes: [UInt8]) throws -> Tensor {
        guard bytes.count >= 10, Array(bytes[0..<6]) == magic else {
            throw TensorError(.malformedNPY, "not a .npy file (missing \\x93NUMPY magic)")
        }
        let major = bytes[6]
        let headerLength: Int
        let headerStart: Int
        switch major {
        case 1:
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8
            headerStart = 10
        case 2, 3:
            guard bytes.count >= 12 else { throw TensorError(.malformedNPY, ".npy header is truncated") }
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8 | Int(bytes[10]) << 16 | Int(bytes[11]) << 24
            headerStart = 12
        default:
            throw TensorError(.malformedNPY, "unsupported .npy format version \(major).\(bytes[7])")
        }
        guard headerLength <= maximumHeaderLength, headerStart + headerLength <= bytes.count else {
            throw TensorError(.malformedNPY, ".npy header length \(headerLength) exceeds the file")
        }
        guard let header = String(validating: bytes[headerStart..<(headerStart + headerLength)], as: UTF8.self) else {
            throw TensorError(.malformedNPY, ".npy header is not valid text")
        }
        let (descr, fortran, shape) = try parseHeader(header)
        if fortran { throw TensorError(.malformedNPY, ".npy file is in Fortran order; only C order is supported") }
        let payload = bytes[(headerStart + headerLength)...]
        return try decodePayload(descr: descr, shape: shape, payload: payload)
    }

    /// Encodes as format 1.0 (2.0 when the header is too long), header padded so the data starts 64-byte aligned.
    public static func encode(_ tensor: Tensor) throws -> [UInt8] {
        let descr: String
        var data: [UInt8] = []
        switch tensor.dtype {
        case .float:
            descr = "<f4"
            data.reserveCapacity(tensor.count * 4)
            tensor.floats.withUnsafeBytes { data.append(contentsOf: $0) }  // little-endian hosts (x86-64, AArch64)
        case .int64:
            descr = "<i8"
            data.reserveCapacity(tensor.count * 8)
            for value in tensor.ints { appendLE(&data, UInt64(bitPattern: value)) }
        case .int32:
            descr = "<i4"
            for value in tensor.ints { appendLE(&data, UInt32(bitPattern: Int32(truncatingIfNeeded: value))) }
        case .uint8:
            descr = "|u1"
            data = tensor.ints.map { UInt8(truncatingIfNeeded: $0) }
        case .int8:
            descr = "|i1"
            data = tensor.ints.map { UInt8(bitPattern: Int8(truncatingIfNeeded: $0)) }
        case .bool:
            descr = "|b1"
            data = tensor.ints.map { $0 != 0 ? 1 : 0 }
        default:
            throw TensorError(.unsupportedDataType, "cannot write \(tensor.dtype) tensors to .npy")
        }
        let shapeText: String
        switch tensor.shape.count {
        case 0: shapeText = "()"
        case 1: shapeText = "(\(tensor.shape[0]),)"
        default: shapeText = "(" + tensor.shape.map(String.init).joined(separator: ", ") + ")"
        }
        var header = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shapeText), }"
        let prefixV1 = 10
        var total = prefixV1 + header.utf8.count + 1
        let useV2 = total + 64 > 65535
        let prefix = useV2 ? 12 : 10
        total = prefix + header.utf8.count + 1
        header += String(repeating: " ", count: (64 - total % 64) % 64) + "\n"
        var out = magic
        out += [useV2 ? 2 : 1, 0]
        let length = header.utf8.count
        if useV2 {
            appendLE(&out, UInt32(length))
        } else {
            appendLE(&out, UInt16(length))
        }
        out += Array(header.utf8)
        out += data
        return out
    }

    // MARK: Header parsing

    static func parseHeader(_ header: String) throws -> (descr: String, fortran: Bool, shape: [Int]) {
        func value(of key: String) throws -> Substring {
            guard let keyRange = header.firstRange(of: "'\(key)'") ?? header.firstRange(of: "\"\(key)\"") else {
                throw TensorError(.malformedNPY, ".npy header has no '\(key)' entry: \(header)")
            }
            var rest = header[keyRange.upperBound...].drop { $0 == " " }
            guard rest.first == ":" else { throw TensorError(.malformedNPY, ".npy header is malformed near '\(key)'") }
            rest = rest.dropFirst().drop { $0 == " " }
            return rest
        }
        let descrRest = try value(of: "descr")
        guard let quote = descrRest.first, quote == "'" || quote == "\"",
            let end = descrRest.dropFirst().firstIndex(of: quote)
        else { throw TensorError(.malformedNPY, ".npy header has a non-string 'descr'") }
        let descr = String(descrRest[descrRest.index(after: descrRest.startIndex)..<end])
        let fortranRest = try value(of: "fortran_order")
        let fortran: Bool
        if fortranRest.hasPrefix("True") {
            fortran = true
        } else if fortranRest.hasPrefix("False") {
            fortran = false
        } else {
            throw TensorError(.malformedNPY, ".npy header has a malformed 'fortran_order'")
        }
        let shapeRest = try value(of: "shape")
        guard shapeRest.first == "(", let close = shapeRest.firstIndex(of: ")") else {
            throw TensorError(.malformedNPY, ".npy header has a malformed 'shape'")
        }
        let inner = shapeRest[shapeRest.index(after: shapeRest.startIndex)..<close]
        var shape: [Int] = []
        for part in inner.split(separator: ",") {
            let trimmed = part.trimmingCharacters(in: " L")
            if trimmed.isEmpty { continue }
            guard let dim = Int(trimmed), dim >= 0 else {
                throw TensorError(.malformedNPY, ".npy shape entry '\(trimmed)' is not a non-negative integer")
            }
            shape.append(dim)
        }
        return (descr, fortran, shape)
    }

    static func decodePayload(descr: String, shape: [Int], payload: ArraySlice<UInt8>) throws -> Tensor {
        guard let count = TensorLimits.elementCount(shape) else {
            throw TensorError(.tooLarge, TensorLimits.limitMessage(shape, "the .npy array"))
        }
        let itemSize: Int
        switch descr {
        case "<f4", "<i4": itemSize = 4
        case "<f8", "<i8": itemSize = 8
        case "|u1", "<u1", "|i1", "<i1", "|b1": itemSize = 1
        case ">f4", ">f8", ">i4", ">i8":
            throw TensorError(.unsupportedDataType, ".npy data is big-endian (\(descr)); only little-endian is supported")
        default:
            throw TensorError(.unsupportedDataType,
                ".npy element type '\(descr)' is not supported (float32, float64, uint8, int8, int32, int64, bool)")
        }
        let needed = count * itemSize  // count ≤ TensorLimits.maximumElements: cannot overflow
        guard payload.count >= needed else {
            throw TensorError(.malformedNPY,
                ".npy data is truncated: shape \(shape) needs \(needed) bytes, file has \(payload.count)")
        }
        let base = payload.startIndex
        switch descr {
        case "<f4":
            var values = [Float](repeating: 0, count: count)
            copyLittleEndian(payload, into: &values)
            return Tensor(shape: shape, floats: values)
        case "<f8":
            var values = [Float](repeating: 0, count: count)
            for i in 0..<count { values[i] = Float(Double(bitPattern: readLE(payload, base + 8 * i, as: UInt64.self))) }
            return Tensor(shape: shape, floats: values)
        case "<i4":
            let values = (0..<count).map { Int64(Int32(bitPattern: readLE(payload, base + 4 * $0, as: UInt32.self))) }
            return Tensor(shape: shape, ints: values, dtype: .int32)
        case "<i8":
            var values = [Int64](repeating: 0, count: count)
            copyLittleEndian(payload, into: &values)
            return Tensor(shape: shape, ints: values, dtype: .int64)
        case "|i1", "<i1":
            return Tensor(shape: shape, ints: (0..<count).map { Int64(Int8(bitPattern: payload[base + $0])) }, dtype: .int8)
        case "|b1":
            return Tensor(shape: shape, ints: (0..<count).map { payload[base + $0] != 0 ? 1 : 0 }, dtype: .bool)
        default:
            return Tensor(shape: shape, ints: (0..<count).map { Int64(payload[base + $0]) }, dtype: .uint8)
        }
    }
}

/// Fills `values` from the start of `bytes`, which hold them in little-endian order (fast path: a memcpy on
/// little-endian hosts).
func copyLittleEndian<T: FixedWidthInteger>(_ bytes: ArraySlice<UInt8>, into values: inout [T]) {
    values.withUnsafeMutableBytes { dst in
        bytes.withUnsafeBytes { src in dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[0..<dst.count])) }
    }
    #if _endian(big)
    for i in values.indices { values[i] = T(littleEndian: values[i]) }
    #endif
}

func copyLittleEndian(_ bytes: ArraySlice<UInt8>, into values: inout [Float]) {
    values.withUnsafeMutableBytes { dst in
        bytes.withUnsafeBytes { src in dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[0..<dst.count])) }
    }
    #if _endian(big)
    for i in values.indices { values[i] = Float(bitPattern: UInt32(littleEndian: values[i].bitPattern)) }
    #endif
}

/// Appends `value` in little-endian byte order.
@inline(__always)
func appendLE<T: FixedWidthInteger>(_ bytes: inout [UInt8], _ value: T) {
    var v = value.littleEndian
    withUnsafeBytes(of: &v) { bytes.append(contentsOf: $0) }
}

/// Reads a little-endian integer at `offset` (an absolute index into the collection).
@inline(__always)
func readLE<T: FixedWidthInteger, C: RandomAccessCollection>(_ bytes: C, _ offset: C.Index, as: T.Type) -> T
where C.Element == UInt8, C.Index == Int {
    var value: T = 0
    for i in 0..<MemoryLayout<T>.size { value |= T(bytes[offset + i]) << (8 * i) }
    return value
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> String {
        String(self.drop { set.contains($0) }.reversed().drop { set.contains($0) }.reversed())
    }
}
