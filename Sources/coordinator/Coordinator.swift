import ArgumentParser
import WhittleCLI
import CoordinatorCommands

/// The coordinator: runs on a server, holds the fleet's state and drives federated compression rounds.
@main
struct Coordinator: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "coordinator",
        abstract: "Whittle coordinator: federated compression of neural networks for fleets of edge boards.",
        version: WhittleVersion.string,
        subcommands: [InitCommand.self, ServeCommand.self, MigrateCommand.self, TokenCommand.self, WorkersCommand.self, RoundCommand.self, DashboardCommand.self, GCCommand.self, ServerCertificateCommand.self, CACommand.self, ModelCommand.self])

    static func main() async {
        do {
            var command = try parseAsRoot()
            // Training-speed allocator tuning keeps up to 1 GiB of freed buffers: right for the model commands,
            // wrong for a long-running server whose memory must follow its load.
            if !(command is ServeCommand) { ProcessSetup.tuneAllocator() }
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            exit(withError: error)
        }
    }
}
