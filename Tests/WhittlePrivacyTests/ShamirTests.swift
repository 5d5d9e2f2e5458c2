import Testing
import WhittlePrivacy
import WhittleNN

/// Shamir sharing over GF(2⁶¹ − 1): field arithmetic and sharing checked on hand-computed cases, then on random
/// secrets against every subset of shares.
@Suite struct ShamirTests {
    static let p = FieldElement.modulus

    @Test func fieldArithmeticMatchesHandComputedCases() {
        let minusOne = FieldElement(Self.p - 1)
        #expect((minusOne * minusOne).value == 1)  // (−1)² = 1
        #expect((minusOne + FieldElement(2)).value == 1)
        #expect((FieldElement(3) - FieldElement(5)).value == Self.p - 2)
        #expect(FieldElement(2).inverse!.value == (Self.p + 1) / 2)
        #expect(FieldElement.zero.inverse == nil)
        // 2³⁰ · 2³⁰ · 2 = 2⁶¹ ≡ 1.
        #expect((FieldElement(1 << 30) * FieldElement(1 << 30) * FieldElement(2)).value == 1)
        var random = SplitMix64(seed: 1)
        for _ in 0..<100 {
            let a = FieldElement(UInt64.random(in: 1..<Self.p, using: &random))
            #expect((a * a.inverse!).value == 1)
        }
    }

    @Test func handComputedSharesCombine() throws {
        // f(x) = 1234 + 166x: f(1) = 1400, f(2) = 1566, f(3) = 1732; 1234 = 0x04d2, a 2-byte secret (d2, 04).
        let shares = [ShamirShare(x: 1, values: [1400]), ShamirShare(x: 2, values: [1566]), ShamirShare(x: 3, values: [1732])]
        for pair in [[0, 1], [0, 2], [1, 2], [2, 0]] {
            #expect(try Shamir.combine(pair.map { shares[$0] }, threshold: 2, secretBytes: 2) == [0xd2, 0x04])
        }
        // f(x) = 7 + (p − 1)x wraps: f(1) = 6, f(2) = 7 + 2p − 2 ≡ 5.
        #expect(try Shamir.combine([ShamirShare(x: 1, values: [6]), ShamirShare(x: 2, values: [5])], threshold: 2, secretBytes: 1) == [7])
    }

    @Test func anyThresholdOfSharesRecoversASecretAndFewerDoNot() throws {
        var random = SplitMix64(seed: 2)
        let secret = (0..<32).map { _ in UInt8.random(in: 0...255, using: &random) }
        let points: [UInt64] = [3, 5, 9, 10, 11, 40, 77]
        let shares = try Shamir.split(secret, threshold: 5, at: points, using: &random)
        #expect(shares.map(\.x) == points && shares.allSatisfy { $0.values.count == 5 })
        // Every 5-subset of the 7 shares.
        for mask in 0..<(1 << 7) where mask.nonzeroBitCount == 5 {
            let subset = shares.indices.filter { mask & (1 << $0) != 0 }.map { shares[$0] }
            #expect(try Shamir.combine(subset, threshold: 5, secretBytes: 32) == secret)
            #expect(try Shamir.combine(subset.reversed(), threshold: 5, secretBytes: 32) == secret)
        }
        #expect(throws: PrivacyError.self) { try Shamir.combine(Array(shares.prefix(4)), threshold: 5, secretBytes: 32) }
        // Four shares and a fifth made up: another secret (or none).
        var forged = Array(shares.prefix(5))
        forged[4].values[0] = (forged[4].values[0] + 1) % Self.p
        #expect((try? Shamir.combine(forged, threshold: 5, secretBytes: 32)) != secret)
    }

    @Test func sharesRoundTripAsBytesAndBadBytesAreRefused() throws {
        var random = SplitMix64(seed: 3)
        let share = try Shamir.split([1, 2, 3, 4, 5, 6, 7, 8], threshold: 2, at: [4, 6], using: &random)[0]
        #expect(try ShamirShare(bytes: share.bytes) == share)
        for bad in [[UInt8](repeating: 0, count: 16), [1, 2, 3], [UInt8](repeating: 0xff, count: 16), [UInt8](repeating: 1, count: 20)] {
            #expect(throws: PrivacyError.self) { try ShamirShare(bytes: bad) }
        }
        #expect(throws: PrivacyError.self) { try Shamir.split([1], threshold: 3, at: [1, 2], using: &random) }
        #expect(throws: PrivacyError.self) { try Shamir.split([1], threshold: 2, at: [1, 1], using: &random) }
        #expect(throws: PrivacyError.self) { try Shamir.split([1], threshold: 1, at: [0], using: &random) }
    }
}
