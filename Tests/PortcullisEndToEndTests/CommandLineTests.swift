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
