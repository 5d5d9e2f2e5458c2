import Crypto
import Foundation
import WhittleCompression
import WhittleIO
import WhittleRounds

/// The latency tables this worker measured, kept in `DIR/latency-tables/` (one JSON file per table, named by the
/// SHA-256 of its key) as well as in memory, so a restarted worker answers a later latency task over the same model,
/// anchors, batch and kind of board without timing every layer again. A file that cannot be read, or holds another
/// key, counts as absent (the table is measured again and the file rewritten); `LatencyPhase` also checks a kept
/// table against the task's grid before it uses it.
package final class LatencyTableFiles: LatencyTableKeeping, @unchecked Sendable {
    let directory: String
    let memory = LatencyTableCache()
    let log: AgentLog?

    struct Kept: Codable {
        var key: String
        var table: LatencyTable
    }

    package init(directory: String, log: AgentLog? = nil) {
        self.directory = directory
        self.log = log
    }

    func path(_ key: String) -> String {
        directory + "/" + SHA256.hash(data: Data(key.utf8)).map { String(format: "%02x", $0) }.joined() + ".json"
    }

    package func table(_ key: String) -> LatencyTable? {
        if let t = memory.table(key) { return t }
        guard let bytes = try? Files.readBytes(path(key)) else { return nil }
        guard let kept = try? JSONDecoder().decode(Kept.self, from: Data(bytes)), kept.key == key else {
            log?.warning("a kept latency table cannot be read; it is measured again", ["path": "\(path(key))"])
            return nil
        }
        memory.keep(kept.table, key)
        return kept.table
    }

    package func keep(_ table: LatencyTable, _ key: String) {
        memory.keep(table, key)
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try Files.writeDurably(Array(try JSONEncoder().encode(Kept(key: key, table: table))), to: path(key))
        } catch {
            log?.warning("the latency table could not be kept on disk: \(error)", ["path": "\(path(key))"])
        }
    }
}
