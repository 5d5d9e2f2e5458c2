import Foundation
import WhittleTensor

/// Shared test helpers: repository paths, fixture loading and closeness checks.
public enum TestSupport {
    /// The repository root (two levels above this file's folder).
    public static let root: URL = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()

    public static let fixtures: URL = root.appendingPathComponent("Tests/Fixtures/models")

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
