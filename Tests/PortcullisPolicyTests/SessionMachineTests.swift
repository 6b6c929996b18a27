import Testing
import PortcullisCore
import PortcullisRules
import PortcullisWire
@testable import PortcullisPolicy

private struct NoHostsResolver: HostResolver {
    func addresses(of host: String) -> [IPAddress] { [] }
}

/// The session machine without sockets: every phase transition and every way a session ends,
/// driven by the events an engine would report, on rule files compiled as `run` compiles them.
@Suite struct SessionMachineTests {
    static let ms: UInt64 = 1_000_000
    static let t0: UInt64 = 1_000 * 1_000_000_000

    static func listener(_ server: String, stream: String = "") throws -> ListenerPolicy {
        let text = """
            stream {
                \(stream)
                server {
                    \(server)
                }
            }
            """
        let result = RuleLoader.load(text: text, file: "rules.conf", resolver: NoHostsResolver())
        let snapshot = try #require(result.snapshot, "\(result.rendered)")
        let policy = try #require(snapshot.servers.first)
        return ListenerPolicy(server: policy, listen: try #require(policy.listens.first))
    }

    static func endpoint(_ text: String) -> SocketEndpoint { SocketEndpoint(text)! }

    static func machine(_ listener: ListenerPolicy, client: String = "10.0.0.1:40000", connection: UInt64 = 1,
                        now: UInt64 = t0) -> SessionMachine {
        SessionMachine(listener: listener, connection: connection, client: endpoint(client),
                       server: endpoint("127.0.0.1:8080"), now: now, wallClock: 1_764_000_000)
    }

    /// The messages of the error-log notes taken now.
    static func logs(_ machine: inout SessionMachine) -> [String] {
        machine.takeNotes().compactMap { if case .log(_, let text) = $0 { text } else { nil } }
    }

    static func dialled(_ action: SessionMachine.Action) -> SessionMachine.Dial? {
        if case .dial(let dial) = action { dial } else { nil }
    }

    static func ended(_ action: SessionMachine.Action) -> (SessionRecord, Bool)? {
        if case .end(let record, let audit) = action { (record, audit) } else { nil }
    }

    static func started(_ action: SessionMachine.Action) -> SessionMachine.RelayStart? {
        if case .startRelay(let start) = action { start } else { nil }
    }

    // MARK: TCP, let through

    @Test("accept → access → upstream_pick → relay → log: one record with the bytes, 200, phase relay")
    func plainSession() throws {
        let listener = try Self.listener("listen 8080; allow 10.0.0.0/8; deny all; proxy_pass 127.0.0.1:9000; proxy_connect_timeout 5s;")
        var m = Self.machine(listener)
        let dial = try #require(Self.dialled(m.accepted(now: Self.t0)))
        #expect(dial == SessionMachine.Dial(endpoint: Self.endpoint("127.0.0.1:9000"), timeoutMilliseconds: 5_000))
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0 + 2 * Self.ms)))
        #expect(start == SessionMachine.RelayStart(toUpstream: [], throttled: false, clientEnded: false))
        #expect(m.relaying)
        m.relayed(100, from: .client, now: Self.t0 + 3 * Self.ms)
        m.relayed(2_000, from: .upstream, now: Self.t0 + 4 * Self.ms)
        // proxy_half_close off: an EOF ends the session once the other side's bytes are written.
        guard case .closeWhenWritten(.upstream) = m.inputClosed(.client, now: Self.t0 + 5 * Self.ms) else {
            Issue.record("expected closeWhenWritten(.upstream)"); return
        }
        guard case .close(.upstream) = m.closed(.client, inOrder: false, now: Self.t0 + 6 * Self.ms) else {
            Issue.record("expected the upstream to be closed"); return
        }
        let (record, audit) = try #require(Self.ended(m.closed(.upstream, inOrder: false, now: Self.t0 + 1_006 * Self.ms)))
        #expect(audit && m.ended)
        #expect(record.outcome == .completed && record.status == .ok && record.phase == .relay)
        #expect(record.bytesReceived == 100 && record.upstreamBytesSent == 100)
        #expect(record.bytesSent == 2_000 && record.upstreamBytesReceived == 2_000)
        #expect(record.upstreamAttempts == [UpstreamAttempt(address: Self.endpoint("127.0.0.1:9000"), connectTime: 0.002, firstByteTime: 0.004)])
        #expect(abs(record.sessionTime - 1.006) < 1e-6, "end time derived from the monotonic clock: \(record.sessionTime)")
        #expect(abs((record.upstreamSessionTime ?? 0) - 1.004) < 1e-6)
        #expect(Self.logs(&m).isEmpty)
        // Events after the end do nothing.
        if case .none = m.closed(.client, inOrder: false, now: Self.t0 + 2_000 * Self.ms) {} else { Issue.record("ended twice") }
    }

    @Test("access: a denied client is closed at once; the record names the rule, 403, phase access")
    func accessDenied() throws {
        let listener = try Self.listener("listen 8080;\n        deny 10.0.0.0/8;\n        proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener)
        guard case .closeClient = m.accepted(now: Self.t0) else { Issue.record("expected closeClient"); return }
        #expect(Self.logs(&m) == ["access forbidden by rule, client: 10.0.0.1, server: 127.0.0.1:8080"])
        let (record, audit) = try #require(Self.ended(m.closed(.client, inOrder: false, now: Self.t0 + Self.ms)))
        #expect(audit)
        #expect(record.outcome.cause == .accessDenied && record.status == .forbidden && record.phase == .access)
        #expect(record.rule?.text == "deny 10.0.0.0/8;" && record.rule?.line == 5)
        #expect(record.outcome.enforcement == .enforced)
    }

    @Test("IPv4-mapped IPv6 clients meet the IPv4 rules")
    func mappedClient() throws {
        let listener = try Self.listener("listen 8080; deny 10.0.0.0/8; proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener, client: "[::ffff:10.1.2.3]:5000")
        guard case .closeClient = m.accepted(now: Self.t0) else { Issue.record("a mapped address passed the IPv4 deny"); return }
    }

    @Test("proxy_protocol to the upstream: the v1 header is the first bytes the upstream gets, counted as sent")
    func proxyHeaderToUpstream() throws {
        let listener = try Self.listener("listen 8080; proxy_pass 127.0.0.1:9000; proxy_protocol on;")
        var m = Self.machine(listener)
        _ = try #require(Self.dialled(m.accepted(now: Self.t0)))
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        #expect(String(decoding: start.toUpstream, as: UTF8.self) == "PROXY TCP4 10.0.0.1 127.0.0.1 40000 8080\r\n")
        #expect(m.record.upstreamBytesSent == UInt64(start.toUpstream.count))
    }

    // MARK: TCP, proxy_header_read and realip

    static let proxyListen = "listen 8080 proxy_protocol; set_real_ip_from 127.0.0.0/8; deny 192.0.2.0/24; proxy_pass 127.0.0.1:9000; proxy_protocol_timeout 3s;"

    @Test("proxy_header_read: a header in pieces, then payload; a trusted sender's source becomes the client")
    func proxyHeaderInPieces() throws {
        let listener = try Self.listener(Self.proxyListen)
        var m = Self.machine(listener, client: "127.0.0.2:40000")
        guard case .readProxyHeader(3_000) = m.accepted(now: Self.t0) else { Issue.record("expected readProxyHeader"); return }
        let header = Array("PROXY TCP4 198.51.100.7 127.0.0.1 5555 8080\r\n".utf8)
        guard case .readMore = Array(header[..<10]).withUnsafeBytes({ m.received($0, now: Self.t0) }) else {
            Issue.record("expected readMore"); return
        }
        let rest = Array(header[10...]) + Array("hello".utf8)
        _ = try #require(Self.dialled(rest.withUnsafeBytes { m.received($0, now: Self.t0) }))
        #expect(!m.readingProxyHeader)
        #expect(m.record.client == Self.endpoint("198.51.100.7:5555") && m.record.peer == Self.endpoint("127.0.0.2:40000"))
        // What followed the header goes to the upstream first, counted.
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        #expect(start.toUpstream == Array("hello".utf8))
        #expect(m.record.bytesReceived == 5)
        // A header timer that fires now changes nothing.
        if case .none = m.headerTimedOut(now: Self.t0 + 4_000 * Self.ms) {} else { Issue.record("late timer acted") }
    }

    @Test("realip: an untrusted sender's header is kept but not believed; the rules see the peer")
    func untrustedSender() throws {
        let listener = try Self.listener(Self.proxyListen)
        var m = Self.machine(listener, client: "192.0.2.9:40000")
        _ = m.accepted(now: Self.t0)
        let header = Array("PROXY TCP4 198.51.100.7 127.0.0.1 5555 8080\r\n".utf8)
        guard case .closeClient = header.withUnsafeBytes({ m.received($0, now: Self.t0) }) else {
            Issue.record("the untrusted header's source was believed"); return
        }
        #expect(m.record.client.address == IPAddress("192.0.2.9") && m.record.proxyHeader != nil)
        #expect(m.record.status == .forbidden)
    }

    @Test("a broken header, a header cut short by EOF or a reset, a header too slow: 400 in proxy_header_read")
    func badHeaders() throws {
        let listener = try Self.listener(Self.proxyListen)
        var broken = Self.machine(listener, client: "127.0.0.2:1")
        _ = broken.accepted(now: Self.t0)
        guard case .closeClient = Array("GET / HTTP/1.1\r\n".utf8).withUnsafeBytes({ broken.received($0, now: Self.t0) }) else {
            Issue.record("expected closeClient"); return
        }
        #expect(broken.record.status == .badRequest && broken.record.phase == .proxyHeaderRead)
        guard case .proxyHeaderBroken = broken.record.outcome.cause else { Issue.record("\(broken.record.outcome)"); return }
        #expect(Self.logs(&broken).first?.hasPrefix("broken header: \"GET / HTTP/1.1\\x0D\\x0A\"") == true)

        var cut = Self.machine(listener, client: "127.0.0.2:2")
        _ = cut.accepted(now: Self.t0)
        _ = Array("PROXY TCP4 1.2".utf8).withUnsafeBytes { cut.received($0, now: Self.t0) }
        guard case .closeClient = cut.inputClosed(.client, now: Self.t0) else { Issue.record("expected closeClient"); return }
        #expect(cut.record.outcome.cause == .proxyHeaderIncomplete("the client closed the connection"))
        #expect(cut.record.reason == "incomplete PROXY protocol header: the client closed the connection")

        var reset = Self.machine(listener, client: "127.0.0.2:3")
        _ = reset.accepted(now: Self.t0)
        guard case .closeClient = reset.failed(.client, .reset("connection reset"), now: Self.t0) else {
            Issue.record("expected closeClient"); return
        }
        #expect(reset.record.outcome.cause == .proxyHeaderIncomplete("connection reset"))

        var slow = Self.machine(listener, client: "127.0.0.2:4")
        _ = slow.accepted(now: Self.t0)
        guard case .closeClient = slow.headerTimedOut(now: Self.t0 + 3_000 * Self.ms) else { Issue.record("expected closeClient"); return }
        #expect(slow.record.outcome.cause == .proxyHeaderTimedOut && slow.record.status == .badRequest)
        #expect(Self.logs(&slow) == ["client timed out (110: Connection timed out) while reading PROXY protocol, client: 127.0.0.2, server: 127.0.0.1:8080"])
        let (record, _) = try #require(Self.ended(slow.closed(.client, inOrder: false, now: Self.t0 + 3_001 * Self.ms)))
        #expect(record.status == .badRequest)
    }

    // MARK: TCP, upstream_pick and dials

    static let twoUpstreams = """
        upstream pool { server 127.0.0.1:9001; server 127.0.0.1:9002; }
        """

    @Test("a failed dial tries the next upstream; when all failed: 502 upstream unreachable, both attempts in the record")
    func nextUpstream() throws {
        let listener = try Self.listener("listen 8080; proxy_pass pool;", stream: Self.twoUpstreams)
        var m = Self.machine(listener)
        let first = try #require(Self.dialled(m.accepted(now: Self.t0)))
        let second = try #require(Self.dialled(m.dialFailed(.failed(errno: 111, message: "Connection refused"), now: Self.t0)))
        #expect(Set([first.endpoint, second.endpoint]) == [Self.endpoint("127.0.0.1:9001"), Self.endpoint("127.0.0.1:9002")])
        guard case .closeClient = m.dialFailed(.timedOut, now: Self.t0) else { Issue.record("expected closeClient"); return }
        #expect(m.record.outcome == SessionOutcome(phase: .upstreamPick, cause: .upstreamUnreachable))
        #expect(m.record.status == .badGateway && m.record.upstreamAttempts.map(\.connectTime) == [nil, nil])
        let logs = Self.logs(&m)
        #expect(logs.count == 2)
        #expect(logs[0] == "connect() failed (111: Connection refused) while connecting to upstream, client: 10.0.0.1, server: 127.0.0.1:8080, upstream: \"\(first.endpoint)\"")
        #expect(logs[1].hasPrefix("upstream timed out (110: Connection timed out) while connecting to upstream"))
    }

    @Test("max_conns: a session counts against its server from the pick; a failed dial and the session's end give the place back")
    func serverPlaceHeldAndReleased() throws {
        let listener = try Self.listener("listen 8080; proxy_pass one; proxy_next_upstream off;",
                                         stream: "upstream one { server 127.0.0.1:9001 max_conns=1; }")
        let group = try #require(listener.server.upstream)
        var first = Self.machine(listener)
        _ = try #require(Self.dialled(first.accepted(now: Self.t0)))
        #expect(group.sessions(on: 0) == 1)
        var second = Self.machine(listener, connection: 2)
        guard case .closeClient = second.accepted(now: Self.t0) else { Issue.record("the full server took a second session"); return }
        #expect(second.record.outcome == SessionOutcome(phase: .upstreamPick, cause: .noLiveUpstreams))
        _ = first.dialFailed(.timedOut, now: Self.t0)
        #expect(group.sessions(on: 0) == 0, "a failed dial gives the place back")
        var third = Self.machine(listener, connection: 3)
        _ = try #require(Self.dialled(third.accepted(now: Self.t0)))
        _ = try #require(Self.started(third.dialSucceeded(now: Self.t0)))
        #expect(group.sessions(on: 0) == 1)
        _ = third.closed(.client, inOrder: false, now: Self.t0)
        _ = try #require(Self.ended(third.closed(.upstream, inOrder: false, now: Self.t0)))
        #expect(group.sessions(on: 0) == 0, "the end gives the place back")
    }

    @Test("return: after access, the rendered value instead of a dial; closing the client ends it with 200 in phase content; of return and proxy_pass the later one applies")
    func returnValue() throws {
        let listener = try Self.listener("listen 8080; proxy_pass 127.0.0.1:9001; return \"hi $remote_addr\\n\";")
        var m = Self.machine(listener)
        guard case .reply(let bytes) = m.accepted(now: Self.t0) else { Issue.record("no reply"); return }
        #expect(bytes == Array("hi 10.0.0.1\n".utf8))
        let (record, _) = try #require(Self.ended(m.closed(.client, inOrder: false, now: Self.t0)))
        #expect(record.outcome == SessionOutcome(phase: .content, cause: .returned) && record.status == .ok)
        #expect(record.bytesSent == 12 && record.bytesReceived == 0 && record.upstreamAttempts.isEmpty)
        // Refused before the content phase: no reply.
        let denied = try Self.listener("listen 8080; deny all; return ok;")
        var d = Self.machine(denied)
        guard case .closeClient = d.accepted(now: Self.t0) else { Issue.record("denied client got a reply"); return }
        // proxy_pass after return: proxied.
        let proxied = try Self.listener("listen 8080; return ok; proxy_pass 127.0.0.1:9001;")
        var p = Self.machine(proxied)
        #expect(Self.dialled(p.accepted(now: Self.t0)) != nil)
    }

    @Test("$upstream_first_byte_time: per attempt, from the start of its connect to the upstream's first byte (\"-\" for a failed attempt); $nginx_version and $portcullis_version")
    func firstByteTime() throws {
        let listener = try Self.listener("listen 8080; proxy_pass pool;", stream: Self.twoUpstreams)
        var m = Self.machine(listener)
        _ = try #require(Self.dialled(m.accepted(now: Self.t0)))
        _ = try #require(Self.dialled(m.dialFailed(.timedOut, now: Self.t0 + 10 * Self.ms)))
        _ = try #require(Self.started(m.dialSucceeded(now: Self.t0 + 12 * Self.ms)))
        m.relayed(100, from: .client, now: Self.t0 + 13 * Self.ms)
        m.relayed(50, from: .upstream, now: Self.t0 + 15 * Self.ms)
        m.relayed(50, from: .upstream, now: Self.t0 + 30 * Self.ms)  // only the first byte counts
        let template = try LogTemplate.parse("$upstream_first_byte_time|$upstream_connect_time|$nginx_version|$portcullis_version")
        let text = String(decoding: template.bytes(for: m.record), as: UTF8.self)
        #expect(text == "-, 0.005|-, 0.002|1.22.1|\(ProductVersion.portcullis)")
    }

    @Test("proxy_next_upstream off: one failed dial is the end")
    func noNextUpstream() throws {
        let listener = try Self.listener("listen 8080; proxy_pass pool; proxy_next_upstream off;", stream: Self.twoUpstreams)
        var m = Self.machine(listener)
        _ = try #require(Self.dialled(m.accepted(now: Self.t0)))
        guard case .closeClient = m.dialFailed(.timedOut, now: Self.t0) else { Issue.record("retried"); return }
        #expect(m.record.status == .badGateway && m.record.upstreamAttempts.count == 1)
    }

    @Test("proxy_pass $var naming nothing: 502 in upstream_pick, said in words")
    func noSuchUpstream() throws {
        let listener = try Self.listener("listen 8080; proxy_pass $nowhere;", stream: "map $remote_addr $nowhere { default \"not-a-pool\"; }")
        var m = Self.machine(listener)
        guard case .closeClient = m.accepted(now: Self.t0) else { Issue.record("expected closeClient"); return }
        #expect(m.record.outcome == SessionOutcome(phase: .upstreamPick, cause: .noSuchUpstream("not-a-pool")))
        #expect(Self.logs(&m).first?.hasPrefix("proxy_pass \"not-a-pool\" names no upstream block") == true)
    }

    @Test("proxy_pass $var naming a host, with a resolver: resolve, then dial each address in turn; a name that does not resolve is 500 in upstream_pick; the client leaving meanwhile ends it")
    func hostResolvedAtRunTime() throws {
        let listener = try Self.listener("listen 8080; proxy_pass $backend;",
                                         stream: "resolver 127.0.0.1; map $remote_addr $backend { default \"app.test:9000\"; }")
        var m = Self.machine(listener)
        guard case .resolve(let host, let resolver) = m.accepted(now: Self.t0) else { Issue.record("expected a lookup"); return }
        #expect(host == "app.test" && resolver.servers == [Self.endpoint("127.0.0.1:53")])
        let first = try #require(Self.dialled(m.resolved(.addresses([.v4(0x0A00_0001), .v4(0x0A00_0002)]), now: Self.t0)))
        #expect([Self.endpoint("10.0.0.1:9000"), Self.endpoint("10.0.0.2:9000")].contains(first.endpoint))
        let second = try #require(Self.dialled(m.dialFailed(.failed(errno: 111, message: "Connection refused"), now: Self.t0)))
        #expect(second.endpoint != first.endpoint, "the other address is tried next")

        var failing = Self.machine(listener)
        _ = failing.accepted(now: Self.t0)
        guard case .closeClient = failing.resolved(.failure(code: 3, text: "Host not found"), now: Self.t0) else { Issue.record("expected closeClient"); return }
        #expect(failing.record.outcome == SessionOutcome(phase: .upstreamPick, cause: .hostNotResolved("app.test")))
        #expect(failing.record.status == .internalError)
        #expect(Self.logs(&failing).contains { $0.hasPrefix("app.test could not be resolved (3: Host not found), client: 10.0.0.1") })

        var leaving = Self.machine(listener)
        _ = leaving.accepted(now: Self.t0)
        _ = leaving.closed(.client, inOrder: false, now: Self.t0)
        #expect(Self.ended(leaving.resolved(.addresses([.v4(0x0A00_0001)]), now: Self.t0)) != nil, "nothing is dialled for a client that left")
    }

    @Test("the client's EOF during the dial: passed on once the relay starts, not lost")
    func eofWhileDialling() throws {
        let listener = try Self.listener("listen 8080; proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        _ = Array("early".utf8).withUnsafeBytes { m.received($0, now: Self.t0) }
        if case .none = m.inputClosed(.client, now: Self.t0) {} else { Issue.record("acted on EOF during the dial") }
        let start = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        #expect(start.clientEnded && start.toUpstream == Array("early".utf8))
        guard case .closeWhenWritten(.upstream) = m.inputClosed(.client, now: Self.t0) else { Issue.record("EOF not passed on"); return }
    }

    @Test("the client leaves during the dial: a dial that then connects is abandoned, one that fails ends it too")
    func clientGoneWhileDialling() throws {
        let listener = try Self.listener("listen 8080; proxy_pass pool;", stream: Self.twoUpstreams)
        var connects = Self.machine(listener)
        _ = connects.accepted(now: Self.t0)
        if case .none = connects.closed(.client, inOrder: false, now: Self.t0) {} else { Issue.record("ended before the dial came back") }
        let (record, _) = try #require(Self.ended(connects.dialSucceeded(now: Self.t0)))
        #expect(record.upstreamAttempts.count == 1 && record.status == .ok)

        var fails = Self.machine(listener)
        _ = fails.accepted(now: Self.t0)
        _ = fails.closed(.client, inOrder: false, now: Self.t0)
        let (failed, _) = try #require(Self.ended(fails.dialFailed(.timedOut, now: Self.t0)), "no retry for a client that left")
        #expect(failed.upstreamAttempts.count == 1)
    }

    // MARK: TCP, relay

    @Test("proxy_half_close on: each EOF shuts the other side's output; done when both are shut")
    func halfClose() throws {
        let listener = try Self.listener("listen 8080; proxy_pass 127.0.0.1:9000; proxy_half_close on;")
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        _ = m.dialSucceeded(now: Self.t0)
        guard case .shutdownOutput(.upstream) = m.inputClosed(.client, now: Self.t0) else { Issue.record("expected shutdownOutput"); return }
        if case .none = m.outputShut(.upstream) {} else { Issue.record("closed after one direction") }
        guard case .shutdownOutput(.client) = m.inputClosed(.upstream, now: Self.t0) else { Issue.record("expected shutdownOutput"); return }
        guard case .closeBoth(resetting: nil) = m.outputShut(.client) else { Issue.record("expected closeBoth"); return }
        // A side that ended in order lets the other finish writing.
        var other = Self.machine(listener)
        _ = other.accepted(now: Self.t0)
        _ = other.dialSucceeded(now: Self.t0)
        guard case .shutdownOutput(.upstream) = other.closed(.client, inOrder: true, now: Self.t0) else { Issue.record("cut short"); return }
        guard case .closeBoth = other.outputShut(.upstream) else { Issue.record("expected closeBoth"); return }
    }

    @Test("a reset is passed on as a reset; another error is logged; SwiftNIO's own is not")
    func failures() throws {
        let listener = try Self.listener("listen 8080; proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        _ = m.dialSucceeded(now: Self.t0)
        guard case .closeBoth(resetting: .client) = m.failed(.upstream, .reset("reset"), now: Self.t0) else { Issue.record("reset not passed on"); return }
        guard case .closeBoth(resetting: nil) = m.failed(.client, .error("EIO"), now: Self.t0) else { Issue.record("expected closeBoth"); return }
        guard case .closeBoth(resetting: nil) = m.failed(.client, .quiet("closed"), now: Self.t0) else { Issue.record("expected closeBoth"); return }
        #expect(Self.logs(&m) == ["EIO while proxying, client: 10.0.0.1, server: 127.0.0.1:8080"])
    }

    @Test("proxy_timeout: watched again while bytes move; then both sides closed, 200, cause idle timeout")
    func idleTimeout() throws {
        let listener = try Self.listener("listen 8080; proxy_pass 127.0.0.1:9000; proxy_timeout 10s;")
        var m = Self.machine(listener)
        _ = m.accepted(now: Self.t0)
        _ = m.dialSucceeded(now: Self.t0)
        m.relayed(1, from: .client, now: Self.t0 + 5_000 * Self.ms)
        guard case .watchIdle = m.idleTimerFired(now: Self.t0 + 10_000 * Self.ms) else { Issue.record("timed out while active"); return }
        #expect(!m.isIdle(now: Self.t0 + 14_999 * Self.ms) && m.isIdle(now: Self.t0 + 15_000 * Self.ms))
        m.wrote(now: Self.t0 + 12_000 * Self.ms)  // a write to a slow reader counts too
        guard case .watchIdle = m.idleTimerFired(now: Self.t0 + 15_000 * Self.ms) else { Issue.record("a write did not count"); return }
        guard case .closeBoth = m.idleTimerFired(now: Self.t0 + 22_000 * Self.ms) else { Issue.record("expected closeBoth"); return }
        #expect(Self.logs(&m) == ["connection timed out (proxy_timeout), client: 10.0.0.1, server: 127.0.0.1:8080"])
        _ = m.closed(.client, inOrder: false, now: Self.t0 + 22_000 * Self.ms)
        let (record, _) = try #require(Self.ended(m.closed(.upstream, inOrder: false, now: Self.t0 + 22_000 * Self.ms)))
        #expect(record.outcome == SessionOutcome(phase: .relay, cause: .idleTimeout) && record.status == .ok && !record.refused)
    }

    // MARK: limit_conn, limit_rate

    @Test("limit_conn 1: the second session is refused (503, the zone and key named); the first one's end frees the slot")
    func limitConn() throws {
        let listener = try Self.listener("listen 8080; limit_conn addr 1; proxy_pass 127.0.0.1:9000;",
                                         stream: "limit_conn_zone $binary_remote_addr zone=addr:1m;")
        var first = Self.machine(listener, connection: 1)
        _ = try #require(Self.dialled(first.accepted(now: Self.t0)))
        var second = Self.machine(listener, connection: 2)
        guard case .closeClient = second.accepted(now: Self.t0) else { Issue.record("second session passed limit_conn 1"); return }
        #expect(second.record.outcome.cause == .connectionLimit(zone: "addr") && second.record.status == .serviceUnavailable)
        #expect(second.record.phase == .limitConn && second.record.limit?.limit == "1" && second.record.limitConnStatus == "REJECTED")
        #expect(second.record.rule?.text == "limit_conn addr 1;")
        _ = first.closed(.client, inOrder: false, now: Self.t0)  // refused before the dial came back
        _ = try #require(Self.ended(first.dialFailed(.timedOut, now: Self.t0)))
        var third = Self.machine(listener, connection: 3)
        _ = try #require(Self.dialled(third.accepted(now: Self.t0)), "the ended session's slot was not given back")
    }

    @Test("a refusal after limit_conn (upstream_pick) gives its slot back at once, not when the client has closed")
    func refusalAfterLimitConnReleases() throws {
        let listener = try Self.listener("listen 8080; limit_conn addr 1; proxy_pass $nowhere;",
                                         stream: "limit_conn_zone $binary_remote_addr zone=addr:1m;\n    map $remote_addr $nowhere { default \"not-a-pool\"; }")
        var first = Self.machine(listener, connection: 1)
        guard case .closeClient = first.accepted(now: Self.t0) else { Issue.record("expected closeClient"); return }
        #expect(first.record.outcome.cause == .noSuchUpstream("not-a-pool"))
        // The first client is not closed yet: had it kept its slot, this one would get a 503.
        var second = Self.machine(listener, connection: 2)
        guard case .closeClient = second.accepted(now: Self.t0) else { Issue.record("expected closeClient"); return }
        #expect(second.record.phase == .upstreamPick && second.record.status == .badGateway, "\(second.record.outcome)")
    }

    @Test("limit_conn_dry_run: an audit note of the refusal that would have been, and the session goes on")
    func limitConnDryRun() throws {
        let listener = try Self.listener("listen 8080; limit_conn addr 1; limit_conn_dry_run on; proxy_pass 127.0.0.1:9000;",
                                         stream: "limit_conn_zone $binary_remote_addr zone=addr:1m;")
        var first = Self.machine(listener, connection: 1)
        _ = try #require(Self.dialled(first.accepted(now: Self.t0)))
        var second = Self.machine(listener, connection: 2)
        _ = try #require(Self.dialled(second.accepted(now: Self.t0)), "a dry run refused")
        let audits = second.takeNotes().compactMap { if case .audit(let record) = $0 { record } else { nil } }
        let wouldBe = try #require(audits.first)
        #expect(audits.count == 1 && wouldBe.outcome.enforcement == .dryRun && wouldBe.status == .serviceUnavailable)
        #expect(second.record.outcome == .completed && second.record.limitConnStatus == "REJECTED_DRY_RUN")
    }

    @Test("limit_rate sessions: over the rate, 503 in limit_rate")
    func sessionRate() throws {
        let listener = try Self.listener("listen 8080; limit_rate perip; proxy_pass 127.0.0.1:9000;",
                                         stream: "limit_rate_zone $binary_remote_addr zone=perip:1m rate=1r/s;")
        var first = Self.machine(listener, connection: 1)
        _ = try #require(Self.dialled(first.accepted(now: Self.t0)))
        var second = Self.machine(listener, connection: 2)
        guard case .closeClient = second.accepted(now: Self.t0 + Self.ms) else { Issue.record("over the rate passed"); return }
        #expect(second.record.outcome.cause == .sessionRateLimit(zone: "perip") && second.record.phase == .limitRate)
    }

    // MARK: UDP

    static func udpMachine(_ listener: ListenerPolicy, client: String = "10.0.0.1:5353") -> SessionMachine {
        SessionMachine(listener: listener, connection: 9, client: endpoint(client),
                       server: endpoint("127.0.0.1:5300"), now: t0, wallClock: 1_764_000_000)
    }

    @Test("UDP: held until the upstream socket is ready, then forwarded; proxy_responses 1 ends at the answer")
    func udpSession() throws {
        let listener = try Self.listener("listen 5300 udp; proxy_pass 127.0.0.1:53; proxy_responses 1;")
        var m = Self.udpMachine(listener)
        _ = try #require(Self.dialled(m.datagramSessionStarted(now: Self.t0)))
        #expect(m.clientDatagram(40, now: Self.t0).disposition == .hold)
        _ = try #require(Self.started(m.dialSucceeded(now: Self.t0)))
        m.sentUpstream(40)
        if case .none = m.heldDatagramsSent(now: Self.t0) {} else { Issue.record("ended while an answer is owed") }
        #expect(m.clientDatagram(40, now: Self.t0) == .init(disposition: .forward))
        m.sentUpstream(40)
        #expect(m.upstreamDatagram(100, now: Self.t0) == .init(reply: true, ends: false))
        #expect(m.upstreamDatagram(100, now: Self.t0) == .init(reply: true, ends: true))
        let (record, audit) = try #require(Self.ended(m.end(now: Self.t0 + 5 * Self.ms)))
        #expect(audit && record.status == .ok && record.transport == .udp)
        #expect(record.bytesReceived == 80 && record.upstreamBytesSent == 80 && record.bytesSent == 200)
        #expect(record.upstreamAttempts == [UpstreamAttempt(address: Self.endpoint("127.0.0.1:53"), connectTime: 0, firstByteTime: 0)])
    }

    @Test("UDP: proxy_timeout while answers are owed is a 502; proxy_requests detaches; proxy_responses 0 fires and forgets, reading no answers")
    func udpTimeoutsAndCounts() throws {
        let owing = try Self.listener("listen 5300 udp; proxy_pass 127.0.0.1:53; proxy_timeout 2s; proxy_requests 2; proxy_responses 1;")
        var m = Self.udpMachine(owing)
        _ = m.datagramSessionStarted(now: Self.t0)
        _ = m.dialSucceeded(now: Self.t0)
        #expect(m.clientDatagram(10, now: Self.t0) == .init(disposition: .forward))
        m.sentUpstream(10)
        #expect(m.clientDatagram(10, now: Self.t0) == .init(disposition: .forward, detach: true))
        #expect(!m.takesDatagrams)
        m.sentUpstream(10)
        let (record, _) = try #require(Self.ended(m.idleTimerFired(now: Self.t0 + 2_000 * Self.ms)))
        #expect(record.outcome == SessionOutcome(phase: .relay, cause: .upstreamTimedOut) && record.status == .badGateway)

        let forget = try Self.listener("listen 5300 udp; proxy_pass 127.0.0.1:53; proxy_responses 0;")
        var f = Self.udpMachine(forget)
        _ = f.datagramSessionStarted(now: Self.t0)
        _ = f.dialSucceeded(now: Self.t0)
        #expect(f.clientDatagram(10, now: Self.t0) == .init(disposition: .forward, endAfterSending: true))
        // Only fire-and-forget sessions leave their upstream socket unread (and unwatched).
        #expect(!f.expectsReplies && m.expectsReplies)
        #expect(Self.udpMachine(try Self.listener("listen 5300 udp; proxy_pass 127.0.0.1:53;")).expectsReplies)
    }

    @Test("UDP: refused on the first datagram, audited then; later datagrams dropped; the end writes no second audit line")
    func udpRefused() throws {
        let listener = try Self.listener("listen 5300 udp; deny all; proxy_pass 127.0.0.1:53; proxy_timeout 1s;")
        var m = Self.udpMachine(listener)
        guard case .refused(let refusal) = m.datagramSessionStarted(now: Self.t0) else { Issue.record("expected refused"); return }
        #expect(refusal.status == .forbidden && refusal.rule?.text == "deny all;")
        #expect(m.clientDatagram(10, now: Self.t0).disposition == .drop)
        #expect(m.clientDatagram(10, now: Self.t0 + 500 * Self.ms).disposition == .drop)
        guard case .watchIdle = m.idleTimerFired(now: Self.t0 + 1_000 * Self.ms) else { Issue.record("ended while retried"); return }
        let (record, audit) = try #require(Self.ended(m.idleTimerFired(now: Self.t0 + 1_500 * Self.ms)))
        #expect(!audit && record.status == .forbidden && record.bytesReceived == 20)
    }

    @Test("UDP: an ICMP refusal before any answer is a 502; the v2 header for every datagram is built once")
    func udpUpstreamRefused() throws {
        let listener = try Self.listener("listen 5300 udp; proxy_pass 127.0.0.1:53; proxy_protocol v2;")
        var m = Self.udpMachine(listener)
        _ = m.datagramSessionStarted(now: Self.t0)
        let header = try #require(m.datagramHeader)
        let decoded = try #require(try header.withUnsafeBytes { try ProxyHeaderDecoder.decode($0) })
        #expect(decoded.0.transport == .datagram && decoded.0.source == Self.endpoint("10.0.0.1:5353") && decoded.1 == header.count)
        _ = m.dialSucceeded(now: Self.t0)
        let (record, _) = try #require(Self.ended(m.upstreamFailed("recv() failed (111: Connection refused)", now: Self.t0)))
        #expect(record.outcome.cause == .upstreamRefusedDatagrams && record.status == .badGateway)
        #expect(Self.logs(&m) == ["recv() failed (111: Connection refused) while proxying connection, udp client: 10.0.0.1, server: 127.0.0.1:5300"])
    }
}
