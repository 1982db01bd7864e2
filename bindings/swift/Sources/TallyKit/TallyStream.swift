// Hand-written companion of the generated bindings (TallyKit.swift, TallyCore.swift): changes,
// the customer's state and the auto-sync status as AsyncStreams. Thin: every state is computed
// by the library. scripts/swift compiles them with the generated code (Swift 6, no warning allowed).
import Foundation

/// Hands each `ChangeObserver` call to a closure (called on the library's threads, hence
/// `@Sendable`).
final class ClosureObserver: ChangeObserver, Sendable {
    private let body: @Sendable (UserChange) -> Void

    init(_ body: @escaping @Sendable (UserChange) -> Void) {
        self.body = body
    }

    func onUserChange(change: UserChange) {
        body(change)
    }
}

/// Hands each `SyncStatusListener` call to a closure.
final class ClosureStatusListener: SyncStatusListener, Sendable {
    private let body: @Sendable (SyncStatus) -> Void

    init(_ body: @escaping @Sendable (SyncStatus) -> Void) {
        self.body = body
    }

    func onStatus(status: SyncStatus) {
        body(status)
    }
}

extension Tally {
    /// Changes of `userId`'s data (or of every user's when nil), each with the user's
    /// `CustomerInfo` after it (`info`). Each stream is an observer of its own: any number of
    /// streams and `setListener` work side by side. A slow consumer loses the oldest pending
    /// changes first (each carries the whole state, so the newest is enough).
    public func changes(userId: String? = nil) throws -> AsyncStream<UserChange> {
        let (stream, continuation) = AsyncStream.makeStream(of: UserChange.self, bufferingPolicy: .bufferingNewest(64))
        let id = try addObserver(observer: ClosureObserver { change in
            if userId == nil || change.userId == userId { continuation.yield(change) }
        })
        continuation.onTermination = { _ in _ = try? self.removeObserver(id: id) }
        return stream
    }

    /// The state of `userId`, or of the current user when nil (following `logIn` and
    /// `logOut`): the state now, then after every change. Keeps the newest state only.
    public func customerInfoUpdates(userId: String? = nil) throws -> AsyncStream<CustomerInfo> {
        let (stream, continuation) = AsyncStream.makeStream(of: CustomerInfo.self, bufferingPolicy: .bufferingNewest(1))
        let id = try addObserver(observer: ClosureObserver { change in
            guard let info = change.info else { return }
            if userId == nil ? change.isCurrentUser : change.userId == userId { continuation.yield(info) }
        })
        continuation.onTermination = { _ in _ = try? self.removeObserver(id: id) }
        if let userId {
            continuation.yield(try customerInfo(userId: userId))
        } else {
            continuation.yield(try currentCustomerInfo())
        }
        return stream
    }
}

extension CustomerInfo {
    /// Whether the plan in effect lets the user use `feature` (limits still apply: see `features`).
    public func isEntitled(_ feature: String) -> Bool {
        features[feature]?.entitled == true
    }
}

extension AutoSync {
    /// The status of this helper now, then at every change. Keeps the newest status only.
    public func statusUpdates() -> AsyncStream<SyncStatus> {
        let (stream, continuation) = AsyncStream.makeStream(of: SyncStatus.self, bufferingPolicy: .bufferingNewest(1))
        let id = addStatusListener(listener: ClosureStatusListener { status in continuation.yield(status) })
        continuation.onTermination = { _ in self.removeStatusListener(id: id) }
        continuation.yield(status())
        return stream
    }
}
