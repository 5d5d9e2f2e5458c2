import ArgumentParser
import WhittleCLI

/// The worker: runs on an edge board next to its private data. It links oneDNN and libcurl, never NIO or
/// Hummingbird. Until the agent exists, it offers the local model tools a board needs.
struct Worker: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker",
        abstract: "Whittle worker: computes compression statistics on an edge board's local data.",
        version: WhittleVersion.string,
        subcommands: [ModelCommand.self])
}

ProcessSetup.tuneAllocator()
Worker.main()
