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
    /// The process's DNS lookups (`proxy_pass $var` with a host name); nil without a `resolver`.
    public let lookups: NameResolver?
    /// `listen … ssl`: the server's TLS context (nil on a plain listen).
    public let tlsServer: TLSServerContext?
    /// `proxy_ssl on`: the server's TLS context for its upstreams.
    public let tlsClient: TLSClientContext?

    public init(policy: ServerPolicy, listen: ListenSpec, sessionLogger: SessionLogger, errorLog: Logger,
                registry: SessionRegistry, lookups: NameResolver? = nil, tlsServer: TLSServerContext? = nil,
                tlsClient: TLSClientContext? = nil) {
        self.listener = ListenerPolicy(server: policy, listen: listen)
        self.sessionLogger = sessionLogger
        self.errorLog = errorLog
        self.registry = registry
        self.lookups = lookups
        self.tlsServer = listen.ssl ? tlsServer : nil
        self.tlsClient = tlsClient
    }
}

/// Live sessions, so that a graceful stop can wait for them; also hands out `$connection`
/// numbers. A session costs two relaxed atomic operations here (its number and the live
/// count); the engine closes the stragglers itself (`Engine.closeAllSessions`).
public final class SessionRegistry: Sendable {
    private let nextConnection = Atomic<UInt64>(1)
    private let live = Atomic<Int>(0)

    public init() {}

    /// A session began (a TCP connection or a UDP session): its connection number.
    public func openSession() -> UInt64 {
        live.wrappingAdd(1, ordering: .relaxed)
        return nextConnection.wrappingAdd(1, ordering: .relaxed).oldValue
    }

    public func closeSession() { live.wrappingSubtract(1, ordering: .relaxed) }

    public var count: Int { live.load(ordering: .relaxed) }
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
            case .audit(let record): sessionLogger.logRefusal(record, to: policy.auditLog)
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
