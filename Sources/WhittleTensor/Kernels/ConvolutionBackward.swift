/// Convolution gradients.
///
/// Shapes as in `Conv2DGeometry`: x `[N, C, H, W]`, w `[OC, C/g, KH, KW]`, dy `[N, OC, OH, OW]`.
/// `dx[n, c, h, w] = Σ dy[n, o, i, j] · w[o, c', p, q]` over the windows that read (h, w);
/// `dw[o, c', p, q] = Σ_n,i,j dy[n, o, i, j] · x[n, c, i·sH + p·dH − padT, j·sW + q·dW − padL]`;
/// `db[o] = Σ_n,i,j dy[n, o, i, j]`. Gradients are returned fresh (callers accumulate).
extension Kernels {
    /// Fast twin: im2col + GEMM per image and group (Caffe's formulation), GEMMs on oneDNN's sgemm.
    public static func conv2dBackward(_ g: Conv2DGeometry, input x: [Float], weights w: [Float], dY dy: [Float],
                                      needInput: Bool = true, needWeights: Bool = true)
        throws -> (dX: [Float]?, dW: [Float]?, dB: [Float]) {
        let oh = g.outHeight, ow = g.outWidth, spatial = oh * ow
        let cg = g.inChannels / g.groups, og = g.outChannels / g.groups
        let k = cg * g.kernelH * g.kernelW
        var dx: [Float]? = needInput ? [Float](repeating: 0, count: x.count) : nil
        var dw: [Float]? = needWeights ? [Float](repeating: 0, count: w.count) : nil
        var db = [Float](repeating: 0, count: g.outChannels)
        var cols = [Float](repeating: 0, count: k * spatial)
        var dcols = [Float](repeating: 0, count: k * spatial)
        for n in 0..<g.batch {
            for group in 0..<g.groups {
                let xOffset = (n * g.inChannels + group * cg) * g.height * g.width
                let dyOffset = (n * g.outChannels + group * og) * spatial
                let wOffset = group * og * k
                for o in 0..<og {
                    var sum: Float = 0
                    for s in 0..<spatial { sum += dy[dyOffset + o * spatial + s] }
                    db[group * og + o] += sum
                }
                if needWeights {
                    im2col(g, x, offset: xOffset, channels: cg, into: &cols)
                    // dW_g[og, k] += dY_g[og, spatial] · colsᵀ[spatial, k]
                    try dy.withUnsafeBufferPointer { pdy in
                        try cols.withUnsafeBufferPointer { pc in
                            try dw!.withUnsafeMutableBufferPointer { pw in
                                try gemm(transA: false, transB: true, m: og, n: k, k: spatial, a: pdy.baseAddress! + dyOffset,
                                         b: pc.baseAddress!, beta: 1, c: pw.baseAddress! + wOffset)
                            }
                        }
                    }
                }
                if needInput {
                    // dcols[k, spatial] = W_gᵀ[k, og] · dY_g[og, spatial]
                    try w.withUnsafeBufferPointer { pw in
                        try dy.withUnsafeBufferPointer { pdy in
                            try dcols.withUnsafeMutableBufferPointer { pc in
                                try gemm(transA: true, transB: false, m: k, n: spatial, k: og, a: pw.baseAddress! + wOffset,
                                         b: pdy.baseAddress! + dyOffset, c: pc.baseAddress!)
                            }
                        }
                    }
                    col2im(g, dcols, channels: cg, into: &dx!, offset: xOffset)
                }
            }
        }
        return (dx, dw, db)
    }

    /// Unfolds the input windows of `channels` channels starting at `offset` into `cols` `[channels·KH·KW, OH·OW]`.
    static func im2col(_ g: Conv2DGeometry, _ x: [Float], offset: Int, channels: Int, into cols: inout [Float]) {
        let oh = g.outHeight, ow = g.outWidth
        var row = 0
        for c in 0..<channels {
            let plane = offset + c * g.height * g.width
            for p in 0..<g.kernelH {
                for q in 0..<g.kernelW {
                    let base = row * oh * ow
                    for i in 0..<oh {
                        let h = i * g.strideH + p * g.dilationH - g.padTop
                        for j in 0..<ow {
                            let w = j * g.strideW + q * g.dilationW - g.padLeft
                            cols[base + i * ow + j] = h >= 0 && h < g.height && w >= 0 && w < g.width
                                ? x[plane + h * g.width + w] : 0
                        }
                    }
                    row += 1
                }
            }
        }
    }

    /// Folds `cols` back, adding each window entry into `dx` (the adjoint of `im2col`).
    static func col2im(_ g: Conv2DGeometry, _ cols: [Float], channels: Int, into dx: inout [Float], offset: Int) {
        let oh = g.outHeight, ow = g.outWidth
        var row = 0
        for c in 0..<channels {
            let plane = offset + c * g.height * g.width
            for p in 0..<g.kernelH {
                for q in 0..<g.kernelW {
                    let base = row * oh * ow
                    for i in 0..<oh {
                        let h = i * g.strideH + p * g.dilationH - g.padTop
                        guard h >= 0 && h < g.height else { continue }
                        for j in 0..<ow {
                            let w = j * g.strideW + q * g.dilationW - g.padLeft
                            if w >= 0 && w < g.width { dx[plane + h * g.width + w] += cols[base + i * ow + j] }
                        }
                    }
                    row += 1
                }
            }
        }
    }

    /// Reference twin: the gradient formulas as direct loops, accumulated in Double.
    public static func conv2dBackwardReference(_ g: Conv2DGeometry, input x: [Float], weights w: [Float], dY dy: [Float])
        -> (dX: [Float], dW: [Float], dB: [Float]) {
        let oh = g.outHeight, ow = g.outWidth
        let cg = g.inChannels / g.groups, og = g.outChannels / g.groups
        var dx = [Double](repeating: 0, count: x.count)
        var dw = [Double](repeating: 0, count: w.count)
        var db = [Double](repeating: 0, count: g.outChannels)
        for n in 0..<g.batch {
            for o in 0..<g.outChannels {
                let group = o / og
                for i in 0..<oh {
                    for j in 0..<ow {
                        let d = Double(dy[((n * g.outChannels + o) * oh + i) * ow + j])
                        db[o] += d
                        for c in 0..<cg {
                            let ci = group * cg + c
                            for p in 0..<g.kernelH {
                                let h = i * g.strideH + p * g.dilationH - g.padTop
                                if h < 0 || h >= g.height { continue }
                                for q in 0..<g.kernelW {
                                    let wi = j * g.strideW + q * g.dilationW - g.padLeft
                                    if wi < 0 || wi >= g.width { continue }
                                    let xi = ((n * g.inChannels + ci) * g.height + h) * g.width + wi
                                    let wk = ((o * cg + c) * g.kernelH + p) * g.kernelW + q
                                    dx[xi] += d * Double(w[wk])
                                    dw[wk] += d * Double(x[xi])
                                }
                            }
                        }
                    }
                }
            }
        }
        return (dx.map { Float($0) }, dw.map { Float($0) }, db.map { Float($0) })
    }
}
