#if canImport(Glibc)
import Glibc
#endif
import Foundation
public import Logging
public import NIOCore
public import PortcullisPolicy
public import PortcullisEngine
import PortcullisCore
import PortcullisGeoIP
import PortcullisTelemetry
public import ServiceLifecycle
import Synchronization

/// The running gateway: the epoll engine's loops (TCP and UDP), listeners, logs, and the rules
/// they run on, which `reload` replaces without closing a kept listener
/// (docs/decisions/0014-hot-reload.md). A `Service`, so it runs inside a
/// swift-service-lifecycle `ServiceGroup` and stops when graceful shutdown is triggered.
public final class Gateway: Service, Sendable {
    /// The rules running now (a reload replaces them; live sessions keep theirs).
    public var snapshot: PolicySnapshot { current.withLock { $0.snapshot } }
    public let errorLog: Logger
    let errorLogFile: LogFile
    /// `metrics_listen`: the counters every session adds to, and the endpoint that serves them.
    let metrics: GatewayMetrics?
    private let metricsEndpoint = Mutex<MetricsEndpoint?>(nil)
    /// Access and audit log files, shared by the rules running and the rules replaced.
    let logFiles = LogFilePool()
    let registry = SessionRegistry()
    /// Every session's relay: the epoll engine (docs/decisions/0012-relay-engine.md).
    let engine: Engine
    /// Each bound listen's key (`ListenSpec.description`) and the address it got.
    let addresses = Mutex<[(key: String, endpoint: SocketEndpoint)]>([])
    /// How long a stop waits for sessions; nil = until they end. Set by the signal that stops us.
    let drainTimeout = Mutex<TimeAmount?>(.seconds(5))
    /// `geoip2 … { auto_reload T; }` timers by database, on their own queue so that opening and
    /// checking a new database never stalls an event loop.
    private let reloadTimers = Mutex<[ObjectIdentifier: ReloadTimer]>([:])
    private let geoipQueue = DispatchQueue(label: "portcullis.geoip-reload")
    /// What the running rules run on.
    let current: Mutex<Generation>
    /// Reloads one at a time (the signal queue and tests may both ask): each waits for the
    /// one before it.
    let lastReload = Mutex<Task<ReloadReport, Never>?>(nil)
    /// Reload attempts so far (`portcullis reload` waits for the number to move on).
    let reloadAttempts = Atomic<Int>(0)
    /// Resolvers a reload replaced: they answer the lookups of sessions begun before it for a
    /// while, and are stopped at the latest with the gateway.
    let retiredResolvers = Mutex<[NameResolver]>([])

    /// One compiled rule file and what runs it.
    struct Generation: Sendable {
        /// 1 at start, one more for every reload that took.
        var number: Int
        var snapshot: PolicySnapshot
        var sessionLogger: SessionLogger
        /// Every listen's box, in the file's order, by `ListenSpec.description` (address, port, udp).
        var boxes: [(key: String, box: RuntimeBox)]
        /// `health_check`s, on a thread of their own; nil when the rules have none.
        var healthChecker: HealthChecker?
        /// DNS lookups (`server NAME resolve`, `proxy_pass $var` with a host name) on a thread
        /// of their own; nil when the rules have no `resolver`.
        var nameResolver: NameResolver?
    }

    /// The last reload failure logged for one database; touched only on the reload queue.
    private final class LastFailure: @unchecked Sendable {
        var message: String?
    }

    /// A dispatch timer is thread-safe (resume/cancel from any thread) but not declared Sendable.
    private struct ReloadTimer: @unchecked Sendable {
        let source: any DispatchSourceTimer
    }

    public init(snapshot: PolicySnapshot) throws {
        errorLogFile = try LogFile(path: snapshot.main.errorLog.path)
        let file = errorLogFile
        let level = snapshot.main.errorLog.level
        errorLog = Logger(label: "portcullis") { _ in ErrorLogHandler(file: file, level: level) }
        let threads = snapshot.main.workerProcesses ?? System.coreCount
        engine = try Engine(loopCount: threads)
        metrics = snapshot.main.metricsListen == nil ? nil : GatewayMetrics()
        let sessionLogger = try SessionLogger(snapshot: snapshot, pool: logFiles, metrics: metrics)
        let lookups = Self.nameResolver(for: snapshot, errorLog: errorLog)
        var boxes: [(key: String, box: RuntimeBox)] = []
        for server in snapshot.servers {
            // One TLS context per server, shared by its listens and loops; a certificate that
            // does not load stops the start here (docs/decisions/0013-tls-library.md).
            let (tlsServer, tlsClient) = try Self.tlsContexts(for: server)
            for listen in server.listens {
                let runtime = ServerRuntime(policy: server, listen: listen, sessionLogger: sessionLogger, errorLog: errorLog,
                                            registry: registry, lookups: lookups, tlsServer: tlsServer, tlsClient: tlsClient)
                boxes.append((listen.description, RuntimeBox(runtime)))
            }
        }
        let checker = snapshot.healthChecks.isEmpty ? nil : HealthChecker(checks: snapshot.healthChecks, errorLog: errorLog)
        current = Mutex(Generation(number: 1, snapshot: snapshot, sessionLogger: sessionLogger, boxes: boxes,
                                   healthChecker: checker, nameResolver: lookups))
        if let timeout = snapshot.main.workerShutdownTimeoutMilliseconds {
            drainTimeout.withLock { $0 = .milliseconds(Int64(timeout)) }
        }
    }

    static func nameResolver(for snapshot: PolicySnapshot, errorLog: Logger) -> NameResolver? {
        let needsLookups = !snapshot.resolutions.isEmpty || snapshot.servers.contains { $0.resolver != nil }
        return needsLookups ? NameResolver(resolutions: snapshot.resolutions, errorLog: errorLog) : nil
    }

    /// Binds every listener. Throws `ListenError` (and binds nothing) if one cannot be bound.
    public func start() async throws {
        let generation = current.withLock { $0 }
        var bound: [(key: String, endpoint: SocketEndpoint)] = []
        do {
            for (key, box) in generation.boxes { bound.append((key, try await engine.bind(box))) }
        } catch {
            await engine.closeListeners()
            throw error
        }
        if let metrics, let address = generation.snapshot.main.metricsListen {
            do {
                let endpoint = try MetricsEndpoint(endpoint: address, location: generation.snapshot.main.metricsListenLocation) { [weak self] in
                    guard let self else { return [] }
                    return metrics.exposition(snapshot: snapshot, liveSessions: registry.count)
                }
                metricsEndpoint.withLock { $0 = endpoint }
            } catch {
                await engine.closeListeners()
                throw error
            }
        }
        addresses.withLock { $0 = bound }
        scheduleGeoIPReloads(generation.snapshot)
        generation.healthChecker?.start()
        generation.nameResolver?.start()
        errorLog.notice("portcullis started, listening on \(generation.boxes.map(\.key).joined(separator: ", "))")
    }

    /// Starts the `auto_reload` timer of every database of `snapshot` that has none yet, and
    /// stops those of databases it no longer uses.
    func scheduleGeoIPReloads(_ snapshot: PolicySnapshot) {
        let errorLog = self.errorLog
        let databases = snapshot.geoipDatabases.compactMap { $0 as? ReloadableGeoIPDatabase }
        let wanted = Set(databases.map { ObjectIdentifier($0) })
        reloadTimers.withLock { timers in
            for (id, timer) in timers where !wanted.contains(id) {
                timer.source.cancel()
                timers[id] = nil
            }
            for database in databases where timers[ObjectIdentifier(database)] == nil {
                guard let interval = database.autoReloadMilliseconds else { continue }
                errorLog.info("geoip2 \"\(database.path)\" loaded, build epoch \(database.metadata(.buildEpoch)), checked every \(interval) ms")
                let timer = DispatchSource.makeTimerSource(queue: geoipQueue)
                timer.schedule(deadline: .now() + .milliseconds(interval), repeating: .milliseconds(interval))
                let lastFailure = LastFailure()
                timer.setEventHandler {
                    switch database.reloadIfChanged() {
                    case .unchanged: break
                    case .reloaded(let epoch):
                        lastFailure.message = nil
                        errorLog.notice("geoip2 \"\(database.path)\" reloaded, build epoch \(epoch)")
                    case .failed(let message):
                        // A file that stays broken is said once, not every interval.
                        guard lastFailure.message != message else { return }
                        lastFailure.message = message
                        errorLog.error("geoip2 \"\(database.path)\" was not reloaded, the loaded database stays in use: \(message)")
                    }
                }
                timer.resume()
                timers[ObjectIdentifier(database)] = ReloadTimer(source: timer)
            }
        }
    }

    /// Where the metrics endpoint answers (nil without `metrics_listen`).
    public var metricsAddress: SocketAddress? { metricsEndpoint.withLock { $0?.endpoint.socketAddress } }

    /// The addresses actually bound (tests listen on ephemeral ports).
    public var boundAddresses: [SocketAddress] {
        addresses.withLock { $0.map(\.endpoint.socketAddress) }
    }

    /// How the next stop drains: `nil` waits for every session (SIGQUIT without
    /// `worker_shutdown_timeout`), a time closes what is left after it.
    public func setDrainTimeout(_ timeout: TimeAmount?) {
        if snapshot.main.workerShutdownTimeoutMilliseconds == nil {
            let firstSignal = !stopRequested.exchange(true, ordering: .relaxed)
            drainTimeout.withLock { current in
                // After the first stop signal, another may shorten the drain, never lengthen it.
                guard !firstSignal else { current = timeout; return }
                switch (current, timeout) {
                case (nil, _): current = timeout
                case (let existing?, let new?): current = min(existing, new)
                case (_, nil): break
                }
            }
        }
    }

    private let stopRequested = Atomic<Bool>(false)
    let stopping = Atomic<Bool>(false)

    /// Stops accepting, lets sessions finish up to the drain timeout, closes the rest, and
    /// writes every pending log line.
    public func stop() async {
        // A reload under way finishes first; none begins after this.
        stopping.store(true, ordering: .relaxed)
        _ = await lastReload.withLock { $0 }?.value
        let generation = current.withLock { $0 }
        // (A UDP listener's sessions end with it: no more datagrams can reach them.)
        await engine.closeListeners()
        metricsEndpoint.withLock { $0 }?.stop()
        reloadTimers.withLock { timers in
            timers.values.forEach { $0.source.cancel() }
            timers = [:]
        }
        let drainStart = NIODeadline.now()
        if registry.count > 0 {
            errorLog.notice("gracefully shutting down, waiting for \(registry.count) sessions")
        }
        while registry.count > 0 {
            // Read each round: a TERM after a QUIT shortens an unbounded drain.
            if let timeout = drainTimeout.withLock({ $0 }), NIODeadline.now() >= drainStart + timeout { break }
            try? await Task.sleep(for: .milliseconds(20))
        }
        // Lookups and health checks serve the draining sessions too; stopping the resolver
        // answers any lookup still pending with a failure, so no session waits for it.
        generation.nameResolver?.stop()
        retiredResolvers.withLock { $0 }.forEach { $0.stop() }
        generation.healthChecker?.stop()
        if registry.count > 0 {
            await engine.closeAllSessions()
            // Give the closes a moment to run their log phase.
            for _ in 0..<100 where registry.count > 0 { try? await Task.sleep(for: .milliseconds(10)) }
        }
        await engine.shutdown()
        errorLog.notice("exiting")
        generation.sessionLogger.closeAll()
        errorLogFile.close()
    }

    /// What `check` does with TLS, as `nginx -t`: every server's contexts built (certificates,
    /// keys and CA files read, ciphers, curves and ssl_conf_command handed to OpenSSL) and
    /// dropped. The located errors, in order; empty when all load.
    public static func checkTLS(_ snapshot: PolicySnapshot) -> [String] {
        var errors: [String] = []
        for server in snapshot.servers {
            do throws(TLSSetupError) {
                _ = try tlsContexts(for: server)
            } catch {
                errors.append("\(error)")
            }
        }
        return errors
    }

    /// `server`'s TLS contexts: termination (`listen … ssl`) and `proxy_ssl`, nil where unused.
    static func tlsContexts(for server: ServerPolicy) throws(TLSSetupError) -> (TLSServerContext?, TLSClientContext?) {
        let tlsServer = try server.tls.map { settings throws(TLSSetupError) in
            try TLSServerContext(settings: settings, serverLocation: server.location)
        }
        let tlsClient = server.upstreamTLS.enabled ? try TLSClientContext(settings: server.upstreamTLS) : nil
        return (tlsServer, tlsClient)
    }

    public func reopenLogs() {
        errorLog.notice("reopening logs")
        logFiles.reopenAll()
        errorLogFile.reopen()
    }

    /// Test hook: wait until every queued log line is written.
    public func flushLogs() {
        current.withLock { $0 }.sessionLogger.flushAll()
        errorLogFile.flush()
    }

    public var liveSessions: Int { registry.count }

    /// Sessions whose `proxy_timeout` the event loops' sweeps watch (decision 0010); 0 once
    /// every session has ended.
    public func sweptSessions() async -> Int { await engine.watchedSessions() }

    /// Runs until graceful shutdown is triggered. Binds first if `start()` was not called.
    public func run() async throws {
        if addresses.withLock({ $0.isEmpty }) { try await start() }
        try? await gracefulShutdown()
        await stop()
    }
}

extension SocketEndpoint {
    /// As SwiftNIO's address type, which the gateway's callers (the tests' clients) use.
    var socketAddress: SocketAddress {
        if let unixPath, let address = try? SocketAddress(unixDomainSocketPath: unixPath) { return address }
        if let sin = sockaddrIPv4 { return SocketAddress(sin, host: "") }
        return SocketAddress(sockaddrIPv6!, host: "")
    }
}
