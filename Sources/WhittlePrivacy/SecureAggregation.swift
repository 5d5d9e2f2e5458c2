import Crypto
import Foundation

// Secure aggregation (Bonawitz et al., CCS 2017) with SecAgg+'s sparse neighbour graph (Bell et al., CCS 2020):
// the coordinator learns sums of the parties' vectors in the ring of integers modulo 2⁶⁴ and nothing else, even
// when parties drop out, as long as each keeps `threshold` neighbours. One session serves the `sums` secure phases
// of a round: the keys are exchanged once, and every sum has its own mask key pair and self-mask seed per party, so
// what rebuilding one sum reveals (a dropped party's mask key, a survivor's seed) says nothing about another.
//
// 1. Advertise (once): every party sends an X25519 public key that seals shares sent to it, and per sum an X25519
//    mask public key and a commitment to its self-mask seed.
// 2. Share (once): every party sends each neighbour, sealed under their agreed key, Shamir shares (threshold `t`) of
//    its self-mask seed and mask private key of every sum.
// 3. Input (per sum): the coordinator names the sum's partners (the neighbours taking part); a party sends its vector
//    plus the expansion of its self-mask seed plus, per partner v, ±the expansion of their agreed mask seed (+ when
//    its name sorts before v's): two partners' pairwise masks cancel in the sum.
// 4. Unmask (per sum): for each partner that sent its input a party returns its share of that partner's self-mask
//    seed; for each that did not, its share of that partner's mask key. The coordinator rebuilds the seeds (checked
//    against the commitments) and keys (checked against the public keys), removes the self-masks and the dropped
//    partners' pairwise masks, and holds the sum. A party never reveals both shares of one partner in one sum:
//    that would unmask the partner's input.
//
// Both sides are plain values: no clock, no network; the round machine carries the messages.

/// The public settings of one session, which every party and the coordinator derive alike.
public struct SecureAggregationSetup: Sendable, Equatable {
    /// What every key, mask and envelope is bound to (a round): nothing carries over between sessions.
    public let session: [UInt8]
    /// The parties, sorted, distinct.
    public let participants: [String]
    /// Neighbours per party (itself not counted); every other party when it reaches `participants.count − 1`.
    public let degree: Int
    /// Shares that rebuild a party's secrets.
    public let threshold: Int
    /// Secure sums the session serves (each with its own secrets).
    public let sums: Int
    private let ring: [String]
    private let position: [String: Int]

    /// `degree` defaults to every other party up to 16 parties, then the even number at or above 4·log₂ n (SecAgg+:
    /// a party's work grows with log n); `threshold` to ⌊2·degree/3⌋ + 1, more than half of a party's neighbours, so
    /// a coordinator that tells some neighbours a party dropped and others that it did not cannot gather both of its
    /// secrets.
    public init(session: [UInt8], participants: [String], degree: Int? = nil, threshold: Int? = nil, sums: Int = 1) throws {
        let sorted = participants.sorted()
        guard sorted.count >= 2, Set(sorted).count == sorted.count else {
            throw PrivacyError(.invalidArgument, "secure aggregation needs at least two distinct parties (\(participants.count) given)")
        }
        guard !session.isEmpty else { throw PrivacyError(.invalidArgument, "secure aggregation needs a session") }
        guard sums >= 1, sums <= Self.maximumSums else {
            throw PrivacyError(.invalidArgument, "a session of \(sums) sums (1 to \(Self.maximumSums))")
        }
        let n = sorted.count
        let k = min(n - 1, degree ?? Self.defaultDegree(n))
        guard k >= 1 else { throw PrivacyError(.invalidArgument, "a neighbour degree of \(degree ?? 0)") }
        let t = threshold ?? Self.defaultThreshold(k)
        guard t >= 1, t <= k else {
            throw PrivacyError(.invalidArgument, "a threshold of \(t) with \(k) neighbours per party (1 to \(k))")
        }
        self.session = session
        self.participants = sorted
        self.degree = k
        self.threshold = t
        self.sums = sums
        // The ring of the Harary graph: parties in an order only the session decides (a hash of it and the name).
        let keyed = sorted.map { (Primitives.digest([session, Array($0.utf8)]), $0) }
        ring = keyed.sorted { $0.0.lexicographicallyPrecedes($1.0) }.map(\.1)
        position = Dictionary(uniqueKeysWithValues: ring.enumerated().map { ($1, $0) })
    }

    /// Sums one session may serve (every one costs each party a key pair and 96 bytes per neighbour in its envelopes).
    public static let maximumSums = 4096

    public static func defaultDegree(_ parties: Int) -> Int {
        guard parties > 16 else { return parties - 1 }
        let k = Int((4 * log2(Double(parties))).rounded(.up))
        return k + k % 2
    }

    public static func defaultThreshold(_ degree: Int) -> Int { 2 * degree / 3 + 1 }

    /// `u`'s neighbours, sorted: everyone else when the degree reaches n − 1; else the ⌈degree/2⌉ parties on each
    /// side of it on the ring. Symmetric.
    public func neighbours(of u: String) -> [String] {
        guard let p = position[u] else { return [] }
        let n = ring.count
        if degree >= n - 1 { return participants.filter { $0 != u } }
        var out = Set<String>()
        for offset in 1...((degree + 1) / 2) {
            out.insert(ring[(p + offset) % n])
            out.insert(ring[(p - offset % n + n) % n])
        }
        out.remove(u)
        return out.sorted()
    }

    /// `u`'s Shamir evaluation point: its place on the ring, from 1 (nil for a stranger).
    public func point(of u: String) -> UInt64? { position[u].map { UInt64($0 + 1) } }

    /// Whether `v` is one of `u`'s neighbours, from their places on the ring (what `neighbours(of:)` lists).
    func isNeighbour(_ u: String, _ v: String) -> Bool {
        guard u != v, let p = position[u], let q = position[v] else { return false }
        if degree >= ring.count - 1 { return true }
        let gap = abs(p - q)
        return min(gap, ring.count - gap) <= (degree + 1) / 2
    }

    /// Whether `u` adds (rather than subtracts) its pairwise mask with `v`.
    static func adds(_ u: String, _ v: String) -> Bool { u < v }

    func envelopeContext(from u: String, to v: String) -> [UInt8] { Primitives.digest([session, Array(u.utf8), Array(v.utf8)]) }

    func commitment(_ u: String, sum: Int, seed: [UInt8]) -> [UInt8] { Self.commitment(session: session, u, sum: sum, seed: seed) }

    static func commitment(session: [UInt8], _ u: String, sum: Int, seed: [UInt8]) -> [UInt8] {
        Primitives.digest([session, Array(u.utf8), Array("\(sum)".utf8), seed])
    }

    /// The pairwise mask seed of a sum from one party's mask private key and the other's mask public key.
    func pairSeed(_ key: Curve25519.KeyAgreement.PrivateKey, _ peer: [UInt8], sum: Int) throws -> [UInt8] {
        try Primitives.derive(key, peer, label: "mask \(sum)", session: session)
    }

    /// Bytes of one share as sealed: 8 of point, 8 per 7-byte chunk of a 32-byte secret.
    public static let shareBytes = 8 * (1 + Shamir.chunks(of: 32))
}

/// What a party publishes first.
public struct Advertisement: Sendable, Equatable {
    /// X25519 public key that seals the shares sent to this party.
    public var cipherKey: [UInt8]
    /// Per sum, the X25519 public key pairwise masks are agreed from.
    public var maskKeys: [[UInt8]]
    /// Per sum, SHA-256 of the session, the party, the sum and its self-mask seed: the rebuilt seed must match it.
    public var commitments: [[UInt8]]

    public init(cipherKey: [UInt8], maskKeys: [[UInt8]], commitments: [[UInt8]]) {
        self.cipherKey = cipherKey
        self.maskKeys = maskKeys
        self.commitments = commitments
    }

    /// 32-byte keys and commitments, one of each per sum, no key repeated.
    public func wellFormed(sums: Int) -> Bool {
        cipherKey.count == 32 && maskKeys.count == sums && commitments.count == sums
            && maskKeys.allSatisfy { $0.count == 32 } && commitments.allSatisfy { $0.count == 32 }
            && Set(maskKeys + [cipherKey]).count == sums + 1
    }

    var publicKeys: [[UInt8]] { [cipherKey] + maskKeys }
}

/// What the coordinator asks of a party in a sum's last step.
public struct UnmaskRequest: Sendable, Equatable {
    /// Partners whose inputs are in the sum: their self-mask seed shares are wanted.
    public var survivors: [String]
    /// Partners that sent no input: their mask key shares are wanted.
    public var dropped: [String]

    public init(survivors: [String], dropped: [String]) {
        self.survivors = survivors
        self.dropped = dropped
    }
}

/// One party's side (a worker). Its secrets live only in this value.
public struct SecureAggregationClient: Sendable {
    public enum Stage: Sendable { case advertised, shared, ready }
    private enum Revealed: Sendable { case selfMask, maskKey }

    public let name: String
    public let session: [UInt8]
    public let sums: Int
    /// The session's parties and graph, known from the key-sharing step on (the parties are the ones that
    /// advertised keys, so they are fixed after this party made its own).
    public private(set) var setup: SecureAggregationSetup?
    public private(set) var stage = Stage.advertised
    private let cipherKey: Curve25519.KeyAgreement.PrivateKey
    private let maskKeys: [Curve25519.KeyAgreement.PrivateKey]
    private let seeds: [[UInt8]]
    private var peers: [String: Advertisement] = [:]
    /// Per neighbour that shared, its shares per sum: (self-mask seed, mask key).
    private var held: [String: [(selfMask: ShamirShare, maskKey: ShamirShare)]] = [:]
    /// Per sum, the partners this party masked with.
    private var partners: [Int: [String]] = [:]
    /// Per sum, which secret's share this party gave out per partner (never both).
    private var revealed: [Int: [String: Revealed]] = [:]

    /// A party's fresh secrets for `sums` sums of `session`, drawn from `random` (the system's generator outside
    /// tests).
    public init<R: RandomNumberGenerator>(name: String, session: [UInt8], sums: Int, using random: inout R) throws {
        guard !session.isEmpty, sums >= 1, sums <= SecureAggregationSetup.maximumSums else {
            throw PrivacyError(.invalidArgument, "a session needs a name and 1 to \(SecureAggregationSetup.maximumSums) sums (\(sums) asked)")
        }
        func bytes() -> [UInt8] { (0..<32).map { _ in UInt8.random(in: 0...255, using: &random) } }
        self.name = name
        self.session = session
        self.sums = sums
        cipherKey = try Curve25519.KeyAgreement.PrivateKey(rawRepresentation: bytes())
        maskKeys = try (0..<sums).map { _ in try Curve25519.KeyAgreement.PrivateKey(rawRepresentation: bytes()) }
        seeds = (0..<sums).map { _ in bytes() }
    }

    public var advertisement: Advertisement {
        Advertisement(cipherKey: Array(cipherKey.publicKey.rawRepresentation),
                      maskKeys: maskKeys.map { Array($0.publicKey.rawRepresentation) },
                      commitments: seeds.enumerated().map {
                          SecureAggregationSetup.commitment(session: session, name, sum: $0.offset, seed: $0.element)
                      })
    }

    /// The setup, once the key-sharing step gave it.
    private func configured() throws -> SecureAggregationSetup {
        guard let setup else { throw PrivacyError(.protocolViolation, "\(name) has not shared its keys in this session yet") }
        return setup
    }

    /// Step 2: the session's setup (its parties: those that advertised) and the neighbours' advertisements (as the
    /// coordinator relays them) in, one sealed envelope per neighbour out (by recipient).
    public mutating func shareKeys<R: RandomNumberGenerator>(_ setup: SecureAggregationSetup, advertisements: [String: Advertisement],
                                                             using random: inout R) throws -> [String: [UInt8]] {
        guard stage == .advertised else { throw PrivacyError(.protocolViolation, "\(name) has already shared its keys in this session") }
        guard setup.session == session, setup.sums == sums, setup.point(of: name) != nil else {
            throw PrivacyError(.protocolViolation, "the setup is of another session, another number of sums, or does not list \(name)")
        }
        for (v, a) in advertisements {
            guard setup.isNeighbour(name, v) else { throw PrivacyError(.protocolViolation, "'\(v)' is not a neighbour of \(name)") }
            guard a.wellFormed(sums: setup.sums) else { throw PrivacyError(.malformed, "the advertisement of '\(v)' is malformed") }
        }
        guard advertisements.count >= setup.threshold else {
            throw PrivacyError(.notEnoughShares, "\(advertisements.count) neighbours of \(name) advertised keys, \(setup.threshold) needed")
        }
        let keys = advertisements.values.flatMap(\.publicKeys) + advertisement.publicKeys
        guard Set(keys).count == keys.count else {
            throw PrivacyError(.protocolViolation, "two advertised public keys are equal (a replayed or forged advertisement)")
        }
        let recipients = advertisements.keys.sorted()
        let points = recipients.map { setup.point(of: $0)! }
        var plaintexts = [[UInt8]](repeating: [], count: recipients.count)
        for j in 0..<setup.sums {
            let seedShares = try Shamir.split(seeds[j], threshold: setup.threshold, at: points, using: &random)
            let keyShares = try Shamir.split(Array(maskKeys[j].rawRepresentation), threshold: setup.threshold, at: points, using: &random)
            for k in recipients.indices { plaintexts[k] += seedShares[k].bytes + keyShares[k].bytes }
        }
        var out: [String: [UInt8]] = [:]
        for (k, v) in recipients.enumerated() {
            let key = try Primitives.derive(cipherKey, advertisements[v]!.cipherKey, label: "envelope", session: setup.session)
            out[v] = try Primitives.seal(plaintexts[k], key: key, associated: setup.envelopeContext(from: name, to: v))
        }
        peers = advertisements
        self.setup = setup
        stage = .shared
        return out
    }

    /// Step 2, received: the envelopes addressed to this party (by sender), opened and kept.
    public mutating func receive(envelopes: [String: [UInt8]]) throws {
        guard stage == .shared else { throw PrivacyError(.protocolViolation, "\(name) takes its envelopes once, after sharing its keys") }
        let setup = try configured()
        guard envelopes.count >= setup.threshold else {
            throw PrivacyError(.notEnoughShares, "\(envelopes.count) neighbours of \(name) shared keys, \(setup.threshold) needed")
        }
        let size = SecureAggregationSetup.shareBytes
        var opened: [String: [(selfMask: ShamirShare, maskKey: ShamirShare)]] = [:]
        for (v, envelope) in envelopes {
            guard let peer = peers[v] else { throw PrivacyError(.protocolViolation, "an envelope from '\(v)', which advertised no keys to \(name)") }
            let key = try Primitives.derive(cipherKey, peer.cipherKey, label: "envelope", session: setup.session)
            let plain = try Primitives.open(envelope, key: key, associated: setup.envelopeContext(from: v, to: name))
            guard plain.count == 2 * size * setup.sums else { throw PrivacyError(.malformed, "the envelope from '\(v)' holds \(plain.count) bytes") }
            opened[v] = try (0..<setup.sums).map { j in
                let base = 2 * size * j
                let pair = (try ShamirShare(bytes: Array(plain[base..<(base + size)])), try ShamirShare(bytes: Array(plain[(base + size)..<(base + 2 * size)])))
                guard pair.0.x == setup.point(of: name), pair.1.x == setup.point(of: name) else {
                    throw PrivacyError(.protocolViolation, "the envelope from '\(v)' holds shares for another party")
                }
                return pair
            }
        }
        held = opened
        stage = .ready
    }

    /// Step 3 of sum `j`: the masked vector, masked with the sum's `partners` (neighbours that shared, as the
    /// coordinator lists them; at least `threshold`, the parties that can rebuild this party's secrets).
    public mutating func maskedInput(_ input: [UInt64], sum j: Int, partners list: [String]) throws -> [UInt64] {
        guard stage == .ready else { throw PrivacyError(.protocolViolation, "\(name) sends inputs after taking its envelopes") }
        let setup = try configured()
        guard j >= 0, j < setup.sums else { throw PrivacyError(.invalidArgument, "sum \(j) of a session of \(setup.sums)") }
        guard partners[j] == nil else { throw PrivacyError(.protocolViolation, "\(name) already sent its input to sum \(j)") }
        let chosen = Set(list)
        guard chosen.count == list.count, !chosen.contains(name) else {
            throw PrivacyError(.protocolViolation, "the partners of sum \(j) repeat a name or name \(name) itself")
        }
        for v in chosen where held[v] == nil {
            throw PrivacyError(.protocolViolation, "'\(v)' did not share keys with \(name), so it cannot be a partner of sum \(j)")
        }
        guard chosen.count >= setup.threshold else {
            throw PrivacyError(.refused, "\(name) refuses to send an input to a sum with \(chosen.count) of its neighbours, fewer than the \(setup.threshold) that could rebuild its secrets")
        }
        var masked = input
        let ordered = chosen.sorted()
        try Self.apply(try Primitives.mask(seed: seeds[j], stream: UInt64(j), count: input.count), to: &masked, adding: true)
        for v in ordered {
            let seed = try setup.pairSeed(maskKeys[j], peers[v]!.maskKeys[j], sum: j)
            try Self.apply(try Primitives.mask(seed: seed, stream: UInt64(j), count: input.count), to: &masked,
                           adding: SecureAggregationSetup.adds(name, v))
        }
        partners[j] = ordered
        return masked
    }

    static func apply(_ mask: [UInt64], to v: inout [UInt64], adding: Bool) throws {
        if adding { for i in v.indices { v[i] &+= mask[i] } } else { for i in v.indices { v[i] &-= mask[i] } }
    }

    /// Step 4 of sum `j`: the shares the coordinator asks for, by owner. Refused when a partner is listed both ways,
    /// or the other way than before, or the survivors are too few to hide one input among them.
    public mutating func unmask(_ request: UnmaskRequest, sum j: Int) throws -> [String: [UInt8]] {
        guard let mine = partners[j] else { throw PrivacyError(.protocolViolation, "\(name) reveals shares of sum \(j) only after sending its input") }
        let setup = try configured()
        let survivors = Set(request.survivors), dropped = Set(request.dropped)
        guard survivors.count == request.survivors.count, dropped.count == request.dropped.count else {
            throw PrivacyError(.protocolViolation, "an unmask request names a partner twice")
        }
        if let both = survivors.intersection(dropped).sorted().first {
            throw PrivacyError(.refused, "\(name) refuses to reveal both the self-mask and the mask key shares of '\(both)' in sum \(j)")
        }
        for v in survivors.union(dropped) where !mine.contains(v) {
            throw PrivacyError(.protocolViolation, "'\(v)' is not a partner of \(name) in sum \(j)")
        }
        let before = revealed[j] ?? [:]
        for v in survivors where before[v] == .maskKey {
            throw PrivacyError(.refused, "\(name) already revealed its share of the mask key of '\(v)' in sum \(j); it refuses its self-mask share")
        }
        for v in dropped where before[v] == .selfMask {
            throw PrivacyError(.refused, "\(name) already revealed its share of the self-mask of '\(v)' in sum \(j); it refuses its mask key share")
        }
        guard survivors.count + 1 >= setup.threshold else {
            throw PrivacyError(.refused, "\(name) refuses to unmask a sum of \(survivors.count + 1) inputs among its neighbours (\(setup.threshold) needed)")
        }
        var out: [String: [UInt8]] = [:]
        var now = before
        for v in survivors {
            now[v] = .selfMask
            out[v] = held[v]![j].selfMask.bytes
        }
        for v in dropped {
            now[v] = .maskKey
            out[v] = held[v]![j].maskKey.bytes
        }
        revealed[j] = now
        return out
    }
}

/// The coordinator's side: relays keys and envelopes, keeps only each sum's running total of masked inputs, and
/// removes the masks from the unmask step's shares.
public struct SecureAggregationServer: Sendable {
    public enum Stage: Sendable { case advertising, sharing, ready }

    /// One secure sum's state.
    public struct Sum: Sendable {
        public let partners: Set<String>
        public let length: Int
        public fileprivate(set) var unmasking = false
        /// Parties whose masked inputs are in the total (U3).
        public fileprivate(set) var contributed: Set<String> = []
        /// Parties that answered the unmask step (U4).
        public fileprivate(set) var unmasked: Set<String> = []
        fileprivate var total: [UInt64]
        fileprivate var selfMaskShares: [String: [ShamirShare]] = [:]
        fileprivate var maskKeyShares: [String: [ShamirShare]] = [:]
    }

    public let setup: SecureAggregationSetup
    public private(set) var stage = Stage.advertising
    public private(set) var advertisements: [String: Advertisement] = [:]
    /// Envelopes by recipient, then sender.
    private var envelopes: [String: [String: [UInt8]]] = [:]
    /// Parties whose envelopes went out (U2).
    public private(set) var shared: Set<String> = []
    public private(set) var sums: [Int: Sum] = [:]

    public init(setup: SecureAggregationSetup) { self.setup = setup }

    /// The coordinator's side after the key exchange, rebuilt from what it kept of it: the advertisements and the
    /// parties whose envelopes went out (a coordinator restores a session this way for every secure sum, so the
    /// envelopes need not be kept in memory). Checks what `closeAdvertising` and `closeSharing` checked.
    public init(setup: SecureAggregationSetup, advertisements: [String: Advertisement], shared: Set<String>) throws {
        self.setup = setup
        for (u, a) in advertisements.sorted(by: { $0.key < $1.key }) { try receive(advertisement: a, from: u) }
        try closeAdvertising()
        guard shared.isSubset(of: Set(advertisements.keys)) else {
            throw PrivacyError(.protocolViolation, "parties shared keys without advertising: \(shared.subtracting(advertisements.keys).sorted())")
        }
        self.shared = shared
        for u in shared.sorted() {
            let n = setup.neighbours(of: u).filter(shared.contains).count
            guard n >= setup.threshold else {
                throw PrivacyError(.notEnoughShares, "'\(u)' has \(n) neighbours that shared keys, \(setup.threshold) needed")
            }
        }
        stage = .ready
    }

    private func party(_ u: String) throws {
        guard setup.point(of: u) != nil else { throw PrivacyError(.protocolViolation, "'\(u)' is not a party of this session") }
    }

    public mutating func receive(advertisement a: Advertisement, from u: String) throws {
        try party(u)
        guard stage == .advertising else { throw PrivacyError(.protocolViolation, "advertisements are closed; '\(u)' is late") }
        guard advertisements[u] == nil else { throw PrivacyError(.protocolViolation, "'\(u)' advertised twice") }
        guard a.wellFormed(sums: setup.sums) else { throw PrivacyError(.malformed, "the advertisement of '\(u)' is malformed") }
        let keys = Set(advertisements.values.flatMap(\.publicKeys))
        guard keys.isDisjoint(with: a.publicKeys) else {
            throw PrivacyError(.protocolViolation, "'\(u)' advertised a public key another party already did")
        }
        advertisements[u] = a
    }

    /// Ends step 1: parties that advertised go on; each needs `threshold` neighbours among them.
    public mutating func closeAdvertising() throws {
        guard stage == .advertising else { throw PrivacyError(.protocolViolation, "advertising is already closed") }
        for u in advertisements.keys.sorted() {
            let n = setup.neighbours(of: u).filter { advertisements[$0] != nil }.count
            guard n >= setup.threshold else {
                throw PrivacyError(.notEnoughShares, "'\(u)' has \(n) neighbours that advertised keys, \(setup.threshold) needed")
            }
        }
        stage = .sharing
    }

    /// The advertisements `u` receives: its neighbours'.
    public func advertisements(for u: String) throws -> [String: Advertisement] {
        guard stage != .advertising, advertisements[u] != nil else {
            throw PrivacyError(.protocolViolation, "'\(u)' gets its neighbours' keys after advertising its own, once advertising closed")
        }
        return advertisements.filter { setup.isNeighbour(u, $0.key) }
    }

    public mutating func receive(envelopes sealed: [String: [UInt8]], from u: String) throws {
        try party(u)
        guard stage == .sharing else { throw PrivacyError(.protocolViolation, "sharing is not open; '\(u)' sent envelopes") }
        guard advertisements[u] != nil, !shared.contains(u) else {
            throw PrivacyError(.protocolViolation, "'\(u)' sent envelopes twice or without advertising")
        }
        let expected = Set(try advertisements(for: u).keys)
        guard Set(sealed.keys) == expected else {
            throw PrivacyError(.protocolViolation, "'\(u)' sealed envelopes for \(sealed.keys.sorted()), not its advertised neighbours \(expected.sorted())")
        }
        for (v, e) in sealed { envelopes[v, default: [:]][u] = e }
        shared.insert(u)
    }

    /// Ends step 2.
    public mutating func closeSharing() throws {
        guard stage == .sharing else { throw PrivacyError(.protocolViolation, "sharing is not open") }
        for u in shared.sorted() {
            let n = setup.neighbours(of: u).filter(shared.contains).count
            guard n >= setup.threshold else {
                throw PrivacyError(.notEnoughShares, "'\(u)' has \(n) neighbours that shared keys, \(setup.threshold) needed")
            }
        }
        stage = .ready
    }

    /// The envelopes addressed to `u` by parties that shared.
    public func envelopes(for u: String) throws -> [String: [UInt8]] {
        guard stage == .ready, shared.contains(u) else {
            throw PrivacyError(.protocolViolation, "'\(u)' gets envelopes after sharing its own, once sharing closed")
        }
        return (envelopes[u] ?? [:]).filter { shared.contains($0.key) }
    }

    /// Opens sum `j` of `length` words among `partners` (parties that shared; the phase's workers), each with at
    /// least `threshold` neighbours among them (the ones asked for its shares).
    public mutating func open(sum j: Int, partners: Set<String>, length: Int) throws {
        guard stage == .ready else { throw PrivacyError(.protocolViolation, "a sum opens once sharing closed") }
        guard j >= 0, j < setup.sums, sums[j] == nil else {
            throw PrivacyError(.protocolViolation, "sum \(j) is already open or outside the session's \(setup.sums)")
        }
        guard length >= 0, partners.isSubset(of: shared) else {
            throw PrivacyError(.protocolViolation, "sum \(j) names parties that did not share keys: \(partners.subtracting(shared).sorted())")
        }
        for u in partners.sorted() {
            let n = setup.neighbours(of: u).filter(partners.contains).count
            guard n >= setup.threshold else {
                throw PrivacyError(.notEnoughShares, "'\(u)' has \(n) neighbours among the \(partners.count) parties of sum \(j), \(setup.threshold) needed to rebuild its secrets")
            }
        }
        sums[j] = Sum(partners: partners, length: length, total: [UInt64](repeating: 0, count: length))
    }

    /// The partners `u` masks with in sum `j`: its neighbours among the sum's parties.
    public func partners(of u: String, sum j: Int) throws -> [String] {
        guard let s = sums[j], s.partners.contains(u) else { throw PrivacyError(.protocolViolation, "'\(u)' is not a party of sum \(j)") }
        return setup.neighbours(of: u).filter(s.partners.contains)
    }

    /// Folds a masked input into sum `j` (the input itself is not kept).
    public mutating func receive(maskedInput: [UInt64], sum j: Int, from u: String) throws {
        try party(u)
        guard var s = sums[j], !s.unmasking else { throw PrivacyError(.protocolViolation, "sum \(j) is not collecting inputs; '\(u)' is late") }
        guard s.partners.contains(u), !s.contributed.contains(u) else {
            throw PrivacyError(.protocolViolation, "'\(u)' sent an input to sum \(j) twice or without being one of its parties")
        }
        guard maskedInput.count == s.length else {
            throw PrivacyError(.invalidArgument, "'\(u)' sent \(maskedInput.count) words, sum \(j) has \(s.length)")
        }
        sums[j] = nil  // no copy of the total while it is updated
        for i in s.total.indices { s.total[i] &+= maskedInput[i] }
        s.contributed.insert(u)
        sums[j] = s
    }

    /// Folds the ring sum of several parties' masked inputs into sum `j` at once (a coordinator that kept the running
    /// total durably rather than each input).
    public mutating func receive(maskedTotal: [UInt64], sum j: Int, from parties: Set<String>) throws {
        guard var s = sums[j], !s.unmasking else { throw PrivacyError(.protocolViolation, "sum \(j) is not collecting inputs") }
        guard parties.isSubset(of: s.partners), s.contributed.isDisjoint(with: parties) else {
            throw PrivacyError(.protocolViolation, "a total of sum \(j) names parties that are not its partners or already sent inputs")
        }
        guard maskedTotal.count == s.length else {
            throw PrivacyError(.invalidArgument, "a total of \(maskedTotal.count) words, sum \(j) has \(s.length)")
        }
        sums[j] = nil
        for i in s.total.indices { s.total[i] &+= maskedTotal[i] }
        s.contributed.formUnion(parties)
        sums[j] = s
    }

    /// Ends step 3 of sum `j`: no input is taken after this.
    public mutating func closeInputs(sum j: Int) throws {
        guard var s = sums[j], !s.unmasking else { throw PrivacyError(.protocolViolation, "sum \(j) is not collecting inputs") }
        guard !s.contributed.isEmpty else { throw PrivacyError(.notEnoughShares, "no party sent an input to sum \(j)") }
        s.unmasking = true
        sums[j] = s
    }

    /// What `u` is asked for in sum `j`: its partners that sent inputs, and those that did not.
    public func unmaskRequest(for u: String, sum j: Int) throws -> UnmaskRequest {
        guard let s = sums[j], s.unmasking, s.contributed.contains(u) else {
            throw PrivacyError(.protocolViolation, "'\(u)' is asked to unmask sum \(j) only after sending its input, once inputs closed")
        }
        let mine = try partners(of: u, sum: j)
        return UnmaskRequest(survivors: mine.filter(s.contributed.contains), dropped: mine.filter { !s.contributed.contains($0) })
    }

    public mutating func receive(unmask shares: [String: [UInt8]], sum j: Int, from u: String) throws {
        try party(u)
        let request = try unmaskRequest(for: u, sum: j)
        guard var s = sums[j], !s.unmasked.contains(u) else { throw PrivacyError(.protocolViolation, "'\(u)' answered the unmask step of sum \(j) twice") }
        guard Set(shares.keys) == Set(request.survivors + request.dropped) else {
            throw PrivacyError(.protocolViolation, "'\(u)' returned shares of \(shares.keys.sorted()), not the ones asked")
        }
        var parsed: [(String, ShamirShare)] = []
        for (v, bytes) in shares {
            let share = try ShamirShare(bytes: bytes)
            guard share.x == setup.point(of: u), share.values.count == Shamir.chunks(of: 32) else {
                throw PrivacyError(.malformed, "'\(u)' returned a share of '\(v)' that is not its own point's")
            }
            parsed.append((v, share))
        }
        for (v, share) in parsed {
            if s.contributed.contains(v) { s.selfMaskShares[v, default: []].append(share) } else { s.maskKeyShares[v, default: []].append(share) }
        }
        s.unmasked.insert(u)
        sums[j] = s
    }

    /// The parties of sum `j` whose secrets cannot be rebuilt yet (fewer than `threshold` shares returned).
    public func missing(sum j: Int) -> [String] {
        guard let s = sums[j] else { return [] }
        return s.contributed.filter { (s.selfMaskShares[$0]?.count ?? 0) < setup.threshold }.sorted()
            + s.partners.subtracting(s.contributed).filter { (s.maskKeyShares[$0]?.count ?? 0) < setup.threshold }.sorted()
    }

    /// The unmasked sum of the inputs of sum `j`'s contributors.
    public func result(sum j: Int) throws -> [UInt64] {
        guard let s = sums[j], s.unmasking else { throw PrivacyError(.protocolViolation, "sum \(j) is known only in its unmask step") }
        if let v = missing(sum: j).first {
            throw PrivacyError(.notEnoughShares, "too few shares returned to rebuild the secrets of '\(v)' in sum \(j) (\(setup.threshold) needed)")
        }
        var out = s.total
        for v in s.contributed.sorted() {
            let seed = try? Shamir.combine(s.selfMaskShares[v]!.sorted { $0.x < $1.x }, threshold: setup.threshold, secretBytes: 32)
            guard let seed, setup.commitment(v, sum: j, seed: seed) == advertisements[v]!.commitments[j] else {
                throw PrivacyError(.verificationFailed, "the self-mask seed rebuilt for '\(v)' in sum \(j) is not the one it committed to (a share is corrupt)")
            }
            try SecureAggregationClient.apply(try Primitives.mask(seed: seed, stream: UInt64(j), count: s.length), to: &out, adding: false)
        }
        for v in s.partners.subtracting(s.contributed).sorted() {
            let raw = try? Shamir.combine(s.maskKeyShares[v]!.sorted { $0.x < $1.x }, threshold: setup.threshold, secretBytes: 32)
            guard let raw, let key = try? Curve25519.KeyAgreement.PrivateKey(rawRepresentation: raw),
                  Array(key.publicKey.rawRepresentation) == advertisements[v]!.maskKeys[j] else {
                throw PrivacyError(.verificationFailed, "the mask key rebuilt for '\(v)' in sum \(j) does not match its public key (a share is corrupt)")
            }
            // Each partner w that sent its input masked with v: w added (or subtracted) their mask; undo it.
            for w in setup.neighbours(of: v) where s.contributed.contains(w) {
                let seed = try setup.pairSeed(key, advertisements[w]!.maskKeys[j], sum: j)
                try SecureAggregationClient.apply(try Primitives.mask(seed: seed, stream: UInt64(j), count: s.length), to: &out,
                                                  adding: !SecureAggregationSetup.adds(w, v))
            }
        }
        return out
    }
}
