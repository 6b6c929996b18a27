// swift-tools-version:6.1
import PackageDescription

// Micro-benchmarks of the pure layers, kept out of the main package so that its build and
// test run stay lean. Run: bash bench/micro.sh
let package = Package(
    name: "portcullis-micro",
    platforms: [.macOS(.v15)],
    // bench/micro.sh links the repository as .deps/portcullis, so the identity is "portcullis"
    // whatever the clone's folder is called.
    dependencies: [.package(path: ".deps/portcullis")],
    targets: [
        .executableTarget(
            name: "portcullis-micro",
            dependencies: [.product(name: "PortcullisPolicy", package: "portcullis")]
        ),
    ]
)
