// The local API on one device: mirrors the Kotlin suite's TallyTest.
import Foundation
import TallyKit
import XCTest

final class TallyTests: XCTestCase {
    private var dir: URL!
    private var tally: Tally!
    private let clock = TestClock("2025-03-10T12:00:00Z")

    private func open() throws -> Tally {
        try Tally.open(
            path: dir.appendingPathComponent("tally.db").path,
            config: TallyConfig(
                deviceId: "device-a",
                defaultSettingsJson: #"{"theme": "light", "fontSize": 12}"#,
                localOnlySettings: ["theme"],
                catalogJson: catalog,
                clock: clock
            )
        )
    }

    override func setUpWithError() throws {
        dir = try temporaryDirectory()
        tally = try open()
    }

    override func tearDownWithError() throws {
        tally = nil
        try FileManager.default.removeItem(at: dir)
    }

    func testOpensAFileDatabaseAndKeepsDataAcrossReopen() throws {
        let user = try tally.createLocalUser(displayName: "Ada")
        XCTAssertEqual(user.displayName, "Ada")
        XCTAssertEqual(user.timezone, "UTC")
        XCTAssertEqual(user.createdAtMs, clock.nowMs())
        XCTAssertEqual(try tally.deviceId(), "device-a")
        _ = try tally.consume(userId: user.id, feature: "ai_chat")
        tally = nil

        tally = try open()
        XCTAssertEqual(try tally.users().map(\.id), [user.id])
        XCTAssertEqual(try tally.usage(userId: user.id, feature: "ai_chat").used, 1)
        XCTAssertEqual(try tally.pendingEvents(userId: user.id), 1)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir.appendingPathComponent("tally.db").path))
    }

    func testCreatesUsersAndSignsInAttachingTheLocalLedger() throws {
        let local = try tally.createLocalUser()
        XCTAssertNil(local.externalId)
        XCTAssertFalse(local.signedIn)
        _ = try tally.consume(userId: local.id, feature: "ai_chat", amount: 2)

        let signed = try tally.signIn(profile: Profile(externalId: "auth0|ada", email: "ada@example.com", displayName: "Ada"), attachLocal: local.id)
        XCTAssertEqual(signed.externalId, "auth0|ada")
        XCTAssertTrue(signed.signedIn)
        XCTAssertEqual(try tally.users().map(\.id), [signed.id])
        XCTAssertEqual(try tally.usage(userId: signed.id, feature: "ai_chat").used, 2)
        XCTAssertEqual(try tally.pendingEvents(userId: signed.id), 1, "one event of amount 2")
        XCTAssertEqual(try tally.signIn(profile: Profile(externalId: "auth0|ada")).id, signed.id, "the same subject finds the same account")

        try tally.signOut(userId: signed.id)
        XCTAssertFalse(try tally.user(userId: signed.id).signedIn)
        XCTAssertEqual(try tally.pendingEvents(userId: signed.id), 1, "sign-out keeps unsynced events")

        let updated = try tally.updateUser(userId: signed.id, update: UserUpdate(displayName: "Ada L.", timezone: "Europe/Paris"))
        XCTAssertEqual(updated.timezone, "Europe/Paris")
        XCTAssertEqual(updated.displayName, "Ada L.")

        let unsynced = tallyError { try tally.deleteUser(userId: signed.id) }
        XCTAssertEqual(unsynced?.kind, "UnsyncedEvents")
        XCTAssertTrue(unsynced?.message.contains("1 unsynced") == true, unsynced?.message ?? "")
        try tally.deleteUser(userId: signed.id, force: true)
        XCTAssertEqual(tallyError { try tally.user(userId: signed.id) }?.kind, "NotFound")
    }

    func testSettingsRoundTripAsJSONStrings() throws {
        let u = try tally.createLocalUser().id
        XCTAssertEqual(try tally.setting(userId: u, key: "theme"), #""light""#, "defaults apply")
        try tally.setSetting(userId: u, key: "theme", valueJson: #""dark""#)
        try tally.setSetting(userId: u, key: "layout", valueJson: #"{"columns": 2, "compact": true}"#)
        XCTAssertEqual(try tally.setting(userId: u, key: "theme"), #""dark""#)
        XCTAssertEqual(try tally.setting(userId: u, key: "layout"), #"{"columns":2,"compact":true}"#)

        try tally.patchSettings(userId: u, changesJson: #"{"fontSize": 14, "layout": null}"#)
        XCTAssertNil(try tally.setting(userId: u, key: "layout"))
        XCTAssertEqual(try tally.setting(userId: u, key: "fontSize"), "14")
        XCTAssertEqual(try tally.settings(userId: u), #"{"fontSize":14,"theme":"dark"}"#)

        try tally.removeSetting(userId: u, key: "theme")
        XCTAssertEqual(try tally.setting(userId: u, key: "theme"), #""light""#, "a deleted setting falls back to its default")

        XCTAssertEqual(try tally.settingStatus(userId: u, key: "never"), .notSet)
        XCTAssertEqual(try tally.settingStatus(userId: u, key: "fontSize"), .pending, "written, not yet synced")
        XCTAssertEqual(try tally.settingStatus(userId: u, key: "theme"), .localOnly)
        XCTAssertEqual(tallyError { try tally.settingStatus(userId: u, key: "") }?.kind, "InvalidInput")

        try tally.replaceSettings(userId: u, valuesJson: #"{"a": [1, 2, 3]}"#)
        XCTAssertEqual(try tally.setting(userId: u, key: "a"), "[1,2,3]")
        XCTAssertEqual(try tally.settings(userId: u), #"{"a":[1,2,3],"fontSize":12,"theme":"light"}"#, "replace deletes the keys it does not name")
    }

    func testConsumeUntilLimitReached() throws {
        let u = try tally.createLocalUser().id
        for i in Int64(1)...3 {
            let d = try tally.consume(userId: u, feature: "ai_chat")
            XCTAssertTrue(d.allowed)
            XCTAssertEqual(d.reason, .ok)
            XCTAssertEqual(d.used, i)
            XCTAssertEqual(d.limit, 3)
            XCTAssertEqual(d.remaining, 3 - i)
            XCTAssertEqual(d.accessReason, "free")
            XCTAssertEqual(d.resetsAtMs, ms("2025-04-01T00:00:00Z"))
        }
        let denied = try tally.consume(userId: u, feature: "ai_chat")
        XCTAssertFalse(denied.allowed)
        XCTAssertEqual(denied.reason, .limitReached)
        XCTAssertEqual(denied.remaining, 0)
        XCTAssertEqual(try tally.pendingEvents(userId: u), 3, "a denied consume records nothing")
        XCTAssertEqual(try tally.check(userId: u, feature: "ai_chat").reason, .limitReached)

        let usage = try tally.usage(userId: u, feature: "ai_chat")
        XCTAssertEqual(usage.used, 3)
        XCTAssertEqual(usage.period, .month)
        XCTAssertEqual(usage.periodStartMs, ms("2025-03-01T00:00:00Z"))

        XCTAssertEqual(try tally.check(userId: u, feature: "export").reason, .notInPlan)
        XCTAssertEqual(try tally.check(userId: u, feature: "teleport").reason, .unknownFeature)

        // The Swift clock drives the windows: next month, the counter starts over.
        clock.set("2025-04-02T08:00:00Z")
        XCTAssertTrue(try tally.consume(userId: u, feature: "ai_chat").allowed)
        XCTAssertEqual(try tally.usage(userId: u, feature: "ai_chat").used, 1)
    }

    func testEntitlementsSetLocallyChangeTheLimits() throws {
        let u = try tally.createLocalUser().id
        XCTAssertEqual(try tally.entitlements(userId: u).plan, "free")
        try tally.setEntitlements(userId: u, state: Entitlements(plan: "pro", status: .active))
        let e = try tally.entitlements(userId: u)
        XCTAssertEqual(e.plan, "pro")
        XCTAssertEqual(e.accessReason, "subscription")
        XCTAssertEqual(e.features["export"], .flag(enabled: true))
        XCTAssertEqual(e.features["ai_chat"], .metered(limit: 100, period: .month, enforcement: .hard, offlineShare: 1.0))
        XCTAssertTrue(try tally.check(userId: u, feature: "export").allowed)
        XCTAssertEqual(try tally.check(userId: u, feature: "ai_chat").limit, 100)

        XCTAssertEqual(tallyError { try tally.setEntitlements(userId: u, state: Entitlements(plan: "platinum", status: .active)) }?.kind, "InvalidInput")
        XCTAssertEqual(try tally.entitlements(userId: u).plan, "pro", "a rejected state changes nothing")
    }

    func testIdempotentReplayCountsOnce() throws {
        let u = try tally.createLocalUser().id
        let meta = UsageMeta(idempotencyKey: "request-42")
        XCTAssertTrue(try tally.consume(userId: u, feature: "ai_chat", amount: 1, meta: meta).allowed)
        XCTAssertTrue(try tally.consume(userId: u, feature: "ai_chat", amount: 1, meta: meta).allowed)
        XCTAssertEqual(try tally.usage(userId: u, feature: "ai_chat").used, 1)
        XCTAssertEqual(try tally.pendingEvents(userId: u), 1)
        XCTAssertEqual(try tally.eventStatus(userId: u, id: "request-42"), .pending)
        XCTAssertEqual(eventIdForKey(key: "request-42"), eventIdForKey(key: "request-42"))
        XCTAssertNotEqual(eventIdForKey(key: "request-42"), eventIdForKey(key: "request-43"))

        XCTAssertEqual(tallyError { try tally.consume(userId: u, feature: "ai_chat", amount: 2, meta: meta) }?.kind, "IdempotencyConflict")
        XCTAssertEqual(try tally.usage(userId: u, feature: "ai_chat").used, 1)

        let many = try tally.consumeMany(userId: u, items: [
            ConsumeItem(feature: "notes", amount: 5),
            ConsumeItem(feature: "ai_chat", amount: 1, meta: UsageMeta(idempotencyKey: "request-43")),
        ])
        XCTAssertEqual(many.count, 2)
        XCTAssertTrue(many.allSatisfy(\.allowed))
        XCTAssertEqual(try tally.usage(userId: u, feature: "ai_chat").used, 2)
        XCTAssertEqual(try tally.usage(userId: u, feature: "notes").used, 5)
    }

    func testOneUseWithSeveralMetersIsRecordedAllOrNone() throws {
        let u = try tally.createLocalUser().id
        _ = try tally.consume(userId: u, feature: "ai_chat", amount: 2)
        // The call limit has 1 left: a use asking 2 calls records neither of its items.
        let denied = try tally.consumeItems(userId: u, items: [UseItem(feature: "notes", amount: 5), UseItem(feature: "ai_chat", amount: 2)], id: "call-1")
        XCTAssertFalse(denied.allowed)
        XCTAssertEqual(denied.decisions.map(\.reason), [.ok, .limitReached])
        XCTAssertEqual(try tally.usage(userId: u, feature: "notes").used, 0)
        XCTAssertEqual(try tally.pendingEvents(userId: u), 1)

        let items = [UseItem(feature: "notes", amount: 5), UseItem(feature: "ai_chat", amount: 1)]
        let use = try tally.consumeItems(userId: u, items: items, id: "call-2", metadataJson: #"{"request": 2}"#)
        XCTAssertTrue(use.allowed)
        XCTAssertFalse(use.duplicate)
        XCTAssertEqual(use.useId, eventIdForKey(key: "call-2"))
        XCTAssertEqual(use.decisions.map(\.used), [5, 3])
        let again = try tally.consumeItems(userId: u, items: items, id: "call-2", metadataJson: #"{"request": 2}"#)
        XCTAssertTrue(again.duplicate)
        XCTAssertEqual(again.decisions, use.decisions)
        XCTAssertEqual(tallyError { try tally.consumeItems(userId: u, items: [UseItem(feature: "notes", amount: 5)], id: "call-2") }?.kind, "IdempotencyConflict")
        XCTAssertEqual(tallyError { try tally.consumeItems(userId: u, items: [UseItem(feature: "notes", amount: 1), UseItem(feature: "notes", amount: 1)]) }?.kind, "InvalidInput")
        XCTAssertEqual(try tally.pendingEvents(userId: u), 3, "one earlier use and two items")

        // A void of the use id cancels every item.
        try tally.void(userId: u, eventId: use.useId, reason: "refund")
        XCTAssertEqual(try tally.usage(userId: u, feature: "notes").used, 0)
        XCTAssertEqual(try tally.usage(userId: u, feature: "ai_chat").used, 2)
        XCTAssertEqual(try tally.pendingEvents(userId: u), 4, "and one void event")
    }

    func testBadInputIsATallyErrorOfTheRightCaseAndChangesNothing() throws {
        let u = try tally.createLocalUser(displayName: "Ada").id
        try tally.setSetting(userId: u, key: "theme", valueJson: #""dark""#)

        let malformed = tallyError { try tally.setSetting(userId: u, key: "theme", valueJson: "{not json") }
        XCTAssertEqual(malformed?.kind, "InvalidInput")
        XCTAssertTrue(malformed?.message.contains("not valid JSON") == true, malformed?.message ?? "")
        XCTAssertEqual(tallyError { try tally.patchSettings(userId: u, changesJson: "[1, 2]") }?.kind, "InvalidInput")
        XCTAssertEqual(try tally.setting(userId: u, key: "theme"), #""dark""#)

        XCTAssertEqual(tallyError { try tally.consume(userId: "no-such-user", feature: "ai_chat") }?.kind, "NotFound")
        XCTAssertEqual(tallyError { try tally.settings(userId: "no-such-user") }?.kind, "NotFound")

        let tz = tallyError { try tally.updateUser(userId: u, update: UserUpdate(timezone: "Mars/Olympus_Mons")) }
        XCTAssertEqual(tz?.kind, "InvalidInput")
        XCTAssertTrue(tz?.message.contains("timezone") == true, tz?.message ?? "")
        XCTAssertEqual(try tally.user(userId: u).timezone, "UTC")

        XCTAssertEqual(tallyError { try tally.consume(userId: u, feature: "ai_chat", amount: -1) }?.kind, "InvalidInput")
        XCTAssertEqual(tallyError { try tally.consume(userId: u, feature: "ai_chat", amount: 0) }?.kind, "InvalidInput")
        XCTAssertEqual(tallyError { try tally.consume(userId: u, feature: "ai_chat", amount: 1, meta: UsageMeta(metadataJson: "{oops")) }?.kind, "InvalidInput")
        XCTAssertEqual(try tally.pendingEvents(userId: u), 0, "nothing was recorded")

        let bad = tallyError {
            try tally.setCatalog(catalogJson: #"{"plans": [{"id": "free", "features": {"api": {"type": "rate", "limit": -1, "window_secs": 60}}}]}"#)
        }
        XCTAssertEqual(bad?.kind, "InvalidCatalog")
        XCTAssertTrue(bad?.message.contains("plans[0].features.api.limit") == true, bad?.message ?? "")
        XCTAssertEqual(try tally.check(userId: u, feature: "ai_chat").limit, 3, "the old catalog is still in use")

        XCTAssertEqual(tallyError { try tally.report(userId: u, fromMs: 10, toMs: 5, groupBy: .day) }?.kind, "InvalidInput")
        XCTAssertEqual(tallyError { try Tally.openInMemory(config: TallyConfig(defaultSettingsJson: "42")) }?.kind, "InvalidInput")
        // Every case is a Swift Error: one catch handles them all, and it describes itself.
        do {
            _ = try tally.user(userId: "nobody")
            XCTFail("no error")
        } catch {
            XCTAssertTrue(error is TallyError)
            XCTAssertTrue(error.localizedDescription.contains("NotFound"), error.localizedDescription)
        }
    }

    func testReportRowsGroupByFeatureModelAndDay() throws {
        let u = try tally.createLocalUser().id
        _ = try tally.consume(userId: u, feature: "ai_chat", amount: 1, meta: UsageMeta(model: "gpt-4o", inputTokens: 1000, outputTokens: 500))
        _ = try tally.consume(userId: u, feature: "notes", amount: 4)
        clock.set("2025-03-11T09:00:00Z")
        _ = try tally.consume(userId: u, feature: "notes", amount: 1, meta: UsageMeta(metadataJson: #"{"source": "widget"}"#))

        let from = ms("2025-03-01T00:00:00Z"), to = ms("2025-04-01T00:00:00Z")
        XCTAssertEqual(try tally.report(userId: u, fromMs: from, toMs: to, groupBy: .feature), [
            ReportRow(key: "ai_chat", events: 1, amount: 1, inputTokens: 1000, outputTokens: 500, costMicros: 7500),
            ReportRow(key: "notes", events: 2, amount: 5, inputTokens: 0, outputTokens: 0, costMicros: 0),
        ])
        XCTAssertEqual(try tally.report(userId: u, fromMs: from, toMs: to, groupBy: .model).map(\.key), ["", "gpt-4o"])
        let byDay = try tally.report(userId: u, fromMs: from, toMs: to, groupBy: .day)
        XCTAssertEqual(byDay.map(\.key), ["2025-03-10", "2025-03-11"])
        XCTAssertEqual(byDay.map(\.events), [2, 1])
    }

    func testTheChangesStreamEmitsAfterAConsume() async throws {
        let tally = try XCTUnwrap(self.tally)
        let u = try tally.createLocalUser().id
        let other = try tally.createLocalUser().id
        let mine = try tally.changes(userId: u)
        XCTAssertEqual(try tally.observerCount(), 1, "the stream observes from the moment it exists")
        _ = try tally.consume(userId: other, feature: "ai_chat") // another user's change is filtered out
        _ = try tally.consume(userId: u, feature: "ai_chat")
        let change = try await first(mine)
        XCTAssertEqual(change.userId, u)
        XCTAssertTrue(change.change.usage)
        XCTAssertEqual(change.info?.features["ai_chat"]?.usage.used, 1)

        // A settings write is reported as such, to every stream.
        let all = try tally.changes()
        let again = try tally.changes(userId: u)
        try tally.setSetting(userId: u, key: "fontSize", valueJson: "16")
        let a = try await first(all) { $0.change.settings }
        let b = try await first(again) { $0.change.settings }
        XCTAssertEqual(a.userId, u)
        XCTAssertEqual(b.userId, u)
        XCTAssertFalse(b.change.usage)
    }

    func testConcurrentConsumesFromSeveralTasksCountExactly() async throws {
        let tally = try XCTUnwrap(self.tally)
        let u = try tally.createLocalUser().id
        try tally.setEntitlements(userId: u, state: Entitlements(plan: "pro", status: .active))
        let decisions = try await withThrowingTaskGroup(of: Decision.self) { group in
            for i in 1...80 {
                group.addTask { try tally.consume(userId: u, feature: "ai_chat", amount: 1, meta: UsageMeta(idempotencyKey: "k-\(i % 40)")) }
            }
            var all: [Decision] = []
            for try await d in group { all.append(d) }
            return all
        }
        XCTAssertEqual(decisions.count, 80)
        XCTAssertTrue(decisions.allSatisfy(\.allowed))
        XCTAssertEqual(try tally.usage(userId: u, feature: "ai_chat").used, 40, "40 distinct keys, each counted once")
    }

    func testInMemoryInstancesAndMiscAccessors() throws {
        let mem = try Tally.openInMemory(config: TallyConfig(catalogJson: catalog))
        let u = try mem.createLocalUser().id
        XCTAssertEqual(try mem.creditBalance(userId: u), 0)
        XCTAssertNil(try mem.lastSyncedAtMs(userId: u))
        XCTAssertGreaterThan(try mem.highestSeenTimeMs(), 0)
        XCTAssertTrue(try mem.catalogJson().contains("ai_chat"))
        XCTAssertNoThrow(try validateCatalog(catalogJson: catalog))
        XCTAssertEqual(tallyError { try validateCatalog(catalogJson: #"{"plans": [{"id": "x", "features": {"f": {"type": "nope"}}}]}"#) }?.kind, "InvalidCatalog")
        XCTAssertEqual(try mem.users().count, 1)
    }

    func testTwoTallyObjectsOnOneFileSeeEachOthersWrites() throws {
        let second = try open()
        let u = try tally.createLocalUser(displayName: "Shared").id
        XCTAssertEqual(try second.user(userId: u).displayName, "Shared", "the second object reads the first one's user")
        // Both count against one limit of 3: neither object's view goes stale.
        XCTAssertTrue(try tally.consume(userId: u, feature: "ai_chat", amount: 2).allowed)
        XCTAssertTrue(try second.consume(userId: u, feature: "ai_chat").allowed)
        let denied = try tally.consume(userId: u, feature: "ai_chat")
        XCTAssertEqual(denied.reason, .limitReached)
        XCTAssertEqual(try second.usage(userId: u, feature: "ai_chat").used, 3)
        XCTAssertEqual(try second.pendingEvents(userId: u), 2)
        try second.setSetting(userId: u, key: "fontSize", valueJson: "20")
        XCTAssertEqual(try tally.setting(userId: u, key: "fontSize"), "20")
        // The same idempotency key through either object counts once.
        let meta = UsageMeta(idempotencyKey: "shared-key")
        _ = try tally.consume(userId: u, feature: "notes", amount: 1, meta: meta)
        _ = try second.consume(userId: u, feature: "notes", amount: 1, meta: meta)
        XCTAssertEqual(try tally.usage(userId: u, feature: "notes").used, 1)
    }
}
