// Coverage-guided fuzz targets for everything Whittle decodes from outside: the ONNX reader with shape inference,
// the .npy and .npz readers, every message the coordinator decodes (and folds), every message the worker decodes.
//
// Built with libFuzzer (`scripts/fuzz`: `swift build --sanitize=fuzzer --sanitize=address -Xswiftc -DWHITTLE_FUZZING`),
// the target is chosen by the environment variable WHITTLE_FUZZ_TARGET (onnx, npy, coordinator, worker). Built
// normally, `whittle-fuzz TARGET FILE…` runs files through a target once each (the corpus as a regression test).
// Any input may be refused with an error; none may trap, hang or exhaust memory.
import Foundation
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittlePKI
import WhittleProtocol
import WhittleRounds
import WhittleTensor
import X509

enum FuzzTarget: String, CaseIterable {
    case onnx, npy, coordinator, worker

    func run(_ bytes: [UInt8]) {
        switch self {
        case .onnx: Self.onnx(bytes)
        case .npy:
            _ = try? NPY.decode(bytes)
            _ = try? NPZ.decode(bytes)
        case .coordinator: Self.coordinator(bytes)
        case .worker: Self.worker(bytes)
        }
    }

    /// The reader, its structure and opset checks, shape inference at batch 1 and 2 (with constant folding) and
    /// the summary (parameters, MACs).
    static func onnx(_ bytes: [UInt8]) {
        guard let model = try? ModelCoding.read(bytes), (try? ModelCoding.checkOpset(model)) != nil else { return }
        for batch in [1, 2] {
            guard let shapes = try? ShapeInference.inputShapes(model, batchSize: batch),
                  (try? ShapeInference.infer(model.graph, opset: model.defaultOpset ?? 13, inputs: shapes)) != nil else { return }
        }
        _ = try? ModelSummary(model: model)
    }

    /// The phase expectations a coordinator folds reports against (a small model's worth of tensors).
    static let expectations: [PhaseExpectation] = {
        var importance = PhaseExpectation(kind: .importance)
        importance.channels = ["a": 4, "b": 2]
        var taylor = PhaseExpectation(kind: .importance)
        taylor.criterion = .taylor
        taylor.shapes = ["w": [4, 3], "b": [4]]
        var finetune = PhaseExpectation(kind: .finetune)
        finetune.shapes = ["w": [4, 3], "b": [4]]
        var fisher = PhaseExpectation(kind: .fisher)
        fisher.shapes = finetune.shapes
        var ranges = PhaseExpectation(kind: .ranges)
        ranges.tensors = ["a", "b"]
        var histograms = PhaseExpectation(kind: .histograms)
        histograms.histogramUpper = ["a": 1, "b": 4]
        histograms.histogramBins = 16
        var distribute = PhaseExpectation(kind: .distribute)
        distribute.artifact = String(repeating: "ab", count: 32)
        return [importance, taylor, finetune, fisher, ranges, histograms, PhaseExpectation(kind: .evaluate), distribute]
    }()

    /// First byte: which message. Enrollment requests have their CSR parsed and verified; reports are folded into
    /// an accumulator of every phase kind, twice (merges of forged counts), by each aggregation method.
    static func coordinator(_ bytes: [UInt8]) {
        guard let selector = bytes.first else { return }
        let body = Array(bytes.dropFirst())
        switch selector % 3 {
        case 0:
            guard let message = try? Whittle_EnrollRequest(serializedBytes: body) else { return }
            _ = try? PKI.verifyCSR(Array(message.csrDer))
        case 1:
            _ = try? Whittle_Heartbeat(serializedBytes: body)
        default:
            guard let report = try? Whittle_TaskReport(serializedBytes: body) else { return }
            let methods: [AggregationMethod] = [.fedavg, .trimmedMean, .median]
            for expectation in expectations {
                var accumulator = PhaseAccumulator(expectation: expectation, aggregation: methods[Int(selector / 3) % 3],
                                                   clipNorm: selector & 0x80 != 0 ? 1 : nil)
                _ = try? accumulator.add(report, worker: "w1", maximumSamples: 1 << 20)
                _ = try? accumulator.add(report, worker: "w2", maximumSamples: Int(selector) * 1000 + 1)
                if expectation.kind.trains { _ = try? accumulator.delta() }
                if expectation.kind == .fisher { _ = try? accumulator.fisher() }
                _ = accumulator.medianUpdateNorm
            }
        }
    }

    /// First byte: which message. Tasks have their identifiers checked as the worker does before it touches a file;
    /// certificates are parsed; EWC states and artifacts' tensors decoded.
    static func worker(_ bytes: [UInt8]) {
        guard let selector = bytes.first else { return }
        let body = Array(bytes.dropFirst())
        switch selector % 4 {
        case 0:
            guard let answer = try? Whittle_HeartbeatResponse(serializedBytes: body) else { return }
            _ = Identifiers.problem(in: answer.task)
        case 1:
            guard let answer = try? Whittle_EnrollResponse(serializedBytes: body) else { return }
            _ = try? Certificate(derEncoded: Array(answer.certificateDer))
            _ = try? Certificate(derEncoded: Array(answer.caCertificateDer))
        case 2:
            guard let state = try? Whittle_EWCState(serializedBytes: body) else { return }
            for (_, t) in state.fisher { _ = try? t.decoded() }
            for (_, t) in state.reference { _ = try? t.decoded() }
        default:
            _ = try? Whittle_TaskReportResponse(serializedBytes: body)
        }
    }
}

#if WHITTLE_FUZZING
let selectedTarget: FuzzTarget = {
    let name = ProcessInfo.processInfo.environment["WHITTLE_FUZZ_TARGET"] ?? ""
    guard let target = FuzzTarget(rawValue: name) else {
        FileHandle.standardError.write(Data("set WHITTLE_FUZZ_TARGET to one of \(FuzzTarget.allCases.map(\.rawValue))\n".utf8))
        exit(2)
    }
    return target
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    selectedTarget.run(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}
#else
/// `whittle-fuzz TARGET FILE…`: each file through the target once.
@main
struct Replay {
    static func main() {
        let arguments = CommandLine.arguments.dropFirst()
        guard let name = arguments.first, let target = FuzzTarget(rawValue: name) else {
            FileHandle.standardError.write(Data("usage: whittle-fuzz \(FuzzTarget.allCases.map(\.rawValue).joined(separator: "|")) FILE…\n".utf8))
            exit(2)
        }
        var count = 0
        for path in arguments.dropFirst() {
            guard let data = FileManager.default.contents(atPath: path) else {
                FileHandle.standardError.write(Data("cannot read \(path)\n".utf8))
                exit(1)
            }
            target.run([UInt8](data))
            count += 1
        }
        print("\(name): \(count) inputs, none crashed")
    }
}
#endif
