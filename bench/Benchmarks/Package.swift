// swift-tools-version:6.1
import PackageDescription

// Micro-benchmarks with ordo-one/benchmark (wall clock, throughput and malloc counts per
// operation), kept out of the main package like bench/micro so that its build and test run
// stay lean. Run: bash bench/benchmarks.sh
//
// bench/benchmarks.sh links the repository as .deps/portcullis (a stable path, so the package
// identity is "portcullis" whatever the clone's folder is called).
let benchmark: Target.Dependency = .product(name: "Benchmark", package: "benchmark")
let policy: Target.Dependency = .product(name: "PortcullisPolicy", package: "portcullis")
let gateway: Target.Dependency = .product(name: "PortcullisGateway", package: "portcullis")

let package = Package(
    name: "portcullis-benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        // The malloc interposer gives the malloc metrics without jemalloc; the package's other
        // default trait (RuntimeInterposer) needs a package this machine's mirror lacks.
        .package(url: "https://github.com/ordo-one/benchmark", exact: "1.38.1", traits: ["MallocInterposer"]),
        .package(path: ".deps/portcullis"),
    ],
    targets: [
        // Access list, geo, limits and PROXY v2 decoding: the pure layers only.
        .executableTarget(
            name: "PolicyBenchmarks",
            dependencies: [benchmark, policy],
            path: "Benchmarks/PolicyBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        // One TCP connection relayed through the in-process gateway per iteration.
        .executableTarget(
            name: "RelayBenchmarks",
            dependencies: [benchmark, policy, gateway],
            path: "Benchmarks/RelayBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ]
)
