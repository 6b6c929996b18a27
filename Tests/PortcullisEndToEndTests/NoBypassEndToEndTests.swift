#if canImport(Glibc)
import Glibc
#endif
import Foundation
import PortcullisCore
import PortcullisTestSupport
import PortcullisWire
import Testing

/// Every line of a JSON-lines file as one parsed object; records an issue for a line that is not.
func jsonObjects(_ lines: [String]) -> [[String: Any]] {
    lines.compactMap { line in
        let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
        if object == nil { Issue.record("not one JSON object: \(line.prefix(300))") }
        return object
    }
}

/// Issue #16 item 4 over real sockets: IPv4 clients of a dual-stack listener (arriving as
/// `::ffff:a.b.c.d`), and PROXY headers naming addresses in every form, from trusted and
/// untrusted peers, against IPv4 and IPv6 rules, geo, map and limit keys. Each case asserts
/// the client's outcome, its access-log line and its audit line.
@Suite("No bypass through address forms, end to end", .serialized)
struct NoBypassEndToEndTests {
    /// Sends `bytes` and says whether the gateway relayed (200: the echo comes back) or closed.
    static func outcome(_ connection: TestConnection, sending bytes: [UInt8]) throws -> Bool {
        try connection.send(bytes + Array("ping".utf8))
        connection.setTimeout(5)
        guard let echo = try? connection.receive(exactly: 4) else { return false }
        connection.close()
        return echo == Array("ping".utf8)
    }

    @Test("dual-stack [::]:P ipv6only=off: IPv4 clients arrive mapped and meet IPv4 rules, mapped rules and geo; map text keys and limit keys are per form")
    func dualStackListener() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format ds '$realip_remote_port $remote_addr "$binary_remote_addr" $status';
                access_log {DIR}/access.log ds;
                audit_log {DIR}/audit.log sample=1000/s;
                geo $geo_bad { default 0; 127.0.0.4/32 1; }
                map $remote_addr $map_bad { default 0; 127.0.0.5 1; "::ffff:127.0.0.8" 1; }
                limit_conn_zone $binary_remote_addr zone=perip:1m;
                server {
                    listen [::]:{PORT} ipv6only=off;
                    deny 127.0.0.2;
                    deny ::ffff:127.0.0.3;
                    deny $geo_bad;
                    deny $map_bad;
                    allow all;
                    limit_conn perip 1;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """, host: "::")
        // (source, relayed?, the rule or variable that refused)
        let cases: [(String, Bool, String?)] = [
            ("127.0.0.2", false, "deny 127.0.0.2;"),
            ("127.0.0.3", false, "deny ::ffff:127.0.0.3;"),
            ("127.0.0.4", false, "deny $geo_bad;"),
            // A map compares text: the IPv4 key misses the mapped client (nginx does the same;
            // the residual in docs/threat-model.md), the key in the mapped form matches.
            ("127.0.0.5", true, nil),
            ("127.0.0.8", false, "deny $map_bad;"),
            ("127.0.0.6", true, nil),
        ]
        // Keyed by source and port: two sources may be given the same ephemeral port.
        var ports: [String: (String, Bool, String?)] = [:]
        for (source, relayed, rule) in cases {
            let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: source)
            ports["\(source) \(try client.localEndpoint().port)"] = (source, relayed, rule)
            #expect(try Self.outcome(client, sending: []) == relayed, "\(source)")
        }
        // Over IPv6 loopback the same listener sees ::1 itself.
        let v6 = try TestConnection.connect(to: "::1", port: gateway.port)
        ports["::1 \(try v6.localEndpoint().port)"] = ("::1", true, nil)
        #expect(try Self.outcome(v6, sending: []))

        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= ports.count }
        #expect(lines.count == ports.count)
        for line in lines {
            let fields = line.split(separator: " ")
            let address = fields.count == 4 ? String(fields[1]) : ""
            let source = address.hasPrefix("::ffff:") ? String(address.dropFirst(7)) : address
            guard fields.count == 4, let (_, relayed, _) = ports["\(source) \(fields[0])"] else {
                Issue.record("unexpected line \(line)"); continue
            }
            let mapped = source == "::1" ? "::1" : "::ffff:" + source
            #expect(fields[1] == mapped, "$remote_addr of \(source): \(fields[1])")
            #expect(fields[3] == (relayed ? "200" : "403"), "\(line)")
            // $binary_remote_addr is the 16 bytes of the mapped address, as nginx.
            let bytes = IPAddress(mapped)!.bytes
            #expect(bytes.count == 16)
            #expect(fields[2] == "\"" + bytes.map { $0 < 0x20 || $0 > 0x7E ? "\\x" + String(format: "%02X", $0) : String(UnicodeScalar($0)) }.joined() + "\"")
        }
        let audit = await gateway.waitForLines(of: "audit.log") { $0.count >= 4 }
        let objects = jsonObjects(audit)
        #expect(objects.count == 4, "one audit line per refused client")
        for object in objects {
            let peer = try #require(object["peer"] as? String)
            let port = try #require(UInt16(peer.split(separator: ":").last ?? ""))
            let client = try #require(object["client"] as? String)
            let (source, relayed, rule) = try #require(ports["\(client.dropFirst(7)) \(port)"], "\(peer)")
            #expect(!relayed)
            #expect(object["client"] as? String == "::ffff:" + source)
            #expect(peer == "[::ffff:\(source)]:\(port)")
            #expect(object["status"] as? Int == 403 && object["phase"] as? String == "access")
            #expect((object["rule"] as? [String: Any])?["text"] as? String == rule)
        }

        // limit_conn on $binary_remote_addr: a held session's key refuses the same client's next.
        let holder = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.7")
        try holder.send("hold")
        #expect(try holder.receive(exactly: 4) == Array("hold".utf8))
        let second = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.7")
        #expect(second.isClosedByPeer(), "the second session of one mapped client passed limit_conn 1")
        let refused = await gateway.waitForLines(of: "audit.log") { $0.count >= 5 }
        let limitLine = try #require(jsonObjects(refused).first { $0["status"] as? Int == 503 })
        let limit = try #require(limitLine["limit"] as? [String: Any])
        #expect(limit["zone"] as? String == "perip")
        #expect(limit["key"] as? String == String(decoding: IPAddress("::ffff:127.0.0.7")!.bytes, as: UTF8.self))
        #expect(limitLine["client"] as? String == "::ffff:127.0.0.7")
        holder.close()
        await gateway.stop()
    }

    // MARK: PROXY-supplied addresses

    static func v2(family: UInt8, command: UInt8 = 0x1, addresses: [UInt8]) -> [UInt8] {
        ProxyHeaderDecoder.v2Signature + [0x20 | command, family, UInt8(addresses.count >> 8), UInt8(addresses.count & 0xFF)] + addresses
    }

    /// 16-byte source and destination (an IPv4 text becomes its mapped form), then ports.
    static func inet6(_ source: String) -> [UInt8] {
        func sixteen(_ text: String) -> [UInt8] {
            let a = IPAddress(text)!
            if case .v4(let v) = a { return IPAddress.v6(0xFFFF_0000_0000 | UInt128(v)).bytes }
            return a.bytes
        }
        return sixteen(source) + sixteen("2001:db8::443") + [0x9C, 0x40, 0x01, 0xBB]
    }

    static func inet(_ source: String) -> [UInt8] {
        IPAddress(source)!.bytes + IPAddress("203.0.113.9")!.bytes + [0x9C, 0x40, 0x01, 0xBB]
    }

    /// (name, header, the client a trusted header names or nil for "the peer", broken?)
    static let headers: [(String, [UInt8], String?, Bool)] = [
        ("v1 TCP4 denied", Array("PROXY TCP4 192.0.2.1 203.0.113.9 40000 443\r\n".utf8), "192.0.2.1", false),
        ("v1 TCP4 allowed", Array("PROXY TCP4 198.51.100.7 203.0.113.9 40000 443\r\n".utf8), "198.51.100.7", false),
        ("v1 TCP6 denied", Array("PROXY TCP6 2001:db8::bad 2001:db8::1 40000 443\r\n".utf8), "2001:db8::bad", false),
        ("v1 TCP6 mapped", Array("PROXY TCP6 ::ffff:192.0.2.1 ::ffff:203.0.113.9 40000 443\r\n".utf8), "::ffff:192.0.2.1", false),
        ("v1 TCP6 compatible", Array("PROXY TCP6 ::192.0.2.1 ::1 40000 443\r\n".utf8), "::192.0.2.1", false),
        ("v1 TCP6 zone", Array("PROXY TCP6 fe80::1%eth0 fe80::2 40000 443\r\n".utf8), nil, true),
        ("v1 UNKNOWN", Array("PROXY UNKNOWN 192.0.2.1 203.0.113.9 40000 443\r\n".utf8), nil, false),
        ("v2 INET denied", v2(family: 0x11, addresses: inet("192.0.2.1")), "192.0.2.1", false),
        ("v2 INET6 denied", v2(family: 0x21, addresses: inet6("2001:db8::bad")), "2001:db8::bad", false),
        ("v2 INET6 mapped", v2(family: 0x21, addresses: inet6("192.0.2.1")), "::ffff:192.0.2.1", false),
        ("v2 INET6 compatible", v2(family: 0x21, addresses: inet6("::192.0.2.1")), "::192.0.2.1", false),
        ("v2 UNIX", v2(family: 0x31, addresses: [UInt8](repeating: 0x2F, count: 216)), nil, false),
        ("v2 AF_UNSPEC", v2(family: 0x00, addresses: []), nil, false),
        ("v2 LOCAL", v2(family: 0x11, command: 0x0, addresses: inet("192.0.2.1")), nil, false),
    ]

    static func denied(_ client: String) -> Bool {
        [IPAddress("192.0.2.1")!, IPAddress("2001:db8::bad")!, IPAddress("127.0.0.3")!].contains(IPAddress(client)!.folded)
    }

    @Test("PROXY v1/v2 addresses of every form from trusted and untrusted peers: status, access line and audit line use exactly the right address")
    func proxyAddressForms() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format pp '$realip_remote_port $remote_addr $realip_remote_addr $proxy_protocol_addr $status';
                access_log {DIR}/access.log pp;
                audit_log {DIR}/audit.log sample=1000/s;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.0/29;
                    proxy_protocol_timeout 2s;
                    deny 192.0.2.1;
                    deny 2001:db8::bad;
                    deny 127.0.0.3;
                    allow all;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        struct Expected { var client: String; var status: Int; var claimed: String? }
        // Keyed by the TCP peer "ip:port": two sources may be given the same ephemeral port.
        var expected: [String: Expected] = [:]
        for peer in ["127.0.0.1", "127.0.0.3", "127.0.0.9"] {
            let trusted = peer != "127.0.0.9"
            for (name, header, names, broken) in Self.headers {
                let client = (trusted ? names : nil) ?? peer
                let status = broken ? 400 : Self.denied(client) ? 403 : 200
                let connection = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: peer)
                expected["\(peer):\(try connection.localEndpoint().port)"] = Expected(client: broken ? peer : client, status: status, claimed: names)
                #expect(try Self.outcome(connection, sending: header) == (status == 200), "\(name) from \(peer)")
            }
        }
        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= expected.count }
        #expect(lines.count == expected.count)
        for line in lines {
            let fields = line.split(separator: " ").map(String.init)
            guard fields.count == 5, let want = expected["\(fields[2]):\(fields[0])"] else {
                Issue.record("unexpected line \(line)"); continue
            }
            #expect(fields[1] == want.client, "\(line)")
            #expect(fields[2].hasPrefix("127.0.0."), "$realip_remote_addr is the TCP peer: \(line)")
            #expect(fields[4] == String(want.status), "\(line)")
            // $proxy_protocol_addr carries the claim, believed or not.
            if let claimed = want.claimed, want.status != 400 { #expect(fields[3] == claimed, "\(line)") }
        }
        let refusedCount = expected.values.filter { $0.status != 200 }.count
        let audit = await gateway.waitForLines(of: "audit.log") { $0.count >= refusedCount }
        let objects = jsonObjects(audit)
        #expect(objects.count == refusedCount && audit.count == refusedCount)
        for object in objects {
            let peer = try #require(object["peer"] as? String)
            let want = try #require(expected[peer], "\(peer)")
            #expect(object["client"] as? String == want.client, "\(peer)")
            #expect(object["status"] as? Int == want.status, "\(peer)")
            if want.status == 400 {
                #expect((object["reason"] as? String)?.hasPrefix("broken PROXY protocol header: malformed v1 header") == true)
                #expect(object["phase"] as? String == "proxy_header_read")
            } else {
                #expect(object["phase"] as? String == "access")
                let rule = (object["rule"] as? [String: Any])?["text"] as? String
                let folded = IPAddress(want.client)!.folded
                #expect(rule == "deny \(folded);", "\(peer): \(rule ?? "nil")")
            }
        }
        // 14 headers x 3 peers. 403: six headers name a denied client (from either trusted peer),
        // and from the denied trusted peer 127.0.0.3 the four headers that name no client.
        // From the untrusted peer nothing but the broken header is refused.
        #expect(expected.count == 42)
        #expect(expected.values.filter { $0.status == 403 }.count == 6 + 6 + 4)
        #expect(expected.values.filter { $0.status == 400 }.count == 3)
        await gateway.stop()
    }

    @Test("limit_conn $binary_remote_addr through a trusted PROXY sender: TCP4 a.b.c.d and TCP6 ::ffff:a.b.c.d are two keys (as nginx); one form twice is refused")
    func limitKeysThroughProxy() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                audit_log {DIR}/audit.log sample=1000/s;
                limit_conn_zone $binary_remote_addr zone=perip:1m;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    limit_conn perip 1;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        func open(_ header: String) throws -> TestConnection {
            let c = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
            try c.send(header + "hold")
            return c
        }
        let plain = try open("PROXY TCP4 10.0.0.7 127.0.0.1 40000 443\r\n")
        #expect(try plain.receive(exactly: 4) == Array("hold".utf8))
        let mapped = try open("PROXY TCP6 ::ffff:10.0.0.7 ::1 40001 443\r\n")
        #expect(try mapped.receive(exactly: 4) == Array("hold".utf8), "nginx keys the mapped form apart")
        let again = try open("PROXY TCP4 10.0.0.7 127.0.0.1 40002 443\r\n")
        #expect(again.isClosedByPeer(), "the same IPv4 key twice passed limit_conn 1")
        let mappedAgain = try open("PROXY TCP6 ::ffff:10.0.0.7 ::1 40003 443\r\n")
        #expect(mappedAgain.isClosedByPeer(), "the same mapped key twice passed limit_conn 1")
        let audit = await gateway.waitForLines(of: "audit.log") { $0.count >= 2 }
        let objects = jsonObjects(audit)
        #expect(objects.count == 2)
        let keys = Set(objects.compactMap { ($0["limit"] as? [String: Any])?["key"] as? String })
        #expect(keys == ["\n\u{0}\u{0}\u{7}", String(decoding: IPAddress("::ffff:10.0.0.7")!.bytes, as: UTF8.self)])
        #expect(Set(objects.compactMap { $0["client"] as? String }) == ["10.0.0.7", "::ffff:10.0.0.7"])
        #expect(Set(objects.compactMap { $0["client_port"] as? Int }) == [40002, 40003])
        plain.close()
        mapped.close()
        await gateway.stop()
    }
}
