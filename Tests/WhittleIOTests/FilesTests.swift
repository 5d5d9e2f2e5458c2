import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing
import WhittleIO
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// The disk adaptor on a real temporary folder: what is refused (with which code), what a durable write leaves.
@Suite struct FilesTests {
    let folder: String

    init() throws {
        folder = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-io-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    }

    func code(_ body: () throws -> Void) -> FileError.Code? {
        do { try body() } catch let error as FileError { return error.code } catch { return nil }
        return nil
    }

    @Test func readsRefuseWhatIsNotARegularFile() throws {
        defer { try? FileManager.default.removeItem(atPath: folder) }
        #expect(code { _ = try Files.readBytes(folder + "/missing") } == .notFound)
        #expect(code { _ = try Files.readBytes(folder) } == .notARegularFile)
        #expect(code { _ = try Files.readBytes("/dev/zero") } == .notARegularFile, "a device is refused before it is read")
        let fifo = folder + "/fifo"
        #expect(mkfifo(fifo, 0o600) == 0)
        #expect(code { _ = try Files.readBytes(fifo) } == .notARegularFile, "a FIFO is refused before it is opened")
        try Files.writeBytes([1, 2, 3], to: folder + "/ok")
        #expect(try Files.readBytes(folder + "/ok") == [1, 2, 3])
    }

    @Test func durableWritesReplaceWholeAndNewFilesAreNeverOverwritten() throws {
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let path = folder + "/state"
        try Files.writeDurably(Array("first".utf8), to: path)
        try Files.writeDurably(Array("second, longer".utf8), to: path, mode: 0o640)
        #expect(String(decoding: try Files.readBytes(path), as: UTF8.self) == "second, longer")
        var info = stat()
        #expect(stat(path, &info) == 0 && info.st_mode & 0o777 == 0o640)
        #expect(try FileManager.default.contentsOfDirectory(atPath: folder) == ["state"], "no temporary file is left behind")

        try Files.writeNew("secret", to: folder + "/key", mode: 0o600)
        #expect(stat(folder + "/key", &info) == 0 && info.st_mode & 0o777 == 0o600)
        #expect(code { try Files.writeNew("other", to: folder + "/key", mode: 0o600) } == .alreadyExists)
        #expect(String(decoding: try Files.readBytes(folder + "/key"), as: UTF8.self) == "secret", "the refused write changed nothing")
        #expect(code { try Files.writeDurably([1], to: folder + "/no/such/folder/file") } == .unwritable)

        try Files.move(path, to: folder + "/moved")
        #expect(code { try Files.move(path, to: folder + "/again") } == .unwritable)
        try Files.syncDirectory(folder)
        #expect(code { try Files.syncDirectory(folder + "/missing") } == .unwritable)
    }

    @Test func inputsAndLabelsMustFitTheModel() throws {
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let x = Tensor(shape: [4, 2], floats: [0, 1, 2, 3, 4, 5, 6, 7])
        try Files.writeNPY(x, to: folder + "/x.npy")
        #expect(try Files.readInputs(folder + "/x.npy", names: ["input"])["input"] == x)
        // One array for a model with two inputs; an archive missing one, or holding an extra one.
        #expect(code { _ = try Files.readInputs(folder + "/x.npy", names: ["a", "b"]) } == .invalidContent)
        try Files.writeBytes(try NPZ.encode([("a", x)]), to: folder + "/a.npz")
        #expect(code { _ = try Files.readInputs(folder + "/a.npz", names: ["a", "b"]) } == .invalidContent)
        try Files.writeBytes(try NPZ.encode([("a", x), ("b", x), ("c", x)]), to: folder + "/abc.npz")
        #expect(code { _ = try Files.readInputs(folder + "/abc.npz", names: ["a", "b"]) } == .invalidContent)
        try Files.writeBytes(try NPZ.encode([("a", x), ("b", Tensor(shape: [3, 2], floats: [0, 0, 0, 0, 0, 0]))]), to: folder + "/ragged.npz")
        #expect(code { _ = try Files.readInputs(folder + "/ragged.npz", names: ["a", "b"]) } == .invalidContent)

        try Files.writeNPY(Tensor(shape: [4], ints: [0, 1, 2, 1]), to: folder + "/y.npy")
        #expect(try Files.readLabels(folder + "/y.npy", count: 4).shape == [4])
        #expect(code { _ = try Files.readLabels(folder + "/y.npy", count: 5) } == .invalidContent)
        #expect(code { _ = try Files.readLabels(folder + "/x.npy", count: 4) } == .invalidContent, "float labels are refused")
        try Files.writeBytes(Array("not an array".utf8), to: folder + "/junk.npy")
        #expect(code { _ = try Files.readNPY(folder + "/junk.npy") } == .invalidContent)
    }

    @Test func modelsAreReadWithTheirExternalDataOnlyFromTheirFolder() throws {
        defer { try? FileManager.default.removeItem(atPath: folder) }
        try Files.writeBytes(Array("not a model".utf8), to: folder + "/junk.onnx")
        #expect(code { _ = try Files.readModel(folder + "/junk.onnx") } == .invalidContent)
        let model = Graphs.concat()
        try Files.writeModel(model, to: folder + "/model.onnx")
        #expect(try Files.readModel(folder + "/model.onnx").graph.nodes.count == model.graph.nodes.count)
        // External data that resolves outside the model's folder (through a symbolic link, or ..) is refused, never read.
        let outside = FileManager.default.temporaryDirectory.appendingPathComponent("whittle-io-outside-\(UUID().uuidString)").path
        try Files.writeBytes([UInt8](repeating: 0, count: 36), to: outside)
        defer { try? FileManager.default.removeItem(atPath: outside) }
        try FileManager.default.createSymbolicLink(atPath: folder + "/weights.bin", withDestinationPath: outside)
        #expect {
            _ = try Files.readExternalData(folder: folder, location: "weights.bin")
        } throws: { ($0 as? ONNXError)?.code == .externalData && "\($0)".contains("outside") }
        #expect { _ = try Files.readExternalData(folder: folder, location: "../x") } throws: { ($0 as? ONNXError)?.code == .externalData }
    }
}
