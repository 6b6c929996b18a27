public import PortcullisCore
import PortcullisWire

/// `portcullis explain`: the decision a gateway started on these rules would make for one
/// client, phase by phase, from the same `SessionMachine` the engine drives (so it cannot
/// disagree with it), with every rule-defined variable evaluated. Nothing is connected: the
/// walk stops at the upstream it would dial. Limit zones start empty, as after a start.
public struct Explanation: Sendable {
    public struct Step: Sendable, Equatable {
        /// A `Phase` name ("access", "limit_conn", …).
        public var phase: String
        public var text: String
        /// The rule that acted, as the audit log names it.
        public var rule: RuleReference?
    }

    /// The listen the client arrived on, and where it is written.
    public var listen: String
    public var listenLocation: SourceLocation
    /// `$remote_addr` after realip, and the TCP peer.
    public var client: SocketEndpoint
    public var peer: SocketEndpoint
    public var steps: [Step] = []
    /// Every variable the rules define, by name, as this session would see it (nil: not found).
    public var variables: [(name: String, value: [UInt8]?)] = []
    public var outcome: SessionOutcome
    /// The address it would connect to first (nil: refused, `return`, or a name to look up).
    public var upstream: String?
    /// The error-log lines the session would write up to there.
    public var errorLog: [String] = []
}

public enum Explainer {
    /// - Parameters:
    ///   - peer: the TCP peer when it is not `client` (`--proxy-from`): on a `proxy_protocol`
    ///     listen it sends a PROXY header naming `client`, believed if `set_real_ip_from` trusts it.
    ///   - serverName: the SNI of a ClientHello (`ssl_preread`) or a handshake (`listen … ssl`).
    ///   - wallClock: seconds since 1970 (the time variables).
    public static func explain(_ server: ServerPolicy, listen: ListenSpec, client: SocketEndpoint,
                               peer: SocketEndpoint? = nil, serverName: String? = nil, wallClock: Double) -> Explanation {
        let listener = ListenerPolicy(server: server, listen: listen)
        let local = listen.endpoint
        let tcpPeer = peer ?? client
        let now: UInt64 = 1_000_000_000
        var machine = SessionMachine(listener: listener, connection: 1, client: tcpPeer, server: local, now: now,
                                     wallClock: wallClock)
        var explanation = Explanation(listen: listen.description, listenLocation: listen.location, client: client,
                                      peer: tcpPeer, outcome: .completed)
        func step(_ phase: Phase, _ text: String, _ rule: RuleReference? = nil) {
            explanation.steps.append(Explanation.Step(phase: phase.rawValue, text: text, rule: rule))
        }
        if listen.udp { step(.accept, "a UDP session: the decision is made on its first datagram") }

        var action = listen.udp ? machine.datagramSessionStarted(now: now) : machine.accepted(now: now)
        var walking = true
        for _ in 0..<8 where walking {
            switch action {
            case .readProxyHeader:
                let header = ProxyHeaderEncoder.v1(source: client, destination: local)
                let trusted = server.realIPFrom.trusts(tcpPeer)
                step(.proxyHeaderRead, "the PROXY header from \(tcpPeer.hostText) names \(client)"
                    + (trusted ? "; set_real_ip_from trusts the sender: $remote_addr is \(client.hostText)"
                               : "; the sender is not in set_real_ip_from: $remote_addr stays \(tcpPeer.hostText)"))
                action = header.withUnsafeBytes { machine.received($0, now: now) }
            case .readClientHello:
                let hello = ClientHelloBuilder.record(serverName: serverName)
                step(.preread, serverName.map { "a ClientHello with SNI \"\($0)\"" } ?? "a ClientHello without SNI (give --sni NAME)")
                action = hello.withUnsafeBytes { machine.received($0, now: now) }
            case .startTLS:
                step(.ssl, "the TLS handshake" + (serverName.map { " with SNI \"\($0)\"" } ?? " without SNI"))
                let info = TLSSessionInfo(protocolName: "TLSv1.3", cipher: "TLS_AES_256_GCM_SHA384", serverName: serverName ?? "",
                                          alpnProtocol: "", sessionReused: false, clientVerify: "NONE", clientSubject: "",
                                          clientCommonName: "", clientPresentedCertificate: false, signatureAlgorithm: "",
                                          keyAlgorithm: "")
                action = machine.tlsEstablished(info, certificate: .none, now: now)
            case .dial(let dial):
                explanation.upstream = dial.endpoint.description
                walking = false
            case .resolve(let host, _):
                explanation.upstream = "\(host) (looked up by the resolver when a client comes)"
                walking = false
            default:
                walking = false
            }
        }
        let record = machine.record
        explanation.client = record.client
        explanation.outcome = record.outcome
        for note in machine.takeNotes() {
            if case .log(let level, let text) = note { explanation.errorLog.append("[\(level.rawValue)] \(text)") }
        }
        describeDecision(server, record, into: &explanation)
        let table = server.variables
        for index in 0..<table.count where !table.names[index].contains("#") {
            explanation.variables.append((table.names[index], VariableRenderer.value(of: .defined(index), in: record, host: .current)))
        }
        return explanation
    }

    /// The access, limit and content steps, from what the machine decided.
    private static func describeDecision(_ server: ServerPolicy, _ record: SessionRecord, into explanation: inout Explanation) {
        func step(_ phase: Phase, _ text: String, _ rule: RuleReference?) {
            explanation.steps.append(Explanation.Step(phase: phase.rawValue, text: text, rule: rule))
        }
        let outcome = record.outcome
        let decidedEarlier: Set<Phase> = [.proxyHeaderRead, .preread, .ssl]
        if decidedEarlier.contains(outcome.phase) && outcome.refused { return }
        if outcome.phase == .access {
            var text = "denied"
            if let (name, value) = record.decidingVariable {
                text += " by \(name) = \"\(String(decoding: value, as: UTF8.self))\""
            }
            step(.access, text + (outcome.enforcement == .dryRun ? " (dry run: not carried out)" : ""), outcome.rule)
            return
        }
        let verdict = server.access.evaluate(record.client) { VariableRenderer.value(of: $0, in: record, host: .current) }
        if let rule = verdict.rule {
            step(.access, "allowed", rule.reference)
        } else {
            step(.access, server.access.rules.isEmpty ? "allowed: no allow/deny rules" : "allowed: no rule matched", nil)
        }
        for rule in server.limits.conn {
            let key = String(decoding: rule.zone.key.bytes(for: record), as: UTF8.self)
            if outcome.phase == .limitConn, outcome.rule == rule.reference {
                step(.limitConn, "refused: key \"\(key)\" in zone \"\(rule.zone.name)\" is at its limit of \(rule.limit)", rule.reference)
                return
            }
            step(.limitConn, key.isEmpty ? "not counted: its key is empty for this client"
                                         : "counted: key \"\(key)\" in zone \"\(rule.zone.name)\", limit \(rule.limit) (zones start empty here)",
                 rule.reference)
        }
        for rule in server.limits.rate {
            let key = String(decoding: rule.zone.key.bytes(for: record), as: UTF8.self)
            if outcome.phase == .limitRate, outcome.rule == rule.reference {
                step(.limitRate, "refused: key \"\(key)\" in zone \"\(rule.zone.name)\"", rule.reference)
                return
            }
            step(.limitRate, "key \"\(key)\" in zone \"\(rule.zone.name)\"", rule.reference)
        }
        if outcome.cause == .returned {
            step(.content, "return: the server answers itself, nothing is proxied", nil)
        } else if outcome.refused {
            step(outcome.phase, outcome.cause.reason ?? "refused", outcome.rule)
        } else if let upstream = explanation.upstream {
            step(.upstreamPick, "connect to \(upstream)", nil)
        }
    }
}
