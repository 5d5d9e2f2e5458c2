import Foundation
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittlePrivacy
import WhittleProtocol
import WhittleTensor

/// A round's models and artifacts by SHA-256, as the coordinator keeps them (its artifact directory).
public protocol RoundArtifacts: AnyObject {
    func model(_ sha: String) throws -> Model
    /// Stores a model and returns its SHA-256.
    func store(_ model: Model) throws -> String
    /// Stores bytes (a task file, optimizer state) and returns their SHA-256.
    func store(_ bytes: [UInt8]) throws -> String
    func bytes(_ sha: String) throws -> [UInt8]
    /// The artifact's size in bytes, 0 when there is none.
    func size(_ sha: String) -> Int
}

/// What closing a phase reads and writes: the round's progress, models through `artifacts`, and what the phase
/// gathered (for a coordinator phase, what the worker phase just before it gathered, nil at a round's start).
public struct PhaseClosing {
    public let engine: RoundEngine
    public let phase: Phase
    public let accumulator: PhaseAccumulator?
    public var progress: RoundProgress
    public let artifacts: any RoundArtifacts
    /// What the coordinator phases after this one read as the worker phase's aggregate, when not `accumulator`: an
    /// unmask phase passes on the secure sum it decoded.
    public var passOn: PhaseAccumulator?

    public init(engine: RoundEngine, phase: Phase, accumulator: PhaseAccumulator?, progress: RoundProgress, artifacts: any RoundArtifacts) {
        self.engine = engine
        self.phase = phase
        self.accumulator = accumulator
        self.progress = progress
        self.artifacts = artifacts
    }

    public var plan: RoundPlan { engine.plan }

    /// The closing phase's accumulator (a worker phase's close always has one).
    func gathered() throws -> PhaseAccumulator {
        guard let accumulator else { throw CompressionError(.invalidStatistics, "\(phase.label) closed without its reports") }
        return accumulator
    }
}

/// One task's work on a worker: the task, its models and local data, and the state a worker keeps between tasks.
public struct WorkerJob {
    public var task: Whittle_Task
    /// The task's model.
    public var model: Model
    /// The round's base model (teacher, pseudo-labeller, evaluation baseline).
    public var teacher: Model?
    public var ewc: WorkerJobs.EWC?
    public var data: Dataset
    public var batchSize: Int
    /// int8 delta compression's error feedback, carried across tasks.
    public var compressor: DeltaCompressor
    /// The local optimizer's state from this worker's previous training task of the round (replaced by this one's).
    public var optimizerState: Optimizer.State?
    public var teacherCache: TeacherLogitsCache?
    /// Times the base and compressed models in evaluation (the agent's clock).
    public var latency: LatencyProbe?
    /// The latency tables this worker measured before (the agent keeps them on disk across restarts).
    public var latencyTables: any LatencyTableKeeping
    /// This worker's secrets of the round's secure-aggregation session (the agent keeps them in memory only).
    public var secure: SecureAggregationClient?

    public init(task: Whittle_Task, model: Model, teacher: Model?, ewc: WorkerJobs.EWC? = nil, data: Dataset, batchSize: Int,
                compressor: DeltaCompressor = DeltaCompressor(), optimizerState: Optimizer.State? = nil,
                teacherCache: TeacherLogitsCache? = nil, latency: LatencyProbe? = nil,
                latencyTables: any LatencyTableKeeping = LatencyTableCache.process) {
        self.latencyTables = latencyTables
        self.task = task
        self.model = model
        self.teacher = teacher
        self.ewc = ewc
        self.data = data
        self.batchSize = batchSize
        self.compressor = compressor
        self.optimizerState = optimizerState
        self.teacherCache = teacherCache
        self.latency = latency
    }
}

/// Everything one phase kind does, in one place: on the coordinator, what its reports must look like, what its
/// tasks carry, how reports fold in and how the phase closes; on a worker, how a task of the kind is computed.
/// Kinds are registered in `PhaseHandlers.registry`, like operators in the engine's registry; adding a kind is a
/// handler file and its line there (and its place in `RoundPlan.phases`).
public protocol PhaseHandler: Sendable {
    var kind: PhaseKind { get }
    /// Workers do the phase (else the coordinator runs it alone, between worker phases).
    var onWorkers: Bool { get }
    /// `--workers-per-phase` caps its tasks (statistics and training phases; evaluation and distribution go to all).
    var overSelected: Bool { get }
    /// Its reports are weight deltas, so workers need labels (or distillation) and updates are clipped.
    var trains: Bool { get }
    /// Its tasks carry the exported model (evaluation, distribution), not the one the round is working on.
    var carriesFinalModel: Bool { get }
    /// Worker side: the task times models, so it runs on the held-out data, one worker per machine at a time.
    var timesModels: Bool { get }
    /// Worker side: the task is the agent's download of the task's model, not a computation.
    var downloadsModel: Bool { get }
    /// What the phase's reports must be, from the model its tasks carry.
    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation
    /// The kind's own fields of the phase's task.
    func configure(_ task: inout Whittle_Task, _ engine: RoundEngine, phase: Phase, progress: RoundProgress)
    /// An empty aggregate of the phase's reports.
    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate
    /// Closes the phase: what it gathered into the round's progress (and new models into the artifacts).
    func close(_ closing: inout PhaseClosing) throws
    /// Coordinator side: whether the phase can run now; a phase that waits for the operator (`round pick`) holds the
    /// round at it until it can.
    func ready(_ plan: RoundPlan, progress: RoundProgress) -> Bool
    /// Worker side: the task's report from the worker's data.
    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport
    /// Worker side: whether the task back-propagates (the batch size is fitted to training memory).
    func backpropagates(_ task: Whittle_Task) -> Bool
}

extension PhaseHandler {
    public var onWorkers: Bool { true }
    public var overSelected: Bool { true }
    public var trains: Bool { false }
    public var carriesFinalModel: Bool { false }
    public var timesModels: Bool { false }
    public var downloadsModel: Bool { false }
    public func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        PhaseExpectation(kind: kind)
    }
    public func configure(_ task: inout Whittle_Task, _ engine: RoundEngine, phase: Phase, progress: RoundProgress) {}
    public func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { NoAggregate() }
    public func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        throw CompressionError(.invalidArgument, "task kind '\(kind.rawValue)' is not computed by WorkerJobs")
    }
    public func backpropagates(_ task: Whittle_Task) -> Bool { false }
    public func ready(_ plan: RoundPlan, progress: RoundProgress) -> Bool { true }
}

/// The phase kinds, each by its handler.
public enum PhaseHandlers {
    public static let registry: [PhaseKind: any PhaseHandler] = {
        let handlers: [any PhaseHandler] = [
            FisherPhase(), ImportancePhase(), PrunePhase(), TrainingPhase(.finetune), NormalizationPhase(), FoldPhase(),
            RangesPhase(), HistogramsPhase(), ExportPhase(), TrainingPhase(.qat), EvaluatePhase(), DistributePhase(),
            LatencyPhase(), SearchPhase(), FinalistsPhase(), PickPhase(), SecureKeysPhase(), SecureSharesPhase(), UnmaskPhase(),
        ]
        return Dictionary(uniqueKeysWithValues: handlers.map { ($0.kind, $0) })
    }()

    public static func handler(_ kind: PhaseKind) -> any PhaseHandler { registry[kind]! }
}
