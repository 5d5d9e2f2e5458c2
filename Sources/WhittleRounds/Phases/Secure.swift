import Foundation
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittlePrivacy
import WhittleProtocol
import WhittleTensor

// Secure aggregation in a round (`RoundPlan.secureAggregation`, issue 20; the protocol is WhittlePrivacy's). One
// session per round: the workers advertise keys (secure-keys) and exchange Shamir shares sealed for each neighbour
// (secure-shares) once; then every securely summed phase (fine-tuning, QAT, the calibration passes) collects masked
// vectors, whose running total is all the coordinator keeps, and the unmask phase after it collects the shares that
// remove the masks from the total. Only then is the sum decoded (`SecureLayout`) and folded, as one report, into the
// secure phase's own aggregate, whose handler closes it as it would close a phase in the clear.

/// A round's secure-aggregation session as the coordinator keeps it (`RoundProgress.secure`): only public keys,
/// sealed envelopes, masked totals and sums.
public struct SecureProgress: Codable, Sendable, Equatable {
    public var session: [UInt8]
    /// The parties: the workers that advertised keys.
    public var parties: [String]
    public var degree: Int
    public var threshold: Int
    public var sums: Int
    /// The most training samples a party declared: the layouts' public bound on one report's samples.
    public var maximumSamples: Int
    /// The parties' advertisements (an artifact: a SecureTask holding them).
    public var advertisements: String
    /// The parties whose envelopes went out: the workers of the session's sums.
    public var shared: [String] = []
    /// The envelopes addressed to each party (an artifact per recipient: SecureEnvelopes by sender).
    public var envelopes: [String: String] = [:]
    /// The session's sums, in the order they closed.
    public var closed: [SecureSum] = []

    public init(session: [UInt8], parties: [String], degree: Int, threshold: Int, sums: Int, maximumSamples: Int, advertisements: String) {
        self.session = session
        self.parties = parties
        self.degree = degree
        self.threshold = threshold
        self.sums = sums
        self.maximumSamples = maximumSamples
        self.advertisements = advertisements
    }

    public func setup() throws -> SecureAggregationSetup {
        try SecurePhases.wrap {
            try SecureAggregationSetup(session: session, participants: parties, degree: degree, threshold: threshold, sums: sums)
        }
    }

    /// The partners of sum `j`: the parties that shared keys, less those that sent no input to an earlier sum
    /// (gone, most likely; their masks of that sum were removed with their neighbours' shares).
    public func partners(sum j: Int) -> Set<String> {
        var out = Set(shared)
        for s in closed where s.sum < j { out.subtract(Set(s.partners).subtracting(s.contributors)) }
        return out
    }

    /// The sum waiting for its unmask phase.
    public var pending: SecureSum? { closed.last.flatMap { $0.total != nil ? $0 : nil } }
}

/// One secure sum of a round.
public struct SecureSum: Codable, Sendable, Equatable {
    /// Its index in the session (the plan's `secureSums`) and its phase's index in the plan.
    public var sum: Int
    public var phase: Int
    public var partners: [String]
    /// The partners whose masked inputs are in the total.
    public var contributors: [String]
    /// The masked total (an artifact: a MaskedVector) until the unmask phase removes the masks; nil afterwards.
    public var total: String?
    /// The samples the contributors counted (public).
    public var samples: Int
    /// The contributors that returned their shares.
    public var unmasked: [String] = []
}

/// What a secure phase's reports must be: the session, and for a sum its partners and layout.
public struct SecureExpectation: Sendable {
    public var session: [UInt8]
    public var sums: Int
    /// Known from the sharing step on.
    public var setup: SecureAggregationSetup?
    /// A secure sum and its unmask phase: the sum, its partners and the layout of its vector.
    public var sum = 0
    public var partners: Set<String> = []
    public var layout: SecureLayout?
    public var clipNorm = 0.0
    /// A private round's training sums: the noise each worker adds.
    public var noise: NoiseParameters?
    public var maximumSamples = 0
    public var maximumValues = 0
    /// unmask: the partners that sent inputs.
    public var contributors: Set<String> = []
    /// secure-shares: the advertisements, by party.
    public var advertisements: [String: Advertisement] = [:]

    public init(session: [UInt8], sums: Int) {
        self.session = session
        self.sums = sums
    }
}

enum SecurePhases {
    static func wrap<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let error as PrivacyError { throw CompressionError(.invalidStatistics, error.message) }
    }

    /// A round's session: what every key, mask and envelope is bound to.
    static func session(round: String) -> [UInt8] { Primitives.digest([Array("whittle secure aggregation".utf8), Array(round.utf8)]) }

    /// The session's public fields of a task.
    static func task(_ e: SecureExpectation) -> Whittle_SecureTask {
        var t = Whittle_SecureTask()
        t.session = Data(e.session)
        t.sums = UInt32(e.sums)
        if let setup = e.setup {
            t.participants = setup.participants
            t.degree = UInt32(setup.degree)
            t.threshold = UInt32(setup.threshold)
        }
        t.sum = UInt32(e.sum)
        t.clipNorm = e.clipNorm
        if let noise = e.noise {
            t.dpGranularity = noise.granularity
            t.dpSigma = noise.sigma
            t.dpL2 = noise.l2
        }
        t.maximumSamples = UInt64(e.maximumSamples)
        t.maximumValues = UInt64(e.maximumValues)
        t.summands = UInt32(e.partners.count)
        return t
    }

    /// A task's setup (worker side).
    static func setup(_ t: Whittle_SecureTask) throws -> SecureAggregationSetup {
        try wrap {
            try SecureAggregationSetup(session: Array(t.session), participants: t.participants, degree: Int(t.degree),
                                       threshold: Int(t.threshold), sums: Int(t.sums))
        }
    }

    /// The most values one report may count in a histogram bin: `maximumSamples` samples of up to 2²⁴ values per
    /// tensor, less when the ring could not hold `summands` such counts.
    static func maximumValues(maximumSamples: Int, summands: Int) -> Int {
        min(max(maximumSamples, 1) << 24, (1 << 62) / max(summands, 1))
    }

    /// The shapes of the parameters training differentiates (what Fisher and Taylor sums cover).
    static func trainableShapes(_ model: Model) -> [String: [Int]] {
        let index = model.graph.initializerIndex
        var out: [String: [Int]] = [:]
        for name in TrainingGraph.trainables(model).parameters {
            if let k = index[name] { out[name] = model.graph.initializers[k].shape }
        }
        return out
    }

    /// Whether a phase's sums are per trained parameter (the Fisher, Taylor importance).
    static func sumsParameters(_ e: PhaseExpectation) -> Bool { e.kind == .fisher || (e.kind == .importance && e.criterion == .taylor) }

    /// The layout of a securely summed phase's vector, from its expectation and the session's public bounds.
    static func layout(_ e: PhaseExpectation, clipNorm: Double, maximumSamples: Int, summands: Int, noise: NoiseParameters? = nil) throws -> SecureLayout {
        switch e.kind {
        case .finetune, .qat:
            return try SecureLayout.update(shapes: e.shapes, clipNorm: clipNorm, maximumSamples: maximumSamples, summands: summands, noise: noise)
        case .ranges, .histograms:
            return SecureLayout.histograms(upper: e.histogramUpper, bins: e.histogramBins, signed: e.kind == .ranges,
                                           maximumSamples: maximumSamples,
                                           maximumValues: maximumValues(maximumSamples: maximumSamples, summands: summands))
        case .importance where e.criterion == .taylor:
            return try SecureLayout.parameterSums(e.shapes, fisher: false, maximumSamples: maximumSamples, summands: summands)
        case .importance, .normalization:
            return try SecureLayout.channels(e.channels, maximumSamples: maximumSamples,
                                             maximumValues: maximumValues(maximumSamples: maximumSamples, summands: summands), summands: summands)
        case .fisher:
            return try SecureLayout.parameterSums(e.shapes, fisher: true, maximumSamples: maximumSamples, summands: summands)
        default:
            throw CompressionError(.invalidArgument, "a \(e.kind.rawValue) phase is not summed securely")
        }
    }

    static func advertisement(_ m: Whittle_SecureAdvertisement) -> Advertisement {
        Advertisement(cipherKey: Array(m.cipherKey), maskKeys: m.maskKeys.map { Array($0) }, commitments: m.commitments.map { Array($0) })
    }

    static func message(_ a: Advertisement) -> Whittle_SecureAdvertisement {
        var m = Whittle_SecureAdvertisement()
        m.cipherKey = Data(a.cipherKey)
        m.maskKeys = a.maskKeys.map { Data($0) }
        m.commitments = a.commitments.map { Data($0) }
        return m
    }

    /// The advertisements a secure progress keeps.
    static func advertisements(_ secure: SecureProgress, _ artifacts: any RoundArtifacts) throws -> [String: Advertisement] {
        try Whittle_SecureTask(serializedBytes: try artifacts.bytes(secure.advertisements)).advertisements.mapValues(advertisement)
    }

    /// The coordinator's side of the session after the key exchange.
    static func server(_ secure: SecureProgress, _ artifacts: any RoundArtifacts) throws -> SecureAggregationServer {
        let setup = try secure.setup()
        let advertisements = try advertisements(secure, artifacts)
        return try wrap { try SecureAggregationServer(setup: setup, advertisements: advertisements, shared: Set(secure.shared)) }
    }

    /// What every phase after the key exchange expects of the session.
    static func sessionExpectation(_ secure: SecureProgress) throws -> SecureExpectation {
        var s = SecureExpectation(session: secure.session, sums: secure.sums)
        s.setup = try secure.setup()
        return s
    }

    /// The secure state of a round that needs it.
    static func progress(_ progress: RoundProgress) throws -> SecureProgress {
        guard let secure = progress.secure else {
            throw CompressionError(.invalidStatistics, "the round's secure-aggregation keys were not exchanged")
        }
        return secure
    }

    // MARK: the secure sums

    /// A securely summed phase's expectation completed with its sum: the partners and the layout.
    static func sumExpectation(_ e: inout PhaseExpectation, _ engine: RoundEngine, phase: Phase, model: Model,
                               progress: RoundProgress) throws {
        let secure = try Self.progress(progress)
        guard let j = engine.plan.secureSum(of: phase) else {
            throw CompressionError(.invalidArgument, "\(phase.label) is not one of the plan's secure sums")
        }
        if sumsParameters(e) { e.shapes = trainableShapes(model) }
        var s = try sessionExpectation(secure)
        s.sum = j
        s.partners = secure.partners(sum: j)
        s.maximumSamples = secure.maximumSamples
        s.maximumValues = maximumValues(maximumSamples: secure.maximumSamples, summands: s.partners.count)
        if phase.kind.trains {
            guard let clip = engine.clipBound(model: model, trainable: Set(e.shapes.keys), progress: progress) else {
                throw CompressionError(.invalidArgument, "secure aggregation of training updates needs a clip norm (--clip-norm, or --clip-multiple above 0)")
            }
            s.clipNorm = clip
            if engine.plan.privacy != nil {
                guard let privacy = progress.privacy else { throw CompressionError(.invalidStatistics, "a private round started without its noise") }
                s.noise = privacy.noise
            }
        }
        s.layout = try layout(e, clipNorm: s.clipNorm, maximumSamples: s.maximumSamples, summands: max(s.partners.count, 1), noise: s.noise)
        e.secure = s
    }

    /// Closes a securely summed phase: its masked total and contributors kept for the unmask phase.
    static func closeMasked(_ closing: inout PhaseClosing, _ masked: MaskedAggregate) throws {
        var secure = try progress(closing.progress)
        guard let s = closing.accumulator?.expectation.secure, let layout = s.layout else {
            throw CompressionError(.invalidStatistics, "\(closing.phase.label) closed without its secure sum")
        }
        var vector = Whittle_MaskedVector()
        vector.words = masked.total ?? [UInt64](repeating: 0, count: layout.length)
        vector.samples = UInt64(masked.samples)
        let total = try closing.artifacts.store(try vector.serializedBytes())
        let index = closing.plan.secureSums[s.sum]
        secure.closed.removeAll { $0.sum == s.sum }
        secure.closed.append(SecureSum(sum: s.sum, phase: index, partners: s.partners.sorted(), contributors: masked.contributors.sorted(),
                                       total: total, samples: masked.samples))
        closing.progress.secure = secure
    }

    /// The masked vector a worker sends for a securely summed phase: its report laid out, then masked.
    static func mask(_ report: Whittle_TaskReport, job: inout WorkerJob) throws -> Whittle_TaskReport {
        let t = job.task.secure
        guard var client = job.secure, client.session == Array(t.session) else {
            throw CompressionError(.invalidArgument, "this worker holds no secure-aggregation keys for round \(job.task.roundID) (it restarted after the key exchange); it sits out the round's secure phases")
        }
        // The phase's expectation as the coordinator derives it from the same model.
        var e = PhaseExpectation(kind: PhaseKind(rawValue: job.task.kind) ?? .finetune)
        e.shapes = updateShapes(job.model)
        e.histogramUpper = job.task.histogramUpper
        e.histogramBins = Int(job.task.histogramBins)
        e.criterion = ImportanceCriterion(rawValue: job.task.criterion) ?? .l1
        if sumsParameters(e) { e.shapes = trainableShapes(job.model) }
        if e.kind == .importance, e.criterion != .taylor {
            for g in try ChannelGroups(model: job.model).prunable {
                if let t = g.statisticsTensor { e.channels[t] = g.channels }
            }
        } else if e.kind == .normalization {
            e.channels = RoundEngine.normalizationInputs(job.model)
        }
        let noise = t.dpSigma > 0 ? NoiseParameters(granularity: t.dpGranularity, sigma: t.dpSigma, l2: t.dpL2) : nil
        let layout = try layout(e, clipNorm: t.clipNorm, maximumSamples: Int(clamping: t.maximumSamples), summands: Int(max(t.summands, 1)),
                                noise: noise)
        var samples: UInt64 = 0
        switch report.result {
        case .update(let m)?: samples = m.samples
        case .calibration(let m)?: samples = m.samples
        case .importance(let m)?: samples = m.samples
        case .fisher(let m)?: samples = m.samples
        default: break
        }
        let vector = try layout.encode(report)
        if client.stage == .shared {
            try wrap { try client.receive(envelopes: t.envelopes.mapValues { Array($0) }) }
        }
        let words = try wrap { try client.maskedInput(vector, sum: Int(t.sum), partners: t.partners) }
        job.secure = client
        var out = Whittle_TaskReport()
        var masked = Whittle_MaskedVector()
        masked.words = words
        masked.samples = samples
        out.masked = masked
        return out
    }
}

/// A securely summed phase's reports: masked vectors, of which only the running total (modulo 2⁶⁴) is kept.
struct MaskedAggregate: PhaseAggregate {
    var total: [UInt64]?
    var contributors: Set<String> = []
    var samples = 0

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .masked(let message)? = report.result else {
            throw PhaseAccumulator.refuse("a \(e.kind.rawValue) phase of a secure round takes masked vectors; this report carries \(report.result.map { "\($0)".split(separator: "(").first.map(String.init) ?? "?" } ?? "nothing")")
        }
        guard let s = e.secure, let layout = s.layout, s.partners.contains(worker) else {
            throw PhaseAccumulator.refuse("worker '\(worker)' is not a partner of this secure sum")
        }
        guard message.words.count == layout.length else {
            throw PhaseAccumulator.refuse("the masked vector has \(message.words.count) words; the sum's layout has \(layout.length)")
        }
        let n = try PhaseAccumulator.checkSamples(message.samples, min(maximumSamples, max(s.maximumSamples, 1)))
        if total == nil {
            total = message.words
        } else {
            var sum = total!
            total = nil  // no copy while it is updated
            message.words.withUnsafeBufferPointer { words in
                for i in sum.indices { sum[i] &+= words[i] }
            }
            total = sum
        }
        contributors.insert(worker)
        samples += n
        return n
    }
}

/// Workers: each makes its secrets for the round's session and advertises its public keys. Closing it fixes the
/// session's parties (those that advertised) and its neighbour graph.
struct SecureKeysPhase: PhaseHandler {
    var kind: PhaseKind { .secureKeys }
    var overSelected: Bool { false }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        guard !engine.round.isEmpty else { throw CompressionError(.invalidArgument, "a secure round's engine needs the round's id") }
        var e = PhaseExpectation(kind: kind)
        e.secure = SecureExpectation(session: SecurePhases.session(round: engine.round), sums: engine.plan.secureSums.count)
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { AdvertisementAggregate() }

    func close(_ closing: inout PhaseClosing) throws {
        let acc = try closing.gathered()
        guard let gathered = acc.aggregate as? AdvertisementAggregate, let e = acc.expectation.secure else {
            throw CompressionError(.invalidStatistics, "the key phase closed without its advertisements")
        }
        guard gathered.advertisements.count >= 3 else {
            throw CompressionError(.invalidStatistics, "\(gathered.advertisements.count) workers advertised keys; secure aggregation needs at least 3 (with two, each learns the other's input from the sum)")
        }
        let setup = try SecurePhases.wrap {
            try SecureAggregationSetup(session: e.session, participants: Array(gathered.advertisements.keys), sums: e.sums)
        }
        var server = SecureAggregationServer(setup: setup)
        try SecurePhases.wrap {
            for (u, a) in gathered.advertisements.sorted(by: { $0.key < $1.key }) { try server.receive(advertisement: a, from: u) }
            try server.closeAdvertising()
        }
        var kept = Whittle_SecureTask()
        kept.advertisements = gathered.advertisements.mapValues(SecurePhases.message)
        let sha = try closing.artifacts.store(try kept.serializedBytes())
        closing.progress.secure = SecureProgress(session: e.session, parties: setup.participants, degree: setup.degree, threshold: setup.threshold,
                                                 sums: setup.sums, maximumSamples: gathered.maximumSamples.values.max() ?? 1, advertisements: sha)
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        let t = job.task.secure
        guard !t.party.isEmpty else { throw CompressionError(.invalidArgument, "the key task does not name this worker's party") }
        var random = SystemRandomNumberGenerator()
        let client = try SecurePhases.wrap {
            try SecureAggregationClient(name: t.party, session: Array(t.session), sums: Int(t.sums), using: &random)
        }
        job.secure = client
        var report = Whittle_TaskReport()
        report.secureAdvertisement = SecurePhases.message(client.advertisement)
        return report
    }
}

/// Advertisements, checked as they arrive (well formed for the session's sums, no key another worker advertised),
/// with the samples each worker declared.
struct AdvertisementAggregate: PhaseAggregate {
    var advertisements: [String: Advertisement] = [:]
    var maximumSamples: [String: Int] = [:]

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .secureAdvertisement(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        let a = SecurePhases.advertisement(message)
        guard let s = e.secure, a.wellFormed(sums: s.sums) else {
            throw PhaseAccumulator.refuse("the advertisement is malformed (32-byte keys and commitments, one of each per sum of the session's \(e.secure?.sums ?? 0))")
        }
        let seen = Set(advertisements.values.flatMap { [$0.cipherKey] + $0.maskKeys })
        guard seen.isDisjoint(with: [a.cipherKey] + a.maskKeys) else {
            throw PhaseAccumulator.refuse("the advertisement repeats a public key another worker advertised")
        }
        advertisements[worker] = a
        self.maximumSamples[worker] = maximumSamples
        return 0
    }
}

/// Workers (the parties): each seals Shamir shares of its secrets for each neighbour. Closing it keeps the envelopes
/// by recipient; the parties whose envelopes went out are the workers of the session's sums.
struct SecureSharesPhase: PhaseHandler {
    var kind: PhaseKind { .secureShares }
    var overSelected: Bool { false }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        var e = PhaseExpectation(kind: kind)
        e.secure = try SecurePhases.sessionExpectation(try SecurePhases.progress(progress))
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { EnvelopeAggregate() }

    func close(_ closing: inout PhaseClosing) throws {
        let acc = try closing.gathered()
        guard let gathered = acc.aggregate as? EnvelopeAggregate else {
            throw CompressionError(.invalidStatistics, "the sharing phase closed without its envelopes")
        }
        var secure = try SecurePhases.progress(closing.progress)
        secure.shared = gathered.envelopes.keys.sorted()
        _ = try SecurePhases.server(secure, closing.artifacts)  // every party keeps `threshold` neighbours that shared
        var byRecipient: [String: [String: Data]] = [:]
        for (sender, sealed) in gathered.envelopes {
            for (recipient, envelope) in sealed where gathered.envelopes[recipient] != nil { byRecipient[recipient, default: [:]][sender] = envelope }
        }
        secure.envelopes = [:]
        for (recipient, envelopes) in byRecipient {
            var m = Whittle_SecureEnvelopes()
            m.envelopes = envelopes
            secure.envelopes[recipient] = try closing.artifacts.store(try m.serializedBytes())
        }
        closing.progress.secure = secure
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        let t = job.task.secure
        guard var client = job.secure, client.session == Array(t.session) else {
            throw CompressionError(.invalidArgument, "this worker holds no secure-aggregation keys for round \(job.task.roundID) (it restarted after advertising them); it sits out the round's secure phases")
        }
        let setup = try SecurePhases.setup(t)
        var random = SystemRandomNumberGenerator()
        let envelopes = try SecurePhases.wrap {
            try client.shareKeys(setup, advertisements: t.advertisements.mapValues(SecurePhases.advertisement), using: &random)
        }
        job.secure = client
        var report = Whittle_TaskReport()
        report.secureEnvelopes.envelopes = envelopes.mapValues { Data($0) }
        return report
    }
}

/// Envelopes, one per neighbour of the sender, checked for their recipients and size.
struct EnvelopeAggregate: PhaseAggregate {
    var envelopes: [String: [String: Data]] = [:]

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .secureEnvelopes(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        guard let setup = e.secure?.setup, setup.point(of: worker) != nil else {
            throw PhaseAccumulator.refuse("worker '\(worker)' is not a party of the round's session")
        }
        let neighbours = setup.neighbours(of: worker)
        guard Set(message.envelopes.keys) == Set(neighbours) else {
            throw PhaseAccumulator.refuse("the envelopes are addressed to \(message.envelopes.keys.sorted().prefix(4))…, not to the worker's \(neighbours.count) neighbours")
        }
        // The sealed shares: per sum two shares (point and 7-byte chunks as 8-byte words), plus nonce and tag.
        let size = 2 * SecureAggregationSetup.shareBytes * setup.sums + 12 + 16
        guard message.envelopes.values.allSatisfy({ $0.count == size }) else {
            throw PhaseAccumulator.refuse("an envelope is not \(size) bytes")
        }
        envelopes[worker] = message.envelopes
        return 0
    }
}

/// Workers (a sum's contributors): after a securely summed phase, each returns the shares that remove the masks from
/// the sum. Closing it rebuilds the self-masks and the dropped partners' mask keys, decodes the sum and closes the
/// secure phase with it as the phase's single report.
struct UnmaskPhase: PhaseHandler {
    var kind: PhaseKind { .unmask }
    var overSelected: Bool { false }

    func expectation(_ engine: RoundEngine, model: Model, progress: RoundProgress) throws -> PhaseExpectation {
        let secure = try SecurePhases.progress(progress)
        guard let pending = secure.pending else { throw CompressionError(.invalidStatistics, "no secure sum waits to be unmasked") }
        var e = PhaseExpectation(kind: kind)
        var s = try SecurePhases.sessionExpectation(secure)
        s.sum = pending.sum
        s.partners = Set(pending.partners)
        s.contributors = Set(pending.contributors)
        e.secure = s
        return e
    }

    func aggregate(_ expectation: PhaseExpectation, options: AggregationOptions) -> any PhaseAggregate { UnmaskAggregate() }

    func close(_ closing: inout PhaseClosing) throws {
        let acc = try closing.gathered()
        guard let gathered = acc.aggregate as? UnmaskAggregate else {
            throw CompressionError(.invalidStatistics, "the unmask phase closed without its shares")
        }
        var secure = try SecurePhases.progress(closing.progress)
        guard var pending = secure.pending, let totalSHA = pending.total else {
            throw CompressionError(.invalidStatistics, "no secure sum waits to be unmasked")
        }
        let phase = closing.plan.phases[pending.phase]
        let model = try closing.artifacts.model(closing.progress.currentModel)
        var plain = try closing.engine.expectation(phase, model: model, progress: closing.progress)
        guard let layout = plain.secure?.layout else { throw CompressionError(.invalidStatistics, "\(phase.label) has no secure layout") }
        plain.secure = nil
        let total = try Whittle_MaskedVector(serializedBytes: try closing.artifacts.bytes(totalSHA))
        var server = try SecurePhases.server(secure, closing.artifacts)
        let sum = try SecurePhases.wrap { () -> [UInt64] in
            try server.open(sum: pending.sum, partners: Set(pending.partners), length: layout.length)
            try server.receive(maskedTotal: total.words, sum: pending.sum, from: Set(pending.contributors))
            try server.closeInputs(sum: pending.sum)
            for (u, shares) in gathered.shares.sorted(by: { $0.key < $1.key }) {
                try server.receive(unmask: shares, sum: pending.sum, from: u)
            }
            return try server.result(sum: pending.sum)
        }
        var summed = PhaseAccumulator(expectation: plain, aggregation: closing.plan.aggregation)
        try summed.add(try layout.decode(sum), worker: "secure sum of \(pending.contributors.count) workers", maximumSamples: Int.max)
        pending.total = nil
        pending.unmasked = gathered.shares.keys.sorted()
        secure.closed[secure.closed.count - 1] = pending
        closing.progress.secure = secure
        var inner = PhaseClosing(engine: closing.engine, phase: phase, accumulator: summed, progress: closing.progress, artifacts: closing.artifacts)
        try phase.kind.handler.close(&inner)
        closing.progress = inner.progress
        // The coordinator phases after it (pruning after importance) read the sum as the phase's own aggregate.
        closing.passOn = summed
    }

    func run(_ job: inout WorkerJob) throws -> Whittle_TaskReport {
        let t = job.task.secure
        guard var client = job.secure, client.session == Array(t.session) else {
            throw CompressionError(.invalidArgument, "this worker holds no secure-aggregation keys for round \(job.task.roundID); it cannot unmask")
        }
        let shares = try SecurePhases.wrap {
            try client.unmask(UnmaskRequest(survivors: t.survivors, dropped: t.dropped), sum: Int(t.sum))
        }
        job.secure = client
        var report = Whittle_TaskReport()
        report.unmaskShares.shares = shares.mapValues { Data($0) }
        return report
    }
}

/// Unmask shares, one per partner of the sender, each at the sender's point.
struct UnmaskAggregate: PhaseAggregate {
    var shares: [String: [String: [UInt8]]] = [:]

    mutating func fold(_ report: Whittle_TaskReport, worker: String, maximumSamples: Int, expectation e: PhaseExpectation) throws -> Int {
        guard case .unmaskShares(let message)? = report.result else { throw PhaseAccumulator.wrongKind(report, e.kind) }
        guard let s = e.secure, let setup = s.setup, s.contributors.contains(worker) else {
            throw PhaseAccumulator.refuse("worker '\(worker)' sent no input to this secure sum")
        }
        let asked = Set(setup.neighbours(of: worker)).intersection(s.partners)
        guard Set(message.shares.keys) == asked else {
            throw PhaseAccumulator.refuse("the shares are of \(message.shares.keys.sorted().prefix(4))…, not of the worker's \(asked.count) partners")
        }
        for (v, bytes) in message.shares {
            guard let share = try? ShamirShare(bytes: Array(bytes)), share.x == setup.point(of: worker) else {
                throw PhaseAccumulator.refuse("the share of '\(v)' is malformed or not at the worker's point")
            }
        }
        shares[worker] = message.shares.mapValues { Array($0) }
        return 0
    }
}
