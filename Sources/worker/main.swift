import ArgumentParser
import WorkerCommands
import WhittleCLI

/// The worker: runs on an edge board next to its private data. It links oneDNN and libcurl, never NIO or
/// Hummingbird: it only makes outbound HTTPS connections.
struct Worker: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker",
        abstract: "Whittle worker: computes compression statistics on an edge board's local data.",
        version: WhittleVersion.string,
        subcommands: [EnrollCommand.self, RunCommand.self, StatusCommand.self, FetchCommand.self, ModelCommand.self])
}

ProcessSetup.tuneAllocator()
Worker.main()
