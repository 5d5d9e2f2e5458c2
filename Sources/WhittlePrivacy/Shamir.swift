/// Shamir secret sharing over the prime field of p = 2⁶¹ − 1 (a Mersenne prime, so a product reduces with shifts).
/// A secret of any length is cut into 7-byte chunks (each below p), and every chunk is shared by its own random
/// polynomial of degree `threshold − 1` evaluated at the same points: any `threshold` shares give the secret back,
/// fewer say nothing about it (every value of a chunk is equally likely given them).

/// An element of GF(2⁶¹ − 1).
public struct FieldElement: Hashable, Sendable, CustomStringConvertible {
    public static let modulus: UInt64 = (1 << 61) - 1
    public let value: UInt64

    /// `value` must be below the modulus (`reduced` otherwise).
    public init(_ value: UInt64) {
        precondition(value < Self.modulus, "a field element must be below 2^61 - 1")
        self.value = value
    }

    public static func reduced(_ v: UInt64) -> FieldElement {
        var r = (v & modulus) &+ (v >> 61)
        if r >= modulus { r -= modulus }
        return FieldElement(r)
    }

    public static let zero = FieldElement(0)
    public static let one = FieldElement(1)

    public static func + (a: FieldElement, b: FieldElement) -> FieldElement {
        let s = a.value + b.value  // < 2⁶², no overflow
        return FieldElement(s >= modulus ? s - modulus : s)
    }

    public static func - (a: FieldElement, b: FieldElement) -> FieldElement {
        FieldElement(a.value >= b.value ? a.value - b.value : a.value + modulus - b.value)
    }

    public static func * (a: FieldElement, b: FieldElement) -> FieldElement {
        // The 122-bit product hi·2⁶⁴ + lo; 2⁶¹ ≡ 1, so it is (product >> 61) + (product & p), then one fold more.
        let (hi, lo) = a.value.multipliedFullWidth(by: b.value)
        let high = (hi << 3) | (lo >> 61)  // < 2⁶¹
        return reduced(high + (lo & modulus))
    }

    /// a^e by squaring.
    public func power(_ e: UInt64) -> FieldElement {
        var result = FieldElement.one, base = self, e = e
        while e > 0 {
            if e & 1 == 1 { result = result * base }
            base = base * base
            e >>= 1
        }
        return result
    }

    /// The multiplicative inverse (Fermat: a^(p−2)); nil for zero.
    public var inverse: FieldElement? { value == 0 ? nil : power(Self.modulus - 2) }

    public var description: String { "\(value)" }
}

/// One holder's share of a secret: the evaluation point and one value per 7-byte chunk.
public struct ShamirShare: Hashable, Sendable {
    public var x: UInt64
    public var values: [UInt64]

    public init(x: UInt64, values: [UInt64]) {
        self.x = x
        self.values = values
    }

    /// 8 bytes of x, then 8 per chunk, little-endian.
    public var bytes: [UInt8] { ([x] + values).flatMap { v in (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } } }

    public init(bytes: [UInt8]) throws {
        guard bytes.count >= 16, bytes.count % 8 == 0 else {
            throw PrivacyError(.malformed, "a Shamir share is 8 bytes of point and 8 per chunk, not \(bytes.count) bytes")
        }
        let words = stride(from: 0, to: bytes.count, by: 8).map { o in (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[o + $1]) << (8 * $1) } }
        guard words.allSatisfy({ $0 < FieldElement.modulus }), words[0] != 0 else {
            throw PrivacyError(.malformed, "a Shamir share holds a value outside the field or the point 0")
        }
        self.init(x: words[0], values: Array(words.dropFirst()))
    }
}

public enum Shamir {
    /// Bytes per field element of a secret (7 · 8 = 56 bits < 61).
    public static let chunkBytes = 7

    public static func chunks(of secretBytes: Int) -> Int { (secretBytes + chunkBytes - 1) / chunkBytes }

    /// Shares of `secret` at the points `xs` (distinct, non-zero, below the modulus), any `threshold` of which
    /// recover it. The polynomials' coefficients come from `random`.
    public static func split<R: RandomNumberGenerator>(_ secret: [UInt8], threshold: Int, at xs: [UInt64],
                                                       using random: inout R) throws -> [ShamirShare] {
        guard threshold >= 1, threshold <= xs.count else {
            throw PrivacyError(.invalidArgument, "a threshold of \(threshold) for \(xs.count) shares")
        }
        guard Set(xs).count == xs.count, xs.allSatisfy({ $0 != 0 && $0 < FieldElement.modulus }) else {
            throw PrivacyError(.invalidArgument, "Shamir points must be distinct, non-zero field elements")
        }
        var shares = xs.map { ShamirShare(x: $0, values: []) }
        for c in 0..<chunks(of: secret.count) {
            var constant: UInt64 = 0
            for (k, byte) in secret[(c * chunkBytes)..<min(secret.count, (c + 1) * chunkBytes)].enumerated() {
                constant |= UInt64(byte) << (8 * k)
            }
            let coefficients = [FieldElement(constant)]
                + (1..<threshold).map { _ in FieldElement(UInt64.random(in: 0..<FieldElement.modulus, using: &random)) }
            for s in shares.indices {
                // Horner: a₀ + x(a₁ + x(a₂ + …)).
                let x = FieldElement(shares[s].x)
                shares[s].values.append(coefficients.reversed().reduce(FieldElement.zero) { $0 * x + $1 }.value)
            }
        }
        return shares
    }

    /// The secret of `secretBytes` bytes from `threshold` of its shares (the first `threshold` given; more are
    /// ignored). Shares of another secret or a tampered share give another secret: callers that can check the
    /// result (a commitment, a public key) do.
    public static func combine(_ shares: [ShamirShare], threshold: Int, secretBytes: Int) throws -> [UInt8] {
        guard threshold >= 1, shares.count >= threshold else {
            throw PrivacyError(.notEnoughShares, "\(shares.count) shares, \(threshold) needed")
        }
        let used = Array(shares.prefix(threshold))
        let count = chunks(of: secretBytes)
        guard Set(used.map(\.x)).count == used.count, used.allSatisfy({ $0.x != 0 && $0.values.count == count }) else {
            throw PrivacyError(.malformed, "shares with repeated points, the point 0, or not \(count) chunks each")
        }
        // Lagrange weights at 0: wᵢ = Π_{j≠i} xⱼ / (xⱼ − xᵢ).
        let xs = used.map { FieldElement($0.x) }
        var weights: [FieldElement] = []
        for i in xs.indices {
            var numerator = FieldElement.one, denominator = FieldElement.one
            for j in xs.indices where j != i {
                numerator = numerator * xs[j]
                denominator = denominator * (xs[j] - xs[i])
            }
            weights.append(numerator * denominator.inverse!)  // points distinct, so never zero
        }
        var secret: [UInt8] = []
        for c in 0..<count {
            let value = used.indices.reduce(FieldElement.zero) { $0 + weights[$1] * FieldElement(used[$1].values[c]) }.value
            let bytes = min(chunkBytes, secretBytes - c * chunkBytes)
            // A chunk holds `bytes` bytes; anything above them means the shares are not of one secret this long.
            guard value >> (8 * bytes) == 0 else {
                throw PrivacyError(.malformed, "the shares do not combine to a secret of \(secretBytes) bytes (a share is corrupt or of another secret)")
            }
            for k in 0..<bytes { secret.append(UInt8(truncatingIfNeeded: value >> (8 * k))) }
        }
        return secret
    }
}
