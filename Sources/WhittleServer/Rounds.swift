import Crypto
import Foundation
import Logging
import NIOCore
import WhittleIO
import WhittleCompression
import WhittleONNX
import WhittlePKI
import WhittleProtocol
import WhittleRounds
import WhittleStore
import WhittleTensor

/// Drives federated rounds: performs what each round's `RoundMachine` decides (tasks handed out, reports admitted,
/// workers given up, phases closed, rounds ended), folds reports in as they arrive (after making them durable), runs
/// the coordinator's own phases, and keeps every transition durable so a restarted coordinator continues where it
/// stopped. The machine is built from durable state for every event; the time comes from the injected `now`.
///
/// Mutations (start, task, accept, tick, cancel) are serialized by an async lock: the store's calls suspend the
/// actor, and a report must never be folded into an accumulator that another call is replacing.
///
/// Replicas (`replication`): several services on one shared store (PostgreSQL). Any replica hands out tasks and
/// accepts reports (folding them into its own accumulator as it validates them); the one holding the store's lease
/// (`Replication.leaseName`, renewed every tick, taken over by another replica once it expires) is the only one
/// that gives workers up, closes phases and ends rounds. Before it decides, it folds in the reports other replicas
/// accepted (`openPhase`), read from the shared blobs. Every accepted report moves the round's revision on and a
/// transition writes only over the revision it read (`CoordinatorStore.updateRound`), so a phase never closes
/// without a report that was acknowledged meanwhile, and two replicas never both close it.
package actor RoundService {
    let store: any CoordinatorStore
    let directory: URL
    /// Report blobs, by their record's `blob` key: files of the data directory, or the store replicas share.
    let blobs: any BlobStore
    /// Artifacts every replica reads (nil: the artifact directory is the only copy).
    let sharedArtifacts: (any BlobStore)?
    let replication: Replication?
    /// This service holds the lease (always, alone).
    package private(set) var owns: Bool
    /// Ticks since the running rounds were last read (replicas read them every few ticks, and at once when
    /// another replica announces a change).
    var ticksSinceRefresh = 0
    var runningSignature = ""
    let pollSeconds: Int
    let logger: Logger
    let metrics: CoordinatorMetrics?
    /// The time (the system clock; tests script it).
    let now: @Sendable () -> Date
    /// When this service started: silence is counted from here after a restart (and, on a replica, from when it
    /// took the lease over: workers cut off by a dead owner are not silent for that time).
    var startedAt: Date

    /// The open worker phase of each running round: its accumulator (rebuilt from durable reports after a
    /// restart), task and limits.
    struct OpenPhase {
        var phase: Int
        var accumulator: PhaseAccumulator
        var task: Whittle_Task
        var bodyLimit: Int
        var refused = 0
        var aggregationSeconds = 0.0
    }
    var open: [String: OpenPhase] = [:]
    let artifactStore: ArtifactStore
    /// Each site's privacy budget (`privacy_budget`, `privacy_delta`): a round that would bring a site past it is
    /// refused, and so is a round that trains without differential privacy. Nil: no budget.
    let privacyBudget: PrivacyPlan?
    /// Rounds in state running, so idle heartbeats answer without touching the database.
    var running: Set<String>?

    var locked = false
    var waiters: [CheckedContinuation<Void, Never>] = []

    /// Idle heartbeats held until a worker phase opens or a round ends.
    nonisolated let longPoll: LongPoll

    package init(store: any CoordinatorStore, directory: URL, artifacts: URL, pollSeconds: Int, logger: Logger,
         metrics: CoordinatorMetrics? = nil, now: @escaping @Sendable () -> Date = Date.init, privacyBudget: PrivacyPlan? = nil,
         holdTimer: @escaping @Sendable (Double) async -> Void = { try? await Task.sleep(for: .seconds($0)) },
         blobs: (any BlobStore)? = nil, sharedArtifacts: (any BlobStore)? = nil, replication: Replication? = nil) throws {
        artifactStore = try ArtifactStore(directory: artifacts, shared: sharedArtifacts != nil)
        self.blobs = try blobs ?? DirectoryBlobs(directory: directory)
        self.sharedArtifacts = sharedArtifacts
        self.replication = replication
        owns = replication == nil
        metrics?.ownsRounds(owns)
        self.privacyBudget = privacyBudget
        longPoll = LongPoll(timer: holdTimer)
        self.metrics = metrics
        self.now = now
        startedAt = now()
        self.store = store
        self.directory = directory
        self.pollSeconds = pollSeconds
        self.logger = logger
    }

    /// How a replica takes part: its name in the lease, and how long a lease lasts unrenewed (a dead owner's
    /// rounds wait that long before another replica takes them over).
    package struct Replication: Sendable {
        package var holder: String
        package var leaseSeconds: Double
        package static let leaseName = "rounds"
        /// Ticks between readings of the running rounds when no announcement arrives.
        package static let refreshTicks = 10

        package init(holder: String, leaseSeconds: Double = 10) {
            self.holder = holder
            self.leaseSeconds = leaseSeconds
        }
    }

    /// Writes the round over the revision it was read at and moves `round` to the new one.
    func save(_ round: inout RoundRecord) async throws {
        try await store.updateRound(round)
        round.revision += 1
    }

    func lock() async {
        if !locked {
            locked = true
            return
        }
        await withCheckedContinuation { waiters.append($0) }
    }

    func unlock() {
        if waiters.isEmpty { locked = false } else { waiters.removeFirst().resume() }
    }

    // MARK: artifacts

    /// Stores bytes as a content-addressed artifact (durably, and in the shared store replicas read) and returns
    /// its SHA-256.
    package func storeArtifact(_ bytes: [UInt8]) async throws -> String {
        let sha = try artifactStore.store(bytes)
        try await publishArtifacts()
        return sha
    }

    /// Copies the artifacts this replica stored to the shared store, before anything naming them is committed.
    func publishArtifacts() async throws {
        guard let shared = sharedArtifacts else { return }
        for sha in artifactStore.unpublished {
            try await shared.putBlob(Self.artifactKey(sha), ByteBuffer(bytes: try artifactStore.bytes(sha)))
            artifactStore.published(sha)
        }
    }

    /// Where artifacts live in the shared store: `artifacts/SHA256`.
    static let artifactPrefix = "artifacts/"
    static func artifactKey(_ sha: String) -> String { artifactPrefix + sha }

    /// Brings the named artifacts this replica lacks from the shared store (checked against their names).
    package func fetchArtifacts(_ shas: some Sequence<String>) async throws {
        guard let shared = sharedArtifacts else { return }
        for sha in shas where Identifiers.isSHA256(sha) && !artifactStore.has(sha) {
            guard let buffer = try await shared.blob(Self.artifactKey(sha)) else { continue }
            try artifactStore.storeFetched(buffer, sha: sha)
        }
    }

    /// Every artifact a round can read is named in its plan or progress: brings them all.
    func fetchArtifacts(of round: RoundRecord) async throws {
        guard sharedArtifacts != nil else { return }
        try await fetchArtifacts(Self.artifactNames(round.plan).union(Self.artifactNames(round.progress)))
    }

    /// The SHA-256 names (64 lowercase hex digits standing alone) in a JSON text.
    package static func artifactNames(_ text: String) -> Set<String> {
        var out = Set<String>()
        var run: [UInt8] = []
        for byte in text.utf8 + [0x20] {
            if (0x30...0x39).contains(byte) || (0x61...0x66).contains(byte) {
                run.append(byte)
            } else {
                if run.count == 64 { out.insert(String(decoding: run, as: UTF8.self)) }
                run.removeAll(keepingCapacity: true)
            }
        }
        return out
    }

    func storeModel(_ model: Model) throws -> String { try artifactStore.store(model) }

    func artifactBytes(_ sha: String) -> Int { artifactStore.size(sha) }

    func model(_ sha: String) throws -> Model { try artifactStore.model(sha) }

    // MARK: JSON

    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return e
    }()

    static func text(_ value: some Encodable) throws -> String { String(decoding: try encoder.encode(value), as: UTF8.self) }

    static func plan(_ r: RoundRecord) throws -> RoundPlan { try RoundPlan.stored(Data(r.plan.utf8)) }
    package static func progress(_ r: RoundRecord) throws -> RoundProgress {
        try RoundProgress.stored(Data(r.progress.utf8))
    }

    // MARK: operator

    /// Validates a plan against its model, stores the round and runs its leading coordinator phases.
    package func start(_ requested: RoundPlan) async throws -> RoundRecord {
        await lock()
        defer { unlock() }
        var plan = requested
        var startModel = plan.modelSHA256
        try await fetchArtifacts(Self.artifactNames(try Self.text(plan)))
        if let from = plan.fromRound {
            guard let earlier = try await store.round(id: from) else {
                throw RoundError(.badPlan, "--from-round: no round '\(from)'")
            }
            try await fetchArtifacts(of: earlier)
            guard earlier.roundState == .succeeded, let float = try Self.progress(earlier).floatModel else {
                throw RoundError(.badPlan, "--from-round: round '\(from)' is \(earlier.state); only a succeeded round can be continued")
            }
            startModel = float
            plan.modelSHA256 = float
        }
        // Every layer owns its parameters before anything is pruned (exporters share equal constants through
        // Identity nodes), and a round that prunes has its attention spelled head by head; the rewritten model is
        // equivalent, and every phase of the round uses it.
        let loaded = try model(startModel)
        let prunes = !plan.steps.isEmpty || plan.search != nil
        let (model, changed) = prunes ? try GraphEditing.prepareForPruning(loaded) : GraphEditing.materializeConstants(loaded)
        if changed { startModel = try storeModel(model) }
        do {
            try plan.validate(model: model)
        } catch let error as CompressionError {
            throw RoundError(.badPlan, error.message)
        } catch let error as ONNXError {
            throw RoundError(.badPlan, error.message)
        }
        let started = now()
        let stamp = ISO8601DateFormatter.string(from: started, timeZone: TimeZone(identifier: "UTC")!,
                                                formatOptions: [.withYear, .withMonth, .withDay, .withTime])
        let id = "r" + stamp.replacingOccurrences(of: ":", with: "") + "-" + PKI.randomHex(4)
        if RoundEngine.normalizationInputs(model).isEmpty { plan.normalizationPasses = 0 }
        var progress = RoundProgress(plan: plan, baseModel: startModel, startModel: startModel)
        do {
            progress.privacy = try plan.privacyProgress(model: model)
        } catch let error as CompressionError {
            throw RoundError(.badPlan, error.message)
        }
        try await checkPrivacyBudget(plan, progress.privacy)
        var record = RoundRecord(id: id, createdAt: started, plan: try Self.text(plan), progress: try Self.text(progress))
        try await publishArtifacts()
        try await store.addRound(record)
        try await transition(&record, plan: plan, progress: &progress, closing: nil)
        running = nil
        logger.info("round started", metadata: ["round.id": "\(id)", "phases": "\(plan.phases.count)"])
        return record
    }

    /// The operator picks the architecture a round waiting at `pick` (`--pick operator`) fine-tunes: candidate
    /// `candidate` (1-based, in the search's evaluation order) for `kind` (needed when the fleet holds several kinds of
    /// board), and/or `best`: the round picks the best within the budget for every kind not picked. Once every kind has
    /// a pick the round goes on.
    package func pick(_ id: String, candidate: Int?, kind: String?, best: Bool) async throws -> RoundRecord {
        await lock()
        defer { unlock() }
        guard var round = try await store.round(id: id) else { throw RoundError(.unknownRound, "no round '\(id)'") }
        guard !round.ended else { throw RoundError(.roundEnded, "round '\(id)' has already \(round.state)") }
        let plan = try Self.plan(round)
        var progress = try Self.progress(round)
        try await fetchArtifacts(of: round)
        guard plan.search?.pick == .operator, plan.search?.architecture == nil else {
            throw RoundError(.badPlan, "round '\(id)' picks its architecture itself (it was not started with --pick operator)")
        }
        guard plan.phases[round.phase].kind == .pick, var search = progress.search else {
            throw RoundError(.notReady, "round '\(id)' is at \(plan.phases[round.phase].label); it waits for a pick only once the search is over")
        }
        guard candidate != nil || best else { throw RoundError(.badPlan, "give a candidate, or let the round pick the best (--best)") }
        if let candidate {
            let kinds = search.searchKinds
            let target: String?
            if kinds == [nil] {
                guard kind == nil else { throw RoundError(.badPlan, "this search has one kind of board; give no --kind") }
                target = nil
            } else {
                guard let kind, kinds.contains(kind) else {
                    throw RoundError(.badPlan, "this search has several kinds of board; give --kind, one of: \(kinds.compactMap { $0 }.joined(separator: "; "))")
                }
                target = kind
            }
            let all = search.candidates
            guard candidate >= 1, candidate <= all.count else {
                throw RoundError(.badPlan, "there is no candidate \(candidate); the search evaluated \(all.count) (1…\(all.count))")
            }
            let widths = all[candidate - 1].widths
            let local = try plan.localSearch(try model(progress.currentModel), progress: progress, kinds: target.map { [$0] })
            let cost = try local.cost(try local.space.architecture(widths: widths))
            let budget = plan.searchBudget(progress)
            guard budget.admits(cost) else {
                throw RoundError(.badPlan, "candidate \(candidate) (\(cost.macs) MACs, \(cost.parameterBytes) bytes\(cost.latencyMs.map { String(format: ", %.3f ms predicted", $0) } ?? "")) is over the budget\(target.map { " on \($0)" } ?? "")")
            }
            search.picked[SearchProgress.pickKey(target)] = widths
        }
        if best { search.pickRest = true }
        progress.search = search
        logger.info("architecture picked by the operator", metadata: ["round.id": "\(id)", "candidate": "\(candidate.map(String.init) ?? "best")",
                                                                      "kind": "\(kind ?? "-")"])
        if search.picksReady(plan.search?.pick) {
            try await transition(&round, plan: plan, progress: &progress, closing: nil)
            running = nil
        } else {
            round.progress = try Self.text(progress)
            try await save(&round)
        }
        return round
    }

    /// The search section of a round's progress so far (a round waiting for the operator's pick shows it).
    package func search(_ id: String) async throws -> CompressionReport.SearchSection {
        guard let round = try await store.round(id: id) else { throw RoundError(.unknownRound, "no round '\(id)'") }
        guard let section = RoundEngine(plan: try Self.plan(round)).searchSection(try Self.progress(round)) else {
            throw RoundError(.notReady, "round '\(id)' has no search yet")
        }
        return section
    }

    package func cancel(_ id: String) async throws -> RoundRecord {
        await lock()
        defer { unlock() }
        // Another replica may write the round between the reading and the writing: read it again and retry.
        var attempt = 1
        while true {
            guard var round = try await store.round(id: id) else { throw RoundError(.unknownRound, "no round '\(id)'") }
            var machine = try await self.machine(round)
            do {
                try await perform(try machine.cancel(), on: &round)
                return round
            } catch let error as StoreError where error.code == .conflict && attempt < Self.conflictAttempts {
                attempt += 1
            }
        }
    }

    /// How many times an operator's call is tried when another replica keeps writing the round meanwhile.
    static let conflictAttempts = 5

    // MARK: the lifecycle

    /// The round's lifecycle at its open phase, from durable state (and the open phase's accumulator when it is
    /// held: the workers whose reports are in).
    func machine(_ round: RoundRecord) async throws -> RoundMachine {
        let plan = try Self.plan(round), progress = try Self.progress(round)
        let assignments = try await store.assignments(round: round.id, phase: round.phase)
        let reported: Set<String>
        if replication == nil, let o = open[round.id], o.phase == round.phase {
            reported = Set(o.accumulator.workers)
        } else {
            reported = Set(try await store.reports(round: round.id, phase: round.phase).map(\.worker))
        }
        var machine = RoundMachine(id: round.id, plan: plan, state: round.roundState, phase: round.phase,
                                   phaseStartedAt: round.phaseStartedAt,
                                   assignments: assignments.map { PhaseAssignment(worker: $0.worker, assignedAt: $0.assignedAt, droppedAt: $0.droppedAt) },
                                   reported: reported, pollSeconds: pollSeconds, audience: progress.audience)
        machine.awakeSince = startedAt
        if !round.ended { machine.eligible = RoundEngine(plan: plan, round: round.id).eligible(machine.openPhase, progress: progress) }
        return machine
    }

    static func status(_ w: WorkerRecord) -> WorkerStatus {
        let c = capabilities(w)
        var status = WorkerStatus(name: w.name, lastContact: w.lastContactAt, revoked: w.revokedAt != nil,
                                  certificateExpiresAt: w.certificateExpiresAt, samples: c?.samples ?? 0, labels: c?.labels ?? false)
        status.boardKind = c?.boardKind
        status.timesModels = c?.noTiming != true
        status.secureRounds = Set(c?.secureRounds ?? [])
        return status
    }

    /// Performs the machine's actions on the round, durably: assignments made or dropped, the phase closed (with
    /// the coordinator phases after it), the round ended.
    func perform(_ actions: [RoundAction], on round: inout RoundRecord) async throws {
        guard !actions.isEmpty else { return }
        let plan = try Self.plan(round)
        for action in actions {
            let phase = plan.phases[min(round.phase, plan.phases.count - 1)]
            switch action {
            case .assign(let worker, let at):
                _ = try await store.assign(AssignmentRecord(round: round.id, phase: round.phase, worker: worker, assignedAt: at))
                metrics?.taskAssigned(kind: phase.kind.rawValue)
                logger.info("task assigned", metadata: ["round.id": "\(round.id)", "phase": "\(phase.label)", "worker.name": "\(worker)"])
            case .drop(let worker, let at):
                try await store.dropAssignment(round: round.id, phase: round.phase, worker: worker, at: at)
                logger.warning("worker dropped from phase", metadata: ["round.id": "\(round.id)", "worker.name": "\(worker)",
                                                                       "phase": "\(phase.label)"])
            case .closePhase:
                guard let o = open[round.id], o.phase == round.phase else { continue }
                var progress = try Self.progress(round)
                try await transition(&round, plan: plan, progress: &progress, closing: o)
            case .end(let state, let message):
                round.state = state.rawValue
                round.message = message
                round.endedAt = now()
                try await save(&round)
                open[round.id] = nil
                running = nil
                await announce()
                metrics?.roundEnded(state: state.rawValue)
                if state == .failed {
                    logger.error("round failed", metadata: ["round.id": "\(round.id)", "reason": "\(message)"])
                } else {
                    logger.info("round \(state.rawValue)", metadata: ["round.id": "\(round.id)"])
                }
            }
        }
    }

    // MARK: long polling

    /// The work generation heartbeats hold on (`LongPoll`).
    nonisolated package var workGeneration: Int { longPoll.generation }

    /// Holds an idle heartbeat until a worker phase opens or a round ends after `generation`, for at most `seconds`.
    @discardableResult
    nonisolated package func waitForWork(after generation: Int, seconds: Double) async -> LongPoll.Return {
        await longPoll.wait(after: generation, seconds: seconds)
    }

    /// Heartbeats held right now.
    nonisolated package var heldHeartbeats: Int { longPoll.held }

    /// A worker phase opened or a round ended: every held heartbeat looks for its task again.
    func workChanged() { longPoll.changed() }

    /// `workChanged`, here and (through the store) on every other replica.
    func announce() async {
        workChanged()
        guard replication != nil else { return }
        do {
            try await store.announceRoundsChanged()
        } catch {
            logger.warning("a round change could not be announced to the other replicas; they see it within a few ticks",
                           metadata: ["error": "\(error)"])
        }
    }

    /// Another replica announced a change: the running rounds are read again, and held heartbeats look for work.
    package func roundsChangedElsewhere() {
        running = nil
        ticksSinceRefresh = Replication.refreshTicks
        workChanged()
    }

    /// Graceful shutdown: answers held heartbeats now and holds no more.
    nonisolated package func stopHolding() { longPoll.stopHolding() }

    // MARK: workers

    func runningRounds() async throws -> [RoundRecord] {
        let out = try await store.runningRounds()
        running = Set(out.map(\.id))
        return out.sorted { $0.createdAt < $1.createdAt }
    }

    /// The open phase of a running round, rebuilt from the durable reports when the coordinator has just started
    /// (or the phase has just opened).
    func openPhase(_ round: RoundRecord) async throws -> OpenPhase {
        if var o = open[round.id], o.phase == round.phase {
            guard replication != nil else { return o }
            // Replicas: the reports other replicas accepted since are folded in too.
            let known = o.accumulator.workers
            let missing = try await store.reports(round: round.id, phase: round.phase).filter { !known.contains($0.worker) }
            guard !missing.isEmpty else { return o }
            try await refold(missing, into: &o, round: round)
            open[round.id] = o
            return o
        }
        try await fetchArtifacts(of: round)
        let plan = try Self.plan(round), progress = try Self.progress(round)
        let phase = plan.phases[round.phase]
        let engine = RoundEngine(plan: plan, round: round.id)
        let modelSHA = engine.taskModel(phase, progress: progress)
        let expectation = try engine.expectation(phase, model: try model(modelSHA), progress: progress)
        let task = engine.task(phase, index: round.phase, round: round.id, progress: progress, expectation: expectation,
                               deadline: round.phaseStartedAt.timeIntervalSince1970 + plan.phaseDeadlineSeconds,
                               artifactBytes: { self.artifactBytes($0) })
        // Training updates are clipped by default (a bound derived from the round's own updates): the same bound
        // after a restart, since it comes from durable progress.
        let clip = phase.kind.trains
            ? engine.clipBound(model: try model(modelSHA), trainable: Set(expectation.shapes.keys), progress: progress) : plan.clipNorm
        var o = OpenPhase(phase: round.phase,
                          accumulator: PhaseAccumulator(expectation: expectation, aggregation: plan.aggregation,
                                                        clipNorm: clip, trimFraction: plan.trimFraction),
                          task: task, bodyLimit: 2 * artifactBytes(modelSHA) + (16 << 20),
                          refused: progress.phases[round.phase].refused)
        try await refold(try await store.reports(round: round.id, phase: round.phase), into: &o, round: round)
        open[round.id] = o
        return o
    }

    /// Folds accepted reports into the phase again, from their blobs.
    func refold(_ reports: [ReportRecord], into o: inout OpenPhase, round: RoundRecord) async throws {
        for r in reports {
            do {
                guard let bytes = try await blobs.blob(r.blob) else {
                    throw RoundError(.unknownArtifact, "its blob \(r.blob) is missing (replicas need database_url's shared store)")
                }
                let message = try Whittle_TaskReport(serializedBytes: bytes.readableBytesView)
                try o.accumulator.add(message, worker: r.worker, maximumSamples: Int.max)
            } catch let error as StoreError {
                throw error
            } catch {
                logger.error("an accepted report cannot be folded in again", metadata: [
                    "round.id": "\(round.id)", "phase": "\(round.phase)", "worker.name": "\(r.worker)", "error": "\(error)"])
            }
        }
    }

    static func capabilities(_ w: WorkerRecord) -> CapabilitiesView? {
        w.capabilities.flatMap { try? JSONDecoder().decode(CapabilitiesView.self, from: Data($0.utf8)) }
    }

    /// The task for this worker, if a running round has one for it: its assignment, or a new one while the phase
    /// has room (over-selection cap) and the worker can do the work (`RoundMachine.taskRequested`).
    package func task(forWorkerNamed name: String) async throws -> Whittle_Task? {
        if let running, running.isEmpty { return nil }
        await lock()
        defer { unlock() }
        guard let worker = try await store.worker(named: name) else { return nil }
        guard var round = try await runningRounds().first else { return nil }
        guard try Self.plan(round).phases[round.phase].kind.onWorkers else { return nil }
        let o = try await openPhase(round)
        var machine = try await self.machine(round)
        let (handOut, actions) = machine.taskRequested(by: Self.status(worker), now: now())
        try await perform(actions, on: &round)
        guard handOut else { return nil }
        guard o.task.hasSecure else { return o.task }
        // A secure round's tasks carry what is the worker's own (its neighbours' keys, its envelopes, its partners).
        var task = o.task
        let plan = try Self.plan(round)
        try await fetchArtifacts(of: round)
        try RoundEngine(plan: plan, round: round.id).personalize(&task, worker: name, phase: plan.phases[round.phase],
                                                                 progress: try Self.progress(round), artifacts: artifactStore)
        return task
    }

    /// The largest report `name` may upload now: the open phase's body limit when the worker holds that phase's
    /// task (and was not dropped), nil when it holds none. Checked before a body is read, so a worker without a
    /// task cannot make the coordinator buffer anything.
    package func uploadLimit(forWorkerNamed name: String) async throws -> Int? {
        if let running, running.isEmpty { return nil }
        await lock()
        defer { unlock() }
        guard let round = try await runningRounds().first else { return nil }
        guard try await machine(round).mayUpload(name) else { return nil }
        return try await openPhase(round).bodyLimit
    }

    /// Accepts one report: checks it belongs to the open phase and to an assigned worker
    /// (`RoundMachine.reportArrived`), validates and folds it in, and makes it durable (blob fsynced, row committed)
    /// before returning. A retry of an accepted upload returns true (duplicate) and counts nothing.
    package func accept(_ report: Whittle_TaskReport, bytes: [UInt8], worker: WorkerRecord) async throws -> Bool {
        try await accept(report, bytes: ByteBuffer(bytes: bytes), worker: worker)
    }

    /// `accept` with the report's bytes in the buffer they arrived in (written to disk from there).
    package func accept(_ report: Whittle_TaskReport, bytes: ByteBuffer, worker: WorkerRecord) async throws -> Bool {
        await lock()
        defer { unlock() }
        guard let round = try await store.round(id: report.roundID) else {
            throw RoundError(.unknownRound, "no round '\(report.roundID)'")
        }
        let accepted = try await store.reports(round: round.id, phase: Int(report.phase)).first { $0.worker == worker.name }
        var machine = try await self.machine(round)
        // The body limit is the open phase's; only a report that passes the other checks reaches the size check.
        let holder = machine.mayUpload(worker.name) && Int(report.phase) == round.phase
        let bodyLimit = holder ? try await openPhase(round).bodyLimit : 0
        let admission = try machine.reportArrived(phase: Int(report.phase), worker: worker.name, uploadID: report.uploadID,
                                                  bytes: bytes.readableBytes, bodyLimit: bodyLimit, accepted: accepted?.uploadID)
        guard admission == .admit, holder else { return true }
        let plan = machine.plan
        let clock = ContinuousClock()
        let t0 = clock.now
        // The report is folded into the open phase's accumulator in place, not into a copy (a copy is the model's
        // size for training updates): this call owns the phase until it puts it back. A refused report changes
        // nothing and the phase goes back at once; a failure after the fold leaves it out, and the next call
        // rebuilds it from the durable reports.
        guard var o = open.removeValue(forKey: round.id) else { throw RoundError(.unknownRound, "round '\(round.id)' has no open phase") }
        let samplesBefore = o.accumulator.samples
        do {
            let c = Self.capabilities(worker)
            let maximum = plan.phases[round.phase].kind == .evaluate ? max(c?.samples ?? 0, c?.evaluationSamples ?? 0) : (c?.samples ?? 0)
            try o.accumulator.add(report, worker: worker.name, maximumSamples: maximum)
        } catch let error as AggregationError {
            o.refused += 1
            open[round.id] = o
            // Durable, so a restart does not forget the refusals (the phase table shows them).
            var record = round
            var progress = try Self.progress(record)
            progress.phases[round.phase].refused = o.refused
            record.progress = try Self.text(progress)
            do {
                try await store.updateRound(record)
            } catch let error as StoreError where error.code == .conflict {
                // Another replica wrote the round meanwhile: the count is shown from this replica's phase.
            }
            logger.warning("report refused", metadata: ["round.id": "\(round.id)", "worker.name": "\(worker.name)", "reason": "\(error.description)"])
            throw RoundError(.invalidReport, error.description)
        }
        let folded = seconds(clock.now - t0)
        let relative = "reports/\(round.id)/\(round.phase)-\(worker.name).pb"
        try await blobs.putBlob(relative, bytes)
        let record = ReportRecord(round: round.id, phase: round.phase, worker: worker.name, uploadID: report.uploadID,
                                  blob: relative, bytes: bytes.readableBytes, bytesDown: Int(clamping: report.bytesDown),
                                  samples: o.accumulator.samples - samplesBefore, acceptedAt: now())
        do {
            guard try await store.addReport(record) else { return true }
        } catch let error as StoreError where error.code == .conflict {
            // Another replica closed the phase while this report was stored: it is not counted (the phase, folded
            // without it, is not put back), and the worker hears so.
            try? await blobs.deleteBlob(relative)
            throw RoundError(.staleReport, "phase \(round.phase) of round '\(round.id)' closed while this report was being stored")
        }
        machine.reportAccepted(from: worker.name)
        o.aggregationSeconds += folded
        open[round.id] = o
        logger.info("report accepted", metadata: ["round.id": "\(round.id)", "phase": "\(plan.phases[round.phase].label)",
                                                  "worker.name": "\(worker.name)", "bytes": "\(bytes.readableBytes)"])
        return false
    }

    // MARK: phases

    /// Lets time pass for every running round (`RoundMachine.tick`): silent or revoked workers are given up, a
    /// phase whose reports are in closes, a round whose quorum is missed or out of reach fails, and so does a round
    /// whose transition fails.
    package func tick() async {
        await lock()
        defer { unlock() }
        if replication != nil {
            await renewLease()
            ticksSinceRefresh += 1
            if !owns {
                // Another replica decides; this one keeps its view of the running rounds fresh for heartbeats.
                if ticksSinceRefresh >= Replication.refreshTicks { await refreshRunning() }
                return
            }
        }
        do {
            let rounds = try await runningRounds()
            if replication != nil { noteRunning(rounds) }
            // Read once per tick, and only while a worker phase runs (a fleet of 10,000 idle boards costs nothing).
            var fleet: [WorkerStatus]?
            for var round in rounds {
                // A round waiting for the operator has no worker phase to time.
                guard try Self.plan(round).phases[round.phase].kind.onWorkers else { continue }
                if fleet == nil { fleet = try await store.workers().map(Self.status) }
                let workers = fleet ?? []
                do {
                    _ = try await openPhase(round)
                    var machine = try await self.machine(round)
                    try await perform(machine.tick(now: now(), workers: workers), on: &round)
                } catch let error as StoreError where error.code == .conflict {
                    // A report was accepted (or the round written) by another replica meanwhile: decide again at
                    // the next tick, with it.
                    logger.debug("round changed during a transition; deciding again", metadata: ["round.id": "\(round.id)"])
                } catch let error as StoreError {
                    // The store is unreachable: nothing is decided (the round does not fail for it).
                    logger.error("round check failed", metadata: ["round.id": "\(round.id)", "error": "\(error)"])
                } catch {
                    let message = (error as? RoundError)?.message ?? (error as? CompressionError)?.message ?? "\(error)"
                    var machine = try await self.machine(round)
                    try await perform(machine.fail(message), on: &round)
                }
            }
        } catch {
            logger.error("round check failed", metadata: ["error": "\(error)"])
        }
    }

    /// Takes or renews the lease; a replica that cannot reach the store does not count itself the owner.
    func renewLease() async {
        guard let replication else { return }
        let held: Bool
        do {
            let t = now()
            held = try await store.claimLease(Replication.leaseName, holder: replication.holder, now: t,
                                              expiresAt: t.addingTimeInterval(replication.leaseSeconds)).holder == replication.holder
        } catch {
            held = false
            logger.error("the rounds' lease cannot be renewed", metadata: ["error": "\(error)"])
        }
        guard held != owns else { return }
        owns = held
        metrics?.ownsRounds(held)
        if held {
            startedAt = now()
            // What other replicas accepted while this one was not the owner is folded in from the shared blobs.
            open = [:]
            running = nil
            logger.info("this replica now closes phases and ends rounds (it holds the lease)", metadata: ["replica": "\(replication.holder)"])
        } else {
            logger.info("another replica holds the rounds' lease", metadata: ["replica": "\(replication.holder)"])
        }
    }

    /// Reads the running rounds again (replicas), waking held heartbeats when a phase opened or a round started or
    /// ended elsewhere.
    func refreshRunning() async {
        do {
            noteRunning(try await runningRounds())
        } catch {
            logger.error("the running rounds cannot be read", metadata: ["error": "\(error)"])
        }
    }

    func noteRunning(_ rounds: [RoundRecord]) {
        ticksSinceRefresh = 0
        let signature = rounds.map { "\($0.id)#\($0.phase)" }.joined(separator: ",")
        if signature != runningSignature {
            runningSignature = signature
            workChanged()
        }
    }

    /// A replica shutting down gives its lease up, so another takes over at once.
    package func resign() async {
        guard let replication, owns else { return }
        try? await store.releaseLease(Replication.leaseName, holder: replication.holder)
        owns = false
    }

    /// Closes the open worker phase (with its accumulator), runs the coordinator phases that follow, and stores
    /// the round at its next worker phase (or ended) in one durable update.
    func transition(_ round: inout RoundRecord, plan: RoundPlan, progress: inout RoundProgress, closing: OpenPhase?) async throws {
        let engine = RoundEngine(plan: plan, round: round.id)
        let phases = plan.phases
        var index = round.phase
        let first = index
        let closedAt = now().timeIntervalSince1970
        let clock = ContinuousClock()
        try await fetchArtifacts(of: round)
        if let o = closing {
            let t0 = clock.now
            let acc = o.accumulator
            var closingPhase = PhaseClosing(engine: engine, phase: phases[index], accumulator: acc, progress: progress,
                                            artifacts: artifactStore)
            try engine.close(&closingPhase)
            progress = closingPhase.progress
            if phases[index].kind == .latency {
                // Said, not silently skipped: boards that cannot time models are not in the tables.
                let untimed = try await store.workers().map(Self.status).filter { !$0.timesModels && !$0.revoked && $0.samples > 0 }.map(\.name).sorted()
                progress.search?.untimed = untimed
                if !untimed.isEmpty {
                    logger.warning("boards left out of the latency tables: they cannot time models (worker run --no-timing)", metadata: [
                        "round.id": "\(round.id)", "workers": "\(untimed.joined(separator: ", "))"])
                }
            }
            var bytesUp = 0
            for r in try await store.reports(round: round.id, phase: index) {
                var site = progress.sites[r.worker] ?? .init(worker: r.worker, samples: r.samples, labels: false)
                site.phasesServed += 1
                site.bytesUp += r.bytes
                site.bytesDown += r.bytesDown
                site.samples = max(site.samples, r.samples)
                progress.sites[r.worker] = site
                bytesUp += r.bytes
            }
            progress.phases[index].state = "done"
            progress.phases[index].endedAt = closedAt
            progress.phases[index].reports = acc.reports
            progress.phases[index].refused = o.refused
            progress.phases[index].bytesUp = bytesUp
            progress.phases[index].aggregationSeconds = o.aggregationSeconds + seconds(clock.now - t0)
            index += 1
            open[round.id] = nil
            // The coordinator phases right after use what this phase gathered.
            try runCoordinatorPhases(&index, plan: plan, engine: engine, progress: &progress, previous: closingPhase.passOn ?? acc)
        } else {
            try runCoordinatorPhases(&index, plan: plan, engine: engine, progress: &progress, previous: nil)
        }
        round.phase = index
        round.phaseStartedAt = now()
        if var search = progress.search, search.models.contains(where: { $0.round == nil }) {
            for k in search.models.indices { search.models[k].round = Self.modelRound(round.id, k) }
            progress.search = search
        }
        var followUp: (plan: RoundPlan, progress: RoundProgress)?
        if index >= phases.count {
            round.state = RoundState.succeeded.rawValue
            round.endedAt = round.phaseStartedAt
            round.phase = phases.count - 1
            running = nil
            followUp = engine.followUp(progress)
        } else {
            progress.phases[index].state = phases[index].kind.onWorkers ? "running" : "waiting"
            progress.phases[index].startedAt = now().timeIntervalSince1970
        }
        round.progress = try Self.text(progress)
        try await publishArtifacts()
        try await save(&round)
        for closed in progress.phases[first..<min(index, progress.phases.count)] {
            metrics?.phaseClosed(kind: closed.kind, seconds: max(0, (closed.endedAt ?? closedAt) - (closed.startedAt ?? closedAt)),
                                 aggregationSeconds: closed.aggregationSeconds)
        }
        if round.ended { metrics?.roundEnded(state: round.state) }
        if let followUp { try await startFollowUp(of: round, followUp.plan, followUp.progress) }
        if closing != nil, phases[first].kind == .unmask, let sum = progress.secure?.closed.last {
            // The sum is decoded and durable: the masked reports (and the shares that unmasked them) are not needed.
            try await deleteReportBlobs(round: round.id, phases: [sum.phase, first])
        }
        await announce()
        logger.info(round.ended ? "round succeeded" : "phase opened", metadata: [
            "round.id": "\(round.id)", "phase": "\(round.ended ? "-" : phases[index].label)"])
    }

    /// Deletes the report blobs of closed phases (their rows stay, for the phase table and duplicate detection).
    func deleteReportBlobs(round: String, phases: [Int]) async throws {
        for phase in phases {
            for r in try await store.reports(round: round, phase: phase) {
                try? await blobs.deleteBlob(r.blob)
            }
        }
    }

    /// The round that makes model `k` of a search over several kinds of board, from any of the search's rounds: the
    /// round that searched for 0, `<it>-k<k>` for the others.
    static func modelRound(_ id: String, _ k: Int) -> String {
        let base = id.range(of: #"-k[0-9]+$"#, options: .regularExpression).map { String(id[..<$0.lowerBound]) } ?? id
        return k == 0 ? base : "\(base)-k\(k)"
    }

    /// Stores and starts a follow-up round (`followUp`) under the name `<parent>-k<model>`; one that already exists
    /// (the parent's last transition ran again after a restart) is left as it is.
    func startFollowUp(of parent: RoundRecord, _ plan: RoundPlan, _ start: RoundProgress) async throws {
        let id = Self.modelRound(parent.id, start.search?.serving ?? 0)
        guard try await store.round(id: id) == nil else { return }
        var progress = start
        var record = RoundRecord(id: id, createdAt: now(), plan: try Self.text(plan), progress: try Self.text(progress))
        try await store.addRound(record)
        do {
            try await transition(&record, plan: plan, progress: &progress, closing: nil)
        } catch {
            let message = (error as? CompressionError)?.message ?? "\(error)"
            var machine = try await self.machine(record)
            try await perform(machine.fail(message), on: &record)
        }
        running = nil
        logger.info("follow-up round started", metadata: ["round.id": "\(id)", "after": "\(parent.id)",
                                                          "kinds": "\(start.audience?.kinds?.joined(separator: "; ") ?? "")"])
    }

    func runCoordinatorPhases(_ index: inout Int, plan: RoundPlan, engine: RoundEngine, progress: inout RoundProgress,
                              previous: PhaseAccumulator?) throws {
        let phases = plan.phases
        let clock = ContinuousClock()
        while index < phases.count, !phases[index].kind.onWorkers {
            // A phase waiting for the operator holds the round here (`pick`).
            guard phases[index].kind.handler.ready(plan, progress: progress) else { break }
            let t0 = clock.now
            progress.phases[index].startedAt = now().timeIntervalSince1970
            var closing = PhaseClosing(engine: engine, phase: phases[index], accumulator: previous, progress: progress,
                                       artifacts: artifactStore)
            try phases[index].kind.handler.close(&closing)
            progress = closing.progress
            progress.phases[index].state = "done"
            progress.phases[index].endedAt = now().timeIntervalSince1970
            progress.phases[index].aggregationSeconds = seconds(clock.now - t0)
            index += 1
        }
    }

    // MARK: garbage collection

    /// What a collection removed.
    package struct Collected: Codable, Sendable, Equatable {
        package var artifacts = 0
        package var artifactBytes = 0
        package var reports = 0
        package var reportBytes = 0
    }

    /// Artifacts younger than this (or than the retention, if shorter) are never collected: a model uploaded for a
    /// round that has not started yet.
    static let artifactGrace: TimeInterval = 3600

    /// Deletes what no round can need any more: report blobs of closed phases (only the open phase's are read
    /// again, to rebuild its accumulator after a restart), and artifacts that no running round, no round ended
    /// within `retentionDays`, and not the latest succeeded round (a continual round's starting point) refer to.
    /// Database rows are kept (the round tables and figures stay). Runs under the round lock, so it cannot race a
    /// phase transition.
    package func collectGarbage(retentionDays: Double, now: Date? = nil) async throws -> Collected {
        let now = now ?? self.now()
        await lock()
        defer { unlock() }
        var out = Collected()
        let rounds = try await store.rounds()
        let latestSucceeded = rounds.first { $0.roundState == .succeeded }?.id
        var keep = Set<String>()
        for round in rounds {
            let recent = !round.ended || round.id == latestSucceeded
                || (round.endedAt.map { now.timeIntervalSince($0) < retentionDays * 86400 } ?? true)
            guard recent, let plan = try? Self.plan(round), let progress = try? Self.progress(round) else { continue }
            keep.formUnion([plan.modelSHA256, progress.baseModel, progress.floatModel, progress.finalModel, progress.ewcState]
                .compactMap { $0 })
            if !round.ended {
                keep.formUnion([progress.currentModel, progress.serverVelocity].compactMap { $0 })
            }
            let stored = Dictionary(try await blobs.blobs(prefix: "reports/\(round.id)/").map { ($0.key, $0.bytes) }) { a, _ in a }
            for report in try await store.reports(round: round.id) where round.ended || report.phase < round.phase {
                guard let size = stored[report.blob] else { continue }
                try await blobs.deleteBlob(report.blob)
                out.reports += 1
                out.reportBytes += size
            }
        }
        let grace = min(Self.artifactGrace, retentionDays * 86400)
        let removed = try artifactStore.remove(except: keep, olderThan: grace, now: now)
        out.artifacts = removed.count
        out.artifactBytes = removed.bytes
        if let shared = sharedArtifacts {
            for blob in try await shared.blobs(prefix: Self.artifactPrefix) {
                let sha = String(blob.key.dropFirst(Self.artifactPrefix.count))
                guard !keep.contains(sha), now.timeIntervalSince(blob.storedAt) >= grace else { continue }
                try await shared.deleteBlob(blob.key)
                if !removed.names.contains(sha) {
                    out.artifacts += 1
                    out.artifactBytes += blob.bytes
                }
            }
        }
        if out != Collected() {
            logger.info("garbage collected", metadata: ["artifacts": "\(out.artifacts)", "artifact.bytes": "\(out.artifactBytes)",
                                                        "reports": "\(out.reports)", "report.bytes": "\(out.reportBytes)"])
        }
        return out
    }

    // MARK: views

    package func view(_ round: RoundRecord) async throws -> RoundView {
        let plan = try Self.plan(round), progress = try Self.progress(round)
        var phases = progress.phases
        if !round.ended, round.phase < phases.count {
            if replication != nil {
                // Other replicas accept reports too: the durable rows are the count.
                phases[round.phase].reports = try await store.reports(round: round.id, phase: round.phase).count
            } else if let o = open[round.id], o.phase == round.phase {
                phases[round.phase].reports = o.accumulator.reports
                phases[round.phase].refused = o.refused
            }
        }
        var assigned = 0
        if !round.ended {
            assigned = try await store.assignments(round: round.id, phase: round.phase).filter { $0.droppedAt == nil }.count
        }
        return RoundView(id: round.id, state: round.roundState, createdAt: round.createdAt, endedAt: round.endedAt,
                         message: round.message, phase: round.phase, phaseLabel: plan.phases[min(round.phase, plan.phases.count - 1)].label,
                         phaseCount: plan.phases.count, assigned: assigned, phases: phases, plan: plan,
                         finalModel: round.roundState == .succeeded ? progress.finalModel : nil,
                         sites: progress.sites.values.sorted { $0.worker < $1.worker })
    }

    func report(_ id: String) async throws -> CompressionReport {
        guard let round = try await store.round(id: id) else { throw RoundError(.unknownRound, "no round '\(id)'") }
        let plan = try Self.plan(round), progress = try Self.progress(round)
        guard var r = RoundEngine(plan: plan).report(round: id, progress: progress,
                                                     output: (plan.modelName as NSString).deletingPathExtension + ".compressed.onnx") else {
            throw RoundError(.notReady, "round \(id) has no report yet (it is at \(plan.phases[min(round.phase, plan.phases.count - 1)].label), \(round.state))")
        }
        if let delta = progress.privacy?.plan.delta {
            // Each site's ε over the private rounds up to this one (at this round's δ).
            r.privacy?.sites = try await spentPrivacy(upTo: round, planned: false).mapValues { try DifferentialPrivacy.epsilon($0, delta: delta) }
        }
        return r
    }

    // MARK: privacy

    /// RDP each site has spent, per order of `PrivacyAccountant.defaultOrders`: every closed training sum of a private
    /// round it contributed to, and (`planned`) every sum a running round has still to make, as if the site took part.
    func spentPrivacy(upTo last: RoundRecord? = nil, planned: Bool) async throws -> [String: [Double]] {
        var out: [String: [Double]] = [:]
        let workers = try await store.workers().filter { $0.revokedAt == nil }.map(\.name)
        func add(_ site: String, _ rdp: [Double], _ times: Int) {
            out[site] = zip(out[site] ?? Array(repeating: 0, count: rdp.count), rdp).map { $0 + Double(times) * $1 }
        }
        for r in try await store.rounds() where last.map({ r.createdAt <= $0.createdAt }) ?? true {
            let progress = try Self.progress(r), plan = try Self.plan(r)
            guard let privacy = progress.privacy else { continue }
            let closed = (progress.secure?.closed ?? []).filter { plan.phases[$0.phase].kind.trains }
            for sum in closed { for site in sum.contributors { add(site, privacy.rdpPerSum, 1) } }
            if planned, !r.ended {
                for site in workers { add(site, privacy.rdpPerSum, privacy.sums - closed.count) }
            }
        }
        return out
    }

    /// Refuses a round that would take a site past the coordinator's privacy budget, or that trains without
    /// differential privacy while there is a budget.
    func checkPrivacyBudget(_ plan: RoundPlan, _ privacy: PrivacyProgress?) async throws {
        guard let budget = privacyBudget else { return }
        guard let privacy else {
            if plan.phases.contains(where: { $0.kind.trains }) {
                throw RoundError(.badPlan, String(format: "the coordinator holds each site to a privacy budget (privacy_budget = %g at δ = %g): a round that trains needs --secure-aggregation and --dp-epsilon", budget.epsilon, budget.delta))
            }
            return
        }
        let spent = try await spentPrivacy(planned: true)
        let round = privacy.rdpPerSum.map { $0 * Double(privacy.sums) }
        var worst: (site: String, before: Double, after: Double)?
        for site in try await store.workers().filter({ $0.revokedAt == nil }).map(\.name) {
            let before = try spent[site].map { try DifferentialPrivacy.epsilon($0, delta: budget.delta) } ?? 0
            let after = try DifferentialPrivacy.epsilon(zip(spent[site] ?? round.map { _ in 0 }, round).map(+), delta: budget.delta)
            if after > (worst?.after ?? -1) { worst = (site, before, after) }
        }
        if let worst, worst.after > budget.epsilon {
            throw RoundError(.badPlan, String(format: "site '%@' has spent ε = %.3f of its privacy budget (%g at δ = %g); this round (ε = %.3f) would bring it to %.3f. Lower --dp-epsilon or raise privacy_budget.", worst.site, worst.before, budget.epsilon, budget.delta, privacy.epsilon, worst.after))
        }
    }

    func finalModel(_ id: String) async throws -> String {
        guard let round = try await store.round(id: id) else { throw RoundError(.unknownRound, "no round '\(id)'") }
        guard let sha = try Self.progress(round).finalModel else {
            throw RoundError(.notReady, "round \(id) has not exported its model yet (\(round.state))")
        }
        return sha
    }
}

extension RoundRecord {
    /// The stored state as the lifecycle's enum (a state this binary does not know reads as failed).
    var roundState: RoundState { RoundState(rawValue: state) ?? .failed }
}

/// A round as admin commands show it.
public struct RoundView: Codable, Sendable {
    public var id: String
    public var state: RoundState
    public var createdAt: Date
    public var endedAt: Date?
    public var message: String?
    public var phase: Int
    public var phaseLabel: String
    public var phaseCount: Int
    /// Workers holding the open phase's task.
    public var assigned: Int
    public var phases: [CompressionReport.PhaseRow]
    public var plan: RoundPlan
    public var finalModel: String?
    public var sites: [CompressionReport.Site]
}
