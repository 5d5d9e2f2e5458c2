import Foundation
#if canImport(Glibc)
import Glibc
#endif
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleTensor

/// The disk, for everything above the pure core (commands, coordinator, worker): the core takes and returns bytes,
/// these functions read and write files. Durable writes survive a crash whole or not at all.
public enum Files {
    /// Largest model or data file read, in bytes (a guard against reading a wrong multi-gigabyte path).
    public static let maximumFileSize = 4 << 30

    /// The whole of a regular file of at most `maximumFileSize` bytes (a FIFO, device or directory is refused
    /// before it is opened, so a path like /dev/zero cannot block or exhaust memory).
    public static func readBytes(_ path: String) throws -> [UInt8] {
        var info = stat()
        guard stat(path, &info) == 0 else { throw FileError(.notFound, path, "file not found: \(path)") }
        switch info.st_mode & S_IFMT {
        case S_IFREG: break
        case S_IFDIR: throw FileError(.notARegularFile, path, "\(path) is a directory, not a file")
        default: throw FileError(.notARegularFile, path, "\(path) is not a regular file (a device, FIFO or socket); refused")
        }
        guard Int(info.st_size) <= maximumFileSize else { throw FileError(.tooLarge, path, "\(path) is larger than \(maximumFileSize) bytes") }
        guard let handle = FileHandle(forReadingAtPath: path) else { throw FileError(.unreadable, path, "cannot open \(path) for reading") }
        defer { try? handle.close() }
        let data = try handle.read(upToCount: maximumFileSize + 1) ?? Data()
        guard data.count <= maximumFileSize else { throw FileError(.tooLarge, path, "\(path) is larger than \(maximumFileSize) bytes") }
        return [UInt8](data)
    }

    public static func writeBytes(_ bytes: [UInt8], to path: String) throws {
        let url = URL(fileURLWithPath: path)
        do {
            try Data(bytes).write(to: url, options: .atomic)
        } catch {
            throw FileError(.unwritable, path, "cannot write \(path): \(error.localizedDescription)")
        }
    }

    /// Reads an ONNX model; external-data files are read relative to the model's folder.
    public static func readModel(_ path: String) throws -> Model {
        let bytes = try readBytes(path)
        let folder = URL(fileURLWithPath: path).deletingLastPathComponent().path
        let loader: ExternalDataLoader = { location in try readExternalData(folder: folder, location: location) }
        do {
            return try ModelCoding.read(bytes, externalData: loader)
        } catch let error as ONNXError {
            throw FileError(.invalidContent, path, "\(path): \(error.message)")
        }
    }

    /// An external-data file named by a model: a regular file inside the model's folder once symbolic links are
    /// resolved (a link to /etc/passwd, a FIFO or a device is refused, never read).
    package static func readExternalData(folder: String, location: String) throws -> [UInt8] {
        let root = URL(fileURLWithPath: folder).resolvingSymlinksInPath().standardizedFileURL.path
        let target = URL(fileURLWithPath: folder + "/" + location).resolvingSymlinksInPath().standardizedFileURL.path
        guard target.hasPrefix(root.hasSuffix("/") ? root : root + "/") else {
            throw ONNXError(.externalData, "external data '\(location)' resolves outside the model's folder; refused")
        }
        do {
            return try readBytes(target)
        } catch let error as FileError {
            throw ONNXError(.externalData, "external data '\(location)': \(error.description)")
        }
    }

    public static func writeModel(_ model: Model, to path: String) throws {
        try writeBytes(try ModelCoding.write(model), to: path)
    }

    /// The named arrays of an `.npz` archive (`np.savez` / `np.savez_compressed`), in archive order.
    public static func readNPZ(_ path: String) throws -> [(name: String, tensor: Tensor)] {
        try decodeNPZ(try readBytes(path), path)
    }

    static func decodeNPZ(_ bytes: [UInt8], _ path: String) throws -> [(name: String, tensor: Tensor)] {
        do {
            return try NPZ.decode(bytes)
        } catch let error as TensorError {
            throw FileError(.invalidContent, path, "\(path): \(error.message)")
        }
    }

    static func decodeNPY(_ bytes: [UInt8], _ path: String) throws -> Tensor {
        do {
            return try NPY.decode(bytes)
        } catch let error as TensorError {
            throw FileError(.invalidContent, path, "\(path): \(error.message)")
        }
    }

    /// Inputs for a model whose runtime inputs are `names`: an `.npz` gives them by name (every one must be there,
    /// nothing else), a `.npy` feeds a model with a single input.
    public static func readInputs(_ path: String, names: [String]) throws -> [String: Tensor] {
        let bytes = try readBytes(path)
        guard bytes.starts(with: [0x50, 0x4B]) else {  // "PK": a ZIP archive
            guard names.count == 1 else {
                throw FileError(.invalidContent, path, "the model has \(names.count) inputs (\(names.joined(separator: ", "))) and \(path) holds one array; give every input by name in an .npz, e.g. numpy.savez(\"inputs.npz\", \(names.map { "\($0)=…" }.joined(separator: ", ")))")
            }
            return [names[0]: try decodeNPY(bytes, path)]
        }
        let arrays = try decodeNPZ(bytes, path)
        let given = Dictionary(arrays.map { ($0.name, $0.tensor) }, uniquingKeysWith: { a, _ in a })
        let missing = names.filter { given[$0] == nil }
        guard missing.isEmpty else {
            throw FileError(.invalidContent, path, "\(path) has no array for the model's input\(missing.count > 1 ? "s" : "") \(missing.map { "'\($0)'" }.joined(separator: ", ")) (it holds \(arrays.map(\.name).joined(separator: ", ")))")
        }
        if let extra = given.keys.sorted().first(where: { !names.contains($0) }) {
            throw FileError(.invalidContent, path, "\(path) holds '\(extra)', which is not an input of the model (its inputs are \(names.joined(separator: ", ")))")
        }
        let batch = given[names[0]]!.shape.first
        for name in names where given[name]!.shape.first != batch {
            throw FileError(.invalidContent, path, "\(path): '\(name)' has \(given[name]!.shape.first ?? 0) samples and '\(names[0])' \(batch ?? 0); every input needs one row per sample")
        }
        return given
    }

    public static func readNPY(_ path: String) throws -> Tensor { try decodeNPY(try readBytes(path), path) }

    /// Reads labels: an integer .npy with one label per sample (`[count]`), or one per pixel (`[count, H, W]`, for
    /// segmentation).
    public static func readLabels(_ path: String, count: Int) throws -> Tensor {
        let t = try readNPY(path)
        guard t.dtype.isInteger else { throw FileError(.invalidContent, path, "\(path): labels must be integers, got \(t.dtype)") }
        guard t.rank >= 1, t.shape[0] == count else {
            throw FileError(.invalidContent, path, "\(path) has shape \(t.shape); expected [\(count)], one label per sample (or [\(count), H, W], one per pixel)")
        }
        return t
    }

    /// Samples from a `.npy` file (one unnamed array, for a single-input model) or a `.npz` archive (one array per
    /// model input, by name, each with the samples on its first axis).
    public static func readSamples(_ path: String) throws -> Samples {
        let bytes = try readBytes(path)
        do {
            guard bytes.starts(with: [0x50, 0x4B]) else { return Samples(try decodeNPY(bytes, path)) }
            return try Samples(try decodeNPZ(bytes, path).map { ($0.name, $0.tensor) })
        } catch let error as ONNXError {
            throw FileError(.invalidContent, path, "\(path): \(error.message)")
        }
    }

    /// A data set: samples (`readSamples`) and optional labels (`readLabels`). Float data is checked finite. With
    /// `model`, integer arrays for float inputs are converted and the arrays are checked against the model's inputs.
    public static func readDataset(_ path: String, labels: String?, for model: Model? = nil) throws -> Dataset {
        var samples = try readSamples(path)
        if let model {
            samples = samples.conformed(to: model.graph)
            do {
                _ = try samples.feed(model.graph)
            } catch let error as ONNXError {
                throw FileError(.invalidContent, path, "\(path): \(error.message)")
            }
        }
        let y = try labels.map { try readLabels($0, count: samples.count) }
        do {
            return try Dataset(samples: samples, labels: y)
        } catch let error as CompressionError {
            throw FileError(.invalidContent, path, "\(path): \(error.message)")
        }
    }

    /// Creates a file that must not exist yet, with `mode` set by the creating `open` itself (a key is never
    /// readable by others, not even for a moment), and syncs it to disk before returning.
    public static func writeNew(_ text: String, to path: String, mode: mode_t) throws {
        try write(Array(text.utf8), to: path, flags: O_WRONLY | O_CREAT | O_EXCL, mode: mode)
    }

    /// Writes `bytes` to `path` so that after a crash the path holds either nothing, its old content, or all of
    /// `bytes`: a synced temporary file renamed over it, then the directory synced. When this returns, the file
    /// is on disk (an acknowledgement sent after it cannot be lost).
    public static func writeDurably(_ bytes: [UInt8], to path: String, mode: mode_t = 0o600) throws {
        try bytes.withUnsafeBytes { try writeDurably($0, to: path, mode: mode) }
    }

    /// `writeDurably` of bytes held elsewhere (a network buffer), without copying them into an array first.
    public static func writeDurably(_ bytes: UnsafeRawBufferPointer, to path: String, mode: mode_t = 0o600) throws {
        let temporary = path + ".tmp-\(getpid())"
        try write(bytes, to: temporary, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: mode)
        guard rename(temporary, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw FileError(.unwritable, path, "cannot move \(temporary) to \(path): \(reason)")
        }
        try syncDirectory(URL(fileURLWithPath: path).deletingLastPathComponent().path)
    }

    /// Syncs a directory, so that the renames and removals made in it survive a crash.
    public static func syncDirectory(_ path: String) throws {
        let directory = open(path, O_RDONLY | O_DIRECTORY)
        guard directory >= 0 else { throw FileError(.unwritable, path, "cannot open the directory \(path) to sync it: \(String(cString: strerror(errno)))") }
        defer { close(directory) }
        guard fsync(directory) == 0 else { throw FileError(.unwritable, path, "cannot sync the directory \(path): \(String(cString: strerror(errno)))") }
    }

    /// Renames `from` over `to` (atomic within one file system); the caller syncs the directory.
    public static func move(_ from: String, to: String) throws {
        guard rename(from, to) == 0 else { throw FileError(.unwritable, to, "cannot move \(from) to \(to): \(String(cString: strerror(errno)))") }
    }

    static func write(_ bytes: [UInt8], to path: String, flags: Int32, mode: mode_t) throws {
        try bytes.withUnsafeBytes { try write($0, to: path, flags: flags, mode: mode) }
    }

    static func write(_ bytes: UnsafeRawBufferPointer, to path: String, flags: Int32, mode: mode_t) throws {
        let fd = open(path, flags, mode)
        guard fd >= 0 else {
            let code: FileError.Code = errno == EEXIST ? .alreadyExists : .unwritable
            throw FileError(code, path, "cannot create \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var written = 0
        while written < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + written, bytes.count - written)
            guard n > 0 else { throw FileError(.unwritable, path, "cannot write \(path): \(String(cString: strerror(errno)))") }
            written += n
        }
        guard fsync(fd) == 0 else { throw FileError(.unwritable, path, "cannot write \(path) to disk: \(String(cString: strerror(errno)))") }
    }

    public static func writeNPY(_ tensor: Tensor, to path: String) throws {
        try writeBytes(try NPY.encode(tensor), to: path)
    }
}

/// A file that cannot be read or written, or whose content is not what the caller asked for.
public struct FileError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// Nothing at the path.
        case notFound
        /// A directory, device, FIFO or socket where a regular file was expected.
        case notARegularFile
        /// Larger than `Files.maximumFileSize`.
        case tooLarge
        /// The file exists but cannot be opened or read.
        case unreadable
        /// A file that must be new (a key) is already there.
        case alreadyExists
        /// The file (or its temporary twin, or its directory's sync) cannot be written.
        case unwritable
        /// The bytes are read but are not what was asked for (not a model, labels that are not integers, arrays that
        /// do not fit the model's inputs).
        case invalidContent
    }

    public let code: Code
    /// The file concerned.
    public let path: String
    public let message: String
    public let file: String
    public let line: Int

    public init(_ code: Code, _ path: String, _ message: String, file: String = #fileID, line: Int = #line) {
        self.code = code
        self.path = path
        self.message = message
        self.file = file
        self.line = line
    }

    public var description: String { message }
}
