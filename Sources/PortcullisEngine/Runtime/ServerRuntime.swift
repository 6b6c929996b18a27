public import Logging
import Glibc
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
///
/// A TCP session costs two relaxed atomic operations here (its number and the live count);
/// its engine closes the stragglers itself (`Engine.closeAllSessions`). A UDP session leaves
/// how to end it (`open(end:)`).
public final class SessionRegistry: Sendable {
    private let nextConnection = Atomic<UInt64>(1)
    private let liveStreams = Atomic<Int>(0)
    /// How to end each live UDP session.
    private let live = Mutex<[UInt64: @Sendable () -> Void]>([:])

    public init() {}

    /// A TCP session began: its connection number.
    public func openStream() -> UInt64 {
        liveStreams.wrappingAdd(1, ordering: .relaxed)
        return nextConnection.wrappingAdd(1, ordering: .relaxed).oldValue
    }

    public func closeStream() { liveStreams.wrappingSubtract(1, ordering: .relaxed) }

    /// A session without a connection of its own (UDP): `end` is how a drain stops it.
    public func open(end: @escaping @Sendable () -> Void) -> UInt64 {
        let id = nextConnection.wrappingAdd(1, ordering: .relaxed).oldValue
        live.withLock { $0[id] = end }
        return id
    }

    public func close(_ id: UInt64) {
        _ = live.withLock { $0.removeValue(forKey: id) }
    }

    public var count: Int { liveStreams.load(ordering: .relaxed) + live.withLock { $0.count } }

    /// Ends every live UDP session (the end of a drain; TCP sessions are the engine's).
    public func closeAll() {
        let ends = live.withLock { Array($0.values) }
        for end in ends { end() }
    }
}

/// The current runtime of one listener. Reload swaps it; every accept reads it once, so a
/// session keeps the policy it started with.
public final class RuntimeBox: Sendable {
    private let current: Mutex<ServerRuntime>

    public init(_ runtime: ServerRuntime) { current = Mutex(runtime) }
    public var runtime: ServerRuntime { current.withLock { $0 } }
    public func replace(with runtime: ServerRuntime) { current.withLock { $0 = runtime } }
}

/// A `listen` that could not be bound.
public struct ListenError: Error, CustomStringConvertible {
    public var listen: ListenSpec
    /// What the system said: "Address already in use (98)".
    public var reason: String

    public init(listen: ListenSpec, reason: String) {
        self.listen = listen
        self.reason = reason
    }

    public init(listen: ListenSpec, errno: Int32) {
        self.init(listen: listen, reason: "\(String(cString: strerror(errno))) (\(errno))")
    }

    public var description: String { "cannot listen on \(listen) (\(listen.location)): \(reason)" }
}

extension ServerRuntime {
    /// Writes what a session machine noted: error-log lines and dry runs' audit lines.
    public func write(_ notes: [SessionMachine.Note], connection: UInt64) {
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
    public func log(_ level: ErrorLogSpec.Level, _ message: String, connection: UInt64) {
        var logger = self
        logger[metadataKey: "connection"] = "\(connection)"
        logger.log(level: ErrorLogHandler.swiftLogLevel(level), "\(message)")
    }
}
