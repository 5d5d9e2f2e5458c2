import Foundation
import Logging
import NIOCore
import Testing
import WhittleProtocol
import WhittleRounds
import WhittleServer
import WhittleStore
import WhittleTestSupport

/// Two round services on one PostgreSQL database, each with its own data directory, as two `coordinator serve`
/// replicas are: reports accepted by either count once, the lease holder closes phases with every acknowledged
/// report, another replica takes the rounds over when the holder's lease runs out, and announcements wake the other
/// replica's held heartbeats.
@Suite(.serialized) struct ReplicaTests {
    static let quiet: Logger = {
        var l = Logger(label: "replica-tests")
        l.logLevel = .critical
        return l
    }()

    struct Replicas {
        let url: DatabaseURL
        let clock = ScriptedClock(Date())
        let stores: [PostgresStore]
        let services: [RoundService]
        static let leaseSeconds = 10.0

        init() async throws {
            let (cluster, name) = try TestPostgres.makeDatabase()
            url = try DatabaseURL("postgresql://whittle@127.0.0.1:\(cluster.port)/\(name)?sslmode=disable")
            _ = try await PostgresStore.migrate(url, logger: ReplicaTests.quiet)
            var stores: [PostgresStore] = [], services: [RoundService] = []
            for holder in ["replica-a", "replica-b"] {
                let store = try await PostgresStore.connect(url, logger: ReplicaTests.quiet)
                let directory = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-replica-\(UUID().uuidString)")
                try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
                stores.append(store)
                services.append(try RoundService(store: store, directory: directory, artifacts: directory.appendingPathComponent("artifacts"),
                                                 pollSeconds: 1, logger: ReplicaTests.quiet, now: clock.read, blobs: store,
                                                 sharedArtifacts: store,
                                                 replication: .init(holder: holder, leaseSeconds: Self.leaseSeconds)))
            }
            self.stores = stores
            self.services = services
        }

        var store: PostgresStore { stores[0] }

        func enroll(_ names: [String]) async throws {
            let now = clock.now
            try await store.addToken(TokenRecord(hash: "t", createdAt: now, expiresAt: now.addingTimeInterval(3600), uses: 100))
            for (k, name) in names.enumerated() {
                _ = try await store.enroll(tokenHash: "t", worker: WorkerRecord(
                    name: name, certificateSerial: "s\(k)", certificateExpiresAt: now.addingTimeInterval(86400), enrolledAt: now), now: now)
                try await touch(name)
            }
        }

        func touch(_ name: String) async throws {
            let capabilities = CapabilitiesView(cores: 1, memoryBytes: 1 << 30, samples: 50, labels: true, version: "t",
                                                memoryLimitBytes: 0, evaluationSamples: nil)
            try await store.recordContact(name: name, at: clock.now, address: "127.0.0.1",
                                          capabilities: String(decoding: try JSONEncoder().encode(capabilities), as: UTF8.self))
        }

        func worker(_ name: String) async throws -> WorkerRecord { try #require(try await store.worker(named: name)) }

        func close() { for s in stores { s.close() } }
    }

    /// A float round without pruning, started on `service`: export at the start, then evaluate and distribute.
    static func start(_ service: RoundService) async throws -> RoundRecord {
        var plan = RoundPlan()
        plan.quantize = .none
        plan.minWorkers = 2
        plan.phaseDeadlineSeconds = 600
        plan.modelSHA256 = try await service.storeArtifact(RoundServiceTests.modelBytes)
        return try await service.start(plan)
    }

    @Test(.timeLimit(.minutes(1))) func reportsAcceptedByEitherReplicaCountOnceAndTheLeaseHolderClosesThePhase() async throws {
        let r = try await Replicas()
        defer { r.close() }
        let (a, b) = (r.services[0], r.services[1])
        try await r.enroll(["w1", "w2", "w3"])
        await a.tick()
        await b.tick()
        let (aOwns, bOwns) = (await a.owns, await b.owns)
        #expect(aOwns && !bOwns, "the first replica to tick holds the lease")
        #expect(try await r.store.lease(RoundService.Replication.leaseName)?.holder == "replica-a")

        // Announcements reach the other replica over LISTEN/NOTIFY.
        // Each announcement b hears is passed on to b, then counted, so the test waits for events, not for time.
        let changes = try #require(r.stores[1].roundsChanged())
        let (heard, hearing) = AsyncStream.makeStream(of: Void.self)
        let listener = Task {
            for await _ in changes {
                await b.roundsChangedElsewhere()
                hearing.yield()
            }
        }
        defer { listener.cancel() }
        var announcements = heard.makeAsyncIterator()
        // The listening connection yields once when it connects (announcements may have been missed before).
        _ = await announcements.next()

        // The round starts on the replica that does not hold the lease; its model reaches the other one through
        // the shared store.
        let round = try await Self.start(b)
        #expect(round.phase == 1)
        _ = await announcements.next()  // the start's own announcement
        await a.tick()  // within 500 ms in serve; its announcement may not have arrived yet
        let task1 = try #require(try await a.task(forWorkerNamed: "w1"), "a hands out tasks of a round started on b")
        let task2 = try #require(try await b.task(forWorkerNamed: "w2"))
        #expect(task1 == task2)
        let model = task1.modelSha256
        #expect(try await r.store.blob("artifacts/\(model)") != nil, "the exported model is in the shared store")

        // w1's report reaches b, w2's reaches a: each replica folds what it accepted.
        let (report1, bytes1) = RoundServiceTests.evaluation(task1, correct: 30, upload: "upload-1")
        let (report2, bytes2) = RoundServiceTests.evaluation(task2, correct: 34, upload: "upload-2")
        #expect(try await b.accept(report1, bytes: bytes1, worker: try await r.worker("w1")) == false)
        #expect(try await a.accept(report2, bytes: bytes2, worker: try await r.worker("w2")) == false)
        // A retry of w1's upload through the other replica is a duplicate, not a second count.
        #expect(try await a.accept(report1, bytes: bytes1, worker: try await r.worker("w1")) == true)
        #expect(try await r.store.reports(round: round.id, phase: 1).count == 2)
        #expect(try await b.view(try #require(try await r.store.round(id: round.id))).phases[1].reports == 2)

        // b does not close the phase, whatever its clock says: it does not hold the lease.
        r.clock.advance(3.2)
        for name in ["w1", "w2", "w3"] { try await r.touch(name) }
        await b.tick()
        #expect(try await r.store.round(id: round.id)?.phase == 1)
        // Earlier announcements were all heard; from here only
        // a's announcement can move it (b does not tick again).
        let generation = b.workGeneration
        await a.tick()
        let closed = try #require(try await r.store.round(id: round.id))
        #expect(closed.phase == 2, "the holder closed the evaluation with both reports")
        let progress = try RoundService.progress(closed)
        #expect(progress.phases[1].reports == 2)
        #expect(progress.after?.accuracy == Double(30 + 34) / 80, "w1's report, accepted by b, is counted by a, once")
        // b's held heartbeats were woken by a's announcement.
        _ = await announcements.next()
        #expect(b.workGeneration > generation, "the phase a opened woke b's held heartbeats")
        // A report for the closed phase is refused on either replica.
        let (late, lateBytes) = RoundServiceTests.evaluation(task1, correct: 1, upload: "upload-late")
        #expect(await RoundServiceTests.code { _ = try await b.accept(late, bytes: lateBytes, worker: try await r.worker("w3")) } == "stale_report")
    }

    @Test func anotherReplicaTakesTheRoundsOverWhenTheHoldersLeaseRunsOut() async throws {
        let r = try await Replicas()
        defer { r.close() }
        let (a, b) = (r.services[0], r.services[1])
        try await r.enroll(["w1", "w2"])
        await a.tick()
        await b.tick()
        let round = try await Self.start(a)
        let task1 = try #require(try await a.task(forWorkerNamed: "w1"))
        let task2 = try #require(try await a.task(forWorkerNamed: "w2"))
        let (report1, bytes1) = RoundServiceTests.evaluation(task1, correct: 31, upload: "upload-1")
        #expect(try await a.accept(report1, bytes: bytes1, worker: try await r.worker("w1")) == false)

        // a dies (it ticks no more). Until its lease runs out, b waits.
        r.clock.advance(Replicas.leaseSeconds / 2)
        for name in ["w1", "w2"] { try await r.touch(name) }
        await b.tick()
        let waiting = await b.owns
        #expect(!waiting)
        let (report2, bytes2) = RoundServiceTests.evaluation(task2, correct: 35, upload: "upload-2")
        #expect(try await b.accept(report2, bytes: bytes2, worker: try await r.worker("w2")) == false)
        r.clock.advance(Replicas.leaseSeconds)
        for name in ["w1", "w2"] { try await r.touch(name) }
        await b.tick()
        #expect(await b.owns)
        #expect(try await r.store.lease(RoundService.Replication.leaseName)?.holder == "replica-b")
        let closed = try #require(try await r.store.round(id: round.id))
        #expect(closed.phase == 2, "b closed the phase a had opened")
        #expect(try RoundService.progress(closed).after?.accuracy == Double(31 + 35) / 80,
                "the report only a acknowledged is read from the shared store")

        // a comes back: it finds the lease taken and decides nothing.
        await a.tick()
        let back = await a.owns
        #expect(!back)
        // A replica shutting down gives its lease up at once.
        await b.resign()
        await a.tick()
        #expect(await a.owns)
    }

    @Test func blobsAreStoredInChunksReplacedListedAndDeleted() async throws {
        let r = try await Replicas()
        defer { r.close() }
        let store = r.store
        let size = 2 * PostgresStore.blobChunkBytes + 12_345
        let bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        try await store.putBlob("reports/r1/1-w.pb", ByteBuffer(bytes: bytes))
        #expect(try await store.blob("reports/r1/1-w.pb").map { Array($0.readableBytesView) } == bytes)
        try await store.putBlob("reports/r1/1-w.pb", ByteBuffer(bytes: [1, 2, 3]))
        #expect(try await store.blob("reports/r1/1-w.pb").map { Array($0.readableBytesView) } == [1, 2, 3], "a second put replaces")
        try await store.putBlob("reports/r1/2-w.pb", ByteBuffer())
        #expect(try await store.blob("reports/r1/2-w.pb")?.readableBytes == 0, "an empty blob is a blob")
        try await store.putBlob("reports/r2/1-w.pb", ByteBuffer(bytes: [9]))
        #expect(try await store.blobs(prefix: "reports/r1/").map(\.key) == ["reports/r1/1-w.pb", "reports/r1/2-w.pb"])
        #expect(try await store.blobs(prefix: "reports/r1/").map(\.bytes) == [3, 0])
        try await store.deleteBlob("reports/r1/1-w.pb")
        try await store.deleteBlob("reports/r1/1-w.pb")
        #expect(try await store.blob("reports/r1/1-w.pb") == nil)
        #expect(try await store.blobs(prefix: "reports/").map(\.key) == ["reports/r1/2-w.pb", "reports/r2/1-w.pb"])
    }

    /// The data directory's blobs (a coordinator alone): files at their keys, replaced whole, listed by folder;
    /// a key that would leave the directory is refused.
    @Test func directoryBlobsAreFilesOfTheDataDirectory() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-blobs-\(UUID().uuidString)")
        let blobs = try DirectoryBlobs(directory: directory)
        try await blobs.putBlob("reports/r1/1-w.pb", ByteBuffer(bytes: [1, 2, 3, 4]))
        #expect(FileManager.default.fileExists(atPath: directory.appendingPathComponent("reports/r1/1-w.pb").path))
        try await blobs.putBlob("reports/r1/1-w.pb", ByteBuffer(bytes: [5]))
        try await blobs.putBlob("reports/r1/2-w.pb", ByteBuffer(bytes: [6, 7]))
        #expect(try await blobs.blob("reports/r1/1-w.pb").map { Array($0.readableBytesView) } == [5])
        #expect(try await blobs.blobs(prefix: "reports/r1/").map(\.key) == ["reports/r1/1-w.pb", "reports/r1/2-w.pb"])
        #expect(try await blobs.blobs(prefix: "reports/r1/2").map(\.bytes) == [2])
        #expect(try await blobs.blobs(prefix: "reports/none/").isEmpty)
        try await blobs.deleteBlob("reports/r1/1-w.pb")
        #expect(try await blobs.blob("reports/r1/1-w.pb") == nil)
        for key in ["../escape", "reports/../../x", "/abs", "reports//x", ""] {
            await #expect(throws: RoundError.self, "\(key)") { try await blobs.putBlob(key, ByteBuffer(bytes: [1])) }
        }
    }

    @Test func theArtifactsARoundNamesAreFoundInItsJSON() {
        let a = String(repeating: "a1", count: 32), b = String(repeating: "0f", count: 32)
        let text = "{\"model\":\"\(a)\",\"x\":[\"\(b)\",\"\(b)0\",\"\(a.uppercased())\"],\"y\":\"\(b.prefix(63))\"}"
        #expect(RoundService.artifactNames(text) == [a, b], "64 lowercase hex digits standing alone, nothing longer or shorter")
    }
}
