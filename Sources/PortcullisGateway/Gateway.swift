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

/// The running gateway: the epoll engine's loops (TCP and UDP), listeners, logs. A `Service`,
/// so it runs inside a swift-service-lifecycle `ServiceGroup` and stops when graceful shutdown
/// is triggered.
public final class Gateway: Service, Sendable {
    public let snapshot: PolicySnapshot
    public let errorLog: Logger
    private let errorLogFile: LogFile
    private let sessionLogger: SessionLogger
    private let registry = SessionRegistry()
    /// Every session's relay: the epoll engine (docs/decisions/0012-relay-engine.md).
    private let engine: Engine
    private let boxes: [RuntimeBox]
    private let addresses = Mutex<[SocketEndpoint]>([])
    /// How long a stop waits for sessions; nil = until they end. Set by the signal that stops us.
    private let drainTimeout = Mutex<TimeAmount?>(.seconds(5))
    /// `geoip2 … { auto_reload T; }` timers, on their own queue so that opening and checking a
    /// new database never stalls an event loop.
    private let reloadTimers = Mutex<[ReloadTimer]>([])
    /// `health_check`s, on a thread of their own; nil when the rules have none.
    private let healthChecker: HealthChecker?
    /// DNS lookups (`server NAME resolve`, `proxy_pass $var` with a host name) on a thread of
    /// their own; nil when the rules have no `resolver`.
    private let nameResolver: NameResolver?

    /// The last reload failure logged for one database; touched only on the reload queue.
    private final class LastFailure: @unchecked Sendable {
        var message: String?
    }

    /// A dispatch timer is thread-safe (resume/cancel from any thread) but not declared Sendable.
    private struct ReloadTimer: @unchecked Sendable {
        let source: any DispatchSourceTimer
    }

    public init(snapshot: PolicySnapshot) throws {
        self.snapshot = snapshot
        errorLogFile = try LogFile(path: snapshot.main.errorLog.path)
        let file = errorLogFile
        let level = snapshot.main.errorLog.level
        errorLog = Logger(label: "portcullis") { _ in ErrorLogHandler(file: file, level: level) }
        let sessionLogger = try SessionLogger(snapshot: snapshot)
        self.sessionLogger = sessionLogger
        let threads = snapshot.main.workerProcesses ?? System.coreCount
        engine = try Engine(loopCount: threads)
        let errorLog = self.errorLog
        let registry = self.registry
        let needsLookups = !snapshot.resolutions.isEmpty || snapshot.servers.contains { $0.resolver != nil }
        let lookups = needsLookups ? NameResolver(resolutions: snapshot.resolutions, errorLog: errorLog) : nil
        nameResolver = lookups
        var boxes: [RuntimeBox] = []
        for server in snapshot.servers {
            // One TLS context per server, shared by its listens and loops; a certificate that
            // does not load stops the start here (docs/decisions/0013-tls-library.md).
            let (tlsServer, tlsClient) = try Self.tlsContexts(for: server)
            for listen in server.listens {
                boxes.append(RuntimeBox(ServerRuntime(policy: server, listen: listen, sessionLogger: sessionLogger,
                                                      errorLog: errorLog, registry: registry, lookups: lookups,
                                                      tlsServer: tlsServer, tlsClient: tlsClient)))
            }
        }
        self.boxes = boxes
        healthChecker = snapshot.healthChecks.isEmpty ? nil : HealthChecker(checks: snapshot.healthChecks, errorLog: errorLog)
        if let timeout = snapshot.main.workerShutdownTimeoutMilliseconds {
            drainTimeout.withLock { $0 = .milliseconds(Int64(timeout)) }
        }
    }

    /// Binds every listener. Throws `ListenError` (and binds nothing) if one cannot be bound.
    public func start() async throws {
        var bound: [SocketEndpoint] = []
        do {
            for box in boxes { bound.append(try await engine.bind(box)) }
        } catch {
            await engine.closeListeners()
            throw error
        }
        addresses.withLock { $0 = bound }
        startGeoIPReloads()
        healthChecker?.start()
        nameResolver?.start()
        errorLog.notice("portcullis started, listening on \(boxes.map(\.runtime.listen.description).joined(separator: ", "))")
    }

    private func startGeoIPReloads() {
        let queue = DispatchQueue(label: "portcullis.geoip-reload")
        let errorLog = self.errorLog
        var timers: [ReloadTimer] = []
        for case let database as ReloadableGeoIPDatabase in snapshot.geoipDatabases {
            guard let interval = database.autoReloadMilliseconds else { continue }
            errorLog.info("geoip2 \"\(database.path)\" loaded, build epoch \(database.metadata(.buildEpoch)), checked every \(interval) ms")
            let timer = DispatchSource.makeTimerSource(queue: queue)
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
            timers.append(ReloadTimer(source: timer))
        }
        reloadTimers.withLock { $0 = timers }
    }

    /// The addresses actually bound (tests listen on ephemeral ports).
    public var boundAddresses: [SocketAddress] {
        addresses.withLock { $0.map(\.socketAddress) }
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

    /// Stops accepting, lets sessions finish up to the drain timeout, closes the rest, and
    /// writes every pending log line.
    public func stop() async {
        // (A UDP listener's sessions end with it: no more datagrams can reach them.)
        await engine.closeListeners()
        reloadTimers.withLock { timers in
            timers.forEach { $0.source.cancel() }
            timers = []
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
        nameResolver?.stop()
        healthChecker?.stop()
        if registry.count > 0 {
            await engine.closeAllSessions()
            // Give the closes a moment to run their log phase.
            for _ in 0..<100 where registry.count > 0 { try? await Task.sleep(for: .milliseconds(10)) }
        }
        await engine.shutdown()
        errorLog.notice("exiting")
        sessionLogger.closeAll()
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

    /// SIGHUP, until rule reloading lands (issue #15): every server's certificates and keys
    /// are read again and new handshakes use them; live sessions keep the context they began
    /// with (OpenSSL holds it). A server whose files do not load keeps its current ones, with
    /// an error line. Returns how many servers took new certificates, and the failures.
    @discardableResult
    public func reloadCertificates() -> (reloaded: Int, failures: [String]) {
        var fresh: [Int: (TLSServerContext?, TLSClientContext?)] = [:]
        var failures: [String] = []
        for server in snapshot.servers where server.tls != nil || server.upstreamTLS.enabled {
            do throws(TLSSetupError) {
                fresh[server.ordinal] = try Self.tlsContexts(for: server)
            } catch {
                failures.append("\(error)")
                errorLog.error("certificates of the server at \(server.location) were not reloaded, the loaded ones stay in use: \(error)")
            }
        }
        for box in boxes {
            let old = box.runtime
            guard let (tlsServer, tlsClient) = fresh[old.policy.ordinal] else { continue }
            box.replace(with: ServerRuntime(policy: old.policy, listen: old.listen, sessionLogger: old.sessionLogger,
                                            errorLog: old.errorLog, registry: old.registry, lookups: old.lookups,
                                            tlsServer: tlsServer, tlsClient: tlsClient))
        }
        if !fresh.isEmpty || !failures.isEmpty {
            errorLog.notice("certificates reloaded for \(fresh.count) server(s)\(failures.isEmpty ? "" : ", \(failures.count) kept their old ones")")
        }
        return (fresh.count, failures)
    }

    public func reopenLogs() {
        errorLog.notice("reopening logs")
        sessionLogger.reopenAll()
        errorLogFile.reopen()
    }

    /// Test hook: wait until every queued log line is written.
    public func flushLogs() {
        sessionLogger.flushAll()
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
