import Foundation

/// Where a round is in its life.
public enum RoundState: String, Codable, Sendable, CaseIterable {
    case running, succeeded, failed, cancelled

    public var ended: Bool { self != .running }
}

/// Why a round operation was refused, by code; the routes map codes to HTTP statuses (`RoundError.Code`).
public struct RoundError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Code: String, Sendable, CaseIterable {
        /// No round with that id.
        case unknownRound = "unknown_round"
        /// The round has ended; it cannot be cancelled again.
        case roundEnded = "round_ended"
        /// The worker already reported for that phase under another upload id.
        case alreadyReported = "already_reported"
        /// The report is for a phase or round that has closed, or a task the worker does not hold.
        case staleReport = "stale_report"
        /// The report is malformed before its statistics are read (its upload id).
        case badReport = "bad_report"
        /// The report is larger than the phase takes.
        case tooLarge = "body_too_large"
        /// The report's statistics were refused (shapes, non-finite values, sample counts).
        case invalidReport = "invalid_report"
        /// The phase cannot reach its quorum.
        case quorum
        /// The plan does not fit its model, or names a round that cannot be continued.
        case badPlan = "bad_plan"
        /// The round has no report or model yet.
        case notReady = "not_ready"
        /// No artifact with that SHA-256.
        case unknownArtifact = "unknown_artifact"
        /// An artifact is not a usable ONNX model.
        case badModel = "bad_model"
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code.rawValue): \(message)" }
}

/// A worker as a round's lifecycle sees it: from its record and the capabilities of its last heartbeat.
public struct WorkerStatus: Sendable, Equatable {
    public var name: String
    public var lastContact: Date?
    public var revoked: Bool
    public var certificateExpiresAt: Date
    /// Training samples (0: it cannot take a task).
    public var samples: Int
    public var labels: Bool
    /// The kind of board (`LatencyTable.kind`); nil for a worker that did not say.
    public var boardKind: String?
    /// False for a board that cannot time models (`worker run --no-timing`): it takes no latency task.
    public var timesModels = true
    /// The rounds whose secure-aggregation secrets the worker holds (nil: not known, as in tests of other phases).
    public var secureRounds: Set<String>?

    public init(name: String, lastContact: Date?, revoked: Bool, certificateExpiresAt: Date, samples: Int, labels: Bool) {
        self.name = name
        self.lastContact = lastContact
        self.revoked = revoked
        self.certificateExpiresAt = certificateExpiresAt
        self.samples = samples
        self.labels = labels
    }
}

/// A worker holding, or once holding, the open phase's task.
public struct PhaseAssignment: Sendable, Equatable {
    public var worker: String
    public var assignedAt: Date
    /// When the worker was given up (silent, revoked, or late at the phase's close); it cannot rejoin the phase.
    public var droppedAt: Date?

    public init(worker: String, assignedAt: Date, droppedAt: Date? = nil) {
        self.worker = worker
        self.assignedAt = assignedAt
        self.droppedAt = droppedAt
    }
}

/// What the lifecycle decided; the round service performs it (durably, then wakes and counts).
public enum RoundAction: Sendable, Equatable {
    /// Give the worker the open phase's task.
    case assign(worker: String, at: Date)
    /// Give up on the worker for the open phase.
    case drop(worker: String, at: Date)
    /// Every report the phase needs is in: fold the phase into the round's progress and open the next one.
    case closePhase
    /// The round ended (failed or cancelled) with this message.
    case end(RoundState, message: String)
}

/// The lifecycle of one round's open worker phase as a value: events in (a worker asks for work, a report
/// arrives, time passes, the operator cancels, a worker is lost), decisions and actions out. No I/O and no clock:
/// the service builds it from durable state, feeds it events with the time, and performs what it returns.
public struct RoundMachine: Sendable {
    public let id: String
    public let plan: RoundPlan
    public private(set) var state: RoundState
    public private(set) var message: String?
    /// The open phase's index in the plan.
    public let phase: Int
    public let phaseStartedAt: Date
    /// The open phase's assignments, in the order they were made.
    public private(set) var assignments: [PhaseAssignment]
    /// Workers whose report for the open phase was accepted.
    public private(set) var reported: Set<String>
    /// The workers' heartbeat interval: silence for three of them loses a worker; the selection window is two.
    public let pollSeconds: Int
    /// The kinds of board the round's final model is for (a search that made one model per kind); nil: every board.
    public let audience: BoardAudience?
    /// When the coordinator last started: no worker counts as silent for time the coordinator was down (a worker
    /// backs off up to seconds between retries while it is unreachable).
    public var awakeSince: Date?
    /// The workers the open phase is for, when not every worker that can do it (`RoundEngine.eligible`: a secure
    /// round's parties, partners and contributors); nil: any.
    public var eligible: Set<String>?

    public init(id: String, plan: RoundPlan, state: RoundState, phase: Int, phaseStartedAt: Date,
                assignments: [PhaseAssignment], reported: Set<String>, pollSeconds: Int, audience: BoardAudience? = nil) {
        self.audience = audience
        self.id = id
        self.plan = plan
        self.state = state
        self.phase = phase
        self.phaseStartedAt = phaseStartedAt
        self.assignments = assignments
        self.reported = reported
        self.pollSeconds = pollSeconds
    }

    public var openPhase: Phase { plan.phases[min(phase, plan.phases.count - 1)] }
    public var deadline: Date { phaseStartedAt.addingTimeInterval(plan.phaseDeadlineSeconds) }
    /// Assignments not given up.
    public var active: [PhaseAssignment] { assignments.filter { $0.droppedAt == nil } }
    /// Seconds of silence after which a worker holding a task is given up.
    public var silenceLimit: Double { Double(3 * pollSeconds) }

    /// Whether the worker can do the open phase's work at all (data, and labels when the phase trains on them).
    /// Only boards that can time models take a latency task, and only the boards a final model is for evaluate and
    /// receive it.
    func canWork(_ w: WorkerStatus) -> Bool {
        guard w.samples > 0, !(openPhase.kind.trains && !w.labels && !plan.distill) else { return false }
        if let eligible, !eligible.contains(w.name) { return false }
        if lostSession(w) { return false }
        // A secure session's parties are the workers of its sums: one that cannot train sits it out.
        if openPhase.kind == .secureKeys, !w.labels, !plan.distill, plan.privacySums > 0 { return false }
        if openPhase.kind == .latency, !w.timesModels { return false }
        if servesAudience, let audience, !audience.includes(w.boardKind) { return false }
        return true
    }

    /// The open phase is one of the round's secure session after its keys were made: only a worker that still holds
    /// its secrets can do it (one that restarted lost them, and sits the rest of the session out).
    var needsSession: Bool {
        let kind = openPhase.kind
        return kind == .secureShares || kind == .unmask || (plan.secureAggregation == true && RoundPlan.securelySummed.contains(kind))
    }

    /// Whether the worker's heartbeat says it no longer holds the round's secrets: a heartbeat since the phase opened
    /// (one from before may predate the keys it made in the key phase).
    func lostSession(_ w: WorkerStatus) -> Bool {
        needsSession && w.secureRounds.map { !$0.contains(id) } == true && (w.lastContact ?? .distantPast) > phaseStartedAt
    }

    /// The open phase hands out the final model, which is meant for the audience only.
    var servesAudience: Bool { audience != nil && openPhase.kind.handler.carriesFinalModel }

    /// The reports the open phase needs: `--min-workers`, except that a model meant for some kinds of board needs
    /// only one of them (a fleet may hold a single board of a kind).
    public var quorum: Int { servesAudience ? 1 : plan.minWorkers }

    // MARK: events

    /// A worker asks for work. Returns the phase's task when it holds it already or takes it now (with an
    /// `.assign` action to make durable); nil when there is nothing for it.
    public mutating func taskRequested(by worker: WorkerStatus, now: Date) -> (handOut: Bool, actions: [RoundAction]) {
        guard state == .running, openPhase.kind.onWorkers, !reported.contains(worker.name) else { return (false, []) }
        if let mine = assignments.first(where: { $0.worker == worker.name }) { return (mine.droppedAt == nil, []) }
        guard canWork(worker) else { return (false, []) }
        if openPhase.kind.overSelected, eligible == nil, let cap = plan.workersPerPhase, active.count >= cap { return (false, []) }
        guard now < deadline else { return (false, []) }
        assignments.append(PhaseAssignment(worker: worker.name, assignedAt: now))
        return (true, [.assign(worker: worker.name, at: now)])
    }

    /// Whether `worker` may upload a report now: it holds the open worker phase's task.
    public func mayUpload(_ worker: String) -> Bool {
        state == .running && openPhase.kind.onWorkers && active.contains { $0.worker == worker }
    }

    /// How an arriving report is taken.
    public enum Admission: Sendable, Equatable {
        /// A retry of an accepted upload: answer as accepted, count nothing.
        case duplicate
        /// Fold it in (then `reportAccepted` once it is durable).
        case admit
    }

    /// A report arrives for `phase` from `worker`, `bytes` long; `accepted` is the upload id the worker already
    /// reported for that phase, if any. Checks everything but the statistics, which the phase's accumulator checks.
    public func reportArrived(phase reportPhase: Int, worker: String, uploadID: String, bytes: Int, bodyLimit: Int,
                              accepted: String?) throws(RoundError) -> Admission {
        if let accepted {
            guard accepted == uploadID else {
                throw RoundError(.alreadyReported, "worker '\(worker)' already reported for phase \(reportPhase) of round \(id) (upload \(accepted)); a phase takes one report per worker")
            }
            return .duplicate
        }
        guard state == .running else {
            throw RoundError(.staleReport, "round \(id) has \(state.rawValue); this report was not counted")
        }
        let label = openPhase.label
        guard reportPhase == phase else {
            let theirs = reportPhase >= 0 && reportPhase < plan.phases.count ? plan.phases[reportPhase].label : "\(reportPhase)"
            throw RoundError(.staleReport, "phase \(theirs) of round \(id) has closed (the round is at \(label)); this report was not counted")
        }
        guard let mine = assignments.first(where: { $0.worker == worker }) else {
            throw RoundError(.staleReport, "worker '\(worker)' was not given phase \(label) of round \(id)")
        }
        guard mine.droppedAt == nil else {
            throw RoundError(.staleReport, "worker '\(worker)' was dropped from phase \(label) (it missed the deadline or went silent); this report was not counted")
        }
        guard (8...64).contains(uploadID.count) else {
            throw RoundError(.badReport, "a report needs an upload id of 8–64 characters")
        }
        guard bytes <= bodyLimit else {
            throw RoundError(.tooLarge, "the report is \(bytes) bytes; this phase takes at most \(bodyLimit)")
        }
        return .admit
    }

    /// The worker's report was folded in and made durable.
    public mutating func reportAccepted(from worker: String) {
        reported.insert(worker)
    }

    /// A worker is gone (revoked, or silent too long): it is given up if it holds the task without having reported.
    public mutating func workerLost(_ worker: String, now: Date) -> [RoundAction] {
        guard let k = assignments.firstIndex(where: { $0.worker == worker && $0.droppedAt == nil }),
              !reported.contains(worker) else { return [] }
        assignments[k].droppedAt = now
        return [.drop(worker: worker, at: now)]
    }

    /// Time passes (`workers`: every enrolled worker). Gives up silent or revoked workers holding the task; closes
    /// the phase when its quorum is in and either every assigned worker reported after the selection window or the
    /// deadline passed (giving up the late ones); fails the round at the deadline without a quorum, or earlier when
    /// the quorum is out of reach.
    public mutating func tick(now: Date, workers: [WorkerStatus]) -> [RoundAction] {
        guard state == .running, openPhase.kind.onWorkers else { return [] }
        let byName = Dictionary(workers.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var actions: [RoundAction] = []
        // Silent since it took the task and since the phase opened (a long transition holds heartbeats back).
        for a in active where !reported.contains(a.worker) {
            let w = byName[a.worker]
            let since = max(w?.lastContact ?? .distantPast, a.assignedAt, phaseStartedAt, awakeSince ?? .distantPast)
            if w?.revoked == true || now.timeIntervalSince(since) > silenceLimit || w.map(lostSession) == true {
                actions += workerLost(a.worker, now: now)
            }
        }
        let active = self.active
        let deadlinePassed = now >= deadline
        // The selection window: long enough for every online worker to poll once, unless every worker that could
        // take the task already has it, or the over-selection cap is reached.
        let full = openPhase.kind.overSelected && eligible == nil && plan.workersPerPhase.map { active.count >= $0 } == true
        let holding = Set(active.map(\.worker))
        let waitingFor = workers.filter { w in
            !holding.contains(w.name) && !reported.contains(w.name) && !w.revoked && canWork(w)
                && w.lastContact.map { now.timeIntervalSince($0) <= silenceLimit } == true
        }.count
        // A phase for named workers (a secure session's parties, partners, contributors) waits for every one of them
        // that is still online: one that did not share its keys or return its shares costs the others their sum.
        let windowOver = full || waitingFor == 0
            || (eligible == nil && now >= phaseStartedAt.addingTimeInterval(Double(2 * pollSeconds) + 1))
        let allIn = active.allSatisfy { reported.contains($0.worker) }
        if reported.count >= quorum, (windowOver && allIn) || deadlinePassed {
            for a in active where !reported.contains(a.worker) { actions += workerLost(a.worker, now: now) }
            return actions + [.closePhase]
        }
        let label = openPhase.label
        if deadlinePassed {
            return actions + fail("\(label) got \(reported.count) of the \(quorum) reports it needs (--min-workers) by its deadline (\(Int(plan.phaseDeadlineSeconds)) s)")
        }
        // Out of reach: reports in, assigned workers still working, and workers never given the task who could
        // still take it (a dropped worker cannot come back to the phase).
        let everAssigned = Set(assignments.map(\.worker))
        let couldJoin = workers.filter {
            !$0.revoked && $0.certificateExpiresAt > now && !everAssigned.contains($0.name) && (!servesAudience || audience!.includes($0.boardKind))
                && eligible?.contains($0.name) != false
        }.count
        let usable = reported.count + active.filter { !reported.contains($0.worker) }.count + couldJoin
        if usable < quorum {
            return actions + fail("\(label) can reach at most \(usable) reports (\(reported.count) in, the other workers dropped, revoked or missing); the round needs \(quorum) (--min-workers)")
        }
        return actions
    }

    /// The operator cancels the round.
    public mutating func cancel() throws(RoundError) -> [RoundAction] {
        guard state == .running else { throw RoundError(.roundEnded, "round '\(id)' has already \(state.rawValue)") }
        return end(.cancelled, "cancelled by the operator")
    }

    /// The round fails: a phase could not close or its transition failed.
    public mutating func fail(_ reason: String) -> [RoundAction] {
        guard state == .running else { return [] }
        return end(.failed, "phase \(phase): \(reason)")
    }

    mutating func end(_ final: RoundState, _ why: String) -> [RoundAction] {
        state = final
        message = why
        return [.end(final, message: why)]
    }
}
