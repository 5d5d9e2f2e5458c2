import ArgumentParser
import WhittleCLI

/// The coordinator: runs on a server, holds the fleet's state and drives federated compression rounds.
/// Until the server exists, it offers the local model tools.
struct Coordinator: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "coordinator",
        abstract: "Whittle coordinator: federated compression of neural networks for fleets of edge boards.",
        version: WhittleVersion.string,
        subcommands: [ModelCommand.self])
}

ProcessSetup.tuneAllocator()
Coordinator.main()
