// swift-tools-version:6.1
import PackageDescription

// Layers (see docs/decisions/0001-target-layout.md). A target may only depend on a lower layer.
//   0 pure:      PortcullisCore, PortcullisRules, PortcullisWire (PROXY codec), PortcullisPolicy
//   1 adapters:  PortcullisGeoIP (libmaxminddb), PortcullisTelemetry (log writers; zlib for gzip logs;
//                metrics through swift-metrics and swift-prometheus),
//                PortcullisEngine (the epoll engine for TCP and UDP, session runtime;
//                CPortcullisLinux for epoll and the datagram calls; CPortcullisTLS for OpenSSL)
//   2 compose:   PortcullisGateway (listeners, lifecycle, signals)
//   3 exe:       portcullis (check / run)
let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]
// Socket structs (sockaddr_in, linger) are declared through NIO's C shim modules, which
// MemberImportVisibility would make every file import by name; the NIO layers skip it.
let nioSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "portcullis",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "portcullis", targets: ["portcullis"]),
        // For bench/micro and bench/Benchmarks, which measure from outside: the pure layers,
        // and the gateway that runs in process for the relay benchmark.
        .library(name: "PortcullisPolicy", targets: ["PortcullisCore", "PortcullisRules", "PortcullisPolicy", "PortcullisWire"]),
        .library(name: "PortcullisGateway", targets: ["PortcullisGateway"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        // Layer 0
        .target(name: "PortcullisCore", swiftSettings: strictSettings),
        .target(name: "PortcullisRules", dependencies: ["PortcullisCore"], swiftSettings: strictSettings),
        .target(name: "PortcullisWire", dependencies: ["PortcullisCore"], swiftSettings: strictSettings),
        .target(
            name: "PortcullisPolicy", dependencies: ["PortcullisCore", "PortcullisRules", "PortcullisWire"],
            swiftSettings: strictSettings),
        // Layer 1
        .systemLibrary(
            name: "CMaxMindDB", pkgConfig: "libmaxminddb",
            providers: [.apt(["libmaxminddb-dev"]), .brew(["libmaxminddb"])]),
        .target(
            name: "PortcullisGeoIP", dependencies: ["CMaxMindDB", "PortcullisCore", "PortcullisPolicy"],
            swiftSettings: nioSettings),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"]), .brew(["zlib"])]),
        .target(
            name: "PortcullisTelemetry",
            dependencies: [
                "CZlib", "PortcullisCore", "PortcullisPolicy", .product(name: "Logging", package: "swift-log"),
                // Metrics: swift-metrics' types, exposed by swift-prometheus (decision 0015).
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strictSettings
        ),
        .target(name: "CPortcullisLinux"),
        // The system OpenSSL (Debian libssl-dev), as nginx and HAProxy use: decision 0013.
        .target(name: "CPortcullisTLS", linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto")]),
        .target(
            name: "PortcullisEngine",
            dependencies: [
                "CPortcullisLinux", "CPortcullisTLS", "PortcullisCore", "PortcullisPolicy", "PortcullisTelemetry",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        // Layer 2
        .target(
            name: "PortcullisGateway",
            dependencies: [
                "PortcullisCore", "PortcullisRules", "PortcullisPolicy", "PortcullisTelemetry",
                "PortcullisEngine", "PortcullisGeoIP",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: nioSettings
        ),
        // Layer 3
        .executableTarget(
            name: "portcullis",
            dependencies: [
                "PortcullisCore", "PortcullisRules", "PortcullisPolicy", "PortcullisGateway", "PortcullisGeoIP",
                "PortcullisTelemetry",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: strictSettings
        ),
        // Tests
        .target(
            name: "PortcullisTestSupport",
            dependencies: [
                "PortcullisCore", "PortcullisRules", "PortcullisPolicy", "PortcullisGateway", "PortcullisGeoIP",
                "PortcullisTelemetry",
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            path: "Tests/PortcullisTestSupport",
            // Hashing 64 MiB in tests must not take minutes in a debug build.
            swiftSettings: [.unsafeFlags(["-Ounchecked"])]
        ),
        .testTarget(name: "PortcullisCoreTests", dependencies: ["PortcullisCore", "PortcullisTestSupport"]),
        .testTarget(name: "PortcullisRulesTests", dependencies: ["PortcullisRules", "PortcullisPolicy"]),
        .testTarget(
            name: "PortcullisGeoIPTests",
            dependencies: ["PortcullisGeoIP", "PortcullisCore", "PortcullisPolicy", "PortcullisTestSupport"]),
        .testTarget(name: "PortcullisWireTests", dependencies: ["PortcullisWire", "PortcullisCore", "PortcullisTestSupport"]),
        .testTarget(
            name: "PortcullisPolicyTests",
            dependencies: ["PortcullisPolicy", "PortcullisRules", "PortcullisCore", "PortcullisGeoIP", "PortcullisTestSupport"]
        ),
        .testTarget(name: "PortcullisEngineTests", dependencies: ["PortcullisEngine", "PortcullisCore", "PortcullisPolicy"]),
        .testTarget(name: "PortcullisTelemetryTests", dependencies: ["PortcullisTelemetry", "PortcullisPolicy", "PortcullisTestSupport"]),
        .testTarget(
            name: "PortcullisEndToEndTests",
            dependencies: [
                "portcullis", "PortcullisGateway", "PortcullisTestSupport", "PortcullisPolicy", "PortcullisRules",
                "PortcullisWire", "PortcullisGeoIP",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
    ]
)
