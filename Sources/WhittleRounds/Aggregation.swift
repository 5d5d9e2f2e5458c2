import WhittleTensor

/// Aggregation of workers' weight deltas (ALGORITHMS.md, "Fine-tuning and recovery"). Pure: deltas in, deltas out.

/// One worker's report for a fine-tuning phase: per-parameter weight deltas (new − old) and the number of samples
/// they were computed on.
public struct ModelUpdate: Sendable {
    public var deltas: [String: Tensor]
    public var samples: Int

    public init(deltas: [String: Tensor], samples: Int) {
        self.deltas = deltas
        self.samples = samples
    }

    /// √(Σ δ²) over every parameter, summed in the parameters' name order (the same on every machine, so a worker
    /// that clips before masking and a coordinator that clips in the clear compute the same factor).
    public var norm: Double {
        deltas.keys.sorted().reduce(0.0) { sum, name in sum + deltas[name]!.floats.withUnsafeBufferPointer { FoldKernels.squaredSum($0) } }
            .squareRoot()
    }
}

public struct AggregationError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable { case invalidUpdate, empty }
    public let code: Code
    public let description: String
    public init(_ code: Code, _ message: String) {
        self.code = code
        description = message
    }
}

/// Checks a report before it is aggregated: the parameters and shapes the round expects, a positive sample count
/// no larger than the worker declared, finite values. A refused report changes nothing.
public struct UpdateValidator: Sendable {
    public let shapes: [String: [Int]]
    public let maximumSamples: Int

    public init(shapes: [String: [Int]], maximumSamples: Int = Int.max) {
        self.shapes = shapes
        self.maximumSamples = maximumSamples
    }

    public func validate(_ update: ModelUpdate) throws {
        try validateStructure(update)
        for (name, delta) in update.deltas {
            if let bad = delta.floats.firstIndex(where: { !$0.isFinite }) {
                throw AggregationError(.invalidUpdate, "parameter '\(name)' has a non-finite value (\(delta.floats[bad])) at index \(bad)")
            }
        }
    }

    /// Everything `validate` checks but the values: the sample count, the parameters and their shapes.
    public func validateStructure(_ update: ModelUpdate) throws {
        guard update.samples > 0, update.samples <= maximumSamples else {
            throw AggregationError(.invalidUpdate, "the update claims \(update.samples) samples; expected 1…\(maximumSamples)")
        }
        let missing = Set(shapes.keys).subtracting(update.deltas.keys), extra = Set(update.deltas.keys).subtracting(shapes.keys)
        guard missing.isEmpty, extra.isEmpty else {
            throw AggregationError(.invalidUpdate, "the update's parameters differ from the round's: missing \(missing.sorted()), unexpected \(extra.sorted())")
        }
        for (name, delta) in update.deltas {
            guard delta.shape == shapes[name]!, delta.dtype == .float, delta.floats.count == shapes[name]!.reduce(1, *) else {
                throw AggregationError(.invalidUpdate, "parameter '\(name)' has shape \(delta.shape), the round expects \(shapes[name]!)")
            }
        }
    }
}

/// The factor that scales an update of norm `norm` down to `maximum`, in Float as the update's values are scaled;
/// nil when it needs none.
public func clipFactor(norm: Double, maximum: Double) -> Float? {
    guard norm > maximum, norm > 0 else { return nil }
    return Float(maximum / norm)
}

/// Scales an update down so its norm is at most `maximum` (per-update norm clipping).
public func clipped(_ update: ModelUpdate, to maximum: Double) -> ModelUpdate {
    guard let factor = clipFactor(norm: update.norm, maximum: maximum) else { return update }
    var out = update
    for (name, t) in update.deltas { out.deltas[name] = Tensor(shape: t.shape, floats: t.floats.map { $0 * factor }) }
    return out
}

/// FedAvg, streaming: each accepted report is folded in on arrival, so memory grows with the model, not with the
/// number of workers. `θ ← θ + Σ_k n_k Δ_k / Σ_k n_k`, sums in Double.
///
/// A fold reads each delta twice and copies nothing: one pass checks it is finite and sums its squares (the norm
/// clipping needs, reported as the update's norm), the second multiplies-adds it into the sums in place, the clip
/// factor folded into the weight. Nothing changes until every check passed.
public struct FedAvgAccumulator: Sendable {
    public let validator: UpdateValidator
    public let clipNorm: Double?
    var sums: [String: [Double]]
    public private(set) var samples = 0
    public private(set) var updates = 0

    public init(validator: UpdateValidator, clipNorm: Double? = nil) {
        self.validator = validator
        self.clipNorm = clipNorm
        sums = validator.shapes.mapValues { [Double](repeating: 0, count: $0.reduce(1, *)) }
    }

    /// Validates and folds in one update; returns its norm before clipping.
    @discardableResult
    public mutating func add(_ update: ModelUpdate) throws -> Double {
        try validator.validateStructure(update)
        let norm = update.norm
        // A float's square cannot overflow a Double: the norm is finite exactly when every value is. Only then are
        // the values searched, for the refusal that names the parameter and index.
        if !norm.isFinite {
            try validator.validate(update)
            throw AggregationError(.invalidUpdate, "the update's norm is not finite")
        }
        // Clipped values are rounded to Float as `clipped` rounds them (the secure path clips on the worker).
        let factor = clipNorm.flatMap { clipFactor(norm: norm, maximum: $0) } ?? 1
        let weight = Double(update.samples)
        for (name, delta) in update.deltas {
            delta.floats.withUnsafeBufferPointer { d in
                sums[name]!.withUnsafeMutableBufferPointer { s in FoldKernels.addScaled(d, scale: factor, weight: weight, into: s) }
            }
        }
        samples += update.samples
        updates += 1
        return norm
    }

    /// The sample-weighted mean delta.
    public func result() throws -> [String: Tensor] {
        guard samples > 0 else { throw AggregationError(.empty, "no update was accepted") }
        var out: [String: Tensor] = [:]
        for (name, s) in sums { out[name] = Tensor(shape: validator.shapes[name]!, floats: s.map { Float($0 / Double(samples)) }) }
        return out
    }
}

/// The fold's inner loops, eight lanes at a time, with `…Reference` twins (`KernelTests` checks they agree).
public enum FoldKernels {
    /// Σ x², in Double.
    public static func squaredSum(_ x: UnsafeBufferPointer<Float>) -> Double {
        let n = x.count
        var acc0 = SIMD4<Double>(), acc1 = SIMD4<Double>()
        var i = 0
        if let base = x.baseAddress {
            while i + 8 <= n {
                let v = UnsafeRawPointer(base + i).loadUnaligned(as: SIMD8<Float>.self)
                let lo = SIMD4<Double>(v.lowHalf), hi = SIMD4<Double>(v.highHalf)
                acc0 += lo * lo
                acc1 += hi * hi
                i += 8
            }
        }
        var total = (acc0 + acc1).sum()
        while i < n {
            total += Double(x[i]) * Double(x[i])
            i += 1
        }
        return total
    }

    public static func squaredSumReference(_ x: [Float]) -> Double { x.reduce(0.0) { $0 + Double($1) * Double($1) } }

    /// s[i] += weight × (x[i] × scale), the product x[i] × scale rounded to Float; `s` and `x` have the same count.
    public static func addScaled(_ x: UnsafeBufferPointer<Float>, scale: Float = 1, weight: Double, into s: UnsafeMutableBufferPointer<Double>) {
        precondition(x.count == s.count, "addScaled: \(x.count) values into \(s.count) sums")
        let n = x.count
        var i = 0
        if let xb = x.baseAddress, let sb = s.baseAddress {
            let w = SIMD4<Double>(repeating: weight), f = SIMD8<Float>(repeating: scale)
            while i + 8 <= n {
                let v = UnsafeRawPointer(xb + i).loadUnaligned(as: SIMD8<Float>.self) * f
                let p = UnsafeMutableRawPointer(sb + i)
                let s0 = p.loadUnaligned(as: SIMD4<Double>.self), s1 = p.loadUnaligned(fromByteOffset: 32, as: SIMD4<Double>.self)
                p.storeBytes(of: s0 + w * SIMD4<Double>(v.lowHalf), as: SIMD4<Double>.self)
                p.storeBytes(of: s1 + w * SIMD4<Double>(v.highHalf), toByteOffset: 32, as: SIMD4<Double>.self)
                i += 8
            }
        }
        while i < n {
            s[i] += weight * Double(x[i] * scale)
            i += 1
        }
    }

    public static func addScaledReference(_ x: [Float], scale: Float = 1, weight: Double, into s: inout [Double]) {
        for i in x.indices { s[i] += weight * Double(x[i] * scale) }
    }
}

/// Coordinate-wise robust aggregation; it needs all updates at once (O(workers × model) memory).
public enum RobustAggregation: Sendable, Equatable {
    /// Drop the `fraction` largest and smallest values per coordinate, average the rest (unweighted).
    case trimmedMean(fraction: Double)
    case median

    public func aggregate(_ updates: [ModelUpdate], validator: UpdateValidator, clipNorm: Double? = nil) throws -> [String: Tensor] {
        guard !updates.isEmpty else { throw AggregationError(.empty, "no update was accepted") }
        for u in updates { try validator.validate(u) }
        let kept = updates.map { u in clipNorm.map { clipped(u, to: $0) } ?? u }
        var out: [String: Tensor] = [:]
        for (name, shape) in validator.shapes {
            let count = shape.reduce(1, *)
            var values = [Float](repeating: 0, count: count)
            var column = [Float](repeating: 0, count: kept.count)
            for i in 0..<count {
                for (k, u) in kept.enumerated() { column[k] = u.deltas[name]!.floats[i] }
                column.sort()
                switch self {
                case .median:
                    let m = column.count / 2
                    values[i] = column.count % 2 == 1 ? column[m] : (column[m - 1] + column[m]) / 2
                case .trimmedMean(let fraction):
                    let cut = min(Int(Double(column.count) * fraction), (column.count - 1) / 2)
                    let middle = column[cut..<(column.count - cut)]
                    values[i] = Float(middle.reduce(0.0) { $0 + Double($1) } / Double(middle.count))
                }
            }
            out[name] = Tensor(shape: shape, floats: values)
        }
        return out
    }
}

/// int8 delta compression for slow uplinks, per tensor with error feedback: the worker sends
/// `q = round((δ + r) / s)` with `s = max|δ + r| / 127` and keeps the residual `r ← δ + r − s·q` for its next
/// update, so what it sends adds up to what it meant to send.
public struct DeltaCompressor: Sendable {
    public private(set) var residuals: [String: [Float]] = [:]

    public init() {}

    public struct Compressed: Sendable, Equatable {
        public var scale: Float
        public var values: [Int8]
        public var shape: [Int]

        public func decompressed() -> Tensor { Tensor(shape: shape, floats: values.map { Float($0) * scale }) }
        /// Bytes on the wire (values and scale).
        public var bytes: Int { values.count + 4 }
    }

    public mutating func compress(_ deltas: [String: Tensor]) -> [String: Compressed] {
        var out: [String: Compressed] = [:]
        for (name, delta) in deltas {
            let r = residuals[name] ?? [Float](repeating: 0, count: delta.count)
            let target = zip(delta.floats, r).map(+)
            let peak = target.map(abs).max() ?? 0
            let scale = peak > 0 ? peak / 127 : 1
            let q = target.map { Int8(max(-127, min(127, ($0 / scale).rounded(.toNearestOrEven)))) }
            residuals[name] = zip(target, q).map { $0 - Float($1) * scale }
            out[name] = Compressed(scale: scale, values: q, shape: delta.shape)
        }
        return out
    }
}
