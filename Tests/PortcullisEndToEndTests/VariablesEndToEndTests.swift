#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

/// geo / map / geoip2 / `deny $var` / `proxy_pass $var` over real loopback sockets. Clients are
/// presented as chosen addresses with PROXY v1 headers from a trusted 127.0.0.1.
///
/// Addresses in data/country.mmdb, checked with
/// `mmdblookup --file data/country.mmdb --ip ADDR country iso_code`:
/// 1.0.1.1 CN, 2a02:6b8::1 RU, 8.8.8.8 US, 193.0.0.1 NL; 198.51.100.0/24 and 192.0.2.0/24 not found.
@Suite("Variables, end to end", .serialized)
struct VariablesEndToEndTests {
    static let countryDB = packageRoot.appendingPathComponent("data/country.mmdb").path
    static func geoipFixture(_ name: String) -> String {
        packageRoot.appendingPathComponent("Tests/Fixtures/geoip/\(name)").path
    }

    /// Connects, presents `source` in a PROXY v1 header, sends `payload`, and reads until EOF or
    /// `limit` bytes (default: the payload's length). nil when the gateway closed the connection
    /// without sending anything (refused).
    static func exchange(_ source: String, port: UInt16, payload: String = "ping", limit: Int? = nil) throws -> String? {
        let client = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 5)
        defer { client.close() }
        let v6 = source.contains(":")
        let header = "PROXY \(v6 ? "TCP6" : "TCP4") \(source) \(v6 ? "::1" : "127.0.0.1") 40000 \(port)\r\n"
        do {
            try client.send(header + payload)
            let bytes = try client.receiveAll(limit: limit ?? payload.utf8.count)
            return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
        } catch TestSocketError.system(_, let code) where code == ECONNRESET || code == EPIPE {
            return nil
        }
    }

    /// The 1-based line of the first line of `text` containing `needle`.
    static func line(of needle: String, in text: String) -> Int? {
        text.split(separator: "\n", omittingEmptySubsequences: false).firstIndex { $0.contains(needle) }.map { $0 + 1 }
    }

    static func json(_ line: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
    }

    /// Replaces `path` atomically by renaming a full copy of `source` over it (the safe way to
    /// publish a new database).
    static func publish(_ source: String, over path: String) throws {
        let staging = path + ".staging"
        try? FileManager.default.removeItem(atPath: staging)
        try FileManager.default.copyItem(atPath: source, toPath: staging)
        guard rename(staging, path) == 0 else { throw HarnessError("rename \(staging) → \(path): errno \(errno)") }
    }

    @Test("geoip2 + map + deny $bad_country: CN and RU refused before any upstream contact, audited with the variable")
    func denyByCountry() async throws {
        let upstream = try TestServer.echo()
        let rules = """
            error_log {DIR}/error.log info;
            stream {
                audit_log {DIR}/audit.log;
                log_format main '$remote_addr $country [$bad_country] $status';
                access_log {DIR}/access.log main;
                geoip2 \(Self.countryDB) {
                    $country default=-- country iso_code;
                }
                map $country $bad_country {
                    CN CN;
                    RU RU;
                    default "";
                }
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    allow 198.51.100.0/24;
                    deny $bad_country;
                    allow all;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """
        let denyLine = try #require(Self.line(of: "deny $bad_country;", in: rules))
        let gateway = try await GatewayHarness.start(rules)

        #expect(try Self.exchange("1.0.1.1", port: gateway.port) == nil)
        #expect(try Self.exchange("2a02:6b8::1", port: gateway.port) == nil)
        #expect(try Self.exchange("8.8.8.8", port: gateway.port) == "ping")
        #expect(try Self.exchange("193.0.0.1", port: gateway.port) == "ping")
        #expect(try Self.exchange("198.51.100.7", port: gateway.port) == "ping")

        let audit = await gateway.waitForLines(of: "audit.log") { $0.count >= 2 }
        try #require(audit.count == 2, "\(audit)")
        let byClient = try Dictionary(uniqueKeysWithValues: audit.map { line in
            let entry = try Self.json(line)
            return (entry["client"] as? String ?? "?", (line, entry))
        })
        for (client, country) in [("1.0.1.1", "CN"), ("2a02:6b8::1", "RU")] {
            let (line, entry) = try #require(byClient[client], "no audit line for \(client): \(audit)")
            #expect(line.contains(#""variable":{"name":"$bad_country","value":"\#(country)"}"#), "\(line)")
            #expect(entry["status"] as? Int == 403)
            #expect(entry["phase"] as? String == "access")
            #expect((entry["peer"] as? String)?.hasPrefix("127.0.0.1:") == true)  // the PROXY sender
            let rule = try #require(entry["rule"] as? [String: Any])
            #expect(rule["at"] as? String == "\(gateway.rulePath):\(denyLine)")
            #expect(rule["line"] as? Int == denyLine)
            #expect(rule["text"] as? String == "deny $bad_country;")
        }

        let access = await gateway.waitForLines(of: "access.log") { $0.count >= 5 }
        #expect(Set(access) == [
            "1.0.1.1 CN [CN] 403", "2a02:6b8::1 RU [RU] 403", "8.8.8.8 US [] 200", "193.0.0.1 NL [] 200",
            "198.51.100.7 -- [] 200",
        ])
        let errors = await gateway.waitForLines(of: "error.log") { lines in
            lines.filter { $0.contains("access forbidden by rule") }.count >= 2
        }
        #expect(errors.contains { $0.contains("access forbidden by rule") && $0.contains("client: 1.0.1.1") }, "\(errors)")
        #expect(errors.contains { $0.contains("access forbidden by rule") && $0.contains("client: 2a02:6b8::1") }, "\(errors)")
        try await Task.sleep(for: .milliseconds(100))
        #expect(upstream.connectionCount == 3)  // only the allowed clients reached it
        await gateway.stop()
        upstream.stop()
    }

    @Test("proxy_pass $backend picks an upstream block or ADDRESS:PORT per client through a map")
    func proxyPassByVariable() async throws {
        func tagged(_ tag: String) throws -> TestServer {
            try TestServer { connection in
                while let chunk = try? connection.receive(), !chunk.isEmpty {
                    try? connection.send(Array("\(tag):".utf8) + chunk)
                }
                connection.close()
            }
        }
        let a = try tagged("A")
        let b = try tagged("B")
        let gateway = try await GatewayHarness.start("""
            stream {
                audit_log {DIR}/audit.log;
                log_format up '$remote_addr $backend $upstream_addr $status';
                access_log {DIR}/access.log up;
                upstream pool_a { server 127.0.0.1:\(a.port); }
                map $remote_addr $backend {
                    198.51.100.1 pool_a;
                    198.51.100.2 127.0.0.1:\(b.port);
                    2001:db8::2 127.0.0.1:\(b.port);
                    default unknown.invalid:80;
                }
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    proxy_pass $backend;
                }
            }
            """)
        #expect(try Self.exchange("198.51.100.1", port: gateway.port, limit: 6) == "A:ping")
        #expect(try Self.exchange("198.51.100.2", port: gateway.port, limit: 6) == "B:ping")
        #expect(try Self.exchange("2001:db8::2", port: gateway.port, limit: 6) == "B:ping")
        #expect(try Self.exchange("192.0.2.1", port: gateway.port, limit: 6) == nil)
        let access = await gateway.waitForLines(of: "access.log") { $0.count >= 4 }
        #expect(Set(access) == [
            "198.51.100.1 pool_a 127.0.0.1:\(a.port) 200",
            "198.51.100.2 127.0.0.1:\(b.port) 127.0.0.1:\(b.port) 200",
            "2001:db8::2 127.0.0.1:\(b.port) 127.0.0.1:\(b.port) 200",
            "192.0.2.1 unknown.invalid:80 - 502",
        ])
        let audit = await gateway.waitForLines(of: "audit.log") { !$0.isEmpty }
        try #require(audit.count == 1, "\(audit)")
        let entry = try Self.json(audit[0])
        #expect(entry["status"] as? Int == 502)
        #expect(entry["phase"] as? String == "upstream_pick")
        #expect(a.connectionCount == 1)
        #expect(b.connectionCount == 2)
        await gateway.stop()
        a.stop()
        b.stop()
    }

    @Test("an access_log format prints geo values (CIDR and ranges) of the realip client")
    func geoInAccessLog() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                geo $geo_country {
                    default ZZ;
                    198.51.100.0/24 NL;
                    198.51.100.128/25 BE;
                    203.0.113.0/24 DE;
                    2001:db8::/32 JP;
                }
                geo $office {
                    ranges;
                    default remote;
                    198.51.100.10-198.51.100.20 amsterdam;
                    198.51.100.15-198.51.100.15 desk-15;
                }
                log_format geo '$remote_addr $geo_country $office';
                access_log {DIR}/access.log geo;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let clients = ["198.51.100.12", "198.51.100.15", "198.51.100.30", "198.51.100.200", "203.0.113.5",
                       "2001:db8::9", "192.0.2.1"]
        for client in clients {
            #expect(try Self.exchange(client, port: gateway.port) == "ping", "client \(client)")
        }
        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= clients.count }
        #expect(Set(lines) == [
            "198.51.100.12 NL amsterdam", "198.51.100.15 NL desk-15", "198.51.100.30 NL remote",
            "198.51.100.200 BE remote", "203.0.113.5 DE remote", "2001:db8::9 JP remote", "192.0.2.1 ZZ remote",
        ])
        await gateway.stop()
        upstream.stop()
    }

    @Test("geoip2 auto_reload: a database renamed into place is used within ~2 s; a broken one is refused and the old one kept")
    func autoReload() async throws {
        let upstream = try TestServer.echo()
        let databases = try makeTemporaryDirectory("portcullis-geoip-reload")
        defer { try? FileManager.default.removeItem(at: databases) }
        let db = databases.appendingPathComponent("db.mmdb").path
        try FileManager.default.copyItem(atPath: Self.geoipFixture("types.mmdb"), toPath: db)
        let gateway = try await GatewayHarness.start("""
            error_log {DIR}/error.log info;
            stream {
                log_format cc '$remote_addr $cc $status';
                access_log {DIR}/access.log cc;
                geoip2 \(db) {
                    auto_reload 100ms;
                    $cc default=-- country iso_code;
                }
                map $cc $blocked {
                    NL 1;
                    default 0;
                }
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    deny $blocked;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)

        // types.mmdb: 1.2.3.0/24 is NL (refused), 1.2.4.0/24 DE.
        #expect(try Self.exchange("1.2.3.4", port: gateway.port) == nil)
        #expect(try Self.exchange("1.2.4.5", port: gateway.port) == "ping")
        let loaded = await gateway.waitForLines(of: "error.log") { $0.contains { $0.contains("loaded, build epoch 1700000000") } }
        #expect(loaded.contains { $0.contains("[info]") && $0.contains("geoip2 \"\(db)\" loaded, build epoch 1700000000") }, "\(loaded)")

        // types-v2.mmdb: 1.2.3.0/24 is BE.
        try Self.publish(Self.geoipFixture("types-v2.mmdb"), over: db)
        let published = Date()
        var passed = false
        while Date().timeIntervalSince(published) < 2.5 {
            if try Self.exchange("1.2.3.4", port: gateway.port) == "ping" {
                passed = true
                break
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(passed, "1.2.3.4 still refused \(Date().timeIntervalSince(published)) s after the new database was published")
        let reloaded = await gateway.waitForLines(of: "error.log") { $0.contains { $0.contains("build epoch 1700000100") } }
        #expect(reloaded.contains { $0.contains("geoip2 \"\(db)\" reloaded, build epoch 1700000100") }, "\(reloaded)")

        // A truncated file: refused, logged, and the BE database keeps answering.
        try Self.publish(Self.geoipFixture("truncated.mmdb"), over: db)
        let failed = await gateway.waitForLines(of: "error.log", timeout: 3) { $0.contains { $0.contains("was not reloaded") } }
        let failure = failed.first { $0.contains("was not reloaded") }
        #expect(failure != nil, "\(failed)")
        #expect(failure?.contains(db) == true, "\(failed)")
        #expect(failure?.contains("[error]") == true, "\(failed)")
        for _ in 0..<3 {
            #expect(try Self.exchange("1.2.3.4", port: gateway.port) == "ping")
        }
        #expect(try Self.exchange("1.2.4.5", port: gateway.port) == "ping")

        let access = await gateway.waitForLines(of: "access.log") { $0.filter { $0.hasPrefix("1.2.3.4 BE 200") }.count >= 4 }
        #expect(access.contains("1.2.3.4 NL 403"), "\(access)")
        #expect(access.filter { $0 == "1.2.3.4 BE 200" }.count >= 4, "\(access)")
        #expect(!access.contains { $0.hasPrefix("1.2.3.4 -- ") }, "the broken file must never have answered: \(access)")
        await gateway.stop()
        upstream.stop()
    }
}
