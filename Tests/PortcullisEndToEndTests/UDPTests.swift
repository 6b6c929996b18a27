#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisPolicy
import PortcullisRules
import PortcullisTestSupport

/// Issue #6 end to end: `listen … udp` through a real gateway and real sockets — a real DNS
/// server from Debian (dnsmasq) queried with `dig` and with 10,000 hand-built queries from 100
/// addresses, `proxy_responses`, `proxy_requests`, `limit_conn` counting sessions, PROXY v2 in
/// every datagram sent upstream (checked byte by byte by a receiver that does not use
/// PortcullisWire), and PROXY v2 accepted on `listen … udp proxy_protocol`.
///
/// dnsmasq and dig must be installed (.ci/install-deps installs `dnsmasq dnsutils`); without
/// them the DNS tests fail, they do not skip. The gateway's UDP port is the harness's `{PORT}`
/// (found free for TCP): if UDP happens to hold it, the bind fails and the harness tries
/// another.
@Suite("UDP gateway", .serialized)
struct UDPTests {
    static let logFormat = """
        log_format udp '$protocol $status $remote_addr:$remote_port $bytes_received $bytes_sent';
        """

    /// An access-log line of `logFormat`, split.
    struct AccessLine: Equatable, CustomStringConvertible {
        var proto: String
        var status: Int
        var client: String
        var received: Int
        var sent: Int
        var description: String { "\(proto) \(status) \(client) \(received) \(sent)" }

        init?(_ line: String) {
            let f = line.split(separator: " ").map(String.init)
            guard f.count == 5, let status = Int(f[1]), let received = Int(f[3]), let sent = Int(f[4]) else { return nil }
            (proto, self.status, client, self.received, self.sent) = (f[0], status, f[2], received, sent)
        }

        var address: String { String(client[..<client.lastIndex(of: ":")!]) }
    }

    static func json(_ line: String) -> [String: Any]? {
        (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
    }

    // MARK: 1. dnsmasq behind Portcullis, queried with dig

    @Test("dnsmasq behind Portcullis: allowed dig clients get answers; a denied one gets none, one audit line for its session although dig tries 3 times")
    func digThroughGateway() async throws {
        let dns = try DNSMasq.start()
        defer { dns.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log info;
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                audit_log {DIR}/audit.log;
                proxy_timeout 2s;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_responses 1;
                    deny 127.0.0.66;
                    allow all;
                    proxy_pass 127.0.0.1:\(dns.port);
                }
            }
            """)
        let allowed = ["127.0.0.2", "127.0.0.3", "127.0.4.5"]
        for source in allowed {
            let dig = try Spawn.run(try Spawn.executable("dig", package: "dnsutils"), [
                "@127.0.0.1", "-p", String(gateway.port), "-b", source, "example.test", "+short", "+tries=1", "+time=2",
            ], timeout: 10)
            #expect(dig.status == 0 && dig.output == "192.0.2.55\n", "dig from \(source): status \(dig.status), \(dig.output)")
        }

        // The denied client from one source port, as a resolver would: dig's three tries are
        // one session (a fresh dig port per try would be three sessions, three audit lines).
        let deniedPort = try freeUDPPort(host: "127.0.0.66")
        let started = Date()
        let denied = try Spawn.run(try Spawn.executable("dig", package: "dnsutils"), [
            "@127.0.0.1", "-p", String(gateway.port), "-b", "127.0.0.66#\(deniedPort)", "example.test",
            "+short", "+tries=3", "+time=1",
        ], timeout: 15)
        #expect(denied.status == 9, "dig should time out (status 9): \(denied.status), \(denied.output)")
        #expect(!denied.output.contains("192.0.2.55"))
        #expect(denied.output.components(separatedBy: "timed out").count - 1 == 3, "three tries: \(denied.output)")
        #expect(Date().timeIntervalSince(started) >= 2.5)

        // The refused session ends 2 s (proxy_timeout) after its last datagram and is logged then.
        let access = await gateway.waitForLines(of: "access.log", timeout: 6) { $0.count >= 4 }.compactMap(AccessLine.init)
        try #require(access.count == 4, "\(access)")
        for source in allowed {
            let line = try #require(access.first { $0.address == source }, "\(access)")
            #expect(line.proto == "UDP" && line.status == 200, "\(line)")
            #expect(line.received > 0 && line.sent > line.received, "a DNS answer is longer than its query: \(line)")
        }
        let refused = try #require(access.first { $0.address == "127.0.0.66" })
        #expect(refused.proto == "UDP" && refused.status == 403 && refused.sent == 0, "\(refused)")
        #expect(refused.client == "127.0.0.66:\(deniedPort)")
        #expect(refused.received % 3 == 0 && refused.received > 0, "three queries of one length counted: \(refused)")

        let audit = gateway.lines(of: "audit.log")
        try #require(audit.count == 1, "one audit line per session, not per datagram: \(audit)")
        let entry = try #require(Self.json(audit[0]), "\(audit[0])")
        #expect(entry["protocol"] as? String == "UDP")
        #expect(entry["phase"] as? String == "access")
        #expect(entry["status"] as? Int == 403)
        #expect(entry["client"] as? String == "127.0.0.66")
        #expect(entry["client_port"] as? Int == Int(deniedPort))
        #expect((entry["rule"] as? [String: Any])?["text"] as? String == "deny 127.0.0.66;")
        let forbidden = gateway.lines(of: "error.log").filter { $0.contains("access forbidden by rule") }
        #expect(forbidden.count == 1, "\(forbidden)")
        #expect(dns.queriesLogged(from: "127.0.0.66") == 0)
        await gateway.stop()
    }

    // MARK: 2. 10,000 queries from 100 addresses

    @Test("10,000 DNS queries from 100 addresses through Portcullis to dnsmasq are all answered (proxy_responses 1: one session each)")
    func tenThousandQueries() async throws {
        let dns = try DNSMasq.start(logQueries: false)
        defer { dns.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format brief '$protocol $status $remote_addr $bytes_received $bytes_sent';
                access_log {DIR}/access.log brief;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_responses 1;
                    deny 127.0.0.66;
                    allow all;
                    proxy_pass 127.0.0.1:\(dns.port);
                }
            }
            """)
        let sources = (1...100).map { "127.0.1.\($0)" }
        let result = try DNSFlood.run(port: gateway.port, sources: sources, total: 10_000, timeout: 60)
        let rate = Double(result.answered) / result.elapsed
        print("UDP flood: \(result.answered) of 10000 answered in \(String(format: "%.2f", result.elapsed)) s "
              + "(\(Int(rate)) queries/s), \(result.lost) lost, \(result.wrong) wrong")
        #expect(result.answered == 10_000, "\(result)")
        #expect(result.lost == 0 && result.wrong == 0, "\(result)")

        // One session per query: each ended with its answer, one line each.
        let lines = await gateway.waitForLines(of: "access.log", timeout: 15) { $0.count >= 10_000 }
        #expect(lines.count == 10_000)
        var perSource: [Substring: Int] = [:]
        for line in lines {
            let f = line.split(separator: " ")
            guard f.count == 5, f[0] == "UDP", f[1] == "200", let received = Int(f[3]), let sent = Int(f[4]),
                  received == DNS.queryLength, sent > received else {
                Issue.record("unexpected access-log line: \(line)")
                break
            }
            perSource[f[2], default: 0] += 1
        }
        #expect(perSource.count == 100 && perSource.values.allSatisfy { $0 == 100 }, "\(perSource.count) sources")
        // 10,000 sessions under the default 10-minute proxy_timeout were swept, and all left.
        #expect(await gateway.gateway.sweptSessions() == 0)
        await gateway.stop()
    }

    // MARK: 3. proxy_responses

    @Test("proxy_responses 3: an upstream that answers each datagram with three delivers all three, then the session ends")
    func threeResponses() async throws {
        let upstream = try UDPTestPeer { datagram, _, _ in (1...3).map { datagram + Array("#\($0)".utf8) } }
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                proxy_timeout 30s;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_responses 3;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let client = try UDPTestSocket(bind: "127.0.0.31")
        try client.connect("127.0.0.1", gateway.port)
        try client.send(Array("query-1".utf8))
        let answers = (0..<3).compactMap { _ in client.receive(timeout: 2) }
        #expect(answers.map { String(decoding: $0, as: UTF8.self) } == ["query-1#1", "query-1#2", "query-1#3"])
        // Ended by its answers, not by proxy_timeout (30 s).
        let first = await gateway.waitForLines(of: "access.log", timeout: 3) { !$0.isEmpty }.compactMap(AccessLine.init)
        #expect(first == [AccessLine("UDP 200 127.0.0.31:\(client.localPort) 7 27")!], "\(first)")

        // The next datagram from the same port is a new session, with its own three answers.
        try client.send(Array("query-22".utf8))
        let more = (0..<3).compactMap { _ in client.receive(timeout: 2) }
        #expect(more.map { String(decoding: $0, as: UTF8.self) } == ["query-22#1", "query-22#2", "query-22#3"])
        let both = await gateway.waitForLines(of: "access.log", timeout: 3) { $0.count >= 2 }.compactMap(AccessLine.init)
        #expect(both.last == AccessLine("UDP 200 127.0.0.31:\(client.localPort) 8 30"), "\(both)")
        #expect(client.receive(timeout: 0.2) == nil)
        // Two sessions, two upstream sockets: the upstream saw two source ports.
        #expect(Set(upstream.received.map(\.port)).count == 2)
        await gateway.stop()
    }

    @Test("proxy_responses 1 in front of an upstream that answers three times: the client gets the first answer only")
    func extraResponsesDropped() async throws {
        let upstream = try UDPTestPeer { datagram, _, _ in (1...3).map { datagram + Array("#\($0)".utf8) } }
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_responses 1;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let client = try UDPTestSocket(bind: "127.0.0.32")
        try client.connect("127.0.0.1", gateway.port)
        try client.send(Array("q".utf8))
        #expect(client.receive(timeout: 2).map { String(decoding: $0, as: UTF8.self) } == "q#1")
        #expect(client.receive(timeout: 0.3) == nil, "answers after the expected one must not reach the client")
        let lines = await gateway.waitForLines(of: "access.log", timeout: 3) { !$0.isEmpty }.compactMap(AccessLine.init)
        #expect(lines == [AccessLine("UDP 200 127.0.0.32:\(client.localPort) 1 3")!], "\(lines)")
        await gateway.stop()
    }

    @Test("an upstream port nobody listens on: the ICMP port-unreachable ends the session at once with 502 and a recv() error line, not at proxy_timeout")
    func upstreamRefuses() async throws {
        let closedPort = try freeUDPPort()
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log info;
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                proxy_timeout 30s;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_responses 1;
                    proxy_pass 127.0.0.1:\(closedPort);
                }
            }
            """)
        let client = try UDPTestSocket(bind: "127.0.0.35")
        try client.connect("127.0.0.1", gateway.port)
        try client.send(Array("anyone?".utf8))
        let lines = await gateway.waitForLines(of: "access.log", timeout: 5) { !$0.isEmpty }.compactMap(AccessLine.init)
        #expect(lines == [AccessLine("UDP 502 127.0.0.35:\(client.localPort) 7 0")!], "\(lines)")
        #expect(gateway.lines(of: "error.log").contains { $0.contains("recv() failed (111: Connection refused) while proxying connection") })
        #expect(client.receive(timeout: 0.2) == nil)
        await gateway.stop()
    }

    @Test("datagram sizes: a burst of 100 (1 to 60,000 bytes) reaches the upstream whole and in order; replies up to proxy_buffer_size pass whole, longer ones are cut there as in nginx")
    func datagramSizes() async throws {
        // The upstream answers "N" with N bytes, and echoes everything else.
        let upstream = try UDPTestPeer { datagram, _, _ in
            if let size = Int(String(decoding: datagram, as: UTF8.self)) {
                return [(0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) }]
            }
            return []
        }
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let larger = try await GatewayHarness.start("""
            stream {
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_buffer_size 64k;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        // A burst larger than one vector read (32 datagrams), of mixed sizes: each must arrive
        // with its own bytes (a slot of the read buffer holds the largest possible datagram).
        // About 300 KB in all, so that it fits the receive buffers even where rmem_max is
        // Linux's default (212,992 bytes, doubled by the kernel).
        let client = try UDPTestSocket(bind: "127.0.0.33")
        try client.connect("127.0.0.1", gateway.port)
        var rng = SplitMix64(seed: 6)
        let sizes = (0..<100).map { $0 % 25 == 0 ? 60_000 : 1 + Int(rng.next() % 1_200) }
        let burst = sizes.enumerated().map { index, size in
            (0..<size).map { UInt8(truncatingIfNeeded: $0 &+ index &* 7) } + [UInt8(index)]
        }
        for datagram in burst { try client.send(datagram) }
        let deadline = Date().addingTimeInterval(5)
        while upstream.received.count < burst.count && Date() < deadline { usleep(10_000) }
        let received = upstream.received.map(\.bytes)
        #expect(received.count == burst.count)
        let mismatched = zip(received, burst).enumerated().filter { $0.element.0 != $0.element.1 }.map(\.offset)
        #expect(mismatched.isEmpty, "every datagram whole, in order; these differ: \(mismatched)")

        func reply(_ size: Int, port: UInt16) throws -> Int? {
            let socket = try UDPTestSocket(bind: "127.0.0.34")
            try socket.connect("127.0.0.1", port)
            try socket.send(Array(String(size).utf8))
            return socket.receive(timeout: 3)?.count
        }
        #expect(try reply(16_384, port: gateway.port) == 16_384)
        #expect(try reply(20_000, port: gateway.port) == 16_384, "cut at proxy_buffer_size 16k, as nginx does")
        #expect(try reply(60_000, port: larger.port) == 60_000, "proxy_buffer_size 64k")
        await gateway.stop()
        await larger.stop()
    }

    // MARK: 4. PROXY v2 sent upstream

    @Test("proxy_protocol v2: every one of 150 datagrams from 3 clients reaches the upstream behind a valid v2 UDP4 header naming its client")
    func proxyV2SentIPv4() async throws {
        let receiver = try UDPTestPeer { datagram, _, _ in
            // Echo the payload (after a well-formed header) so the client can pace itself.
            guard let parsed = RawV2.parse(datagram) else { return [] }
            return [Array(datagram[parsed.length...])]
        }
        defer { receiver.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                proxy_timeout 5s;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_protocol v2;
                    proxy_pass 127.0.0.1:\(receiver.port);
                }
            }
            """)
        var clients: [(socket: UDPTestSocket, address: String)] = []
        for address in ["127.0.0.41", "127.0.0.42", "127.0.0.43"] {
            let socket = try UDPTestSocket(bind: address)
            try socket.connect("127.0.0.1", gateway.port)
            clients.append((socket, address))
        }
        var expected: [String: (address: String, port: UInt16)] = [:]
        for round in 0..<50 {
            for (index, client) in clients.enumerated() {
                // Payloads of varied length, some of them starting like a PROXY header.
                let payload = round % 10 == 3
                    ? RawV2.signature + Array("c\(index)-r\(round)".utf8)
                    : Array("c\(index)-r\(round)-".utf8) + Array(repeating: UInt8(round), count: round * 7)
                expected[String(decoding: payload, as: UTF8.self)] = (client.address, client.socket.localPort)
                try client.socket.send(payload)
                let echoed = client.socket.receive(timeout: 2)
                #expect(echoed == payload, "round \(round), client \(index)")
            }
        }
        let received = receiver.received
        #expect(received.count == 150)
        var seen = Set<String>()
        for datagram in received {
            let header = try #require(RawV2.parse(datagram.bytes), "no valid v2 header: \(Array(datagram.bytes.prefix(32)))")
            #expect(header.verCmd == 0x21, "version 2, command PROXY")
            #expect(header.family == 0x12, "UDP over IPv4")
            #expect(header.addressLength == 12)
            let payload = Array(datagram.bytes[header.length...])
            let key = String(decoding: payload, as: UTF8.self)
            let client = try #require(expected[key], "a payload no client sent: \(key)")
            #expect(header.source == client.address && header.sourcePort == client.port, "\(header) for \(client)")
            #expect(header.destination == "127.0.0.1" && header.destinationPort == gateway.port, "\(header)")
            seen.insert(key)
        }
        #expect(seen.count == 150, "every datagram exactly once")
        await gateway.stop()
    }

    @Test("proxy_protocol v2 on a [::1] udp listener: a v2 header with family UDP6 (0x22) naming the IPv6 client")
    func proxyV2SentIPv6() async throws {
        let receiver = try UDPTestPeer { datagram, _, _ in
            guard let parsed = RawV2.parse(datagram) else { return [] }
            return [Array(datagram[parsed.length...])]
        }
        defer { receiver.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                server {
                    listen [::1]:{PORT} udp;
                    proxy_protocol v2;
                    proxy_pass 127.0.0.1:\(receiver.port);
                }
            }
            """, host: "::1")
        let client = try UDPTestSocket(bind: "::1")
        try client.connect("::1", gateway.port)
        for i in 0..<10 {
            let payload = Array("six-\(i)".utf8)
            try client.send(payload)
            #expect(client.receive(timeout: 2) == payload)
        }
        let received = receiver.received
        #expect(received.count == 10)
        for (i, datagram) in received.enumerated() {
            let header = try #require(RawV2.parse(datagram.bytes))
            #expect(header.verCmd == 0x21 && header.family == 0x22 && header.addressLength == 36, "\(header)")
            #expect(header.source == "::1" && header.sourcePort == client.localPort, "\(header)")
            #expect(header.destination == "::1" && header.destinationPort == gateway.port, "\(header)")
            #expect(Array(datagram.bytes[header.length...]) == Array("six-\(i)".utf8))
        }
        await gateway.stop()
    }

    // MARK: 5. Configuration errors

    @Test("a server with a udp listen: \"proxy_protocol on\" (v1) and \"backlog=\" are errors with file:line:col; v2 compiles")
    func configurationErrors() throws {
        func errors(_ text: String) -> [String] {
            RuleLoader.load(text: text, file: "rules.conf").diagnostics.filter { $0.severity == .error }.map(\.description)
        }
        let v1 = errors("""
            stream {
                server {
                    listen 127.0.0.1:5353 udp;
                    proxy_protocol on;
                    proxy_pass 127.0.0.1:53;
                }
            }
            """)
        #expect(v1.count == 1, "\(v1)")
        #expect(v1.first?.hasPrefix("rules.conf:4:9: error: \"proxy_protocol on\" (v1) cannot describe UDP") == true, "\(v1)")

        // Inherited from stream: the server that cannot use it is named.
        let inherited = errors("""
            stream {
                proxy_protocol on;
                server {
                    listen 127.0.0.1:5353 udp;
                    proxy_pass 127.0.0.1:53;
                }
            }
            """)
        #expect(inherited.count == 1 && inherited.first?.hasPrefix("rules.conf:3:5: error:") == true, "\(inherited)")

        let backlog = errors("""
            stream {
                server {
                    listen 127.0.0.1:5353 udp backlog=10;
                    proxy_pass 127.0.0.1:53;
                }
            }
            """)
        #expect(backlog.count == 1, "\(backlog)")
        #expect(backlog.first?.hasPrefix("rules.conf:3:35: error: \"backlog\" parameter is incompatible with \"udp\"") == true, "\(backlog)")

        let fine = RuleLoader.load(text: """
            stream {
                server {
                    listen 127.0.0.1:5353 udp proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    proxy_protocol v2;
                    proxy_responses 1;
                    proxy_requests 4;
                    proxy_pass 127.0.0.1:53;
                }
            }
            """, file: "rules.conf")
        #expect(fine.snapshot != nil, "\(fine.rendered)")
    }

    // MARK: 6. PROXY v2 accepted on listen … udp proxy_protocol

    @Test("listen udp proxy_protocol: a trusted sender's DGRAM header names the client (keyed, logged, denied by it); untrusted, STREAM or missing headers are not believed or dropped")
    func proxyV2Accepted() async throws {
        let upstream = try UDPTestPeer { datagram, _, _ in [datagram] }
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log info;
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                audit_log {DIR}/audit.log;
                proxy_timeout 500ms;
                server {
                    listen 127.0.0.1:{PORT} udp proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    deny 203.0.113.9;
                    allow all;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let listener = ("127.0.0.1", gateway.port)
        func header(_ client: String, _ port: UInt16, family: UInt8 = 0x12) -> [UInt8] {
            RawV2.build(family: family, source: client, sourcePort: port, destination: listener.0, destinationPort: listener.1)
        }

        // a) Trusted sender, DGRAM header naming 203.0.113.7:5000: relayed (without the header)
        //    and keyed by that client: two datagrams, one session.
        let trusted = try UDPTestSocket(bind: "127.0.0.1")
        try trusted.connect(listener.0, listener.1)
        for text in ["hello-7", "again-7"] {
            try trusted.send(header("203.0.113.7", 5000) + Array(text.utf8))
            #expect(trusted.receive(timeout: 2) == Array(text.utf8), "replies carry no header")
        }

        // b) Trusted sender, header naming the denied 203.0.113.9: refused, nothing relayed.
        let deniedSender = try UDPTestSocket(bind: "127.0.0.1")
        try deniedSender.connect(listener.0, listener.1)
        try deniedSender.send(header("203.0.113.9", 5001) + Array("let-me-in".utf8))
        try deniedSender.send(header("203.0.113.9", 5001) + Array("let-me-in".utf8))

        // c) Untrusted sender (127.0.0.2) naming the denied address: not believed, keyed by the
        //    sender, so allowed.
        let untrusted = try UDPTestSocket(bind: "127.0.0.2")
        try untrusted.connect(listener.0, listener.1)
        try untrusted.send(header("203.0.113.9", 5002) + Array("untrusted".utf8))
        #expect(untrusted.receive(timeout: 2) == Array("untrusted".utf8))

        // d) Trusted sender, but a STREAM (TCP4) header: only a DGRAM header names a UDP client.
        let stream = try UDPTestSocket(bind: "127.0.0.1")
        try stream.connect(listener.0, listener.1)
        try stream.send(header("203.0.113.9", 5003, family: 0x11) + Array("stream-hdr".utf8))
        #expect(stream.receive(timeout: 2) == Array("stream-hdr".utf8))

        // e) No header, a v1 line, a truncated v2 header: dropped, nothing relayed, no session.
        let naked = try UDPTestSocket(bind: "127.0.0.3")
        try naked.connect(listener.0, listener.1)
        try naked.send(Array("no header at all".utf8))
        try naked.send(Array("PROXY UDP4 203.0.113.7 127.0.0.1 5000 53\r\nv1".utf8))
        try naked.send(Array(header("203.0.113.7", 5000).prefix(20)))
        #expect(naked.receive(timeout: 0.5) == nil)
        #expect(deniedSender.receive(timeout: 0.1) == nil)

        let access = await gateway.waitForLines(of: "access.log", timeout: 4) { $0.count >= 4 }.compactMap(AccessLine.init)
        try? await Task.sleep(for: .milliseconds(300))  // room for a wrong fifth line
        let all = gateway.lines(of: "access.log").compactMap(AccessLine.init)
        #expect(all.count == 4, "\(all)")
        #expect(Set(access.map(\.description)) == [
            "UDP 200 203.0.113.7:5000 14 14",
            "UDP 403 203.0.113.9:5001 18 0",
            "UDP 200 127.0.0.2:\(untrusted.localPort) 9 9",
            "UDP 200 127.0.0.1:\(stream.localPort) 10 10",
        ], "\(access)")
        let audit = gateway.lines(of: "audit.log")
        try #require(audit.count == 1, "\(audit)")
        let entry = try #require(Self.json(audit[0]))
        #expect(entry["client"] as? String == "203.0.113.9" && entry["client_port"] as? Int == 5001, "\(audit[0])")
        #expect(entry["protocol"] as? String == "UDP" && entry["phase"] as? String == "access" && entry["status"] as? Int == 403)
        #expect(entry["peer"] as? String == "127.0.0.1:\(deniedSender.localPort)", "\(audit[0])")

        #expect(upstream.received.map { String(decoding: $0.bytes, as: UTF8.self) }.sorted()
                == ["again-7", "hello-7", "stream-hdr", "untrusted"])
        // Said at most once a second, but every dropped datagram is counted in some line.
        func droppedCount(_ lines: [String]) -> Int {
            lines.filter { $0.contains("datagrams without a valid PROXY protocol v2 header on 127.0.0.1:\(gateway.port) udp") }
                .compactMap { line in line.range(of: "dropped ").flatMap { Int(line[$0.upperBound...].prefix { $0.isNumber }) } }
                .reduce(0, +)
        }
        let errors = await gateway.waitForLines(of: "error.log", timeout: 3) { droppedCount($0) >= 3 }
        #expect(droppedCount(errors) == 3, "\(errors)")
        await gateway.stop()
    }

    // MARK: 7. limit_conn counts sessions

    @Test("listen udp proxy_protocol + proxy_protocol v2: a trusted sender's AUTHORITY and UNIQUE_ID go on upstream in every datagram's header, an untrusted sender's do not")
    func trustedTLVsPassedOn() async throws {
        let upstream = try UDPTestPeer { _, _, _ in [] }
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                server {
                    listen 127.0.0.1:{PORT} udp proxy_protocol;
                    set_real_ip_from 127.0.0.41;
                    proxy_protocol v2;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let tlvs: [(UInt8, [UInt8])] = [(0x02, Array("dns.example".utf8)), (0x05, Array(repeating: 0xAB, count: 16)), (0x01, Array("h2".utf8))]
        for sender in ["127.0.0.41", "127.0.0.42"] {
            let socket = try UDPTestSocket(bind: sender)
            try socket.connect("127.0.0.1", gateway.port)
            let header = RawV2.build(family: 0x12, source: "203.0.113.9", sourcePort: 5353, destination: "192.0.2.1",
                                    destinationPort: 53, tlvs: tlvs)
            for i in 0..<3 { try socket.send(header + Array("q\(i)".utf8)) }
        }
        let deadline = Date().addingTimeInterval(3)
        while upstream.received.count < 6 && Date() < deadline { usleep(10_000) }
        let received = upstream.received
        try #require(received.count == 6, "\(received.count) datagrams")
        /// The TLVs after the address block of a v2 header, by type.
        func tlvTypes(_ d: [UInt8]) -> [UInt8: [UInt8]] {
            guard let p = RawV2.parse(d) else { return [:] }
            var at = 16 + 12, out: [UInt8: [UInt8]] = [:]
            while at + 3 <= p.length {
                let length = Int(d[at + 1]) << 8 | Int(d[at + 2])
                out[d[at]] = Array(d[(at + 3)..<min(p.length, at + 3 + length)])
                at += 3 + length
            }
            return out
        }
        for datagram in received.map(\.bytes) {
            let parsed = try #require(RawV2.parse(datagram))
            let found = tlvTypes(datagram)
            if parsed.source == "203.0.113.9" {  // trusted: the header's client
                #expect(found[0x02] == Array("dns.example".utf8))
                #expect(found[0x05] == Array(repeating: 0xAB, count: 16))
                #expect(found[0x01] == nil, "ALPN is not passed on")
            } else {
                #expect(parsed.source == "127.0.0.42", "\(parsed)")
                #expect(found.isEmpty, "an untrusted sender's TLVs are not passed on: \(found.keys.sorted())")
            }
        }
        #expect(received.filter { RawV2.parse($0.bytes)?.source == "203.0.113.9" }.count == 3)
        await gateway.stop()
    }

    @Test("limit_conn 2 on UDP: of three sessions from one address (three source ports) the third is refused, 503, audited once")
    func limitConnCountsSessions() async throws {
        let upstream = try UDPTestPeer { _, _, _ in [] }  // never answers
        defer { upstream.stop() }
        let rules = """
            stream {
                error_log {DIR}/error.log info;
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                audit_log {DIR}/audit.log;
                limit_conn_zone $remote_addr zone=u:1m;
                proxy_timeout 1500ms;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    limit_conn u 2;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """
        let gateway = try await GatewayHarness.start(rules)
        var clients: [UDPTestSocket] = []
        for i in 0..<3 {
            let client = try UDPTestSocket(bind: "127.0.0.51")
            try client.connect("127.0.0.1", gateway.port)
            try client.send(Array("session-\(i)".utf8))
            try client.send(Array("session-\(i)".utf8))  // same session: counted once
            clients.append(client)
            usleep(50_000)  // in order
        }
        let audit = await gateway.waitForLines(of: "audit.log", timeout: 3) { !$0.isEmpty }
        try await Task.sleep(for: .milliseconds(200))
        #expect(gateway.lines(of: "audit.log").count == 1)
        let entry = try #require(audit.first.flatMap(Self.json), "\(audit)")
        #expect(entry["status"] as? Int == 503 && entry["phase"] as? String == "limit_conn", "\(audit)")
        #expect(entry["protocol"] as? String == "UDP" && entry["client"] as? String == "127.0.0.51")
        #expect(entry["client_port"] as? Int == Int(clients[2].localPort))
        #expect(entry["limit"] as? [String: String] == ["zone": "u", "key": "127.0.0.51", "limit": "2"], "\(audit)")
        let payloads = upstream.received.map { String(decoding: $0.bytes, as: UTF8.self) }
        #expect(payloads.sorted() == ["session-0", "session-0", "session-1", "session-1"])

        // When the sessions time out their slots come back: a new one passes.
        let ended = await gateway.waitForLines(of: "access.log", timeout: 5) { $0.count >= 3 }.compactMap(AccessLine.init)
        #expect(ended.map(\.status).sorted() == [200, 200, 503], "\(ended)")
        let later = try UDPTestSocket(bind: "127.0.0.51")
        try later.connect("127.0.0.1", gateway.port)
        try later.send(Array("session-3".utf8))
        let deadline = Date().addingTimeInterval(2)
        while upstream.received.count < 5 && Date() < deadline { usleep(10_000) }
        #expect(upstream.received.last.map { String(decoding: $0.bytes, as: UTF8.self) } == "session-3")
        await gateway.stop()
    }

    // MARK: 8. proxy_requests

    @Test("proxy_timeout 12s on UDP: a silent session ends 12 to 13.8 s after its last datagram (the log line included) with 502 (an answer was due), a refused one is forgotten then too")
    func longTimeoutSwept() async throws {
        let upstream = try UDPTestPeer { _, _, _ in [] }  // never answers
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                proxy_timeout 12s;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_responses 1;
                    deny 127.0.0.37;
                    allow all;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let allowed = try UDPTestSocket(bind: "127.0.0.36")
        let refused = try UDPTestSocket(bind: "127.0.0.37")
        for socket in [allowed, refused] {
            try socket.connect("127.0.0.1", gateway.port)
            try socket.send(Array("q".utf8))
        }
        let start = Date()
        let lines = await gateway.waitForLines(of: "access.log", timeout: 17) { $0.count >= 2 }.compactMap(AccessLine.init)
        let waited = Date().timeIntervalSince(start)
        #expect(waited > 11.8 && waited < 13.8, "\(waited) s")
        #expect(Set(lines.map(\.description)) == [
            "UDP 502 127.0.0.36:\(allowed.localPort) 1 0", "UDP 403 127.0.0.37:\(refused.localPort) 1 0",
        ], "\(lines)")
        #expect(await gateway.gateway.sweptSessions() == 0, "ended sessions leave the sweep")
        await gateway.stop()
    }

    @Test("proxy_requests 2: the third datagram from one client socket starts a new session (own upstream socket, own log line)")
    func proxyRequests() async throws {
        let upstream = try UDPTestPeer { datagram, _, _ in [datagram] }
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                proxy_timeout 500ms;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_requests 2;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let client = try UDPTestSocket(bind: "127.0.0.61")
        try client.connect("127.0.0.1", gateway.port)
        for text in ["one", "two", "three"] {
            try client.send(Array(text.utf8))
            #expect(client.receive(timeout: 2) == Array(text.utf8), "\(text)")
        }
        let lines = await gateway.waitForLines(of: "access.log", timeout: 4) { $0.count >= 2 }.compactMap(AccessLine.init)
        let me = "127.0.0.61:\(client.localPort)"
        #expect(Set(lines.map(\.description)) == ["UDP 200 \(me) 6 6", "UDP 200 \(me) 5 5"], "\(lines)")
        let ports = upstream.received.map(\.port)
        #expect(ports.count == 3 && ports[0] == ports[1] && ports[1] != ports[2], "upstream source ports: \(ports)")
        await gateway.stop()
    }

    // MARK: 9. A wildcard listen

    @Test("listen PORT udp (wildcard): a client that sent to 127.0.0.5 gets its answer from 127.0.0.5, and $server_addr is 127.0.0.5")
    func wildcardListenRepliesFromTheAddressDialled() async throws {
        let dns = try DNSMasq.start(logQueries: false)
        defer { dns.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format w '$remote_addr $server_addr:$server_port $status';
                access_log {DIR}/access.log w;
                server {
                    listen {PORT} udp;
                    proxy_responses 1;
                    proxy_pass 127.0.0.1:\(dns.port);
                }
            }
            """)
        // Dialling the address the listener's socket would answer from anyway works.
        let direct = try Spawn.run(try Spawn.executable("dig", package: "dnsutils"), [
            "@127.0.0.1", "-p", String(gateway.port), "-b", "127.0.0.90", "example.test", "+short", "+tries=1", "+time=1",
        ], timeout: 10)
        #expect(direct.output == "192.0.2.55\n", "\(direct.output)")
        // The wildcard socket reads the address dialled (IP_PKTINFO) and answers with it as the
        // source (IP_PKTINFO on sendmsg, as nginx): the answer leaves from 127.0.0.5, and
        // $server_addr says 127.0.0.5 (a PROXY v2 header's destination would too). dig drops
        // an answer from any other address.
        let other = try Spawn.run(try Spawn.executable("dig", package: "dnsutils"), [
            "@127.0.0.5", "-p", String(gateway.port), "-b", "127.0.0.90", "example.test", "+short", "+tries=1", "+time=1",
        ], timeout: 10)
        #expect(other.output == "192.0.2.55\n", "\(other.output)")
        let lines = await gateway.waitForLines(of: "access.log", timeout: 2) { $0.count >= 2 }
        #expect(lines.contains("127.0.0.90 127.0.0.5:\(gateway.port) 200"), "\(lines)")
        #expect(lines.contains("127.0.0.90 127.0.0.1:\(gateway.port) 200"), "\(lines)")
        await gateway.stop()
    }

    @Test("listen [::]:PORT udp ipv6only=off (dual-stack wildcard): an IPv4 client that dialled 127.0.0.6 is answered from 127.0.0.6, an IPv6 client from ::1")
    func dualStackWildcardRepliesFromTheAddressDialled() async throws {
        let upstream = try UDPTestPeer { datagram, _, _ in [Array("re:".utf8) + datagram] }
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format w '$remote_addr $server_addr $status';
                access_log {DIR}/access.log w;
                server {
                    listen [::]:{PORT} udp ipv6only=off;
                    proxy_responses 1;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        // Unconnected clients, so an answer from the wrong address would still be read and seen.
        let v4 = try UDPTestSocket(bind: "127.0.0.91")
        try v4.send(Array("four".utf8), to: "127.0.0.6", gateway.port)
        let answer4 = try #require(v4.receiveFrom(timeout: 2), "no answer for the IPv4 client")
        #expect(answer4.bytes == Array("re:four".utf8))
        #expect(answer4.host == "127.0.0.6" && answer4.port == gateway.port, "answered from \(answer4.host):\(answer4.port)")
        let v6 = try UDPTestSocket(bind: "::1")
        try v6.send(Array("six".utf8), to: "::1", gateway.port)
        let answer6 = try #require(v6.receiveFrom(timeout: 2), "no answer for the IPv6 client")
        #expect(answer6.bytes == Array("re:six".utf8))
        #expect(answer6.host == "::1" && answer6.port == gateway.port, "answered from \(answer6.host):\(answer6.port)")
        let lines = await gateway.waitForLines(of: "access.log", timeout: 2) { $0.count >= 2 }
        #expect(lines.contains("::ffff:127.0.0.91 ::ffff:127.0.0.6 200") && lines.contains("::1 ::1 200"), "\(lines)")
        await gateway.stop()
    }

    @Test("proxy_responses 0 (fire and forget): each of 20 datagrams from one client socket is its own session, reaches the upstream from its own port, gets no answer and ends at once")
    func fireAndForget() async throws {
        let upstream = try UDPTestPeer { datagram, _, _ in [datagram] }  // answers, but nobody listens
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                proxy_timeout 30s;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_responses 0;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let client = try UDPTestSocket(bind: "127.0.0.62")
        try client.connect("127.0.0.1", gateway.port)
        for index in 0..<20 { try client.send(Array(String(format: "d%02d", index).utf8)) }
        let lines = await gateway.waitForLines(of: "access.log", timeout: 4) { $0.count >= 20 }.compactMap(AccessLine.init)
        let me = "127.0.0.62:\(client.localPort)"
        #expect(lines.count == 20 && lines.allSatisfy { $0.description == "UDP 200 \(me) 3 0" }, "\(lines)")
        // Sessions end when their datagram is sent, not at proxy_timeout (30 s).
        #expect(gateway.gateway.liveSessions == 0)
        #expect(await gateway.gateway.sweptSessions() == 0)
        let received = upstream.received
        #expect(received.map { String(decoding: $0.bytes, as: UTF8.self) } == (0..<20).map { String(format: "d%02d", $0) })
        // One upstream socket per session. Each closes as its datagram goes, so the kernel may
        // hand a freed port out again (it did, once, under load); one shared socket would be 1 port.
        #expect(Set(received.map(\.port)).count >= 15, "one upstream socket per session: \(received.map(\.port))")
        #expect(client.receive(timeout: 0.3) == nil, "the upstream's answers are not read")
        await gateway.stop()
    }

    @Test("listen udp reuseport with two event loops: 40 clients, 3 datagrams each, every answer comes back and each client is one session (one upstream port, one log line)")
    func reusePortKeepsClientsOnOneSession() async throws {
        let upstream = try UDPTestPeer { datagram, _, _ in [datagram] }
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            worker_processes 2;
            stream {
                \(Self.logFormat)
                access_log {DIR}/access.log udp;
                proxy_timeout 700ms;
                server {
                    listen 127.0.0.1:{PORT} udp reuseport;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        // One socket per event loop: the kernel's reuseport hash must keep each client on one
        // of them (with a single socket this test would prove nothing).
        let bound = try String(contentsOfFile: "/proc/net/udp", encoding: .utf8).split(separator: "\n")
            .filter { $0.split(separator: " ").dropFirst().first == Substring(String(format: "0100007F:%04X", gateway.port)) }
        #expect(bound.count == 2, "sockets bound to 127.0.0.1:\(gateway.port): \(bound.count)")
        var clients: [UDPTestSocket] = []
        for index in 0..<40 {
            let client = try UDPTestSocket(bind: "127.0.3.\(index + 1)")
            try client.connect("127.0.0.1", gateway.port)
            clients.append(client)
        }
        for round in 0..<3 {
            for (index, client) in clients.enumerated() { try client.send(Array("c\(index)r\(round)".utf8)) }
            for (index, client) in clients.enumerated() {
                #expect(client.receive(timeout: 2) == Array("c\(index)r\(round)".utf8), "client \(index) round \(round)")
            }
        }
        let lines = await gateway.waitForLines(of: "access.log", timeout: 4) { $0.count >= 40 }.compactMap(AccessLine.init)
        #expect(lines.count == 40, "\(lines)")
        #expect(Set(lines.map(\.address)).count == 40 && lines.allSatisfy { $0.status == 200 && $0.received == $0.sent }, "\(lines)")
        let portsPerClient = Dictionary(grouping: upstream.received, by: { $0.bytes.prefix(while: { $0 != UInt8(ascii: "r") }) })
            .mapValues { Set($0.map(\.port)).count }
        #expect(portsPerClient.count == 40 && portsPerClient.values.allSatisfy { $0 == 1 }, "\(portsPerClient)")
        await gateway.stop()
    }
}

// MARK: - Test peers

/// Builds and checks PROXY v2 headers by hand, from the spec's layout (anchors §2.3), so the
/// checks do not rest on PortcullisWire, the code under test.
fileprivate enum RawV2 {
    static let signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    struct Parsed: CustomStringConvertible {
        var verCmd: UInt8
        var family: UInt8
        var addressLength: Int
        /// The whole header: 16 + len.
        var length: Int
        var source = "", destination = ""
        var sourcePort: UInt16 = 0, destinationPort: UInt16 = 0
        var description: String {
            String(format: "v2 %02x %02x len %d ", verCmd, family, addressLength) + "\(source):\(sourcePort) → \(destination):\(destinationPort)"
        }
    }

    /// A complete v2 header with an INET or INET6 address block, or nil.
    static func parse(_ d: [UInt8]) -> Parsed? {
        guard d.count >= 16, Array(d[0..<12]) == signature, d[12] >> 4 == 2 else { return nil }
        let len = Int(d[14]) << 8 | Int(d[15])
        guard d.count >= 16 + len else { return nil }
        var p = Parsed(verCmd: d[12], family: d[13], addressLength: len, length: 16 + len)
        func port(_ at: Int) -> UInt16 { UInt16(d[at]) << 8 | UInt16(d[at + 1]) }
        switch d[13] >> 4 {
        case 1:
            guard len >= 12 else { return nil }
            p.source = d[16..<20].map(String.init).joined(separator: ".")
            p.destination = d[20..<24].map(String.init).joined(separator: ".")
            p.sourcePort = port(24)
            p.destinationPort = port(26)
        case 2:
            guard len >= 36 else { return nil }
            p.source = ipv6Text(Array(d[16..<32]))
            p.destination = ipv6Text(Array(d[32..<48]))
            p.sourcePort = port(48)
            p.destinationPort = port(50)
        default:
            return nil
        }
        return p
    }

    static func build(family: UInt8, source: String, sourcePort: UInt16, destination: String, destinationPort: UInt16,
                      tlvs: [(UInt8, [UInt8])] = []) -> [UInt8] {
        var body: [UInt8] = []
        for address in [source, destination] {
            if family >> 4 == 1 {
                body += address.split(separator: ".").map { UInt8($0)! }
            } else {
                var raw = in6_addr()
                inet_pton(AF_INET6, address, &raw)
                body += withUnsafeBytes(of: raw) { Array($0) }
            }
        }
        body += [UInt8(sourcePort >> 8), UInt8(sourcePort & 0xFF), UInt8(destinationPort >> 8), UInt8(destinationPort & 0xFF)]
        for (type, value) in tlvs { body += [type, UInt8(value.count >> 8), UInt8(value.count & 0xFF)] + value }
        return signature + [0x21, family, UInt8(body.count >> 8), UInt8(body.count & 0xFF)] + body
    }

    static func ipv6Text(_ bytes: [UInt8]) -> String {
        var raw = in6_addr()
        withUnsafeMutableBytes(of: &raw) { $0.copyBytes(from: bytes) }
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        inet_ntop(AF_INET6, &raw, &text, socklen_t(text.count))
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// A blocking UDP socket (no SwiftNIO), bound to a chosen loopback address.
final class UDPTestSocket: @unchecked Sendable {
    let fd: Int32
    let localPort: UInt16
    private let closed = Atomic<Bool>(false)
    private let lastSender = Mutex<(sockaddr_storage, socklen_t)?>(nil)

    init(bind host: String, port: UInt16 = 0) throws {
        let family = addressFamily(host)
        let fd = socket(family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket: \(String(cString: strerror(errno)))") }
        self.fd = fd
        var size: Int32 = 1 << 20
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        let result = Self.withAddress(host, port) { bind(fd, $0, $1) }
        guard result == 0 else {
            let problem = String(cString: strerror(errno))
            Glibc.close(fd)
            throw HarnessError("bind \(host):\(port): \(problem)")
        }
        localPort = Self.port(of: fd)
    }

    deinit { close() }

    func close() {
        if !closed.exchange(true, ordering: .relaxed) { Glibc.close(fd) }
    }

    func connect(_ host: String, _ port: UInt16) throws {
        let result = Self.withAddress(host, port) { Glibc.connect(fd, $0, $1) }
        guard result == 0 else { throw HarnessError("connect \(host):\(port): \(String(cString: strerror(errno)))") }
    }

    func send(_ bytes: [UInt8]) throws {
        let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, 0) }
        guard n == bytes.count else { throw HarnessError("send: \(String(cString: strerror(errno)))") }
    }

    func send(_ bytes: [UInt8], to host: String, _ port: UInt16) throws {
        let n = Self.withAddress(host, port) { address, length in
            bytes.withUnsafeBytes { Int32(sendto(fd, $0.baseAddress, $0.count, 0, address, length)) }
        }
        guard n == bytes.count else { throw HarnessError("sendto: \(String(cString: strerror(errno)))") }
    }

    /// One datagram, or nil after `timeout` seconds (or on an error such as ECONNREFUSED).
    func receive(timeout: Double) -> [UInt8]? {
        receiveFrom(timeout: timeout)?.bytes
    }

    func receiveFrom(timeout: Double) -> (bytes: [UInt8], host: String, port: UInt16)? {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let left = Int32(max(0, deadline.timeIntervalSinceNow) * 1000)
            let ready = poll(&pfd, 1, left)
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { return nil }
            return receiveNow()
        }
    }

    /// A datagram already waiting, without blocking; nil if there is none.
    func receiveNow() -> (bytes: [UInt8], host: String, port: UInt16)? {
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let n = buffer.withUnsafeMutableBytes { raw in
            withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    recvfrom(fd, raw.baseAddress, raw.count, Int32(MSG_DONTWAIT), $0, &length)
                }
            }
        }
        guard n >= 0 else { return nil }
        lastSender.withLock { $0 = (storage, length) }
        let (host, port) = Self.endpoint(storage)
        return (Array(buffer.prefix(n)), host, port)
    }

    /// Answers whoever sent the last datagram received, by its exact address (an abstract unix
    /// name, which `receiveFrom`'s text cannot carry, included).
    func replyToLastSender(_ bytes: [UInt8]) throws {
        guard var (storage, length) = lastSender.withLock({ $0 }) else { throw HarnessError("nothing received yet") }
        let n = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, bytes, bytes.count, 0, $0, length) }
        }
        guard n == bytes.count else { throw HarnessError("sendto: \(String(cString: strerror(errno)))") }
    }

    static func withAddress<T>(_ host: String, _ port: UInt16, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        var (address, length) = makeAddress(host, port)
        return withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) } }
    }

    static func endpoint(_ storage: sockaddr_storage) -> (String, UInt16) {
        if Int32(storage.ss_family) == AF_UNIX {
            let path = withUnsafeBytes(of: storage) { Array($0[2...].prefix { $0 != 0 }) }
            return ("unix:" + String(decoding: path, as: UTF8.self), 0)
        }
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        if Int32(storage.ss_family) == AF_INET6 {
            var sin6 = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in6.self) }
            inet_ntop(AF_INET6, &sin6.sin6_addr, &text, socklen_t(text.count))
            return (String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), UInt16(bigEndian: sin6.sin6_port))
        }
        var sin = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in.self) }
        inet_ntop(AF_INET, &sin.sin_addr, &text, socklen_t(text.count))
        return (String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), UInt16(bigEndian: sin.sin_port))
    }

    static func port(of fd: Int32) -> UInt16 {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return endpoint(storage).1
    }
}

/// A UDP port that was free a moment ago on `host` (bind :0, read it, release it).
fileprivate func freeUDPPort(host: String = "127.0.0.1") throws -> UInt16 {
    let socket = try UDPTestSocket(bind: host)
    defer { socket.close() }
    return socket.localPort
}

/// A UDP server on a thread: records every datagram with its sender and answers with whatever
/// `handler` returns (zero or more datagrams, sent back to the sender).
fileprivate final class UDPTestPeer: @unchecked Sendable {
    struct Datagram: Sendable {
        var bytes: [UInt8]
        var host: String
        var port: UInt16
    }

    let socket: UDPTestSocket
    var port: UInt16 { socket.localPort }
    private let log = Mutex<[Datagram]>([])
    private let stopped = Atomic<Bool>(false)
    private let finished = Atomic<Bool>(false)

    var received: [Datagram] { log.withLock { $0 } }

    init(host: String = "127.0.0.1", handler: @escaping @Sendable ([UInt8], String, UInt16) -> [[UInt8]]) throws {
        socket = try UDPTestSocket(bind: host)
        let thread = Thread { [self] in
            while !stopped.load(ordering: .relaxed) {
                guard let (bytes, host, port) = socket.receiveFrom(timeout: 0.05) else { continue }
                log.withLock { $0.append(Datagram(bytes: bytes, host: host, port: port)) }
                for reply in handler(bytes, host, port) { try? socket.send(reply, to: host, port) }
            }
            finished.store(true, ordering: .relaxed)
        }
        thread.start()
    }

    /// Stops the thread, then closes the socket (never while the thread may still use it).
    func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        let deadline = Date().addingTimeInterval(2)
        while !finished.load(ordering: .relaxed) && Date() < deadline { usleep(5_000) }
        socket.close()
    }

    deinit { stop() }
}

// MARK: - DNS

/// Hand-built DNS messages: a query for example.test, type A, class IN.
fileprivate enum DNS {
    static let name: [UInt8] = [7] + Array("example".utf8) + [4] + Array("test".utf8) + [0]
    static let queryLength = 12 + name.count + 4

    static func query(id: UInt16) -> [UInt8] {
        [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0] + name + [0, 1, 0, 1]
    }

    /// The id of a response that answers example.test with 192.0.2.55; nil for anything else.
    static func answeredID(_ r: [UInt8]) -> UInt16? {
        guard r.count >= queryLength + 16, r[2] & 0x80 != 0, r[3] & 0x0F == 0, r[6] == 0, r[7] >= 1,
              Array(r[12..<(12 + name.count)]) == name, Array(r.suffix(4)) == [192, 0, 2, 55] else { return nil }
        return UInt16(r[0]) << 8 | UInt16(r[1])
    }
}

/// Sends `total` queries from one socket per source address, at most one in flight per socket
/// (so with `proxy_responses 1` each query is a session of its own), matching answers by DNS
/// id. Retries nothing: a query unanswered after 5 s is counted lost.
fileprivate enum DNSFlood {
    struct Result: CustomStringConvertible {
        var answered = 0, lost = 0, wrong = 0
        var elapsed = 0.0
        var description: String { "answered \(answered), lost \(lost), wrong \(wrong), \(elapsed) s" }
    }

    static func run(port: UInt16, sources: [String], total: Int, timeout: Double) throws -> Result {
        let sockets = try sources.map { source -> UDPTestSocket in
            let socket = try UDPTestSocket(bind: source)
            try socket.connect("127.0.0.1", port)
            return socket
        }
        var queue = (0..<sockets.count).map { k in stride(from: k, to: total, by: sockets.count).map { $0 } }
        var inFlight: [(id: Int, sent: Date)?] = Array(repeating: nil, count: sockets.count)
        var answered = [Bool](repeating: false, count: total)
        var result = Result()
        var fds = sockets.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
        let start = Date()
        let deadline = start.addingTimeInterval(timeout)
        while Date() < deadline {
            var busy = false
            for k in sockets.indices {
                if let flight = inFlight[k], Date().timeIntervalSince(flight.sent) > 5 {
                    result.lost += 1
                    inFlight[k] = nil
                }
                if inFlight[k] == nil, !queue[k].isEmpty {
                    let id = queue[k].removeFirst()
                    try sockets[k].send(DNS.query(id: UInt16(id)))
                    inFlight[k] = (id, Date())
                }
                if inFlight[k] != nil { busy = true }
            }
            guard busy else { break }
            _ = poll(&fds, nfds_t(fds.count), 100)
            for k in sockets.indices where fds[k].revents != 0 {
                fds[k].revents = 0
                while let (bytes, _, _) = sockets[k].receiveNow() {
                    guard let id = DNS.answeredID(bytes), let flight = inFlight[k], Int(id) == flight.id, !answered[Int(id)] else {
                        result.wrong += 1
                        continue
                    }
                    answered[Int(id)] = true
                    result.answered += 1
                    inFlight[k] = nil
                }
            }
        }
        result.elapsed = Date().timeIntervalSince(start)
        result.lost += inFlight.compactMap { $0 }.count + queue.map(\.count).reduce(0, +)
        return result
    }
}

/// dnsmasq in the foreground on a free loopback port, answering example.test with
/// 192.0.2.55 from its own configuration (no resolv.conf, no hosts file, no root-owned files).
final class DNSMasq: @unchecked Sendable {
    let port: UInt16
    let pid: pid_t
    let directory: URL
    private let stopped = Atomic<Bool>(false)
    private let exited = Atomic<Bool>(false)

    private init(port: UInt16, pid: pid_t, directory: URL) {
        self.port = port
        self.pid = pid
        self.directory = directory
    }

    deinit { stop() }

    /// `arguments`: more of dnsmasq's options (`--addn-hosts=FILE` for answers a test changes).
    static func start(logQueries: Bool = true, arguments extra: [String] = []) throws -> DNSMasq {
        let executable = try Spawn.executable("dnsmasq", package: "dnsmasq")
        // dnsmasq run as root drops to "nobody" unless told otherwise; run as anyone else it
        // stays who it is. Naming the current user works both ways.
        let user = getpwuid(geteuid()).map { String(cString: $0.pointee.pw_name) } ?? "nobody"
        var problem = ""
        for _ in 0..<5 {  // a free port can be taken between finding and binding it
            let directory = try makeTemporaryDirectory("portcullis-dnsmasq")
            let port = try freeUDPPort()
            var arguments = [
                "--no-daemon", "--conf-file=/dev/null", "--pid-file=", "--user=\(user)",
                "--port=\(port)", "--listen-address=127.0.0.1", "--bind-interfaces",
                "--no-resolv", "--no-hosts", "--address=/example.test/192.0.2.55", "--log-facility=-",
            ]
            if logQueries { arguments.append("--log-queries") }
            arguments += extra
            let pid = try Spawn.start(executable, arguments,
                                      stdout: directory.appendingPathComponent("dnsmasq.log").path,
                                      stderr: directory.appendingPathComponent("stderr.log").path)
            let server = DNSMasq(port: port, pid: pid, directory: directory)
            // Ready once it answers a query.
            let probe = try UDPTestSocket(bind: "127.0.0.1")
            try probe.connect("127.0.0.1", port)
            let deadline = Date().addingTimeInterval(10)
            while Date() < deadline && server.isRunning {
                try? probe.send(DNS.query(id: 0xBEEF))
                if let answer = probe.receive(timeout: 0.2), DNS.answeredID(answer) == 0xBEEF { return server }
            }
            problem = server.diagnostics
            server.stop()
            if !problem.contains("in use") { break }
        }
        throw HarnessError("dnsmasq did not start:\n\(problem)")
    }

    var diagnostics: String {
        ["dnsmasq.log", "stderr.log"].compactMap { try? String(contentsOf: directory.appendingPathComponent($0), encoding: .utf8) }
            .joined(separator: "\n")
    }

    /// Rereads its hosts files (SIGHUP), so its answers change.
    func reload() { if isRunning { kill(pid, SIGHUP) } }

    /// Whether dnsmasq still runs (reaping it, once, if it has exited).
    var isRunning: Bool {
        guard !exited.load(ordering: .relaxed) else { return false }
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == 0 { return true }
        exited.store(true, ordering: .relaxed)
        return false
    }

    /// How many queries dnsmasq logged from `address` (with `--log-queries`).
    func queriesLogged(from address: String) -> Int {
        diagnostics.split(separator: "\n").filter { $0.contains("query[") && $0.hasSuffix("from \(address)") }.count
    }

    func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        if isRunning { Spawn.terminate(pid) }  // never signal a reaped (maybe reused) pid
        try? FileManager.default.removeItem(at: directory)
    }
}

/// Child processes started cleanly (as ExternalPeer does): no inherited descriptors beyond
/// 0–2, no blocked signals, default signal actions.
enum Spawn {
    /// The executable from PATH or the sbin folders Debian installs to.
    static func executable(_ name: String, package: String) throws -> String {
        var folders = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map(String.init)
        folders += ["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin"]
        for folder in folders where !folder.isEmpty {
            let candidate = URL(fileURLWithPath: folder).appendingPathComponent(name).path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw HarnessError("""
            \(name) is not installed, and the UDP tests need it as a real peer: \
            run .ci/install-deps (CI does) or `apt-get install \(package)`
            """)
    }

    static func start(_ path: String, _ arguments: [String], stdout: String, stderr: String) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        let flags = O_WRONLY | O_CREAT | O_TRUNC | O_APPEND
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, stdout, flags, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, stderr, flags, 0o644)
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>?, Int32) -> Int32
        if let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") {
            _ = unsafeBitCast(symbol, to: CloseFrom.self)(&actions, 3)
        } else {
            let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
            for fd in open.compactMap(Int32.init) where fd > 2 { posix_spawn_file_actions_addclose(&actions, fd) }
        }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCHLD, SIGALRM] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, path, &actions, &attributes, &argv, environ)
        guard result == 0 else { throw HarnessError("posix_spawn \(path): \(String(cString: strerror(result)))") }
        return pid
    }

    /// Waits for `pid` up to `timeout` seconds: its exit status, or nil if it is still running.
    static func wait(_ pid: pid_t, timeout: Double) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        var status: Int32 = 0
        while Date() < deadline {
            let result = waitpid(pid, &status, WNOHANG)
            if result == pid { return (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F) }
            if result < 0 { return -1 }
            usleep(5_000)
        }
        return nil
    }

    /// TERM, then KILL after 3 s; reaped either way.
    static func terminate(_ pid: pid_t) {
        kill(pid, SIGTERM)
        if wait(pid, timeout: 3) == nil {
            kill(pid, SIGKILL)
            _ = wait(pid, timeout: 3)
        }
    }

    /// Runs to completion (killed after `timeout` s): exit status and standard output.
    static func run(_ path: String, _ arguments: [String], timeout: Double) throws -> (status: Int32, output: String) {
        let directory = try makeTemporaryDirectory("portcullis-run")
        defer { try? FileManager.default.removeItem(at: directory) }
        let out = directory.appendingPathComponent("stdout").path
        let pid = try start(path, arguments, stdout: out, stderr: directory.appendingPathComponent("stderr").path)
        var status = wait(pid, timeout: timeout)
        if status == nil {
            terminate(pid)
            status = -1
        }
        return (status!, (try? String(contentsOfFile: out, encoding: .utf8)) ?? "")
    }
}
