#if canImport(Glibc)
import Glibc
#endif
import Foundation
import PortcullisTestSupport
import PortcullisWire
import Testing

/// Issue #14 part 3: `ssl_preread on` — SNI routing as nginx does it (same rule file, same
/// replies and log lines), real TLS through the router, and Portcullis's extension: allow/deny
/// and limit keys on `$ssl_preread_*` (nginx/nginx#872).
@Suite("ssl_preread", .serialized)
struct PrereadTests {
    /// A ClientHello record with an SNI (nil: none) and ALPN names: explain's builder.
    static func hello(sni: String?, alpn: [String] = []) -> [UInt8] {
        ClientHelloBuilder.record(serverName: sni, alpn: alpn)
    }

    /// An upstream that reads what comes, then answers its name and closes.
    static func named(_ name: String) throws -> TestServer {
        try TestServer { connection in
            connection.setTimeout(2)
            _ = try? connection.receive()
            try? connection.send(name + "\n")
            connection.close()
        }
    }

    static func router(_ a: UInt16, _ b: UInt16, _ other: UInt16) -> String {
        """
        stream {
            log_format p '$status "$ssl_preread_server_name" "$ssl_preread_alpn_protocols" "$ssl_preread_protocol" $upstream_addr';
            access_log {DIR}/access.log p;
            map $ssl_preread_server_name $route {
                a.test      127.0.0.1:\(a);
                b.test      127.0.0.1:\(b);
                default     127.0.0.1:\(other);
            }
            server {
                listen 127.0.0.1:{PORT};
                ssl_preread on;
                preread_timeout 400ms;
                preread_buffer_size 1k;
                proxy_pass $route;
            }
        }
        """
    }

    static func send(_ bytes: [UInt8], to port: UInt16) -> String { TestConnection.reply(from: port, sending: bytes) }

    static let cases: [(String, [UInt8])] = [
        ("a", hello(sni: "a.test", alpn: ["h2", "http/1.1"])),
        ("b", hello(sni: "b.test")),
        ("no-sni", hello(sni: nil, alpn: ["imap"])),
        ("http", Array("GET / HTTP/1.0\r\n\r\n".utf8)),
        ("three-bytes", Array("GET".utf8)),
        ("partial-hello", Array(hello(sni: "a.test").prefix(20))),
        // Over preread_buffer_size (1k): eight 200-byte ALPN names.
        ("too-big", hello(sni: "big.test", alpn: Array(repeating: String(repeating: "x", count: 200), count: 8))),
    ]

    @Test("SNI routing with map and proxy_pass $var: replies and log lines (status, the three variables, the upstream) are nginx's for hellos, no SNI, plain HTTP, three bytes, half a hello, a hello over preread_buffer_size")
    func routerSameAsNginx() async throws {
        let a = try Self.named("A"), b = try Self.named("B"), other = try Self.named("OTHER")
        defer { a.stop(); b.stop(); other.stop() }
        let rules = Self.router(a.port, b.port, other.port)
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        var theirs: [String: String] = [:], ours: [String: String] = [:]
        for (name, bytes) in Self.cases {
            theirs[name] = Self.send(bytes, to: nginx.port)
            ours[name] = Self.send(bytes, to: gateway.port)
        }
        #expect(theirs["a"] == "A\n" && theirs["b"] == "B\n" && theirs["no-sni"] == "OTHER\n", "nginx: \(theirs)")
        #expect(ours == theirs)
        let count = Self.cases.count
        let theirLines = await nginx.waitForLogLines { $0.count >= count }
        let ourLines = await gateway.waitForLines(of: "access.log") { $0.count >= count }
        #expect(theirLines.count == count, "\(theirLines)")
        #expect(ourLines.sorted() == theirLines.sorted(), "ours: \(ourLines)\nnginx: \(theirLines)")
        #expect(ourLines.contains("200 \"a.test\" \"h2,http/1.1\" \"TLSv1.3\" 127.0.0.1:\(a.port)"), "\(ourLines)")
        #expect(ourLines.contains { $0.hasPrefix("400 ") }, "preread buffer full: \(ourLines)")
        await gateway.stop()
    }

    @Test("a real TLS client through the SNI router reaches the TLS server its SNI names (the prereaded bytes are replayed)")
    func realTLSThroughRouter() async throws {
        let pki = try TestPKI.shared()
        let backend = try ExternalPeer.nginx("""
            stream {
                server {
                    listen 127.0.0.1:{PORT} ssl;
                    ssl_protocols TLSv1.2 TLSv1.3;
                    ssl_certificate \(pki.directory.path)/$ssl_server_name.crt;
                    ssl_certificate_key \(pki.directory.path)/$ssl_server_name.key;
                    return "backend saw $ssl_server_name\\n";
                }
            }
            """)
        defer { backend.stop() }
        let other = try Self.named("OTHER")
        defer { other.stop() }
        let gateway = try await GatewayHarness.start(Self.router(backend.port, backend.port, other.port))
        for name in ["a.test", "b.test"] {
            let reply = try sClient(port: gateway.port, ["-servername", name, "-CAfile", pki.path("ca.crt"), "-verify_return_error"])
            #expect(reply.text == "backend saw \(name)\n", "\(name): \(reply)")
        }
        await gateway.stop()
    }

    @Test("beyond nginx: deny $var on $ssl_preread_server_name refuses a named site with an audit line naming the rule and the value, and limit_conn keyed by the SNI counts per site")
    func accessBySNI() async throws {
        let upstream = try TestServer { connection in
            connection.setTimeout(3)
            _ = try? connection.receive()
            try? connection.send("in\n")
            // Held open, so that limit_conn sees the session while the next one arrives.
            usleep(300_000)
            connection.close()
        }
        defer { upstream.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format p '$status $ssl_preread_server_name';
                access_log {DIR}/access.log p;
                audit_log {DIR}/audit.log;
                map $ssl_preread_server_name $blocked {
                    evil.test   1;
                    default     "";
                }
                limit_conn_zone $ssl_preread_server_name zone=per_site:1m;
                server {
                    listen 127.0.0.1:{PORT};
                    ssl_preread on;
                    deny $blocked;
                    limit_conn per_site 1;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        #expect(Self.send(Self.hello(sni: "evil.test"), to: gateway.port) == "")
        #expect(Self.send(Self.hello(sni: "good.test"), to: gateway.port) == "in\n")
        // Two at once for one site: the second is over the limit; another site is not.
        let first = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, timeout: 3)
        first.setTimeout(5)
        try first.send(Self.hello(sni: "busy.test"))
        #expect(try first.receive() == Array("in\n".utf8))
        #expect(Self.send(Self.hello(sni: "busy.test"), to: gateway.port) == "")
        #expect(Self.send(Self.hello(sni: "quiet.test"), to: gateway.port) == "in\n")
        first.close()
        let audit = await gateway.waitForLines(of: "audit.log") { $0.count >= 2 }
        let objects = audit.compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        #expect(objects.count == 2, "\(audit)")
        #expect(objects.contains {
            ($0["phase"] as? String) == "access" && ($0["rule"] as? [String: Any])?["text"] as? String == "deny $blocked;"
                && ($0["variable"] as? [String: Any])?["value"] as? String == "1"
        }, "\(audit)")
        #expect(objects.contains {
            ($0["phase"] as? String) == "limit_conn" && ($0["limit"] as? [String: Any])?["key"] as? String == "busy.test"
        }, "\(audit)")
        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= 5 }
        #expect(lines.contains("403 evil.test") && lines.contains("503 busy.test") && lines.contains("200 quiet.test"), "\(lines)")
        await gateway.stop()
    }
}
