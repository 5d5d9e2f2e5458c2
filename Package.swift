// swift-tools-version: 6.2
// Whittle: federated compression of neural networks for fleets of edge boards.
// Layers (dependencies point down only) are described in docs/architecture.md.
import PackageDescription

let package = Package(
    name: "Whittle",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "coordinator", targets: ["coordinator"]),
        .executable(name: "worker", targets: ["worker"]),
        .library(name: "WhittleNN", targets: ["WhittleNN"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-protobuf", exact: "1.39.0"),
        .package(url: "https://github.com/apple/swift-argument-parser", exact: "1.8.2"),
    ],
    targets: [
        // C adaptors: oneDNN plans and OpenBLAS's CBLAS.
        .target(
            name: "CWhittleDNNL",
            linkerSettings: [.linkedLibrary("dnnl"), .linkedLibrary("gomp")]
        ),
        .systemLibrary(name: "COpenBLAS", pkgConfig: "openblas", providers: [.apt(["libopenblas-dev"])]),

        // Pure core.
        .target(name: "WhittleTensor", dependencies: ["CWhittleDNNL", "COpenBLAS"]),
        .target(
            name: "WhittleONNX",
            dependencies: ["WhittleTensor", .product(name: "SwiftProtobuf", package: "swift-protobuf")]
        ),
        .target(name: "WhittleNN", dependencies: ["WhittleTensor", "WhittleONNX"]),
        .target(name: "WhittleCompression", dependencies: ["WhittleTensor", "WhittleONNX", "WhittleNN"]),
        .target(
            name: "WhittleProtocol",
            dependencies: ["WhittleCompression", "WhittleTensor", .product(name: "SwiftProtobuf", package: "swift-protobuf")]
        ),

        // Command-line front ends shared by the executables.
        .target(
            name: "WhittleCLI",
            dependencies: [
                "WhittleNN", "WhittleONNX", "WhittleTensor", "WhittleCompression", "CWhittleDNNL",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        // Executables.
        .executableTarget(
            name: "coordinator",
            dependencies: ["WhittleCLI", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(
            name: "worker",
            dependencies: ["WhittleCLI", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),

        // Tests.
        .target(name: "WhittleTestSupport", dependencies: ["WhittleTensor"], path: "Tests/WhittleTestSupport"),
        .testTarget(name: "WhittleTensorTests", dependencies: ["WhittleTensor", "WhittleTestSupport"]),
        .testTarget(name: "WhittleONNXTests", dependencies: ["WhittleONNX", "WhittleNN", "WhittleTestSupport"]),
        .testTarget(name: "WhittleNNTests", dependencies: ["WhittleNN", "WhittleONNX", "WhittleTestSupport"]),
        .testTarget(name: "WhittleCompressionTests", dependencies: ["WhittleCompression", "WhittleTensor", "WhittleTestSupport"]),
        .testTarget(name: "WhittleProtocolTests", dependencies: ["WhittleProtocol", "WhittleCompression", "WhittleTensor", "WhittleTestSupport"]),
        .testTarget(name: "WhittleCLITests", dependencies: ["WhittleTestSupport", "WhittleTensor"]),
    ]
)
