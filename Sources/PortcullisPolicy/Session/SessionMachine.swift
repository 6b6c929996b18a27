public import PortcullisCore
public import PortcullisWire

/// One session, TCP connection or UDP session, from accept to its one record, with no I/O.
///
/// An engine (the socket code) tells it what happened — accepted, bytes arrived, the PROXY
/// header timed out, a dial succeeded or failed, a side sent EOF, failed or closed, the idle
/// timer fired, a datagram came, a TLS handshake ended — and does what each call returns. The
/// order of the phases (`Phase`) lives here and nowhere else: accept → proxy_header_read →
/// realip → access → limit_conn → limit_rate → ssl → preread → upstream_pick → (upstream TLS)
/// → proxy_header_write → relay → log (or, with `return`, … → content → log). With
/// `ssl_preread on` and access rules or limit keys that read `$ssl_preread_*`, preread comes
/// before access instead (an extension: nginx's access phase cannot see the ClientHello,
/// nginx/nginx#872). So does every
/// way a session can end: the machine writes the record's `outcome` once, and the record it
/// hands back in `.end` is the only input of the access log, the audit log, and later metrics
/// and `explain`.
///
/// Times are monotonic nanoseconds from the engine's clock (`now`); the wall clock is read once,
/// at accept, and the end time derived from it. What the machine wants logged collects in
/// `notes`, which the engine takes after each call (`takeNotes`).
public struct SessionMachine: Sendable {
    public enum Side: Sendable, Equatable {
        case client, upstream

        public var other: Side { self == .client ? .upstream : .client }
    }

    /// Something to write to a log now.
    public enum Note: Sendable {
        /// An error-log line at an nginx level.
        case log(ErrorLogSpec.Level, String)
        /// An audit line: a refusal a dry run did not carry out (its outcome says `.dryRun`).
        case audit(SessionRecord)
    }

    public struct Dial: Sendable, Equatable {
        public var endpoint: SocketEndpoint
        /// `proxy_connect_timeout` (TCP).
        public var timeoutMilliseconds: Int
        /// `proxy_bind`: bind the socket to this before connecting; nil = the kernel's choice.
        public var local: LocalBind?
    }

    /// A `proxy_bind` address as one session uses it (a variable already rendered).
    public struct LocalBind: Sendable, Equatable {
        /// Port 0: any port (the engine lets connect choose it).
        public var endpoint: SocketEndpoint
        public var transparent: Bool
    }

    /// What the engine does when the upstream is connected, in this order.
    public struct RelayStart: Sendable, Equatable {
        /// Written to the upstream first: the PROXY header (`proxy_protocol on`), then what the
        /// client sent before the relay began. Both already counted.
        public var toUpstream: [UInt8]
        /// A rate limit applies: read in small pieces, so a key's debt stays small.
        public var throttled: Bool
        /// The client's EOF came while the upstream was being dialled: once both sides relay,
        /// tell the machine (`inputClosed(.client)`), as if it came now.
        public var clientEnded: Bool
    }

    /// What the engine does once the upstream's TCP connect succeeded and `proxy_ssl on`:
    /// write `preface` in the clear (the PROXY header, which nginx sends before TLS), then the
    /// TLS handshake; then `upstreamTLSEstablished` or `upstreamTLSFailed`.
    public struct UpstreamTLSStart: Sendable, Equatable {
        public var preface: [UInt8]
        /// SNI to send (`proxy_ssl_server_name on`, and not an address); nil: none.
        public var serverName: String?
        /// The name the certificate must carry (`proxy_ssl_verify on`); nil: not verified.
        public var verifyName: String?
        /// Where the connection goes, for the session cache (`proxy_ssl_session_reuse`).
        public var endpoint: SocketEndpoint
    }

    /// How the client's certificate fared (`ssl_verify_client`), read by the engine after the
    /// handshake; the machine decides what it means.
    public struct ClientCertificateCheck: Sendable, Equatable {
        public var presented: Bool
        /// X509_V_OK (0) or the verify error's code and text.
        public var code: Int
        public var text: String
        /// The error is one `optional_no_ca` forgives (an unknown or self-signed issuer).
        public var caUnknown: Bool

        public init(presented: Bool, code: Int, text: String, caUnknown: Bool) {
            self.presented = presented
            self.code = code
            self.text = text
            self.caUnknown = caUnknown
        }

        public static let none = ClientCertificateCheck(presented: false, code: 0, text: "ok", caUnknown: false)
    }

    public enum Action: Sendable {
        /// Nothing to do.
        case none
        /// `ssl_preread`: read the client's ClientHello (hand the bytes to `received`), and call
        /// `clientDeadlinePassed` after this long.
        case readClientHello(timeoutMilliseconds: Int)
        /// `listen … ssl`: run the TLS handshake with the client, then `tlsEstablished` or
        /// `tlsFailed`; `clientDeadlinePassed` after this long.
        case startTLS(timeoutMilliseconds: Int)
        /// `proxy_ssl on`: see `UpstreamTLSStart`.
        case startUpstreamTLS(UpstreamTLSStart)
        /// Read the client's PROXY header, and call `headerTimedOut` after this long.
        case readProxyHeader(timeoutMilliseconds: Int)
        /// Read more of the PROXY header.
        case readMore
        /// Connect to the upstream; then `dialSucceeded` or `dialFailed`.
        case dial(Dial)
        /// Look `host` up with `resolver` (`proxy_pass $var` named a host); then `resolved`.
        case resolve(host: String, resolver: ResolverSpec)
        /// Start relaying (see `RelayStart`), and watch `proxy_timeout` from now.
        case startRelay(RelayStart)
        /// Close the client (a refusal, TCP; the outcome says why).
        case closeClient
        /// `return`: send these bytes to the client instead of proxying. TCP: then close the
        /// client once they are written (`closed(.client)` follows); UDP: one datagram, then `end`.
        case reply([UInt8])
        /// Close this side now (with what it has queued dropped).
        case close(Side)
        /// Close both sides; `resetting`: make that side's close a TCP reset (a peer's reset
        /// passed on).
        case closeBoth(resetting: Side?)
        /// `proxy_half_close off`: close both once what is queued for this side is written.
        case closeWhenWritten(Side)
        /// Shut this side's output once what is queued for it is written; then `outputShut`.
        case shutdownOutput(Side)
        /// Watch `proxy_timeout` again from `lastActivity`.
        case watchIdle
        /// UDP: refused on its first datagram. Write its audit line now; keep the session (in the
        /// refused table) so the client's retries are dropped without a second decision, until
        /// it is idle.
        case refused(SessionRecord)
        /// The session is over: close what is still open and log this record. `audit`: whether
        /// its audit line is still to be written (a UDP refusal's was written when refused).
        case end(SessionRecord, audit: Bool)
    }

    private enum Stage: Equatable {
        case accepted
        case readingProxyHeader
        /// `ssl_preread`: reading the ClientHello.
        case prereading
        /// `listen … ssl`: the handshake with the client.
        case handshaking
        case dialing
        /// `proxy_ssl on`: connected, the handshake with the upstream in progress.
        case upstreamHandshaking
        case relaying
        /// Refused (TCP: the client is being closed) or timed out: waiting for the sides to close.
        case closing
        case ended
    }

    public let listener: ListenerPolicy
    public private(set) var record: SessionRecord
    public private(set) var notes: [Note] = []
    /// When bytes last moved, either way (nginx counts writes to a slow reader too).
    public private(set) var lastActivity: UInt64

    private var stage = Stage.accepted
    private var gate = SessionGate()
    private var group: UpstreamGroup?
    private var tried: [Int] = []
    /// What the group's method carries from one attempt to the next (the hash key and state).
    private var pick = UpstreamGroup.PickState()
    /// The server this session counts against (`max_conns`, `least_conn`) until it ends.
    private var heldServer: Int?
    /// The address of the attempt in progress (from the pick, so no second look at the group).
    private var attemptEndpoint = SocketEndpoint(address: .v4(0), port: 0)
    /// `proxy_pass $var` named a host that is being looked up: the name, its port, the text.
    private var pendingHost: (host: String, port: UInt16, text: String)?
    /// `proxy_bind` rendered at the first dial and kept for the retries (nginx: once per session).
    private var localBind: LocalBind??
    private let acceptedAt: UInt64
    private var dialStartedAt: UInt64 = 0
    private var attemptStartedAt: UInt64 = 0
    private var upstreamStartedAt: UInt64?
    private var clientOpen = true
    private var upstreamOpen = false
    private var clientOutputShut = false
    private var upstreamOutputShut = false
    /// TCP: the client's EOF came while dialling.
    private var clientEndedEarly = false
    /// TCP: the PROXY header as read so far, and what the client sent after it before the relay.
    private var headerBytes: [UInt8] = []
    private var earlyPayload: [UInt8] = []
    /// Preread (`ssl_preread`) is done, before or after access.
    private var prereadDone = false
    /// The PROXY header went to the upstream already (before its TLS handshake).
    private var upstreamHeaderSent = false
    private var udp = DatagramCounts()

    private var server: ServerPolicy { listener.server }
    private var proxy: ProxySettings { listener.server.proxy }

    /// - Parameters:
    ///   - client: the TCP peer, or the UDP session's client (after a trusted PROXY v2 header).
    ///   - peer: the UDP datagrams' sender, when it is not `client`.
    ///   - proxyHeader: the UDP datagram's PROXY v2 header, on a `proxy_protocol` listen.
    ///   - wallClock: seconds since 1970, at `now`.
    public init(listener: ListenerPolicy, connection: UInt64, client: SocketEndpoint, peer: SocketEndpoint? = nil,
                server: SocketEndpoint, proxyHeader: ProxyHeader? = nil, now: UInt64, wallClock: Double) {
        self.listener = listener
        record = SessionRecord(connection: connection, transport: listener.transport, client: client, server: server,
                               listener: listener.listen.description, startTime: wallClock)
        if let peer { record.peer = peer }
        record.proxyHeader = proxyHeader
        record.variables = listener.server.makeSessionVariables()
        acceptedAt = now
        lastActivity = now
    }

    /// The error-log notes since the last call, oldest first.
    public mutating func takeNotes() -> [Note] {
        defer { notes = [] }
        return notes
    }

    public var readingProxyHeader: Bool { stage == .readingProxyHeader }
    /// `ssl_preread`: the client's bytes go to `received` until the ClientHello is complete.
    public var readingClientHello: Bool { stage == .prereading }
    /// The engine reads the client for the machine (PROXY header, ClientHello), not for the relay.
    public var readingForMachine: Bool { stage == .readingProxyHeader || stage == .prereading }
    /// `ssl_preread`: how many more bytes the ClientHello may take (preread_buffer_size).
    public var clientHelloRoom: Int { max(proxy.prereadBufferSize - earlyPayload.count, 0) }
    public var handshaking: Bool { stage == .handshaking }
    public var relaying: Bool { stage == .relaying }
    public var ended: Bool { stage == .ended }
    /// A rate limit applies to this session's bytes (`readDelay` may say wait).
    public var throttles: Bool { gate.throttles }

    // MARK: accept, proxy_header_read, realip

    /// TCP: the client connected.
    public mutating func accepted(now: UInt64) -> Action {
        guard listener.listen.proxyProtocol else { return afterRealip(now: now) }
        stage = .readingProxyHeader
        return .readProxyHeader(timeoutMilliseconds: proxy.proxyProtocolTimeoutMilliseconds)
    }

    /// TCP: bytes from the client before the relay began: its PROXY header (and what follows),
    /// or, while the upstream is dialled, payload (SwiftNIO drains a socket at its FIN whether
    /// or not a read was asked for): kept for the upstream, as nginx sends it.
    public mutating func received(_ bytes: UnsafeRawBufferPointer, now: UInt64) -> Action {
        if stage == .prereading {
            earlyPayload.append(contentsOf: bytes)
            return peekClientHello(now: now)
        }
        guard stage == .readingProxyHeader else {
            earlyPayload.append(contentsOf: bytes)
            return .none
        }
        headerBytes.append(contentsOf: bytes)
        var length = 0
        return decodeHeader(restIsPayload: true, length: &length, now: now)
    }

    /// `listen … ssl proxy_protocol`: everything the client's socket holds so far, peeked, not
    /// taken (MSG_PEEK). Once the header decodes, `consumed` is its length: the engine takes
    /// exactly that off the socket, and what follows is the TLS handshake's, not payload (nginx
    /// reads the header the same way). 0 while more is needed or after a refusal.
    public mutating func peekedHeader(_ bytes: UnsafeRawBufferPointer, now: UInt64) -> (action: Action, consumed: Int) {
        guard stage == .readingProxyHeader else { return (.none, 0) }
        headerBytes = Array(bytes)
        var length = 0
        let action = decodeHeader(restIsPayload: false, length: &length, now: now)
        return (action, length)
    }

    /// Decodes `headerBytes`: more needed, a refusal, or realip and on. `restIsPayload`: the
    /// bytes after the header are the client's payload (kept for the upstream). `length`: the
    /// header's, once decoded (0 otherwise).
    private mutating func decodeHeader(restIsPayload: Bool, length decodedLength: inout Int, now: UInt64) -> Action {
        let decoded = headerBytes.withUnsafeBytes { raw in
            Result { () throws(ProxyHeaderError) in try ProxyHeaderDecoder.decode(raw) }
        }
        switch decoded {
        case .success(nil):
            return .readMore  // bounded: a v1 line is refused after 107 bytes, v2 after 16 + 65535
        case .failure(let error):
            note(.error, "broken header: \"\(Self.excerpt(headerBytes))\" (\(error)) while reading PROXY protocol, \(place)")
            return refuse(SessionOutcome(phase: .proxyHeaderRead, cause: .proxyHeaderBroken("\(error)")))
        case .success(let (header, length)?):
            if restIsPayload { earlyPayload = Array(headerBytes[length...]) }
            decodedLength = length
            headerBytes = []
            var header = header
            if header.transport != .stream {
                // A DGRAM or UNSPEC header says nothing about a TCP client: the spec's UNSPEC
                // fallback (nginx and HAProxy keep the peer too).
                header.addresses = .unspecified
            }
            record.proxyHeader = header
            // realip: only a trusted sender's header becomes $remote_addr, as nginx.
            if let source = header.source, server.realIPFrom.trusts(record.peer) {
                record.client = source
            }
            return afterRealip(now: now)
        }
    }

    /// The client's address is settled: preread first when access or limits read the
    /// ClientHello (`ServerPolicy.prereadBeforeAccess`), else the access phases.
    private mutating func afterRealip(now: UInt64) -> Action {
        if server.preread && server.prereadBeforeAccess && record.transport == .tcp { return startPreread(now: now) }
        return admit(now: now)
    }

    // MARK: preread (ssl_preread)

    private mutating func startPreread(now: UInt64) -> Action {
        stage = .prereading
        // nginx: while its preread runs the variables are found and empty (a timeout's or a
        // full buffer's log line says ""); bytes that are not TLS unset them again.
        record.preread = ClientHelloInfo()
        // Bytes that came with the PROXY header are the start of the ClientHello.
        if !earlyPayload.isEmpty {
            let action = peekClientHello(now: now)
            if case .readMore = action {} else { return action }
        }
        return .readClientHello(timeoutMilliseconds: proxy.prereadTimeoutMilliseconds)
    }

    /// Parse-or-read-more on everything the client sent so far (kept for the upstream, as
    /// nginx's preread buffer is). A ClientHello fills the `$ssl_preread_*` variables; bytes that
    /// are not TLS unset them and the session goes on, as nginx.
    private mutating func peekClientHello(now: UInt64) -> Action {
        var peek = earlyPayload.withUnsafeBytes { ClientHelloPeeker.peek($0) }
        // nginx decides nothing before 5 bytes (a record header): a client that sends "GET"
        // and waits is held until preread_timeout there, so here too.
        if earlyPayload.count < 5, case .notTLS = peek { peek = .needMore }
        switch peek {
        case .needMore:
            guard earlyPayload.count < proxy.prereadBufferSize else {
                note(.error, "preread buffer full while prereading client data, \(place)")
                return refuse(SessionOutcome(phase: .preread, cause: .prereadBufferFull))
            }
            return .readMore
        case .hello(let info):
            record.preread = info
        case .notTLS:
            record.preread = nil  // nginx drops its state: the variables have no value ("-")
        }
        prereadDone = true
        return server.prereadBeforeAccess ? admit(now: now) : content(now: now)
    }

    /// The client's deadline passed: the PROXY header's, the ClientHello's or the handshake's
    /// (`tls`: what the unfinished connection says, as in `tlsFailed`).
    public mutating func clientDeadlinePassed(now: UInt64, tls: TLSSessionInfo? = nil) -> Action {
        switch stage {
        case .readingProxyHeader:
            return headerTimedOut(now: now)
        case .prereading:
            // nginx: the session ends with 200, never proxied.
            note(.info, "client timed out (110: Connection timed out) while prereading client data, \(place)")
            return refuse(SessionOutcome(phase: .preread, cause: .prereadTimedOut))
        case .handshaking:
            if let tls { record.tls = tls }
            note(.info, "client timed out (110: Connection timed out) while SSL handshaking, \(place)")
            return refuse(SessionOutcome(phase: .ssl, cause: .tlsHandshakeTimedOut))
        default:
            return .none
        }
    }

    // MARK: ssl (listen … ssl)

    /// The handshake with the client finished: `$ssl_*` are known; `ssl_verify_client` decides
    /// on the certificate as nginx does (the handshake itself always completes).
    public mutating func tlsEstablished(_ info: TLSSessionInfo, certificate: ClientCertificateCheck, now: UInt64) -> Action {
        guard stage == .handshaking else { return .none }
        record.tls = info
        if let tls = server.tls, tls.verifyClient != .off {
            if certificate.presented && certificate.code != 0 && !(tls.verifyClient == .optionalNoCA && certificate.caUnknown) {
                note(.info, "client SSL certificate verify error: (\(certificate.code):\(certificate.text)) while SSL handshaking, \(place)")
                return refuse(SessionOutcome(phase: .ssl, cause: .clientCertificateRejected("verify error (\(certificate.code): \(certificate.text))")))
            }
            if tls.verifyClient == .on && !certificate.presented {
                note(.info, "client sent no required SSL certificate while SSL handshaking, \(place)")
                return refuse(SessionOutcome(phase: .ssl, cause: .clientCertificateRejected("no certificate sent")))
            }
        }
        if server.preread && !prereadDone { return startPreread(now: now) }
        return content(now: now)
    }

    /// The handshake with the client failed: `reason` is OpenSSL's (or the peer closed).
    /// `info`: what the connection says anyway (nginx's `$ssl_protocol` is the version being
    /// tried, `$ssl_cipher` "(NONE)"), so the log line shows what nginx's does.
    public mutating func tlsFailed(_ reason: String, info: TLSSessionInfo? = nil, now: UInt64) -> Action {
        guard stage == .handshaking else { return .none }
        if let info { record.tls = info }
        note(.info, "\(reason) while SSL handshaking, \(place)")
        return refuse(SessionOutcome(phase: .ssl, cause: .tlsHandshakeFailed(reason)))
    }

    /// TCP: `proxy_protocol_timeout` passed (ignored if the header was read meanwhile).
    public mutating func headerTimedOut(now: UInt64) -> Action {
        guard stage == .readingProxyHeader else { return .none }
        note(.info, "client timed out (110: Connection timed out) while reading PROXY protocol, \(place)")
        return refuse(SessionOutcome(phase: .proxyHeaderRead, cause: .proxyHeaderTimedOut))
    }

    /// The spec: a partial header must be rejected. nginx logs it as a broken header, 400.
    private mutating func headerIncomplete(_ why: String) -> Action {
        note(.error, "broken header: \"\(Self.excerpt(headerBytes))\" (\(why) before it was complete) while reading PROXY protocol, \(place)")
        return refuse(SessionOutcome(phase: .proxyHeaderRead, cause: .proxyHeaderIncomplete(why)))
    }

    /// Up to 64 bytes of a refused header, printable, for the error log (nginx's default log
    /// escaping: `"`, `\\`, control bytes and bytes above 0x7E as `\\xHH`).
    static func excerpt(_ bytes: [UInt8]) -> String {
        var text = ""
        LogEscaping.append(Array(bytes.prefix(64)), escape: .default, to: &text)
        return text
    }

    // MARK: access, limit_conn, limit_rate, upstream_pick

    /// access → limit_conn → limit_rate → upstream_pick, on the client address the earlier
    /// phases settled.
    private mutating func admit(now: UInt64) -> Action {
        var reported: [SessionGate.Event] = []
        let admitted = gate.admit(server, record: &record, now: now, wallClock: wallClock(now)) { reported.append($0) }
        for event in reported {
            switch event {
            case .log(let level, let message): note(level, message)
            case .dryRun(let wouldBe): notes.append(.audit(wouldBe))
            }
        }
        guard admitted else { return refuse(nil) }
        if listener.listen.ssl && record.transport == .tcp && record.tls == nil {
            stage = .handshaking
            return .startTLS(timeoutMilliseconds: server.tls?.handshakeTimeoutMilliseconds ?? 60_000)
        }
        if server.preread && !prereadDone && record.transport == .tcp { return startPreread(now: now) }
        return content(now: now)
    }

    /// content: `return`, or `proxy_pass` (upstream_pick).
    private mutating func content(now: UInt64) -> Action {
        if let value = server.returnValue {
            // content: the server answers itself; nothing is read from the client (nginx).
            let bytes = value.bytes(for: record)
            record.outcome = SessionOutcome(phase: .content, cause: .returned)
            record.bytesSent += UInt64(bytes.count)
            stage = .closing
            return .reply(bytes)
        }
        let (group, text) = server.upstream(for: record)
        guard let group else {
            // A host name and a resolver: looked up at run time, as nginx does.
            if let resolver = server.resolver, let (host, port) = Self.hostAndPort(text) {
                pendingHost = (host, port, text)
                stage = .dialing
                dialStartedAt = now
                return .resolve(host: host, resolver: resolver)
            }
            let why = server.resolver == nil ? "host names need a resolver" : "not HOST:PORT"
            note(.error, "proxy_pass \"\(text)\" names no upstream block and no ADDRESS:PORT (\(why)), \(place)")
            return refuse(SessionOutcome(phase: .upstreamPick, cause: .noSuchUpstream(text)))
        }
        return startUpstream(group, now: now)
    }

    /// `HOST:PORT` with a host name (not an address) and a port from 1 to 65535.
    static func hostAndPort(_ text: String) -> (String, UInt16)? {
        guard let (host, portText) = SocketEndpoint.split(text), !host.isEmpty, IPAddress(host) == nil,
              !host.hasPrefix("["), let port = UInt16(portText), port > 0 else { return nil }
        return (host, port)
    }

    /// The host `proxy_pass $var` named was looked up: its addresses become the session's
    /// group, tried as any group is; a failure is nginx's 500 with
    /// `NAME could not be resolved (3: Host not found)`.
    public mutating func resolved(_ result: HostLookupResult, now: UInt64) -> Action {
        guard stage == .dialing, let pending = pendingHost else { return .none }
        pendingHost = nil
        guard clientOpen else {
            stage = .closing
            return finish(now: now)
        }
        switch result {
        case .failure(let code, let text):
            note(.error, "\(pending.host) could not be resolved (\(code): \(text)), \(place)")
            return refuse(SessionOutcome(phase: .upstreamPick, cause: .hostNotResolved(pending.host)))
        case .addresses(let addresses):
            let servers = addresses.map { UpstreamServer(endpoint: SocketEndpoint(address: $0, port: pending.port), name: pending.text) }
            return startUpstream(UpstreamGroup(name: pending.text, servers: servers, location: nil), now: now)
        }
    }

    /// upstream_pick with the group chosen: the hash key, the UDP header, the first dial.
    private mutating func startUpstream(_ group: UpstreamGroup, now: UInt64) -> Action {
        self.group = group
        if let key = group.method.key { pick = UpstreamGroup.PickState(key: key.bytes(for: record)) }
        dialStartedAt = now
        if record.transport == .udp, proxy.sendProxyProtocol == .v2 {
            udp.header = ProxyHeaderEncoder.v2(source: record.client, destination: record.server, transport: .datagram,
                                               tlvs: server.upstreamTLVs(for: record), crc32c: proxy.proxyProtocolCRC32C)
        }
        return dialNext(now: now)
    }

    /// The next upstream to try (`proxy_next_upstream`, `_tries`, `_timeout`), or the refusal
    /// when there is none.
    private mutating func dialNext(now: UInt64) -> Action {
        guard let group else { return .none }
        // The client left while we were connecting: nothing more to try.
        guard clientOpen else { return finish(now: now) }
        let tries = tried.count
        let outOfTries = proxy.nextUpstreamTries > 0 && tries >= proxy.nextUpstreamTries
        let outOfTime = proxy.nextUpstreamTimeoutMilliseconds > 0
            && now &- dialStartedAt >= UInt64(proxy.nextUpstreamTimeoutMilliseconds) * 1_000_000
        // UDP tries one upstream: a UDP "connect" only fails for want of a socket or a route.
        let mayRetry = tries == 0 || (record.transport == .tcp && proxy.nextUpstream && !outOfTries && !outOfTime)
        guard mayRetry, let (index, endpoint) = group.pickServer(&pick, excluding: tried, now: Self.milliseconds(now)) else {
            if tries == 0 { note(.error, "no live upstreams while connecting to upstream, \(place)") }
            return refuse(SessionOutcome(phase: .upstreamPick, cause: tries == 0 ? .noLiveUpstreams : .upstreamUnreachable))
        }
        tried.append(index)
        heldServer = index
        attemptEndpoint = endpoint
        attemptStartedAt = now
        if upstreamStartedAt == nil, record.transport == .udp { upstreamStartedAt = now }
        stage = .dialing
        if localBind == nil { localBind = .some(renderLocalBind()) }
        return .dial(Dial(endpoint: endpoint, timeoutMilliseconds: proxy.connectTimeoutMilliseconds,
                          local: localBind ?? nil))
    }

    /// `proxy_bind` for this session. A variable's empty value means no bind; a value that is
    /// not an address is an error line and no bind, and the session goes on (nginx).
    private mutating func renderLocalBind() -> LocalBind? {
        guard let bind = proxy.bind else { return nil }
        switch bind.address {
        case .fixed(let endpoint):
            return LocalBind(endpoint: endpoint, transparent: bind.transparent)
        case .variable(let template):
            let text = String(decoding: template.bytes(for: record), as: UTF8.self)
            if text.isEmpty { return nil }
            guard let endpoint = SocketEndpoint.local(text) else {
                note(.error, "invalid local address \"\(text)\", \(place)")
                return nil
            }
            return LocalBind(endpoint: endpoint, transparent: bind.transparent)
        }
    }

    /// The dial's socket could not take its `proxy_bind` address (bind or IP_TRANSPARENT
    /// failed): nginx's 500, and no other upstream is tried, since each would fail alike.
    /// `failure` is the system call's wording, e.g. `bind(10.9.9.9) failed (99: …)`.
    public mutating func localBindFailed(_ failure: String, critical: Bool, now: UInt64) -> Action {
        guard stage == .dialing, group != nil, !tried.isEmpty else { return .none }
        releaseServer()
        note(critical ? .crit : .alert,
             "\(failure) while connecting to upstream, \(place), upstream: \"\(attemptEndpoint)\"")
        let outcome = SessionOutcome(phase: .upstreamPick, cause: .localAddressUnusable)
        guard record.transport == .tcp else {
            record.outcome = outcome
            stage = .closing
            return finish(now: now)
        }
        return refuse(outcome)
    }

    /// A refusal: TCP closes the client and ends when it has closed; UDP keeps the session in
    /// the refused table. `outcome`: nil when the gate has set it.
    private mutating func refuse(_ outcome: SessionOutcome?) -> Action {
        if let outcome { record.outcome = outcome }
        // A refusal after limit_conn (no upstream, a broken header) holds no slots while it lingers.
        gate.release()
        stage = .closing
        guard record.transport == .udp else { return .closeClient }
        record.endTime = wallClock(lastActivity)
        udp.auditWritten = true
        return .refused(record)
    }

    // MARK: Dial results, proxy_header_write

    public mutating func dialSucceeded(now: UInt64) -> Action {
        guard stage == .dialing, group != nil, !tried.isEmpty else { return .none }
        let tls = server.upstreamTLS
        guard tls.enabled, record.transport == .tcp, clientOpen else { return upstreamReady(now: now) }
        // nginx: the PROXY header goes first, in the clear; the handshake counts as part of the
        // connect (its time, its failure: the next upstream is tried).
        stage = .upstreamHandshaking
        let preface = proxyHeaderToUpstream()
        upstreamHeaderSent = true
        var name = tls.name.map { String(decoding: $0.bytes(for: record), as: UTF8.self) } ?? (group?.name ?? "")
        name = Self.hostWithoutPort(name)
        let isAddress = IPAddress(name) != nil
        return .startUpstreamTLS(UpstreamTLSStart(
            preface: preface,
            serverName: tls.sendServerName && !name.isEmpty && !isAddress ? name : nil,
            verifyName: tls.verify ? name : nil,
            endpoint: attemptEndpoint))
    }

    /// `proxy_ssl_name`'s value without a port (`host:443`, `[::1]:443`), as nginx strips it.
    static func hostWithoutPort(_ text: String) -> String {
        if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
            return String(text[text.index(after: text.startIndex)..<close])
        }
        if let colon = text.lastIndex(of: ":"), text.firstIndex(of: ":") == colon,
           UInt16(text[text.index(after: colon)...]) != nil {
            return String(text[..<colon])
        }
        return text
    }

    /// `proxy_ssl on`: the handshake with the upstream finished.
    public mutating func upstreamTLSEstablished(now: UInt64) -> Action {
        guard stage == .upstreamHandshaking else { return .none }
        return upstreamReady(now: now)
    }

    /// `proxy_ssl on`: the handshake with the upstream failed (or its certificate did not
    /// verify): a failed attempt, as nginx counts it; the next upstream is tried.
    public mutating func upstreamTLSFailed(_ reason: String, now: UInt64) -> Action {
        guard stage == .upstreamHandshaking else { return .none }
        stage = .dialing
        upstreamHeaderSent = false
        return attemptFailed(message: reason, now: now)
    }

    /// The upstream is ready for payload: connected (and, with `proxy_ssl`, handshaken).
    private mutating func upstreamReady(now: UInt64) -> Action {
        guard let group, let index = tried.last else { return .none }
        group.report(index, succeeded: true, now: Self.milliseconds(now))
        let seconds = record.transport == .udp ? 0 : Double(now &- attemptStartedAt) / 1e9
        record.upstreamAttempts.append(UpstreamAttempt(address: attemptEndpoint, connectTime: seconds))
        guard clientOpen else {
            // Not the session's upstream yet, so its close is not the session's: end here.
            stage = .closing
            return finish(now: now, abandoningUpstream: true)
        }
        stage = .relaying
        upstreamOpen = true
        if record.transport == .tcp { upstreamStartedAt = now }
        lastActivity = now  // proxy_timeout counts from the connect, as nginx
        var toUpstream = upstreamHeaderSent ? [] : proxyHeaderToUpstream()
        if !earlyPayload.isEmpty {
            relayed(earlyPayload.count, from: .client, now: now)
            toUpstream += earlyPayload
            earlyPayload = []
        }
        return .startRelay(RelayStart(toUpstream: toUpstream, throttled: gate.throttles, clientEnded: clientEndedEarly))
    }

    public mutating func dialFailed(_ failure: DialFailure, now: UInt64) -> Action {
        guard stage == .dialing || stage == .upstreamHandshaking else { return .none }
        stage = .dialing
        return attemptFailed(message: "\(failure) while connecting to upstream", now: now)
    }

    /// The attempt in progress failed (connect, or the upstream's TLS handshake): counted
    /// against the server, and the next one is tried.
    private mutating func attemptFailed(message: String, now: UInt64) -> Action {
        guard let group, let index = tried.last else { return .none }
        group.report(index, succeeded: false, now: Self.milliseconds(now))
        releaseServer()
        let endpoint = attemptEndpoint
        record.upstreamAttempts.append(UpstreamAttempt(address: endpoint, connectTime: nil))
        note(.error, "\(message), \(place), upstream: \"\(endpoint)\"")
        stage = .closing  // until the next dial, if there is one
        guard record.transport == .tcp else {
            record.outcome = SessionOutcome(phase: .upstreamPick, cause: .upstreamUnreachable)
            return finish(now: now)
        }
        return dialNext(now: now)
    }

    /// proxy_header_write (TCP): the header goes out before any payload, naming the client after
    /// realip and the address it connected to. nginx counts it as sent to the upstream.
    private mutating func proxyHeaderToUpstream() -> [UInt8] {
        guard record.transport == .tcp else { return [] }
        let bytes: [UInt8]
        switch proxy.sendProxyProtocol {
        case .off:
            return []
        case .v1:
            bytes = ProxyHeaderEncoder.v1(source: record.client, destination: record.server)
        case .v2:
            let tlvs = server.upstreamTLVs(for: record)
            bytes = ProxyHeaderEncoder.v2(source: record.client, destination: record.server, transport: .stream,
                                          tlvs: tlvs, crc32c: proxy.proxyProtocolCRC32C)
            // The encoder leaves out TLVs that would push the header past 65,535 bytes; say so.
            // (The family nibble it wrote says how long its address block is.)
            let addressLength = [1: 12, 2: 36][Int(bytes[13] >> 4)] ?? 0
            let wanted = tlvs.reduce(0) { $0 + 3 + $1.value.count } + (proxy.proxyProtocolCRC32C ? 7 : 0)
            if bytes.count - 16 - addressLength < wanted {
                note(.warn, "PROXY v2 header to upstream: TLVs that did not fit in 65535 bytes were left out, \(place)")
            }
        }
        record.upstreamBytesSent += UInt64(bytes.count)
        return bytes
    }

    // MARK: relay (TCP)

    /// `bytes` moved from `side` to the other: counted, and spent from the rate limits.
    public mutating func relayed(_ bytes: Int, from side: Side, now: UInt64) {
        lastActivity = now
        if gate.throttles { gate.spend(bytes, side == .client ? .fromClient : .fromUpstream, now: now) }
        if side == .client {
            record.bytesReceived += UInt64(bytes)
            record.upstreamBytesSent += UInt64(bytes)
        } else {
            noteFirstUpstreamByte(now: now)
            record.upstreamBytesReceived += UInt64(bytes)
            record.bytesSent += UInt64(bytes)
        }
    }

    /// `$upstream_first_byte_time`: from the start of the connect, as nginx counts it.
    private mutating func noteFirstUpstreamByte(now: UInt64) {
        guard let last = record.upstreamAttempts.indices.last, record.upstreamAttempts[last].firstByteTime == nil else { return }
        record.upstreamAttempts[last].firstByteTime = Double(now &- attemptStartedAt) / 1e9
    }

    /// Bytes left for a slow reader: activity too (nginx counts write events).
    public mutating func wrote(now: UInt64) { lastActivity = now }

    /// Nanoseconds `side` must wait before reading again (0 = now): the session's and its key's
    /// bandwidth buckets. Asking takes a turn on shared buckets, so ask only when about to read.
    public mutating func readDelay(_ side: Side, now: UInt64) -> UInt64 {
        guard gate.throttles else { return 0 }
        return gate.delay(side == .client ? .fromClient : .fromUpstream, now: now)
    }

    /// `side` sent EOF. With `proxy_half_close on` the other side's output is shut once its
    /// pending bytes are written, and the session ends when both directions are done; with it
    /// off (nginx's default) the session ends as soon as the pending bytes are written.
    public mutating func inputClosed(_ side: Side, now: UInt64) -> Action {
        if side == .client {
            if stage == .readingProxyHeader { return headerIncomplete("the client closed the connection") }
            if stage == .prereading { return refuse(SessionOutcome(phase: .preread, cause: .prereadIncomplete)) }
            if stage == .dialing || stage == .upstreamHandshaking {
                // The client finished sending before the upstream answered: its bytes and its
                // EOF go on once the relay begins, rather than being dropped.
                clientEndedEarly = true
                return .none
            }
        }
        let otherOpen = side == .client ? upstreamOpen : clientOpen
        guard stage == .relaying, otherOpen else { return .close(side) }
        return proxy.halfClose ? .shutdownOutput(side.other) : .closeWhenWritten(side.other)
    }

    /// `side`'s output is shut, everything queued before it written. Done when both directions
    /// are (closing on "both inputs ended" instead would drop bytes still queued), or when the
    /// other side is gone already.
    public mutating func outputShut(_ side: Side) -> Action {
        if side == .client { clientOutputShut = true } else { upstreamOutputShut = true }
        let otherGone = side == .client ? !upstreamOpen : !clientOpen
        return (clientOutputShut && upstreamOutputShut) || otherGone ? .closeBoth(resetting: nil) : .none
    }

    /// How a side failed, as far as the session cares, with the engine's words for it.
    public enum Failure: Sendable, Equatable {
        /// A reset (ECONNRESET, EPIPE): passed on to the other side as a reset.
        case reset(String)
        /// An error worth a line in the error log (nginx: "... while proxying").
        case error(String)
        /// The engine's own doing (a close it asked for): nothing to say.
        case quiet(String)

        var text: String {
            switch self {
            case .reset(let text), .error(let text), .quiet(let text): text
            }
        }
    }

    /// `side` failed (reset, timeout, …): end both.
    public mutating func failed(_ side: Side, _ failure: Failure, now: UInt64) -> Action {
        if side == .client && stage == .readingProxyHeader { return headerIncomplete(failure.text) }
        if side == .client && stage == .prereading { return refuse(SessionOutcome(phase: .preread, cause: .prereadIncomplete)) }
        switch failure {
        case .reset: return .closeBoth(resetting: side.other)
        case .error(let text): note(.info, "\(text) while proxying, \(place)")
        case .quiet: break
        }
        return .closeBoth(resetting: nil)
    }

    /// `side` closed. `inOrder`: it ended cleanly after its output was shut (only with
    /// `proxy_half_close on`): the other side then finishes writing instead of being cut short.
    /// The engine reports only the session's own upstream (not a failed dial's socket).
    public mutating func closed(_ side: Side, inOrder: Bool, now: UInt64) -> Action {
        if side == .client { clientOpen = false } else { upstreamOpen = false }
        let otherOpen = side == .client ? upstreamOpen : clientOpen
        if otherOpen { return inOrder ? .shutdownOutput(side.other) : .close(side.other) }
        return finish(now: now)
    }

    // MARK: proxy_timeout

    /// `proxy_timeout` has passed since the last activity.
    public func isIdle(now: UInt64) -> Bool {
        now &- lastActivity >= UInt64(proxy.idleTimeoutMilliseconds) * 1_000_000
    }

    /// The idle timer fired: end the session if it has been idle long enough, else watch again.
    public mutating func idleTimerFired(now: UInt64) -> Action {
        switch stage {
        case .ended: return .none
        case .closing where record.transport == .tcp: return .none
        default: break
        }
        guard isIdle(now: now) else { return .watchIdle }
        if record.transport == .udp {
            // nginx: a session still waiting for proxy_responses answers ends with 502.
            if stage == .relaying, udp.owesResponses(proxy) {
                note(.error, "upstream timed out (110: Connection timed out) while proxying connection, \(place)")
                record.outcome = SessionOutcome(phase: .relay, cause: .upstreamTimedOut)
            }
            return finish(now: now)
        }
        guard stage == .relaying else { return .none }
        stage = .closing
        record.outcome = SessionOutcome(phase: .relay, cause: .idleTimeout)
        note(.info, "connection timed out (proxy_timeout), \(place)")
        return .closeBoth(resetting: nil)
    }

    // MARK: UDP

    /// UDP: the session's first datagram, of `size` bytes, arrived (then pass it to
    /// `clientDatagram`, unless the answer was `.reply`, which has counted it).
    public mutating func datagramSessionStarted(size: Int = 0, now: UInt64) -> Action {
        let action = admit(now: now)
        if case .reply = action { record.bytesReceived += UInt64(size) }
        return action
    }

    /// The PROXY v2 header every datagram to the upstream starts with (`proxy_protocol on`).
    public var datagramHeader: [UInt8]? { udp.header }

    /// What to do with one client datagram.
    public struct ClientDatagram: Sendable, Equatable {
        public enum Disposition: Sendable, Equatable {
            /// Send it to the upstream now (`datagramHeader` first); then `sentUpstream`.
            case forward
            /// Keep it until the upstream socket is ready.
            case hold
            case drop
        }
        public var disposition: Disposition
        /// The session takes no more datagrams (`proxy_requests`): later ones from this client
        /// start a new session.
        public var detach = false
        /// Once this one is sent, the session is done (`proxy_responses 0`): call `end`.
        public var endAfterSending = false
    }

    public mutating func clientDatagram(_ bytes: Int, now: UInt64) -> ClientDatagram {
        record.bytesReceived += UInt64(bytes)
        lastActivity = now
        guard stage == .dialing || stage == .relaying else { return ClientDatagram(disposition: .drop) }
        var verdict = ClientDatagram(disposition: .drop)
        if proxy.udpRequests > 0 && udp.taken + 1 >= proxy.udpRequests && !udp.detached {
            // nginx's proxy_requests: this session takes no more; it ends once the responses
            // are in (or at proxy_timeout).
            udp.detached = true
            verdict.detach = true
        }
        if gate.throttles {
            // UDP has no backpressure: over the limit, the datagram is dropped, not delayed.
            if gate.delay(.fromClient, now: now, reserve: false) > 0 {
                udp.dropped += 1
                return verdict
            }
            gate.spend(bytes, .fromClient, now: now)
        }
        guard stage == .relaying else {
            guard udp.held < DatagramCounts.maximumHeld else {
                udp.dropped += 1
                return verdict
            }
            udp.held += 1
            udp.taken += 1
            verdict.disposition = .hold
            return verdict
        }
        udp.taken += 1
        verdict.disposition = .forward
        verdict.endAfterSending = proxy.udpResponses == 0  // fire and forget
        return verdict
    }

    /// UDP: whether answers from the upstream are read at all (`proxy_responses 0`: none are
    /// expected, and the session ends once its datagram is sent).
    public var expectsReplies: Bool { proxy.udpResponses != 0 }

    /// Whether the session takes a datagram from its client (not after `proxy_requests`).
    public var takesDatagrams: Bool { stage != .ended && !udp.detached }

    /// A datagram of `bytes` (header included) was written to the upstream: it expects
    /// `proxy_responses` answers.
    public mutating func sentUpstream(_ bytes: Int) {
        udp.requests += 1
        record.upstreamBytesSent += UInt64(bytes)
    }

    /// A datagram could not be sent: the upstream socket's send queue was full.
    public mutating func upstreamQueueFull() { udp.overflowed += 1 }

    /// The held datagrams were sent once the upstream socket was ready: with `proxy_responses 0`
    /// the session is then done.
    public mutating func heldDatagramsSent(now: UInt64) -> Action {
        guard stage == .relaying, udp.held > 0, proxy.udpResponses == 0 else { return .none }
        return finish(now: now)
    }

    /// What to do with a datagram from the upstream.
    public struct UpstreamDatagram: Sendable, Equatable {
        /// Send it to the client (else a rate limit dropped it).
        public var reply: Bool
        /// Every request has its answers (`proxy_responses`): call `end` after replying.
        public var ends: Bool
    }

    public mutating func upstreamDatagram(_ bytes: Int, now: UInt64) -> UpstreamDatagram {
        guard stage == .relaying else { return UpstreamDatagram(reply: false, ends: false) }
        lastActivity = now
        noteFirstUpstreamByte(now: now)
        record.upstreamBytesReceived += UInt64(bytes)
        udp.responses += 1
        var reply = true
        if gate.throttles {
            reply = gate.delay(.fromUpstream, now: now, reserve: false) == 0
            if reply { gate.spend(bytes, .fromUpstream, now: now) }
        }
        if reply { record.bytesSent += UInt64(bytes) } else { udp.dropped += 1 }
        let ends = proxy.udpResponses.map { udp.responses >= $0.multipliedReportingOverflow(by: udp.requests).partialValue } ?? false
        return UpstreamDatagram(reply: reply, ends: ends)
    }

    /// UDP: the upstream socket failed (an ICMP "port unreachable" shows up as ECONNREFUSED).
    public mutating func upstreamFailed(_ reason: String, now: UInt64) -> Action {
        guard stage != .ended else { return .none }
        note(.error, "\(reason) while proxying connection, \(place)")
        if udp.responses == 0 { record.outcome = SessionOutcome(phase: .relay, cause: .upstreamRefusedDatagrams) }
        return finish(now: now)
    }

    /// UDP: end now (`proxy_responses` answered, fire and forget, a drain, its table's room).
    public mutating func end(now: UInt64) -> Action { finish(now: now) }

    // MARK: log

    /// Ends the session once it is done: gives back its limit slots and hands back its record.
    /// TCP is done when neither side is open and no dial is under way.
    private mutating func finish(now: UInt64, abandoningUpstream: Bool = false) -> Action {
        guard stage != .ended else { return .none }
        if record.transport == .tcp && !abandoningUpstream && (clientOpen || upstreamOpen || stage == .dialing || stage == .upstreamHandshaking) {
            return .none
        }
        stage = .ended
        gate.release()
        releaseServer()
        if udp.dropped > 0 {
            note(.info, "dropped \(udp.dropped) datagrams over the session's rate limit, \(place)")
        }
        if udp.overflowed > 0 {
            note(.warn, "dropped \(udp.overflowed) datagrams: the upstream socket's send queue was full, \(place)")
        }
        record.endTime = wallClock(now)
        if let upstreamStartedAt { record.upstreamSessionTime = Double(now &- upstreamStartedAt) / 1e9 }
        return .end(record, audit: !udp.auditWritten)
    }

    // MARK: Helpers

    /// The session no longer counts against its server (a failed connect, or its end).
    private mutating func releaseServer() {
        if let heldServer { group?.release(heldServer) }
        heldServer = nil
    }

    /// "client: …, server: …", the end of nginx's error-log lines (with "udp " for UDP).
    public var place: String { SessionGate.place(record) }

    private mutating func note(_ level: ErrorLogSpec.Level, _ message: String) {
        notes.append(.log(level, message))
    }

    private func wallClock(_ now: UInt64) -> Double {
        record.startTime + Double(now &- acceptedAt) / 1e9
    }

    private static func milliseconds(_ now: UInt64) -> Int64 { Int64(now / 1_000_000) }
}

/// A UDP session's datagram counts (`proxy_requests`, `proxy_responses`, drops).
private struct DatagramCounts: Sendable {
    /// Client datagrams held while the upstream socket is made, at most.
    static let maximumHeld = 64
    var header: [UInt8]?
    /// Client datagrams this session took for its upstream (held or sent): `proxy_requests`.
    var taken = 0
    var held = 0
    /// Datagrams written to the upstream: each expects `proxy_responses` answers.
    var requests = 0
    var responses = 0
    /// Dropped by a bandwidth limit (UDP has no backpressure), or for want of room while held.
    var dropped = 0
    /// Dropped because the upstream socket's send queue was full (a stuck upstream socket must
    /// not queue without end).
    var overflowed = 0
    var detached = false
    var auditWritten = false

    func owesResponses(_ proxy: ProxySettings) -> Bool {
        guard let expected = proxy.udpResponses, expected > 0 else { return false }
        return responses < expected.multipliedReportingOverflow(by: requests).partialValue
    }
}
