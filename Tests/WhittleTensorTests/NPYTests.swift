import Testing
import WhittleTensor
import WhittleTestSupport

@Suite struct NPYTests {
    @Test func floatRoundTrip() throws {
        let t = Tensor(shape: [2, 3], floats: [1, -2, 3.5, 0, .pi, -0.0])
        let back = try NPY.decode(try NPY.encode(t))
        #expect(back == t)
    }

    @Test(arguments: [DataType.int64, .int32, .uint8, .int8, .bool])
    func integerRoundTrip(_ type: DataType) throws {
        let values: [Int64] = type == .bool ? [0, 1, 1, 0] : type == .uint8 ? [0, 7, 200, 255] : [-5, 0, 7, 100]
        let t = Tensor(shape: [4], ints: values, dtype: type)
        #expect(try NPY.decode(try NPY.encode(t)) == t)
    }

    @Test func scalarAndEmptyShapes() throws {
        let scalar = Tensor(shape: [], floats: [42])
        #expect(try NPY.decode(try NPY.encode(scalar)) == scalar)
        let empty = Tensor(shape: [0, 3], floats: [])
        #expect(try NPY.decode(try NPY.encode(empty)) == empty)
    }

    @Test func dataStartsAligned() throws {
        let bytes = try NPY.encode(Tensor(shape: [5], floats: [1, 2, 3, 4, 5]))
        #expect((bytes.count - 20) % 64 == 0)
    }

    @Test func readsFilesWrittenByNumPy() throws {
        // Written by numpy (scripts/make_fixtures.py): float32, C order, version 1.0.
        let x = try TestSupport.npy("resnet_bn_op13.input.npy")
        #expect(x.shape == [4, 3, 32, 32])
        #expect(x.dtype == .float)
    }

    @Test func readsVersion2And3Headers() throws {
        for version: UInt8 in [2, 3] {
            let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }".padding(to: 116) + "\n"
            var bytes: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, version, 0]
            let length = UInt32(header.utf8.count)
            bytes += [UInt8(length & 0xFF), UInt8(length >> 8 & 0xFF), 0, 0]
            bytes += Array(header.utf8)
            bytes += [7, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
            let t = try NPY.decode(bytes)
            #expect(t.ints == [7, -1])
        }
    }

    @Test(arguments: [
        ("garbage", Array("hello world, not numpy".utf8), TensorError.Code.malformedNPY),
        ("empty", [], .malformedNPY),
    ])
    func refusesNonNPY(_ name: String, _ bytes: [UInt8], _ code: TensorError.Code) {
        #expect { try NPY.decode(bytes) } throws: { ($0 as? TensorError)?.code == code }
    }

    @Test func refusesTruncatedData() throws {
        var bytes = try NPY.encode(Tensor(shape: [4, 4], floats: [Float](repeating: 1, count: 16)))
        bytes.removeLast(5)
        #expect { try NPY.decode(bytes) } throws: { error in
            let e = error as? TensorError
            return e?.code == .malformedNPY && e!.message.contains("truncated")
        }
    }

    @Test func refusesFortranOrderBigEndianAndUnknownTypes() throws {
        func file(_ header: String) -> [UInt8] {
            var bytes: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, 1, 0]
            let h = header.padding(to: 117) + "\n"
            bytes += [UInt8(h.utf8.count), 0] + Array(h.utf8) + [UInt8](repeating: 0, count: 64)
            return bytes
        }
        #expect(throws: TensorError.self) { try NPY.decode(file("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }")) }
        #expect(throws: TensorError.self) { try NPY.decode(file("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }")) }
        #expect(throws: TensorError.self) { try NPY.decode(file("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }")) }
        #expect(throws: TensorError.self) { try NPY.decode(file("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }")) }
        #expect(throws: TensorError.self) { try NPY.decode(file("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }")) }
    }

    /// Bounded fuzzing: random mutations of a valid file either decode or throw, never crash.
    @Test func fuzzedHeadersNeverCrash() throws {
        let valid = try NPY.encode(Tensor(shape: [3, 2], floats: [1, 2, 3, 4, 5, 6]))
        var state: UInt64 = 12345
        func next() -> Int {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Int(state >> 33)
        }
        for _ in 0..<3000 {
            var bytes = valid
            for _ in 0..<(1 + next() % 4) {
                let i = next() % bytes.count
                bytes[i] = UInt8(truncatingIfNeeded: next())
            }
            if next() % 5 == 0 { bytes.removeLast(next() % bytes.count) }
            _ = try? NPY.decode(bytes)
        }
    }
}

extension String {
    fileprivate func padding(to length: Int) -> String { self + String(repeating: " ", count: max(0, length - count)) }
}
