// An app selling through Google Play: the Swift library against the real tally-server of
// testkit.py, which verifies purchase tokens with a fake Google on loopback. Mirrors the Kotlin
// suite's GooglePlayTest.
import Foundation
import TallyKit
import XCTest

final class GooglePlayTests: ServerTestCase {
    private func play(_ items: (String, String)...) -> Purchase {
        .google(purchases: items.map { GooglePurchase(productId: $0.0, purchaseToken: $0.1) })
    }

    func testAPlaySubscriptionBoughtWithTheAccountTokenUnlocksProOfflineAndIsAcknowledgedOnce() async throws {
        let sub = "play-\(UUID().uuidString)"
        let p = try kit.device(dir, "pixel")
        let u = try p.signIn(profile: Profile(externalId: sub)).id
        let options = try await kit.options(sub)
        _ = try await p.sync(userId: u, options: options)
        let account = try p.accountToken(userId: u) // what the app passes as the obfuscated account id
        let token = "tok-\(UUID().uuidString)"
        try await kit.putSubscription(token: token, product: "pro_monthly", state: "SUBSCRIPTION_STATE_ACTIVE",
                                      expiresAtMs: nowMs() + 30 * 86_400_000, account: account, order: "GPA.1-0")

        let report = try await p.submitPurchase(userId: u, purchase: play(("pro_monthly", token)), options: options)
        XCTAssertEqual(report.purchases, [PurchaseOutcome(store: "play", productId: "pro_monthly", transactionId: token, status: "active")])
        XCTAssertTrue(report.entitlementsUpdated)
        XCTAssertEqual(try p.entitlements(userId: u).plan, "pro")
        XCTAssertTrue(try p.check(userId: u, feature: "export").allowed, "the signed token applies offline")
        let acknowledged = try await kit.acknowledged()
        XCTAssertEqual(acknowledged.filter { $0.hasSuffix(token) }, ["pro_monthly:\(token)"])

        // The app retries (it was killed before it heard the answer): same outcome, acknowledged once.
        let again = try await p.submitPurchase(userId: u, purchase: play(("pro_monthly", token)), options: options)
        XCTAssertEqual(again.purchases, report.purchases)
        let acknowledgedAgain = try await kit.acknowledged()
        XCTAssertEqual(acknowledgedAgain.filter { $0.hasSuffix(token) }.count, 1)

        // Restoring on a second device of the same account lists the subscription.
        let q = try kit.device(dir, "pixel-2")
        let u2 = try q.signIn(profile: Profile(externalId: sub)).id
        let restored = try await q.restorePurchases(userId: u2, purchase: play(("pro_monthly", token)), options: options)
        XCTAssertEqual(restored.purchases.map(\.status), ["active"])
        XCTAssertEqual(try q.entitlements(userId: u2).plan, "pro")
        let (status, billing) = try await http("GET", "\(kit.serverURL)/v1/billing", bearer: try await kit.idToken(sub))
        XCTAssertEqual(status, 200)
        XCTAssertTrue(String(decoding: billing, as: UTF8.self).contains(#""store":"play""#))
    }

    func testACreditPackIsGrantedOnceAndConsumedAndRefusalsNameTheServersCodeAndChangeNothing() async throws {
        let sub = "play-\(UUID().uuidString)", otherSub = "play-other-\(UUID().uuidString)"
        let p = try kit.device(dir, "pixel-credits")
        let u = try p.signIn(profile: Profile(externalId: sub)).id
        let options = try await kit.options(sub)
        _ = try await p.sync(userId: u, options: options)
        let pack = "pack-\(UUID().uuidString)"
        try await kit.putProduct(product: "credits_100", token: pack, state: 0, account: try p.accountToken(userId: u), order: "GPA.2-0")
        let r = try await p.submitPurchase(userId: u, purchase: play(("credits_100", pack)), options: options)
        XCTAssertEqual(r.purchases.map(\.status), ["credited"])
        XCTAssertEqual(try p.entitlements(userId: u).creditBalance, 100)
        let consumed = try await kit.consumed()
        XCTAssertEqual(consumed.filter { $0.hasSuffix(pack) }, ["credits_100:\(pack)"])
        _ = try await p.submitPurchase(userId: u, purchase: play(("credits_100", pack)), options: options)
        XCTAssertEqual(try p.entitlements(userId: u).creditBalance, 100, "one order grants once")

        // Bound to another account, unknown to Google, an unknown product: refused with the code.
        let o = try kit.device(dir, "pixel-other")
        let uo = try o.signIn(profile: Profile(externalId: otherSub)).id
        let otherOptions = try await kit.options(otherSub)
        _ = try await o.sync(userId: uo, options: otherOptions)
        let before = try o.entitlements(userId: uo)
        let cases: [(Purchase, String)] = [
            (play(("credits_100", pack)), "bound_to_other_user"),
            (play(("pro_monthly", "nobody-knows-\(UUID().uuidString)")), "unknown_purchase_token"),
            (play(("gold_monthly", pack)), "unknown_product"),
        ]
        for (purchase, code) in cases {
            let e = await asyncTallyError { try await o.submitPurchase(userId: uo, purchase: purchase, options: otherOptions) }
            XCTAssertEqual(e?.kind, "PurchaseRefused", code)
            XCTAssertTrue(e?.message.contains(code) == true, "\(code): \(e?.message ?? "")")
            XCTAssertEqual(try o.entitlements(userId: uo), before, "\(code) changed the entitlements")
        }
        let empty = await asyncTallyError { try await o.submitPurchase(userId: uo, purchase: .google(purchases: []), options: otherOptions) }
        XCTAssertEqual(empty?.kind, "InvalidInput")
        let consumedAfter = try await kit.consumed()
        XCTAssertEqual(consumedAfter.filter { $0.hasSuffix(pack) }.count, 1, "nothing refused was consumed again")
    }
}
