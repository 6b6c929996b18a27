/// The closed list of phases a session walks, in order. The raw values are the names used in
/// logs, the audit log and metrics, so they are part of the output format.
public enum Phase: String, Sendable, CaseIterable, Codable {
    case accept
    case proxyHeaderRead = "proxy_header_read"
    case realip
    case preread
    case variables
    case access
    case limitConn = "limit_conn"
    case limitRate = "limit_rate"
    /// `listen … ssl`: the TLS handshake with the client, and `ssl_verify_client`.
    case ssl
    /// `return`: the server answers by itself instead of proxying (nginx's content phase).
    case content
    case upstreamPick = "upstream_pick"
    case proxyHeaderWrite = "proxy_header_write"
    case relay
    case log
}

/// nginx's `$status` for a stream session.
public enum SessionStatus: Int, Sendable, Codable {
    case ok = 200
    case badRequest = 400
    case forbidden = 403
    case internalError = 500
    case badGateway = 502
    case serviceUnavailable = 503
}

public enum TransportProtocol: String, Sendable {
    case tcp = "TCP"
    case udp = "UDP"
}

/// Where something was written in a rule file: 1-based line and column, as compilers print.
public struct SourceLocation: Hashable, Sendable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var column: Int

    public init(file: String, line: Int, column: Int) {
        self.file = file
        self.line = line
        self.column = column
    }

    public var description: String { "\(file):\(line):\(column)" }
}

/// The rule that decided a session, as the audit log names it: `file:line` and the rule's text.
public struct RuleReference: Hashable, Sendable {
    public var file: String
    public var line: Int
    public var text: String

    public init(file: String, line: Int, text: String) {
        self.file = file
        self.line = line
        self.text = text
    }

    public var position: String { "\(file):\(line)" }
}

/// How one session ended, and why: the only thing the access log, the audit log, and (later)
/// metrics and `explain` read about it. Written once by the session machine, when the phase
/// that decides is reached; a session that ran to its end has `.completed` in `.relay`.
public struct SessionOutcome: Sendable, Equatable {
    /// Whether a refusal was carried out or only reported (`limit_conn_dry_run`,
    /// `limit_rate_dry_run`: the audit line of what would have happened).
    public enum Enforcement: String, Sendable, Equatable {
        case enforced
        case dryRun = "dry_run"
    }

    /// Why the session ended. Each cause has one status (nginx's `$status`) and one wording.
    public enum Cause: Sendable, Equatable {
        /// The relay ran until a side ended it (EOF, close, reset).
        case completed
        /// `return`: the rendered value was sent and the session closed.
        case returned
        /// `proxy_timeout` passed with no bytes either way (nginx logs 200).
        case idleTimeout
        case proxyHeaderTimedOut
        case proxyHeaderBroken(String)
        /// The client closed or failed before its PROXY header was complete.
        case proxyHeaderIncomplete(String)
        case accessDenied
        case connectionLimit(zone: String)
        case connectionZoneFull(zone: String)
        case sessionRateLimit(zone: String)
        /// `proxy_pass $var` rendered a value that is neither an upstream nor `ADDRESS:PORT`.
        case noSuchUpstream(String)
        case noLiveUpstreams
        case upstreamUnreachable
        /// UDP: the upstream answered a datagram with ICMP (port unreachable) before any reply.
        case upstreamRefusedDatagrams
        /// UDP: `proxy_timeout` passed while `proxy_responses` answers were still owed.
        case upstreamTimedOut
        /// `proxy_bind`: the upstream socket could not be bound to the address (nginx's 500).
        case localAddressUnusable
        /// `proxy_pass $var` named a host the resolver could not resolve (nginx's 500).
        case hostNotResolved(String)
        /// `ssl_preread`: `preread_timeout` passed, or the client closed, before its ClientHello
        /// was complete (nginx closes the session with 200, never proxied).
        case prereadTimedOut
        case prereadIncomplete
        /// `ssl_preread`: the ClientHello did not fit in `preread_buffer_size` (nginx's 400).
        case prereadBufferFull
        /// `listen … ssl`: the handshake failed (OpenSSL's reason) or timed out (nginx's 500).
        case tlsHandshakeFailed(String)
        case tlsHandshakeTimedOut
        /// `ssl_verify_client`: no certificate, or one that did not verify (nginx's 500).
        case clientCertificateRejected(String)

        public var status: SessionStatus {
            switch self {
            case .completed, .idleTimeout, .returned, .prereadTimedOut, .prereadIncomplete: .ok
            case .prereadBufferFull: .badRequest
            case .tlsHandshakeFailed, .tlsHandshakeTimedOut, .clientCertificateRejected: .internalError
            case .proxyHeaderTimedOut, .proxyHeaderBroken, .proxyHeaderIncomplete: .badRequest
            case .accessDenied: .forbidden
            case .connectionLimit, .connectionZoneFull, .sessionRateLimit: .serviceUnavailable
            case .noSuchUpstream, .noLiveUpstreams, .upstreamUnreachable, .upstreamRefusedDatagrams, .upstreamTimedOut:
                .badGateway
            // nginx's stream proxy finalizes a failed resolve with 500, not 502.
            case .localAddressUnusable, .hostNotResolved: .internalError
            }
        }

        /// The audit log's `reason`; nil for a session that was not refused.
        public var reason: String? {
            switch self {
            case .completed, .idleTimeout, .returned, .prereadTimedOut, .prereadIncomplete: nil
            case .prereadBufferFull: "preread buffer full"
            case .tlsHandshakeFailed(let why): "TLS handshake failed: \(why)"
            case .tlsHandshakeTimedOut: "TLS handshake timed out"
            case .clientCertificateRejected(let why): "client certificate rejected: \(why)"
            case .proxyHeaderTimedOut: "PROXY protocol header timed out"
            case .proxyHeaderBroken(let why): "broken PROXY protocol header: \(why)"
            case .proxyHeaderIncomplete(let why): "incomplete PROXY protocol header: \(why)"
            case .accessDenied: "access forbidden by rule"
            case .connectionLimit(let zone): "limiting connections by zone \"\(zone)\""
            case .connectionZoneFull(let zone): "limit_conn zone \"\(zone)\" is full"
            case .sessionRateLimit(let zone): "limiting sessions by zone \"\(zone)\""
            case .noSuchUpstream(let text): "proxy_pass named no upstream: \"\(text)\""
            case .noLiveUpstreams: "no live upstreams"
            case .upstreamUnreachable: "upstream unreachable"
            case .upstreamRefusedDatagrams: "upstream refused the datagrams"
            case .upstreamTimedOut: "upstream timed out"
            case .localAddressUnusable: "proxy_bind address could not be bound"
            case .hostNotResolved(let host): "host not resolved: \"\(host)\""
            }
        }

        /// The cause without what varies (a zone, a host, OpenSSL's words): a metrics label,
        /// one of a fixed few (docs/metrics.md).
        public var name: String {
            switch self {
            case .completed: "completed"
            case .returned: "returned"
            case .idleTimeout: "idle_timeout"
            case .proxyHeaderTimedOut: "proxy_header_timed_out"
            case .proxyHeaderBroken: "proxy_header_broken"
            case .proxyHeaderIncomplete: "proxy_header_incomplete"
            case .accessDenied: "access_denied"
            case .connectionLimit: "connection_limit"
            case .connectionZoneFull: "connection_zone_full"
            case .sessionRateLimit: "session_rate_limit"
            case .noSuchUpstream: "no_such_upstream"
            case .noLiveUpstreams: "no_live_upstreams"
            case .upstreamUnreachable: "upstream_unreachable"
            case .upstreamRefusedDatagrams: "upstream_refused_datagrams"
            case .upstreamTimedOut: "upstream_timed_out"
            case .localAddressUnusable: "local_address_unusable"
            case .hostNotResolved: "host_not_resolved"
            case .prereadTimedOut: "preread_timed_out"
            case .prereadIncomplete: "preread_incomplete"
            case .prereadBufferFull: "preread_buffer_full"
            case .tlsHandshakeFailed: "tls_handshake_failed"
            case .tlsHandshakeTimedOut: "tls_handshake_timed_out"
            case .clientCertificateRejected: "client_certificate_rejected"
            }
        }
    }

    /// The phase that decided: the refusing phase, or `.relay` for a session that was let through.
    public var phase: Phase
    public var cause: Cause
    /// The rule that decided, when a rule did (an `allow`/`deny`, a `limit_conn`, a `limit_rate`).
    public var rule: RuleReference?
    public var enforcement: Enforcement

    public init(phase: Phase, cause: Cause, rule: RuleReference? = nil, enforcement: Enforcement = .enforced) {
        self.phase = phase
        self.cause = cause
        self.rule = rule
        self.enforcement = enforcement
    }

    /// A session let through that ran to its end.
    public static let completed = SessionOutcome(phase: .relay, cause: .completed)

    public var status: SessionStatus { cause.status }
    public var refused: Bool { cause.status != .ok }
}
