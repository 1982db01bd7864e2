// `sync` and the other network calls (async throws) against a real tally-server and its
// PostgreSQL (testkit.py, on the host). Mirrors the Kotlin suite's SyncTest and JavaCallerTest.
import Foundation
import TallyKit
import XCTest

final class SyncTests: ServerTestCase {
    private func device(_ name: String) throws -> Tally {
        try kit.device(dir, name, localOnlySettings: ["theme"])
    }

    func testTwoDevicesSyncThroughARealServerAndConverge() async throws {
        let sub = "swift-\(UUID().uuidString)"
        let a = try device("phone"), b = try device("laptop")
        let ua = try a.signIn(profile: Profile(externalId: sub)).id
        let ub = try b.signIn(profile: Profile(externalId: sub)).id
        _ = try a.consume(userId: ua, feature: "ai_chat", amount: 1, meta: UsageMeta(idempotencyKey: "a-1"))
        _ = try a.consume(userId: ua, feature: "ai_chat", amount: 1, meta: UsageMeta(idempotencyKey: "a-2"))
        try a.setSetting(userId: ua, key: "fontSize", valueJson: "18")
        try a.setSetting(userId: ua, key: "theme", valueJson: #""dark""#) // local-only: never synced

        let r1 = try await a.sync(userId: ua, options: try await kit.options(sub))
        XCTAssertEqual(r1.eventsSent, 2)
        XCTAssertEqual(r1.eventsAcked, 2)
        XCTAssertEqual(r1.duplicates, 0)
        XCTAssertTrue(r1.rejected.isEmpty)
        XCTAssertEqual(r1.settingsSent, 1)
        XCTAssertGreaterThanOrEqual(r1.rounds, 1)
        XCTAssertTrue(r1.entitlementsUpdated, "the device got a signed entitlements token")
        XCTAssertEqual(try a.pendingEvents(userId: ua), 0)
        XCTAssertEqual(try a.eventStatus(userId: ua, id: "a-1"), .settled)
        XCTAssertNotNil(try a.lastSyncedAtMs(userId: ua))

        _ = try b.consume(userId: ub, feature: "ai_chat")
        let r2 = try await b.sync(userId: ub, options: try await kit.options(sub))
        XCTAssertEqual(r2.eventsAcked, 1)
        XCTAssertEqual(r2.settingsReceived, 1)
        XCTAssertEqual(try b.usage(userId: ub, feature: "ai_chat").used, 3, "the server's total includes the other device")
        XCTAssertEqual(try b.setting(userId: ub, key: "fontSize"), "18")
        XCTAssertNil(try b.setting(userId: ub, key: "theme"))

        _ = try await a.sync(userId: ua, options: try await kit.options(sub))
        XCTAssertEqual(try a.usage(userId: ua, feature: "ai_chat").used, 3)
        XCTAssertEqual(try a.check(userId: ua, feature: "ai_chat").reason, .limitReached)

        let again = try await a.sync(userId: ua, options: try await kit.options(sub))
        XCTAssertEqual(again.eventsSent, 0, "nothing left to send")
        XCTAssertEqual(try a.usage(userId: ua, feature: "ai_chat").used, 3)
    }

    func testTwoDevicesSplitOneHardLimitOfflineAndNeverOvershootIt() async throws {
        let sub = "swift-\(UUID().uuidString)"
        let a = try device("lease-a"), b = try device("lease-b")
        let ua = try a.signIn(profile: Profile(externalId: sub)).id
        let ub = try b.signIn(profile: Profile(externalId: sub)).id
        let options = try await kit.options(sub)
        // Both apps mean to chat offline: each claims the pool (a device that never asked for a
        // feature and never used it holds none of its room).
        try a.prepareOffline(userId: ua, feature: "ai_chat", units: 3)
        try b.prepareOffline(userId: ub, feature: "ai_chat", units: 3)
        // Online twice each: the first device gives back (recall) what the second's share needs.
        for _ in 0..<2 {
            _ = try await a.sync(userId: ua, options: options)
            _ = try await b.sync(userId: ub, options: options)
        }
        let held = [try a.usage(userId: ua, feature: "ai_chat").deviceRemaining, try b.usage(userId: ub, feature: "ai_chat").deviceRemaining]
        XCTAssertTrue(held.allSatisfy { ($0 ?? 0) >= 1 }, "both devices hold a slice of the limit of 3: \(held)")
        XCTAssertLessThanOrEqual(held.reduce(0) { $0 + ($1 ?? 0) }, 3, "never more than the limit between them: \(held)")
        let lease = try XCTUnwrap(try a.leases(userId: ua).first { $0.feature == "ai_chat" })
        XCTAssertEqual(lease.remaining, held[0])
        XCTAssertGreaterThan(try XCTUnwrap(lease.leaseUntilMs), nowMs())

        // Offline: each spends its slice; then the lease, not the account, says no.
        var spent: Int64 = 0
        for (t, u) in [(a, ua), (b, ub)] {
            while true {
                let d = try t.consume(userId: u, feature: "ai_chat")
                if !d.allowed {
                    XCTAssertEqual(d.reason, .leaseExhausted, "the account still has room: \(d)")
                    XCTAssertEqual(d.deviceRemaining, 0)
                    break
                }
                spent += 1
            }
        }
        XCTAssertLessThanOrEqual(spent, 3)

        // Back online: counted once; a void gives the unit back.
        _ = try a.consume(userId: ua, feature: "notes", amount: 1, meta: UsageMeta(idempotencyKey: "to-void"))
        try a.void(userId: ua, eventId: "to-void", reason: "test")
        try a.void(userId: ua, eventId: "to-void", reason: "test") // twice: nothing more
        XCTAssertNotNil(tallyError { try a.void(userId: ua, eventId: "no-such-use") })
        _ = try await a.sync(userId: ua, options: options)
        _ = try await b.sync(userId: ub, options: options)
        _ = try await a.sync(userId: ua, options: options)
        XCTAssertEqual(try a.usage(userId: ua, feature: "ai_chat").used, spent, "every use counted once")
        XCTAssertEqual(try a.usage(userId: ua, feature: "notes").used, 0, "the voided use stopped counting")

        // Before a flight: ask for more; the room the other device does not hold is granted.
        XCTAssertNotNil(tallyError { try a.prepareOffline(userId: ua, feature: "ai_chat", units: 0) })
        try a.prepareOffline(userId: ua, feature: "ai_chat", units: 3)
        _ = try await a.sync(userId: ua, options: options)
        let other = try b.usage(userId: ub, feature: "ai_chat").deviceRemaining ?? 0
        XCTAssertEqual(try a.usage(userId: ua, feature: "ai_chat").deviceRemaining, 3 - spent - other)

        // Signing out: every slice goes back in a final sync, and the other device can use it.
        _ = try await a.releaseLeases(userId: ua, options: options)
        try b.prepareOffline(userId: ub, feature: "ai_chat", units: 3)
        _ = try await b.sync(userId: ub, options: options)
        XCTAssertEqual(try b.usage(userId: ub, feature: "ai_chat").deviceRemaining, 3 - spent)
    }

    func testPurchasesAreAsyncCallsBoundToTheAccountTokenAndARefusalNamesTheServersCode() async throws {
        let sub = "swift-\(UUID().uuidString)"
        let p = try device("store-phone")
        let u = try p.signIn(profile: Profile(externalId: sub)).id
        XCTAssertEqual(tallyError { try p.accountToken(userId: u) }?.kind, "InvalidInput", "no account token before the first sync")
        let options = try await kit.options(sub)
        _ = try await p.sync(userId: u, options: options)
        let account = try p.accountToken(userId: u)
        let (status, me) = try await http("GET", "\(kit.serverURL)/v1/me", bearer: try await kit.idToken(sub))
        XCTAssertEqual(status, 200)
        XCTAssertTrue(String(decoding: me, as: UTF8.self).contains(#""id":"\#(account)""#), "the account token is the server's user id")

        // This server sells nothing on the App Store: refused with its code, nothing changes.
        let before = try p.entitlements(userId: u)
        let refused = await asyncTallyError {
            try await p.submitPurchase(userId: u, purchase: .apple(signedTransactions: ["eyJhbGciOiJFUzI1NiJ9.e30.c2ln"]), options: options)
        }
        XCTAssertEqual(refused?.kind, "PurchaseRefused")
        XCTAssertTrue(refused?.message.contains("store_unconfigured") == true, refused?.message ?? "")
        XCTAssertEqual(try p.entitlements(userId: u), before)
        XCTAssertEqual(try p.accountToken(userId: u), account)
        let empty = await asyncTallyError { try await p.submitPurchase(userId: u, purchase: .apple(signedTransactions: []), options: options) }
        XCTAssertEqual(empty?.kind, "InvalidInput")

        // Restoring with no transaction asks the server for a freshly signed token.
        let restored = try await p.restorePurchases(userId: u, purchase: .apple(signedTransactions: []), options: options)
        XCTAssertTrue(restored.entitlementsUpdated)
        XCTAssertTrue(restored.purchases.isEmpty)
    }

    func testTheChangesStreamReportsASync() async throws {
        let sub = "swift-\(UUID().uuidString)"
        let t = try device("tablet")
        let u = try t.signIn(profile: Profile(externalId: sub)).id
        _ = try t.consume(userId: u, feature: "notes", amount: 3)
        let changes = try t.changes(userId: u)
        _ = try await t.sync(userId: u, options: try await kit.options(sub))
        let change = try await first(changes) { $0.change.usage }
        XCTAssertEqual(change.userId, u)
        XCTAssertEqual(change.info?.pendingEvents, 0, "the state after the sync")
        XCTAssertNotNil(change.info?.lastSyncedAtMs)
    }

    func testAutoSyncUploadsAfterAChangeReportsItsStatusAsAStreamAndStopsOnUnauthorized() async throws {
        let sub = "swift-\(UUID().uuidString)"
        let p = try device("auto-phone")
        let u = try p.logIn(externalId: sub).id
        let auto = try p.startAutoSync(options: AutoSyncOptions(sync: try await kit.options(sub), intervalMs: 600_000, debounceMs: 50))
        // The first round runs at once.
        let firstRound = try await first(auto.statusUpdates(), within: 60) { $0.lastSyncedAtMs != nil && !$0.uploading }
        XCTAssertTrue(firstRound.running)
        XCTAssertEqual(firstRound.userId, u)
        XCTAssertNil(firstRound.lastError)
        // A change goes out after the debounce, not after the ten-minute interval.
        _ = try p.consume(userId: u, feature: "notes", amount: 1)
        let synced = try XCTUnwrap(firstRound.lastSyncedAtMs)
        let after = try await first(auto.statusUpdates(), within: 60) {
            !$0.uploading && $0.pending == 0 && ($0.lastSyncedAtMs ?? 0) > synced
        }
        XCTAssertEqual(after.consecutiveFailures, 0)
        XCTAssertEqual(try p.pendingEvents(userId: u), 0)
        auto.stop()
        let stoppedByApp = try await first(auto.statusUpdates(), within: 60) { !$0.running }
        XCTAssertNil(stoppedByApp.lastErrorKind, "stopped by the app, not by an error")

        // The server counted it: another device of the account sees the use.
        let l = try device("auto-laptop")
        let lu = try l.signIn(profile: Profile(externalId: sub)).id
        _ = try await l.sync(userId: lu, options: try await kit.options(sub))
        XCTAssertEqual(try l.usage(userId: lu, feature: "notes").used, 1)

        // A token the server refuses stops the helper, which says why.
        let refused = SyncOptions(serverUrl: kit.serverURL, token: try await kit.idToken(sub, secret: "not-the-secret"))
        let failing = try p.startAutoSync(options: AutoSyncOptions(sync: refused, intervalMs: 600_000))
        let stopped = try await first(failing.statusUpdates(), within: 60) { !$0.running }
        XCTAssertEqual(stopped.lastErrorKind, "Unauthorized")
        XCTAssertEqual(stopped.consecutiveFailures, 1)
    }

    func testSyncErrorsArriveAsTallyErrorCasesAndKeepTheEvents() async throws {
        let sub = "swift-\(UUID().uuidString)"
        let w = try device("watch")
        let u = try w.signIn(profile: Profile(externalId: sub)).id
        _ = try w.consume(userId: u, feature: "notes")
        let badToken = try await kit.idToken(sub, secret: "not-the-secret")
        let unauthorized = await asyncTallyError { try await w.sync(userId: u, options: SyncOptions(serverUrl: kit.serverURL, token: badToken)) }
        XCTAssertEqual(unauthorized?.kind, "Unauthorized")
        let token = try await kit.idToken(sub)
        let unreachable = await asyncTallyError {
            try await w.sync(userId: u, options: SyncOptions(serverUrl: "http://127.0.0.1:9", token: token, maxAttempts: 1, timeoutMs: 2000))
        }
        XCTAssertEqual(unreachable?.kind, "Network")
        XCTAssertEqual(try w.pendingEvents(userId: u), 1, "a failed sync loses nothing")
        let retried = try await w.sync(userId: u, options: try await kit.options(sub))
        XCTAssertEqual(retried.eventsAcked, 1)
        XCTAssertEqual(try w.pendingEvents(userId: u), 0)
    }

    func testSyncsFromConcurrentTasksWithoutBlockingAndBothDevicesConverge() async throws {
        let sub = "swift-\(UUID().uuidString)"
        let a = try device("task-a"), b = try device("task-b")
        let ua = try a.signIn(profile: Profile(externalId: sub)).id
        let ub = try b.signIn(profile: Profile(externalId: sub)).id
        _ = try a.consume(userId: ua, feature: "notes", amount: 2)
        _ = try b.consume(userId: ub, feature: "notes", amount: 5)
        let options = try await kit.options(sub)
        // `Tally` is Sendable: both devices sync at once from child tasks.
        let acked = try await withThrowingTaskGroup(of: Int64.self) { group in
            group.addTask { try await a.sync(userId: ua, options: options).eventsAcked }
            group.addTask { try await b.sync(userId: ub, options: options).eventsAcked }
            return try await group.reduce(0, +)
        }
        XCTAssertEqual(acked, 2)
        _ = try await a.sync(userId: ua, options: options)
        XCTAssertEqual(try a.usage(userId: ua, feature: "notes").used, 7)
        XCTAssertEqual(try a.customerInfo(userId: ua).pendingEvents, 0)
    }
}
