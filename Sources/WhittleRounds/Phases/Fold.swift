import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Coordinator: batch normalization folded into the convolutions before calibration; the unfolded model is kept
/// as the round's float model.
struct FoldPhase: PhaseHandler {
    var kind: PhaseKind { .fold }
    var onWorkers: Bool { false }
    var overSelected: Bool { false }

    func close(_ closing: inout PhaseClosing) throws {
        closing.progress.floatModel = closing.progress.currentModel
        let model = try closing.artifacts.model(closing.progress.currentModel)
        closing.progress.currentModel = try closing.artifacts.store(try GraphEditing.foldBatchNormalization(model))
    }
}
