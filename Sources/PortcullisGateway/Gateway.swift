#if canImport(Glibc)
import Glibc
#endif
import Foundation
public import Logging
import NIOCore
import NIOPosix
public import PortcullisPolicy
import PortcullisNIO
import PortcullisTelemetry
public import ServiceLifecycle
import Synchronization

/// The running gateway: event loops, listeners, logs. A `Service`, so it runs inside a
/// swift-service-lifecycle `ServiceGroup` and stops when graceful shutdown is triggered.
public final class Gateway: Service, Sendable {
    public let snapshot: PolicySnapshot
    public let errorLog: Logger
    private let errorLogFile: LogFile
    private let sessionLogger: SessionLogger
    private let registry = SessionRegistry()
    private let group: MultiThreadedEventLoopGroup
    private let boxes: [RuntimeBox]
    private let channels = Mutex<[any Channel]>([])
    /// How long a stop waits for sessions; nil = until they end. Set by the signal that stops us.
    private let drainTimeout = Mutex<TimeAmount?>(.seconds(5))

    public init(snapshot: PolicySnapshot) throws {
        self.snapshot = snapshot
        errorLogFile = try LogFile(path: snapshot.main.errorLog.path)
        let file = errorLogFile
        let level = snapshot.main.errorLog.level
        errorLog = Logger(label: "portcullis") { _ in ErrorLogHandler(file: file, level: level) }
        let sessionLogger = try SessionLogger(snapshot: snapshot)
        self.sessionLogger = sessionLogger
        group = MultiThreadedEventLoopGroup(numberOfThreads: snapshot.main.workerProcesses ?? System.coreCount)
        let errorLog = self.errorLog
        let registry = self.registry
        boxes = snapshot.servers.flatMap { server in
            server.listens.map { listen in
                RuntimeBox(ServerRuntime(policy: server, listen: listen, sessionLogger: sessionLogger,
                                         errorLog: errorLog, registry: registry))
            }
        }
        if let timeout = snapshot.main.workerShutdownTimeoutMilliseconds {
            drainTimeout.withLock { $0 = .milliseconds(Int64(timeout)) }
        }
    }

    /// Binds every listener. Throws `ListenError` (and binds nothing) if one cannot be bound.
    public func start() async throws {
        var opened: [any Channel] = []
        do {
            for box in boxes {
                opened += try await Listener.bind(box, group: group)
            }
        } catch {
            for channel in opened { try? await channel.close() }
            throw error
        }
        channels.withLock { $0 = opened }
        errorLog.notice("portcullis started, listening on \(boxes.map(\.runtime.listen.description).joined(separator: ", "))")
    }

    /// The addresses actually bound (tests listen on ephemeral ports).
    public var boundAddresses: [SocketAddress] { channels.withLock { $0.compactMap(\.localAddress) } }

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
        let listening = channels.withLock { channels -> [any Channel] in
            defer { channels = [] }
            return channels
        }
        for channel in listening { try? await channel.close() }
        let drainStart = NIODeadline.now()
        if registry.count > 0 {
            errorLog.notice("gracefully shutting down, waiting for \(registry.count) sessions")
        }
        while registry.count > 0 {
            // Read each round: a TERM after a QUIT shortens an unbounded drain.
            if let timeout = drainTimeout.withLock({ $0 }), NIODeadline.now() >= drainStart + timeout { break }
            try? await Task.sleep(for: .milliseconds(20))
        }
        if registry.count > 0 {
            registry.closeAll()
            // Give the closes a moment to run their log phase.
            for _ in 0..<100 where registry.count > 0 { try? await Task.sleep(for: .milliseconds(10)) }
        }
        try? await group.shutdownGracefully()
        errorLog.notice("exiting")
        sessionLogger.closeAll()
        errorLogFile.close()
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

    /// Runs until graceful shutdown is triggered. Binds first if `start()` was not called.
    public func run() async throws {
        if channels.withLock({ $0.isEmpty }) { try await start() }
        try? await gracefulShutdown()
        await stop()
    }
}
