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
        .package(url: "https://github.com/hummingbird-project/hummingbird", exact: "2.28.1"),
        .package(url: "https://github.com/apple/swift-nio", exact: "2.101.3"),
        .package(url: "https://github.com/apple/swift-nio-ssl", exact: "2.37.6"),
        .package(url: "https://github.com/apple/swift-certificates", exact: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto", exact: "4.5.2"),
        .package(url: "https://github.com/apple/swift-asn1", exact: "1.7.4"),
        .package(url: "https://github.com/groue/GRDB.swift", exact: "7.10.0"),
        .package(url: "https://github.com/apple/swift-log", exact: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-prometheus", exact: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", exact: "2.13.0"),
        .package(url: "https://github.com/vapor/postgres-nio", exact: "1.33.2"),
    ],
    targets: [
        // C adaptors: oneDNN plans and OpenBLAS's CBLAS.
        .target(
            name: "CWhittleDNNL",
            linkerSettings: [.linkedLibrary("dnnl"), .linkedLibrary("gomp")]
        ),
        .systemLibrary(name: "COpenBLAS", pkgConfig: "openblas", providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),

        // Pure core.
        .target(name: "WhittleTensor", dependencies: ["CWhittleDNNL", "COpenBLAS", "CZlib"]),
        .target(
            name: "WhittleONNX",
            dependencies: ["WhittleTensor", .product(name: "SwiftProtobuf", package: "swift-protobuf")]
        ),
        .target(name: "WhittleNN", dependencies: ["WhittleTensor", "WhittleONNX"]),
        .target(name: "WhittleCompression", dependencies: ["WhittleTensor", "WhittleONNX", "WhittleNN"]),
        // Wire messages (generated from proto/whittle.proto) and the grammar of identifiers; nothing numeric, so
        // what speaks only the protocol (the heartbeat load generator) links no oneDNN.
        .target(
            name: "WhittleProtocol",
            dependencies: [.product(name: "SwiftProtobuf", package: "swift-protobuf")]
        ),

        // Federated rounds: aggregation of workers' reports (pure).
        .target(name: "WhittleRounds", dependencies: ["WhittleTensor", "WhittleONNX", "WhittleNN", "WhittleCompression", "WhittleProtocol", "WhittlePrivacy",
                                                      .product(name: "SwiftProtobuf", package: "swift-protobuf")]),
        // Secure aggregation and differential privacy: protocol logic over swift-crypto's primitives (pure).
        .target(name: "WhittlePrivacy", dependencies: [.product(name: "Crypto", package: "swift-crypto"),
                                                       .product(name: "CryptoExtras", package: "swift-crypto")]),
        // Certificates and keys: the coordinator's CA, server and client certificates, CSRs (no NIO).
        .target(
            name: "WhittlePKI",
            dependencies: [
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ]
        ),
        // Durable coordinator state behind one interface: SQLite (GRDB, WAL), PostgreSQL (postgres-nio, shared by
        // coordinator replicas) and in memory.
        .target(name: "WhittleStore", dependencies: [.product(name: "GRDB", package: "GRDB.swift"),
                                                     .product(name: "PostgresNIO", package: "postgres-nio"),
                                                     .product(name: "NIOSSL", package: "swift-nio-ssl"),
                                                     .product(name: "NIOCore", package: "swift-nio"),
                                                     .product(name: "Logging", package: "swift-log")]),
        // libcurl through typed C wrappers (curl_easy_setopt is variadic).
        .target(name: "CWhittleCurl", linkerSettings: [.linkedLibrary("curl")]),
        .target(name: "WhittleHTTPClient", dependencies: ["CWhittleCurl", .product(name: "Crypto", package: "swift-crypto")]),
        // The process's edges for everything above the pure core: files read and written durably (FileError), the
        // settings-file grammar, log lines on standard error.
        .target(
            name: "WhittleIO",
            dependencies: ["WhittleTensor", "WhittleONNX", "WhittleNN", "WhittleCompression", .product(name: "Logging", package: "swift-log")]
        ),
        // The coordinator's HTTPS server: routes, round service, artifacts, configuration, CA rotation.
        .target(
            name: "WhittleServer",
            dependencies: [
                "WhittlePKI", "WhittleStore", "WhittleProtocol", "WhittleIO", "WhittleRounds", "WhittleTensor",
                "WhittleCompression", "WhittleONNX",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]
        ),
        // The worker's agent: enrollment, heartbeats, jobs (libcurl; never NIO).
        .target(
            name: "WhittleAgent",
            dependencies: [
                "WhittlePKI", "WhittleProtocol", "WhittleHTTPClient", "WhittleIO", "WhittleRounds", "WhittlePrivacy", "WhittleCompression",
                "WhittleONNX", "WhittleNN", "WhittleTensor",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
            ]
        ),

        // Command-line front ends shared by the executables.
        .target(
            name: "WhittleCLI",
            dependencies: [
                "WhittleIO", "WhittleNN", "WhittleONNX", "WhittleTensor", "WhittleCompression", "CWhittleDNNL",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),

        // The executables' commands, above the libraries (which parse no command line).
        .target(
            name: "CoordinatorCommands",
            dependencies: [
                "WhittleServer", "WhittleCLI", "WhittleIO", "WhittlePKI", "WhittleStore", "WhittleHTTPClient", "WhittleRounds", "WhittleProtocol",
                "WhittleCompression", "WhittleONNX", "WhittleTensor",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
            ]
        ),
        .target(
            name: "WorkerCommands",
            dependencies: [
                "WhittleAgent", "WhittleCLI", "WhittleIO", "WhittlePKI", "WhittleHTTPClient", "WhittleProtocol", "WhittleRounds", "WhittleCompression",
                "WhittleNN", "WhittleTensor",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
            ]
        ),

        // Executables.
        .executableTarget(
            name: "coordinator",
            dependencies: ["WhittleCLI", "CoordinatorCommands", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(
            name: "worker",
            dependencies: ["WhittleCLI", "WorkerCommands", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),

        // Load generator for benchmarks/heartbeats.py (not shipped).
        // Fuzz targets (libFuzzer with scripts/fuzz; a corpus replayer when built normally).
        .executableTarget(
            name: "whittle-fuzz",
            dependencies: ["WhittleONNX", "WhittleNN", "WhittleTensor", "WhittleProtocol", "WhittleRounds", "WhittleCompression",
                           "WhittlePKI", .product(name: "X509", package: "swift-certificates")]
        ),
        .executableTarget(
            name: "whittle-loadgen",
            dependencies: ["WhittleHTTPClient", "WhittlePKI", "WhittleProtocol",
                           .product(name: "X509", package: "swift-certificates"), .product(name: "Crypto", package: "swift-crypto")]
        ),

        // Tests.
        .target(name: "WhittleTestSupport", dependencies: ["WhittleTensor", "WhittleONNX"], path: "Tests/WhittleTestSupport"),
        .testTarget(name: "WhittleTensorTests", dependencies: ["WhittleTensor", "WhittleTestSupport"]),
        .testTarget(name: "WhittleONNXTests", dependencies: ["WhittleONNX", "WhittleNN", "WhittleTestSupport"]),
        .testTarget(name: "WhittleNNTests", dependencies: ["WhittleNN", "WhittleONNX", "WhittleTestSupport"]),
        .testTarget(name: "WhittleCompressionTests", dependencies: ["WhittleCompression", "WhittleTensor", "WhittleTestSupport"]),
        .testTarget(name: "WhittleProtocolTests", dependencies: ["WhittleProtocol"]),
        .testTarget(name: "WhittleIOTests", dependencies: ["WhittleIO", "WhittleONNX", "WhittleTensor", "WhittleTestSupport"]),
        .testTarget(name: "WhittleCLITests", dependencies: ["WhittleTestSupport", "WhittleTensor"]),
        .testTarget(name: "WhittlePKITests", dependencies: ["WhittlePKI", .product(name: "X509", package: "swift-certificates"), .product(name: "Crypto", package: "swift-crypto"), .product(name: "SwiftASN1", package: "swift-asn1")]),
        .testTarget(name: "WhittleStoreTests", dependencies: ["WhittleStore", "WhittleTestSupport", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "WhittlePrivacyTests", dependencies: ["WhittlePrivacy", "WhittleNN", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "WhittleServerTests", dependencies: ["WhittleServer", "CoordinatorCommands", "WhittleStore", "WhittleRounds", "WhittleProtocol", "WhittleCompression", "WhittleONNX", "WhittleTestSupport", "WhittleCLI", "WhittleIO", "WhittlePKI",
                                                                .product(name: "Logging", package: "swift-log"),
                                                                .product(name: "Hummingbird", package: "hummingbird"),
                                                                .product(name: "HummingbirdTesting", package: "hummingbird"),
                                                                .product(name: "X509", package: "swift-certificates")]),
        .testTarget(name: "WhittleRoundsTests", dependencies: ["WhittleRounds", "WhittleTensor", "WhittleONNX", "WhittleNN", "WhittleCompression", "WhittleProtocol", "WhittlePrivacy", "WhittleTestSupport"]),
        .testTarget(name: "WhittleHTTPClientTests", dependencies: ["WhittleHTTPClient", "WhittleTestSupport",
                                                                    .product(name: "Crypto", package: "swift-crypto"),
                                                                    .product(name: "Hummingbird", package: "hummingbird"),
                                                                    .product(name: "HummingbirdTesting", package: "hummingbird")]),
        .testTarget(name: "WhittleAgentTests", dependencies: ["WhittleAgent", "WhittleProtocol", "WhittleHTTPClient", "WhittleTestSupport", "WhittleCLI", "WhittleIO",
                                                               "WhittleCompression", "WhittleONNX", "WhittleTensor",
                                                               .product(name: "Crypto", package: "swift-crypto"),
                                                               .product(name: "Logging", package: "swift-log"),
                                                               .product(name: "Hummingbird", package: "hummingbird"),
                                                               .product(name: "HummingbirdTesting", package: "hummingbird")]),
    ]
)
