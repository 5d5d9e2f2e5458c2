import Crypto
import Foundation

// Secure aggregation (Bonawitz et al., CCS 2017) with SecAgg+'s sparse neighbour graph (Bell et al., CCS 2020):
// the coordinator learns the sum of the parties' vectors in the ring of integers modulo 2⁶⁴ and nothing else, even
// when some parties drop out, as long as each party keeps `threshold` neighbours.
//
// 1. Advertise: every party sends two X25519 public keys (one seals shares, one derives pairwise masks) and a
//    commitment to its self-mask seed.
// 2. Share: every party sends each neighbour, sealed under their agreed key, a Shamir share of its self-mask seed and
//    one of its mask private key (threshold `t`).
// 3. Input: every party sends its vector plus the expansion of its self-mask seed plus, per neighbour v that shared
//    with it, ±the expansion of their agreed mask seed (+ when its name sorts before v's): the pairwise masks of two
//    parties who both send cancel in the sum.
// 4. Unmask: for each neighbour that sent its input, a party returns its share of that neighbour's self-mask seed;
//    for each that shared but did not send, its share of the mask private key. The coordinator rebuilds the seeds
//    (checked against the commitments) and keys (checked against the public keys), removes the self-masks and the
//    dropped parties' pairwise masks, and holds the sum. A party never reveals both shares of one neighbour: that
//    would unmask that neighbour's own vector.
//
// Both sides are plain values: no clock, no network; the round machine carries the messages.

/// The public settings of one secure sum, which every party and the coordinator derive alike.
public struct SecureAggregationSetup: Sendable, Equatable {
    /// What every key, mask and envelope is bound to (a round and phase): nothing carries over between sessions.
    public let session: [UInt8]
    /// The parties, sorted, distinct.
    public let participants: [String]
    /// Neighbours per party (itself not counted); every other party when it reaches `participants.count − 1`.
    public let degree: Int
    /// Shares that rebuild a party's secrets.
    public let threshold: Int
    /// Words per vector.
    public let length: Int
    private let ring: [String]
    private let position: [String: Int]

    /// `degree` defaults to every other party up to 16 parties, then the even number at or above 4·log₂ n (SecAgg+:
    /// a party's work grows with log n); `threshold` to ⌊2·degree/3⌋ + 1, more than half of a party's neighbours, so
    /// a coordinator that tells some neighbours a party dropped and others that it did not cannot gather both of its
    /// secrets.
    public init(session: [UInt8], participants: [String], degree: Int? = nil, threshold: Int? = nil, length: Int) throws {
        let sorted = participants.sorted()
        guard sorted.count >= 2, Set(sorted).count == sorted.count else {
            throw PrivacyError(.invalidArgument, "secure aggregation needs at least two distinct parties (\(participants.count) given)")
        }
        guard !session.isEmpty else { throw PrivacyError(.invalidArgument, "secure aggregation needs a session") }
        guard length >= 0 else { throw PrivacyError(.invalidArgument, "a vector length of \(length)") }
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
        self.length = length
        // The ring of the Harary graph: parties in an order only the session decides (a hash of it and the name).
        ring = sorted.sorted { Primitives.digest([session, Array($0.utf8)]).lexicographicallyPrecedes(Primitives.digest([session, Array($1.utf8)])) }
        position = Dictionary(uniqueKeysWithValues: ring.enumerated().map { ($1, $0) })
    }

    public static func defaultDegree(_ parties: Int) -> Int {
        guard parties > 16 else { return parties - 1 }
        let k = Int((4 * log2(Double(parties))).rounded(.up))
        return k + k % 2
    }

    public static func defaultThreshold(_ degree: Int) -> Int { 2 * degree / 3 + 1 }

    /// `u`'s neighbours, sorted: everyone else when the degree reaches n − 1; else the ⌈degree/2⌉ parties on each
    /// side of it on the ring (an odd degree rounds up to the next even one on a ring). Symmetric.
    public func neighbours(of u: String) -> [String] {
        guard let p = position[u] else { return [] }
        let n = ring.count
        if degree >= n - 1 { return participants.filter { $0 != u } }
        let half = (degree + 1) / 2
        var out = Set<String>()
        for offset in 1...half {
            out.insert(ring[(p + offset) % n])
            out.insert(ring[(p - offset % n + n) % n])
        }
        out.remove(u)
        return out.sorted()
    }

    /// `u`'s Shamir evaluation point: its place among the parties, from 1.
    public func point(of u: String) -> UInt64? { participants.firstIndex(of: u).map { UInt64($0 + 1) } }

    func isNeighbour(_ u: String, _ v: String) -> Bool { u != v && neighbours(of: u).contains(v) }

    /// The sign a party gives its pairwise mask with `v`.
    static func sign(_ u: String, _ v: String) -> Bool { u < v }

    func envelopeContext(from u: String, to v: String) -> [UInt8] { Primitives.digest([session, Array(u.utf8), Array(v.utf8)]) }

    func commitment(_ u: String, seed: [UInt8]) -> [UInt8] { Primitives.digest([session, Array(u.utf8), seed]) }
}

/// What a party publishes first.
public struct Advertisement: Sendable, Equatable {
    /// X25519 public key that seals the shares sent to this party.
    public var cipherKey: [UInt8]
    /// X25519 public key from which pairwise masks are agreed.
    public var maskKey: [UInt8]
    /// SHA-256 of the session, the party and its self-mask seed: the rebuilt seed must match it.
    public var commitment: [UInt8]

    public init(cipherKey: [UInt8], maskKey: [UInt8], commitment: [UInt8]) {
        self.cipherKey = cipherKey
        self.maskKey = maskKey
        self.commitment = commitment
    }

    var wellFormed: Bool { cipherKey.count == 32 && maskKey.count == 32 && commitment.count == 32 && cipherKey != maskKey }
}

/// What the coordinator asks of a party in the last step.
public struct UnmaskRequest: Sendable, Equatable {
    /// Neighbours whose inputs are in the sum: their self-mask seed shares are wanted.
    public var survivors: [String]
    /// Neighbours that shared but sent no input: their mask key shares are wanted.
    public var dropped: [String]

    public init(survivors: [String], dropped: [String]) {
        self.survivors = survivors
        self.dropped = dropped
    }
}

/// One party's side (a worker).
public struct SecureAggregationClient: Sendable {
    public enum Stage: Sendable { case advertised, shared, sentInput }
    private enum Revealed: Sendable { case selfMask, maskKey }

    public let name: String
    public let setup: SecureAggregationSetup
    public private(set) var stage = Stage.advertised
    private let cipherKey: Curve25519.KeyAgreement.PrivateKey
    private let maskKey: Curve25519.KeyAgreement.PrivateKey
    private let selfMaskSeed: [UInt8]
    private var peers: [String: Advertisement] = [:]
    /// Shares of each neighbour's self-mask seed and mask key, from the envelopes it sent.
    private var held: [String: (selfMask: ShamirShare, maskKey: ShamirShare)] = [:]
    /// Which secret's share this party has given out per neighbour (never both).
    private var revealed: [String: Revealed] = [:]

    /// A party's fresh secrets, drawn from `random` (the system's generator outside tests).
    public init<R: RandomNumberGenerator>(name: String, setup: SecureAggregationSetup, using random: inout R) throws {
        guard setup.point(of: name) != nil else { throw PrivacyError(.invalidArgument, "'\(name)' is not a party of this session") }
        func bytes() -> [UInt8] { (0..<32).map { _ in UInt8.random(in: 0...255, using: &random) } }
        self.name = name
        self.setup = setup
        cipherKey = try Curve25519.KeyAgreement.PrivateKey(rawRepresentation: bytes())
        maskKey = try Curve25519.KeyAgreement.PrivateKey(rawRepresentation: bytes())
        selfMaskSeed = bytes()
    }

    public var advertisement: Advertisement {
        Advertisement(cipherKey: Array(cipherKey.publicKey.rawRepresentation), maskKey: Array(maskKey.publicKey.rawRepresentation),
                      commitment: setup.commitment(name, seed: selfMaskSeed))
    }

    /// Step 2: the neighbours' advertisements (as the coordinator relays them) in, one sealed envelope per
    /// neighbour out (by recipient).
    public mutating func shareKeys<R: RandomNumberGenerator>(_ advertisements: [String: Advertisement], using random: inout R) throws -> [String: [UInt8]] {
        guard stage == .advertised else { throw PrivacyError(.protocolViolation, "\(name) has already shared its keys in this session") }
        for (v, a) in advertisements {
            guard setup.isNeighbour(name, v) else { throw PrivacyError(.protocolViolation, "'\(v)' is not a neighbour of \(name)") }
            guard a.wellFormed else { throw PrivacyError(.malformed, "the advertisement of '\(v)' is malformed") }
        }
        guard advertisements.count >= setup.threshold else {
            throw PrivacyError(.notEnoughShares, "\(advertisements.count) neighbours of \(name) advertised keys, \(setup.threshold) needed")
        }
        let keys = advertisements.values.flatMap { [$0.cipherKey, $0.maskKey] } + [advertisement.cipherKey, advertisement.maskKey]
        guard Set(keys).count == keys.count else {
            throw PrivacyError(.protocolViolation, "two advertised public keys are equal (a replayed or forged advertisement)")
        }
        let recipients = advertisements.keys.sorted()
        let points = recipients.map { setup.point(of: $0)! }
        let seedShares = try Shamir.split(selfMaskSeed, threshold: setup.threshold, at: points, using: &random)
        let keyShares = try Shamir.split(Array(maskKey.rawRepresentation), threshold: setup.threshold, at: points, using: &random)
        var out: [String: [UInt8]] = [:]
        for (k, v) in recipients.enumerated() {
            let key = try Primitives.derive(cipherKey, advertisements[v]!.cipherKey, label: "envelope", session: setup.session)
            out[v] = try Primitives.seal(seedShares[k].bytes + keyShares[k].bytes, key: key, associated: setup.envelopeContext(from: name, to: v))
        }
        peers = advertisements
        stage = .shared
        return out
    }

    /// Step 3: the envelopes addressed to this party (by sender) in, the masked vector out.
    public mutating func maskedInput(_ input: [UInt64], envelopes: [String: [UInt8]]) throws -> [UInt64] {
        guard stage == .shared else { throw PrivacyError(.protocolViolation, "\(name) sends its input once, after sharing its keys") }
        guard input.count == setup.length else {
            throw PrivacyError(.invalidArgument, "an input of \(input.count) words, the session sums \(setup.length)")
        }
        guard envelopes.count >= setup.threshold else {
            throw PrivacyError(.notEnoughShares, "\(envelopes.count) neighbours of \(name) shared keys, \(setup.threshold) needed")
        }
        let size = 8 * (1 + Shamir.chunks(of: 32))
        var opened: [String: (selfMask: ShamirShare, maskKey: ShamirShare)] = [:]
        for (v, envelope) in envelopes {
            guard let peer = peers[v] else { throw PrivacyError(.protocolViolation, "an envelope from '\(v)', which advertised no keys to \(name)") }
            let key = try Primitives.derive(cipherKey, peer.cipherKey, label: "envelope", session: setup.session)
            let plain = try Primitives.open(envelope, key: key, associated: setup.envelopeContext(from: v, to: name))
            guard plain.count == 2 * size else { throw PrivacyError(.malformed, "the envelope from '\(v)' holds \(plain.count) bytes") }
            let pair = (try ShamirShare(bytes: Array(plain[..<size])), try ShamirShare(bytes: Array(plain[size...])))
            guard pair.0.x == setup.point(of: name), pair.1.x == setup.point(of: name) else {
                throw PrivacyError(.protocolViolation, "the envelope from '\(v)' holds shares for another party")
            }
            opened[v] = pair
        }
        var masked = input
        func add(_ mask: [UInt64], _ plus: Bool) {
            if plus { for i in masked.indices { masked[i] &+= mask[i] } } else { for i in masked.indices { masked[i] &-= mask[i] } }
        }
        add(try Primitives.mask(seed: selfMaskSeed, stream: 0, count: setup.length), true)
        for v in opened.keys.sorted() {
            let seed = try Primitives.derive(maskKey, peers[v]!.maskKey, label: "mask", session: setup.session)
            add(try Primitives.mask(seed: seed, stream: 0, count: setup.length), SecureAggregationSetup.sign(name, v))
        }
        held = opened
        stage = .sentInput
        return masked
    }

    /// Step 4: the shares the coordinator asks for, by owner. Refused when a neighbour is listed both ways, or now
    /// the other way than before, or the survivors are too few to hide one input among them.
    public mutating func unmask(_ request: UnmaskRequest) throws -> [String: [UInt8]] {
        guard stage == .sentInput else { throw PrivacyError(.protocolViolation, "\(name) reveals shares only after sending its input") }
        let survivors = Set(request.survivors), dropped = Set(request.dropped)
        guard survivors.count == request.survivors.count, dropped.count == request.dropped.count else {
            throw PrivacyError(.protocolViolation, "an unmask request names a neighbour twice")
        }
        if let both = survivors.intersection(dropped).sorted().first {
            throw PrivacyError(.refused, "\(name) refuses to reveal both the self-mask and the mask key shares of '\(both)'")
        }
        for v in survivors.union(dropped) where held[v] == nil {
            throw PrivacyError(.protocolViolation, "\(name) holds no shares of '\(v)' (it did not share with \(name))")
        }
        for v in survivors where revealed[v] == .maskKey {
            throw PrivacyError(.refused, "\(name) already revealed its share of the mask key of '\(v)'; it refuses its self-mask share")
        }
        for v in dropped where revealed[v] == .selfMask {
            throw PrivacyError(.refused, "\(name) already revealed its share of the self-mask of '\(v)'; it refuses its mask key share")
        }
        guard survivors.count + 1 >= setup.threshold else {
            throw PrivacyError(.refused, "\(name) refuses to unmask a sum of \(survivors.count + 1) inputs among its neighbours (\(setup.threshold) needed)")
        }
        var out: [String: [UInt8]] = [:]
        for v in survivors {
            revealed[v] = .selfMask
            out[v] = held[v]!.selfMask.bytes
        }
        for v in dropped {
            revealed[v] = .maskKey
            out[v] = held[v]!.maskKey.bytes
        }
        return out
    }
}

/// The coordinator's side: relays keys and envelopes, keeps only the running sum of the masked inputs, and removes
/// the masks from the unmask step's shares.
public struct SecureAggregationServer: Sendable {
    public enum Stage: Sendable { case advertising, sharing, collecting, unmasking }

    public let setup: SecureAggregationSetup
    public private(set) var stage = Stage.advertising
    public private(set) var advertisements: [String: Advertisement] = [:]
    /// Envelopes by recipient, then sender.
    private var envelopes: [String: [String: [UInt8]]] = [:]
    /// Parties whose envelopes went out (U2).
    public private(set) var shared: Set<String> = []
    /// Parties whose masked inputs are in the sum (U3).
    public private(set) var contributed: Set<String> = []
    private var sum: [UInt64]
    /// Shares received in the unmask step, by owner.
    private var selfMaskShares: [String: [ShamirShare]] = [:]
    private var maskKeyShares: [String: [ShamirShare]] = [:]
    /// Parties that answered the unmask step (U4).
    public private(set) var unmasked: Set<String> = []

    public init(setup: SecureAggregationSetup) {
        self.setup = setup
        sum = [UInt64](repeating: 0, count: setup.length)
    }

    private func party(_ u: String) throws {
        guard setup.point(of: u) != nil else { throw PrivacyError(.protocolViolation, "'\(u)' is not a party of this session") }
    }

    public mutating func receive(advertisement a: Advertisement, from u: String) throws {
        try party(u)
        guard stage == .advertising else { throw PrivacyError(.protocolViolation, "advertisements are closed; '\(u)' is late") }
        guard advertisements[u] == nil else { throw PrivacyError(.protocolViolation, "'\(u)' advertised twice") }
        guard a.wellFormed else { throw PrivacyError(.malformed, "the advertisement of '\(u)' is malformed") }
        let keys = Set(advertisements.values.flatMap { [$0.cipherKey, $0.maskKey] })
        guard !keys.contains(a.cipherKey), !keys.contains(a.maskKey) else {
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
        stage = .collecting
    }

    /// The envelopes addressed to `u` by parties that shared.
    public func envelopes(for u: String) throws -> [String: [UInt8]] {
        guard stage == .collecting || stage == .unmasking, shared.contains(u) else {
            throw PrivacyError(.protocolViolation, "'\(u)' gets envelopes after sharing its own, once sharing closed")
        }
        return (envelopes[u] ?? [:]).filter { shared.contains($0.key) }
    }

    /// Folds a masked input into the sum (the input itself is not kept).
    public mutating func receive(maskedInput: [UInt64], from u: String) throws {
        try party(u)
        guard stage == .collecting else { throw PrivacyError(.protocolViolation, "inputs are not being collected; '\(u)' is late") }
        guard shared.contains(u), !contributed.contains(u) else {
            throw PrivacyError(.protocolViolation, "'\(u)' sent an input twice or without sharing its keys")
        }
        guard maskedInput.count == setup.length else {
            throw PrivacyError(.invalidArgument, "'\(u)' sent \(maskedInput.count) words, the session sums \(setup.length)")
        }
        for i in sum.indices { sum[i] &+= maskedInput[i] }
        contributed.insert(u)
    }

    /// Ends step 3.
    public mutating func closeInputs() throws {
        guard stage == .collecting else { throw PrivacyError(.protocolViolation, "inputs are not being collected") }
        guard !contributed.isEmpty else { throw PrivacyError(.notEnoughShares, "no party sent an input") }
        stage = .unmasking
    }

    /// What `u` is asked for: its neighbours that sent inputs, and those that shared but sent none.
    public func unmaskRequest(for u: String) throws -> UnmaskRequest {
        guard stage == .unmasking, contributed.contains(u) else {
            throw PrivacyError(.protocolViolation, "'\(u)' is asked to unmask only after sending its input, once inputs closed")
        }
        let senders = try envelopes(for: u).keys
        return UnmaskRequest(survivors: senders.filter(contributed.contains).sorted(),
                             dropped: senders.filter { !contributed.contains($0) }.sorted())
    }

    public mutating func receive(unmask shares: [String: [UInt8]], from u: String) throws {
        try party(u)
        let request = try unmaskRequest(for: u)
        guard !unmasked.contains(u) else { throw PrivacyError(.protocolViolation, "'\(u)' answered the unmask step twice") }
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
            if contributed.contains(v) { selfMaskShares[v, default: []].append(share) } else { maskKeyShares[v, default: []].append(share) }
        }
        unmasked.insert(u)
    }

    /// The parties whose secrets cannot be rebuilt yet (fewer than `threshold` shares returned).
    public var missing: [String] {
        contributed.filter { (selfMaskShares[$0]?.count ?? 0) < setup.threshold }.sorted()
            + shared.subtracting(contributed).filter { (maskKeyShares[$0]?.count ?? 0) < setup.threshold }.sorted()
    }

    /// The unmasked sum of the inputs of `contributed`.
    public func result() throws -> [UInt64] {
        guard stage == .unmasking else { throw PrivacyError(.protocolViolation, "the sum is known only in the unmask step") }
        if let v = missing.first {
            throw PrivacyError(.notEnoughShares, "too few shares returned to rebuild the secrets of '\(v)' (\(setup.threshold) needed)")
        }
        var out = sum
        func subtract(_ mask: [UInt64], _ plus: Bool) {
            if plus { for i in out.indices { out[i] &-= mask[i] } } else { for i in out.indices { out[i] &+= mask[i] } }
        }
        for v in contributed.sorted() {
            let seed = try? Shamir.combine(selfMaskShares[v]!.sorted { $0.x < $1.x }, threshold: setup.threshold, secretBytes: 32)
            guard let seed, setup.commitment(v, seed: seed) == advertisements[v]!.commitment else {
                throw PrivacyError(.verificationFailed, "the self-mask seed rebuilt for '\(v)' is not the one it committed to (a share is corrupt)")
            }
            subtract(try Primitives.mask(seed: seed, stream: 0, count: setup.length), true)
        }
        for v in shared.subtracting(contributed).sorted() {
            let raw = try? Shamir.combine(maskKeyShares[v]!.sorted { $0.x < $1.x }, threshold: setup.threshold, secretBytes: 32)
            guard let raw, let key = try? Curve25519.KeyAgreement.PrivateKey(rawRepresentation: raw),
                  Array(key.publicKey.rawRepresentation) == advertisements[v]!.maskKey else {
                throw PrivacyError(.verificationFailed, "the mask key rebuilt for '\(v)' does not match its public key (a share is corrupt)")
            }
            // Each neighbour w that sent its input added sign(w, v) · mask(w, v); take it out again.
            for w in setup.neighbours(of: v) where contributed.contains(w) {
                let seed = try Primitives.derive(key, advertisements[w]!.maskKey, label: "mask", session: setup.session)
                subtract(try Primitives.mask(seed: seed, stream: 0, count: setup.length), SecureAggregationSetup.sign(w, v))
            }
        }
        return out
    }
}
