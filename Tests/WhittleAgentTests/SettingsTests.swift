import Foundation
import Testing
import WhittleAgent
import WhittleCompression

/// `worker.conf`, then `WHITTLE_WORKER_…` variables: values checked, errors coded and naming their source.
@Suite struct WorkerSettingsTests {
    @Test func theEnvironmentOverridesTheFile() throws {
        var settings = try WorkerSettings.parse("# board 7\ndata = /data/x.npy\nthreads = 2\n\nmemory_limit = 512MB\n")
        #expect(settings.data == "/data/x.npy" && settings.threads == 2 && settings.memoryLimit == "512MB")
        try settings.set("threads", "1")
        #expect(settings.threads == 1)
        #expect(WorkerSettings.environmentName("eval_labels") == "WHITTLE_WORKER_EVAL_LABELS")
        // The template documents every key, commented out, so it parses to nothing set.
        #expect(try WorkerSettings.parse(WorkerSettings.template) == WorkerSettings())
    }

    @Test func badSettingsAreRefusedWithACodeAndTheirSource() throws {
        func code(_ text: String) -> (AgentError.Code, String)? {
            do { _ = try WorkerSettings.parse(text) } catch let error as AgentError { return (error.code, error.message) } catch { return nil }
            return nil
        }
        #expect(code("threads = 0")?.0 == .invalidSetting)
        #expect(code("threads = two")?.0 == .invalidSetting)
        #expect(code("memory_limit = lots")?.0 == .invalidSetting)
        #expect(code("log_format = xml")?.0 == .invalidSetting)
        #expect(code("log_level = loud")?.0 == .invalidSetting)
        #expect(code("no_timing = sometimes")?.0 == .invalidSetting)
        #expect(try WorkerSettings.parse("no_timing = true").noTiming && !WorkerSettings().noTiming)
        #expect(code("data = x.npy\ncolour = blue")?.0 == .unknownSetting)
        #expect(code("data = x.npy\ncolour = blue")?.1.hasPrefix("line 2: ") == true)
        #expect(code("data = x.npy\n\njust words")?.0 == .malformedSetting)
        #expect(code("data = x.npy\n\njust words")?.1.hasPrefix("line 3: ") == true)
        #expect {
            _ = try WorkerSettings.load(file: "/nonexistent/worker.conf", environment: ["WHITTLE_WORKER_THREADS": "-3"])
        } throws: { ($0 as? AgentError)?.code == .invalidSetting && "\($0)".hasPrefix("WHITTLE_WORKER_THREADS: ") }
    }
}

/// The latency tables a worker measured, kept on disk across restarts.
@Suite struct LatencyTableFilesTests {
    @Test func aKeptTableOutlivesTheProcessAndADamagedOneIsAbsent() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-tables-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let table = LatencyTable(machine: "avx2", threads: 2, batch: 8, layers: [
            LayerLatency(node: "/conv/Conv", opType: "Conv", outputs: [4, 8], inputs: [3], milliseconds: [[0.5], [0.9]]),
        ], anchors: [LatencyTable.Anchor(fraction: 0.25, milliseconds: 1), LatencyTable.Anchor(fraction: 1, milliseconds: 2)])
        LatencyTableFiles(directory: directory).keep(table, "model|8|avx2|2|a")
        // A new process (a new instance) reads it back from disk, under its key only.
        let restarted = LatencyTableFiles(directory: directory)
        #expect(restarted.table("model|8|avx2|2|a") == table)
        #expect(restarted.table("model|8|avx2|2|b") == nil)
        // A damaged file counts as absent.
        let files = try FileManager.default.contentsOfDirectory(atPath: directory)
        #expect(files.count == 1)
        try Data("{not json".utf8).write(to: URL(fileURLWithPath: directory + "/" + files[0]))
        #expect(LatencyTableFiles(directory: directory).table("model|8|avx2|2|a") == nil)
    }
}
