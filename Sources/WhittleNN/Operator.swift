import WhittleONNX
import WhittleTensor

/// A compiled node: fixed shapes, weights and library plans prepared once, then run per batch.
/// `run` receives one tensor per declared input (nil for omitted optional inputs) and returns one per output.
public protocol NodeKernel: AnyObject, Sendable {
    func run(_ inputs: [Tensor?]) throws -> [Tensor]
}

/// A kernel made of a closure, for operators that need no prepared state.
final class ClosureKernel: NodeKernel, @unchecked Sendable {
    let body: ([Tensor?]) throws -> [Tensor]
    init(_ body: @escaping ([Tensor?]) throws -> [Tensor]) { self.body = body }
    func run(_ inputs: [Tensor?]) throws -> [Tensor] { try body(inputs) }
}

/// How Whittle handles one ONNX op type.
public struct OperatorDefinition: Sendable {
    /// Static shape inference. Operators whose outputs are known before running (Shape, Constant) set `constant`.
    public let infer: @Sendable (NodeContext) throws -> [ValueMeta]
    /// Builds the kernel for fixed input shapes; `outputs` are the inferred metas.
    public let compile: @Sendable (NodeContext, [ValueMeta], KernelOptions) throws -> any NodeKernel
    /// Smallest opset version this definition follows (older opsets differ in ways Whittle does not handle).
    public let minimumOpset: Int64
    /// Multiply-accumulates of one run, for model inspection (0 for cheap ops).
    public let macs: @Sendable (NodeContext, [ValueMeta]) -> Int

    public init(minimumOpset: Int64 = 1,
                infer: @escaping @Sendable (NodeContext) throws -> [ValueMeta],
                compile: @escaping @Sendable (NodeContext, [ValueMeta], KernelOptions) throws -> any NodeKernel,
                macs: @escaping @Sendable (NodeContext, [ValueMeta]) -> Int = { _, _ in 0 }) {
        self.minimumOpset = minimumOpset
        self.infer = infer
        self.compile = compile
        self.macs = macs
    }

    /// A definition whose kernel is a pure function of inputs (no prepared state).
    public static func simple(minimumOpset: Int64 = 1,
                              infer: @escaping @Sendable (NodeContext) throws -> [ValueMeta],
                              run: @escaping @Sendable (NodeContext, [Tensor?]) throws -> [Tensor]) -> OperatorDefinition {
        OperatorDefinition(minimumOpset: minimumOpset, infer: infer, compile: { ctx, _, _ in
            ClosureKernel { try run(ctx, $0) }
        })
    }
}

/// Choices that affect how kernels are built.
public struct KernelOptions: Sendable {
    /// Use oneDNN / BLAS kernels (true) or the naive reference kernels (false, for tests).
    public var fast: Bool = true
    /// GEMM library for MatMul and general Gemm.
    public var gemmBackend: GemmBackend = .oneDNN
    /// Fuse Conv with the BatchNormalization, residual Add and activation after it (fast kernels only). Fused
    /// nodes' intermediate outputs are never materialized, so observers need `fuse` off.
    public var fuse: Bool = true
    /// Run QDQ groups as integer kernels (fast, fused kernels only); off, every QuantizeLinear, DequantizeLinear and
    /// float op runs on its own (the float-simulation reference).
    public var integer: Bool = true
    public init(fast: Bool = true, gemmBackend: GemmBackend = .oneDNN, fuse: Bool = true, integer: Bool = true) {
        self.fast = fast
        self.gemmBackend = gemmBackend
        self.fuse = fuse
        self.integer = integer
    }
}

/// The registry of supported op types (default ONNX domain), in one place like onnxruntime's quantizer registry.
public enum Operators {
    public static let registry: [String: OperatorDefinition] = {
        var r: [String: OperatorDefinition] = [:]
        registerConvolution(&r)
        registerConvTranspose(&r)
        registerEinsum(&r)
        registerGemm(&r)
        registerElementwise(&r)
        registerMath(&r)
        registerLogic(&r)
        registerActivations(&r)
        registerNormalization(&r)
        registerPooling(&r)
        registerReduce(&r)
        registerShapeOps(&r)
        registerTensorOps(&r)
        registerIndexing(&r)
        registerResize(&r)
        registerQuantization(&r)
        return r
    }()

    /// onnxruntime's contrib operators Whittle runs (domain `com.microsoft`).
    public static let microsoftRegistry: [String: OperatorDefinition] = {
        var r: [String: OperatorDefinition] = [:]
        registerContrib(&r)
        return r
    }()

    /// Op types Whittle runs, sorted.
    public static var supported: [String] { registry.keys.sorted() }

    /// The definition for `node`, or an error naming the op type, node and opset.
    public static func definition(for node: Node, opset: Int64) throws -> OperatorDefinition {
        if node.domain == "com.microsoft" {
            guard let definition = microsoftRegistry[node.opType] else {
                throw ONNXError(.unsupportedOperator,
                    "unsupported operator \(node.opType) (domain 'com.microsoft') at node '\(node.name)'; of onnxruntime's contrib operators Whittle runs \(microsoftRegistry.keys.sorted().joined(separator: ", "))")
            }
            return definition
        }
        guard node.domain.isEmpty || node.domain == "ai.onnx" else {
            throw ONNXError(.unsupportedOperator,
                "unsupported operator \(node.opType) (domain '\(node.domain)') at node '\(node.name)': Whittle runs the default ONNX domain and onnxruntime's MatMulNBits")
        }
        guard let definition = registry[node.opType] else {
            throw ONNXError(.unsupportedOperator,
                "unsupported operator \(node.opType) at node '\(node.name)' (opset \(opset)); supported: \(supported.joined(separator: ", "))")
        }
        guard opset >= definition.minimumOpset else {
            throw ONNXError(.unsupportedOperator,
                "operator \(node.opType) at node '\(node.name)' is supported from opset \(definition.minimumOpset), the model uses opset \(opset)")
        }
        return definition
    }
}
