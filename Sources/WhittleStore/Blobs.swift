import Foundation
import NIOCore

/// Bytes by key that every coordinator replica reads: report blobs and artifacts. The coordinator keeps them in
/// its data directory when it runs alone (`DirectoryBlobs`, WhittleServer) and in PostgreSQL when replicas share
/// a database (`PostgresStore`, in chunks).
public protocol BlobStore: AnyObject, Sendable {
    /// Stores `bytes` under `key` (replacing what it held), durably when it returns.
    func putBlob(_ key: String, _ bytes: ByteBuffer) async throws
    /// The bytes under `key`, nil when there are none.
    func blob(_ key: String) async throws -> ByteBuffer?
    /// The keys starting with `prefix`, with their sizes and when they were stored.
    func blobs(prefix: String) async throws -> [BlobInfo]
    /// Deletes `key` (nothing when there is none).
    func deleteBlob(_ key: String) async throws
}

public struct BlobInfo: Sendable, Equatable {
    public var key: String
    public var bytes: Int
    public var storedAt: Date

    public init(key: String, bytes: Int, storedAt: Date) {
        self.key = key
        self.bytes = bytes
        self.storedAt = storedAt
    }
}

extension PostgresStore: BlobStore {
    /// Rows of at most this many bytes: a 100 MB report is a hundred rows, never one value near PostgreSQL's 1 GB
    /// limit, and no statement holds more than a chunk.
    public static let blobChunkBytes = 1 << 20

    public func putBlob(_ key: String, _ bytes: ByteBuffer) async throws {
        try await run("storing a blob") {
            let chunks = (bytes.readableBytes + Self.blobChunkBytes - 1) / Self.blobChunkBytes
            try await client.withTransaction(logger: logger) { connection in
                try await connection.query("DELETE FROM blob WHERE key = \(key)", logger: logger)
                try await connection.query("INSERT INTO blob (key, bytes, chunks) VALUES (\(key), \(bytes.readableBytes), \(chunks))",
                                           logger: logger)
                for k in 0..<chunks {
                    let start = k * Self.blobChunkBytes
                    let slice = bytes.getSlice(at: bytes.readerIndex + start, length: min(Self.blobChunkBytes, bytes.readableBytes - start))!
                    try await connection.query("INSERT INTO blob_chunk (key, chunk, data) VALUES (\(key), \(k), \(slice))", logger: logger)
                }
            }
        }
    }

    public func blob(_ key: String) async throws -> ByteBuffer? {
        try await run("reading a blob") {
            let heads = try await all("SELECT bytes, chunks FROM blob WHERE key = \(key)") { try $0.decode((Int, Int).self) }
            guard let (size, chunks) = heads.first else { return nil }
            var out = ByteBuffer()
            out.reserveCapacity(size)
            var next = 0
            for try await (k, data) in try await client.query("SELECT chunk, data FROM blob_chunk WHERE key = \(key) ORDER BY chunk",
                                                              logger: logger).decode((Int, ByteBuffer).self) {
                guard k == next else { throw StoreError(.query, "blob \(key) lacks chunk \(next)") }
                var data = data
                out.writeBuffer(&data)
                next += 1
            }
            guard next == chunks, out.readableBytes == size else {
                throw StoreError(.query, "blob \(key) holds \(out.readableBytes) bytes in \(next) chunks; \(size) in \(chunks) were stored")
            }
            return out
        }
    }

    public func blobs(prefix: String) async throws -> [BlobInfo] {
        try await run("listing blobs") {
            try await all("SELECT key, bytes, created_at FROM blob WHERE starts_with(key, \(prefix)) ORDER BY key") {
                let (key, bytes, at) = try $0.decode((String, Int, Date).self)
                return BlobInfo(key: key, bytes: bytes, storedAt: at)
            }
        }
    }

    public func deleteBlob(_ key: String) async throws {
        try await run("deleting a blob") { try await client.query("DELETE FROM blob WHERE key = \(key)", logger: logger) }
    }
}
