import WhittleONNX
import WhittleTensor

/// Backward passes of the ops that move elements: each output element copies one input element (Slice, Pad,
/// Gather — embeddings —, GatherElements, Expand, Tile) or mixes two (Resize), so the gradient is scattered back
/// through the same index maps the forward pass uses. Split hands each output's gradient back to its slice.
extension Gradients {
    static func registerIndexing(_ r: inout [String: GradientDefinition]) {
        func define(_ op: String, _ inputs: Set<Int>, _ f: @escaping @Sendable (GradientContext) throws -> [Tensor?]) {
            r[op] = GradientDefinition(differentiable: inputs, backward: f)
        }
        define("Slice", [0]) { g in
            let x = try g.x(0)
            return [scatter(g.dy, sources: try Operators.slicePlan(g.ctx, x.shape, g.inputs).sources(), into: x.shape)]
        }
        define("Pad", [0]) { g in
            let x = try g.x(0)
            return [scatter(g.dy, sources: try Operators.padSources(g.ctx, x.shape, g.inputs).1, into: x.shape)]
        }
        define("Gather", [0]) { g in
            let x = try g.x(0)
            return [scatter(g.dy, sources: try Operators.gatherSources(g.ctx, x.shape, try g.x(1)).1, into: x.shape)]
        }
        define("GatherElements", [0]) { g in
            let x = try g.x(0)
            return [scatter(g.dy, sources: try Operators.gatherElementsSources(g.ctx, x.shape, try g.x(1)), into: x.shape)]
        }
        define("Expand", [0]) { g in
            let x = try g.x(0)
            return [Tensor(shape: x.shape, floats: reduceSum(g.dy, from: g.outputs[0].shape, to: x.shape))]
        }
        define("Tile", [0]) { g in
            let x = try g.x(0)
            let repeats = try Operators.tileRepeats(g.ctx, try g.x(1), rank: x.rank)
            return [scatter(g.dy, sources: Operators.tileSources(x.shape, repeats).1, into: x.shape)]
        }
        define("Split", [0]) { g in
            let x = try g.x(0)
            let (axis, sizes) = try Operators.splitSizes(g.ctx, x.shape, g.inputs)
            let outer = x.shape[..<axis].reduce(1, *), inner = x.shape[(axis + 1)...].reduce(1, *), n = x.shape[axis]
            var dx = [Float](repeating: 0, count: x.count)
            var start = 0
            for (k, size) in sizes.enumerated() {
                defer { start += size }
                guard k < g.dOutputs.count, let d = g.dOutputs[k] else { continue }
                for o in 0..<outer {
                    let dst = (o * n + start) * inner, src = o * size * inner
                    for j in 0..<(size * inner) { dx[dst + j] = d.floats[src + j] }
                }
            }
            return [Tensor(shape: x.shape, floats: dx)]
        }
        define("ConvTranspose", [0, 1, 2]) { g in
            let x = try g.x(0), w = try g.x(1), dy = g.dy
            let geometry = try Operators.convTransposeGeometry(g.ctx)
            var dx = [Float](repeating: 0, count: x.count), dw = [Float](repeating: 0, count: w.count)
            Kernels.forEachTransposedTap(geometry, batch: x.shape[0]) { xi, wi, yi in
                dx[xi] += dy[yi] * w.floats[wi]
                dw[wi] += dy[yi] * x.floats[xi]
            }
            var db: Tensor?
            if g.needs.count > 2, g.needs[2] {
                let spatial = geometry.output.reduce(1, *), c = geometry.outChannels
                var sums = [Float](repeating: 0, count: c)
                for i in 0..<dy.count { sums[(i / spatial) % c] += dy[i] }
                db = Tensor(shape: [c], floats: sums)
            }
            return [Tensor(shape: x.shape, floats: dx), Tensor(shape: w.shape, floats: dw), db]
        }
        define("Resize", [0]) { g in
            let x = try g.x(0)
            let taps = try Operators.resizeTaps(g.ctx, x.shape, g.inputs)
            // Shapes after each resampled axis, to undo them in reverse order.
            var shapes = [x.shape]
            for (axis, t) in taps {
                var s = shapes.last!
                s[axis] = t.count
                shapes.append(s)
            }
            var d = g.dy
            for (k, (axis, t)) in taps.enumerated().reversed() {
                d = Operators.resampleBackward(d, shape: shapes[k + 1], axis: axis, inSize: shapes[k][axis], taps: t)
            }
            return [Tensor(shape: x.shape, floats: d)]
        }
    }

    /// ∂L/∂input for an op whose output element i copies input element `sources[i]` (-1: a fill value).
    static func scatter(_ dy: [Float], sources: [Int], into shape: [Int]) -> Tensor {
        var dx = [Float](repeating: 0, count: shape.reduce(1, *))
        for (i, s) in sources.enumerated() where s >= 0 { dx[s] += dy[i] }
        return Tensor(shape: shape, floats: dx)
    }
}
