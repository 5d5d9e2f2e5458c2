import Testing
import WhittlePrivacy
import WhittleNN

/// The secure-aggregation protocol among in-process parties: exact sums with and without dropouts, on complete and
/// sparse (SecAgg+) neighbour graphs, and the refusals that keep one party's input hidden.
@Suite struct SecureAggregationTests {
    struct Session {
        var setup: SecureAggregationSetup
        var server: SecureAggregationServer
        var clients: [String: SecureAggregationClient]
        var length: Int
        var random: SplitMix64

        init(parties: Int, length: Int, degree: Int? = nil, sums: Int = 1, seed: UInt64 = 0) throws {
            random = SplitMix64(seed: seed)
            self.length = length
            let names = (0..<parties).map { "camera-\($0)" }
            setup = try SecureAggregationSetup(session: Array("round-1".utf8), participants: names, degree: degree, sums: sums)
            server = SecureAggregationServer(setup: setup)
            clients = [:]
            for n in names { clients[n] = try SecureAggregationClient(name: n, session: setup.session, sums: setup.sums, using: &random) }
        }

        /// Steps 1 and 2 for every party.
        mutating func exchangeKeys() throws {
            let names = setup.participants
            for n in names { try server.receive(advertisement: clients[n]!.advertisement, from: n) }
            try server.closeAdvertising()
            for n in names { try server.receive(envelopes: try clients[n]!.shareKeys(setup, advertisements: try server.advertisements(for: n), using: &random), from: n) }
            try server.closeSharing()
            for n in names { try clients[n]!.receive(envelopes: try server.envelopes(for: n)) }
        }

        mutating func inputs(_ names: [String]) -> [String: [UInt64]] {
            var out: [String: [UInt64]] = [:]
            for n in names { out[n] = (0..<length).map { _ in random.next() } }
            return out
        }

        /// Sum `j` among `parties` (default: all); `silent` send no input, `silentAfterInput` never answer the unmask
        /// step. Returns the sum, the inputs and the masked inputs as sent.
        mutating func sum(_ j: Int = 0, parties: [String]? = nil, silent: Set<String> = [], silentAfterInput: Set<String> = []) throws
            -> (sum: [UInt64], inputs: [String: [UInt64]], masked: [String: [UInt64]]) {
            let names = parties ?? setup.participants
            try server.open(sum: j, partners: Set(names), length: length)
            let inputs = inputs(names)
            var masked: [String: [UInt64]] = [:]
            for n in names where !silent.contains(n) {
                masked[n] = try clients[n]!.maskedInput(inputs[n]!, sum: j, partners: try server.partners(of: n, sum: j))
                try server.receive(maskedInput: masked[n]!, sum: j, from: n)
            }
            try server.closeInputs(sum: j)
            for n in names where !silent.contains(n) && !silentAfterInput.contains(n) {
                try server.receive(unmask: try clients[n]!.unmask(try server.unmaskRequest(for: n, sum: j), sum: j), sum: j, from: n)
            }
            return (try server.result(sum: j), inputs, masked)
        }

        func total(_ inputs: [String: [UInt64]], without: Set<String> = []) -> [UInt64] {
            var sum = [UInt64](repeating: 0, count: length)
            for (n, v) in inputs where !without.contains(n) { for i in sum.indices { sum[i] &+= v[i] } }
            return sum
        }
    }

    @Test func eightPartiesSumExactlyAndEachMaskedInputLooksRandom() throws {
        var s = try Session(parties: 8, length: 1000)
        #expect(s.setup.degree == 7 && s.setup.threshold == 5)
        try s.exchangeKeys()
        let (sum, inputs, masked) = try s.sum()
        #expect(sum == s.total(inputs))
        // A masked input shares no word with its input, and its low bits are balanced (a uniform mask).
        for (n, m) in masked {
            #expect(zip(m, inputs[n]!).allSatisfy { $0 != $1 })
            let ones = m.reduce(0) { $0 + Int($1 & 1) }
            #expect(ones > 400 && ones < 600)
        }
    }

    @Test func theSumSurvivesOneDropoutBeforeItsInputAndOneAfter() throws {
        // The case: 8 workers, one gone before sending its input (its pairwise masks are rebuilt from its
        // mask key), one gone after sending it (its self-mask is rebuilt from the others' shares).
        var s = try Session(parties: 8, length: 257, seed: 1)
        try s.exchangeKeys()
        let (sum, inputs, _) = try s.sum(silent: ["camera-2"], silentAfterInput: ["camera-5"])
        #expect(sum == s.total(inputs, without: ["camera-2"]))
        #expect(s.server.sums[0]!.contributed.count == 7 && s.server.sums[0]!.unmasked.count == 6)
    }

    @Test func oneSessionServesSeveralSumsAndADropoutInOneKeepsTheOthersSecret() throws {
        var s = try Session(parties: 7, length: 33, sums: 3, seed: 6)
        try s.exchangeKeys()
        // Sum 0: camera-2 drops (its sum-0 mask key is rebuilt). Sum 1: it takes part again, under other secrets.
        // Sum 2: six of the seven parties (each with the threshold, 5, of neighbours among them).
        let first = try s.sum(0, silent: ["camera-2"])
        #expect(first.sum == s.total(first.inputs, without: ["camera-2"]))
        let second = try s.sum(1)
        #expect(second.sum == s.total(second.inputs))
        let six = ["camera-0", "camera-1", "camera-2", "camera-3", "camera-4", "camera-6"]
        let third = try s.sum(2, parties: six)
        #expect(third.sum == s.total(third.inputs))
        // A sum opens once; a party sends one input per sum.
        #expect(throws: PrivacyError.self) { try s.server.open(sum: 1, partners: Set(six), length: 33) }
        var c = s.clients["camera-0"]!
        #expect(throws: PrivacyError.self) { try c.maskedInput([UInt64](repeating: 0, count: 33), sum: 1, partners: ["camera-1", "camera-3", "camera-4", "camera-5"]) }
        // Too few parties to hide an input among them: the coordinator will not open it, a party will not join it.
        var fresh = try Session(parties: 7, length: 1, sums: 1, seed: 7)
        try fresh.exchangeKeys()
        let e = #expect(throws: PrivacyError.self) { try fresh.server.open(sum: 0, partners: ["camera-0", "camera-1", "camera-3", "camera-4", "camera-5"], length: 1) }
        #expect(e?.code == .notEnoughShares)
    }

    @Test func sparseGraphsOfSecAggPlusSumExactly() throws {
        // 40 parties: 22 neighbours each (the even number at or above 4·log₂ 40), symmetric.
        var s = try Session(parties: 40, length: 16, seed: 2)
        #expect(s.setup.degree == 22)
        for u in s.setup.participants {
            let n = s.setup.neighbours(of: u)
            #expect(n.count == 22 && !n.contains(u))
            for v in n { #expect(s.setup.neighbours(of: v).contains(u)) }
        }
        try s.exchangeKeys()
        let dropped: Set<String> = ["camera-3", "camera-17"]
        let (sum, inputs, _) = try s.sum(silent: dropped, silentAfterInput: ["camera-30", "camera-31"])
        #expect(sum == s.total(inputs, without: dropped))
    }

    @Test func aPartyRefusesToRevealBothSecretsOfOneNeighbour() throws {
        var s = try Session(parties: 6, length: 8, seed: 3)
        try s.exchangeKeys()
        try s.server.open(sum: 0, partners: Set(s.setup.participants), length: 8)
        let inputs = s.inputs(s.setup.participants)
        var client = s.clients["camera-0"]!
        let peers = ["camera-1", "camera-2", "camera-3", "camera-4", "camera-5"]
        // Before its own input a party reveals nothing.
        #expect(throws: PrivacyError.self) { try client.unmask(UnmaskRequest(survivors: peers, dropped: []), sum: 0) }
        _ = try client.maskedInput(inputs["camera-0"]!, sum: 0, partners: try s.server.partners(of: "camera-0", sum: 0))
        // One request naming a neighbour both ways.
        var e = #expect(throws: PrivacyError.self) { try client.unmask(UnmaskRequest(survivors: peers, dropped: ["camera-1"]), sum: 0) }
        #expect(e?.code == .refused)
        // The self-mask share first, then the mask key share of the same neighbour.
        let first = try client.unmask(UnmaskRequest(survivors: peers, dropped: []), sum: 0)
        #expect(Set(first.keys) == Set(peers))
        e = #expect(throws: PrivacyError.self) { try client.unmask(UnmaskRequest(survivors: Array(peers.dropFirst()), dropped: ["camera-1"]), sum: 0) }
        #expect(e?.code == .refused)
        // Too few survivors to hide one input among them (threshold 4 of 5 neighbours).
        var other = s.clients["camera-1"]!
        _ = try other.maskedInput(inputs["camera-1"]!, sum: 0, partners: try s.server.partners(of: "camera-1", sum: 0))
        e = #expect(throws: PrivacyError.self) { try other.unmask(UnmaskRequest(survivors: ["camera-2", "camera-3"], dropped: ["camera-0", "camera-4", "camera-5"]), sum: 0) }
        #expect(e?.code == .refused)
        // Nor does a party join a sum whose partners are too few.
        var third = s.clients["camera-2"]!
        e = #expect(throws: PrivacyError.self) { try third.maskedInput(inputs["camera-2"]!, sum: 0, partners: ["camera-0", "camera-1"]) }
        #expect(e?.code == .refused)
    }

    @Test func misroutedEnvelopesAndForgedSharesAreCaught() throws {
        var s = try Session(parties: 5, length: 4, seed: 4)
        let names = s.setup.participants
        for n in names { try s.server.receive(advertisement: s.clients[n]!.advertisement, from: n) }
        try s.server.closeAdvertising()
        var sealed: [String: [String: [UInt8]]] = [:]
        for n in names {
            sealed[n] = try s.clients[n]!.shareKeys(s.setup, advertisements: try s.server.advertisements(for: n), using: &s.random)
            try s.server.receive(envelopes: sealed[n]!, from: n)
        }
        try s.server.closeSharing()
        // An envelope camera-1 sealed for camera-2, handed to camera-3 as if from camera-1: it does not open.
        var envelopes = try s.server.envelopes(for: "camera-3")
        envelopes["camera-1"] = sealed["camera-1"]!["camera-2"]
        var victim = s.clients["camera-3"]!
        let e = #expect(throws: PrivacyError.self) { try victim.receive(envelopes: envelopes) }
        #expect(e?.code == .malformed)

        // A party that returns a made-up share: the rebuilt seed fails its commitment.
        for n in names { try s.clients[n]!.receive(envelopes: try s.server.envelopes(for: n)) }
        try s.server.open(sum: 0, partners: Set(names), length: 4)
        for n in names {
            try s.server.receive(maskedInput: try s.clients[n]!.maskedInput([1, 2, 3, 4], sum: 0, partners: try s.server.partners(of: n, sum: 0)), sum: 0, from: n)
        }
        try s.server.closeInputs(sum: 0)
        for n in names {
            var shares = try s.clients[n]!.unmask(try s.server.unmaskRequest(for: n, sum: 0), sum: 0)
            if n == "camera-0" { shares["camera-1"]![9] ^= 1 }
            try s.server.receive(unmask: shares, sum: 0, from: n)
        }
        let failed = #expect(throws: PrivacyError.self) { try s.server.result(sum: 0) }
        #expect(failed?.code == .verificationFailed)
    }

    @Test func aPartyTakesOnlyASetupOfItsSessionThatListsIt() throws {
        // Keys come first; the parties (those that advertised) are known only at the sharing step.
        var random = SplitMix64(seed: 8)
        var party = try SecureAggregationClient(name: "camera-9", session: [1, 2], sums: 2, using: &random)
        #expect(throws: PrivacyError.self) { try party.receive(envelopes: [:]) }
        let names = (0..<4).map { "camera-\($0)" }
        for setup in [try SecureAggregationSetup(session: [1, 2], participants: names, sums: 2),
                      try SecureAggregationSetup(session: [3], participants: names + ["camera-9"], sums: 2),
                      try SecureAggregationSetup(session: [1, 2], participants: names + ["camera-9"], sums: 1)] {
            let e = #expect(throws: PrivacyError.self) { try party.shareKeys(setup, advertisements: [:], using: &random) }
            #expect(e?.code == .protocolViolation)
        }
        #expect(throws: PrivacyError.self) { try SecureAggregationClient(name: "camera-9", session: [], sums: 1, using: &random) }
    }

    @Test func theCoordinatorRefusesMessagesOutOfOrderOrFromStrangers() throws {
        var s = try Session(parties: 4, length: 2, seed: 5)
        let a = s.clients["camera-0"]!.advertisement
        #expect(throws: PrivacyError.self) { try s.server.receive(advertisement: a, from: "intruder") }
        try s.server.receive(advertisement: a, from: "camera-0")
        #expect(throws: PrivacyError.self) { try s.server.receive(advertisement: a, from: "camera-0") }
        // Replaying another party's keys.
        #expect(throws: PrivacyError.self) { try s.server.receive(advertisement: a, from: "camera-1") }
        #expect(throws: PrivacyError.self) { try s.server.receive(maskedInput: [1, 2], sum: 0, from: "camera-0") }
        // Too few advertised for a threshold of 3 among 3 neighbours.
        let e = #expect(throws: PrivacyError.self) { try s.server.closeAdvertising() }
        #expect(e?.code == .notEnoughShares)
        #expect(throws: PrivacyError.self) { try SecureAggregationSetup(session: [1], participants: ["a"]) }
        #expect(throws: PrivacyError.self) { try SecureAggregationSetup(session: [1], participants: ["a", "b", "c"], threshold: 3) }
        #expect(throws: PrivacyError.self) { try SecureAggregationSetup(session: [1], participants: ["a", "b"], sums: 0) }
    }
}
