#!/usr/bin/env bash
# Builds build/tally_ffiFFI.xcframework — libtally_ffi.a for iOS devices, the iOS simulator
# (arm64 + x86_64) and macOS (arm64 + x86_64), each with the C headers of both UniFFI
# components (tally_ffiFFI.h and tally_coreFFI.h, the core's enums) and one module map
# declaring both modules — which the root Package.swift references as the `tally_ffiFFI` binary
# target (Linux builds use bindings/swift/Linux/*/module.modulemap instead).
#
# Needs a Mac with Xcode (xcodebuild, lipo) and rustup. Run from anywhere:
#   bindings/swift/build-xcframework.sh            # release build
#   PROFILE=debug bindings/swift/build-xcframework.sh
#
# The Swift sources (Sources/TallyKit/TallyKit.swift, TallyCore.swift) and Headers/ are committed and checked
# against the library by scripts/check-bindings; this script first verifies they are current.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
profile=${PROFILE:-release}
target_dir=${CARGO_TARGET_DIR:-$root/target}
out="$here/build"
name=tally_ffiFFI

if [[ "$(uname -s)" != Darwin ]]; then
  echo "build-xcframework.sh: needs macOS with Xcode (xcodebuild, lipo)" >&2
  exit 1
fi
for tool in xcodebuild lipo rustup cargo; do
  command -v "$tool" >/dev/null || { echo "build-xcframework.sh: $tool not found" >&2; exit 1; }
done

ios=(aarch64-apple-ios)
ios_sim=(aarch64-apple-ios-sim x86_64-apple-ios)
macos=(aarch64-apple-darwin x86_64-apple-darwin)

export IPHONEOS_DEPLOYMENT_TARGET=${IPHONEOS_DEPLOYMENT_TARGET:-15.0}
export MACOSX_DEPLOYMENT_TARGET=${MACOSX_DEPLOYMENT_TARGET:-12.0}

echo "==> checking the committed Swift bindings are current"
"$root/scripts/check-bindings"

echo "==> installing Rust targets"
rustup target add "${ios[@]}" "${ios_sim[@]}" "${macos[@]}"

cargo_flags=(-p tally-ffi --lib)
[[ $profile == release ]] && cargo_flags+=(--release)

for t in "${ios[@]}" "${ios_sim[@]}" "${macos[@]}"; do
  echo "==> cargo build --target $t ($profile)"
  (cd "$root" && cargo build "${cargo_flags[@]}" --target "$t")
done

lib() { echo "$target_dir/$1/$profile/libtally_ffi.a"; }

rm -rf "$out"
mkdir -p "$out/ios" "$out/ios-simulator" "$out/macos"

# One library per platform: fat archives for the simulator and macOS.
cp "$(lib "${ios[0]}")" "$out/ios/libtally_ffi.a"
lipo -create "$(lib "${ios_sim[0]}")" "$(lib "${ios_sim[1]}")" -output "$out/ios-simulator/libtally_ffi.a"
lipo -create "$(lib "${macos[0]}")" "$(lib "${macos[1]}")" -output "$out/macos/libtally_ffi.a"

# Headers: the module map lives in a directory named after the module, so that it cannot
# collide with other XCFrameworks' module maps in Xcode's shared include directory.
headers="$out/headers"
mkdir -p "$headers/$name"
for module in tally_ffiFFI tally_coreFFI; do
  cp "$here/Headers/$module.h" "$headers/$name/$module.h"
  cat "$here/Headers/$module.modulemap" >>"$headers/$name/module.modulemap"
  echo >>"$headers/$name/module.modulemap"
done

echo "==> xcodebuild -create-xcframework"
xcodebuild -create-xcframework \
  -library "$out/ios/libtally_ffi.a" -headers "$headers" \
  -library "$out/ios-simulator/libtally_ffi.a" -headers "$headers" \
  -library "$out/macos/libtally_ffi.a" -headers "$headers" \
  -output "$out/$name.xcframework"

rm -rf "$out/ios" "$out/ios-simulator" "$out/macos" "$headers"
echo "==> built $out/$name.xcframework"
echo "    swift build --package-path $root   # or add the package (the repository) to your Xcode project"
