import CZlib

/// NumPy `.npz` archives (`np.savez`, `np.savez_compressed`): a ZIP file of `.npy` members, one per named array.
/// Parsed from and written to bytes (no file I/O here). The reader follows the central directory (ZIP64 included,
/// as NumPy writes it), accepts stored and deflated members, checks every member's CRC-32 and declared size, and
/// refuses archives whose members would exceed `maximumBytes` in all. The writer stores members uncompressed.
public enum NPZ {
    /// Largest total of uncompressed member bytes read from one archive.
    public static let maximumBytes = 4 << 30

    /// The arrays of an archive in archive order, named without the `.npy` suffix.
    public static func decode(_ bytes: [UInt8]) throws -> [(name: String, tensor: Tensor)] {
        let entries = try centralDirectory(bytes)
        var total = 0
        var out: [(String, Tensor)] = []
        for entry in entries {
            guard entry.name.hasSuffix(".npy") else {
                throw TensorError(.malformedNPY, ".npz member '\(entry.name)' is not a .npy array")
            }
            total += entry.size
            guard total <= maximumBytes else {
                throw TensorError(.tooLarge, ".npz members add up to more than \(maximumBytes) bytes")
            }
            let member = try data(of: entry, in: bytes)
            let tensor: Tensor
            do {
                tensor = try NPY.decode(member)
            } catch let error as TensorError {
                throw TensorError(error.code, ".npz member '\(entry.name)': \(error.message)")
            }
            out.append((String(entry.name.dropLast(4)), tensor))
        }
        guard Set(out.map(\.0)).count == out.count else { throw TensorError(.malformedNPY, ".npz archive names an array twice") }
        return out
    }

    /// An archive of `arrays` (stored, ZIP64 not needed below 4 GiB per member), as `np.savez` would read it.
    public static func encode(_ arrays: [(name: String, tensor: Tensor)]) throws -> [UInt8] {
        var out: [UInt8] = [], directory: [UInt8] = []
        for (name, tensor) in arrays {
            let member = try NPY.encode(tensor)
            guard member.count < 0xFFFF_FFFF, out.count < 0xFFFF_FFFF else {
                throw TensorError(.tooLarge, ".npz members of 4 GiB or more are not written")
            }
            let file = Array((name + ".npy").utf8)
            let crc = UInt32(member.withUnsafeBufferPointer { crc32(0, $0.baseAddress, uInt($0.count)) })
            let offset = UInt32(out.count)
            func header(_ signature: UInt32, central: Bool) -> [UInt8] {
                var h: [UInt8] = []
                le(&h, signature)
                if central { le16(&h, 20) }                // version made by
                le16(&h, 20); le16(&h, 0); le16(&h, 0)     // version needed, flags, method (stored)
                le16(&h, 0); le16(&h, 0x21)                // time, date (1980-01-01)
                le(&h, crc); le(&h, UInt32(member.count)); le(&h, UInt32(member.count))
                le16(&h, UInt16(file.count)); le16(&h, 0)  // name length, extra length
                if central {
                    le16(&h, 0); le16(&h, 0); le16(&h, 0)  // comment length, disk, internal attributes
                    le(&h, 0); le(&h, offset)              // external attributes, local header offset
                }
                return h + file
            }
            out += header(0x0403_4B50, central: false) + member
            directory += header(0x0201_4B50, central: true)
        }
        let start = UInt32(out.count)
        out += directory
        var end: [UInt8] = []
        le(&end, 0x0605_4B50); le16(&end, 0); le16(&end, 0)
        le16(&end, UInt16(arrays.count)); le16(&end, UInt16(arrays.count))
        le(&end, UInt32(directory.count)); le(&end, start); le16(&end, 0)
        return out + end
    }

    struct Entry {
        var name: String
        var method: UInt16
        var crc: UInt32
        var compressedSize: Int
        var size: Int
        var offset: Int
    }

    static func malformed(_ what: String) -> TensorError { TensorError(.malformedNPY, "not a valid .npz archive: \(what)") }

    static func u16(_ b: [UInt8], _ at: Int) throws -> Int {
        guard at >= 0, at + 2 <= b.count else { throw malformed("truncated") }
        return Int(b[at]) | Int(b[at + 1]) << 8
    }

    static func u32(_ b: [UInt8], _ at: Int) throws -> Int {
        let low = try u16(b, at), high = try u16(b, at + 2)
        return low | high << 16
    }

    static func u64(_ b: [UInt8], _ at: Int) throws -> Int {
        let low = try u32(b, at), high = try u32(b, at + 4)
        guard high < 1 << 30 else { throw malformed("a size or offset is out of range") }
        return low | high << 32
    }

    /// The members listed by the central directory.
    static func centralDirectory(_ b: [UInt8]) throws -> [Entry] {
        // The end-of-central-directory record: the last signature within its 22 bytes plus a comment.
        var end = b.count - 22
        let lowest = max(0, b.count - 22 - 0xFFFF)
        while end >= lowest, try u32(b, end) != 0x0605_4B50 { end -= 1 }
        guard end >= lowest, end >= 0 else { throw malformed("no end-of-central-directory record (not a ZIP file)") }
        var count = try u16(b, end + 10), start = try u32(b, end + 16)
        if count == 0xFFFF || start == 0xFFFF_FFFF {
            // ZIP64: the locator just before the record points to the ZIP64 end record.
            guard end >= 20, try u32(b, end - 20) == 0x0706_4B50 else { throw malformed("ZIP64 locator missing") }
            let record = try u64(b, end - 12)
            guard try u32(b, record) == 0x0606_4B50 else { throw malformed("ZIP64 end record missing") }
            count = try u64(b, record + 32)
            start = try u64(b, record + 48)
        }
        guard count <= 100_000 else { throw malformed("\(count) members") }
        var entries: [Entry] = []
        var at = start
        for _ in 0..<count {
            guard try u32(b, at) == 0x0201_4B50 else { throw malformed("central directory entry \(entries.count) is damaged") }
            let flags = try u16(b, at + 8)
            guard flags & 1 == 0 else { throw malformed("encrypted members are not supported") }
            var entry = Entry(name: "", method: UInt16(try u16(b, at + 10)), crc: UInt32(try u32(b, at + 16)),
                              compressedSize: try u32(b, at + 20), size: try u32(b, at + 24), offset: try u32(b, at + 42))
            let nameLength = try u16(b, at + 28), extraLength = try u16(b, at + 30), commentLength = try u16(b, at + 32)
            guard at + 46 + nameLength <= b.count, let name = String(validating: b[(at + 46)..<(at + 46 + nameLength)], as: UTF8.self) else {
                throw malformed("a member name is not valid text")
            }
            entry.name = name
            // ZIP64 extra field: the 64-bit values of the fields that hold 0xFFFFFFFF, in this order.
            var extra = at + 46 + nameLength
            let extraEnd = extra + extraLength
            while extra + 4 <= extraEnd {
                let id = try u16(b, extra), length = try u16(b, extra + 2)
                if id == 1 {
                    var field = extra + 4
                    if entry.size == 0xFFFF_FFFF { entry.size = try u64(b, field); field += 8 }
                    if entry.compressedSize == 0xFFFF_FFFF { entry.compressedSize = try u64(b, field); field += 8 }
                    if entry.offset == 0xFFFF_FFFF { entry.offset = try u64(b, field) }
                }
                extra += 4 + length
            }
            entries.append(entry)
            at = extraEnd + commentLength
        }
        return entries
    }

    /// A member's uncompressed bytes, checked against its declared size and CRC-32.
    static func data(of entry: Entry, in b: [UInt8]) throws -> [UInt8] {
        guard try u32(b, entry.offset) == 0x0403_4B50 else { throw malformed("member '\(entry.name)' has no local header") }
        let nameLength = try u16(b, entry.offset + 26), extraLength = try u16(b, entry.offset + 28)
        let start = entry.offset + 30 + nameLength + extraLength
        guard entry.compressedSize >= 0, start + entry.compressedSize <= b.count else {
            throw malformed("member '\(entry.name)' extends past the end of the file")
        }
        guard entry.size <= maximumBytes else { throw TensorError(.tooLarge, ".npz member '\(entry.name)' declares \(entry.size) bytes") }
        var out: [UInt8]
        switch entry.method {
        case 0:
            guard entry.compressedSize == entry.size else { throw malformed("stored member '\(entry.name)' has two sizes") }
            out = Array(b[start..<(start + entry.size)])
        case 8:
            // Deflate expands at most 1032:1; a larger claim is a damaged or hostile archive (nothing is allocated).
            guard entry.size <= entry.compressedSize * 1032 + 64 else {
                throw malformed("member '\(entry.name)' claims \(entry.size) bytes from \(entry.compressedSize) compressed ones")
            }
            out = [UInt8](repeating: 0, count: entry.size)
            var stream = z_stream()
            guard inflateInit2_(&stream, -MAX_WBITS, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
                throw malformed("cannot start decompression")
            }
            defer { inflateEnd(&stream) }
            let status: Int32 = b.withUnsafeBufferPointer { source in
                out.withUnsafeMutableBufferPointer { target in
                    stream.next_in = UnsafeMutablePointer(mutating: source.baseAddress! + start)
                    stream.avail_in = uInt(entry.compressedSize)
                    stream.next_out = target.baseAddress
                    stream.avail_out = uInt(target.count)
                    return inflate(&stream, Z_FINISH)
                }
            }
            guard status == Z_STREAM_END, Int(stream.total_out) == entry.size else {
                throw malformed("member '\(entry.name)' does not decompress to its declared \(entry.size) bytes")
            }
        default:
            throw malformed("member '\(entry.name)' uses compression method \(entry.method) (only stored and deflate are read)")
        }
        let crc = UInt32(out.withUnsafeBufferPointer { crc32(0, $0.baseAddress, uInt($0.count)) })
        guard crc == entry.crc else { throw malformed("member '\(entry.name)' fails its CRC-32 check") }
        return out
    }

    static func le(_ out: inout [UInt8], _ v: UInt32) { for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    static func le16(_ out: inout [UInt8], _ v: UInt16) { out.append(UInt8(v & 0xFF)); out.append(UInt8(v >> 8)) }
}
