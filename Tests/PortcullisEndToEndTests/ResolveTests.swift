#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

/// Issue #13 point 3: `resolver` and `server NAME resolve` (nginx 1.27.3): the name is
/// re-resolved in the background, servers join and leave as a real DNS server (dnsmasq, whose
/// answers the test changes) says, and a session on a server that left is not dropped.
@Suite("resolve", .serialized)
struct ResolveTests {
    /// Answers each connection with its name, then echoes until EOF.
    static func backend(_ name: String, host: String, port: UInt16 = 0) throws -> TestServer {
        try TestServer(host: host, port: port) { connection in
            try? connection.send(name)
            while let chunk = try? connection.receive(), !chunk.isEmpty { try? connection.send(chunk) }
            connection.close()
        }
    }

    static func ask(_ port: UInt16) -> String {
        guard let connection = try? TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3) else { return "(no connect)" }
        connection.setTimeout(3)
        defer { connection.close() }
        return String(decoding: (try? connection.receive()) ?? [], as: UTF8.self)
    }

    static func waitFor(_ port: UInt16, _ expected: Set<String>, timeout: Double = 8) async -> Set<String> {
        let deadline = Date().addingTimeInterval(timeout)
        var seen: Set<String> = []
        while Date() < deadline {
            seen = Set((0..<6).map { _ in ask(port) })
            if seen == expected { return seen }
            try? await Task.sleep(for: .milliseconds(100))
        }
        return seen
    }

    @Test("server backend.test resolve: the servers follow dnsmasq's answers (one, another, both, none), a session on a server that left goes on, each change is one error-log line")
    func followsTheAnswers() async throws {
        let a = try Self.backend("A", host: "127.0.0.21")
        defer { a.stop() }
        let b = try Self.backend("B", host: "127.0.0.22", port: a.port)
        defer { b.stop() }
        let folder = try makeTemporaryDirectory("portcullis-resolve")
        defer { try? FileManager.default.removeItem(at: folder) }
        let hosts = folder.appendingPathComponent("hosts").path
        func answer(_ lines: String) throws { try lines.write(toFile: hosts, atomically: true, encoding: .utf8) }
        try answer("127.0.0.21 backend.test\n")
        // --local=/test/: names under test. that it does not know are NXDOMAIN, not REFUSED.
        let dns = try DNSMasq.start(logQueries: false, arguments: ["--addn-hosts=\(hosts)", "--local-ttl=1", "--local=/test/"])
        defer { dns.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log notice;
                resolver 127.0.0.1:\(dns.port) valid=1s ipv6=off;  # valid=: NXDOMAIN is asked again after 1 s, not 10
                resolver_timeout 2s;
                upstream app {
                    zone app 64k;
                    server backend.test:\(a.port) resolve;
                }
                server { listen 127.0.0.1:{PORT}; proxy_pass app; }
            }
            """)
        // (The first answer can take a resend on a loaded machine: a longer first wait.)
        #expect(await Self.waitFor(gateway.port, ["A"], timeout: 20) == ["A"], "\(gateway.lines(of: "error.log").suffix(6))")
        // A session on A stays open through the change.
        let long = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, timeout: 3)
        long.setTimeout(5)
        #expect(try long.receive() == Array("A".utf8))

        try answer("127.0.0.22 backend.test\n")
        dns.reload()
        #expect(await Self.waitFor(gateway.port, ["B"]) == ["B"], "A left, B joined")
        try long.send("still here")
        #expect(try long.receive() == Array("still here".utf8), "the session on the server that left goes on")
        long.close()

        try answer("127.0.0.21 backend.test\n127.0.0.22 backend.test\n")
        dns.reload()
        #expect(await Self.waitFor(gateway.port, ["A", "B"]) == ["A", "B"])

        try answer("")
        dns.reload()
        #expect(await Self.waitFor(gateway.port, [""]) == [""], "no addresses: no live upstreams")

        // The name server goes away: the servers of the last answer stay.
        try answer("127.0.0.21 backend.test\n127.0.0.22 backend.test\n")
        dns.reload()
        #expect(await Self.waitFor(gateway.port, ["A", "B"]) == ["A", "B"])
        dns.stop()
        _ = await gateway.waitForLines(of: "error.log", timeout: 8) { $0.contains { $0.contains("(110: Operation timed out)") } }
        #expect(await Self.waitFor(gateway.port, ["A", "B"], timeout: 2) == ["A", "B"], "a lookup that failed keeps the servers")
        let lines = gateway.lines(of: "error.log")
        #expect(lines.contains { $0.contains("backend.test could not be resolved (110: Operation timed out), in upstream \"app\"") }, "\(lines)")
        // Each change is said once: no line twice in a row.
        let changes = lines.filter { $0.contains("resolves to it") }.map { $0.components(separatedBy: "]").last ?? $0 }
        #expect(zip(changes, changes.dropFirst()).allSatisfy { $0 != $1 }, "\(changes)")
        let site = "upstream \"app\": 127.0.0.21:\(a.port)"
        #expect(lines.contains { $0.contains("\(site) added, \"backend.test\" resolves to it") }, "\(lines)")
        #expect(lines.contains { $0.contains("\(site) removed, \"backend.test\" no longer resolves to it") }, "\(lines)")
        #expect(lines.contains { $0.contains("backend.test could not be resolved (3: Host not found), in upstream \"app\"") }, "\(lines)")
        await gateway.stop()
    }

    @Test("a name server that does not answer: one error line says so however often it is asked again, and the name has no servers yet (502, nothing dialled)")
    func silentResolverIsSaidOnce() async throws {
        let silent = try UDPTestSocket(bind: "127.0.0.1")  // receives the queries, never answers
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log notice;
                upstream app { zone app 64k; server backend.test:1 resolve; }
                server {
                    listen 127.0.0.1:{PORT};
                    proxy_pass app;
                }
                resolver 127.0.0.1:\(silent.localPort) valid=1s;
                resolver_timeout 500ms;
            }
            """)
        #expect(silent.receive(timeout: 3) != nil, "the query reached the name server")
        let lines = await gateway.waitForLines(of: "error.log", timeout: 5) { $0.contains { $0.contains("could not be resolved") } }
        #expect(lines.contains { $0.contains("backend.test could not be resolved (110: Operation timed out), in upstream \"app\"") }, "\(lines)")
        #expect(Self.ask(gateway.port) == "", "nothing resolved yet: no live upstreams (502)")
        // Asked again after resolver_timeout (at least 1 s), failing alike: said once, not per try.
        try await Task.sleep(for: .milliseconds(2_600))
        let repeated = gateway.lines(of: "error.log").filter { $0.contains("backend.test could not be resolved") }
        #expect(repeated.count == 1, "\(repeated)")
        var queries = 1  // A and AAAA per try: the first try's other query, then the later tries'
        while silent.receive(timeout: 0.2) != nil { queries += 1 }
        #expect(queries >= 4, "asked again meanwhile: \(queries) queries")
        await gateway.stop()
    }

    @Test("proxy_pass $var with a host name is resolved at run time with the resolver; a name that does not exist is nginx's 500 with its line; the same answers and log lines as nginx 1.22")
    func proxyPassVariableSameAsNginx() async throws {
        let backend = try Self.backend("A", host: "127.0.0.21")
        defer { backend.stop() }
        let folder = try makeTemporaryDirectory("portcullis-resolve")
        defer { try? FileManager.default.removeItem(at: folder) }
        let hosts = folder.appendingPathComponent("hosts").path
        try "127.0.0.21 backend.test\n".write(toFile: hosts, atomically: true, encoding: .utf8)
        let dns = try DNSMasq.start(logQueries: false, arguments: ["--addn-hosts=\(hosts)", "--local=/test/"])
        defer { dns.stop() }
        let rules = """
            stream {
                error_log {DIR}/error.log info;
                resolver 127.0.0.1:\(dns.port);
                log_format l '$remote_addr $status $upstream_addr';
                access_log {DIR}/access.log l;
                map $remote_addr $backend {
                    127.0.0.5   backend.test:\(backend.port);
                    127.0.0.6   missing.test:\(backend.port);
                    default     127.0.0.21:\(backend.port);
                }
                server { listen 127.0.0.1:{PORT}; proxy_pass $backend; }
            }
            """
        func probe(_ port: UInt16) throws -> [String] {
            try ["127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.5"].map { source in
                let connection = try TestConnection.connect(to: "127.0.0.1", port: port, from: source, timeout: 3)
                connection.setTimeout(5)
                defer { connection.close() }
                return String(decoding: (try? connection.receive()) ?? [], as: UTF8.self)
            }
        }
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        let theirs = try probe(nginx.port)
        #expect(theirs == ["A", "", "A", "A"], "nginx: \(theirs)")
        #expect(try probe(gateway.port) == theirs)
        let theirLines = await nginx.waitForLogLines { $0.count >= 4 }
        let ourLines = await gateway.waitForLines(of: "access.log") { $0.count >= 4 }
        #expect(Set(ourLines) == Set(theirLines), "Portcullis \(ourLines), nginx \(theirLines)")
        let ours = gateway.lines(of: "error.log")
        let line = "missing.test could not be resolved (3: Host not found), client: 127.0.0.6"
        #expect(nginx.lines(of: "error.log").contains { $0.contains(line) }, "nginx: \(nginx.lines(of: "error.log").suffix(6))")
        #expect(ours.contains { $0.contains(line) }, "\(ours.suffix(6))")
        await gateway.stop()
    }
}
