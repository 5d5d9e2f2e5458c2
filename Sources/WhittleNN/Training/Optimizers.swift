import WhittleONNX
import WhittleTensor

/// Parameter update rules, following PyTorch's `torch.optim` conventions exactly so results compare number for number.
public enum OptimizerKind: Sendable, Equatable {
    /// `g ← g + wd·θ; b ← μ·b + g (b = g at the first step); g ← g + μ·b if nesterov else b; θ ← θ − lr·g`.
    case sgd(momentum: Float, nesterov: Bool, weightDecay: Float)
    /// Adam with L2 weight decay added to the gradient: `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
    /// `θ ← θ − lr·m̂ / (√v̂ + ε)` with bias-corrected m̂, v̂.
    case adam(beta1: Float, beta2: Float, epsilon: Float, weightDecay: Float)
    /// AdamW: decoupled decay `θ ← θ·(1 − lr·wd)` before the Adam step.
    case adamW(beta1: Float, beta2: Float, epsilon: Float, weightDecay: Float)
}

/// An optimizer with its per-parameter state (momentum buffers, moments).
public struct Optimizer: Sendable {
    public let kind: OptimizerKind
    public private(set) var step = 0
    var first: [String: [Float]] = [:]
    var second: [String: [Float]] = [:]

    public init(_ kind: OptimizerKind) { self.kind = kind }

    /// The per-parameter state (step count, momentum buffers or moments), to carry over to a later run.
    public struct State: Sendable, Equatable {
        public var step: Int
        public var first: [String: [Float]]
        public var second: [String: [Float]]
    }

    public var state: State { State(step: step, first: first, second: second) }

    /// Continues from `state` when every buffer in it still fits `sizes` (parameter element counts); a state from
    /// before a change of shapes (pruning) is dropped whole, so bias correction and buffers stay consistent.
    public mutating func restore(_ state: State, sizes: [String: Int]) {
        let fits = state.first.allSatisfy { sizes[$0.key] == $0.value.count } && state.second.allSatisfy { sizes[$0.key] == $0.value.count }
        guard fits else {
            (step, first, second) = (0, [:], [:])
            return
        }
        (step, first, second) = (state.step, state.first, state.second)
    }

    /// Applies one update to `parameters` with `gradients` at learning rate `lr`.
    public mutating func update(_ parameters: inout [String: Tensor], gradients: [String: Tensor], lr: Float) {
        step += 1
        for (name, grad) in gradients {
            guard var theta = parameters[name] else { continue }
            var g = grad.floats
            switch kind {
            case .sgd(let momentum, let nesterov, let weightDecay):
                if weightDecay != 0 { for i in g.indices { g[i] += weightDecay * theta.floats[i] } }
                if momentum != 0 {
                    var buffer = first[name] ?? g
                    if first[name] != nil { for i in g.indices { buffer[i] = momentum * buffer[i] + g[i] } }
                    first[name] = buffer
                    if nesterov { for i in g.indices { g[i] += momentum * buffer[i] } } else { g = buffer }
                }
                for i in g.indices { theta.floats[i] -= lr * g[i] }
            case .adam(let b1, let b2, let eps, let weightDecay), .adamW(let b1, let b2, let eps, let weightDecay):
                if case .adamW = kind {
                    for i in g.indices { theta.floats[i] *= 1 - lr * weightDecay }
                } else if weightDecay != 0 {
                    for i in g.indices { g[i] += weightDecay * theta.floats[i] }
                }
                var m = first[name] ?? [Float](repeating: 0, count: g.count)
                var v = second[name] ?? [Float](repeating: 0, count: g.count)
                let c1 = 1 - Float.pow(b1, step), c2 = 1 - Float.pow(b2, step)
                for i in g.indices {
                    m[i] = b1 * m[i] + (1 - b1) * g[i]
                    v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
                    theta.floats[i] -= lr * (m[i] / c1) / ((v[i] / c2).squareRoot() + eps)
                }
                first[name] = m
                second[name] = v
            }
            parameters[name] = theta
        }
    }
}

extension Float {
    static func pow(_ base: Float, _ exponent: Int) -> Float {
        var r: Float = 1
        for _ in 0..<exponent { r *= base }
        return r
    }
}

/// Learning rate as a function of the epoch (0-based).
public enum LearningRateSchedule: Sendable, Equatable {
    case constant
    /// Multiply by `gamma` every `every` epochs (PyTorch StepLR).
    case step(every: Int, gamma: Float)
    /// Cosine annealing from the base rate to `minimum` over `epochs` (PyTorch CosineAnnealingLR).
    case cosine(epochs: Int, minimum: Float)
    /// Given rates, one per epoch (the last one past the end); the base rate is not used.
    case perEpoch([Float])

    public func rate(base: Float, epoch: Int) -> Float {
        switch self {
        case .constant: return base
        case .step(let every, let gamma): return base * Float.pow(gamma, epoch / max(every, 1))
        case .cosine(let epochs, let minimum):
            let progress = Double(min(epoch, epochs)) / Double(max(epochs, 1))
            return minimum + (base - minimum) * Float((1 + cos(Double.pi * progress)) / 2)
        case .perEpoch(let rates):
            return rates.isEmpty ? base : rates[min(max(epoch, 0), rates.count - 1)]
        }
    }
}

/// Scales all gradients so their global L2 norm is at most `maxNorm` (PyTorch clip_grad_norm_). Returns the norm
/// before clipping.
@discardableResult
public func clipGradients(_ gradients: inout [String: Tensor], maxNorm: Float) -> Float {
    var total = 0.0
    for g in gradients.values { for v in g.floats { total += Double(v) * Double(v) } }
    let norm = Float(total.squareRoot())
    if norm > maxNorm && norm > 0 {
        let scale = maxNorm / (norm + 1e-6)
        for (name, g) in gradients { gradients[name] = Tensor(shape: g.shape, floats: g.floats.map { $0 * scale }) }
    }
    return norm
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The optimizers a command line or a round plan names: SGD with momentum 0.9, Adam, AdamW (weight decay 0.01);
/// in a round, each worker's is fresh every round (as in FedAvg) unless the plan keeps its state.
public enum LocalOptimizer: String, Codable, Sendable, CaseIterable {
    case sgd, adam, adamw

    public var kind: OptimizerKind {
        switch self {
        case .sgd: return .sgd(momentum: 0.9, nesterov: false, weightDecay: 0)
        case .adam: return .adam(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0)
        case .adamw: return .adamW(beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weightDecay: 0.01)
        }
    }
}
