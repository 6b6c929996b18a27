public import PortcullisCore

/// Everything a running gateway needs, compiled and checked. Immutable: a session pins the
/// snapshot current at accept, and a reload swaps in a new one.
public struct PolicySnapshot: Sendable {
    public var main: MainSettings
    public var servers: [ServerPolicy]
    public var upstreams: [String: UpstreamGroup]
    public var auditLog: AuditLogSpec?
    public var logFormats: [String: LogFormat]

    /// Every file that must be opened for writing: access logs and the audit log.
    public var logPaths: [String] {
        var paths = servers.flatMap { $0.accessLogs.map(\.path) }
        if let auditLog { paths.append(auditLog.path) }
        var seen = Set<String>()
        return paths.filter { seen.insert($0).inserted }
    }
}

/// Main-context settings that are honoured (the rest are accepted and ignored, with a note).
public struct MainSettings: Sendable, Equatable {
    /// nil = one event loop per core (`auto`).
    public var workerProcesses: Int?
    public var workerRlimitNofile: Int?
    /// How long a graceful stop waits for sessions; nil = nginx's default (wait for all).
    public var workerShutdownTimeoutMilliseconds: Int?
    public var pidFile: String?
    public var errorLog: ErrorLogSpec = ErrorLogSpec(path: "stderr", level: .error)
    public var user: String?
    public var group: String?

    public init() {}
}

public struct ErrorLogSpec: Sendable, Equatable {
    public enum Level: String, Sendable, CaseIterable, Comparable {
        case debug, info, notice, warn, error, crit, alert, emerg
        private var rank: Int { Self.allCases.firstIndex(of: self)! }
        public static func < (a: Level, b: Level) -> Bool { a.rank < b.rank }
    }

    public var path: String
    public var level: Level
}

public struct AuditLogSpec: Sendable, Equatable {
    public var path: String
}

public struct AccessLogSpec: Sendable, Equatable {
    public var path: String
    public var format: LogFormat
    /// `if=` condition: the line is skipped when this renders to "" or "0".
    public var condition: LogTemplate?
}

public struct ListenSpec: Sendable, Equatable, CustomStringConvertible {
    public enum Keepalive: Sendable, Equatable {
        case systemDefault
        case off
        case on
        /// Seconds for TCP_KEEPIDLE / TCP_KEEPINTVL and a count for TCP_KEEPCNT; nil = system value.
        case tuned(idle: Int?, interval: Int?, count: Int?)
    }

    /// The address to bind; nginx's `*` and a bare port mean IPv4 any.
    public var address: IPAddress
    public var port: UInt16
    public var reusePort = false
    public var backlog = 511
    public var keepalive = Keepalive.systemDefault
    public var ipv6Only = true
    public var location: SourceLocation
    /// Length of the address as written, for the caret under it in diagnostics.
    public var writtenLength = 1

    public var endpoint: SocketEndpoint { SocketEndpoint(address: address, port: port) }
    public var description: String { endpoint.description }
}

/// One `server { }` block, with stream-level settings already inherited.
public struct ServerPolicy: Sendable {
    public var listens: [ListenSpec]
    public var access: AccessList
    public var upstream: UpstreamGroup
    public var proxy: ProxySettings
    public var accessLogs: [AccessLogSpec]
    public var location: SourceLocation
}

/// The `proxy_*` and `tcp_nodelay` settings that shape the relay, with nginx's defaults.
public struct ProxySettings: Sendable, Equatable {
    public var connectTimeoutMilliseconds = 60_000
    public var idleTimeoutMilliseconds = 600_000
    public var halfClose = false
    public var tcpNoDelay = true
    public var bufferSize = 16 * 1024
    public var socketKeepalive = false
    public var nextUpstream = true
    /// 0 = unlimited (each server once).
    public var nextUpstreamTries = 0
    /// 0 = unlimited.
    public var nextUpstreamTimeoutMilliseconds = 0

    public init() {}
}
