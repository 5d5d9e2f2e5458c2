import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Coordinator: the calibrated ranges into a QDQ model (`RoundEngine.export`), or the float model as it is when
/// the round does not quantize.
struct ExportPhase: PhaseHandler {
    var kind: PhaseKind { .export }
    var onWorkers: Bool { false }
    var overSelected: Bool { false }

    func close(_ closing: inout PhaseClosing) throws {
        if closing.plan.quantize == .none { closing.progress.floatModel = closing.progress.currentModel }
        let model = try closing.artifacts.model(closing.progress.currentModel)
        closing.progress.finalModel = try closing.artifacts.store(try closing.engine.export(model, progress: &closing.progress))
    }
}
