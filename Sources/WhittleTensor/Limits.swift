/// The bounds every shape that arrives from outside Whittle (a model file, a .npy header, a wire message, shape
/// inference over a model's attributes) is checked against before it reaches arithmetic or an allocation, so a
/// hostile size becomes an error instead of an overflow trap or a giant allocation.
public enum TensorLimits {
    /// The most elements one tensor may hold: 2^30 (4 GiB as float32). Far above any activation or weight of the
    /// models Whittle compresses (ResNet-50 at batch 32: 26 M elements), far below what overflows `Int` when
    /// multiplied by an element size or a second such count.
    public static let maximumElements = 1 << 30

    /// The element count of `shape`, or nil when a dimension is negative or larger than `maximumElements`, or the
    /// product is. A shape with a zero dimension counts 0 elements whatever its other dimensions (each still bounded).
    public static func elementCount<S: Sequence>(_ shape: S) -> Int? where S.Element == Int {
        var count = 1
        var zero = false
        for dim in shape {
            guard dim >= 0, dim <= maximumElements else { return nil }
            if dim == 0 { zero = true; continue }
            guard !zero else { continue }
            let (product, overflow) = count.multipliedReportingOverflow(by: dim)
            guard !overflow, product <= maximumElements else { return nil }
            count = product
        }
        return zero ? 0 : count
    }

    /// `elementCount`, throwing a `TensorError` (code `tooLarge`) that names `what` when the shape is out of bounds.
    public static func checkedElementCount(_ shape: [Int], _ what: @autoclosure () -> String) throws -> Int {
        guard let count = elementCount(shape) else {
            throw TensorError(.tooLarge, limitMessage(shape, what()))
        }
        return count
    }

    /// The message for a shape out of bounds: names the shape, what holds it and the limit.
    public static func limitMessage(_ shape: [Int], _ what: String) -> String {
        if shape.contains(where: { $0 < 0 }) { return "\(what) has a negative dimension (shape \(shape))" }
        return "\(what) would have shape \(shape), more than the \(maximumElements) elements one tensor may hold"
    }

    /// `a + b`, or nil on overflow: for sizes computed from attributes (pads, window extents).
    @inline(__always)
    public static func sum(_ a: Int, _ b: Int) -> Int? {
        let (s, overflow) = a.addingReportingOverflow(b)
        return overflow ? nil : s
    }

    /// `a · b`, or nil on overflow.
    @inline(__always)
    public static func product(_ a: Int, _ b: Int) -> Int? {
        let (p, overflow) = a.multipliedReportingOverflow(by: b)
        return overflow ? nil : p
    }

    /// `value` converted to Int when it is finite and within ±`maximumElements` (a size or index computed in
    /// floating point, such as a Resize output size), else nil.
    @inline(__always)
    public static func integer(_ value: Double) -> Int? {
        guard value.isFinite, abs(value) <= Double(maximumElements) else { return nil }
        return Int(value)
    }
}
