// swift-tools-version:6.1
import PackageDescription

// Micro-benchmarks with ordo-one/benchmark (wall clock, throughput and malloc counts per
// operation), kept out of the main package like bench/micro so that its build and test run
// stay lean. Run: bash bench/benchmarks.sh
//
// bench/benchmarks.sh links the repository as .deps/portcullis (a stable path whatever the
// clone's folder is called).
//
// The relay benchmark runs the real gateway in process, but the main package exports only the
// pure layers (the PortcullisPolicy product), not PortcullisNIO or PortcullisGateway. And SwiftPM
// refuses a graph in which this package declares targets named like the main package's (which it
// would have to: the gateway's sources import PortcullisNIO and so on by name) next to a
// `.package(path:)` dependency on it. So this package builds the Portcullis targets itself from
// the linked repository's Sources/ folders: the same source files and settings, compiled here.
// The target list below mirrors the main Package.swift; when a target there gains a dependency,
// add it here too. (Were PortcullisGateway a library product of the main package, this could be
// a plain `.package(path: ".deps/portcullis")` like bench/micro.)
let sources = ".deps/portcullis/Sources/"
let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]
let nioSettings: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]
let nioCore: Target.Dependency = .product(name: "NIOCore", package: "swift-nio")
let nioPosix: Target.Dependency = .product(name: "NIOPosix", package: "swift-nio")
let logging: Target.Dependency = .product(name: "Logging", package: "swift-log")
let benchmark: Target.Dependency = .product(name: "Benchmark", package: "benchmark")

let package = Package(
    name: "portcullis-benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        // The malloc interposer gives the malloc metrics without jemalloc; the package's other
        // default trait (RuntimeInterposer) needs a package this machine's mirror lacks.
        .package(url: "https://github.com/ordo-one/benchmark", exact: "1.38.1", traits: ["MallocInterposer"]),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
    ],
    targets: [
        // Access list, geo, limits and PROXY v2 decoding: the pure layers only.
        .executableTarget(
            name: "PolicyBenchmarks",
            dependencies: [benchmark, "PortcullisCore", "PortcullisPolicy", "PortcullisWire"],
            path: "Benchmarks/PolicyBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        // One TCP connection relayed through the in-process gateway per iteration.
        .executableTarget(
            name: "RelayBenchmarks",
            dependencies: [benchmark, "PortcullisPolicy", "PortcullisGateway"],
            path: "Benchmarks/RelayBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),

        // The Portcullis targets, from the linked repository (see above).
        .target(name: "PortcullisCore", path: sources + "PortcullisCore", swiftSettings: strictSettings),
        .target(
            name: "PortcullisRules", dependencies: ["PortcullisCore"], path: sources + "PortcullisRules",
            swiftSettings: strictSettings),
        .target(
            name: "PortcullisWire", dependencies: ["PortcullisCore"], path: sources + "PortcullisWire",
            swiftSettings: strictSettings),
        .target(
            name: "PortcullisPolicy", dependencies: ["PortcullisCore", "PortcullisRules", "PortcullisWire"],
            path: sources + "PortcullisPolicy", swiftSettings: strictSettings),
        .systemLibrary(
            name: "CMaxMindDB", path: sources + "CMaxMindDB", pkgConfig: "libmaxminddb",
            providers: [.apt(["libmaxminddb-dev"]), .brew(["libmaxminddb"])]),
        .target(
            name: "PortcullisGeoIP", dependencies: ["CMaxMindDB", "PortcullisCore", "PortcullisPolicy"],
            path: sources + "PortcullisGeoIP", swiftSettings: nioSettings),
        .target(
            name: "PortcullisTelemetry", dependencies: ["PortcullisCore", "PortcullisPolicy", logging],
            path: sources + "PortcullisTelemetry", swiftSettings: strictSettings),
        .target(
            name: "PortcullisNIO",
            dependencies: ["PortcullisCore", "PortcullisPolicy", "PortcullisTelemetry", nioCore, nioPosix, logging],
            path: sources + "PortcullisNIO", swiftSettings: nioSettings),
        .target(
            name: "PortcullisGateway",
            dependencies: [
                "PortcullisCore", "PortcullisRules", "PortcullisPolicy", "PortcullisTelemetry", "PortcullisNIO",
                "PortcullisGeoIP", nioCore, nioPosix, logging,
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            path: sources + "PortcullisGateway", swiftSettings: nioSettings),
    ]
)
