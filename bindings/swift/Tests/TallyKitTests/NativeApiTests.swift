// The app-facing API: the current user, CustomerInfo in the change stream, several observers,
// the linked library. Mirrors the Kotlin suite's NativeApiTest.
import Foundation
import TallyKit
import XCTest

/// An app's `ChangeListener`, recording what it hears.
final class RecordingListener: ChangeListener, @unchecked Sendable {
    let heard = Recorder<Change>()

    func onChange(userId: String, change: Change) {
        heard.append(change)
    }
}

final class NativeApiTests: XCTestCase {
    private var dir: URL!
    private var tally: Tally!

    override func setUpWithError() throws {
        dir = try temporaryDirectory()
        tally = try Tally.open(path: dir.appendingPathComponent("app.db").path, config: TallyConfig(catalogJson: catalog))
    }

    override func tearDownWithError() throws {
        tally = nil
        try FileManager.default.removeItem(at: dir)
    }

    func testTheLibraryIsTheSharedLibraryTheHostBuiltAndFitsTheBindings() throws {
        // The first call checks the generated bindings' API checksums against the library's
        // (a mismatch would stop the process): a working call proves they fit.
        XCTAssertFalse(try tally.deviceId().isEmpty)
        #if os(Linux)
        // /proc files report a size of 0: read to the end rather than by size.
        let maps = String(decoding: try XCTUnwrap(FileHandle(forReadingAtPath: "/proc/self/maps")).readDataToEndOfFile(), as: UTF8.self)
        let loaded = Set(maps.split(separator: "\n").compactMap { $0.split(separator: " ").last.map(String.init) }
            .filter { $0.hasSuffix("/libtally_ffi.so") })
        XCTAssertEqual(loaded.count, 1, "exactly one libtally_ffi.so is mapped: \(loaded)")
        XCTAssertEqual(loaded.first?.hasPrefix("/tally-target/"), true, "the library cargo built on the host: \(loaded)")
        #endif
    }

    func testTheCurrentUserStartsAnonymousLogsInWithItsDataAndLogsOut() throws {
        let anon = try tally.currentUser()
        XCTAssertNil(anon.externalId)
        XCTAssertEqual(try tally.currentUser().id, anon.id, "the same anonymous user until a log-in")
        _ = try tally.consume(userId: anon.id, feature: "ai_chat", amount: 2)

        let ada = try tally.logIn(externalId: "auth0|ada", email: "ada@example.com")
        XCTAssertEqual(ada.externalId, "auth0|ada")
        XCTAssertEqual(try tally.currentUser().id, ada.id, "no id to swap in by hand")
        XCTAssertEqual(try tally.currentCustomerInfo().features["ai_chat"]?.usage.used, 2, "the anonymous uses came along")
        XCTAssertEqual(tallyError { try tally.logIn(externalId: "") }?.kind, "InvalidInput")
        XCTAssertEqual(try tally.currentUser().id, ada.id, "a bad log-in changed nothing")

        let next = try tally.logOut()
        XCTAssertNil(next.externalId)
        XCTAssertNotEqual(next.id, anon.id)
        XCTAssertEqual(try tally.currentUser().id, next.id)
        XCTAssertEqual(Set(try tally.users().map(\.id)), [ada.id, next.id], "the multi-user API still sees both")
        XCTAssertFalse(try tally.user(userId: ada.id).signedIn)
    }

    func testCustomerInfoAnswersIsProActiveWhatIsLeftAndWhatWasBought() throws {
        let u = try tally.currentUser().id
        let free = try tally.currentCustomerInfo()
        XCTAssertEqual(free.plan, "free")
        XCTAssertEqual(free.entitlements["pro"]?.isActive, false)
        XCTAssertEqual(free.entitlements["free"]?.isActive, true)
        XCTAssertFalse(free.isEntitled("export"), "a disabled flag")
        let left: Int64 = try XCTUnwrap(free.features["ai_chat"]?.usage.remaining)
        XCTAssertEqual(left, 3)

        let end = nowMs() + 30 * 86_400_000
        try tally.setEntitlements(userId: u, state: Entitlements(
            plan: "pro", status: .active, periodEndMs: end,
            creditGrants: [CreditGrant(id: "pack-1", remaining: 40, expiresAtMs: nil, source: "purchase")]
        ))
        let pro = try tally.currentCustomerInfo()
        XCTAssertEqual(pro.entitlements["pro"]?.isActive, true)
        XCTAssertEqual(pro.entitlements["pro"]?.expiresAtMs, end)
        XCTAssertEqual(pro.expiresAtMs, end)
        XCTAssertTrue(pro.isEntitled("export"))
        XCTAssertEqual(pro.features["ai_chat"]?.usage.limit, 100)
        XCTAssertEqual(pro.creditBalance, 40)
        XCTAssertEqual(pro.activePurchases.map(\.kind), [.subscription, .credits])
    }

    func testTheChangeStreamCarriesTheNewStateAndCustomerInfoUpdatesFollowTheCurrentUser() async throws {
        let tally = try XCTUnwrap(self.tally)
        let u = try tally.currentUser().id
        var changes: AsyncStream<UserChange>? = try tally.changes(userId: u)
        _ = try tally.consume(userId: u, feature: "ai_chat")
        let change = try await first(try XCTUnwrap(changes)) { $0.change.usage }
        changes = nil // a stream nobody holds any more stops observing
        try await eventually("the released stream removes its observer") { try tally.observerCount() == 0 }
        let info = try XCTUnwrap(change.info)
        XCTAssertEqual(info.features["ai_chat"]?.usage.used, 1, "no re-read needed")
        XCTAssertEqual(info.pendingEvents, 1)
        XCTAssertTrue(change.isCurrentUser)

        // The current user's state: now, after a use, and after logging in (a new user id).
        let seen = Recorder<CustomerInfo>()
        let updates = try tally.customerInfoUpdates()
        let collector = Task { for await info in updates { seen.append(info) } }
        try await eventually("the state now") { !seen.all.isEmpty }
        XCTAssertEqual(seen.all.first?.features["ai_chat"]?.usage.used, 1)
        _ = try tally.consume(userId: u, feature: "ai_chat")
        try await eventually("the state after a use") { seen.all.contains { $0.features["ai_chat"]?.usage.used == 2 } }
        let ada = try tally.logIn(externalId: "auth0|ada-stream")
        try await eventually("the logged-in account's state") { seen.all.contains { $0.user.id == ada.id } }
        let moved = try XCTUnwrap(seen.all.first { $0.user.id == ada.id })
        XCTAssertEqual(moved.features["ai_chat"]?.usage.used, 2, "the stream moved to the logged-in account, uses included")
        XCTAssertEqual(try tally.observerCount(), 1)
        collector.cancel()
        try await eventually("the cancelled stream removes its observer") { try tally.observerCount() == 0 }
    }

    func testTwoStreamsAndAnAppListenerAreAllToldNoneReplacingAnother() async throws {
        let tally = try XCTUnwrap(self.tally)
        let u = try tally.currentUser().id
        let listener = RecordingListener()
        try tally.setListener(listener: listener)
        var mine: AsyncStream<UserChange>? = try tally.changes(userId: u)
        var all: AsyncStream<UserChange>? = try tally.changes()
        XCTAssertEqual(try tally.observerCount(), 2)
        try tally.setSetting(userId: u, key: "fontSize", valueJson: "16")
        let a = try await first(try XCTUnwrap(mine))
        let b = try await first(try XCTUnwrap(all))
        mine = nil
        all = nil
        XCTAssertTrue(a.change.settings)
        XCTAssertTrue(b.change.settings)
        XCTAssertEqual(listener.heard.all.count, 1, "the listener set before the streams still hears")
        try await eventually("both streams ended") { try tally.observerCount() == 0 }
        try tally.clearListener()
        try tally.setSetting(userId: u, key: "fontSize", valueJson: "17")
        XCTAssertEqual(listener.heard.all.count, 1, "a cleared listener hears nothing more")
    }
}
