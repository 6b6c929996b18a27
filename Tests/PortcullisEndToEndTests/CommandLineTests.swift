#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisGeoIP
import PortcullisPolicy
import PortcullisTestSupport

/// The real `portcullis` binary, as an operator runs it.
@Suite("Command line", .serialized)
struct CommandLineTests {
    @Test("every rule file shipped in rules/ compiles without errors")
    func shippedRulesCompile() throws {
        let folder = packageRoot.appendingPathComponent("rules")
        let files = try FileManager.default.contentsOfDirectory(atPath: folder.path).filter { $0.hasSuffix(".conf") }
        #expect(files.contains("gateway.conf"))
        for file in files {
            let result = RuleLoader.load(path: folder.appendingPathComponent(file).path, geoip: MaxMindOpener())
            #expect(!result.hasErrors, "\(file):\n\(result.rendered)")
        }
    }

    @Test("check: exit 0 and one success line for a good file")
    func checkGood() throws {
        let output = try PortcullisBinary.run(["check", "-c", packageRoot.appendingPathComponent("rules/gateway.conf").path])
        #expect(output.status == 0)
        #expect(output.stdout.contains("syntax is ok, test is successful"))
    }

    @Test("check: exit 1 and every diagnostic, located and with a caret, for a bad file")
    func checkBad() throws {
        let directory = try makeTemporaryDirectory()
        let path = directory.appendingPathComponent("bad.conf").path
        try """
            stream {
                server {
                    listen 127.0.0.1:8080;
                    alow 10.0.0.0/8;
                    deny 10.0.0.300;
                    proxy_pass backend;
                }
            }
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let output = try PortcullisBinary.run(["check", "-c", path])
        #expect(output.status == 1)
        #expect(output.stderr.contains("\(path):4:9: error: unknown directive \"alow\"; did you mean \"allow\"?\n        alow 10.0.0.0/8;\n        ^~~~"))
        #expect(output.stderr.contains("\(path):5:14: error: invalid address or CIDR \"10.0.0.300\""))
        #expect(output.stderr.contains("\(path):6:20: error: unknown upstream \"backend\""))
        #expect(output.stderr.contains("3 errors, test failed"))
    }

    @Test("--version says the version and the nginx whose decisions it makes")
    func version() throws {
        let output = try PortcullisBinary.run(["--version"])
        #expect(output.status == 0)
        #expect(output.stdout == "portcullis \(ProductVersion.portcullis) (nginx \(ProductVersion.nginxCompatible) stream decisions)\n")
    }

    @Test("check loads TLS certificates as nginx -t: a missing certificate is a located error and exit 1; a good one passes")
    func checkLoadsCertificates() throws {
        let pki = try TestPKI.shared()
        let directory = try makeTemporaryDirectory()
        let path = directory.appendingPathComponent("tls.conf").path
        func write(_ certificate: String) throws {
            try """
                stream {
                    server {
                        listen 127.0.0.1:8443 ssl;
                        ssl_certificate \(certificate);
                        ssl_certificate_key \(pki.path("server-ec.key"));
                        return "ok";
                    }
                }
                """.write(toFile: path, atomically: true, encoding: .utf8)
        }
        try write(pki.path("server-ec.crt"))
        let good = try PortcullisBinary.run(["check", "-c", path])
        #expect(good.status == 0, "\(good.stderr)")
        try write(directory.appendingPathComponent("missing.crt").path)
        let bad = try PortcullisBinary.run(["check", "-c", path])
        #expect(bad.status == 1)
        #expect(bad.stderr.contains("\(path):4:25: cannot load certificate \"\(directory.path)/missing.crt\""), "\(bad.stderr)")
        #expect(bad.stderr.contains("1 TLS error, test failed"), "\(bad.stderr)")
    }

    /// A rule file for `explain`: geo + map, deny by variable, a limit, a PROXY listen with
    /// realip, and an SNI router.
    static func explainRules(_ directory: URL) throws -> String {
        let path = directory.appendingPathComponent("explain.conf").path
        try """
            stream {
                geo $office {
                    default        0;
                    192.0.2.0/24   1;
                }
                map $office $not_office {
                    1       "";
                    default yes;
                }
                map $ssl_preread_server_name $site {
                    a.test   127.0.0.1:9001;
                    default  127.0.0.1:9009;
                }
                map $ssl_preread_server_name $blocked_sni {
                    evil.test  1;
                    default    "";
                }
                limit_conn_zone $remote_addr zone=per_ip:1m;
                server {
                    listen 127.0.0.1:8080;
                    listen 127.0.0.1:8081 proxy_protocol;
                    set_real_ip_from 10.0.0.1;
                    deny $not_office;
                    limit_conn per_ip 5;
                    proxy_pass 127.0.0.1:9000;
                }
                server {
                    listen 127.0.0.1:8443;
                    ssl_preread on;
                    deny $blocked_sni;
                    proxy_pass $site;
                }
            }
            """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test("explain: the phases, the rule that decided (file:line and text), the variables and the upstream, for an allowed, a refused, a PROXY-header and an SNI client; exit 0 or 2")
    func explainText() throws {
        let directory = try makeTemporaryDirectory()
        let path = try Self.explainRules(directory)
        let allowed = try PortcullisBinary.run(["explain", "-c", path, "192.0.2.7:5000"])
        #expect(allowed.status == 0, "\(allowed.stderr)")
        #expect(allowed.stdout == """
            client 192.0.2.7 (peer 192.0.2.7:5000) on listen 127.0.0.1:8080 (\(path):20:16)
              access            allowed: no rule matched
              limit_conn        counted: key "192.0.2.7" in zone "per_ip", limit 5 (zones start empty here)  [\(path):24 limit_conn per_ip 5;]
              upstream_pick     connect to 127.0.0.1:9000
              variables
                $office = "1"
                $not_office = ""
                $site = "127.0.0.1:9009"
                $blocked_sni = ""
              verdict           200, let through to 127.0.0.1:9000

            """, "\(allowed.stdout)")
        let refused = try PortcullisBinary.run(["explain", "-c", path, "198.51.100.1"])
        #expect(refused.status == 2)
        #expect(refused.stdout.contains("  access            denied by $not_office = \"yes\"  [\(path):23 deny $not_office;]"), "\(refused.stdout)")
        #expect(refused.stdout.contains("verdict           403, refused in access: access forbidden by rule [\(path):23 deny $not_office;]"), "\(refused.stdout)")
        // Through a trusted PROXY sender, the header's client is the one decided on.
        let proxied = try PortcullisBinary.run(["explain", "-c", path, "--server", "8081", "--proxy-from", "10.0.0.1:4000", "192.0.2.9:6000"])
        #expect(proxied.status == 0, "\(proxied.stdout)")
        #expect(proxied.stdout.contains("proxy_header_read the PROXY header from 10.0.0.1 names 192.0.2.9:6000; set_real_ip_from trusts the sender: $remote_addr is 192.0.2.9"), "\(proxied.stdout)")
        let untrusted = try PortcullisBinary.run(["explain", "-c", path, "--server", "8081", "--proxy-from", "10.0.0.2:4000", "192.0.2.9:6000"])
        #expect(untrusted.status == 2, "the sender is not trusted: 10.0.0.2 is decided on, and refused")
        // SNI: routed by the map, refused by deny $var before access (preread first).
        let routed = try PortcullisBinary.run(["explain", "-c", path, "--server", "127.0.0.1:8443", "--sni", "a.test", "192.0.2.1"])
        #expect(routed.status == 0)
        #expect(routed.stdout.contains("preread           a ClientHello with SNI \"a.test\""), "\(routed.stdout)")
        #expect(routed.stdout.contains("verdict           200, let through to 127.0.0.1:9001"), "\(routed.stdout)")
        let evil = try PortcullisBinary.run(["explain", "-c", path, "--server", "8443", "--sni", "evil.test", "192.0.2.1", "--json"])
        #expect(evil.status == 2)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(evil.stdout.utf8)) as? [String: Any])
        #expect(object["status"] as? Int == 403 && object["phase"] as? String == "access" && object["refused"] as? Bool == true)
        #expect((object["rule"] as? [String: Any])?["text"] as? String == "deny $blocked_sni;")
        #expect((object["variables"] as? [String: Any])?["blocked_sni"] as? String == "1")
        #expect((object["steps"] as? [[String: Any]])?.first?["phase"] as? String == "preread")
    }

    @Test("audit: refusals counted by client, rule and phase over a plain and a gzipped (rotated) file, --since, --json; the fail2ban filter in dist/ matches every line and captures the client")
    func auditSummaries() async throws {
        let gateway = try await GatewayHarness.start("""
            stream {
                audit_log {DIR}/audit.log;
                limit_conn_zone $remote_addr zone=one:1m;
                server {
                    listen 127.0.0.1:{PORT};
                    deny 127.0.0.5;
                    deny 127.0.0.6;
                    allow all;
                    proxy_pass 127.0.0.1:9;
                }
            }
            """)
        for client in ["127.0.0.5", "127.0.0.5", "127.0.0.5", "127.0.0.6"] {
            let connection = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: client, timeout: 3)
            connection.setTimeout(3)
            _ = try? connection.receiveAll(limit: 16)
            connection.close()
        }
        let lines = await gateway.waitForLines(of: "audit.log") { $0.count >= 4 }
        #expect(lines.count == 4, "\(lines)")
        await gateway.stop()
        // A rotated copy, gzipped, as logrotate leaves it: the same 4 lines again.
        let directory = try makeTemporaryDirectory()
        let current = directory.appendingPathComponent("audit.log").path
        try (lines.joined(separator: "\n") + "\n").write(toFile: current, atomically: true, encoding: .utf8)
        try (lines.joined(separator: "\n") + "\n").write(toFile: current + ".1", atomically: true, encoding: .utf8)
        #expect(try runTool("gzip", [current + ".1"]).status == 0)

        let byClient = try PortcullisBinary.run(["audit", current, current + ".1.gz"])
        #expect(byClient.status == 0, "\(byClient.stderr)")
        let rows = byClient.stdout.split(separator: "\n").map(String.init)
        #expect(rows.first == "8 refusals in 2 files, by client", "\(byClient.stdout)")
        #expect(rows.dropFirst().first?.hasPrefix("       6  127.0.0.5  [") == true, "\(byClient.stdout)")
        #expect(rows.dropFirst(2).first?.hasPrefix("       2  127.0.0.6  [") == true, "\(byClient.stdout)")
        let byRule = try PortcullisBinary.run(["audit", current, "--by", "rule", "--top", "1"])
        #expect(byRule.stdout.contains("       3  \(gateway.rulePath):6 deny 127.0.0.5;"), "\(byRule.stdout)")
        #expect(!byRule.stdout.contains("127.0.0.6;"), "--top 1")
        let old = try PortcullisBinary.run(["audit", current, "--since", "2000-01-01T00:00:00Z", "--by", "phase", "--json"])
        let object = try #require(try JSONSerialization.jsonObject(with: Data(old.stdout.utf8)) as? [String: Any])
        #expect(object["refusals"] as? Int == 4)
        #expect((object["groups"] as? [[String: Any]])?.first?["key"] as? String == "access")
        let none = try PortcullisBinary.run(["audit", current, "--since", "0s"])
        #expect(none.stdout.hasPrefix("0 refusals"), "\(none.stdout)")

        // fail2ban's filter: <ADDR> is its address pattern.
        let filter = try String(contentsOf: packageRoot.appendingPathComponent("dist/fail2ban/filter.d/portcullis.conf"), encoding: .utf8)
        let failregex = try #require(filter.split(separator: "\n").first { $0.hasPrefix("failregex = ") }).dropFirst("failregex = ".count)
        let pattern = String(failregex).replacingOccurrences(of: "<ADDR>", with: "([0-9A-Fa-f.:]+)")
        let regex = try NSRegularExpression(pattern: pattern)
        for line in lines {
            let match = try #require(regex.firstMatch(in: line, range: NSRange(line.startIndex..., in: line)), "\(line)")
            let client = (line as NSString).substring(with: match.range(at: 1))
            #expect(client == "127.0.0.5" || client == "127.0.0.6", "\(line)")
        }
    }

    @Test("run: an address that cannot be bound is a clear error and a non-zero exit")
    func bindFailure() throws {
        let occupied = try TestServer.echo()
        let directory = try makeTemporaryDirectory()
        let path = directory.appendingPathComponent("busy.conf").path
        try """
            stream {
                server { listen 127.0.0.1:\(occupied.port); proxy_pass 127.0.0.1:9; }
            }
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let output = try PortcullisBinary.run(["run", "-c", path], timeout: 20)
        #expect(output.status == 1)
        #expect(output.stderr.contains("cannot listen on 127.0.0.1:\(occupied.port) (\(path):2:21): Address already in use"))
    }

    @Test("run: a second gateway on the same address (IPv4 or IPv6) fails at start-up, although each opens one SO_REUSEPORT socket per event loop")
    func secondGatewaySameAddress() throws {
        // IPv4, and IPv6 (the probe sets IPV6_V6ONLY as the listening sockets do).
        for host in ["127.0.0.1", "::1"] {
            let port = try freePort(host: host)
            let written = host.contains(":") ? "[\(host)]" : host
            let directory = try makeTemporaryDirectory()
            let path = directory.appendingPathComponent("twice.conf").path
            try """
                worker_processes 2;
                stream {
                    server { listen \(written):\(port); proxy_pass 127.0.0.1:9; }
                }
                """.write(toFile: path, atomically: true, encoding: .utf8)
            let first = try PortcullisBinary.launch(["run", "-c", path])
            #expect(waitUntilListening(host: host, port: port))
            let second = try PortcullisBinary.run(["run", "-c", path], timeout: 20)
            #expect(second.status == 1)
            #expect(second.stderr.contains("cannot listen on \(written):\(port) (\(path):3:21): Address already in use"), "\(second.stderr)")
            // Without the plain-socket probe the second process would have joined the first's
            // SO_REUSEPORT group and taken half of its connections.
            #expect(first.process.isRunning)
            first.signal(SIGTERM)
            #expect(first.wait(timeout: 15) != nil)
        }
    }

    @Test("run: refuses to start on a rule file with errors")
    func refusesBadRules() throws {
        let directory = try makeTemporaryDirectory()
        let path = directory.appendingPathComponent("bad.conf").path
        try "stream { server { listen 127.0.0.1:1; } }".write(toFile: path, atomically: true, encoding: .utf8)
        let output = try PortcullisBinary.run(["run", "-c", path])
        #expect(output.status == 1)
        #expect(output.stderr.contains("no \"proxy_pass\" or \"return\" is defined for this server"))
        #expect(output.stderr.contains("has errors; not starting"))
    }

    @Test("run: SIGTERM stops accepting, lets the session finish its log line, and exits 0; SIGUSR1 reopens logs")
    func signals() throws {
        let upstream = try TestServer.echo()
        let directory = try makeTemporaryDirectory()
        let port = try freePort()
        let path = directory.appendingPathComponent("gateway.conf").path
        let access = directory.appendingPathComponent("access.log").path
        let pidFile = directory.appendingPathComponent("portcullis.pid").path
        try """
            pid \(pidFile);
            stream {
                log_format main '$remote_addr $status $bytes_received';
                access_log \(access) main;
                server { listen 127.0.0.1:\(port); proxy_pass 127.0.0.1:\(upstream.port); }
            }
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let gateway = try PortcullisBinary.launch(["run", "-c", path])
        #expect(waitUntilListening(port: port))
        // The pid file is written just after the listeners are bound: give it a moment.
        var pidText: String?
        for _ in 0..<200 where pidText == nil {
            pidText = try? String(contentsOfFile: pidFile, encoding: .utf8)
            if pidText == nil { usleep(10_000) }
        }
        #expect(pidText == "\(gateway.pid)\n")

        let first = try TestConnection.connect(to: "127.0.0.1", port: port)
        try first.send("one")
        #expect(try first.receive(exactly: 3) == Array("one".utf8))
        first.close()
        // logrotate: move the file away, signal, and the next line lands in a new file.
        usleep(300_000)
        try FileManager.default.moveItem(atPath: access, toPath: access + ".1")
        gateway.signal(SIGUSR1)
        usleep(300_000)
        let second = try TestConnection.connect(to: "127.0.0.1", port: port)
        try second.send("second")
        #expect(try second.receive(exactly: 6) == Array("second".utf8))
        // SIGTERM with a session still open: it is closed within the drain time, logged, exit 0.
        gateway.signal(SIGTERM)
        #expect(gateway.wait(timeout: 15) == 0)
        #expect(try second.receiveAll().isEmpty)
        // (The readiness probe is a session too: it sent 0 bytes.)
        let rotated = try String(contentsOfFile: access + ".1", encoding: .utf8)
            .split(separator: "\n").filter { !$0.hasSuffix(" 0") }
        let fresh = try String(contentsOfFile: access, encoding: .utf8)
        #expect(rotated == ["127.0.0.1 200 3"])
        #expect(fresh == "127.0.0.1 200 6\n")
        #expect(!FileManager.default.fileExists(atPath: pidFile))
        // Stopped accepting: nothing listens any more.
        #expect((try? TestConnection.connect(to: "127.0.0.1", port: port, timeout: 1)) == nil)
    }

    @Test("out of descriptors (RLIMIT_NOFILE 64, 100 clients): accepting pauses instead of spinning, accept4's EMFILE is logged at most once a second per listener, and clients are served again once the flood ends")
    func descriptorExhaustion() throws {
        let upstream = try TestServer.echo()
        let directory = try makeTemporaryDirectory()
        let port = try freePort()
        let path = directory.appendingPathComponent("gateway.conf").path
        let errors = directory.appendingPathComponent("error.log").path
        try """
            error_log \(errors) info;
            stream {
                server {
                    # Sessions wait for a PROXY header before dialling, so each holds exactly one
                    # descriptor and the limit is always met by accept4 (with an upstream socket
                    # per session, whether accept4 or the dial's socket() hits it first would
                    # depend on how many descriptors were open at the start).
                    listen 127.0.0.1:\(port) proxy_protocol;
                    proxy_protocol_timeout 30s;
                    set_real_ip_from 127.0.0.1;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let gateway = try PortcullisBinary.launch(["run", "-c", path])
        #expect(waitUntilListening(port: port))
        let limit = Process()
        limit.executableURL = URL(fileURLWithPath: "/usr/bin/prlimit")
        limit.arguments = ["--pid", "\(gateway.pid)", "--nofile=64:64"]
        try limit.run()
        limit.waitUntilExit()
        try #require(limit.terminationStatus == 0, "prlimit could not lower the gateway's descriptor limit")

        var clients: [TestConnection] = []
        for _ in 0..<100 { if let client = try? TestConnection.connect(to: "127.0.0.1", port: port) { clients.append(client) } }
        usleep(300_000)
        func cpuTicks() -> Int {
            let stat = (try? String(contentsOfFile: "/proc/\(gateway.pid)/stat", encoding: .utf8)) ?? ""
            let fields = stat.split(separator: ")").last?.split(separator: " ") ?? []
            return fields.count > 12 ? (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0) : 0
        }
        let before = cpuTicks()
        let held = Date()
        sleep(2)  // the flood held: connections wait in the backlog the gateway cannot accept
        let ticks = cpuTicks() - before
        let heldFor = Date().timeIntervalSince(held)
        // A level-triggered listener that kept failing accept4 would burn a core (100 ticks a second).
        #expect(ticks < 40, "\(ticks) CPU ticks in \(heldFor) s while out of descriptors")
        let complaints = ((try? String(contentsOfFile: errors, encoding: .utf8)) ?? "")
            .split(separator: "\n").filter { $0.contains("accept4() failed (24: Too many open files)") }
        #expect(!complaints.isEmpty, "EMFILE is said in the error log")
        // One listening socket per event loop (2 on this machine), each at most once a second.
        let listeners = Double(max(ProcessInfo.processInfo.activeProcessorCount, 1))
        #expect(Double(complaints.count) <= listeners * (heldFor + 1.5), "\(complaints.count) lines in \(heldFor) s")
        for client in clients { client.close() }
        usleep(500_000)
        let after = try TestConnection.connect(to: "127.0.0.1", port: port)
        try after.send("PROXY TCP4 127.0.0.9 127.0.0.1 4000 80\r\nback")
        #expect(try after.receive(exactly: 4) == Array("back".utf8), "served again after the flood")
        after.close()
        gateway.signal(SIGTERM)
        #expect(gateway.wait(timeout: 15) == 0)
    }

    @Test("a slow reader does not grow the gateway's memory: reads from the upstream wait for the client")
    func slowReaderBoundedMemory() throws {
        // The upstream writes as fast as it can, up to 512 MiB; the client reads 64 KiB every 20 ms.
        let upstream = try TestServer { connection in
            let block = [UInt8](repeating: 0x61, count: 1 << 20)
            for _ in 0..<512 {
                do { try connection.send(block) } catch { break }
            }
            connection.close()
        }
        let directory = try makeTemporaryDirectory()
        let port = try freePort()
        let path = directory.appendingPathComponent("gateway.conf").path
        try """
            worker_processes 1;
            stream { server { listen 127.0.0.1:\(port); proxy_pass 127.0.0.1:\(upstream.port); } }
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let gateway = try PortcullisBinary.launch(["run", "-c", path])
        #expect(waitUntilListening(port: port))
        let baseline = try #require(gateway.residentKiB())
        let client = try TestConnection.connect(to: "127.0.0.1", port: port)
        var peak = baseline
        var received = 0
        let deadline = Date().addingTimeInterval(3)
        while Date() < deadline {
            received += try client.receive(max: 64 << 10).count
            usleep(20_000)
            peak = max(peak, gateway.residentKiB() ?? 0)
        }
        client.close()
        gateway.signal(SIGTERM)
        _ = gateway.wait(timeout: 10)
        // The upstream could have pushed hundreds of MiB in 3 s; the client took only a few.
        #expect(received < 32 << 20)
        #expect(peak - baseline < 16 * 1024, "RSS grew by \(peak - baseline) KiB (baseline \(baseline) KiB)")
    }
}
