import WhittleONNX
import WhittleTensor

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Fresh weights for training from scratch, deterministic for a seed.
public enum Initialization {
    /// He (Kaiming) normal initialisation: Conv and Gemm weights ~ N(0, 2 / fan_in), biases 0; BatchNormalization
    /// scale 1, bias 0, running mean 0, running variance 1. Other initializers are kept.
    public static func heInitialized(_ model: Model, seed: UInt64) throws -> Model {
        var out = model
        var rng = SplitMix64(seed: seed ^ 0x5EED)
        let index = out.graph.initializerIndex
        func normal() -> Float {
            // Box–Muller from two uniforms in (0, 1].
            let u1 = max(Double(rng.nextFloat()), 1e-12), u2 = Double(rng.nextFloat())
            return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
        }
        func set(_ name: String, _ make: (Tensor) -> [Float]) {
            guard let i = index[name], let t = out.graph.initializers[i].tensor, t.dtype == .float else { return }
            out.graph.initializers[i].setTensor(Tensor(shape: t.shape, floats: make(t)))
        }
        for node in out.graph.nodes {
            switch node.opType {
            case "Conv":
                set(node.inputs[1]) { w in
                    let std = (2 / Float(w.shape.dropFirst().reduce(1, *))).squareRoot()
                    return (0..<w.count).map { _ in normal() * std }
                }
                if node.inputs.count > 2 { set(node.inputs[2]) { Array(repeating: 0, count: $0.count) } }
            case "Gemm":
                let transB = node.attribute("transB")?.value.int ?? 0
                set(node.inputs[1]) { w in
                    let fanIn = transB != 0 ? w.shape[1] : w.shape[0]
                    let std = (2 / Float(fanIn)).squareRoot()
                    return (0..<w.count).map { _ in normal() * std }
                }
                if node.inputs.count > 2 { set(node.inputs[2]) { Array(repeating: 0, count: $0.count) } }
            case "BatchNormalization" where node.inputs.count == 5:
                set(node.inputs[1]) { Array(repeating: 1, count: $0.count) }
                set(node.inputs[2]) { Array(repeating: 0, count: $0.count) }
                set(node.inputs[3]) { Array(repeating: 0, count: $0.count) }
                set(node.inputs[4]) { Array(repeating: 1, count: $0.count) }
            default: continue
            }
        }
        return out
    }
}
