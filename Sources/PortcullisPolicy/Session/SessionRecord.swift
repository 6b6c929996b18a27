public import PortcullisCore
public import PortcullisWire

/// The one record every session ends in. The access log, the audit log and (later) metrics
/// and `explain` are all rendered from it, so they can never disagree.
public struct SessionRecord: Sendable {
    public var connection: UInt64
    public var transport: TransportProtocol
    /// `$remote_addr`: the client, after realip (a trusted PROXY header's source).
    public var client: SocketEndpoint
    public var server: SocketEndpoint
    /// The TCP peer as accepted (`$realip_remote_addr`): the PROXY sender, if one was trusted.
    public var peer: SocketEndpoint
    /// The `listen` the session arrived on, as an endpoint (`127.0.0.1:8080`, `0.0.0.0:8080`).
    public var listener: String
    /// The session's rule-defined variables (geo, map, geoip2, set), evaluated on first use and
    /// remembered, so the access phase and the log line see the same value.
    public var variables: SessionVariables?
    /// `$limit_conn_status`: PASSED, REJECTED or REJECTED_DRY_RUN once a `limit_conn` applied.
    public var limitConnStatus: String?
    /// Bytes sent to / received from the client.
    public var bytesSent: UInt64 = 0
    public var bytesReceived: UInt64 = 0
    /// One entry per upstream connect attempt.
    public var upstreamAttempts: [UpstreamAttempt] = []
    public var upstreamBytesSent: UInt64 = 0
    public var upstreamBytesReceived: UInt64 = 0
    /// Seconds from the upstream connect to the end of the session.
    public var upstreamSessionTime: Double?
    /// Wall-clock seconds since 1970 when the session was accepted and when it ended.
    public var startTime: Double
    public var endTime: Double

    public init(connection: UInt64, transport: TransportProtocol, client: SocketEndpoint, server: SocketEndpoint,
                listener: String, startTime: Double) {
        self.connection = connection
        self.transport = transport
        self.client = client
        self.peer = client
        self.server = server
        self.listener = listener
        self.startTime = startTime
        self.endTime = startTime
    }

    public var sessionTime: Double { max(0, endTime - startTime) }

    /// How the session ended and why; set once, by the session machine.
    public var outcome: SessionOutcome {
        get { details?.outcome ?? .completed }
        set { if newValue != .completed || details != nil { editDetails { $0.outcome = newValue } } }
    }
    /// What the logs print of the outcome.
    public var status: SessionStatus { outcome.status }
    public var phase: Phase { outcome.phase }
    public var rule: RuleReference? { outcome.rule }
    public var reason: String? { outcome.cause.reason }
    public var refused: Bool { outcome.refused }

    // MARK: What only some sessions have

    /// The PROXY header read from the client, if the listener expects one.
    public var proxyHeader: ProxyHeader? {
        get { details?.proxyHeader }
        set { if newValue != nil || details != nil { editDetails { $0.proxyHeader = newValue } } }
    }
    /// For a refusal by `deny $var` (or `allow $var` not matching…): the variable and the value
    /// that decided, for the audit line.
    public var decidingVariable: (name: String, value: [UInt8])? {
        get { details?.decidingVariable }
        set { if newValue != nil || details != nil { editDetails { $0.decidingVariable = newValue } } }
    }
    /// The limit that refused the session (or would have, in a dry run), for the audit line.
    public var limit: LimitDecision? {
        get { details?.limit }
        set { if newValue != nil || details != nil { editDetails { $0.limit = newValue } } }
    }

    /// What the TLS handshake with the client negotiated (`listen … ssl`): the `$ssl_*` variables.
    public var tls: TLSSessionInfo? {
        get { details?.tls }
        set { if newValue != nil || details != nil { editDetails { $0.tls = newValue } } }
    }
    /// What `ssl_preread` read from the client's ClientHello: the `$ssl_preread_*` variables.
    public var preread: ClientHelloInfo? {
        get { details?.preread }
        set { if newValue != nil || details != nil { editDetails { $0.preread = newValue } } }
    }

    /// The fields above and the outcome, out of line (about 210 bytes): every live session keeps a record and
    /// every ended one is copied into the log queue, and most never set any of them.
    /// Copy-on-write: a record copied before a change keeps what it had.
    private final class Details: @unchecked Sendable {
        var proxyHeader: ProxyHeader?
        var outcome = SessionOutcome.completed
        var decidingVariable: (name: String, value: [UInt8])?
        var limit: LimitDecision?
        var tls: TLSSessionInfo?
        var preread: ClientHelloInfo?

        init() {}
        init(copying other: Details) {
            (proxyHeader, outcome, decidingVariable, limit, tls, preread) =
                (other.proxyHeader, other.outcome, other.decidingVariable, other.limit, other.tls, other.preread)
        }
    }
    private var details: Details?

    private mutating func editDetails(_ change: (Details) -> Void) {
        if details == nil {
            details = Details()
        } else if !isKnownUniquelyReferenced(&details!) {
            details = Details(copying: details!)
        }
        change(details!)
    }
}

/// Which limit decided, and on what: the zone, the session's key in it, and the limit as written.
public struct LimitDecision: Sendable, Equatable {
    public var zone: String
    public var key: [UInt8]
    /// `3` (connections) or `5r/s burst=5`.
    public var limit: String

    public init(zone: String, key: [UInt8], limit: String) {
        self.zone = zone
        self.key = key
        self.limit = limit
    }
}

public struct UpstreamAttempt: Sendable, Equatable {
    public var address: SocketEndpoint
    /// Seconds the connect took, nil if it failed.
    public var connectTime: Double?
    /// Seconds from the start of the connect to the first byte (UDP: datagram) from this
    /// upstream; nil if none came.
    public var firstByteTime: Double?

    public init(address: SocketEndpoint, connectTime: Double?, firstByteTime: Double? = nil) {
        self.address = address
        self.connectTime = connectTime
        self.firstByteTime = firstByteTime
    }
}
