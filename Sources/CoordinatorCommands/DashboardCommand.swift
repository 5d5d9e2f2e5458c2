import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Logging
import WhittleCLI
import WhittleIO
import WhittleHTTPClient
import WhittlePKI
import WhittleServer
import WhittleStore

/// `coordinator dashboard`: a one-time login link for a browser.
public struct DashboardCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "dashboard",
        abstract: "Print a one-time login link to the web dashboard (valid 10 minutes; the session lasts 12 hours).",
        discussion: """
            The dashboard shows the workers, the rounds with their phases, and per round the accuracy-versus-size \
            picture and the per-site before/after table. Browsers holding the admin certificate need no link.
            """)

    @Option(name: .long, help: "The coordinator's data directory (for its admin certificate).") var dir: String
    @Option(name: .long, help: "The server's URL (default: from the data directory).") var server: String?
    @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

    public init() {}

    public func run() throws {
        let client = try adminClient(dir, server: server)
        let response = try adminRequest(client, "POST", "/admin/v1/dashboard/links", body: Array("{}".utf8))
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        guard let link = try? decoder.decode(DashboardLink.self, from: Data(response.body)) else {
            throw CLIError("the coordinator's answer is not a dashboard link")
        }
        let url = client.baseURL.trimmingCharacters(in: CharacterSet(charactersIn: "/")) + link.path
        if json {
            let encoder = JSONEncoder()
            encoder.dateEncodingStrategy = .iso8601
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            print(String(decoding: try encoder.encode(["url": url, "expiresAt": ISO8601DateFormatter().string(from: link.expiresAt)]), as: UTF8.self))
        } else {
            print(url)
            print("one-time link, valid until \(ISO8601DateFormatter().string(from: link.expiresAt)); open it in a browser that trusts the coordinator's CA (\(dir)/ca.pem)")
        }
    }
}
