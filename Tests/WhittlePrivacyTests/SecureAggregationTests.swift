import Testing
import WhittlePrivacy

/// The secure-aggregation protocol among in-process parties: exact sums with and without dropouts, on complete and
/// sparse (SecAgg+) neighbour graphs, and the refusals that keep one party's input hidden.
@Suite struct SecureAggregationTests {
    struct Session {
        var setup: SecureAggregationSetup
        var server: SecureAggregationServer
        var clients: [String: SecureAggregationClient]
        var inputs: [String: [UInt64]]
        var random: SeededGenerator

        init(parties: Int, length: Int, degree: Int? = nil, seed: UInt64 = 0) throws {
            random = SeededGenerator(seed)
            let names = (0..<parties).map { "camera-\($0)" }
            setup = try SecureAggregationSetup(session: Array("round-1/phase-3".utf8), participants: names, degree: degree, length: length)
            server = SecureAggregationServer(setup: setup)
            clients = [:]
            inputs = [:]
            for n in names {
                clients[n] = try SecureAggregationClient(name: n, setup: setup, using: &random)
                inputs[n] = (0..<length).map { _ in random.next() }
            }
        }

        /// Runs the protocol; `silentAfterSharing` never send an input, `silentAfterInput` never answer the unmask
        /// step. Returns the sum and the masked inputs as sent.
        mutating func run(silentAfterSharing: Set<String> = [], silentAfterInput: Set<String> = []) throws -> (sum: [UInt64], masked: [String: [UInt64]]) {
            let names = setup.participants
            for n in names { try server.receive(advertisement: clients[n]!.advertisement, from: n) }
            try server.closeAdvertising()
            for n in names { try server.receive(envelopes: try clients[n]!.shareKeys(try server.advertisements(for: n), using: &random), from: n) }
            try server.closeSharing()
            var masked: [String: [UInt64]] = [:]
            for n in names where !silentAfterSharing.contains(n) {
                masked[n] = try clients[n]!.maskedInput(inputs[n]!, envelopes: try server.envelopes(for: n))
                try server.receive(maskedInput: masked[n]!, from: n)
            }
            try server.closeInputs()
            for n in names where !silentAfterSharing.contains(n) && !silentAfterInput.contains(n) {
                try server.receive(unmask: try clients[n]!.unmask(try server.unmaskRequest(for: n)), from: n)
            }
            return (try server.result(), masked)
        }

        func expected(without: Set<String> = []) -> [UInt64] {
            var sum = [UInt64](repeating: 0, count: setup.length)
            for (n, v) in inputs where !without.contains(n) { for i in sum.indices { sum[i] &+= v[i] } }
            return sum
        }
    }

    @Test func eightPartiesSumExactlyAndEachMaskedInputLooksRandom() throws {
        var s = try Session(parties: 8, length: 1000)
        #expect(s.setup.degree == 7 && s.setup.threshold == 5)
        let (sum, masked) = try s.run()
        #expect(sum == s.expected())
        // A masked input shares no word with its input, and its low bits are balanced (a uniform mask).
        for (n, m) in masked {
            #expect(zip(m, s.inputs[n]!).allSatisfy { $0 != $1 })
            let ones = m.reduce(0) { $0 + Int($1 & 1) }
            #expect(ones > 400 && ones < 600)
        }
    }

    @Test func theSumSurvivesOneDropoutBeforeItsInputAndOneAfter() throws {
        // The case: 8 workers, one gone after sharing (its pairwise masks are rebuilt from its mask key),
        // one gone after sending its input (its self-mask is rebuilt from the others' shares).
        var s = try Session(parties: 8, length: 257, seed: 1)
        let (sum, _) = try s.run(silentAfterSharing: ["camera-2"], silentAfterInput: ["camera-5"])
        #expect(sum == s.expected(without: ["camera-2"]))
        #expect(s.server.contributed.count == 7 && s.server.unmasked.count == 6)
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
        let dropped: Set<String> = ["camera-3", "camera-17"]
        let (sum, _) = try s.run(silentAfterSharing: dropped, silentAfterInput: ["camera-30", "camera-31"])
        #expect(sum == s.expected(without: dropped))
    }

    @Test func aPartyRefusesToRevealBothSecretsOfOneNeighbour() throws {
        var s = try Session(parties: 6, length: 8, seed: 3)
        let names = s.setup.participants
        for n in names { try s.server.receive(advertisement: s.clients[n]!.advertisement, from: n) }
        try s.server.closeAdvertising()
        for n in names { try s.server.receive(envelopes: try s.clients[n]!.shareKeys(try s.server.advertisements(for: n), using: &s.random), from: n) }
        try s.server.closeSharing()
        var client = s.clients["camera-0"]!
        _ = try client.maskedInput(s.inputs["camera-0"]!, envelopes: try s.server.envelopes(for: "camera-0"))
        let peers = ["camera-1", "camera-2", "camera-3", "camera-4", "camera-5"]
        // One request naming a neighbour both ways.
        var e = #expect(throws: PrivacyError.self) { try client.unmask(UnmaskRequest(survivors: peers, dropped: ["camera-1"])) }
        #expect(e?.code == .refused)
        // The self-mask share first, then the mask key share of the same neighbour.
        let first = try client.unmask(UnmaskRequest(survivors: peers, dropped: []))
        #expect(Set(first.keys) == Set(peers))
        e = #expect(throws: PrivacyError.self) { try client.unmask(UnmaskRequest(survivors: Array(peers.dropFirst()), dropped: ["camera-1"])) }
        #expect(e?.code == .refused)
        // Too few survivors to hide one input among them (threshold 4 of 5 neighbours).
        var other = s.clients["camera-1"]!
        _ = try other.maskedInput(s.inputs["camera-1"]!, envelopes: try s.server.envelopes(for: "camera-1"))
        e = #expect(throws: PrivacyError.self) { try other.unmask(UnmaskRequest(survivors: ["camera-2", "camera-3"], dropped: ["camera-0", "camera-4", "camera-5"])) }
        #expect(e?.code == .refused)
        // Before its own input a party reveals nothing.
        var third = s.clients["camera-2"]!
        #expect(throws: PrivacyError.self) { try third.unmask(UnmaskRequest(survivors: peers, dropped: [])) }
    }

    @Test func misroutedEnvelopesAndForgedSharesAreCaught() throws {
        var s = try Session(parties: 5, length: 4, seed: 4)
        let names = s.setup.participants
        for n in names { try s.server.receive(advertisement: s.clients[n]!.advertisement, from: n) }
        try s.server.closeAdvertising()
        var sealed: [String: [String: [UInt8]]] = [:]
        for n in names {
            sealed[n] = try s.clients[n]!.shareKeys(try s.server.advertisements(for: n), using: &s.random)
            try s.server.receive(envelopes: sealed[n]!, from: n)
        }
        try s.server.closeSharing()
        // An envelope camera-1 sealed for camera-2, handed to camera-3 as if from camera-1: it does not open.
        var envelopes = try s.server.envelopes(for: "camera-3")
        envelopes["camera-1"] = sealed["camera-1"]!["camera-2"]
        var victim = s.clients["camera-3"]!
        let e = #expect(throws: PrivacyError.self) { try victim.maskedInput(s.inputs["camera-3"]!, envelopes: envelopes) }
        #expect(e?.code == .malformed)

        // A party that returns a made-up share: the rebuilt seed fails its commitment.
        for n in names { try s.server.receive(maskedInput: try s.clients[n]!.maskedInput(s.inputs[n]!, envelopes: try s.server.envelopes(for: n)), from: n) }
        try s.server.closeInputs()
        for n in names {
            var shares = try s.clients[n]!.unmask(try s.server.unmaskRequest(for: n))
            if n == "camera-0" { shares["camera-1"]![9] ^= 1 }
            try s.server.receive(unmask: shares, from: n)
        }
        let failed = #expect(throws: PrivacyError.self) { try s.server.result() }
        #expect(failed?.code == .verificationFailed)
    }

    @Test func theCoordinatorRefusesMessagesOutOfOrderOrFromStrangers() throws {
        var s = try Session(parties: 4, length: 2, seed: 5)
        let a = s.clients["camera-0"]!.advertisement
        #expect(throws: PrivacyError.self) { try s.server.receive(advertisement: a, from: "intruder") }
        try s.server.receive(advertisement: a, from: "camera-0")
        #expect(throws: PrivacyError.self) { try s.server.receive(advertisement: a, from: "camera-0") }
        // Replaying another party's keys.
        #expect(throws: PrivacyError.self) { try s.server.receive(advertisement: a, from: "camera-1") }
        #expect(throws: PrivacyError.self) { try s.server.receive(maskedInput: [1, 2], from: "camera-0") }
        // Too few advertised for a threshold of 3 among 3 neighbours.
        let e = #expect(throws: PrivacyError.self) { try s.server.closeAdvertising() }
        #expect(e?.code == .notEnoughShares)
        #expect(throws: PrivacyError.self) { try SecureAggregationSetup(session: [1], participants: ["a"], length: 1) }
        #expect(throws: PrivacyError.self) { try SecureAggregationSetup(session: [1], participants: ["a", "b", "c"], threshold: 3, length: 1) }
    }
}
