import ArgumentParser
import Crypto
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import WhittleAgent
import WhittleCLI
import WhittleIO
import WhittleCompression
import WhittleHTTPClient
import WhittleNN
import WhittlePKI
import WhittleProtocol
import WhittleRounds
import WhittleTensor
import X509

/// `worker enroll`.
public struct EnrollCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "enroll",
        abstract: "Enroll this board with a coordinator: make a key here, check the CA's fingerprint, get a certificate.",
        discussion: """
            The private key is generated on the board and never leaves it; the coordinator signs a certificate \
            request for it. The CA the coordinator sends is accepted only if its SHA-256 fingerprint equals \
            --ca-fingerprint (printed by coordinator token create).
            """)

    @Option(name: .long, help: "The coordinator's URL, https://HOST:PORT.") var coordinator: String
    @Option(name: .long, help: "The enrollment token.") var token: String
    @Option(name: .long, help: "The SHA-256 fingerprint of the coordinator's CA.") var caFingerprint: String
    @Option(name: .long, help: "This worker's directory (created).") var dir: String
    @Option(name: .long, help: "The worker's name (default: the host name).") var name: String?
    @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

    public init() {}

    public func validate() throws {
        guard coordinator.hasPrefix("https://") else { throw ValidationError("--coordinator must be an https:// URL") }
        if let name, !PKI.isValidWorkerName(name) {
            throw ValidationError("--name must be 1–64 letters, digits, '.', '-' or '_'")
        }
        guard PKI.normalizedFingerprint(caFingerprint).count == 64 else {
            throw ValidationError("--ca-fingerprint must be a SHA-256 fingerprint (64 hex digits)")
        }
    }

    public func run() throws {
        let layout = WorkerLayout(dir)
        let fm = FileManager.default
        if fm.fileExists(atPath: layout.state) || fm.fileExists(atPath: layout.key) {
            throw CLIError("\(dir) already holds an enrollment; use another --dir (a worker never overwrites its key)")
        }
        let workerName = name ?? ProcessInfo.processInfo.hostName.split(separator: ".").first.map(String.init) ?? "worker"
        guard PKI.isValidWorkerName(workerName) else {
            throw CLIError("the host name '\(workerName)' is not a valid worker name; give --name")
        }
        // 1. Fetch the CA without trusting anyone yet, and accept it only with the expected fingerprint.
        let bootstrap = HTTPClient(baseURL: coordinator, credentials: TLSCredentials(verifyPeer: false))
        let caResponse: HTTPResponse
        do {
            caResponse = try bootstrap.send("GET", "/v1/ca", retry: RetryPolicy(attempts: 4))
        } catch let error as HTTPClientError {
            throw CLIError("cannot reach \(coordinator): \(error.description)")
        }
        guard caResponse.status == 200, let ca = try? Certificate(pemEncoded: caResponse.text) else {
            throw CLIError("\(coordinator) did not send a CA certificate (\(errorMessage(caResponse)))")
        }
        let fingerprint = try PKI.fingerprint(ca)
        guard fingerprint == PKI.normalizedFingerprint(caFingerprint) else {
            throw CLIError("the coordinator's CA has fingerprint \(fingerprint), not the expected \(PKI.normalizedFingerprint(caFingerprint)); refusing to enroll (wrong server, or someone in between)")
        }
        let caPEM = caResponse.text
        // 2. Key and CSR made here; enroll over TLS verified against that CA.
        let key = P256.Signing.PrivateKey()
        var request = Whittle_EnrollRequest()
        request.protocolVersion = protocolVersion
        request.token = token
        request.csrDer = Data(try PKI.makeCSR(name: workerName, key: key))
        let client = HTTPClient(baseURL: coordinator, credentials: TLSCredentials(caPEM: caPEM))
        let response: HTTPResponse
        do {
            response = try client.send("POST", "/v1/enroll", body: try request.serializedBytes(),
                                       contentType: "application/x-protobuf", retry: RetryPolicy(attempts: 6))
        } catch let error as HTTPClientError {
            throw CLIError("enrollment failed: \(error.description)")
        }
        guard response.status == 200 else { throw CLIError("enrollment refused: \(errorMessage(response))") }
        let answer: Whittle_EnrollResponse
        let certificate: Certificate
        do {
            answer = try Whittle_EnrollResponse(serializedBytes: response.body)
            certificate = try Certificate(derEncoded: Array(answer.certificateDer))
        } catch {
            throw CLIError("the coordinator's enrollment answer is malformed")
        }
        guard certificate.publicKey == Certificate.PublicKey(key.publicKey) else {
            throw CLIError("the coordinator's certificate is not for this board's key")
        }
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        guard chmod(dir, 0o700) == 0 else { throw CLIError("cannot restrict \(dir) to its owner (chmod 0700)") }
        try Files.writeNew(key.pemRepresentation, to: layout.key, mode: 0o600)
        try Files.writeNew(try certificate.serializeAsPEM().pemString, to: layout.certificate, mode: 0o644)
        // The CAs to trust from now on, as the coordinator (verified with the pinned CA) lists them: during a CA
        // rotation the next CA too.
        let trustedPEM = answer.trustedCaDer.isEmpty ? caPEM : try CertificateRenewal.bundle(answer.trustedCaDer)
        try Files.writeNew(trustedPEM, to: layout.ca, mode: 0o644)
        try WorkerState(name: answer.name, coordinator: coordinator, caFingerprint: fingerprint, enrolledAt: Date()).save(layout)
        if !fm.fileExists(atPath: layout.settings) { try Files.writeNew(WorkerSettings.template, to: layout.settings, mode: 0o600) }
        if json {
            try printJSON(["name": answer.name, "coordinator": coordinator, "certificateSerial": PKI.serial(certificate)])
        } else {
            print("enrolled as '\(answer.name)' with \(coordinator); start the agent with: worker run --dir \(dir) --data X.npy")
        }
    }
}

/// `worker run`: the long-running agent.
public struct RunCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run the worker agent: heartbeat with capabilities, poll for tasks, stay connected across restarts.")

    @Option(name: .long, help: "This worker's directory (from worker enroll; default: WHITTLE_WORKER_DIR).") var dir: String?
    @Option(name: .long, help: "The board's local samples: .npy (one input) or .npz (one array per model input, by name).") var data: String?
    @Option(name: .long, help: "Labels of the samples (.npy): one per sample [N], or per pixel [N, H, W].") var labels: String?
    @Option(name: .long, help: "Held-out local samples (.npy or .npz) for the evaluation phase (default: --data).") var evalData: String?
    @Option(name: .long, help: "Labels of --eval-data (.npy).") var evalLabels: String?
    @Option(name: .long, help: "Memory budget for jobs, e.g. 1GB (the batch size shrinks to fit, by the engine's estimate).") var memoryLimit: String?
    @Option(name: .long, help: "Compute threads for jobs (default: all cores).") var threads: Int?
    @Flag(name: .long, help: "This board cannot time models (a shared or throttled machine): it takes no latency task.") var noTiming = false
    @Option(name: .long, help: "Stop after this many successful heartbeats (for tests and scripts).") var heartbeats: Int?
    @Option(name: .long, help: "Log lines as text or json (JSON objects on standard error).") var logFormat: String?
    @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical.") var logLevel: String?

    public init() {}

    public func validate() throws {
        if let memoryLimit, parseByteSize(memoryLimit) == nil { throw ValidationError("--memory-limit '\(memoryLimit)' is not a size like 1GB") }
        if let heartbeats, heartbeats < 1 { throw ValidationError("--heartbeats must be at least 1") }
        if evalLabels != nil, evalData == nil { throw ValidationError("--eval-labels needs --eval-data") }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
    }

    public func run() throws {
        let environment = ProcessInfo.processInfo.environment
        guard let dir = dir ?? environment["WHITTLE_WORKER_DIR"] else {
            throw CLIError("worker run needs --dir (or WHITTLE_WORKER_DIR): the directory worker enroll made")
        }
        let layout = WorkerLayout(dir)
        var state = try WorkerState.load(layout)
        // Flags override DIR/worker.conf and WHITTLE_WORKER_* variables.
        var settings = try WorkerSettings.load(file: layout.settings, environment: environment)
        for (key, value) in [("data", data), ("labels", labels), ("eval_data", evalData), ("eval_labels", evalLabels),
                             ("memory_limit", memoryLimit), ("threads", threads.map(String.init)), ("log_format", logFormat),
                             ("log_level", logLevel)] {
            if let value { try settings.set(key, value) }
        }
        if noTiming { settings.noTiming = true }
        guard let data = settings.data else {
            throw CLIError("worker run needs the board's samples: --data X.npy, data = X.npy in \(layout.settings), or WHITTLE_WORKER_DATA")
        }
        if settings.evalLabels != nil, settings.evalData == nil { throw CLIError("eval_labels needs eval_data") }
        let (labels, evalData, evalLabels, memoryLimit) = (settings.labels, settings.evalData, settings.evalLabels, settings.memoryLimit)
        let format = try LogFormat.resolve(settings.logFormat, environment: environment)
        format.bootstrap()
        let log = AgentLog(format: format, level: try LogFormat.level(settings.logLevel, environment: environment), worker: state.name)
        if let threads = settings.threads { ComputeThreads.set(threads) }
        let read = { (path: String) throws -> String in
            do { return try String(contentsOfFile: path, encoding: .utf8) } catch { throw CLIError("cannot read \(path)") }
        }
        let dataset = try Files.readDataset(data, labels: labels)
        let evaluation = try evalData.map { try Files.readDataset($0, labels: evalLabels) }
        var capabilities = Whittle_Capabilities()
        capabilities.cores = UInt32(ProcessInfo.processInfo.activeProcessorCount)
        capabilities.memoryBytes = ProcessInfo.processInfo.physicalMemory
        capabilities.samples = UInt64(dataset.count)
        capabilities.labels = dataset.labels != nil
        capabilities.version = WhittleVersion.string
        capabilities.memoryLimitBytes = UInt64(memoryLimit.flatMap(parseByteSize) ?? 0)
        capabilities.evaluationSamples = UInt64(evaluation?.count ?? 0)
        capabilities.cpu = Kernels.cpuInstructionSet
        capabilities.threads = UInt32(ComputeThreads.current)
        capabilities.noTiming = settings.noTiming
        var heartbeat = Whittle_Heartbeat()
        heartbeat.protocolVersion = protocolVersion
        heartbeat.capabilities = capabilities
        try CertificateRenewal.recover(layout)
        let client = HTTPClient(baseURL: state.coordinator, credentials: TLSCredentials(
            caPEM: try read(layout.ca), certificatePEM: try read(layout.certificate), privateKeyPEM: try read(layout.key)))
        client.timeout = 30
        let coordinator = CurlCoordinator(client: client)
        func presented(_ certificate: Certificate) throws -> AgentMachine.Certificate {
            AgentMachine.Certificate(notValidBefore: certificate.notValidBefore, notValidAfter: certificate.notValidAfter,
                                     trust: try PKI.trustFingerprint(try PKI.certificates(pem: try read(layout.ca))))
        }
        let current = try Certificate(pemEncoded: try read(layout.certificate))
        guard current.notValidAfter > Date() else {
            throw CLIError("this worker's certificate expired at \(ISO8601DateFormatter().string(from: current.notValidAfter)); the coordinator refuses it at the TLS handshake. Enroll again with a new token.")
        }
        // Idle heartbeats ask the coordinator to hold them until a task is ready (long polling), for at most the
        // poll interval it last answered and well within the client's timeout (`AgentMachine`).
        var machine = AgentMachine(certificate: try presented(current), heartbeats: heartbeats, clientTimeout: client.timeout,
                                   clockSkewAllowance: PKI.clockSkewAllowance)
        let runner = TaskRunner(client: client, layout: layout, data: dataset, evaluation: evaluation, memoryLimit: memoryLimit.flatMap(parseByteSize),
                                log: log)
        runner.progress = ProgressBar(enabled: !log.json)
        runner.timing = !settings.noTiming
        log.info("worker '\(state.name)' running against \(state.coordinator) with \(capabilities.samples) samples",
                 ["coordinator": "\(state.coordinator)", "samples": "\(capabilities.samples)"])
        while true {
            let asked = Date()
            heartbeat.capabilities.secureRounds = runner.secure.keys.sorted()
            let outcome = coordinator.heartbeat(machine.idleHeartbeat(heartbeat))
            var actions = machine.heartbeatReturned(outcome, askedAt: asked, now: Date()) { runner.finished.contains(TaskRunner.key($0)) }
            if case .answered = outcome {
                state.lastHeartbeatAt = Date()
                state.heartbeats += 1
            }
            state.lastError = machine.lastError
            if case .unreachable(let message) = outcome, case .sleep(let wait)? = actions.first {
                log.warning("coordinator unreachable (\(message)); retrying in \(String(format: "%.1f", wait)) s",
                            ["error": "\(message)", "retry.seconds": "\(String(format: "%.1f", wait))"])
            }
            // Perform the machine's actions until it says to sleep or stop.
            performing: while let action = actions.first {
                actions.removeFirst()
                switch action {
                case .renewCertificate:
                    do {
                        let renewed = try CertificateRenewal.renew(client: client, layout: layout, name: state.name)
                        let before = machine.certificate.trust
                        actions += machine.renewed(try presented(renewed), now: Date())
                        log.info("certificate renewed: serial \(PKI.serial(renewed)), valid until \(ISO8601DateFormatter().string(from: renewed.notValidAfter))",
                                 ["certificate.serial": "\(PKI.serial(renewed))"])
                        if machine.certificate.trust != before {
                            log.info("trusted CAs updated: \(try PKI.certificates(pem: try read(layout.ca)).compactMap(PKI.commonName).joined(separator: ", "))",
                                     ["trust.fingerprint": "\(machine.certificate.trust)"])
                        }
                    } catch {
                        actions += machine.renewalFailed("\(error)", now: Date())
                        log.warning("certificate renewal failed (the current certificate stays in use; retried after \(ISO8601DateFormatter().string(from: machine.nextRenewal))): \(error)",
                                    ["error": "\(error)"])
                    }
                case .run(let task):
                    try? state.save(layout)
                    var busy = heartbeat
                    // A key task makes the round's secrets: its heartbeats say so already.
                    busy.capabilities.secureRounds = (runner.secure.keys + (task.kind == "secure-keys" ? [task.roundID] : [])).sorted()
                    busy.workingOn = TaskRunner.key(task)
                    let beat = BusyHeartbeat(client: HTTPClient(baseURL: client.baseURL, credentials: client.credentials),
                                             body: try busy.serializedBytes(), seconds: machine.pollSeconds)
                    log.info("task \(task.kind): round \(task.roundID), phase \(task.phase)",
                             ["round.id": "\(task.roundID)", "phase": "\(task.phase)", "task.kind": "\(task.kind)"])
                    runner.run(task)
                    beat.stop()
                    actions += machine.taskFinished()
                case .sleep(let seconds):
                    try? state.save(layout)
                    Thread.sleep(forTimeInterval: seconds)
                    break performing
                case .stop(let reason):
                    try? state.save(layout)
                    switch reason {
                    case .heartbeatsDone: return
                    case .refused(let message): throw CLIError("the coordinator refuses this worker: \(message)")
                    case .certificateExpired(let at):
                        throw CLIError("this worker's certificate expired at \(ISO8601DateFormatter().string(from: at)); the coordinator refuses it at the TLS handshake. Enroll again with a new token.")
                    }
                }
            }
        }
    }
}

/// `worker status`.
public struct StatusCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(commandName: "status", abstract: "Show this worker's enrollment and last contact.")

    @Option(name: .long, help: "This worker's directory.") var dir: String
    @Flag(name: .long, help: "Print machine-readable JSON.") var json = false

    public init() {}

    struct Report: Encodable {
        var name: String
        var coordinator: String
        var enrolledAt: Date
        var lastHeartbeatAt: Date?
        var heartbeats: Int
        var lastError: String?
        var certificateSerial: String
        var certificateExpiresAt: Date
    }

    public func run() throws {
        let layout = WorkerLayout(dir)
        let state = try WorkerState.load(layout)
        let certificate = try Certificate(pemEncoded: try String(contentsOfFile: layout.certificate, encoding: .utf8))
        let report = Report(name: state.name, coordinator: state.coordinator, enrolledAt: state.enrolledAt,
                            lastHeartbeatAt: state.lastHeartbeatAt, heartbeats: state.heartbeats, lastError: state.lastError,
                            certificateSerial: PKI.serial(certificate), certificateExpiresAt: certificate.notValidAfter)
        if json {
            let encoder = JSONEncoder()
            encoder.dateEncodingStrategy = .iso8601
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            let f = ISO8601DateFormatter()
            print("worker '\(report.name)' enrolled with \(report.coordinator) at \(f.string(from: report.enrolledAt))")
            print("certificate \(report.certificateSerial), valid until \(f.string(from: report.certificateExpiresAt))")
            print("heartbeats: \(report.heartbeats), last: \(report.lastHeartbeatAt.map { f.string(from: $0) } ?? "never")")
            if let e = report.lastError { print("last error: \(e)") }
        }
    }
}

/// `worker fetch`: downloads an artifact (a compressed model) by its SHA-256, resuming a partial download.
public struct FetchCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "fetch",
        abstract: "Download an artifact from the coordinator by its SHA-256, resuming a partial file, and verify it.")

    @Argument(help: "The artifact's SHA-256 (lowercase hex).") var sha256: String
    @Option(name: .long, help: "This worker's directory.") var dir: String
    @Option(name: .long, help: "Where to write the file.") var out: String

    public init() {}

    public func validate() throws {
        guard sha256.count == 64, sha256.allSatisfy({ $0.isHexDigit }) else { throw ValidationError("the SHA-256 must be 64 hex digits") }
    }

    public func run() throws {
        let layout = WorkerLayout(dir)
        let state = try WorkerState.load(layout)
        let read = { (path: String) throws -> String in
            do { return try String(contentsOfFile: path, encoding: .utf8) } catch { throw CLIError("cannot read \(path)") }
        }
        let client = HTTPClient(baseURL: state.coordinator, credentials: TLSCredentials(
            caPEM: try read(layout.ca), certificatePEM: try read(layout.certificate), privateKeyPEM: try read(layout.key)))
        let bar = ProgressBar()
        do {
            defer { bar.finish() }
            try client.download("/v1/worker/artifacts/" + sha256.lowercased(), to: out, sha256: sha256,
                                retry: RetryPolicy(attempts: 5, baseDelay: 0.5, maximumDelay: 10)) { have, total in
                bar.bytes("download", have, total)
            }
        } catch let error as HTTPClientError {
            throw CLIError(error.description)
        }
        print("fetched \(out) (SHA-256 verified)")
    }
}

extension ProgressBar: TransferProgress {}
