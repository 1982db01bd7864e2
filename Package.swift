// swift-tools-version:6.0
// The Tally Swift package (add it in Xcode by this repository's git URL). Its sources live in
// bindings/swift: the generated UniFFI bindings (Sources/TallyKit/TallyKit.swift and
// TallyCore.swift, with the C headers in Headers/), the hand-written AsyncStream wrappers
// (TallyStream.swift) and the XCTest suite (Tests/TallyKitTests).
//
// Apple platforms link the Rust library from the XCFramework that
// bindings/swift/build-xcframework.sh builds on a Mac. Linux links the shared libtally_ffi.so
// through two system-library targets, one module map per C module (tally_ffiFFI, tally_coreFFI);
// pass its directory to the linker (scripts/swift does: `-Xlinker -L<dir>`).
import PackageDescription

#if os(Linux)
let ffiTargets: [Target] = [
    .systemLibrary(name: "tally_ffiFFI", path: "bindings/swift/Linux/tally_ffiFFI"),
    .systemLibrary(name: "tally_coreFFI", path: "bindings/swift/Linux/tally_coreFFI"),
]
let ffiDependencies: [Target.Dependency] = ["tally_ffiFFI", "tally_coreFFI"]
let ffiLinkerSettings: [LinkerSetting] = []
#else
let ffiTargets: [Target] = [
    // libtally_ffi.a for iOS, the iOS simulator and macOS, with both C modules' headers and
    // module maps. A release pins the published archive instead:
    // .binaryTarget(name: "tally_ffiFFI", url: "https://…/tally_ffiFFI.xcframework.zip", checksum: "…")
    .binaryTarget(name: "tally_ffiFFI", path: "bindings/swift/build/tally_ffiFFI.xcframework"),
]
let ffiDependencies: [Target.Dependency] = ["tally_ffiFFI"]
let ffiLinkerSettings: [LinkerSetting] = [.linkedFramework("SystemConfiguration"), .linkedFramework("Security")]
#endif

let package = Package(
    name: "Tally",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "TallyKit", targets: ["TallyKit"]),
    ],
    targets: ffiTargets + [
        .target(
            name: "TallyKit",
            dependencies: ffiDependencies,
            path: "bindings/swift/Sources/TallyKit",
            linkerSettings: ffiLinkerSettings
        ),
        .testTarget(
            name: "TallyKitTests",
            dependencies: ["TallyKit"],
            path: "bindings/swift/Tests/TallyKitTests"
        ),
    ],
    swiftLanguageModes: [.v6]
)
