// What the tests share: the plan catalog, a hand-moved clock, temporary directories, waiting on
// streams, and the services of bindings/swift/Tests/testkit.py (a real tally-server with its
// PostgreSQL and a fake Google Play, running outside the Swift root; their URLs arrive as
// TALLY_SWIFT_* environment variables, and a missing one fails the test).
import Foundation
import TallyKit
import XCTest

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The plan catalog every device and the test server use (bindings/swift/Tests/catalog.json).
let catalog: String = {
    let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("catalog.json")
    guard let text = try? String(contentsOf: url, encoding: .utf8) else {
        fatalError("cannot read the test catalog at \(url.path)")
    }
    return text
}()

/// Milliseconds since the epoch of an RFC 3339 time such as `2025-03-10T12:00:00Z`.
func ms(_ text: String) -> Int64 {
    guard let date = ISO8601DateFormatter().date(from: text) else { fatalError("not an RFC 3339 time: \(text)") }
    return Int64((date.timeIntervalSince1970 * 1000).rounded())
}

/// Now, in milliseconds since the epoch (for comparing with the server's real clock).
func nowMs() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }

/// A clock the test moves by hand, handed to the library through the `TallyClock` callback.
final class TestClock: TallyClock, @unchecked Sendable {
    private let lock = NSLock()
    private var current: Int64

    init(_ start: String) { current = ms(start) }

    func nowMs() -> Int64 {
        lock.lock()
        defer { lock.unlock() }
        return current
    }

    func set(_ time: String) {
        lock.lock()
        defer { lock.unlock() }
        current = ms(time)
    }
}

/// A fresh directory for one test's database files.
func temporaryDirectory() throws -> URL {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tally-swift-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir
}

/// The case name of a `TallyError` (`"InvalidInput"`, …) and its message.
extension TallyError {
    var kind: String {
        switch self {
        case .NotFound: "NotFound"
        case .InvalidInput: "InvalidInput"
        case .InvalidCatalog: "InvalidCatalog"
        case .IdempotencyConflict: "IdempotencyConflict"
        case .UnsyncedEvents: "UnsyncedEvents"
        case .Storage: "Storage"
        case .SchemaTooNew: "SchemaTooNew"
        case .Network: "Network"
        case .Unauthorized: "Unauthorized"
        case .AccountDeleted: "AccountDeleted"
        case .EncryptionKey: "EncryptionKey"
        case .AccountDisabled: "AccountDisabled"
        case .Server: "Server"
        case .PurchaseRefused: "PurchaseRefused"
        case .InvalidToken: "InvalidToken"
        case .SubjectMismatch: "SubjectMismatch"
        case .Configuration: "Configuration"
        case .Internal: "Internal"
        }
    }

    var message: String {
        switch self {
        case let .NotFound(message), let .InvalidInput(message), let .InvalidCatalog(message),
             let .IdempotencyConflict(message), let .UnsyncedEvents(message), let .Storage(message),
             let .SchemaTooNew(message), let .Network(message), let .Unauthorized(message),
             let .AccountDeleted(message), let .EncryptionKey(message), let .AccountDisabled(message),
             let .Server(message), let .PurchaseRefused(message), let .InvalidToken(message),
             let .SubjectMismatch(message), let .Configuration(message), let .Internal(message):
            message
        }
    }
}

/// The `TallyError` `body` throws (a test failure when it throws nothing or something else).
@discardableResult
func tallyError<T>(_ body: () throws -> T, file: StaticString = #filePath, line: UInt = #line) -> TallyError? {
    expectTallyError(Result { try body() }, file: file, line: line)
}

/// The `TallyError` the async `body` throws.
@discardableResult
func asyncTallyError<T>(_ body: () async throws -> T, file: StaticString = #filePath, line: UInt = #line) async -> TallyError? {
    do {
        return expectTallyError(.success(try await body()), file: file, line: line)
    } catch {
        return expectTallyError(Result<T, Error>.failure(error), file: file, line: line)
    }
}

private func expectTallyError<T>(_ result: Result<T, Error>, file: StaticString, line: UInt) -> TallyError? {
    switch result {
    case let .success(value):
        XCTFail("expected a TallyError, got \(value)", file: file, line: line)
    case let .failure(error as TallyError):
        return error
    case let .failure(error):
        XCTFail("expected a TallyError, got \(error)", file: file, line: line)
    }
    return nil
}

/// A test case talking to testkit.py's services, with a fresh directory for its databases.
class ServerTestCase: XCTestCase {
    /// This test's directory (removed after it).
    var dir: URL!
    /// The services' URLs.
    var kit: Kit!

    override func setUpWithError() throws {
        kit = try Kit.require()
        dir = try temporaryDirectory()
    }

    override func tearDownWithError() throws {
        if let dir { try FileManager.default.removeItem(at: dir) }
    }
}

/// A wait that ran out: what was awaited, and for how long.
struct WaitTimeout: Error, CustomStringConvertible {
    let what: String
    let seconds: Double
    var description: String { "\(what): not within \(seconds) s" }
}

/// A stream's first element that satisfies `match`, or a failure after `seconds`.
func first<T: Sendable>(
    _ stream: AsyncStream<T>, within seconds: Double = 30, where match: @escaping @Sendable (T) -> Bool = { _ in true }
) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask {
            for await value in stream where match(value) { return value }
            return nil
        }
        group.addTask {
            try await Task.sleep(nanoseconds: UInt64(seconds * 1_000_000_000))
            throw WaitTimeout(what: "a matching stream element", seconds: seconds)
        }
        defer { group.cancelAll() }
        guard let value = try await group.next() ?? nil else { throw WaitTimeout(what: "a matching stream element (the stream ended)", seconds: seconds) }
        return value
    }
}

/// Polls `condition` (every 5 ms) until it holds, failing after `seconds`.
func eventually(within seconds: Double = 30, _ what: String, _ condition: () throws -> Bool) async throws {
    let deadline = Date().addingTimeInterval(seconds)
    while try !condition() {
        if Date() > deadline { throw WaitTimeout(what: what, seconds: seconds) }
        try await Task.sleep(nanoseconds: 5_000_000)
    }
}

/// A thread-safe list the observers' callbacks append to.
final class Recorder<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [T] = []

    func append(_ item: T) {
        lock.lock()
        defer { lock.unlock() }
        items.append(item)
    }

    var all: [T] {
        lock.lock()
        defer { lock.unlock() }
        return items
    }
}

/// The services testkit.py runs on the host.
struct Kit: Sendable {
    /// The real tally-server (`http://127.0.0.1:port`).
    let serverURL: String
    /// The server's `GET /v1/keys` (the devices' `serverKeys`).
    let serverKeys: String
    /// testkit.py's control endpoint: identity tokens and the fake Google Play's state.
    let controlURL: String

    /// The kit's URLs from the environment; a test that needs them fails when they are missing.
    static func require(file: StaticString = #filePath, line: UInt = #line) throws -> Kit {
        let env = ProcessInfo.processInfo.environment
        guard let server = env["TALLY_SWIFT_SERVER_URL"], let keys = env["TALLY_SWIFT_SERVER_KEYS"],
              let control = env["TALLY_SWIFT_KIT_URL"]
        else {
            XCTFail("TALLY_SWIFT_SERVER_URL, TALLY_SWIFT_SERVER_KEYS and TALLY_SWIFT_KIT_URL are not set: run scripts/swift", file: file, line: line)
            throw TallyError.Configuration(message: "the Swift test kit is not running")
        }
        return Kit(serverURL: server, serverKeys: keys, controlURL: control)
    }

    /// An HS256 identity token of `sub` from the test identity provider (signed with `secret`
    /// when given: a token the server refuses).
    func idToken(_ sub: String, secret: String? = nil) async throws -> String {
        var query = "sub=\(sub.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? sub)"
        if let secret { query += "&secret=\(secret)" }
        let (status, body) = try await http("GET", "\(controlURL)/id-token?\(query)")
        guard status == 200, let object = try JSONSerialization.jsonObject(with: body) as? [String: Any],
              let token = object["token"] as? String
        else { throw TallyError.Server(message: "the kit gave no token (\(status))") }
        return token
    }

    /// Sync options of `sub` against the test server.
    func options(_ sub: String) async throws -> SyncOptions {
        SyncOptions(serverUrl: serverURL, token: try await idToken(sub))
    }

    /// A device database `name` in `dir`, with the server's keys.
    func device(_ dir: URL, _ name: String, localOnlySettings: [String] = []) throws -> Tally {
        try Tally.open(
            path: dir.appendingPathComponent("\(name).db").path,
            config: TallyConfig(deviceId: name, localOnlySettings: localOnlySettings, catalogJson: catalog, serverKeys: serverKeys)
        )
    }

    /// Puts a Play subscription (one line item bound to `account`) into the fake Google.
    func putSubscription(token: String, product: String, state: String, expiresAtMs: Int64, account: String?, order: String) async throws {
        var body: [String: Any] = ["product": product, "state": state, "expiry_ms": expiresAtMs, "order": order]
        if let account { body["account"] = account }
        try await put("/play/subscriptions/\(token)", body)
    }

    /// Puts a Play one-time product purchase (`state` 0 purchased) into the fake Google.
    func putProduct(product: String, token: String, state: Int, account: String?, order: String) async throws {
        var body: [String: Any] = ["state": state, "order": order]
        if let account { body["account"] = account }
        try await put("/play/products/\(product)/\(token)", body)
    }

    /// "product:token" of every purchase the fake Google acknowledged, in order.
    func acknowledged() async throws -> [String] { try await list("/play/acknowledged") }

    /// "product:token" of every product the fake Google consumed, in order.
    func consumed() async throws -> [String] { try await list("/play/consumed") }

    private func put(_ path: String, _ body: [String: Any]) async throws {
        let (status, _) = try await http("PUT", controlURL + path, body: try JSONSerialization.data(withJSONObject: body))
        guard status == 204 else { throw TallyError.Server(message: "PUT \(path): \(status)") }
    }

    private func list(_ path: String) async throws -> [String] {
        let (status, body) = try await http("GET", controlURL + path)
        guard status == 200, let items = try JSONSerialization.jsonObject(with: body) as? [String] else {
            throw TallyError.Server(message: "GET \(path): \(status)")
        }
        return items
    }
}

/// One HTTP request on loopback: the status and the body.
func http(_ method: String, _ url: String, bearer: String? = nil, body: Data? = nil) async throws -> (Int, Data) {
    guard let target = URL(string: url) else { throw TallyError.InvalidInput(message: "bad URL \(url)") }
    var request = URLRequest(url: target, timeoutInterval: 10)
    request.httpMethod = method
    request.httpBody = body
    if let bearer { request.setValue("Bearer \(bearer)", forHTTPHeaderField: "Authorization") }
    if body != nil { request.setValue("application/json", forHTTPHeaderField: "Content-Type") }
    return try await withCheckedThrowingContinuation { continuation in
        URLSession.shared.dataTask(with: request) { data, response, error in
            if let error {
                continuation.resume(throwing: error)
            } else {
                continuation.resume(returning: ((response as? HTTPURLResponse)?.statusCode ?? 0, data ?? Data()))
            }
        }.resume()
    }
}
