#if canImport(Glibc)
import Glibc
#endif
import Foundation
import PortcullisCore
import PortcullisTestSupport
import PortcullisWire
import Testing

/// `listen … proxy_protocol` and `set_real_ip_from` over real sockets, with headers written
/// byte for byte by the test.
@Suite("PROXY protocol, accepting", .serialized)
struct ProxyProtocolTests {
    static let format = """
        log_format pp '$remote_addr:$remote_port $realip_remote_addr $proxy_protocol_addr:$proxy_protocol_port $proxy_protocol_server_addr:$proxy_protocol_server_port $status';
        """

    static func v2(_ source: String, _ sourcePort: UInt16, _ destination: String, _ destinationPort: UInt16,
                   tlvs: [ProxyTLV] = [], command: ProxyHeader.Command = .proxy) -> [UInt8] {
        ProxyHeaderEncoder.v2(
            source: SocketEndpoint(address: IPAddress(source)!, port: sourcePort),
            destination: SocketEndpoint(address: IPAddress(destination)!, port: destinationPort),
            command: command, tlvs: tlvs)
    }

    func start(trusting trusted: String, extra: String = "", upstreamPort: UInt16) async throws -> GatewayHarness {
        try await GatewayHarness.start("""
            stream {
                \(Self.format)
                access_log {DIR}/access.log pp;
                audit_log {DIR}/audit.log;
                error_log {DIR}/error.log;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from \(trusted);
                    proxy_protocol_timeout 500ms;
                    deny 192.0.2.1;
                    allow all;
                    \(extra)
                    proxy_pass 127.0.0.1:\(upstreamPort);
                }
            }
            """)
    }

    /// Header, payload and close in one go: the client is gone while the upstream connect is
    /// still pending. Every such session must still end and be logged (it once stayed in the
    /// registry forever, unlogged, holding up a graceful stop).
    @Test("a client that closes while the upstream connect is pending still ends in one logged record")
    func clientGoneDuringConnect() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await start(trusting: "127.0.0.0/8", upstreamPort: upstream.port)
        let count = 30
        for i in 0..<count {
            let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
            try client.send("PROXY TCP4 198.51.100.\(i) 203.0.113.9 4\(1000 + i) 443\r\nhi\n")
            client.close()
        }
        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= count }
        #expect(lines.count == count)
        for _ in 0..<100 where gateway.gateway.liveSessions > 0 { try await Task.sleep(for: .milliseconds(20)) }
        #expect(gateway.gateway.liveSessions == 0)
        await gateway.stop()
    }

    @Test("a trusted v1 header becomes $remote_addr; access rules see it; the peer stays in $realip_remote_addr")
    func trustedV1() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await start(trusting: "127.0.0.0/8", upstreamPort: upstream.port)
        let allowed = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try allowed.send("PROXY TCP4 198.51.100.7 203.0.113.9 40000 443\r\nhello")
        #expect(try allowed.receive(exactly: 5) == Array("hello".utf8))
        allowed.close()
        let denied = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try denied.send("PROXY TCP4 192.0.2.1 203.0.113.9 40001 443\r\n")
        #expect(denied.isClosedByPeer())
        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= 2 }
        // Two sessions end concurrently: their lines may come in either order.
        #expect(Set(lines) == [
            "198.51.100.7:40000 127.0.0.1 198.51.100.7:40000 203.0.113.9:443 200",
            "192.0.2.1:40001 127.0.0.1 192.0.2.1:40001 203.0.113.9:443 403",
        ])
        await gateway.stop()
    }

    @Test("a header from an untrusted peer is read but not believed: $remote_addr stays the peer")
    func untrustedPeer() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await start(trusting: "10.0.0.0/8", upstreamPort: upstream.port)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.3")
        // Claims to be the denied 192.0.2.1: not believed, so not denied either.
        try client.send("PROXY TCP4 192.0.2.1 203.0.113.9 40002 443\r\nping")
        #expect(try client.receive(exactly: 4) == Array("ping".utf8))
        client.close()
        let lines = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        #expect(lines.count == 1)
        #expect(lines.first?.hasPrefix("127.0.0.3:") == true)
        #expect(lines.first?.hasSuffix(" 127.0.0.3 192.0.2.1:40002 203.0.113.9:443 200") == true)
        await gateway.stop()
    }

    @Test("v2 over IPv6, with TLVs exposed as variables, arriving one byte at a time")
    func v2ByteByByte() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format tlv '$remote_addr $proxy_protocol_tlv_authority $proxy_protocol_tlv_unique_id $proxy_protocol_tlv_0xe5';
                access_log {DIR}/access.log tlv;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let header = Self.v2("2001:db8::5", 50000, "2001:db8::1", 443, tlvs: [
            ProxyTLV(.authority, Array("example.com".utf8)),
            ProxyTLV(.uniqueID, Array("abc-123".utf8)),
            ProxyTLV(type: 0xE5, value: Array("geo=NL".utf8)),
        ])
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        for byte in header {
            try client.send([byte])
            usleep(1000)
        }
        try client.send("after")
        #expect(try client.receive(exactly: 5) == Array("after".utf8))
        client.close()
        let lines = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        #expect(lines == ["2001:db8::5 example.com abc-123 geo=NL"])
        await gateway.stop()
    }

    @Test("a malformed header costs one connection: 400, audited, nothing forwarded, no upstream contact")
    func malformedHeader() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await start(trusting: "127.0.0.1", upstreamPort: upstream.port)
        let cases: [[UInt8]] = [
            Array("PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n".utf8),          // double space
            Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8),            // no header at all
            ProxyHeaderDecoder.v2Signature + [0x2F, 0x11, 0x00, 0x0C] + [UInt8](repeating: 1, count: 12),  // command 0xF
        ]
        for bytes in cases {
            let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
            try client.send(bytes)
            #expect(client.isClosedByPeer())
        }
        let audit = await gateway.waitForLines(of: "audit.log") { $0.count >= 3 }
        #expect(audit.count == 3)
        // The error log quotes what arrived, escaped so it cannot forge a line or a field.
        let errors = gateway.lines(of: "error.log")
        #expect(errors.contains { $0.contains(#"broken header: "PROXY TCP4 1.2.3.4  5.6.7.8 1 2\x0D\x0A" (malformed v1 header"#) })
        #expect(errors.contains { $0.contains(#"broken header: "GET / HTTP/1.1\x0D\x0AHost: x\x0D\x0A\x0D\x0A" (no PROXY protocol signature)"#) })
        for line in audit {
            let entry = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            #expect(entry["status"] as? Int == 400)
            #expect(entry["phase"] as? String == "proxy_header_read")
            #expect((entry["reason"] as? String)?.hasPrefix("broken PROXY protocol header") == true)
        }
        try await Task.sleep(for: .milliseconds(100))
        #expect(upstream.connectionCount == 0)
        // The listener is unharmed.
        let good = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try good.send("PROXY TCP4 198.51.100.8 203.0.113.9 1 2\r\nok")
        #expect(try good.receive(exactly: 2) == Array("ok".utf8))
        await gateway.stop()
    }

    @Test("a slowloris header is cut off at proxy_timeout while other clients are served")
    func slowHeaderTimesOut() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await start(trusting: "127.0.0.1", upstreamPort: upstream.port)
        let slow = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try slow.send("PROXY TCP4 198.51.")
        let started = Date()
        let fast = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try fast.send("PROXY TCP4 198.51.100.9 203.0.113.9 3 4\r\nquick")
        #expect(try fast.receive(exactly: 5) == Array("quick".utf8))
        #expect(slow.isClosedByPeer())
        let waited = Date().timeIntervalSince(started)
        #expect(waited > 0.4 && waited < 3, "closed after \(waited) s; proxy_protocol_timeout is 500ms")
        let audit = await gateway.waitForLines(of: "audit.log") { !$0.isEmpty }
        #expect(audit.first?.contains("\"reason\":\"PROXY protocol header timed out\"") == true)
        await gateway.stop()
    }

    @Test("a LOCAL header keeps the real peer address")
    func localKeepsPeer() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await start(trusting: "127.0.0.0/8", upstreamPort: upstream.port)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.4")
        try client.send(Self.v2("192.0.2.1", 1, "192.0.2.2", 2, command: .local) + Array("local".utf8))
        #expect(try client.receive(exactly: 5) == Array("local".utf8))
        client.close()
        let lines = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        #expect(lines.first?.hasPrefix("127.0.0.4:") == true)
        #expect(lines.first?.hasSuffix(" 127.0.0.4 -:- -:- 200") == true)
        await gateway.stop()
    }

    @Test("sending: proxy_protocol v1 and v2 put the client (after realip) and the listen address first")
    func sendsHeaderBeforePayload() async throws {
        for version in ["v1", "v2"] {
            let received = ReceivedBytes()
            let upstream = try TestServer { connection in
                received.set((try? connection.receiveAll()) ?? [])
            }
            let gateway = try await GatewayHarness.start("""
                stream {
                    server {
                        listen 127.0.0.1:{PORT} proxy_protocol;
                        set_real_ip_from 127.0.0.1;
                        proxy_protocol \(version);
                        proxy_pass 127.0.0.1:\(upstream.port);
                    }
                }
                """)
            let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
            try client.send("PROXY TCP6 2001:db8::7 2001:db8::1 41000 443\r\npayload")
            usleep(100_000)
            client.close()
            let bytes = await received.wait()
            let (header, length) = try #require(try ProxyHeaderDecoder.decode(bytes))
            #expect(header.version == (version == "v1" ? .v1 : .v2))
            #expect(header.source == SocketEndpoint(address: IPAddress("2001:db8::7")!, port: 41000))
            // Mixed families (IPv6 client, IPv4 listener) are sent as IPv6, the IPv4 side mapped.
            #expect(header.destination == SocketEndpoint(address: IPAddress("::ffff:127.0.0.1")!, port: gateway.port))
            #expect(Array(bytes[length...]) == Array("payload".utf8))
            await gateway.stop()
        }
    }
}

final class ReceivedBytes: @unchecked Sendable {
    private let lock = NSLock()
    private var value: [UInt8]?

    func set(_ bytes: [UInt8]) {
        lock.withLock { value = bytes }
    }

    func wait() async -> [UInt8] {
        for _ in 0..<500 {
            if let value = lock.withLock({ value }) { return value }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return []
    }
}

@Suite("PROXY protocol, edge cases", .serialized)
struct ProxyProtocolEdgeTests {
    @Test("a client that closes mid-header is a broken header (400), as the spec and nginx say")
    func closedMidHeader() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format s '$status';
                access_log {DIR}/access.log s;
                audit_log {DIR}/audit.log;
                server { listen 127.0.0.1:{PORT} proxy_protocol; proxy_pass 127.0.0.1:\(upstream.port); }
            }
            """)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try client.send(ProxyHeaderDecoder.v2Signature + [0x21, 0x11])
        client.shutdownWrite()
        #expect(client.isClosedByPeer())
        #expect(await gateway.waitForLines(of: "access.log") { !$0.isEmpty } == ["400"])
        let audit = await gateway.waitForLines(of: "audit.log") { !$0.isEmpty }
        #expect(audit.first?.contains("incomplete PROXY protocol header") == true)
        #expect(upstream.connectionCount == 0)
        await gateway.stop()
    }

    @Test("a TLV too large for the outgoing header is left out with a warning; the session works")
    func oversizeTLVIsDroppedNotFatal() async throws {
        let received = ReceivedBytes()
        let upstream = try TestServer { connection in
            received.set((try? connection.receiveAll()) ?? [])
        }
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log warn;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    proxy_protocol v2;
                    proxy_protocol_tlv 0xE1 "small";
                    proxy_protocol_tlv 0xE0 "$proxy_protocol_tlv_0xe0$proxy_protocol_tlv_0xe0";
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        // A client's 40,000-byte TLV, doubled by the rule: 80,000 bytes cannot fit in `len`.
        let header = ProxyHeaderEncoder.v2(
            source: SocketEndpoint(address: IPAddress("198.51.100.4")!, port: 4),
            destination: SocketEndpoint(address: IPAddress("198.51.100.5")!, port: 5),
            tlvs: [ProxyTLV(type: 0xE0, value: [UInt8](repeating: 0x41, count: 40_000))])
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try client.send(header + Array("data".utf8))
        usleep(200_000)
        client.close()
        let bytes = await received.wait()
        let (sent, length) = try #require(try ProxyHeaderDecoder.decode(bytes))
        #expect(sent.source == SocketEndpoint(address: IPAddress("198.51.100.4")!, port: 4))
        #expect(sent.tlv(0xE1) == Array("small".utf8))
        #expect(sent.tlv(0xE0) == nil)
        #expect(Array(bytes[length...]) == Array("data".utf8))
        let errors = await gateway.waitForLines(of: "error.log") { $0.contains { $0.contains("left out") } }
        #expect(errors.contains { $0.contains("[warn]") && $0.contains("TLVs that did not fit in 65535 bytes were left out") })
        await gateway.stop()
    }

    @Test("a v2 DGRAM header on a TCP listener names no TCP client: the peer is kept")
    func datagramHeaderOnTCP() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format s '$remote_addr [$proxy_protocol_addr]';
                access_log {DIR}/access.log s;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let header = ProxyHeaderEncoder.v2(
            source: SocketEndpoint(address: IPAddress("198.51.100.1")!, port: 1),
            destination: SocketEndpoint(address: IPAddress("198.51.100.2")!, port: 2), transport: .datagram)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try client.send(header + Array("x".utf8))
        #expect(try client.receive(exactly: 1) == [UInt8(ascii: "x")])
        client.close()
        #expect(await gateway.waitForLines(of: "access.log") { !$0.isEmpty } == ["127.0.0.1 [-]"])
        await gateway.stop()
    }
}
