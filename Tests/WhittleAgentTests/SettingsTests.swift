import Testing
import WhittleAgent

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
        #expect(code("data = x.npy\ncolour = blue")?.0 == .unknownSetting)
        #expect(code("data = x.npy\ncolour = blue")?.1.hasPrefix("line 2: ") == true)
        #expect(code("data = x.npy\n\njust words")?.0 == .malformedSetting)
        #expect(code("data = x.npy\n\njust words")?.1.hasPrefix("line 3: ") == true)
        #expect {
            _ = try WorkerSettings.load(file: "/nonexistent/worker.conf", environment: ["WHITTLE_WORKER_THREADS": "-3"])
        } throws: { ($0 as? AgentError)?.code == .invalidSetting && "\($0)".hasPrefix("WHITTLE_WORKER_THREADS: ") }
    }
}
