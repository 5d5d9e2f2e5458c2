import Testing
import WhittleProtocol

@Suite struct IdentifiersTests {
    @Test func roundIDsAreNamesThatCannotLeaveAFolder() {
        for good in ["r20261206T030000Z-1a2b3c4d", "a", "0_x-y", String(repeating: "z", count: Identifiers.maximumRoundIDLength)] {
            #expect(Identifiers.isRoundID(good), "\(good)")
        }
        for bad in ["", "-r1", "_r1", "../etc", "r1/..", "r.1", "r 1", "r1\u{0}", "rö", "r\\1",
                    String(repeating: "z", count: Identifiers.maximumRoundIDLength + 1)] {
            #expect(!Identifiers.isRoundID(bad), "\(bad.debugDescription)")
        }
    }

    @Test func artifactNamesAreLowercaseSHA256Digits() {
        let digest = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  // SHA-256 of no bytes
        #expect(Identifiers.isSHA256(digest))
        #expect(!Identifiers.isSHA256(digest.uppercased()))
        #expect(!Identifiers.isSHA256(String(digest.dropLast())))
        #expect(!Identifiers.isSHA256(digest + "0"))
        #expect(!Identifiers.isSHA256(String(digest.dropLast()) + "g"))
        #expect(!Identifiers.isSHA256("../" + String(digest.dropFirst(3))))
    }

    @Test func aTaskIsTakenOnlyWhenEveryIdentifierIsWellFormed() {
        let digest = String(repeating: "ab", count: 32)
        var task = Whittle_Task()
        task.roundID = "r1"
        task.modelSha256 = digest
        #expect(Identifiers.problem(in: task) == nil)  // teacher and EWC state are optional

        var badRound = task
        badRound.roundID = "../../x"
        #expect(Identifiers.problem(in: badRound)?.contains("round id") == true)

        var noModel = task
        noModel.modelSha256 = ""
        #expect(Identifiers.problem(in: noModel)?.contains("model") == true)

        var badTeacher = task
        badTeacher.teacherSha256 = "not-a-digest"
        #expect(Identifiers.problem(in: badTeacher)?.contains("teacher") == true)

        var badState = task
        badState.ewcSha256 = digest.uppercased()
        #expect(Identifiers.problem(in: badState)?.contains("EWC state") == true)
    }
}
