/// Real numbers in the ring of integers modulo 2⁶⁴ that secure aggregation sums in: x ↦ round(x · 2^f) as a two's
/// complement word. Sums of up to `summands` values of magnitude at most `bound` never wrap, so the ring's sum
/// decodes to the real sum within `summands · 2^−(f+1)`. Counts (histograms, samples) use f = 0 and are exact.
public struct FixedPoint: Sendable, Equatable {
    public let fractionBits: Int
    public let bound: Double

    /// The finest scale for which `summands` values in [−bound, bound] sum without wrapping: f is the largest with
    /// summands · bound · 2^f < 2⁶², at most 52 (a Double's mantissa; finer steps carry nothing).
    public init(bound: Double, summands: Int) throws {
        guard bound.isFinite, bound > 0, summands >= 1 else {
            throw PrivacyError(.invalidArgument, "a fixed-point range needs a finite, positive bound and at least one summand")
        }
        let room = 62 - (Double(summands) * bound).log2Ceiling
        guard room >= 0 else {
            throw PrivacyError(.outOfRange, "\(summands) values up to \(bound) do not fit the 64-bit ring")
        }
        self.init(fractionBits: min(52, room), bound: bound)
    }

    public init(fractionBits: Int, bound: Double) {
        self.fractionBits = fractionBits
        self.bound = bound
    }

    /// Integers (f = 0) up to `bound`.
    public static func counts(bound: Double) -> FixedPoint { FixedPoint(fractionBits: 0, bound: bound) }

    var scale: Double { Double(sign: .plus, exponent: fractionBits, significand: 1) }

    /// `x`'s word; throws for a value beyond the bound or not finite (callers clip first).
    public func encode(_ x: Double) throws -> UInt64 {
        guard x.isFinite, abs(x) <= bound else {
            throw PrivacyError(.outOfRange, "\(x) is outside the fixed-point range ±\(bound)")
        }
        return UInt64(bitPattern: Int64((x * scale).rounded()))
    }

    /// A count's word, exactly (no detour through Double): only for f = 0, within the bound.
    public func encode(count: UInt64) throws -> UInt64 {
        guard fractionBits == 0, Double(count) <= bound, count < 1 << 62 else {
            throw PrivacyError(.outOfRange, "the count \(count) is outside the range 0…\(bound) of an integer code")
        }
        return count
    }

    /// The count a word (a sum of encoded counts) stands for, exactly; throws for a negative or wrapped sum.
    public func decode(count word: UInt64) throws -> UInt64 {
        guard fractionBits == 0, word < 1 << 63 else {
            throw PrivacyError(.outOfRange, "a sum of counts decodes to a negative number (the sum wrapped or a report was forged)")
        }
        return word
    }

    /// The real number a word (a sum of encoded values) stands for.
    public func decode(_ word: UInt64) -> Double { Double(Int64(bitPattern: word)) / scale }
}

extension Double {
    /// ⌈log₂ self⌉ for a positive finite value.
    var log2Ceiling: Int {
        let e = Int(exponent)
        return significand == 1 ? e : e + 1
    }
}
