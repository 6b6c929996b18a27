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
    /// The PROXY header read from the client, if the listener expects one.
    public var proxyHeader: ProxyHeader?
    /// The `listen` the session arrived on, as an endpoint (`127.0.0.1:8080`, `0.0.0.0:8080`).
    public var listener: String
    public var status: SessionStatus = .ok
    /// The phase that ended the session when it was refused; `.relay` for a normal session.
    public var phase: Phase = .relay
    /// The rule that refused the session, if a rule did.
    public var rule: RuleReference?
    /// For a refusal by `deny $var` (or `allow $var` not matching…): the variable and the value
    /// that decided, for the audit line.
    public var decidingVariable: (name: String, value: [UInt8])?
    /// The session's rule-defined variables (geo, map, geoip2, set), evaluated on first use and
    /// remembered, so the access phase and the log line see the same value.
    public var variables: SessionVariables?
    /// `$limit_conn_status`: PASSED, REJECTED or REJECTED_DRY_RUN once a `limit_conn` applied.
    public var limitConnStatus: String?
    /// The limit that refused the session (or would have, in a dry run), for the audit line.
    public var limit: LimitDecision?
    /// Why the session ended badly, in words (for the error and audit logs).
    public var reason: String?
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
    public var refused: Bool { status != .ok }
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

    public init(address: SocketEndpoint, connectTime: Double?) {
        self.address = address
        self.connectTime = connectTime
    }
}
