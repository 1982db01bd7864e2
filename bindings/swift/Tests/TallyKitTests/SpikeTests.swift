import XCTest
import TallyKit

final class SpikeTests: XCTestCase {
    func testConsumes() throws {
        let tally = try Tally.openInMemory(config: TallyConfig(catalogJson: #"{"plans":[{"id":"free","features":{"ai_chat":{"type":"metered","limit":1,"period":"month"}}}]}"#))
        let user = try tally.createLocalUser()
        XCTAssertTrue(try tally.consume(userId: user.id, feature: "ai_chat").allowed)
        XCTAssertEqual(try tally.consume(userId: user.id, feature: "ai_chat").reason, .limitReached)
    }
}
