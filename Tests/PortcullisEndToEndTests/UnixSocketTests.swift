#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisTestSupport

/// Issue #13 point 5: unix-domain sockets everywhere nginx has them: `listen unix:` (stream and
/// datagram), `proxy_pass unix:` and `server unix:` in upstream blocks, `allow`/`deny unix:`,
/// `set_real_ip_from unix:`, `$remote_addr` (`unix:`), geo (255.255.255.255). Checked against
/// nginx 1.22 on the same rule file: what each client receives, and the access log lines with
/// each side's folder written as {DIR}.
@Suite("unix-domain sockets", .serialized)
struct UnixSocketTests {
    static func rules(upstream: String) -> String {
        """
        stream {
            error_log {DIR}/error.log info;
            log_format l '$remote_addr|$remote_port|$server_addr|$server_port|$protocol|$status|$upstream_addr|$binary_remote_addr|$g';
            access_log {DIR}/access.log l;
            geo $g { default d; 255.255.255.255 bcast; 127.0.0.0/8 lo; }
            upstream group { server unix:\(upstream); }
            # Address rules never match a unix client; only unix: and all do.
            server {
                listen unix:{DIR}/ip-rules.sock;
                allow 0.0.0.0/0;
                allow ::/0;
                deny all;
                return "in";
            }
            server {
                listen unix:{DIR}/unix-only.sock;
                listen 127.0.0.1:{PORT};
                allow unix:;
                deny all;
                proxy_pass group;
            }
            server {
                listen unix:{DIR}/realip.sock proxy_protocol;
                set_real_ip_from unix:;
                return "$remote_addr:$remote_port $realip_remote_addr $g";
            }
            server {
                listen unix:{DIR}/untrusted.sock proxy_protocol;
                set_real_ip_from 127.0.0.1;
                return "$remote_addr $proxy_protocol_addr";
            }
        }
        """
    }

    /// What each client receives, by name.
    static func probe(folder: String, port: UInt16) throws -> [String: String] {
        func ask(_ host: String, port: UInt16 = 0, from source: String? = nil, send: String? = nil) throws -> String {
            let connection = try TestConnection.connect(to: host, port: port, from: source, timeout: 3)
            connection.setTimeout(5)
            if let send { try connection.send(send) }
            defer { connection.close() }
            return String(decoding: (try? connection.receiveAll(limit: 4096)) ?? [], as: UTF8.self)
        }
        let named = folder + "/named-client.sock"
        unlink(named)
        defer { unlink(named) }
        return [
            "ip-rules": try ask("unix:\(folder)/ip-rules.sock"),
            "unix-only": try ask("unix:\(folder)/unix-only.sock"),
            "unix-only, named client": try ask("unix:\(folder)/unix-only.sock", from: "unix:" + named),
            "unix-only over tcp": try ask("127.0.0.1", port: port),
            "realip": try ask("unix:\(folder)/realip.sock", send: "PROXY TCP4 192.0.2.1 198.51.100.2 1111 2222\r\n"),
            "untrusted": try ask("unix:\(folder)/untrusted.sock", send: "PROXY TCP4 192.0.2.1 198.51.100.2 1111 2222\r\n"),
        ]
    }

    @Test("listen unix:, allow unix:, proxy_pass to a unix upstream, set_real_ip_from unix:, geo 255.255.255.255: the same answers and log lines as nginx")
    func streamSameAsNginx() async throws {
        let upstreamFolder = try makeTemporaryDirectory("portcullis-unix-upstream")
        defer { try? FileManager.default.removeItem(at: upstreamFolder) }
        let upstreamPath = upstreamFolder.path + "/up.sock"
        let upstream = try TestServer(host: "unix:" + upstreamPath) { connection in
            try? connection.send("from the unix upstream")
            connection.close()
        }
        defer { upstream.stop() }
        let rules = Self.rules(upstream: upstreamPath)
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        let theirs = try Self.probe(folder: nginx.directory.path, port: nginx.port)
        let ours = try Self.probe(folder: gateway.directory.path, port: gateway.port)
        #expect(theirs == [
            "ip-rules": "", "unix-only": "from the unix upstream", "unix-only, named client": "from the unix upstream",
            "unix-only over tcp": "", "realip": "192.0.2.1:1111 unix: d", "untrusted": "unix: 192.0.2.1",
        ], "nginx: \(theirs)")
        #expect(ours == theirs)

        func normalized(_ lines: [String], _ folder: String) -> Set<String> {
            Set(lines.map { $0.replacingOccurrences(of: folder, with: "{DIR}") })
        }
        let theirLines = normalized(await nginx.waitForLogLines { $0.count >= 6 }, nginx.directory.path)
        let ourLines = normalized(await gateway.waitForLines(of: "access.log") { $0.count >= 6 }, gateway.directory.path)
        #expect(theirLines == [
            "unix:||unix:{DIR}/ip-rules.sock||TCP|403|-|unix:|bcast",
            "unix:||unix:{DIR}/unix-only.sock||TCP|200|unix:\(upstreamPath)|unix:|bcast",
            "unix:{DIR}/named-client.sock||unix:{DIR}/unix-only.sock||TCP|200|unix:\(upstreamPath)|unix:{DIR}/named-client.sock|bcast",
            "127.0.0.1|\(theirLines.first { $0.hasPrefix("127.0.0.1|") }?.split(separator: "|")[1] ?? "?")|127.0.0.1|\(nginx.port)|TCP|403|-|\u{5C}x7F\u{5C}x00\u{5C}x00\u{5C}x01|lo",
            "192.0.2.1|1111|unix:{DIR}/realip.sock||TCP|200|-|\u{5C}xC0\u{5C}x00\u{5C}x02\u{5C}x01|d",
            "unix:||unix:{DIR}/untrusted.sock||TCP|200|-|unix:|bcast",
        ], "nginx: \(theirLines.sorted())")
        // The TCP client's port and the listen port differ between the two runs.
        func withoutTCP(_ lines: Set<String>) -> Set<String> { lines.filter { !$0.hasPrefix("127.0.0.1|") } }
        #expect(withoutTCP(ourLines) == withoutTCP(theirLines), "Portcullis: \(ourLines.sorted())")
        #expect(ourLines.contains { $0.hasPrefix("127.0.0.1|") && $0.hasSuffix("|127.0.0.1|\(gateway.port)|TCP|403|-|\u{5C}x7F\u{5C}x00\u{5C}x00\u{5C}x01|lo") },
                "\(ourLines.sorted())")
        let errors = await gateway.waitForLines(of: "error.log") { $0.contains { $0.contains("access forbidden") } }
        #expect(errors.contains { $0.contains("access forbidden by rule") && $0.contains("client: unix:, server: unix:\(gateway.directory.path)/ip-rules.sock") },
                "\(errors.suffix(8))")
        await gateway.stop()
    }

    @Test("listen unix: udp: a path-bound client gets its answers; to a unix client nginx and Portcullis send PROXY UNKNOWN upstream; the same as nginx")
    func datagramsAndProxyHeaderSameAsNginx() async throws {
        let upstreamFolder = try makeTemporaryDirectory("portcullis-unix-upstream")
        defer { try? FileManager.default.removeItem(at: upstreamFolder) }
        let firstLines = Mutex<[String]>([])
        let upstream = try TestServer { connection in
            var line: [UInt8] = []
            while line.suffix(2) != [13, 10], let chunk = try? connection.receive(max: 1), !chunk.isEmpty { line += chunk }
            firstLines.withLock { $0.append(String(decoding: line, as: UTF8.self)) }
            // The client's "hello" too, so the session's byte count does not depend on who closes first.
            _ = try? connection.receive(exactly: 5)
            connection.close()
        }
        defer { upstream.stop() }
        let rules = """
            stream {
                log_format l '$remote_addr|$server_addr|$protocol|$status|$bytes_received';
                access_log {DIR}/access.log l;
                server {
                    listen unix:{DIR}/d.sock udp;
                    return "$remote_addr|$server_addr|$protocol";
                }
                server {
                    listen unix:{DIR}/s.sock;
                    listen 127.0.0.1:{PORT};
                    proxy_protocol on;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """
        func probe(_ folder: String) throws -> [String] {
            let clientPath = folder + "/client.sock"
            unlink(clientPath)
            defer { unlink(clientPath) }
            let client = try UDPTestSocket(bind: "unix:" + clientPath)
            var answers: [String] = []
            for _ in 0..<2 {
                try client.send(Array("q".utf8), to: "unix:\(folder)/d.sock", 0)
                answers.append(String(decoding: client.receive(timeout: 3) ?? [], as: UTF8.self).replacingOccurrences(of: folder, with: "{DIR}"))
            }
            let connection = try TestConnection.connect(to: "unix:\(folder)/s.sock", port: 0, timeout: 3)
            try connection.send("hello")
            _ = try? connection.receiveAll(limit: 100)
            connection.close()
            return answers
        }
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        let theirs = try probe(nginx.directory.path)
        let ours = try probe(gateway.directory.path)
        #expect(theirs == Array(repeating: "unix:{DIR}/client.sock|unix:{DIR}/d.sock|UDP", count: 2), "nginx: \(theirs)")
        #expect(ours == theirs)
        #expect(firstLines.withLock { $0 } == ["PROXY UNKNOWN\r\n", "PROXY UNKNOWN\r\n"], "\(firstLines.withLock { $0 })")
        let theirLines = await nginx.waitForLogLines { $0.count >= 3 }.map { $0.replacingOccurrences(of: nginx.directory.path, with: "{DIR}") }
        let ourLines = await gateway.waitForLines(of: "access.log") { $0.count >= 3 }.map { $0.replacingOccurrences(of: gateway.directory.path, with: "{DIR}") }
        #expect(Set(theirLines) == Set(ourLines), "nginx \(theirLines), Portcullis \(ourLines)")
        await gateway.stop()
    }

    @Test("the socket file: mode 0666, removed at exit; a stale one (its listener gone) is replaced; a regular file in the way is an error that names the path")
    func socketFile() async throws {
        let folder = try makeTemporaryDirectory("portcullis-unix-file")
        defer { try? FileManager.default.removeItem(at: folder) }
        let path = folder.path + "/gw.sock"
        // A socket left behind by a process that is gone: bound, then closed without unlink.
        let stale = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var (address, length) = makeAddress("unix:" + path, 0)
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(stale, $0, length) } }
        close(stale)
        #expect(FileManager.default.fileExists(atPath: path))
        let rules = "stream { server { listen unix:\(path); listen 127.0.0.1:{PORT}; return ok; } }"
        let gateway = try await GatewayHarness.start(rules)
        var status = stat()
        #expect(lstat(path, &status) == 0 && status.st_mode & 0o777 == 0o666, "mode \(String(status.st_mode & 0o777, radix: 8))")
        let connection = try TestConnection.connect(to: "unix:" + path, port: 0, timeout: 3)
        #expect(String(decoding: try connection.receiveAll(limit: 10), as: UTF8.self) == "ok")
        connection.close()
        await gateway.stop()
        #expect(!FileManager.default.fileExists(atPath: path), "the socket file is removed at exit")

        try "not a socket".write(toFile: path, atomically: true, encoding: .utf8)
        await #expect(throws: (any Error).self) { _ = try await GatewayHarness.start(rules) }
        do {
            _ = try await GatewayHarness.start(rules)
        } catch {
            #expect("\(error)".contains("cannot listen on unix:\(path)") && "\(error)".contains("Address already in use"), "\(error)")
        }
        #expect((try? String(contentsOfFile: path, encoding: .utf8)) == "not a socket", "a regular file is never removed")
    }

    @Test("udp to a unix datagram upstream: the gateway's socket is autobound, so the upstream's answers come back (nginx's unbound socket gets none)")
    func datagramUpstreamAnswers() async throws {
        let folder = try makeTemporaryDirectory("portcullis-unix-dgram")
        defer { try? FileManager.default.removeItem(at: folder) }
        let upstream = try UDPTestSocket(bind: "unix:\(folder.path)/up.sock")
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format l '$status $upstream_addr $bytes_sent';
                access_log {DIR}/access.log l;
                server { listen 127.0.0.1:{PORT} udp; proxy_responses 1; proxy_pass unix:\(folder.path)/up.sock; }
            }
            """)
        let client = try UDPTestSocket(bind: "127.0.0.1")
        try client.connect("127.0.0.1", gateway.port)
        try client.send(Array("ping".utf8))
        let got = try #require(upstream.receiveFrom(timeout: 3))
        #expect(got.bytes == Array("ping".utf8))
        #expect(got.host.hasPrefix("unix:"), "the upstream saw \(got.host)")
        try upstream.replyToLastSender(Array("pong".utf8))
        #expect(client.receive(timeout: 3) == Array("pong".utf8))
        let lines = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        #expect(lines == ["200 unix:\(folder.path)/up.sock 4"], "\(lines)")
        await gateway.stop()
    }

    @Test("listen unix: udp with proxy_pass: a path-bound client's datagrams are one session (one upstream port) and its answers come back; an unnamed client's are a session each, as in nginx")
    func datagramSessions() async throws {
        let upstream = try UDPTestSocket(bind: "127.0.0.1")
        let gateway = try await GatewayHarness.start("""
            stream {
                server { listen unix:{DIR}/d.sock udp; proxy_timeout 2s; proxy_pass 127.0.0.1:\(upstream.localPort); }
                server { listen 127.0.0.1:{PORT}; return x; }
            }
            """)
        let target = "unix:" + gateway.path("d.sock")
        let named = try UDPTestSocket(bind: "unix:" + gateway.path("named.sock"))
        var upstreamPorts: [UInt16] = []
        for i in 0..<3 {
            try named.send(Array("n\(i)".utf8), to: target, 0)
            let got = try #require(upstream.receiveFrom(timeout: 3))
            upstreamPorts.append(got.port)
            try upstream.send(got.bytes + Array("!".utf8), to: got.host, got.port)
            #expect(named.receive(timeout: 3) == Array("n\(i)!".utf8))
        }
        #expect(Set(upstreamPorts).count == 1, "one session for the named client: \(upstreamPorts)")
        let unnamed = try UDPTestSocket(bind: "unix:")  // autobound: an abstract name, no path
        var unnamedPorts: Set<UInt16> = []
        for i in 0..<2 {
            try unnamed.send(Array("u\(i)".utf8), to: target, 0)
            unnamedPorts.insert(try #require(upstream.receiveFrom(timeout: 3)).port)
        }
        #expect(unnamedPorts.count == 2 && unnamedPorts.isDisjoint(with: upstreamPorts), "a session per datagram: \(unnamedPorts)")
        await gateway.stop()
    }
}
