// swift-tools-version:5.9
// The Tally Swift package: the generated UniFFI bindings (Sources/TallyKit/TallyKit.swift), a
// hand-written AsyncStream wrapper, and the Rust static library packaged as an XCFramework by
// build-xcframework.sh (run it on a Mac before building this package).
import PackageDescription

let package = Package(
    name: "Tally",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "TallyKit", targets: ["TallyKit"]),
    ],
    targets: [
        // libtally_ffi.a for every Apple platform, with tally_ffiFFI.h and its module map.
        .binaryTarget(name: "tally_ffiFFI", path: "build/tally_ffiFFI.xcframework"),
        .target(
            name: "TallyKit",
            dependencies: ["tally_ffiFFI"],
            path: "Sources/TallyKit",
            linkerSettings: [.linkedFramework("SystemConfiguration"), .linkedFramework("Security")]
        ),
    ]
)
