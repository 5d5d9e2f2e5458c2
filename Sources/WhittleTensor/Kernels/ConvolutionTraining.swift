import CWhittleDNNL

/// oneDNN's forward-training, backward-data and backward-weights convolution primitives for one geometry, with
/// weights passed on every call (they change every step). Buffers are plain NCHW / OIHW; the plan converts to the
/// layouts oneDNN picks. The reference twins are `Kernels.conv2dReference` and `Kernels.conv2dBackwardReference`.
public final class ConvTrainingPlan: @unchecked Sendable {
    public let geometry: Conv2DGeometry
    public let hasBias: Bool
    private let handle: OpaquePointer

    public init(_ g: Conv2DGeometry, hasBias: Bool) throws {
        try g.validate()
        geometry = g
        self.hasBias = hasBias
        handle = try withErrorBuffer { err, len in
            wk_conv_train_create(Int64(g.batch), Int64(g.inChannels), Int64(g.height), Int64(g.width), Int64(g.outChannels),
                                 Int64(g.outHeight), Int64(g.outWidth), Int64(g.kernelH), Int64(g.kernelW), Int64(g.groups),
                                 Int64(g.strideH), Int64(g.strideW), Int64(g.dilationH), Int64(g.dilationW),
                                 Int64(g.padTop), Int64(g.padLeft), Int64(g.padBottom), Int64(g.padRight),
                                 hasBias ? 1 : 0, err, len)
        }
    }

    deinit { wk_conv_train_destroy(handle) }

    /// An activation argument of the training primitives.
    public enum Argument: Int32, Sendable, CaseIterable {
        case source = 0, destination = 1, dataGradientIn = 2, sourceGradient = 3, weightsSource = 4, weightsGradientIn = 5
    }

    /// The layout oneDNN picked for an argument: 8 or 16 (nChw8c / nChw16c), 0 (plain NCHW), -1 (other).
    public func block(_ argument: Argument) -> Int { Int(wk_conv_train_block(handle, argument.rawValue)) }

    /// Activation buffers already in this plan's blocked layout (skip their conversion).
    public struct Layouts: Sendable {
        public var source = false, destination = false, destinationGradient = false, sourceGradient = false
        public init() {}
    }

    /// `y = conv(x, w) + b`.
    public func forward(input x: [Float], weights w: [Float], bias b: [Float]?, layouts: Layouts = Layouts()) throws -> [Float] {
        let count = geometry.outputShape.reduce(1, *)
        guard x.count == geometry.inputShape.reduce(1, *), w.count == geometry.weightShape.reduce(1, *),
            hasBias == (b != nil), b.map({ $0.count == geometry.outChannels }) ?? true else {
            throw TensorError(.shapeMismatch, "convolution training plan called with mismatched buffers")
        }
        var y = [Float](repeating: 0, count: count)
        try runChecked { err, len in
            x.withUnsafeBufferPointer { px in
                w.withUnsafeBufferPointer { pw in
                    withOptionalPointer(b) { pb in
                        y.withUnsafeMutableBufferPointer { py in
                            wk_conv_train_forward_layout(handle, px.baseAddress, pw.baseAddress, pb, py.baseAddress,
                                                         layouts.source ? 1 : 0, layouts.destination ? 1 : 0, err, len)
                        }
                    }
                }
            }
        }
        return y
    }

    /// ∂L/∂x, ∂L/∂w, ∂L/∂b from ∂L/∂y (each only when asked for).
    public func backward(input x: [Float], weights w: [Float], dY dy: [Float], needInput: Bool, needWeights: Bool,
                         needBias: Bool, layouts: Layouts = Layouts()) throws -> (dX: [Float]?, dW: [Float]?, dB: [Float]?) {
        var dx: [Float]? = needInput ? [Float](repeating: 0, count: x.count) : nil
        var dw: [Float]? = needWeights ? [Float](repeating: 0, count: w.count) : nil
        var db: [Float]? = needBias && hasBias ? [Float](repeating: 0, count: geometry.outChannels) : nil
        guard dy.count == geometry.outputShape.reduce(1, *) else {
            throw TensorError(.shapeMismatch, "convolution gradient has \(dy.count) values, expected \(geometry.outputShape)")
        }
        try runChecked { err, len in
            x.withUnsafeBufferPointer { px in
                w.withUnsafeBufferPointer { pw in
                    dy.withUnsafeBufferPointer { pdy in
                        withOptionalMutablePointer(&dx) { pdx in
                            withOptionalMutablePointer(&dw) { pdw in
                                withOptionalMutablePointer(&db) { pdb in
                                    wk_conv_train_backward_layout(
                                        handle, px.baseAddress, pw.baseAddress, pdy.baseAddress, pdx, pdw, pdb,
                                        layouts.source ? 1 : 0, layouts.destinationGradient ? 1 : 0,
                                        layouts.sourceGradient ? 1 : 0, err, len)
                                }
                            }
                        }
                    }
                }
            }
        }
        return (dx, dw, db)
    }
}

/// Calls `body` with a mutable pointer to the array's storage, or with nil.
func withOptionalMutablePointer<R>(_ array: inout [Float]?, _ body: (UnsafeMutablePointer<Float>?) -> R) -> R {
    guard array != nil else { return body(nil) }
    return array!.withUnsafeMutableBufferPointer { body($0.baseAddress) }
}
