import Crypto
import Testing
import WhittlePrivacy
import WhittleNN

func hex(_ s: String) -> [UInt8] {
    var out: [UInt8] = []
    var i = s.startIndex
    while i < s.endIndex {
        let j = s.index(i, offsetBy: 2)
        out.append(UInt8(s[i..<j], radix: 16)!)
        i = j
    }
    return out
}

/// The cryptographic steps against published test vectors: RFC 8439 (ChaCha20), RFC 5869 (HKDF-SHA256), RFC 7748
/// (X25519).
@Suite struct PrimitivesTests {
    @Test func keystreamIsRFC8439sBlockFunctionVector() throws {
        // RFC 8439 §2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, block counter 1.
        let block = try Primitives.keystream(key: Array(0..<32), nonce: hex("000000090000004a00000000"), counter: 1, bytes: 64)
        #expect(block == hex("10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
            + "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"))
    }

    @Test func hkdfIsRFC5869sFirstCase() {
        let okm = Primitives.hkdf([UInt8](repeating: 0x0b, count: 22), salt: Array(0x00...0x0c), info: Array(0xf0...0xf9), bytes: 42)
        #expect(okm == hex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"))
    }

    @Test func agreementIsRFC7748sX25519Vector() throws {
        let alice = try Curve25519.KeyAgreement.PrivateKey(rawRepresentation: hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
        let bob = try Curve25519.KeyAgreement.PrivateKey(rawRepresentation: hex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"))
        #expect(Array(alice.publicKey.rawRepresentation) == hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"))
        let shared = hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        #expect(try Primitives.agree(alice, Array(bob.publicKey.rawRepresentation)) == shared)
        #expect(try Primitives.agree(bob, Array(alice.publicKey.rawRepresentation)) == shared)
        // Both sides derive one key per label and session; labels and sessions separate them.
        let a = try Primitives.derive(alice, Array(bob.publicKey.rawRepresentation), label: "mask", session: [1])
        #expect(a == (try Primitives.derive(bob, Array(alice.publicKey.rawRepresentation), label: "mask", session: [1])))
        #expect(a != (try Primitives.derive(bob, Array(alice.publicKey.rawRepresentation), label: "envelope", session: [1])))
        #expect(a != (try Primitives.derive(bob, Array(alice.publicKey.rawRepresentation), label: "mask", session: [2])))
        #expect(throws: PrivacyError.self) { try Primitives.agree(alice, [1, 2, 3]) }
    }

    @Test func maskIsTheKeystreamInLittleEndianWordsAcrossSlices() throws {
        // More words than one slice of the expansion, so the slices' counters must continue the stream.
        let seed = Array(UInt8(100)..<UInt8(132)), count = (1 << 17) + 5
        let words = try Primitives.mask(seed: seed, stream: 3, count: count)
        let nonce: [UInt8] = [3, 0, 0, 0, 0, 0, 0, 0, 0x77, 0x68, 0x74, 0x6c]
        let bytes = try Primitives.keystream(key: seed, nonce: nonce, bytes: 8 * count)
        for i in [0, 1, (1 << 17) - 1, 1 << 17, count - 1] {
            let expected = (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[8 * i + $1]) << (8 * $1) }
            #expect(words[i] == expected)
        }
        #expect(try Primitives.mask(seed: seed, stream: 4, count: 4) != Array(words.prefix(4)))
    }

    @Test func envelopesOpenOnlyUnalteredUnderTheirKeyAndContext() throws {
        let key = Array(UInt8(0)..<UInt8(32)), other = Array(UInt8(1)...UInt8(32))
        let sealed = try Primitives.seal([1, 2, 3], key: key, associated: [9])
        #expect(try Primitives.open(sealed, key: key, associated: [9]) == [1, 2, 3])
        var altered = sealed
        altered[altered.count / 2] ^= 1
        for (e, k, a) in [(altered, key, [UInt8(9)]), (sealed, other, [9]), (sealed, key, [8]), (Array(sealed.prefix(5)), key, [9])] {
            #expect(throws: PrivacyError.self) { try Primitives.open(e, key: k, associated: a) }
        }
    }
}

/// Tolerances of the fixed-point ring: a sum of n encoded values is within n half-steps of the real sum.
@Suite struct FixedPointTests {
    @Test func sumsOfEncodedValuesDecodeToTheRealSum() throws {
        let summands = 1000, bound = 8.0
        let code = try FixedPoint(bound: bound, summands: summands)
        // 1000 · 8 = 2^12.97 → ⌈⌉ 13 → 62 − 13 = 49 fraction bits.
        #expect(code.fractionBits == 49)
        var random = SplitMix64(seed: 7)
        let values = (0..<summands).map { _ in Double.random(in: -bound...bound, using: &random) }
        var sum: UInt64 = 0
        for v in values { sum &+= try code.encode(v) }
        let tolerance = Double(summands) / 2 / Double(1 << code.fractionBits)
        #expect(abs(code.decode(sum) - values.reduce(0, +)) <= tolerance)
        // At the bound every summand may sit: the extreme sum does not wrap.
        var extreme: UInt64 = 0
        for _ in 0..<summands { extreme &+= try code.encode(-bound) }
        #expect(code.decode(extreme) == -bound * Double(summands))
    }

    @Test func valuesOutsideTheRangeAreRefused() throws {
        let code = try FixedPoint(bound: 1, summands: 4)
        for bad in [1.5, -2, .nan, .infinity] { #expect(throws: PrivacyError.self) { try code.encode(bad) } }
        #expect(throws: PrivacyError.self) { try FixedPoint(bound: 1e30, summands: 1 << 20) }
        #expect(throws: PrivacyError.self) { try FixedPoint(bound: 0, summands: 1) }
        let counts = FixedPoint.counts(bound: 1e12)
        #expect(counts.decode(try counts.encode(123_456_789) &+ (try counts.encode(1))) == 123_456_790)
        // Counts beyond a Double's 53 bits stay exact on the integer path.
        let big = FixedPoint.counts(bound: 0x1p60)
        let c: UInt64 = (1 << 53) + 1
        #expect(try big.decode(count: try big.encode(count: c) &+ (try big.encode(count: c))) == 2 * c)
        #expect(throws: PrivacyError.self) { try big.decode(count: 0 &- 1) }
        #expect(throws: PrivacyError.self) { try counts.encode(count: 1 << 41) }
        #expect(throws: PrivacyError.self) { try code.encode(count: 1) }
    }
}
