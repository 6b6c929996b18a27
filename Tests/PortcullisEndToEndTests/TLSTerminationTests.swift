#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

/// Issue #14 part 1: `listen … ssl` with the ssl_* directives, against `openssl s_client` and
/// curl as clients, and against nginx 1.22 on the same rule file (same replies, same log lines).
/// Certificates are made by the test (TestPKI).
@Suite("TLS termination", .serialized)
struct TLSTerminationTests {
    static let logFormat = "log_format tls '$status $ssl_protocol $ssl_server_name $ssl_alpn_protocol $ssl_client_verify $ssl_client_s_dn';"

    /// A server that answers from its handshake, as nginx's `return` does after TLS.
    static func answeringRules(_ pki: TestPKI, extra: String = "") -> String {
        """
        stream {
            error_log {DIR}/error.log info;
            \(logFormat)
            access_log {DIR}/access.log tls;
            server {
                listen 127.0.0.1:{PORT} ssl;
                ssl_certificate \(pki.path("server-ec.crt"));
                ssl_certificate_key \(pki.path("server-ec.key"));
                ssl_certificate \(pki.path("server-rsa.crt"));
                ssl_certificate_key \(pki.path("server-rsa.key"));
                # nginx 1.22's default lacks TLSv1.3; Portcullis's is nginx 1.23.4's (these two).
                ssl_protocols TLSv1.2 TLSv1.3;
                ssl_alpn h2 http/1.1;
                ssl_verify_client optional;
                ssl_client_certificate \(pki.path("ca.crt"));
                \(extra)
                return "hello $ssl_server_name $ssl_alpn_protocol\\n";
            }
        }
        """
    }

    /// What each client gets back, by name.
    static func probe(_ port: UInt16, _ pki: TestPKI) throws -> [String: String] {
        let clients: [(String, [String])] = [
            ("sni+alpn", ["-servername", "gateway.test", "-alpn", "http/1.1"]),
            ("plain", []),
            ("client-cert", ["-servername", "x.gateway.test", "-cert", pki.path("client.crt"), "-key", pki.path("client.key")]),
            ("stranger-cert", ["-cert", pki.path("stranger.crt"), "-key", pki.path("stranger.key")]),
            ("alpn-mismatch", ["-alpn", "imap"]),
        ]
        var replies: [String: String] = [:]
        for (name, arguments) in clients {
            replies[name] = try sClient(port: port, arguments + ["-verify_quiet"], timeout: 10).text
        }
        // Not TLS at all.
        let connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
        connection.setTimeout(5)
        try connection.send("GET / HTTP/1.1\r\n\r\n")
        replies["plaintext"] = String(decoding: (try? connection.receiveAll(limit: 4096)) ?? [], as: UTF8.self)
        connection.close()
        return replies
    }

    @Test("listen ssl: replies and $ssl_* log lines for SNI, ALPN, a client certificate, a stranger's certificate, an ALPN mismatch and a plaintext client are nginx's")
    func sameAsNginx() async throws {
        let pki = try TestPKI.shared()
        let rules = Self.answeringRules(pki)
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        let theirs = try Self.probe(nginx.port, pki)
        let ours = try Self.probe(gateway.port, pki)
        #expect(theirs["sni+alpn"] == "hello gateway.test http/1.1\n", "nginx: \(theirs)")
        #expect(theirs["client-cert"] == "hello x.gateway.test \n", "nginx: \(theirs)")
        #expect(ours == theirs)
        let count = 6
        let theirLines = await nginx.waitForLogLines { $0.count >= count }
        let ourLines = await gateway.waitForLines(of: "access.log") { $0.count >= count }
        #expect(theirLines.count == count, "nginx: \(theirLines)")
        #expect(Set(ourLines) == Set(theirLines), "ours: \(ourLines)\nnginx: \(theirLines)")
        #expect(ourLines.contains("200 TLSv1.3 x.gateway.test - SUCCESS CN=alice,O=Example"), "\(ourLines)")
        await gateway.stop()
    }

    @Test("an RSA and an ECDSA certificate in one server: the client's signature algorithms choose, as nginx")
    func certificateByKeyType() async throws {
        let pki = try TestPKI.shared()
        let rules = Self.answeringRules(pki)
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        for port in [nginx.port, gateway.port] {
            let rsa = try sClientReport(port: port, ["-sigalgs", "RSA-PSS+SHA256", "-tls1_3"])
            #expect(rsa.all.contains("Server public key is 2048 bit"), "\(port): \(rsa.all)")
            let ec = try sClientReport(port: port, ["-sigalgs", "ECDSA+SHA256", "-tls1_3"])
            #expect(ec.all.contains("Server public key is 256 bit"), "\(port): \(ec.all)")
        }
        await gateway.stop()
    }

    @Test("ssl_certificate with $ssl_server_name: each SNI gets its own certificate, loaded at the handshake; an unknown name fails the handshake with the path in the error log")
    func certificatePathWithVariables() async throws {
        let pki = try TestPKI.shared()
        let rules = """
            stream {
                error_log {DIR}/error.log info;
                \(Self.logFormat)
                access_log {DIR}/access.log tls;
                server {
                    listen 127.0.0.1:{PORT} ssl;
                    ssl_certificate \(pki.directory.path)/$ssl_server_name.crt;
                    ssl_certificate_key \(pki.directory.path)/$ssl_server_name.key;
                    ssl_protocols TLSv1.2 TLSv1.3;
                    return "ok\\n";
                }
            }
            """
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        for port in [nginx.port, gateway.port] {
            for name in ["a.test", "b.test"] {
                let report = try sClientReport(port: port, ["-servername", name])
                #expect(report.text.contains("subject=CN = \(name)"), "\(port) \(name): \(report.text)")
            }
            let unknown = try sClientReport(port: port, ["-servername", "nobody.test"])
            #expect(!unknown.text.contains("subject="), "\(port): \(unknown.text)")
        }
        // The client's name goes into a path: one that climbs out of the folder is refused
        // before any file is opened (nginx 1.22 would open it).
        let sneaky = try sClientReport(port: gateway.port, ["-servername", "x/../a.test"])
        #expect(!sneaky.all.contains("subject="), "\(sneaky.all)")
        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= 4 }
        #expect(lines.filter { $0.hasPrefix("200 TLSv1.3 a.test") || $0.hasPrefix("200 TLSv1.3 b.test") }.count == 2, "\(lines)")
        #expect(lines.contains { $0.hasPrefix("500 ") }, "\(lines)")
        let errors = gateway.lines(of: "error.log")
        #expect(errors.contains { $0.contains("cannot load certificate \"\(pki.directory.path)/nobody.test.crt\"") && $0.contains("while SSL handshaking") },
                "\(errors)")
        #expect(errors.contains { $0.contains("invalid server name \"x/../a.test\" for a certificate path") }, "\(errors)")
        await gateway.stop()
    }

    @Test("a failed handshake and a handshake timeout: one access-log line (500) and one audit line each, with the reason; the gateway goes on serving")
    func failuresAreOneLine() async throws {
        let pki = try TestPKI.shared()
        let rules = """
            stream {
                error_log {DIR}/error.log info;
                \(Self.logFormat)
                access_log {DIR}/access.log tls;
                audit_log {DIR}/audit.log;
                server {
                    listen 127.0.0.1:{PORT} ssl;
                    ssl_certificate \(pki.path("server-ec.crt"));
                    ssl_certificate_key \(pki.path("server-ec.key"));
                    ssl_handshake_timeout 300ms;
                    ssl_protocols TLSv1.3;
                    return "ok\\n";
                }
            }
            """
        let gateway = try await GatewayHarness.start(rules)
        // A silent client: closed at the handshake timeout.
        let silent = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, timeout: 3)
        silent.setTimeout(5)
        let started = Date()
        _ = try? silent.receiveAll(limit: 1024)
        let waited = Date().timeIntervalSince(started)
        #expect(waited > 0.2 && waited < 3, "closed after \(waited) s")
        silent.close()
        // TLS 1.2 only, against a TLSv1.3-only server: a protocol failure.
        let old = try sClientReport(port: gateway.port, ["-tls1_2"])
        #expect(old.all.contains("New, (NONE), Cipher is (NONE)"), "\(old.all)")
        // And a good client still gets its answer.
        let good = try sClient(port: gateway.port)
        #expect(good.text == "ok\n", "\(good)")
        let audit = await gateway.waitForLines(of: "audit.log") { $0.count >= 2 }
        #expect(audit.count == 2, "\(audit)")
        let objects = audit.compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        #expect(objects.count == 2, "every audit line is one JSON object: \(audit)")
        #expect(objects.contains { ($0["reason"] as? String) == "TLS handshake timed out" && ($0["phase"] as? String) == "ssl" }, "\(audit)")
        #expect(objects.contains { ($0["reason"] as? String)?.hasPrefix("TLS handshake failed: SSL_do_handshake() failed (SSL: error:") == true }, "\(audit)")
        let access = await gateway.waitForLines(of: "access.log") { $0.count >= 3 }
        // The silent client's line says the version being tried, as nginx's does.
        #expect(access.filter { $0.hasPrefix("500 ") }.count == 2, "\(access)")
        #expect(access.contains("500 TLSv1.3 - - NONE -"), "\(access)")
        #expect(access.contains("200 TLSv1.3 - - NONE -"), "\(access)")
        await gateway.stop()
    }

    @Test("session resumption: a ticket (the default) resumes and $ssl_session_reused says r; with tickets and the cache off it does not, as nginx")
    func sessionResumption() async throws {
        let pki = try TestPKI.shared()
        for (extra, resumes) in [("", true), ("ssl_session_tickets off; ssl_session_cache off;", false),
                                 ("ssl_session_tickets off; ssl_session_cache shared:SSL:1m;", true)] {
            let rules = """
                stream {
                    log_format r '$ssl_session_reused';
                    access_log {DIR}/access.log r;
                    server {
                        listen 127.0.0.1:{PORT} ssl;
                        ssl_certificate \(pki.path("server-ec.crt"));
                        ssl_certificate_key \(pki.path("server-ec.key"));
                        ssl_protocols TLSv1.2 TLSv1.3;
                        \(extra)
                        return "ok\\n";
                    }
                }
                """
            let nginx = try ExternalPeer.nginx(rules)
            defer { nginx.stop() }
            let gateway = try await GatewayHarness.start(rules)
            for (port, lines) in [(nginx.port, { nginx.logLines() }), (gateway.port, { gateway.lines(of: "access.log") })] {
                let session = pki.directory.appendingPathComponent("session-\(port).pem").path
                _ = try sClient(port: port, ["-sess_out", session])
                let second = try sClientReport(port: port, ["-sess_in", session])
                #expect(second.text.contains("Reused, TLSv1.3") == resumes, "\(extra) port \(port): \(second.text)")
                try? await Task.sleep(for: .milliseconds(200))
                #expect(lines() == (resumes ? [".", "r"] : [".", "."]), "\(extra) port \(port): \(lines())")
            }
            await gateway.stop()
        }
    }

    @Test("listen … ssl proxy_protocol behind HAProxy (send-proxy-v2, TLS passed through): the header is read, the ClientHello that follows it in the same segment goes to the handshake, $remote_addr is the client's")
    func sslBehindProxyProtocol() async throws {
        let pki = try TestPKI.shared()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format p '$remote_addr $status $ssl_protocol $ssl_server_name';
                access_log {DIR}/access.log p;
                server {
                    listen 127.0.0.1:{PORT} ssl proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    ssl_certificate \(pki.path("server-ec.crt"));
                    ssl_certificate_key \(pki.path("server-ec.key"));
                    return "hello $remote_addr\\n";
                }
            }
            """)
        let haproxy = try ExternalPeer.haproxy("""
            frontend clients
                bind 127.0.0.2:{PORT}
                default_backend portcullis
            backend portcullis
                server pc 127.0.0.1:\(gateway.port) send-proxy-v2
            """, host: "127.0.0.2")
        defer { haproxy.stop() }
        for _ in 0..<3 {
            let reply = try sClient(port: haproxy.port, host: "127.0.0.2", ["-servername", "gateway.test"])
            #expect(reply.text == "hello 127.0.0.1\n", "\(reply)")
        }
        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= 3 }
        #expect(lines == Array(repeating: "127.0.0.1 200 TLSv1.3 gateway.test", count: 3), "\(lines)")
        await gateway.stop()
    }

    @Test("portcullis run: a TLS client killed while the upstream streams to it (its socket resets) costs one session, not the process (SIGPIPE from OpenSSL's writes is ignored)")
    func resetTLSClientDoesNotKill() throws {
        let pki = try TestPKI.shared()
        let streamer = try TestServer { connection in
            let chunk = [UInt8](repeating: 0x61, count: 64 * 1024)
            let end = Date().addingTimeInterval(3)
            while Date() < end, (try? connection.send(chunk)) != nil {}
            connection.close()
        }
        defer { streamer.stop() }
        let folder = try makeTemporaryDirectory("portcullis-sigpipe")
        defer { try? FileManager.default.removeItem(at: folder) }
        let port = try freePort()
        let rules = folder.appendingPathComponent("gateway.conf")
        try """
            stream {
                server {
                    listen 127.0.0.1:\(port) ssl;
                    ssl_certificate \(pki.path("server-ec.crt"));
                    ssl_certificate_key \(pki.path("server-ec.key"));
                    proxy_pass 127.0.0.1:\(streamer.port);
                }
            }
            """.write(to: rules, atomically: true, encoding: .utf8)
        let running = try PortcullisBinary.launch(["run", "-c", rules.path])
        defer { running.signal(SIGTERM); _ = running.wait(timeout: 5) }
        #expect(waitUntilListening(port: port))
        // The mechanism itself, which the resets below need not reach: SIGPIPE is ignored.
        let status = try String(contentsOfFile: "/proc/\(running.pid)/status", encoding: .utf8)
        let ignored = status.split(separator: "\n").first { $0.hasPrefix("SigIgn:") }
            .flatMap { UInt64($0.split(separator: "\t").last ?? "", radix: 16) } ?? 0
        #expect(ignored & (1 << (UInt64(SIGPIPE) - 1)) != 0, "SigIgn: \(String(ignored, radix: 16))")
        for _ in 0..<3 {
            let client = try InteractiveTLSClient(port: port)
            usleep(300_000)
            client.kill()
        }
        usleep(500_000)
        #expect(running.process.isRunning, "the gateway survived: \(running.process.isRunning ? "" : running.stderr())")
        let report = try sClientReport(port: port)
        #expect(report.all.contains("subject=CN = gateway.test"), "\(report.all)")
    }

    @Test("TLS offload to a plain upstream: curl gets the page, and 4 MiB each way arrive intact (s_client)")
    func offloadCarriesBytes() async throws {
        let pki = try TestPKI.shared()
        let page = "<html>through TLS</html>"
        let http = try TestServer { connection in
            _ = try? connection.receive()
            try? connection.send("HTTP/1.1 200 OK\r\nContent-Length: \(page.utf8.count)\r\nConnection: close\r\n\r\n\(page)")
            connection.close()
        }
        defer { http.stop() }
        let size = 4 << 20
        let echo = try TestServer { connection in
            if let bytes = try? connection.receive(exactly: size) { try? connection.send(bytes) }
            connection.close()
        }
        defer { echo.stop() }
        let rules = """
            stream {
                server {
                    listen 127.0.0.1:{PORT} ssl;
                    ssl_certificate \(pki.path("server-ec.crt"));
                    ssl_certificate_key \(pki.path("server-ec.key"));
                    proxy_pass 127.0.0.1:\(http.port);
                }
                server {
                    listen 127.0.0.1:\(try freePort()) ssl;
                    ssl_certificate \(pki.path("server-rsa.crt"));
                    ssl_certificate_key \(pki.path("server-rsa.key"));
                    proxy_pass 127.0.0.1:\(echo.port);
                }
            }
            """
        let gateway = try await GatewayHarness.start(rules)
        let curl = try runTool("curl", ["-s", "--cacert", pki.path("ca.crt"), "--resolve", "gateway.test:\(gateway.port):127.0.0.1",
                                        "https://gateway.test:\(gateway.port)/"])
        #expect(curl.status == 0 && curl.text == page, "\(curl)")
        let echoPort = UInt16(rules.components(separatedBy: "listen 127.0.0.1:")[2].prefix { $0.isNumber })!
        var generator = SplitMix64(seed: 14)
        let payload = (0..<size).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
        let echoed = try sClient(port: echoPort, input: payload, timeout: 30)
        #expect(echoed.stdout.count == size && echoed.stdout == payload, "got \(echoed.stdout.count) bytes: \(echoed.stderr)")
        await gateway.stop()
    }
}

/// Issue #14 part 5: certificates reloaded without a restart (a rule reload, SIGHUP): new
/// handshakes get the new certificate, a live session is untouched, a file that does not load
/// fails the reload and keeps the old one.
@Suite("TLS certificate reload", .serialized)
struct TLSCertificateReloadTests {
    static func install(_ name: String, from pki: TestPKI, into folder: URL) throws {
        for suffix in ["crt", "key"] {
            let staged = folder.appendingPathComponent("staged.\(suffix)")
            try? FileManager.default.removeItem(at: staged)
            try FileManager.default.copyItem(atPath: pki.path("\(name).\(suffix)"), toPath: staged.path)
            _ = rename(staged.path, folder.appendingPathComponent("site.\(suffix)").path)
        }
    }

    static func subject(_ port: UInt16) throws -> String? {
        let report = try sClientReport(port: port)
        return report.all.split(separator: "\n").first { $0.hasPrefix("subject=") }.map(String.init)
    }

    @Test("reload: new handshakes get the new certificate, a session opened before goes on, a broken file keeps the loaded one")
    func inProcess() async throws {
        let pki = try TestPKI.shared()
        let folder = try makeTemporaryDirectory("portcullis-certs")
        defer { try? FileManager.default.removeItem(at: folder) }
        try Self.install("a.test", from: pki, into: folder)
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                server {
                    listen 127.0.0.1:{PORT} ssl;
                    ssl_certificate \(folder.path)/site.crt;
                    ssl_certificate_key \(folder.path)/site.key;
                    proxy_pass 127.0.0.1:\(echo.port);
                }
            }
            """)
        #expect(try Self.subject(gateway.port) == "subject=CN = a.test")
        let live = try InteractiveTLSClient(port: gateway.port)
        defer { live.stop() }
        live.send("before")
        #expect(live.readLine() == "before")

        try Self.install("b.test", from: pki, into: folder)
        let result = await gateway.gateway.reload(path: gateway.rulePath)
        #expect(result.succeeded && result.kept.count == 1, "\(result)")
        #expect(try Self.subject(gateway.port) == "subject=CN = b.test")
        live.send("after")
        #expect(live.readLine() == "after", "the session begun before the reload goes on")

        try "not a certificate".write(to: folder.appendingPathComponent("site.crt"), atomically: true, encoding: .utf8)
        let broken = await gateway.gateway.reload(path: gateway.rulePath)
        #expect(!broken.succeeded && broken.errors.count == 1 && broken.errors[0].contains("cannot load certificate"), "\(broken)")
        #expect(broken.generation == 2, "generation 2 keeps running")
        #expect(try Self.subject(gateway.port) == "subject=CN = b.test", "the loaded certificate stays")
        live.stop()
        await gateway.stop()
    }

    @Test("portcullis run: SIGHUP reloads the rule file and with it the certificates")
    func sighup() throws {
        let pki = try TestPKI.shared()
        let folder = try makeTemporaryDirectory("portcullis-certs")
        defer { try? FileManager.default.removeItem(at: folder) }
        try Self.install("a.test", from: pki, into: folder)
        let port = try freePort()
        let rules = folder.appendingPathComponent("gateway.conf")
        try """
            error_log \(folder.path)/error.log info;
            stream {
                server {
                    listen 127.0.0.1:\(port) ssl;
                    ssl_certificate \(folder.path)/site.crt;
                    ssl_certificate_key \(folder.path)/site.key;
                    return "ok\\n";
                }
            }
            """.write(to: rules, atomically: true, encoding: .utf8)
        let running = try PortcullisBinary.launch(["run", "-c", rules.path])
        defer { running.signal(SIGTERM); _ = running.wait(timeout: 5) }
        #expect(waitUntilListening(port: port))
        #expect(try Self.subject(port) == "subject=CN = a.test")
        try Self.install("b.test", from: pki, into: folder)
        running.signal(SIGHUP)
        var subject: String?
        for _ in 0..<50 {
            subject = try Self.subject(port)
            if subject == "subject=CN = b.test" { break }
            usleep(100_000)
        }
        #expect(subject == "subject=CN = b.test")
        let log = (try? String(contentsOfFile: folder.appendingPathComponent("error.log").path, encoding: .utf8)) ?? ""
        #expect(log.contains("SIGHUP received, reloading") && log.contains("reload 1: generation 2 running; listens kept 1"), "\(log)")
    }
}
