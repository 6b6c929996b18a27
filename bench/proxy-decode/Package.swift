// swift-tools-version:6.1
import PackageDescription

// PROXY v2 header decoding throughput, kept out of the main package like bench/micro.
// Run: bash bench/proxy-decode.sh
let package = Package(
    name: "proxy-decode",
    platforms: [.macOS(.v15)],
    // bench/proxy-decode.sh links the repository as .deps/portcullis, so the identity is
    // "portcullis" whatever the clone's folder is called.
    dependencies: [.package(path: ".deps/portcullis")],
    targets: [
        .executableTarget(
            name: "proxy-decode",
            dependencies: [.product(name: "PortcullisPolicy", package: "portcullis")]
        ),
    ]
)
