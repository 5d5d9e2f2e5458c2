import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleProtocol
import WhittleTensor

/// Coordinator: one step of the pruning schedule: scores (from the model, or from the importance phase just
/// closed), the global or per-layer selection, surgery (`RoundEngine.prune`).
struct PrunePhase: PhaseHandler {
    var kind: PhaseKind { .prune }
    var onWorkers: Bool { false }
    var overSelected: Bool { false }

    func close(_ closing: inout PhaseClosing) throws {
        let importance = closing.accumulator?.expectation.kind == .importance ? closing.accumulator?.importance : nil
        let model = try closing.artifacts.model(closing.progress.currentModel)
        closing.progress.currentModel = try closing.artifacts.store(
            try closing.engine.prune(step: closing.phase.step, model: model, importance: importance, progress: &closing.progress))
    }
}
