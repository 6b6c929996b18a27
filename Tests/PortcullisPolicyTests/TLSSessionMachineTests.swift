import Testing
import PortcullisCore
import PortcullisRules
import PortcullisWire
@testable import PortcullisPolicy

/// Builds TLS ClientHello records for the preread tests: a TLS 1.3 hello (supported_versions
/// 0x0304, 0x0303) or a TLS 1.2 one (no supported_versions), with SNI and ALPN when given.
enum TestClientHello {
    static func u16(_ n: Int) -> [UInt8] { [UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)] }
    static func u24(_ n: Int) -> [UInt8] { [UInt8(n >> 16 & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)] }

    /// The handshake message (type 1, length, body), not yet in a record.
    static func handshake(serverName: String? = "good.test", alpn: [String] = ["h2", "http/1.1"], tls13: Bool = true,
                          padding: Int = 0) -> [UInt8] {
        var extensions: [UInt8] = []
        if let serverName {
            let name = Array(serverName.utf8)
            let data = u16(name.count + 3) + [0] + u16(name.count) + name
            extensions += u16(0) + u16(data.count) + data
        }
        if !alpn.isEmpty {
            let list = alpn.flatMap { [UInt8($0.utf8.count)] + Array($0.utf8) }
            let data = u16(list.count) + list
            extensions += u16(16) + u16(data.count) + data
        }
        if tls13 {
            let data: [UInt8] = [4, 0x03, 0x04, 0x03, 0x03]
            extensions += u16(43) + u16(data.count) + data
        }
        if padding > 0 {
            extensions += u16(21) + u16(padding) + [UInt8](repeating: 0, count: padding)
        }
        var body: [UInt8] = [0x03, 0x03] + [UInt8](repeating: 0x11, count: 32)  // legacy_version, random
        body += [32] + [UInt8](repeating: 0x22, count: 32)                       // session_id
        body += u16(6) + [0x13, 0x01, 0x13, 0x02, 0xC0, 0x2F]                    // cipher_suites
        body += [1, 0]                                                            // compression_methods
        body += u16(extensions.count) + extensions
        return [1] + u24(body.count) + body
    }

    /// One record holding the whole hello.
    static func record(serverName: String? = "good.test", alpn: [String] = ["h2", "http/1.1"], tls13: Bool = true,
                       padding: Int = 0) -> [UInt8] {
        let message = handshake(serverName: serverName, alpn: alpn, tls13: tls13, padding: padding)
        return [0x16, 0x03, 0x01] + u16(message.count) + message
    }

    /// The hello fragmented over two records, split after `at` bytes of the message.
    static func twoRecords(at split: Int, serverName: String = "good.test") -> [UInt8] {
        let message = handshake(serverName: serverName)
        let (a, b) = (Array(message[..<split]), Array(message[split...]))
        return [0x16, 0x03, 0x01] + u16(a.count) + a + [0x16, 0x03, 0x01] + u16(b.count) + b
    }
}

/// The ssl (`listen … ssl`), preread (`ssl_preread on`) and upstream TLS (`proxy_ssl on`)
/// transitions of the session machine, without sockets, on rule files compiled as `run` does.
@Suite struct TLSSessionMachineTests {
    static let ms: UInt64 = 1_000_000
    static let t0: UInt64 = 1_000 * 1_000_000_000
    static let certificates = "ssl_certificate /etc/portcullis/a.pem; ssl_certificate_key /etc/portcullis/a.key;"
    static let place = "client: 10.0.0.1, server: 127.0.0.1:8080"

    // The rule-file and machine set-up of the plain session-machine tests.
    static func listener(_ server: String, stream: String = "") throws -> ListenerPolicy {
        try SessionMachineTests.listener(server, stream: stream)
    }

    static func endpoint(_ text: String) -> SocketEndpoint { SessionMachineTests.endpoint(text) }

    static func machine(_ listener: ListenerPolicy, client: String = "10.0.0.1:40000", connection: UInt64 = 1) -> SessionMachine {
        SessionMachineTests.machine(listener, client: client, connection: connection, now: t0)
    }

    /// The actions, in short words, so each step is one exact comparison.
    static func describe(_ action: SessionMachine.Action) -> String {
        switch action {
        case .none: return "none"
        case .readClientHello(let timeout): return "readClientHello(\(timeout))"
        case .startTLS(let timeout): return "startTLS(\(timeout))"
        case .startUpstreamTLS(let start): return "startUpstreamTLS(\(start.endpoint))"
        case .readProxyHeader(let timeout): return "readProxyHeader(\(timeout))"
        case .readMore: return "readMore"
        case .dial(let dial): return "dial(\(dial.endpoint))"
        case .startRelay: return "startRelay"
        case .closeClient: return "closeClient"
        case .reply(let bytes): return "reply(\(String(decoding: bytes, as: UTF8.self)))"
        case .end: return "end"
        default: return "\(action)"
        }
    }

    static func feed(_ m: inout SessionMachine, _ bytes: [UInt8], now: UInt64 = t0) -> SessionMachine.Action {
        bytes.withUnsafeBytes { m.received($0, now: now) }
    }

    /// The error-log notes taken now, as "level message".
    static func logs(_ m: inout SessionMachine) -> [String] {
        m.takeNotes().compactMap { if case .log(let level, let text) = $0 { "\(level.rawValue) \(text)" } else { nil } }
    }

    static func started(_ action: SessionMachine.Action) -> SessionMachine.RelayStart? {
        if case .startRelay(let start) = action { start } else { nil }
    }

    static func upstreamTLS(_ action: SessionMachine.Action) -> SessionMachine.UpstreamTLSStart? {
        if case .startUpstreamTLS(let start) = action { start } else { nil }
    }

    static func ended(_ action: SessionMachine.Action) -> SessionRecord? {
        if case .end(let record, _) = action { record } else { nil }
    }

    static func info(serverName: String = "good.test", alpn: String = "h2", reused: Bool = false,
                     certificate: Bool = false, verify: String = "NONE", subject: String = "", commonName: String = "") -> TLSSessionInfo {
        TLSSessionInfo(protocolName: "TLSv1.3", cipher: "TLS_AES_256_GCM_SHA384", serverName: serverName, alpnProtocol: alpn,
                       sessionReused: reused, clientVerify: verify, clientSubject: subject, clientCommonName: commonName,
                       clientPresentedCertificate: certificate, signatureAlgorithm: "RSA-SHA256", keyAlgorithm: "RSA2048")
    }

    static let helloInfo = ClientHelloInfo(serverName: "good.test", alpnProtocols: ["h2", "http/1.1"], protocolVersion: "TLSv1.3",
                                           legacyVersion: 0x0303, supportedVersions: [0x0304, 0x0303])

    // MARK: The test hellos themselves

    @Test("the test ClientHellos are ones the peeker reads: TLS 1.3 and 1.2, SNI and ALPN, fragmented; every proper prefix needs more")
    func testHellosPeek() {
        let hello = TestClientHello.record()
        #expect(ClientHelloPeeker.peek(hello) == .hello(Self.helloInfo))
        #expect(ClientHelloPeeker.peek(Array(hello.dropLast())) == .needMore)
        #expect(ClientHelloPeeker.peek(Array(hello[..<5])) == .needMore)
        #expect(ClientHelloPeeker.peek(TestClientHello.twoRecords(at: 30)) == .hello(Self.helloInfo))
        #expect(ClientHelloPeeker.peek(TestClientHello.record(serverName: nil, alpn: [], tls13: false))
                == .hello(ClientHelloInfo(serverName: "", alpnProtocols: [], protocolVersion: "TLSv1.2", legacyVersion: 0x0303)))
        #expect(ClientHelloPeeker.peek(Array("GET / HTTP/1.1\r\n".utf8)) == .notTLS)
    }

    // MARK: ssl (listen … ssl)

    @Test("listen … ssl: access first, then startTLS with ssl_handshake_timeout (default 60 s); the handshake's result goes to the record, then the dial")
    func terminationHandshakeThenDial() throws {
        let listener = try Self.listener("listen 8080 ssl; \(Self.certificates) allow 10.0.0.0/8; deny all; proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "startTLS(60000)")
        #expect(m.handshaking && !m.readingForMachine)
        // An early deadline check or the upstream's events do nothing while handshaking.
        #expect(Self.describe(m.dialSucceeded(now: Self.t0)) == "none")
        let info = Self.info()
        #expect(Self.describe(m.tlsEstablished(info, certificate: .none, now: Self.t0 + 5 * Self.ms)) == "dial(127.0.0.1:9000)")
        #expect(!m.handshaking && m.record.tls == info)
        // A second report of the handshake changes nothing.
        #expect(Self.describe(m.tlsEstablished(Self.info(serverName: "other.test"), certificate: .none, now: Self.t0)) == "none")
        #expect(Self.describe(m.tlsFailed("late", now: Self.t0)) == "none")
        #expect(m.record.tls?.serverName == "good.test")
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0 + 6 * Self.ms)))
        #expect(start == SessionMachine.RelayStart(toUpstream: [], throttled: false, clientEnded: false))
        #expect(Self.logs(&m).isEmpty)
    }

    @Test("ssl_handshake_timeout: the server's own value, else the stream's", arguments: [
        ("ssl_handshake_timeout 5s;", "", "startTLS(5000)"),
        ("", "ssl_handshake_timeout 750ms;", "startTLS(750)"),
        ("ssl_handshake_timeout 2m;", "ssl_handshake_timeout 750ms;", "startTLS(120000)"),
    ])
    func handshakeTimeoutValue(server: String, stream: String, expected: String) throws {
        let listener = try Self.listener("listen 8080 ssl; \(Self.certificates) \(server) proxy_pass 127.0.0.1:9000;", stream: stream)
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == expected)
    }

    @Test("listen … ssl: a denied client is closed before any handshake (403 in access), and a late handshake report does nothing")
    func deniedBeforeHandshake() throws {
        let listener = try Self.listener("listen 8080 ssl; \(Self.certificates) deny 10.0.0.0/8; proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "closeClient")
        #expect(!m.handshaking)
        #expect(m.record.outcome.cause == .accessDenied && m.record.status == .forbidden && m.record.phase == .access)
        #expect(Self.describe(m.tlsEstablished(Self.info(), certificate: .none, now: Self.t0)) == "none")
        #expect(m.record.tls == nil)
        #expect(Self.logs(&m) == ["error access forbidden by rule, \(Self.place)"])
    }

    @Test("listen … ssl with return: the reply is rendered after the handshake, so it sees $ssl_*")
    func returnAfterHandshake() throws {
        let listener = try Self.listener("listen 8080 ssl; \(Self.certificates) return \"$ssl_protocol $ssl_server_name $ssl_alpn_protocol\\n\";")
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "startTLS(60000)")
        #expect(Self.describe(m.tlsEstablished(Self.info(), certificate: .none, now: Self.t0)) == "reply(TLSv1.3 good.test h2\n)")
        let record = try #require(Self.ended(m.closed(.client, inOrder: false, now: Self.t0 + Self.ms)))
        #expect(record.outcome == SessionOutcome(phase: .content, cause: .returned) && record.status == .ok)
        #expect(record.tls == Self.info() && record.bytesSent == 21)
    }

    @Test("a failed handshake: closeClient, 500 in phase ssl, OpenSSL's reason in the record and in an info line \"… while SSL handshaking\"")
    func handshakeFailed() throws {
        let listener = try Self.listener("listen 8080 ssl; \(Self.certificates) proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        let reason = "SSL_do_handshake() failed (SSL: error:0A00010B:SSL routines::wrong version number)"
        #expect(Self.describe(m.tlsFailed(reason, now: Self.t0 + Self.ms)) == "closeClient")
        #expect(!m.handshaking)
        #expect(m.record.outcome == SessionOutcome(phase: .ssl, cause: .tlsHandshakeFailed(reason)))
        #expect(m.record.status == .internalError && m.record.refused)
        #expect(m.record.reason == "TLS handshake failed: \(reason)")
        #expect(Self.logs(&m) == ["info \(reason) while SSL handshaking, \(Self.place)"])
        // Nothing is dialled afterwards, and the record ends once the client is closed.
        #expect(Self.describe(m.tlsEstablished(Self.info(), certificate: .none, now: Self.t0)) == "none")
        let record = try #require(Self.ended(m.closed(.client, inOrder: false, now: Self.t0 + 2 * Self.ms)))
        #expect(record.status == .internalError && record.phase == .ssl && record.upstreamAttempts.isEmpty)
    }

    @Test("what the unfinished handshake says ($ssl_protocol, $ssl_cipher \"(NONE)\") is kept on a failure and on the deadline, for the log line")
    func failedHandshakeKeepsInfo() throws {
        let listener = try Self.listener("listen 8080 ssl; \(Self.certificates) proxy_pass 127.0.0.1:9000;")
        var unfinished = Self.info(serverName: "good.test", alpn: "")
        unfinished.cipher = "(NONE)"
        var failed = Self.machine(listener)
        _ = failed.accepted(now: Self.t0)
        _ = failed.tlsFailed("peer closed connection in SSL handshake", info: unfinished, now: Self.t0)
        #expect(failed.record.tls == unfinished)
        #expect(try Self.render(failed.record) == "TLSv1.3|(NONE)|good.test|-|.|-|NONE|-|-|-")
        var slow = Self.machine(listener, connection: 2)
        _ = slow.accepted(now: Self.t0)
        _ = slow.clientDeadlinePassed(now: Self.t0 + 60_000 * Self.ms, tls: unfinished)
        #expect(slow.record.tls == unfinished && slow.record.outcome.cause == .tlsHandshakeTimedOut)
        // Without what the connection says, the record has no TLS values.
        var bare = Self.machine(listener, connection: 3)
        _ = bare.accepted(now: Self.t0)
        _ = bare.tlsFailed("peer closed connection in SSL handshake", now: Self.t0)
        #expect(bare.record.tls == nil)
    }

    @Test("the handshake's deadline: 500, cause tlsHandshakeTimedOut, nginx's timeout line; a handshake that ends later does nothing")
    func handshakeTimedOut() throws {
        let listener = try Self.listener("listen 8080 ssl; \(Self.certificates) ssl_handshake_timeout 3s; proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "startTLS(3000)")
        #expect(Self.describe(m.clientDeadlinePassed(now: Self.t0 + 3_000 * Self.ms)) == "closeClient")
        #expect(m.record.outcome == SessionOutcome(phase: .ssl, cause: .tlsHandshakeTimedOut))
        #expect(m.record.status == .internalError && m.record.reason == "TLS handshake timed out")
        #expect(Self.logs(&m) == ["info client timed out (110: Connection timed out) while SSL handshaking, \(Self.place)"])
        #expect(Self.describe(m.tlsEstablished(Self.info(), certificate: .none, now: Self.t0 + 3_001 * Self.ms)) == "none")
        #expect(Self.describe(m.clientDeadlinePassed(now: Self.t0 + 4_000 * Self.ms)) == "none")
        #expect(Self.logs(&m).isEmpty)
    }

    static let failedChain = SessionMachine.ClientCertificateCheck(presented: true, code: 20, text: "unable to get local issuer certificate", caUnknown: true)
    static let expired = SessionMachine.ClientCertificateCheck(presented: true, code: 10, text: "certificate has expired", caUnknown: false)
    static let verified = SessionMachine.ClientCertificateCheck(presented: true, code: 0, text: "ok", caUnknown: false)
    static let noCertificateLine = "info client sent no required SSL certificate while SSL handshaking, \(place)"
    static let chainLine = "info client SSL certificate verify error: (20:unable to get local issuer certificate) while SSL handshaking, \(place)"
    static let expiredLine = "info client SSL certificate verify error: (10:certificate has expired) while SSL handshaking, \(place)"

    /// (ssl_verify_client, the certificate, the rejection's words or nil for a pass, the log line).
    static let verifyCases: [(String, SessionMachine.ClientCertificateCheck, String?, String?)] = [
        ("on", .none, "no certificate sent", noCertificateLine),
        ("on", failedChain, "verify error (20: unable to get local issuer certificate)", chainLine),
        ("on", expired, "verify error (10: certificate has expired)", expiredLine),
        ("on", verified, nil, nil),
        ("optional", .none, nil, nil),
        ("optional", failedChain, "verify error (20: unable to get local issuer certificate)", chainLine),
        ("optional", verified, nil, nil),
        ("optional_no_ca", .none, nil, nil),
        ("optional_no_ca", failedChain, nil, nil),
        ("optional_no_ca", expired, "verify error (10: certificate has expired)", expiredLine),
        ("off", expired, nil, nil),
        ("off", .none, nil, nil),
    ]

    @Test("ssl_verify_client: on needs a verified certificate; optional takes none; optional_no_ca forgives an unknown CA only; off looks at nothing",
          arguments: verifyCases)
    func verifyClient(mode: String, check: SessionMachine.ClientCertificateCheck, rejection: String?, line: String?) throws {
        let listener = try Self.listener("listen 8080 ssl; \(Self.certificates) ssl_client_certificate /etc/portcullis/ca.pem; ssl_verify_client \(mode); proxy_pass 127.0.0.1:9000;")
        #expect(listener.server.tls?.verifyClient == ["on": .on, "optional": .optional, "optional_no_ca": .optionalNoCA, "off": .off][mode])
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "startTLS(60000)")
        let info = Self.info(certificate: check.presented, verify: check.presented ? (check.code == 0 ? "SUCCESS" : "FAILED:\(check.text)") : "NONE")
        let action = Self.describe(m.tlsEstablished(info, certificate: check, now: Self.t0))
        // The handshake's values are kept whether or not the certificate passes.
        #expect(m.record.tls == info)
        if let rejection {
            #expect(action == "closeClient")
            #expect(m.record.outcome == SessionOutcome(phase: .ssl, cause: .clientCertificateRejected(rejection)))
            #expect(m.record.status == .internalError && m.record.reason == "client certificate rejected: \(rejection)")
        } else {
            #expect(action == "dial(127.0.0.1:9000)")
            #expect(m.record.outcome == .completed)
        }
        #expect(Self.logs(&m) == (line.map { [$0] } ?? []))
    }

    // MARK: preread (ssl_preread on)

    static let prereadServer = "listen 8080; ssl_preread on; allow 10.0.0.0/8; deny all; proxy_pass 127.0.0.1:9000;"

    @Test("ssl_preread, access not reading $ssl_preread_*: access first; a denied client is never asked for its ClientHello")
    func prereadAfterAccessDenied() throws {
        let listener = try Self.listener(Self.prereadServer)
        #expect(listener.server.preread && !listener.server.prereadBeforeAccess)
        var m = Self.machine(listener, client: "192.0.2.1:40000")
        #expect(Self.describe(m.accepted(now: Self.t0)) == "closeClient")
        #expect(!m.readingClientHello && !m.readingForMachine)
        #expect(m.record.status == .forbidden && m.record.phase == .access && m.record.rule?.text == "deny all;")
        #expect(m.record.preread == nil)
    }

    @Test("ssl_preread: readClientHello (preread_timeout, 30 s), a partial hello reads more, the rest dials; the SNI/ALPN kept; every byte goes to the upstream")
    func prereadInTwoPieces() throws {
        let listener = try Self.listener(Self.prereadServer)
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "readClientHello(30000)")
        #expect(m.readingClientHello && m.readingForMachine)
        let hello = TestClientHello.record()
        // While preread runs, its variables are found and empty (as nginx's).
        #expect(m.record.preread == ClientHelloInfo())
        #expect(Self.describe(Self.feed(&m, Array(hello[..<20]))) == "readMore")
        #expect(m.record.preread == ClientHelloInfo())
        #expect(Self.describe(Self.feed(&m, Array(hello[20...]))) == "dial(127.0.0.1:9000)")
        #expect(!m.readingClientHello)
        #expect(m.record.preread == Self.helloInfo)
        // A timer that fires after the hello changes nothing.
        #expect(Self.describe(m.clientDeadlinePassed(now: Self.t0 + 30_000 * Self.ms)) == "none")
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0 + Self.ms)))
        #expect(start.toUpstream == hello)
        #expect(m.record.bytesReceived == UInt64(hello.count) && m.record.upstreamBytesSent == UInt64(hello.count))
        #expect(Self.logs(&m).isEmpty)
    }

    @Test("ssl_preread: byte by byte, and a hello fragmented over two records; preread_timeout's own value")
    func prereadByteByByte() throws {
        let listener = try Self.listener("listen 8080; ssl_preread on; preread_timeout 5s; proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "readClientHello(5000)")
        let hello = TestClientHello.twoRecords(at: 40)
        for byte in hello.dropLast() {
            #expect(Self.describe(Self.feed(&m, [byte])) == "readMore")
        }
        #expect(Self.describe(Self.feed(&m, [hello.last!])) == "dial(127.0.0.1:9000)")
        #expect(m.record.preread == Self.helloInfo)
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        #expect(start.toUpstream == hello)
    }

    @Test("ssl_preread: bytes that are not TLS (decided once 5 bytes are in, as nginx) go on to the dial with the preread variables unset, and reach the upstream")
    func prereadNotTLS() throws {
        let listener = try Self.listener(Self.prereadServer)
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        let request = Array("GET / HTTP/1.1\r\n".utf8)
        // "GET" alone is not decided yet: nginx waits for a record header's 5 bytes.
        #expect(Self.describe(Self.feed(&m, Array(request[..<3]))) == "readMore")
        #expect(m.readingClientHello)
        #expect(Self.describe(Self.feed(&m, Array(request[3...]))) == "dial(127.0.0.1:9000)")
        #expect(m.record.preread == nil, "nginx drops its preread state for bytes that are not TLS")
        // Not found: "-" in a log line, empty where a value is used.
        let template = try LogTemplate.parse("[$ssl_preread_server_name|$ssl_preread_alpn_protocols|$ssl_preread_protocol]")
        #expect(String(decoding: template.bytes(for: m.record), as: UTF8.self) == "[||]")
        #expect(try Self.render(m.record) == "-|-|-|-|-|-|-|-|-|-")
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        #expect(start.toUpstream == request)

        // Five bytes that are not a handshake record decide at once.
        var five = Self.machine(listener, connection: 2)
        _ = five.accepted(now: Self.t0)
        #expect(Self.describe(Self.feed(&five, Array("HELLO".utf8))) == "dial(127.0.0.1:9000)")
    }

    @Test("ssl_preread: preread_buffer_size bytes without a whole hello: 400, preread buffer full (one byte less still reads)")
    func prereadBufferFull() throws {
        let listener = try Self.listener("listen 8080; ssl_preread on; preread_buffer_size 64; proxy_pass 127.0.0.1:9000;")
        #expect(listener.server.proxy.prereadBufferSize == 64)
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        let hello = TestClientHello.record(padding: 100)
        #expect(ClientHelloPeeker.peek(Array(hello[..<64])) == .needMore)
        #expect(Self.describe(Self.feed(&m, Array(hello[..<63]))) == "readMore")
        #expect(Self.describe(Self.feed(&m, [hello[63]])) == "closeClient")
        #expect(m.record.outcome == SessionOutcome(phase: .preread, cause: .prereadBufferFull))
        #expect(m.record.status == .badRequest && m.record.reason == "preread buffer full")
        #expect(Self.logs(&m) == ["error preread buffer full while prereading client data, \(Self.place)"])
        #expect(try Self.render(m.record) == "-|-|-|-|-|-|-|||", "found and empty, as nginx logs them")
        let record = try #require(Self.ended(m.closed(.client, inOrder: false, now: Self.t0)))
        #expect(record.status == .badRequest && record.upstreamAttempts.isEmpty)
    }

    @Test("ssl_preread: the deadline passes before the hello: 200, prereadTimedOut, the client closed, nothing dialled")
    func prereadTimedOut() throws {
        let listener = try Self.listener("listen 8080; ssl_preread on; preread_timeout 2s; proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "readClientHello(2000)")
        _ = Self.feed(&m, Array(TestClientHello.record()[..<10]))
        #expect(Self.describe(m.clientDeadlinePassed(now: Self.t0 + 2_000 * Self.ms)) == "closeClient")
        #expect(m.record.outcome == SessionOutcome(phase: .preread, cause: .prereadTimedOut))
        #expect(m.record.status == .ok && m.record.reason == nil)
        #expect(Self.logs(&m) == ["info client timed out (110: Connection timed out) while prereading client data, \(Self.place)"])
        #expect(try Self.render(m.record) == "-|-|-|-|-|-|-|||", "found and empty, as nginx logs them")
        let record = try #require(Self.ended(m.closed(.client, inOrder: false, now: Self.t0 + 2_001 * Self.ms)))
        #expect(record.status == .ok && record.phase == .preread && record.upstreamAttempts.isEmpty)
    }

    @Test("ssl_preread: the client's EOF or a reset during preread: 200, prereadIncomplete")
    func prereadClientGone() throws {
        let listener = try Self.listener("listen 8080; ssl_preread on; proxy_pass 127.0.0.1:9000;")
        var eof = Self.machine(listener)
        _ = eof.accepted(now: Self.t0)
        _ = Self.feed(&eof, Array(TestClientHello.record()[..<10]))
        #expect(Self.describe(eof.inputClosed(.client, now: Self.t0)) == "closeClient")
        #expect(eof.record.outcome == SessionOutcome(phase: .preread, cause: .prereadIncomplete) && eof.record.status == .ok)

        var reset = Self.machine(listener, connection: 2)
        _ = reset.accepted(now: Self.t0)
        #expect(Self.describe(reset.failed(.client, .reset("connection reset"), now: Self.t0)) == "closeClient")
        #expect(reset.record.outcome == SessionOutcome(phase: .preread, cause: .prereadIncomplete) && reset.record.status == .ok)
    }

    // MARK: preread before access

    static let blockedMap = "map $ssl_preread_server_name $blocked { evil.test 1; default \"\"; }"

    @Test("deny $blocked reading $ssl_preread_server_name: preread runs first; SNI evil.test is refused 403 with the rule, good.test passes")
    func prereadBeforeAccess() throws {
        let listener = try Self.listener("listen 8080; ssl_preread on; deny $blocked; proxy_pass 127.0.0.1:9000;", stream: Self.blockedMap)
        #expect(listener.server.prereadBeforeAccess)
        var evil = Self.machine(listener)
        #expect(Self.describe(evil.accepted(now: Self.t0)) == "readClientHello(30000)")
        #expect(Self.describe(Self.feed(&evil, TestClientHello.record(serverName: "evil.test"))) == "closeClient")
        #expect(evil.record.outcome.cause == .accessDenied && evil.record.status == .forbidden && evil.record.phase == .access)
        #expect(evil.record.rule?.text == "deny $blocked;")
        #expect(evil.record.preread?.serverName == "evil.test")

        var good = Self.machine(listener, connection: 2)
        #expect(Self.describe(good.accepted(now: Self.t0)) == "readClientHello(30000)")
        let hello = TestClientHello.record(serverName: "good.test")
        #expect(Self.describe(Self.feed(&good, hello)) == "dial(127.0.0.1:9000)")
        #expect(good.record.outcome == .completed)
        let start = try #require(Self.started(good.dialSucceeded(now: Self.t0)))
        #expect(start.toUpstream == hello)

        // Not TLS: $ssl_preread_server_name is not found, $blocked takes its default, access passes.
        var plain = Self.machine(listener, connection: 3)
        _ = plain.accepted(now: Self.t0)
        #expect(Self.describe(Self.feed(&plain, Array("GET / HTTP/1.1\r\n".utf8))) == "dial(127.0.0.1:9000)")
        #expect(plain.record.outcome == .completed && plain.record.preread == nil)
    }

    @Test("prereadBeforeAccess: true when access rules or limit keys read $ssl_preread_* (directly or through map), false otherwise",
          arguments: [
            ("ssl_preread on; deny $blocked;", blockedMap, true),
            ("ssl_preread on; limit_conn sni 10;", "limit_conn_zone $ssl_preread_server_name zone=sni:1m;", true),
            ("ssl_preread on; limit_conn sni 10;", "limit_conn_zone $blocked zone=sni:1m; \(blockedMap)", true),
            ("ssl_preread on; allow 127.0.0.1; deny all;", "", false),
            ("ssl_preread on; limit_conn addr 10;", "limit_conn_zone $binary_remote_addr zone=addr:1m;", false),
            ("deny $blocked;", blockedMap, false),
          ])
    func prereadBeforeAccessFlag(server: String, stream: String, expected: Bool) throws {
        let listener = try Self.listener("listen 8080; \(server) proxy_pass 127.0.0.1:9000;", stream: stream)
        #expect(listener.server.prereadBeforeAccess == expected)
    }

    @Test("limit_conn keyed by $ssl_preread_server_name: counted per SNI, after preread")
    func limitConnBySNI() throws {
        let listener = try Self.listener("listen 8080; ssl_preread on; limit_conn sni 1; proxy_pass 127.0.0.1:9000;",
                                         stream: "limit_conn_zone $ssl_preread_server_name zone=sni:1m;")
        var first = Self.machine(listener, connection: 1)
        #expect(Self.describe(first.accepted(now: Self.t0)) == "readClientHello(30000)")
        #expect(Self.describe(Self.feed(&first, TestClientHello.record(serverName: "a.test"))) == "dial(127.0.0.1:9000)")
        var sameName = Self.machine(listener, connection: 2)
        _ = sameName.accepted(now: Self.t0)
        #expect(Self.describe(Self.feed(&sameName, TestClientHello.record(serverName: "a.test"))) == "closeClient")
        #expect(sameName.record.outcome.cause == .connectionLimit(zone: "sni") && sameName.record.status == .serviceUnavailable)
        var otherName = Self.machine(listener, connection: 3)
        _ = otherName.accepted(now: Self.t0)
        #expect(Self.describe(Self.feed(&otherName, TestClientHello.record(serverName: "b.test"))) == "dial(127.0.0.1:9000)")
    }

    // MARK: PROXY header + preread

    static let clientHeader = Array("PROXY TCP4 198.51.100.7 127.0.0.1 5555 8080\r\n".utf8)

    @Test("listen … proxy_protocol + ssl_preread: the bytes after the PROXY header in the same read start the ClientHello")
    func proxyHeaderThenHello() throws {
        let listener = try Self.listener("listen 8080 proxy_protocol; ssl_preread on; proxy_pass 127.0.0.1:9000;")
        let hello = TestClientHello.record()
        // The header and part of the hello in one read, the rest in another.
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "readProxyHeader(30000)")
        #expect(Self.describe(Self.feed(&m, Self.clientHeader + hello[..<30])) == "readClientHello(30000)")
        #expect(m.readingClientHello && m.record.proxyHeader != nil)
        #expect(Self.describe(Self.feed(&m, Array(hello[30...]))) == "dial(127.0.0.1:9000)")
        #expect(m.record.preread == Self.helloInfo)
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        #expect(start.toUpstream == hello, "the PROXY header is not forwarded, the whole hello is")

        // The header and the whole hello in one read: straight to the dial.
        var whole = Self.machine(listener, connection: 2)
        _ = whole.accepted(now: Self.t0)
        #expect(Self.describe(Self.feed(&whole, Self.clientHeader + hello)) == "dial(127.0.0.1:9000)")
        #expect(whole.record.preread == Self.helloInfo)
        #expect(Self.started(whole.dialSucceeded(now: Self.t0))?.toUpstream == hello)

        // The header alone: then the hello is asked for.
        var alone = Self.machine(listener, connection: 3)
        _ = alone.accepted(now: Self.t0)
        #expect(Self.describe(Self.feed(&alone, Self.clientHeader)) == "readClientHello(30000)")
        #expect(Self.describe(Self.feed(&alone, hello)) == "dial(127.0.0.1:9000)")
    }

    @Test("PROXY header + preread before access: the SNI after the header decides; our own v1 header goes before the hello")
    func proxyHeaderHelloBeforeAccess() throws {
        let listener = try Self.listener("listen 8080 proxy_protocol; set_real_ip_from 10.0.0.0/8; ssl_preread on; deny $blocked; proxy_pass 127.0.0.1:9000; proxy_protocol on;",
                                         stream: Self.blockedMap)
        var evil = Self.machine(listener)
        _ = evil.accepted(now: Self.t0)
        #expect(Self.describe(Self.feed(&evil, Self.clientHeader + TestClientHello.record(serverName: "evil.test"))) == "closeClient")
        #expect(evil.record.status == .forbidden && evil.record.client == Self.endpoint("198.51.100.7:5555"))

        var good = Self.machine(listener, connection: 2)
        _ = good.accepted(now: Self.t0)
        let hello = TestClientHello.record()
        #expect(Self.describe(Self.feed(&good, Self.clientHeader + hello)) == "dial(127.0.0.1:9000)")
        let start = try #require(Self.started(good.dialSucceeded(now: Self.t0)))
        #expect(start.toUpstream == Array("PROXY TCP4 198.51.100.7 127.0.0.1 5555 8080\r\n".utf8) + hello)
    }

    // MARK: proxy_ssl on

    static let backend = "upstream backend { server 127.0.0.1:9001; }"

    @Test("proxy_ssl on + proxy_protocol on: the PROXY header is the handshake's preface, not sent again with the relay; the client's early bytes follow")
    func upstreamTLSWithProxyHeader() throws {
        let listener = try Self.listener("listen 8080; proxy_pass backend; proxy_ssl on; proxy_protocol on;", stream: Self.backend)
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "dial(127.0.0.1:9001)")
        _ = Self.feed(&m, Array("early".utf8))
        let header = Array("PROXY TCP4 10.0.0.1 127.0.0.1 40000 8080\r\n".utf8)
        let start = try #require(Self.upstreamTLS(m.dialSucceeded(now: Self.t0 + 2 * Self.ms)))
        #expect(start == SessionMachine.UpstreamTLSStart(preface: header, serverName: nil, verifyName: nil,
                                                         endpoint: Self.endpoint("127.0.0.1:9001")))
        #expect(!m.relaying)
        #expect(Self.describe(m.upstreamTLSEstablished(now: Self.t0 + 5 * Self.ms)) == "startRelay")
        #expect(m.relaying)
        // A second report does nothing.
        #expect(Self.describe(m.upstreamTLSEstablished(now: Self.t0 + 6 * Self.ms)) == "none")
        #expect(m.record.upstreamBytesSent == UInt64(header.count + 5))
        #expect(m.record.upstreamAttempts.count == 1)
        #expect(abs((m.record.upstreamAttempts[0].connectTime ?? 0) - 0.005) < 1e-9, "the handshake counts as part of the connect")
    }

    @Test("proxy_ssl on without proxy_protocol: an empty preface; the relay then starts with the client's bytes")
    func upstreamTLSNoHeader() throws {
        let listener = try Self.listener("listen 8080; proxy_pass backend; proxy_ssl on;", stream: Self.backend)
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        _ = Self.feed(&m, Array("hi".utf8))
        let start = try #require(Self.upstreamTLS(m.dialSucceeded(now: Self.t0)))
        #expect(start.preface.isEmpty && start.serverName == nil && start.verifyName == nil)
        let relay = try #require(Self.started(m.upstreamTLSEstablished(now: Self.t0)))
        #expect(relay.toUpstream == Array("hi".utf8))
    }

    /// (directives, the SNI sent, the name verified).
    static let nameCases: [(String, String?, String?)] = [
        ("proxy_pass backend;", nil, nil),
        ("proxy_pass backend; proxy_ssl_server_name on;", "backend", nil),
        ("proxy_pass backend; proxy_ssl_verify on;", nil, "backend"),
        ("proxy_pass backend; proxy_ssl_server_name on; proxy_ssl_verify on;", "backend", "backend"),
        ("proxy_pass 127.0.0.1:9001; proxy_ssl_server_name on; proxy_ssl_verify on;", nil, "127.0.0.1"),
        ("proxy_pass backend; proxy_ssl_server_name on; proxy_ssl_verify on; proxy_ssl_name api.test:8443;", "api.test", "api.test"),
        ("proxy_pass backend; proxy_ssl_server_name on; proxy_ssl_verify on; proxy_ssl_name $remote_addr.example:443;",
         "10.0.0.1.example", "10.0.0.1.example"),
        ("proxy_pass backend; proxy_ssl_server_name on; proxy_ssl_name api.test:8443;", "api.test", nil),
        ("proxy_pass backend; proxy_ssl_server_name on; proxy_ssl_verify on; proxy_ssl_name 192.0.2.10;", nil, "192.0.2.10"),
        ("proxy_pass backend; proxy_ssl_server_name on; proxy_ssl_verify on; proxy_ssl_name [2001:db8::1]:443;", nil, "2001:db8::1"),
    ]

    @Test("proxy_ssl_server_name / proxy_ssl_name / proxy_ssl_verify: SNI only when asked and not an address; the name without its port", arguments: nameCases)
    func upstreamTLSNames(directives: String, serverName: String?, verifyName: String?) throws {
        let listener = try Self.listener("listen 8080; proxy_ssl on; proxy_ssl_trusted_certificate /etc/portcullis/ca.pem; \(directives)",
                                         stream: Self.backend)
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        let start = try #require(Self.upstreamTLS(m.dialSucceeded(now: Self.t0)))
        #expect(start.serverName == serverName)
        #expect(start.verifyName == verifyName)
    }

    @Test("the upstream's handshake fails: the next upstream is dialled (the header again as its preface), an error line with the reason; the last one failing is 502")
    func upstreamTLSFailed() throws {
        let listener = try Self.listener("listen 8080; proxy_pass pool; proxy_ssl on; proxy_protocol on;",
                                         stream: "upstream pool { server 127.0.0.1:9001; server 127.0.0.1:9002; }")
        let header = Array("PROXY TCP4 10.0.0.1 127.0.0.1 40000 8080\r\n".utf8)
        var m = Self.machine(listener)
        guard case .dial(let first) = m.accepted(now: Self.t0) else { Issue.record("expected a dial"); return }
        #expect(Self.upstreamTLS(m.dialSucceeded(now: Self.t0))?.preface == header)
        let reason = "SSL_do_handshake() failed (SSL: error:0A000086:SSL routines::certificate verify failed) while SSL handshaking to upstream"
        guard case .dial(let second) = m.upstreamTLSFailed(reason, now: Self.t0 + Self.ms) else { Issue.record("the next upstream was not dialled"); return }
        #expect(Set([first.endpoint, second.endpoint]) == [Self.endpoint("127.0.0.1:9001"), Self.endpoint("127.0.0.1:9002")])
        #expect(Self.logs(&m) == ["error \(reason), \(Self.place), upstream: \"\(first.endpoint)\""])
        let retry = try #require(Self.upstreamTLS(m.dialSucceeded(now: Self.t0 + 2 * Self.ms)))
        #expect(retry.preface == header && retry.endpoint == second.endpoint)
        let relay = try #require(Self.started(m.upstreamTLSEstablished(now: Self.t0 + 3 * Self.ms)))
        #expect(relay.toUpstream.isEmpty)
        #expect(m.record.upstreamAttempts.map(\.address) == [first.endpoint, second.endpoint])
        #expect(m.record.upstreamAttempts[0].connectTime == nil && m.record.upstreamAttempts[1].connectTime != nil)

        let single = try Self.listener("listen 8080; proxy_pass backend; proxy_ssl on;", stream: Self.backend)
        var one = Self.machine(single, connection: 2)
        _ = one.accepted(now: Self.t0)
        _ = one.dialSucceeded(now: Self.t0)
        #expect(Self.describe(one.upstreamTLSFailed("peer closed connection in SSL handshake while SSL handshaking to upstream", now: Self.t0)) == "closeClient")
        #expect(one.record.outcome == SessionOutcome(phase: .upstreamPick, cause: .upstreamUnreachable))
        #expect(one.record.status == .badGateway && one.record.upstreamAttempts.count == 1)
        #expect(Self.logs(&one) == ["error peer closed connection in SSL handshake while SSL handshaking to upstream, \(Self.place), upstream: \"127.0.0.1:9001\""])
    }

    @Test("the client leaves during the upstream's handshake: its EOF is passed on at the relay; a close ends the session when the handshake ends")
    func clientDuringUpstreamHandshake() throws {
        let listener = try Self.listener("listen 8080; proxy_pass backend; proxy_ssl on;", stream: Self.backend)
        var eof = Self.machine(listener)
        _ = eof.accepted(now: Self.t0)
        _ = eof.dialSucceeded(now: Self.t0)
        #expect(Self.describe(eof.inputClosed(.client, now: Self.t0)) == "none")
        #expect(Self.started(eof.upstreamTLSEstablished(now: Self.t0))?.clientEnded == true)

        var gone = Self.machine(listener, connection: 2)
        _ = gone.accepted(now: Self.t0)
        _ = gone.dialSucceeded(now: Self.t0)
        #expect(Self.describe(gone.closed(.client, inOrder: false, now: Self.t0)) == "none")
        #expect(Self.describe(gone.upstreamTLSEstablished(now: Self.t0)) == "end")
    }

    // MARK: PROXY v2 TLVs

    static func decodedHeader(_ bytes: [UInt8]) throws -> (ProxyHeader, Int) {
        let decoded = try #require(try ProxyHeaderDecoder.decode(bytes))
        return (decoded.header, decoded.length)
    }

    @Test("proxy_protocol v2 after termination: ALPN and AUTHORITY from the handshake, the SSL TLV with client bits, verify and the sub-TLVs", arguments: [
        (false, "NONE", UInt8(0x01), UInt32(1)),
        (true, "SUCCESS", UInt8(0x07), UInt32(0)),
        (true, "FAILED:certificate has expired", UInt8(0x07), UInt32(1)),
    ])
    func v2TLVsFromTermination(certificate: Bool, verify: String, client: UInt8, verifyField: UInt32) throws {
        let listener = try Self.listener("listen 8080 ssl; \(Self.certificates) proxy_pass 127.0.0.1:9000; proxy_protocol v2;")
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        let info = Self.info(certificate: certificate, verify: verify,
                             subject: certificate ? "CN=alice,O=Example" : "", commonName: certificate ? "alice" : "")
        #expect(Self.describe(m.tlsEstablished(info, certificate: .none, now: Self.t0)) == "dial(127.0.0.1:9000)")
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        let (header, length) = try Self.decodedHeader(start.toUpstream)
        #expect(length == start.toUpstream.count)
        #expect(header.version == .v2 && header.source == Self.endpoint("10.0.0.1:40000"))
        #expect(header.tlv(0x01) == Array("h2".utf8))
        #expect(header.tlv(0x02) == Array("good.test".utf8))
        let sslValue = try #require(header.tlv(0x20))
        let ssl = try #require(ProxySSLInfo(sslValue))
        #expect(ssl.client == client && ssl.verify == verifyField)
        var expected = [ProxyTLV(type: 0x21, value: Array("TLSv1.3".utf8))]
        if certificate { expected.append(ProxyTLV(type: 0x22, value: Array("alice".utf8))) }
        expected += [ProxyTLV(type: 0x23, value: Array("TLS_AES_256_GCM_SHA384".utf8)),
                     ProxyTLV(type: 0x24, value: Array("RSA-SHA256".utf8)),
                     ProxyTLV(type: 0x25, value: Array("RSA2048".utf8))]
        #expect(ssl.subTLVs == expected)
        #expect(header.tlvs.map(\.type) == [0x01, 0x02, 0x20])
    }

    @Test("proxy_protocol v2 after termination without SNI or ALPN: no empty ALPN or AUTHORITY TLV, the SSL TLV still")
    func v2TLVsNoNames() throws {
        let listener = try Self.listener("listen 8080 ssl; \(Self.certificates) proxy_pass 127.0.0.1:9000; proxy_protocol v2;")
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        _ = m.tlsEstablished(Self.info(serverName: "", alpn: ""), certificate: .none, now: Self.t0)
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        let (header, _) = try Self.decodedHeader(start.toUpstream)
        #expect(header.tlvs.map(\.type) == [0x20])
    }

    @Test("proxy_protocol v2 after preread: AUTHORITY is the SNI, ALPN the extension's list in wire form; the hello follows the header")
    func v2TLVsAfterPreread() throws {
        let listener = try Self.listener("listen 8080; ssl_preread on; proxy_pass 127.0.0.1:9000; proxy_protocol v2;")
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        let hello = TestClientHello.record()
        _ = Self.feed(&m, hello)
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        let (header, length) = try Self.decodedHeader(start.toUpstream)
        #expect(header.tlv(0x02) == Array("good.test".utf8))
        #expect(header.tlv(0x01) == [2] + Array("h2".utf8) + [8] + Array("http/1.1".utf8))
        #expect(header.tlv(0x20) == nil)
        #expect(Array(start.toUpstream[length...]) == hello)
        #expect(m.record.upstreamBytesSent == UInt64(start.toUpstream.count))

        // Not TLS: neither TLV.
        var plain = Self.machine(listener, connection: 2)
        _ = plain.accepted(now: Self.t0)
        _ = Self.feed(&plain, Array("GET / HTTP/1.1\r\n".utf8))
        let plainStart = try #require(Self.started(plain.dialSucceeded(now: Self.t0)))
        let (plainHeader, plainLength) = try Self.decodedHeader(plainStart.toUpstream)
        #expect(plainHeader.tlvs.isEmpty)
        #expect(Array(plainStart.toUpstream[plainLength...]) == Array("GET / HTTP/1.1\r\n".utf8))
    }

    // MARK: Variables

    static let sslFormat = "$ssl_protocol|$ssl_cipher|$ssl_server_name|$ssl_alpn_protocol|$ssl_session_reused|$ssl_client_s_dn|$ssl_client_verify|$ssl_preread_server_name|$ssl_preread_alpn_protocols|$ssl_preread_protocol"

    static func render(_ record: SessionRecord) throws -> String {
        let format = LogFormat(name: "tls", escape: .default, template: try LogTemplate.parse(sslFormat))
        return format.render(record, host: HostFacts(hostname: "gw", pid: 1))
    }

    @Test("$ssl_* and $ssl_preread_*: \"-\" when not found (no TLS, no preread, an empty SNI/ALPN/subject), the values otherwise")
    func variablesRender() throws {
        let plain = try Self.listener("listen 8080; proxy_pass 127.0.0.1:9000;")
        var none = Self.machine(plain)
        _ = none.accepted(now: Self.t0)
        #expect(try Self.render(none.record) == "-|-|-|-|-|-|-|-|-|-")

        let terminating = try Self.listener("listen 8080 ssl; \(Self.certificates) ssl_client_certificate /etc/portcullis/ca.pem; ssl_verify_client optional; proxy_pass 127.0.0.1:9000;")
        var tls = Self.machine(terminating)
        _ = tls.accepted(now: Self.t0)
        _ = tls.tlsEstablished(Self.info(certificate: true, verify: "SUCCESS", subject: "CN=alice,O=Example", commonName: "alice"),
                               certificate: Self.verified, now: Self.t0)
        #expect(try Self.render(tls.record) == "TLSv1.3|TLS_AES_256_GCM_SHA384|good.test|h2|.|CN=alice,O=Example|SUCCESS|-|-|-")

        var bare = Self.machine(terminating, connection: 2)
        _ = bare.accepted(now: Self.t0)
        _ = bare.tlsEstablished(Self.info(serverName: "", alpn: "", reused: true), certificate: .none, now: Self.t0)
        #expect(try Self.render(bare.record) == "TLSv1.3|TLS_AES_256_GCM_SHA384|-|-|r|-|NONE|-|-|-")

        let prereading = try Self.listener("listen 8080; ssl_preread on; proxy_pass 127.0.0.1:9000;")
        var hello = Self.machine(prereading)
        _ = hello.accepted(now: Self.t0)
        _ = Self.feed(&hello, TestClientHello.record())
        #expect(try Self.render(hello.record) == "-|-|-|-|-|-|-|good.test|h2,http/1.1|TLSv1.3")

        var old = Self.machine(prereading, connection: 2)
        _ = old.accepted(now: Self.t0)
        _ = Self.feed(&old, TestClientHello.record(serverName: nil, alpn: [], tls13: false))
        #expect(try Self.render(old.record) == "-|-|-|-|-|-|-|||TLSv1.2")

        var notTLS = Self.machine(prereading, connection: 3)
        _ = notTLS.accepted(now: Self.t0)
        _ = Self.feed(&notTLS, Array("SSH-2.0-OpenSSH_9.6\r\n".utf8))
        #expect(try Self.render(notTLS.record) == "-|-|-|-|-|-|-|-|-|-")
    }

    @Test("listen … ssl proxy_protocol: the header is peeked and only its bytes are taken; what follows is the handshake's, never upstream payload")
    func sslAfterPeekedProxyHeader() throws {
        let listener = try Self.listener("listen 8080 ssl proxy_protocol; \(Self.certificates) proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener)
        #expect(Self.describe(m.accepted(now: Self.t0)) == "readProxyHeader(30000)")
        let hello = TestClientHello.record()
        // Half the header: nothing to take yet.
        let half = Array(Self.clientHeader.prefix(10))
        let (waiting, none) = half.withUnsafeBytes { m.peekedHeader($0, now: Self.t0) }
        #expect(Self.describe(waiting) == "readMore" && none == 0)
        // The whole header and part of the hello, peeked again from the start.
        let peeked = Self.clientHeader + hello.prefix(100)
        let (action, consumed) = peeked.withUnsafeBytes { m.peekedHeader($0, now: Self.t0) }
        #expect(Self.describe(action) == "startTLS(60000)")
        #expect(consumed == Self.clientHeader.count)
        #expect(m.record.proxyHeader?.source == Self.endpoint("198.51.100.7:5555"))
        _ = m.tlsEstablished(Self.info(), certificate: .none, now: Self.t0)
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        #expect(start.toUpstream.isEmpty)
        #expect(m.record.bytesReceived == 0)
    }
}
