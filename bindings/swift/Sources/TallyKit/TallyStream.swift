// Hand-written companion of the generated bindings (TallyKit.swift): observe changes as an
// AsyncStream.
import Foundation

/// A change of one user's data, as told by the library after it is committed.
public struct UserChange: Sendable, Equatable {
    public let userId: String
    public let change: Change
}

/// The one `ChangeListener` registered per `Tally`; fans every change out to the streams of
/// `Tally.changes(userId:)`. The core keeps a single listener, so the stream API goes through
/// this hub.
final class ChangeHub: ChangeListener, @unchecked Sendable {
    private let lock = NSLock()
    private var sinks: [UUID: (UserChange) -> Void] = [:]

    func onChange(userId: String, change: Change) {
        let event = UserChange(userId: userId, change: change)
        lock.lock()
        let current = Array(sinks.values)
        lock.unlock()
        for sink in current { sink(event) }
    }

    func add(_ sink: @escaping (UserChange) -> Void) -> UUID {
        let id = UUID()
        lock.lock()
        sinks[id] = sink
        lock.unlock()
        return id
    }

    func remove(_ id: UUID) {
        lock.lock()
        sinks[id] = nil
        lock.unlock()
    }

    var count: Int {
        lock.lock()
        defer { lock.unlock() }
        return sinks.count
    }

    private struct Entry {
        weak var tally: Tally?
        let hub: ChangeHub
    }

    private static let registryLock = NSLock()
    private static var hubs: [ObjectIdentifier: Entry] = [:]

    static func of(_ tally: Tally) throws -> ChangeHub {
        registryLock.lock()
        defer { registryLock.unlock() }
        hubs = hubs.filter { $0.value.tally != nil }
        if let entry = hubs[ObjectIdentifier(tally)], entry.tally === tally { return entry.hub }
        let hub = ChangeHub()
        try tally.setListener(listener: hub)
        hubs[ObjectIdentifier(tally)] = Entry(tally: tally, hub: hub)
        return hub
    }
}

extension Tally {
    /// Changes of `userId`'s data (or of every user's when nil): usage after a consume or a
    /// sync, entitlements after a sign-in or a sync, settings after a write.
    ///
    /// Each iteration listens from the moment the stream is created; several streams may
    /// listen at once. A slow consumer loses the oldest pending changes first (each one only
    /// says *what* changed: re-read the current state). Do not also call `setListener`
    /// yourself: it would replace the listener behind these streams.
    public func changes(userId: String? = nil) throws -> AsyncStream<UserChange> {
        let hub = try ChangeHub.of(self)
        return AsyncStream(bufferingPolicy: .bufferingNewest(64)) { continuation in
            let id = hub.add { event in
                if userId == nil || event.userId == userId { continuation.yield(event) }
            }
            continuation.onTermination = { _ in hub.remove(id) }
        }
    }
}
