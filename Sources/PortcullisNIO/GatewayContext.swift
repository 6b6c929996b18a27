import NIOCore
public import Logging
public import PortcullisPolicy
public import PortcullisTelemetry
import Synchronization

/// What every session of one `server { }` needs: its compiled policy and where to log.
///
/// A class: every session and every client handler keeps it, and as a struct (policy, listen
/// spec, loggers: about 600 bytes) it was copied into each — 1.8 KB of every idle TCP
/// connection's 7.3 KB, and a retain per field on each copy.
public final class ServerRuntime: Sendable {
    /// What the session machines of this listen read.
    public let listener: ListenerPolicy
    public var policy: ServerPolicy { listener.server }
    public var listen: ListenSpec { listener.listen }
    public let sessionLogger: SessionLogger
    public let errorLog: Logger
    public let registry: SessionRegistry

    public init(policy: ServerPolicy, listen: ListenSpec, sessionLogger: SessionLogger, errorLog: Logger,
                registry: SessionRegistry) {
        self.listener = ListenerPolicy(server: policy, listen: listen)
        self.sessionLogger = sessionLogger
        self.errorLog = errorLog
        self.registry = registry
    }
}

/// Live sessions, so that a graceful stop can wait for them and then close the stragglers.
/// Also hands out `$connection` numbers.
public final class SessionRegistry: Sendable {
    private let nextConnection = Atomic<UInt64>(1)
    /// How to end each live session: close its client connection (TCP) or end it (UDP).
    private let live = Mutex<[UInt64: @Sendable () -> Void]>([:])

    public init() {}

    func open(_ channel: any Channel) -> UInt64 {
        open { channel.close(promise: nil) }
    }

    /// A session without a channel of its own (UDP): `end` is how a drain stops it.
    func open(end: @escaping @Sendable () -> Void) -> UInt64 {
        let id = nextConnection.wrappingAdd(1, ordering: .relaxed).oldValue
        live.withLock { $0[id] = end }
        return id
    }

    func close(_ id: UInt64) {
        _ = live.withLock { $0.removeValue(forKey: id) }
    }

    public var count: Int { live.withLock { $0.count } }

    /// Closes every live session's client connection (the end of a drain).
    public func closeAll() {
        let ends = live.withLock { Array($0.values) }
        for end in ends { end() }
    }
}

extension ServerRuntime {
    /// Writes what a session machine noted: error-log lines and dry runs' audit lines.
    func write(_ notes: [SessionMachine.Note], connection: UInt64) {
        for note in notes {
            switch note {
            case .log(let level, let message): errorLog.log(level, message, connection: connection)
            case .audit(let record): sessionLogger.logRefusal(record)
            }
        }
    }
}

extension Logger {
    /// A line at an nginx level for session `connection` (`*N` in the error log).
    func log(_ level: ErrorLogSpec.Level, _ message: String, connection: UInt64) {
        var logger = self
        logger[metadataKey: "connection"] = "\(connection)"
        logger.log(level: ErrorLogHandler.swiftLogLevel(level), "\(message)")
    }
}
