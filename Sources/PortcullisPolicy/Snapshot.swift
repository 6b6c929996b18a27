public import PortcullisCore

/// Everything a running gateway needs, compiled and checked. Immutable: a session pins the
/// snapshot current at accept, and a reload swaps in a new one.
public struct PolicySnapshot: Sendable {
    public var main: MainSettings
    public var servers: [ServerPolicy]
    public var upstreams: [String: UpstreamGroup]
    public var auditLog: AuditLogSpec?
    public var logFormats: [String: LogFormat]
    /// Every variable `geo`, `map`, `geoip2` and `set` define.
    public var variables: VariableTable
    /// The databases `geoip2` blocks opened (the gateway schedules their `auto_reload`).
    public var geoipDatabases: [any GeoIPDatabase]
    /// Access log files written through a memory buffer (`buffer=`, `flush=`, `gzip`), by path.
    /// Every line written to such a file goes through its buffer, whichever directive wrote it.
    public var logBuffers: [String: LogBuffer] = [:]
    /// Every `health_check` of every server, with the group it checks.
    public var healthChecks: [HealthCheck] = []
    /// Every `server NAME resolve` line, with its group and resolver.
    public var resolutions: [Resolution] = []

    /// Every file that must be opened for writing: access logs and the audit log.
    public var logPaths: [String] {
        var paths = servers.flatMap { $0.accessLogs.map(\.path) + ($0.auditLog.map { [$0.path] } ?? []) }
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
    /// `metrics_listen`: where the Prometheus endpoint answers; nil = no endpoint.
    public var metricsListen: SocketEndpoint?
    public var metricsListenLocation: SourceLocation?

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
    /// `sample=N/s`: at most this many lines a second; the rest are counted in a summary line.
    public var linesPerSecond = 100
}

/// `access_log … buffer=SIZE [flush=TIME] [gzip[=LEVEL]]`, as nginx: lines gather in memory and
/// reach the file when the next line does not fit, `flush` after the first line went in, at
/// reopen and at exit. With `gzip` each write is one complete gzip member (`zcat` reads the
/// file as one text).
public struct LogBuffer: Sendable, Equatable {
    public var size: Int
    public var flushMilliseconds: Int?
    /// 1 (fastest, nginx's default for a bare `gzip`) to 9; nil = written as text.
    public var gzipLevel: Int?

    public init(size: Int, flushMilliseconds: Int? = nil, gzipLevel: Int? = nil) {
        self.size = size
        self.flushMilliseconds = flushMilliseconds
        self.gzipLevel = gzipLevel
    }
}

public struct AccessLogSpec: Sendable, Equatable {
    public let path: String
    public let format: LogFormat
    /// `if=` condition: the line is skipped when this renders to "" or "0".
    public let condition: LogTemplate?
    /// The rule-defined variables the format prints, found once here rather than per line.
    public let formatVariables: [Int]

    public init(path: String, format: LogFormat, condition: LogTemplate?) {
        self.path = path
        self.format = format
        self.condition = condition
        self.formatVariables = format.template.definedVariables
    }
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
    /// `proxy_protocol`: every connection must start with a PROXY header (v1 or v2); on a
    /// `udp` listener, every datagram with a v2 header.
    public var proxyProtocol = false
    /// `udp`: a datagram listener; sessions are keyed by the client's address and port.
    public var udp = false
    public var location: SourceLocation
    /// Length of the address as written, for the caret under it in diagnostics.
    public var writtenLength = 1
    /// `listen unix:PATH`: a unix-domain socket (stream, or datagram with `udp`).
    public var unixPath: String?
    /// `ssl`: every connection is TLS, terminated here with the server's `ssl_*` settings.
    public var ssl = false

    public var endpoint: SocketEndpoint {
        unixPath.map { SocketEndpoint(unixPath: $0) } ?? SocketEndpoint(address: address, port: port)
    }
    public var description: String { endpoint.description + (udp ? " udp" : "") }
}

extension ListenSpec {
    init(unixPath: String, location: SourceLocation) {
        self.init(address: .v4(0xFFFF_FFFF), port: 0, location: location)
        self.unixPath = unixPath
    }
}

/// One `server { }` block, with stream-level settings already inherited.
public struct ServerPolicy: Sendable {
    public var listens: [ListenSpec]
    public var access: AccessList
    /// `set_real_ip_from`: peers whose PROXY header address becomes `$remote_addr`.
    public var realIPFrom: TrustedSources
    /// `proxy_pass NAME|ADDR`; nil when `proxy_pass` uses variables.
    public var upstream: UpstreamGroup?
    /// `proxy_pass $var`: rendered per session into an upstream block's name or HOST:PORT.
    public var upstreamTemplate: LogTemplate?
    /// `return VALUE`: sent to the client instead of proxying (nil: proxy). Of `return` and
    /// `proxy_pass` in one server, the later one applies, as in nginx.
    public var returnValue: LogTemplate?
    /// Every upstream block by lowercased name (nginx ignores case), for `proxy_pass $var`.
    public var upstreams: [String: UpstreamGroup]
    public var proxy: ProxySettings
    public var accessLogs: [AccessLogSpec]
    /// Where this server's refusals go: its own `audit_log`, else the stream's (nil: none,
    /// or `audit_log off`).
    public var auditLog: AuditLogSpec?
    public var limits: LimitSettings
    public var location: SourceLocation
    /// The server block's position in `stream` (for `set`, which is per server).
    public var ordinal: Int
    public var variables: VariableTable
    /// `resolver` (the server's own, else the stream's): how `proxy_pass $var` looks up a
    /// host name in its value. nil: such a value is refused.
    public var resolver: ResolverSpec? = nil
    /// `listen … ssl`: how this server terminates TLS; nil when no listen of it has `ssl`.
    public var tls: TLSServerSettings? = nil
    /// `proxy_ssl*`: TLS to the upstream (`enabled` false: plain TCP).
    public var upstreamTLS = UpstreamTLSSettings()
    /// `ssl_preread on`: the client's ClientHello is read (after the access phases, as nginx).
    public var preread = false
    /// With `ssl_preread on`: access rules or limit keys read `$ssl_preread_*`, so preread
    /// runs before them (an extension; otherwise nginx's order, so a refused client is refused
    /// without waiting for its ClientHello).
    public var prereadBeforeAccess = false

    /// A fresh set of lazily evaluated variables for one session, or nil when the rules
    /// define none.
    public func makeSessionVariables() -> SessionVariables? {
        variables.count == 0 ? nil : SessionVariables(table: variables, server: ordinal)
    }
}

/// `limit_conn NAME N;`
public struct LimitConnRule: Sendable {
    public var zone: LimitConnZone
    public var limit: Int
    public var reference: RuleReference
}

/// `limit_rate NAME;`
public struct LimitRateRule: Sendable {
    public var zone: LimitRateZone
    public var reference: RuleReference
}

/// Everything that limits a server's sessions (issue #5), with nginx's defaults.
public struct LimitSettings: Sendable {
    /// In order; every one applies (nginx: inherited only by a level with none of its own).
    public var conn: [LimitConnRule] = []
    public var connDryRun = false
    public var connLogLevel = ErrorLogSpec.Level.error
    public var rate: [LimitRateRule] = []
    public var rateDryRun = false
    /// `access_dry_run on` (extension): a `deny` is logged and audited as a dry run, and the
    /// session goes on. Kept with the limits' dry runs, inherited the same way.
    public var accessDryRun = false
    /// `proxy_upload_rate` / `proxy_download_rate`: bytes per second per connection, 0 = off.
    public var uploadRate = 0
    public var downloadRate = 0
    /// The same with variables (nginx 1.17.0): rendered once per session, when it is admitted.
    public var uploadRateTemplate: LogTemplate?
    public var downloadRateTemplate: LogTemplate?

    public init() {}

    public var throttles: Bool {
        uploadRate > 0 || downloadRate > 0 || uploadRateTemplate != nil || downloadRateTemplate != nil
            || rate.contains { $0.zone.kind == .bandwidth }
    }
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
    /// `proxy_protocol`: the header sent to the upstream before any payload.
    public var sendProxyProtocol = ProxyProtocolVersion.off
    /// `proxy_protocol_tlv`: extra v2 TLVs, values rendered per session.
    public var proxyProtocolTLVs: [ProxyTLVTemplate] = []
    public var proxyProtocolCRC32C = false
    /// `proxy_protocol_timeout`: how long a `listen … proxy_protocol` waits for the header.
    public var proxyProtocolTimeoutMilliseconds = 30_000
    /// UDP: `proxy_responses N` — datagrams expected back per client datagram; nil = no limit.
    public var udpResponses: Int?
    /// UDP: `proxy_requests N` — client datagrams after which the session takes no more; 0 = no limit.
    public var udpRequests = 0
    /// `health_check_timeout`: how long one health check may take (connect, send, expect).
    public var healthCheckTimeoutMilliseconds = 5_000
    /// `proxy_bind`: the local address upstream connections are made from; nil = the kernel's choice.
    public var bind: ProxyBind?
    /// `preread_buffer_size` / `preread_timeout` (ssl_preread): how much of the ClientHello is
    /// waited for, and how long.
    public var prereadBufferSize = 16 * 1024
    public var prereadTimeoutMilliseconds = 30_000

    public init() {}
}

/// `resolver ADDRESS … [valid=TIME] [ipv4=on|off] [ipv6=on|off]` with `resolver_timeout`.
public struct ResolverSpec: Sendable, Equatable {
    /// The name servers, asked in turn (port 53 unless written).
    public var servers: [SocketEndpoint]
    /// `valid=`: how long an answer is used, instead of its TTL.
    public var validMilliseconds: Int?
    public var ipv4 = true
    public var ipv6 = true
    /// `resolver_timeout` (nginx's default 30s).
    public var timeoutMilliseconds = 30_000
}

/// What looking a host name up gave: its addresses, or nginx's code and text for why not
/// (`3: Host not found`, `110: Operation timed out`, …).
public enum HostLookupResult: Sendable, Equatable {
    case addresses([IPAddress])
    case failure(code: Int, text: String)
}

/// One `server NAME[:PORT] resolve` line of an upstream block: the name is looked up in the
/// background and the group's servers follow its addresses (nginx 1.27.3).
public struct Resolution: Sendable {
    public var group: UpstreamGroup
    /// The line's index among `group.resolvable`.
    public var template: Int
    public var host: String
    public var port: UInt16
    public var resolver: ResolverSpec
}

/// `proxy_bind ADDRESS [transparent]`.
public struct ProxyBind: Sendable, Equatable {
    public enum Address: Sendable, Equatable {
        case fixed(SocketEndpoint)
        /// Rendered per session (`$remote_addr`): empty = no bind; not an address = no bind
        /// and an error line (nginx's `invalid local address`).
        case variable(LogTemplate)
    }

    public var address: Address
    /// IP_TRANSPARENT: the address need not be this host's (IP masquerading; needs
    /// CAP_NET_ADMIN or CAP_NET_RAW and routing that brings the replies back).
    public var transparent: Bool
}

public enum ProxyProtocolVersion: String, Sendable, Equatable {
    case off, v1, v2
}

/// One `proxy_protocol_tlv TYPE VALUE;`.
public struct ProxyTLVTemplate: Sendable, Equatable {
    public var type: UInt8
    public var value: LogTemplate
}

/// `set_real_ip_from` addresses, compiled like an access list (IPv4-mapped peers folded).
public struct TrustedSources: Sendable {
    private let list: AccessList
    public var isEmpty: Bool { list.isEmpty }

    /// Each block trusted; a nil block is `set_real_ip_from unix:`.
    public init(_ blocks: [(CIDR?, RuleReference)]) {
        list = AccessList(rules: blocks.map { AccessRule(action: .allow, match: $0.0.map { .block($0) } ?? .unix, reference: $0.1) })
    }

    /// Whether a PROXY header from `peer` is believed: its address is in a listed block, or it
    /// is a unix-domain socket and `set_real_ip_from unix:` is listed.
    public func trusts(_ address: IPAddress) -> Bool { trusts(SocketEndpoint(address: address, port: 0)) }

    public func trusts(_ peer: SocketEndpoint) -> Bool {
        guard !list.isEmpty else { return false }
        return peer.isUnix ? list.evaluate(peer).rule != nil : list.evaluate(peer.address.folded).rule != nil
    }
}
