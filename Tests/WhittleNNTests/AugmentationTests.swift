import Testing
import WhittleNN
import WhittleONNX

/// The training augmentations: hand-checked symmetries of small images.
@Suite struct AugmentationTests {
    static func transformed(_ values: [Float], channels: Int, height: Int, width: Int, symmetry: Int) -> [Float] {
        var out: [Float] = []
        Augmentation.append(values[...], channels: channels, height: height, width: width, symmetry: symmetry, to: &out)
        return out
    }

    @Test func theSymmetriesOfATwoByTwoImage() {
        // [0 1; 2 3], one channel.
        let image: [Float] = [0, 1, 2, 3]
        let expected: [Int: [Float]] = [
            0: [0, 1, 2, 3],  // identity
            1: [1, 0, 3, 2],  // columns flipped
            2: [2, 3, 0, 1],  // rows flipped
            3: [3, 2, 1, 0],  // both: 180°
            4: [0, 2, 1, 3],  // transpose
            5: [2, 0, 3, 1],  // transpose, columns flipped: 90° clockwise
            6: [1, 3, 0, 2],  // transpose, rows flipped: 90° counter-clockwise
            7: [3, 1, 2, 0],  // anti-transpose
        ]
        for (k, want) in expected { #expect(Self.transformed(image, channels: 1, height: 2, width: 2, symmetry: k) == want, "symmetry \(k)") }
    }

    @Test func everySymmetryPermutesEachChannelAndAllEightDiffer() {
        let (c, h) = (2, 3)
        let image = (0..<(c * h * h)).map(Float.init)
        var seen = Set<[Float]>()
        for k in 0..<8 {
            let out = Self.transformed(image, channels: c, height: h, width: h, symmetry: k)
            for channel in 0..<c {
                let plane = out[(channel * h * h)..<((channel + 1) * h * h)]
                #expect(plane.sorted() == Array(image[(channel * h * h)..<((channel + 1) * h * h)]))
            }
            seen.insert(out)
        }
        #expect(seen.count == 8)
        // Flips alone on a non-square image: the first four.
        let wide = (0..<6).map(Float.init)  // [0 1 2; 3 4 5]
        #expect(Self.transformed(wide, channels: 1, height: 2, width: 3, symmetry: 1) == [2, 1, 0, 5, 4, 3])
        #expect(Self.transformed(wide, channels: 1, height: 2, width: 3, symmetry: 2) == [3, 4, 5, 0, 1, 2])
    }

    @Test func shapesTheTransformsCannotTakeAreRefused() throws {
        try Augmentation.dihedral.check([4, 3, 8, 8])
        try Augmentation.flips.check([4, 3, 8, 6])
        try Augmentation.none.check([4, 10])
        #expect { try Augmentation.dihedral.check([4, 3, 8, 6]) } throws: { "\($0)".contains("square images") }
        #expect { try Augmentation.flips.check([4, 10]) } throws: { "\($0)".contains("N×C×H×W") }
    }
}
