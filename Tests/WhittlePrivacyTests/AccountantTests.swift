import Foundation
import Testing
import WhittlePrivacy

/// ε agrees with dp_accounting's to this relative error (both minimise the same formula over the same orders).
let accountingTolerance = 1e-9

/// The accountant against Google's dp_accounting (Tests/Fixtures/privacy/accounting.json, made by
/// scripts/make_privacy_fixture.py), and the rounding sensitivity on a hand-computed case.
@Suite struct AccountantTests {
    struct Fixture: Decodable {
        struct Gaussian: Decodable { var noise_multiplier: Double; var steps: Int; var delta: Double; var epsilon: Double; var order: Double }
        struct DDG: Decodable {
            var sigma: Double; var workers: Int; var l1: Double; var l2: Double; var dimension: Int; var steps: Int
            var delta: Double; var epsilon: Double; var order: Double
        }
        struct ZCDP: Decodable { var rho: Double; var delta: Double; var epsilon: Double; var order: Double }
        var orders: [Double]
        var gaussian: [Gaussian]
        var ddg: [DDG]
        var zcdp: [ZCDP]
    }

    static let fixture: Fixture = {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/privacy/accounting.json")
        return try! JSONDecoder().decode(Fixture.self, from: Data(contentsOf: url))
    }()

    static func close(_ a: Double, _ b: Double) -> Bool { abs(a - b) <= accountingTolerance * max(abs(b), 1) }

    @Test func theDefaultOrdersAreDpAccountings() {
        #expect(PrivacyAccountant.defaultOrders == Self.fixture.orders)
    }

    @Test func gaussianCompositionMatchesDpAccounting() throws {
        let orders = PrivacyAccountant.defaultOrders
        for c in Self.fixture.gaussian {
            let rdp = orders.map { Double(c.steps) * PrivacyAccountant.gaussian(noiseMultiplier: c.noise_multiplier, order: $0) }
            let (eps, order) = try PrivacyAccountant.epsilon(rdp: rdp, orders: orders, delta: c.delta)
            #expect(Self.close(eps, c.epsilon), "z \(c.noise_multiplier), \(c.steps) steps, δ \(c.delta): \(eps) against \(c.epsilon)")
            #expect(order == c.order)
        }
    }

    @Test func distributedDiscreteGaussianMatchesDpAccountingsConversion() throws {
        let orders = PrivacyAccountant.defaultOrders
        for c in Self.fixture.ddg {
            let rdp = orders.map {
                Double(c.steps) * PrivacyAccountant.distributedDiscreteGaussian(order: $0, sigma: c.sigma, workers: c.workers, l1: c.l1,
                                                                                l2: c.l2, dimension: c.dimension)
            }
            let (eps, order) = try PrivacyAccountant.epsilon(rdp: rdp, orders: orders, delta: c.delta)
            #expect(Self.close(eps, c.epsilon), "σ \(c.sigma), n \(c.workers), \(c.steps) steps: \(eps) against \(c.epsilon)")
            #expect(order == c.order)
        }
    }

    @Test func zcdpConvertsAsDpAccountingDoes() throws {
        let orders = PrivacyAccountant.defaultOrders
        for c in Self.fixture.zcdp {
            let (eps, _) = try PrivacyAccountant.epsilon(rdp: orders.map { c.rho * $0 }, orders: orders, delta: c.delta)
            #expect(Self.close(eps, c.epsilon))
        }
    }

    @Test func roundingSensitivityIsTheHandComputedBound() {
        // c = 3, d = 16, β = e^−½: c² + d/4 + √(2·½)·(c + √d/2) = 9 + 4 + 1·(3 + 2) = 18 against (3 + 4)² = 49.
        let (l2, l1) = PrivacyAccountant.roundedSensitivity(clip: 3, dimension: 16, beta: exp(-0.5))
        #expect(abs(l2 * l2 - 18) < 1e-12)
        #expect(abs(l1 - l2 * min(4, l2)) < 1e-12)
        // Without the β bound: (c + √d)².
        #expect(abs(PrivacyAccountant.roundedSensitivity(clip: 3, dimension: 16, beta: 0).l2 - 7) < 1e-12)
    }

    @Test func badInputsAreRefused() {
        #expect(throws: PrivacyError.self) { try PrivacyAccountant.epsilon(rdp: [1], orders: [2, 3], delta: 1e-5) }
        #expect(throws: PrivacyError.self) { try PrivacyAccountant.epsilon(rdp: [1], orders: [2], delta: 0) }
        #expect(throws: PrivacyError.self) { try PrivacyAccountant.epsilon(rdp: [-1], orders: [2], delta: 1e-5) }
    }
}
