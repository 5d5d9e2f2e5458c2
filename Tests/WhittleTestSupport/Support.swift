import Foundation
import WhittleTensor
import WhittleONNX

/// Shared test helpers: repository paths, fixture loading and closeness checks.
public enum TestSupport {
    /// The repository root (two levels above this file's folder).
    public static let root: URL = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()

    public static let fixtures: URL = root.appendingPathComponent("Tests/Fixtures/models")
    /// The model-family zoo (scripts/make_zoo.py).
    public static let zoo: URL = root.appendingPathComponent("Tests/Fixtures/zoo")

    /// The zoo's model names (without `.onnx`), in MANIFEST.json order.
    public static let zooModels: [String] = {
        guard let data = try? Data(contentsOf: zoo.appendingPathComponent("MANIFEST.json")),
              let manifest = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let models = manifest["models"] as? [[String: Any]] else { return [] }
        return models.compactMap { ($0["file"] as? String).map { String($0.dropLast(5)) } }
    }()

    /// A zoo model by name (without `.onnx`).
    public static func zooModel(_ name: String) throws -> Model {
        try ModelCoding.read(try bytes(zoo.appendingPathComponent("\(name).onnx")))
    }

    /// A zoo model's inputs by name: NAME.input.npy for the single input, or NAME.inputs.npz.
    public static func zooInputs(_ name: String, model: [String]) throws -> [String: Tensor] {
        let npz = zoo.appendingPathComponent("\(name).inputs.npz")
        if FileManager.default.fileExists(atPath: npz.path) {
            return Dictionary(uniqueKeysWithValues: try NPZ.decode(try bytes(npz)).map { ($0.name, $0.tensor) })
        }
        return [model[0]: try NPY.decode(try bytes(zoo.appendingPathComponent("\(name).input.npy")))]
    }

    /// The directory holding the built products (`coordinator`, `worker`), next to the test bundle.
    public static var productsDirectory: URL {
        var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        while url.path != "/" && !FileManager.default.fileExists(atPath: url.appendingPathComponent("coordinator").path) {
            url = url.deletingLastPathComponent()
        }
        return url
    }

    public static func bytes(_ url: URL) throws -> [UInt8] { [UInt8](try Data(contentsOf: url)) }

    public static func fixtureBytes(_ name: String) throws -> [UInt8] { try bytes(fixtures.appendingPathComponent(name)) }

    public static func npy(_ name: String) throws -> Tensor { try NPY.decode(try fixtureBytes(name)) }

    /// Largest |a − b| divided by max(|b|∞, floor): the "relative to the output's magnitude" error.
    public static func relativeError(_ a: [Float], _ b: [Float], floor: Float = 1e-6) -> Float {
        precondition(a.count == b.count, "lengths differ: \(a.count) vs \(b.count)")
        let scale = max(b.map(abs).max() ?? 0, floor)
        var worst: Float = 0
        for (x, y) in zip(a, b) { worst = max(worst, abs(x - y)) }
        return worst / scale
    }

    /// Deterministic pseudo-random floats in [-1, 1) (SplitMix64).
    public static func randomFloats(_ count: Int, seed: UInt64) -> [Float] {
        var state = seed
        return (0..<count).map { _ in
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            z ^= z >> 31
            return Float(z >> 40) / Float(1 << 23) - 1
        }
    }

    /// Runs a process and returns its exit status, standard output and standard error.
    @discardableResult
    public static func runProcess(_ executable: URL, _ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        let errData = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self))
    }
}

extension TestSupport {
    /// Runs a plan-style kernel `body(src, dst)` on `input`, returning `count` outputs (starting from `initial`
    /// when given, for kernels that accumulate into dst).
    public static func apply(_ input: [Float], count: Int, initial: [Float]? = nil,
                             _ body: (UnsafePointer<Float>, UnsafeMutablePointer<Float>) throws -> Void) throws -> [Float] {
        var out = initial ?? [Float](repeating: 0, count: count)
        try input.withUnsafeBufferPointer { src in
            try out.withUnsafeMutableBufferPointer { dst in try body(src.baseAddress!, dst.baseAddress!) }
        }
        return out
    }
}

/// A clock tests move by hand, for code that takes the time as an injected `() -> Date`.
public final class ScriptedClock: @unchecked Sendable {
    private let lock = NSLock()
    private var current: Date

    public init(_ start: Date = Date(timeIntervalSince1970: 1_800_000_000)) { current = start }

    public var now: Date { lock.withLock { current } }

    public func advance(_ seconds: TimeInterval) { lock.withLock { current = current.addingTimeInterval(seconds) } }

    /// The clock as the closure services take.
    public var read: @Sendable () -> Date { { [self] in now } }
}

extension TestSupport {
    /// Runs blocking work (a libcurl request, a task runner) on a GCD thread and awaits it, so it never holds one
    /// of Swift concurrency's few cooperative threads while an in-process server's handlers need them: on a
    /// 2-core machine two blocked tests would otherwise starve the server until their requests time out.
    public static func offThePool<T: Sendable>(_ body: @escaping () throws -> T) async throws -> T {
        let work = UncheckedBox(body)
        return try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async { continuation.resume(with: Result { try work.value() }) }
        }
    }

    final class UncheckedBox<Value>: @unchecked Sendable {
        let value: Value
        init(_ value: Value) { self.value = value }
    }
}
