import Foundation
import Testing
import WhittleCompression
import WhittleNN
import WhittleONNX
import WhittleTensor
import WhittleTestSupport

/// The latency table and its predictions, with a scripted "clock": every timed session costs a known function of
/// its MACs, so what the table predicts can be compared with what that function gives on the pruned model.
@Suite struct LatencyTableTests {
    /// Milliseconds per MAC and per run of the scripted machine.
    static let millisecondsPerMAC = 1e-6
    static let millisecondsPerRun = 0.01
    /// Largest error of a prediction, as a share of the full model's scripted latency: the layers' part is
    /// interpolated exactly (MACs are bilinear in a layer's channels); the work outside them is fitted linearly.
    static let predictionTolerance = 0.02

    /// A scripted measurement: runs the session once (so every model the table builds must run), then returns
    /// MACs × `millisecondsPerMAC` + `millisecondsPerRun`. Counts the sessions timed.
    final class ScriptedMachine: @unchecked Sendable {
        var sessions = 0
        func measure(_ session: InferenceSession, _ inputs: [String: Tensor]) throws -> Double {
            sessions += 1
            let outputs = try session.run(inputs: inputs)
            #expect(outputs.values.allSatisfy { t in t.floats.allSatisfy(\.isFinite) })
            let shapes = Dictionary(uniqueKeysWithValues: inputs.map { ($0.key, (DataType.float, $0.value.shape)) })
            return Double(try ModelSummary(model: session.model, inputShapes: shapes).macs) * millisecondsPerMAC + millisecondsPerRun
        }
    }

    static func scriptedLatency(_ model: Model, batch: Int) throws -> Double {
        Double(try ModelSummary(model: model, inputShapes: try ShapeInference.inputShapes(model, batchSize: batch)).macs)
            * millisecondsPerMAC + millisecondsPerRun
    }

    @Test(arguments: ["resnet_bn_op13.onnx", "mobilenetv2_bn_op13.onnx", "smallcnn_dynamo.onnx"])
    func predictionsFollowTheMeasuredLayers(_ file: String) throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes(file))
        var search = try LocalSearch(base: model, roundTo: 2)
        let machine = ScriptedMachine()
        var builder = LatencyTableBuilder(machine: "scripted", threads: 1, measure: machine.measure)
        builder.batch = 2
        builder.points = 4
        let table = try builder.build(base: model, costs: search.costs, model: search.model)
        let layers = table.layers.count
        #expect(layers > 0)
        // Every grid point and every anchor (the uniform architectures at the grid's fractions) was timed, once per pass.
        #expect(machine.sessions == (table.layers.reduce(0) { $0 + $1.outputs.count * $1.inputs.count } + builder.points) * builder.passes)
        let fractions: [Double] = [0, 1.0 / 3, 2.0 / 3, 1]
        #expect(table.anchors.map(\.fraction) == fractions)
        for l in table.layers {
            #expect(l.outputs == l.outputs.sorted() && l.inputs == l.inputs.sorted())
            #expect(l.milliseconds.count == l.outputs.count && l.milliseconds.allSatisfy { $0.count == l.inputs.count })
        }
        let latency = try LatencyModel(base: model, costs: search.costs, table: table)
        search.latencies = [latency]
        let full = try Self.scriptedLatency(model, batch: 2)
        #expect(abs(table.fullMilliseconds - full) < 1e-9)
        #expect(latency.fit.layers > 0)
        // The anchors are predicted closely (the fit has three terms for four anchors).
        for architecture in [search.space.full, search.space.narrowest] {
            let truth = try Self.scriptedLatency(try search.model(architecture), batch: 2)
            #expect(abs(latency.predict(architecture) - truth) <= Self.predictionTolerance * full)
        }
        var rng = SplitMix64(seed: 11)
        for _ in 0..<6 {
            let a = Architecture(levels: search.space.dimensions.map { Int(rng.next() % UInt64($0.widths.count)) })
            let truth = try Self.scriptedLatency(try search.model(a), batch: 2)
            let predicted = try #require(try search.cost(a).latencyMs)
            #expect(abs(predicted - truth) <= Self.predictionTolerance * full, "\(file) \(search.space.describe(a)): \(predicted) vs \(truth)")
        }
        // A stored table matches its own grid and machine, and names what differs.
        let expected = try builder.grid(base: model, costs: search.costs)
        #expect(table.mismatch(machine: "scripted", threads: 1, batch: 2, expected: expected) == nil)
        #expect(table.mismatch(machine: "avx2", threads: 1, batch: 2, expected: expected) != nil)
        #expect(table.mismatch(machine: "scripted", threads: 2, batch: 2, expected: expected) != nil)
        #expect(table.mismatch(machine: "scripted", threads: 1, batch: 1, expected: expected) != nil)
        builder.points = 3
        #expect(table.mismatch(machine: "scripted", threads: 1, batch: 2, expected: try builder.grid(base: model, costs: search.costs)) != nil)
        let decoded = try JSONDecoder().decode(LatencyTable.self, from: try JSONEncoder().encode(table))
        #expect(decoded == table)
    }

    /// Bilinear interpolation, by hand: a 2 × 2 grid with times o + 10·i at the corners.
    @Test func interpolationIsBilinearAndClamped() {
        let l = LayerLatency(node: "c", opType: "Conv", outputs: [4, 8], inputs: [2, 6],
                             milliseconds: [[4 + 20, 4 + 60], [8 + 20, 8 + 60]])
        #expect(abs(l.predict(outputs: 6, inputs: 3) - (6 + 30)) < 1e-12)
        #expect(abs(l.predict(outputs: 4, inputs: 6) - 64) < 1e-12)
        #expect(abs(l.predict(outputs: 100, inputs: 1) - 28) < 1e-12)  // clamped to (8, 2)
        let fixed = LayerLatency(node: "c", opType: "Conv", outputs: [4, 8], inputs: [3], milliseconds: [[1], [3]])
        #expect(abs(fixed.predict(outputs: 5, inputs: 3) - 1.5) < 1e-12)
    }

    /// The fit, by hand: times that are exactly 2 · layers + 0.5 + 0.001 · elements are fitted exactly; with one
    /// anchor the layers' factor stays 1 and the rest is a constant.
    @Test func theAnchorsFitTheLayersSum() {
        let rows = [(1.0, 100.0), (2.0, 400.0), (4.0, 500.0), (7.0, 900.0)].map { (layers: $0.0, elements: $0.1, time: 2 * $0.0 + 0.5 + 0.001 * $0.1) }
        let fit = LatencyModel.fit(rows)
        #expect(abs(fit.layers - 2) < 1e-9 && abs(fit.constant - 0.5) < 1e-9 && abs(fit.perElement - 0.001) < 1e-12)
        let one = LatencyModel.fit([(layers: 3, elements: 10, time: 5)])
        #expect(one.layers == 1 && abs(one.constant - 2) < 1e-12 && one.perElement == 0)
    }

    /// The envelope: each point at least every point with fewer channels on either axis, by hand.
    @Test func theTableIsMadeNonDecreasing() {
        let noisy = LayerLatency(node: "c", opType: "Conv", outputs: [4, 8, 12], inputs: [2, 6],
                                 milliseconds: [[1, 3], [0.5, 2], [4, 3.5]])
        #expect(noisy.monotone.milliseconds == [[1, 3], [1, 3], [4, 4]])
        let clean = LayerLatency(node: "c", opType: "Conv", outputs: [4, 8], inputs: [2, 6], milliseconds: [[1, 2], [3, 4]])
        #expect(clean.monotone == clean)
    }

    /// A latency budget keeps every candidate under it, the front is ordered by latency, and budgets the table
    /// cannot judge are refused.
    @Test func theSearchKeepsALatencyBudget() throws {
        let model = try ModelCoding.read(try TestSupport.fixtureBytes("resnet_bn_op13.onnx"))
        var search = try LocalSearch(base: model, roundTo: 2)
        var builder = LatencyTableBuilder(machine: "scripted", threads: 1, measure: ScriptedMachine().measure)
        builder.points = 3
        search.latencies = [try LatencyModel(base: model, costs: search.costs,
                                             table: try builder.build(base: model, costs: search.costs, model: search.model))]
        let full = try #require(try search.cost(search.space.full).latencyMs)
        let budget = SearchBudget(latencyMs: full * 0.4)
        var strategy = EvolutionarySearch()
        strategy.evaluations = 24
        strategy.population = 8
        strategy.parents = 2
        let found = try strategy.run(space: search.space, cost: search.cost, budget: budget) { batch in
            batch.map { Double($0.levels.reduce(0, +)) }
        }
        #expect(found.count > 1)
        #expect(found.allSatisfy { budget.admits($0.cost) })
        // Each candidate spends most of the budget (repair widens while it fits).
        #expect(found.allSatisfy { budget.usage($0.cost) > 0.5 })
        let front = EvolutionarySearch.front(found)
        #expect(front.map { $0.cost.latencyMs! } == front.map { $0.cost.latencyMs! }.sorted())
        #expect(throws: CompressionError.self) {
            try SearchBudget(latencyMs: 1e-9).check(smallest: try search.cost(search.space.narrowest))
        }
        #expect(throws: CompressionError.self) {
            try SearchBudget(latencyMs: 5).check(smallest: ArchitectureCost(macs: 1, parameters: 1, parameterBytes: 4))
        }
    }
}
