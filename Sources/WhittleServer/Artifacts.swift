import Crypto
import Foundation
import NIOCore
import WhittleIO
import WhittleONNX
import WhittlePKI
import WhittleProtocol
import WhittleRounds
import WhittleStore

/// The coordinator's content-addressed artifacts (models, task files, optimizer state), one file per SHA-256 in
/// one directory, written durably; with the last few models decoded kept in memory, since every phase of a round
/// reads the model the previous one wrote.
final class ArtifactStore: RoundArtifacts {
    let directory: URL
    /// Decoded models kept, most recent last.
    static let cachedModels = 6
    private var models: [String: Model] = [:]
    private var order: [String] = []
    /// Replicas: the directory is this replica's copy of a shared store, and these artifacts, stored here, are
    /// not there yet (`RoundService.publishArtifacts`).
    let shared: Bool
    private(set) var unpublished: [String] = []

    init(directory: URL, shared: Bool = false) throws {
        self.directory = directory
        self.shared = shared
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    func has(_ sha: String) -> Bool { FileManager.default.fileExists(atPath: path(sha)) }

    /// The artifact is in the shared store now.
    func published(_ sha: String) { unpublished.removeAll { $0 == sha } }

    /// Keeps a copy of an artifact read from the shared store, refused unless its bytes hash to its name.
    func storeFetched(_ bytes: ByteBuffer, sha: String) throws {
        let digest = bytes.withUnsafeReadableBytes { PKI.hex(SHA256.hash(data: $0)) }
        guard digest == sha else { throw RoundError(.unknownArtifact, "the shared copy of artifact \(sha.prefix(12))… hashes to \(digest.prefix(12))…") }
        try bytes.withUnsafeReadableBytes { try Files.writeDurably($0, to: path(sha), mode: 0o644) }
    }

    func path(_ sha: String) -> String { directory.appendingPathComponent(sha).path }

    /// Stores bytes (durably) and returns their SHA-256. Storing bytes already there refreshes their time, so
    /// garbage collection spares them for its grace period.
    func store(_ bytes: [UInt8]) throws -> String {
        let sha = PKI.hex(SHA256.hash(data: bytes))
        if FileManager.default.fileExists(atPath: path(sha)) {
            utimes(path(sha), nil)
        } else {
            try Files.writeDurably(bytes, to: path(sha), mode: 0o644)
            if shared, !unpublished.contains(sha) { unpublished.append(sha) }
        }
        return sha
    }

    func store(_ model: Model) throws -> String {
        let sha = try store(try ModelCoding.write(model))
        remember(sha, model)
        return sha
    }

    /// The artifact's size, 0 when there is none.
    func size(_ sha: String) -> Int {
        ((try? FileManager.default.attributesOfItem(atPath: path(sha)))?[.size] as? NSNumber)?.intValue ?? 0
    }

    func bytes(_ sha: String) throws -> [UInt8] {
        guard FileManager.default.fileExists(atPath: path(sha)) else { throw RoundError(.unknownArtifact, "no artifact \(sha)") }
        return try Files.readBytes(path(sha))
    }

    func model(_ sha: String) throws -> Model {
        if let m = models[sha] { return m }
        let m: Model
        do {
            m = try ModelCoding.read(try bytes(sha))
        } catch let error as ONNXError {
            throw RoundError(.badModel, "artifact \(sha.prefix(12))… is not a usable ONNX model: \(error.message)")
        }
        remember(sha, m)
        return m
    }

    private func remember(_ sha: String, _ model: Model) {
        if models[sha] == nil { order.append(sha) }
        models[sha] = model
        while order.count > Self.cachedModels { models[order.removeFirst()] = nil }
    }

    /// Removes the artifacts not in `keep` older than `grace` seconds at `now`: how many, and their bytes.
    func remove(except keep: Set<String>, olderThan grace: TimeInterval, now: Date) throws -> (count: Int, bytes: Int, names: Set<String>) {
        var out = (count: 0, bytes: 0, names: Set<String>())
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        where Identifiers.isSHA256(name) && !keep.contains(name) {
            guard let attributes = try? FileManager.default.attributesOfItem(atPath: path(name)),
                  let modified = attributes[.modificationDate] as? Date, now.timeIntervalSince(modified) >= grace else { continue }
            try FileManager.default.removeItem(atPath: path(name))
            if models.removeValue(forKey: name) != nil { order.removeAll { $0 == name } }
            out.count += 1
            out.bytes += (attributes[.size] as? NSNumber)?.intValue ?? 0
            out.names.insert(name)
        }
        return out
    }
}

/// Blobs as files under a directory (the data directory, when the coordinator runs alone), written durably; a
/// key is a relative path of plain names.
package final class DirectoryBlobs: BlobStore, @unchecked Sendable {
    let directory: URL

    package init(directory: URL) throws {
        self.directory = directory
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    func path(_ key: String) throws -> URL {
        let parts = key.split(separator: "/", omittingEmptySubsequences: false)
        guard !parts.isEmpty, parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }) else {
            throw RoundError(.badReport, "'\(key)' is not a blob key")
        }
        return directory.appendingPathComponent(key)
    }

    package func putBlob(_ key: String, _ bytes: ByteBuffer) async throws {
        let url = try path(key)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try bytes.withUnsafeReadableBytes { try Files.writeDurably($0, to: url.path) }
    }

    package func blob(_ key: String) async throws -> ByteBuffer? {
        let url = try path(key)
        guard FileManager.default.fileExists(atPath: url.path) else { return nil }
        return ByteBuffer(bytes: try Files.readBytes(url.path))
    }

    package func blobs(prefix: String) async throws -> [BlobInfo] {
        // Keys are paths: the folder holding the prefix's last part is listed.
        let slash = prefix.lastIndex(of: "/")
        let folder = slash.map { String(prefix[..<$0]) } ?? ""
        let base = folder.isEmpty ? directory : directory.appendingPathComponent(folder)
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: base.path) else { return [] }
        var out: [BlobInfo] = []
        for name in names.sorted() {
            let key = folder.isEmpty ? name : "\(folder)/\(name)"
            guard key.hasPrefix(prefix), !name.contains(".tmp-"),
                  let attributes = try? FileManager.default.attributesOfItem(atPath: base.appendingPathComponent(name).path),
                  attributes[.type] as? FileAttributeType == .typeRegular else { continue }
            out.append(BlobInfo(key: key, bytes: (attributes[.size] as? NSNumber)?.intValue ?? 0,
                                storedAt: attributes[.modificationDate] as? Date ?? .distantPast))
        }
        return out
    }

    package func deleteBlob(_ key: String) async throws {
        try? FileManager.default.removeItem(at: try path(key))
    }
}

/// Long polling: idle heartbeats are held until there may be work for them. A generation number moves whenever a
/// worker phase opens or a round ends; a heartbeat that looked for work at generation g is held while the
/// generation is still g, and returns when it moves, when its hold times out, when its task is cancelled, or at
/// shutdown. The timeout comes from the injected `timer` (tests hold without one).
package final class LongPoll: @unchecked Sendable {
    /// Why a held heartbeat returned.
    package enum Return: Sendable, Equatable {
        /// The generation had already moved, the hold was 0, or the server is shutting down: not held at all.
        case notHeld
        /// The generation moved (or shutdown began) while it was held.
        case woken
        /// Its hold ran out.
        case timedOut
    }

    private let lock = NSLock()
    private var generationValue = 0
    private var waiters: [Int: CheckedContinuation<Return, Never>] = [:]
    private var next = 0
    private var closing = false
    /// Returns after the given seconds (or when cancelled).
    private let timer: @Sendable (Double) async -> Void

    init(timer: @escaping @Sendable (Double) async -> Void = { try? await Task.sleep(for: .seconds($0)) }) {
        self.timer = timer
    }

    var generation: Int { lock.withLock { generationValue } }
    /// Heartbeats held right now.
    var held: Int { lock.withLock { waiters.count } }

    /// Holds the caller while the generation is `generation`, for at most `seconds`.
    @discardableResult
    func wait(after generation: Int, seconds: Double) async -> Return {
        let id: Int? = lock.withLock {
            guard !closing, generation == generationValue, seconds > 0 else { return nil }
            next += 1
            return next
        }
        guard let id else { return .notHeld }
        let timeout = Task { [timer, weak self] in
            await timer(seconds)
            if !Task.isCancelled { self?.release(id, .timedOut) }
        }
        defer { timeout.cancel() }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let early: Return? = lock.withLock {
                    // Moved between the check and here, or cancelled already: return at once.
                    if generation != generationValue || closing || Task.isCancelled { return .woken }
                    waiters[id] = continuation
                    return nil
                }
                if let early { continuation.resume(returning: early) }
            }
        } onCancel: {
            release(id, .woken)
        }
    }

    private func release(_ id: Int, _ why: Return) {
        lock.withLock { waiters.removeValue(forKey: id) }?.resume(returning: why)
    }

    /// A worker phase opened or a round ended: every held heartbeat looks for its task again.
    func changed() {
        let held = lock.withLock {
            generationValue += 1
            defer { waiters = [:] }
            return waiters
        }
        for continuation in held.values { continuation.resume(returning: .woken) }
    }

    /// Graceful shutdown: answers held heartbeats now and holds no more.
    func stopHolding() {
        lock.withLock { closing = true }
        changed()
    }
}
