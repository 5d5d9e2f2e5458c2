import Foundation
import Testing
import WhittleTensor
import WhittleTestSupport

/// `.npz` archives: NumPy's own (np.savez stored, np.savez_compressed deflated),
/// Whittle's writer read back, and damaged archives refused with a clear error.
@Suite struct NPZTests {
    static func fixture(_ path: String) throws -> [UInt8] { try TestSupport.bytes(TestSupport.root.appendingPathComponent(path)) }

    @Test func readsNumPysCompressedArchives() throws {
        let arrays = try NPZ.decode(try Self.fixture("Tests/Fixtures/ops/compressed.npz"))
        #expect(arrays.map(\.name) == ["ids", "mask", "x"])
        #expect(arrays[0].tensor.dtype == .int64 && arrays[0].tensor.shape == [3, 7])
        #expect(Array(arrays[0].tensor.ints.prefix(7)) == [17, 4, 59, 51, 30, 37, 93])  // printed by numpy
        #expect(arrays[1].tensor.dtype == .bool && arrays[1].tensor.ints.reduce(0, +) == 14)
        #expect(arrays[2].tensor.shape == [2, 5] && abs(arrays[2].tensor.floats[0] - -0.57344526) < 1e-7)
    }

    @Test func readsNumPysStoredArchives() throws {
        let arrays = try NPZ.decode(try Self.fixture("Tests/Fixtures/zoo/bert_cls_op17.inputs.npz"))
        #expect(arrays.map(\.name) == ["input_ids", "attention_mask"])
        #expect(arrays.allSatisfy { $0.tensor.shape == [2, 16] && $0.tensor.dtype == .int64 })
    }

    @Test func writesWhatItReads() throws {
        let arrays: [(name: String, tensor: Tensor)] = [
            ("a", Tensor(shape: [2, 3], floats: [1, 2, 3, 4, 5, 6])), ("ids", Tensor(shape: [4], ints: [0, -1, 7, 1 << 40])),
        ]
        let back = try NPZ.decode(try NPZ.encode(arrays))
        #expect(back.map(\.name) == ["a", "ids"] && back[0].tensor == arrays[0].tensor && back[1].tensor == arrays[1].tensor)
    }

    @Test func damagedArchivesAreRefused() throws {
        let good = try NPZ.encode([("x", Tensor(shape: [3], floats: [1, 2, 3]))])
        func refused(_ bytes: [UInt8], _ words: String) {
            #expect { try NPZ.decode(bytes) } throws: { "\($0)".contains(words) }
        }
        refused([], "no end-of-central-directory record")
        refused(Array("not a zip file at all, just some text".utf8), "no end-of-central-directory record")
        refused(Array(good.prefix(good.count - 30)), "not a valid .npz archive")
        // A flipped bit in the member's data fails its CRC-32.
        var flipped = good
        flipped[30 + 5 + 80] ^= 0x01
        refused(flipped, "CRC-32")
        // A stored member whose two sizes differ; a deflated one claiming more than deflate can expand to (a zip
        // bomb's claim), refused before anything is allocated.
        var sizes = good
        let central = good.count - 22 - (46 + 5)
        sizes[central + 24] ^= 0x10
        refused(sizes, "two sizes")
        var bomb = try Self.fixture("Tests/Fixtures/ops/compressed.npz")
        // The central directory's offset, from the end record; its first entry's uncompressed size set to 1.8 GiB.
        let start = Int(bomb[bomb.count - 6]) | Int(bomb[bomb.count - 5]) << 8 | Int(bomb[bomb.count - 4]) << 16
        bomb[start + 24] = 0x00; bomb[start + 25] = 0x00; bomb[start + 26] = 0x00; bomb[start + 27] = 0x70
        refused(bomb, "compressed ones")
        // A member that is not a .npy array.
        let text = try NPZ.encode([("x", Tensor(shape: [1], floats: [1]))]).map { $0 }
        var renamed = text
        for i in renamed.indices where i + 5 <= renamed.count && Array(renamed[i..<(i + 5)]) == Array("x.npy".utf8) {
            renamed[i + 4] = UInt8(ascii: "z")
        }
        refused(renamed, "is not a .npy array")
    }
}
