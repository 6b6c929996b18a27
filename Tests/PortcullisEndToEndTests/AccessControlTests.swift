#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

@Suite("Access control", .serialized)
struct AccessControlTests {
    @Test("audit_log in a server: its refusals go to its own file (with its own sample= cap), not the stream's; audit_log off in a UDP server writes none; the stream's file serves the rest")
    func perServerAuditLog() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                audit_log {DIR}/stream-audit.log;
                server {
                    listen 127.0.0.1:{PORT};
                    audit_log {DIR}/billing-audit.log sample=2/s;
                    deny 127.0.0.3;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
                server {
                    listen 127.0.0.1:{PORT} udp;
                    audit_log off;
                    deny all;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        for _ in 0..<5 {
            let denied = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.3")
            #expect(denied.isClosedByPeer())
        }
        let udp = try UDPTestSocket(bind: "127.0.0.1")
        try udp.send(Array("x".utf8), to: "127.0.0.1", gateway.port)
        let billing = await gateway.waitForLines(of: "billing-audit.log", timeout: 3) { $0.count >= 2 }
        try await Task.sleep(for: .milliseconds(300))
        gateway.gateway.flushLogs()
        // sample=2/s: two lines within the second, the other three counted in the summary that
        // comes when the second is up (or at the latest when the logs are flushed).
        let refusals = billing.filter { $0.contains("\"phase\":\"access\"") }
        #expect(refusals.count == 2 && refusals.allSatisfy { $0.contains("\"client\":\"127.0.0.3\"") }, "\(billing)")
        #expect(gateway.lines(of: "stream-audit.log").isEmpty, "the stream's audit log got \(gateway.lines(of: "stream-audit.log"))")
        await gateway.stop()
    }

    @Test("a denied client is closed, the upstream sees no connection, the audit log names the rule")
    func deniedClient() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format main '$remote_addr $status';
                access_log {DIR}/access.log main;
                audit_log {DIR}/audit.log;
                server {
                    listen 127.0.0.1:{PORT};
                    allow 127.0.0.1;
                    deny 127.0.0.2;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let denied = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.2")
        try? denied.send("let me in")
        #expect(denied.isClosedByPeer())
        let audit = await gateway.waitForLines(of: "audit.log") { !$0.isEmpty }
        try #require(audit.count == 1)
        let entry = try #require(try JSONSerialization.jsonObject(with: Data(audit[0].utf8)) as? [String: Any])
        #expect(entry["client"] as? String == "127.0.0.2")
        #expect(entry["status"] as? Int == 403)
        #expect(entry["phase"] as? String == "access")
        #expect(entry["protocol"] as? String == "TCP")
        #expect(entry["listener"] as? String == "127.0.0.1:\(gateway.port)")
        let rule = try #require(entry["rule"] as? [String: Any])
        #expect(rule["at"] as? String == "\(gateway.rulePath):8")
        #expect(rule["text"] as? String == "deny 127.0.0.2;")
        #expect(await gateway.waitForLines(of: "access.log") { !$0.isEmpty } == ["127.0.0.2 403"])
        // Give a wrongly-dialled upstream connection time to show up before checking.
        try await Task.sleep(for: .milliseconds(200))
        #expect(upstream.connectionCount == 0)
        await gateway.stop()
    }

    @Test("access_log if= skips a session whose condition is empty or \"0\" (here: no upstream was used)")
    func conditionalAccessLog() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format main '$remote_addr $status';
                access_log {DIR}/all.log main;
                access_log {DIR}/relayed.log main if=$upstream_addr;
                access_log {DIR}/received.log main if=$bytes_received;
                server {
                    listen 127.0.0.1:{PORT};
                    deny 127.0.0.2;
                    allow all;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let denied = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.2")
        #expect(denied.isClosedByPeer())
        let silent = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.3")
        usleep(100_000)
        silent.close()  // relayed, but sent nothing: $bytes_received is "0"
        let talker = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.4")
        try talker.send("hi")
        #expect(try talker.receive(exactly: 2) == Array("hi".utf8))
        talker.close()
        let all = await gateway.waitForLines(of: "all.log") { $0.count >= 3 }
        #expect(Set(all) == ["127.0.0.2 403", "127.0.0.3 200", "127.0.0.4 200"])
        #expect(Set(gateway.lines(of: "relayed.log")) == ["127.0.0.3 200", "127.0.0.4 200"])
        #expect(gateway.lines(of: "received.log") == ["127.0.0.4 200"])
        await gateway.stop()
    }

    @Test("rules decide per client address, first match wins, stream rules apply to servers without their own")
    func perAddressRules() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                allow 127.0.0.1;
                deny 127.0.0.3;
                allow 127.0.0.0/24;
                deny all;
                server { listen 127.0.0.1:{PORT}; proxy_pass 127.0.0.1:\(upstream.port); }
            }
            """)
        let expectations: [(String, Bool)] = [
            ("127.0.0.1", true), ("127.0.0.3", false), ("127.0.0.4", true), ("127.0.0.254", true),
            ("127.0.1.1", false), ("127.1.2.3", false),
        ]
        for (source, allowed) in expectations {
            let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: source)
            try? client.send("ping")
            let reply = (try? client.receive(exactly: 4)) ?? []
            #expect((reply == Array("ping".utf8)) == allowed, "client \(source)")
            client.close()
        }
        await gateway.stop()
    }

    @Test("an IPv4 client on a dual-stack listener (::ffff:a.b.c.d) matches IPv4 rules: no bypass")
    func mappedClientMatchesIPv4Rules() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format main '$remote_addr $status';
                access_log {DIR}/access.log main;
                server {
                    listen [::]:{PORT} ipv6only=off;
                    deny 127.0.0.2;
                    deny 10.0.0.0/8;
                    allow all;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """, host: "::")
        let denied = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.2")
        try? denied.send("x")
        #expect(denied.isClosedByPeer())
        let allowed = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: "127.0.0.5")
        try allowed.send("y")
        #expect(try allowed.receive(exactly: 1) == [UInt8(ascii: "y")])
        allowed.close()
        let v6 = try TestConnection.connect(to: "::1", port: gateway.port)
        try v6.send("z")
        #expect(try v6.receive(exactly: 1) == [UInt8(ascii: "z")])
        v6.close()
        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= 3 }
        #expect(Set(lines) == ["::ffff:127.0.0.2 403", "::ffff:127.0.0.5 200", "::1 200"])
        await gateway.stop()
    }
}
