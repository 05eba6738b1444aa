// swift-tools-version:5.9
// The WebWaka Realtime Swift package: the generated bindings (Sources/WebWakaRealtime,
// from scripts/gen-bindings.sh), the C interface of the Rust library as a system
// library module (Sources/WebWakaRealtimeFFI), and XCTest tests run with `swift test`
// on Linux against libwebwaka_realtime_ffi.so and a real server
// (scripts/test-bindings.sh passes -L and LD_LIBRARY_PATH).
//
// For iOS the same sources ship with an XCFramework as a binary target instead of the
// system library; see docs/mobile.md.
import PackageDescription

let package = Package(
    name: "WebWakaRealtime",
    products: [
        .library(name: "WebWakaRealtime", targets: ["WebWakaRealtime"]),
    ],
    targets: [
        .systemLibrary(name: "WebWakaRealtimeFFI", path: "Sources/WebWakaRealtimeFFI"),
        .target(
            name: "WebWakaRealtime",
            dependencies: ["WebWakaRealtimeFFI"],
            path: "Sources/WebWakaRealtime",
            linkerSettings: [.linkedLibrary("webwaka_realtime_ffi")]
        ),
        .testTarget(
            name: "WebWakaRealtimeTests",
            dependencies: ["WebWakaRealtime"],
            path: "Tests/WebWakaRealtimeTests"
        ),
    ]
)
