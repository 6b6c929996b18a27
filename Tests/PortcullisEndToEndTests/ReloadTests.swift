#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisGateway
import PortcullisGeoIP
import PortcullisPolicy
import PortcullisTestSupport

/// Issue #15 part 1: hot reload (docs/decisions/0014-hot-reload.md) over real sockets.
@Suite("Hot reload", .serialized)
struct ReloadTests {
    /// Writes `text` as the harness's rule file and reloads it.
    static func reload(_ gateway: GatewayHarness, _ text: String) async throws -> ReloadReport {
        try text.write(toFile: gateway.rulePath, atomically: true, encoding: .utf8)
        return await gateway.gateway.reload(path: gateway.rulePath)
    }

    static func answer(_ port: UInt16, from source: String? = nil) -> String? {
        guard let client = try? TestConnection.connect(to: "127.0.0.1", port: port, from: source, timeout: 3) else { return nil }
        defer { client.close() }
        guard let bytes = try? client.receiveAll(limit: 4096) else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Counts of what the load generator saw.
    final class LoadCounters: Sendable {
        let failures = Atomic<Int>(0)
        let bytesVerified = Atomic<Int>(0)
        let bytesSent = Atomic<Int>(0)
        let newSessions = Atomic<Int>(0)
        let stop = Atomic<Bool>(false)
        let finished = Atomic<Int>(0)
        let firstProblem = Mutex<String?>(nil)

        func fail(_ what: String) {
            failures.wrappingAdd(1, ordering: .relaxed)
            firstProblem.withLock { if $0 == nil { $0 = what } }
        }
    }

    /// Sends `size` pseudo-random bytes and checks that exactly those come back.
    static func roundTrip(_ client: TestConnection, _ pattern: inout PatternStream, size: Int, counters: LoadCounters) -> Bool {
        let bytes = pattern.next(size)
        do {
            try client.send(bytes)
            counters.bytesSent.wrappingAdd(size, ordering: .relaxed)
            let back = try client.receive(exactly: size)
            guard back == bytes else {
                counters.fail("echo mismatch")
                return false
            }
            counters.bytesVerified.wrappingAdd(size, ordering: .relaxed)
            return true
        } catch {
            counters.fail("round trip: \(error)")
            return false
        }
    }

    @Test("50 reloads while 200 sessions relay and new ones open: 0 failed sessions, 0 bytes lost; a broken file in between leaves the old rules")
    func reloadUnderLoad() async throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let second = try freePort(), third = try freePort()
        // Two files whose listens overlap: the main listen in both (its socket must stay open),
        // a second only in A, a third only in B. Zones and the group stay the same.
        func rules(_ port: String, b: Bool, dir: String) -> String {
            """
            stream {
                limit_conn_zone $binary_remote_addr zone=perip:1m;
                upstream echo { server 127.0.0.1:\(echo.port); }
                log_format short '$remote_addr $status $bytes_received';
                access_log \(dir)/access.log short;
                server { listen 127.0.0.1:\(port); limit_conn perip 1000; proxy_pass echo; }
                \(b ? "server { listen 127.0.0.1:\(third); return \"b\\n\"; }"
                    : "server { listen 127.0.0.1:\(second); return \"a\\n\"; }")
            }
            """
        }
        let gateway = try await GatewayHarness.start(rules("{PORT}", b: false, dir: "{DIR}"))
        let dir = gateway.directory.path
        let port = gateway.port
        let counters = LoadCounters()

        // 200 long sessions, opened before the first reload, relaying until the last is done.
        let long = 200
        let opened = Atomic<Int>(0)
        for index in 0..<long {
            Thread {
                defer { counters.finished.wrappingAdd(1, ordering: .relaxed) }
                guard let client = try? TestConnection.connect(to: "127.0.0.1", port: port, timeout: 20) else {
                    opened.wrappingAdd(1, ordering: .relaxed)
                    return counters.fail("long session \(index): connect")
                }
                defer { client.close() }
                var pattern = PatternStream(seed: UInt64(index + 1))
                var first = true
                while !counters.stop.load(ordering: .relaxed) {
                    guard Self.roundTrip(client, &pattern, size: 4096, counters: counters) else { return }
                    if first { opened.wrappingAdd(1, ordering: .relaxed); first = false }
                    usleep(100_000)  // 200 sessions, 2,000 round trips a second: busy, not saturating
                }
            }.start()
        }
        // New sessions all along: connect, a round trip, close.
        let churners = 2
        for index in 0..<churners {
            Thread {
                defer { counters.finished.wrappingAdd(1, ordering: .relaxed) }
                var pattern = PatternStream(seed: UInt64(1000 + index))
                while !counters.stop.load(ordering: .relaxed) {
                    guard let client = try? TestConnection.connect(to: "127.0.0.1", port: port, timeout: 20) else {
                        counters.fail("new session: connect refused")
                        continue
                    }
                    if Self.roundTrip(client, &pattern, size: 1024, counters: counters) { counters.newSessions.wrappingAdd(1, ordering: .relaxed) }
                    client.close()
                    usleep(5_000)
                }
            }.start()
        }
        for _ in 0..<500 where opened.load(ordering: .relaxed) < long { try await Task.sleep(for: .milliseconds(20)) }
        #expect(opened.load(ordering: .relaxed) == long)

        var reloads = 0
        for round in 1...51 {
            if round == 26 {
                // A broken file: refused with a located error; the rules of round 25 stay.
                let broken = try await Self.reload(gateway, rules(String(port), b: true, dir: dir).replacingOccurrences(of: "proxy_pass echo;", with: "proxy_pass echo"))
                #expect(!broken.succeeded && broken.errors.first?.contains("gateway.conf:") == true, "\(broken)")
                #expect(broken.generation == 26)
                continue
            }
            // Generation 1 is file A; the reloads alternate B, A, B, …
            let report = try await Self.reload(gateway, rules(String(port), b: reloads % 2 == 0, dir: dir))
            #expect(report.succeeded, "\(report.errors)")
            #expect(report.kept.contains("127.0.0.1:\(port)") && report.added.count == 1 && report.removed.count == 1, "\(report)")
            #expect(report.carried == 2, "the zone and the group keep their state: \(report)")
            reloads += 1
            try await Task.sleep(for: .milliseconds(40))
        }
        #expect(reloads == 50)
        // The 50th reload is file A: its own listen answers, B's is closed again.
        #expect(Self.answer(second) == "a\n")
        #expect(Self.answer(third) == nil, "a listen the reload removed is closed")

        counters.stop.store(true, ordering: .relaxed)
        for _ in 0..<1000 where counters.finished.load(ordering: .relaxed) < long + churners { try await Task.sleep(for: .milliseconds(10)) }
        #expect(counters.finished.load(ordering: .relaxed) == long + churners)
        #expect(counters.failures.load(ordering: .relaxed) == 0, "\(counters.firstProblem.withLock { $0 } ?? "")")
        #expect(counters.bytesVerified.load(ordering: .relaxed) == counters.bytesSent.load(ordering: .relaxed), "bytes lost")
        #expect(counters.newSessions.load(ordering: .relaxed) > 50, "new sessions were opened throughout")
        #expect(gateway.gateway.snapshot.servers.count == 2)
        await gateway.stop()
    }

    @Test("limit_conn counts and limit_rate buckets survive a reload of the same zone; a zone whose size changed starts empty")
    func limitStateCarried() async throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        func rules(_ port: String, size: String, note: String) -> String {
            """
            stream {
                limit_conn_zone $binary_remote_addr zone=one:\(size);
                limit_rate_zone $binary_remote_addr zone=slow:1m rate=1r/m burst=1;
                server { listen 127.0.0.1:\(port); limit_conn one 1; proxy_pass 127.0.0.1:\(echo.port); }
                server { listen 127.0.0.2:\(port); limit_rate slow; return "\(note)\\n"; }
            }
            """
        }
        let gateway = try await GatewayHarness.start(rules("{PORT}", size: "1m", note: "one"))
        let port = String(gateway.port)
        let held = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try held.send("x")
        #expect(try held.receive(exactly: 1) == Array("x".utf8))
        #expect(Self.answer2(gateway.port) == "one\n", "the bucket's one token")

        let same = try await Self.reload(gateway, rules(port, size: "1m", note: "two"))
        #expect(same.succeeded && same.carried == 3, "both zones and the proxy_pass group: \(same)")
        let second = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        #expect(second.isClosedByPeer(), "the held session still counts in the carried zone")
        second.close()
        #expect(Self.answer2(gateway.port) == "", "the carried bucket is still empty")

        let resized = try await Self.reload(gateway, rules(port, size: "2m", note: "three"))
        #expect(resized.succeeded && resized.carried == 2, "\(resized)")
        let third = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try third.send("y")
        #expect(try third.receive(exactly: 1) == Array("y".utf8), "a resized zone starts empty, as nginx's")
        third.close()
        held.close()
        await gateway.stop()
    }

    /// What the 127.0.0.2 listen answers ("" when it closes at once).
    static func answer2(_ port: UInt16) -> String? {
        guard let client = try? TestConnection.connect(to: "127.0.0.2", port: port, timeout: 3) else { return nil }
        defer { client.close() }
        return (try? client.receiveAll(limit: 4096)).map { String(decoding: $0, as: UTF8.self) }
    }

    @Test("an upstream group with the same servers keeps its failure state: a server marked failed is not tried again after a reload")
    func upstreamStateCarried() async throws {
        let echo = try TestServer.echo()
        defer { echo.stop() }
        let dead = try freePort()
        func rules(_ port: String, dir: String, servers: String) -> String {
            """
            stream {
                log_format up '$upstream_addr';
                access_log \(dir)/access.log up;
                upstream pool { \(servers) }
                server { listen 127.0.0.1:\(port); proxy_pass pool; }
            }
            """
        }
        let servers = "server 127.0.0.1:\(dead) max_fails=1 fail_timeout=60s; server 127.0.0.1:\(echo.port);"
        let gateway = try await GatewayHarness.start(rules("{PORT}", dir: "{DIR}", servers: servers))
        let dir = gateway.directory.path
        func session() throws {
            let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
            try client.send("z")
            _ = try client.receive(exactly: 1)
            client.close()
        }
        try session()  // tries the dead one first, fails over, marks it failed
        _ = await gateway.waitForLines(of: "access.log") { $0.count == 1 }
        let report = try await Self.reload(gateway, rules(String(gateway.port), dir: dir, servers: servers) + "\n# same group\n")
        #expect(report.succeeded && report.carried == 1, "\(report)")
        try session()
        try session()
        let lines = await gateway.waitForLines(of: "access.log") { $0.count == 3 }
        #expect(lines == ["127.0.0.1:\(dead), 127.0.0.1:\(echo.port)", "127.0.0.1:\(echo.port)", "127.0.0.1:\(echo.port)"],
                "after the reload the failed server stays out for its fail_timeout")

        // A changed group (a weight) is a new group: the dead server is tried again.
        let changed = try await Self.reload(gateway, rules(String(gateway.port), dir: dir,
                                                            servers: servers.replacingOccurrences(of: "fail_timeout=60s;", with: "fail_timeout=60s weight=2;")))
        #expect(changed.succeeded && changed.carried == 0, "\(changed)")
        try session()
        let after = await gateway.waitForLines(of: "access.log") { $0.count == 4 }
        #expect(after.last == "127.0.0.1:\(dead), 127.0.0.1:\(echo.port)")
        await gateway.stop()
    }

    @Test("a broken file is refused with every located error, nothing changes; a listen that cannot be bound undoes the whole reload")
    func refusedReloads() async throws {
        let gateway = try await GatewayHarness.start("""
            stream { server { listen 127.0.0.1:{PORT}; return "old\\n"; } }
            """)
        let port = gateway.port
        let broken = try await Self.reload(gateway, """
            stream {
                server { listen 127.0.0.1:\(port); retrun "new\\n"; }
                server { listen 127.0.0.1:\(port + 1); proxy_pass nowhere; }
            }
            """)
        #expect(broken.errors.count >= 2, "\(broken.errors)")
        #expect(broken.errors.first?.hasPrefix("\(gateway.rulePath):2:") == true && broken.errors.first?.contains("unknown directive \"retrun\"") == true, "\(broken.errors)")
        #expect(broken.generation == 1)
        #expect(Self.answer(port) == "old\n", "the old rules keep answering")

        // Passes the compiler, fails at bind: a second listen on a port someone holds.
        let holder = try TestServer.echo()
        defer { holder.stop() }
        let free = try freePort()
        let unbindable = try await Self.reload(gateway, """
            stream {
                server { listen 127.0.0.1:\(port); return "new\\n"; }
                server { listen 127.0.0.1:\(free); return "free\\n"; }
                server { listen 127.0.0.1:\(holder.port); return "taken\\n"; }
            }
            """)
        #expect(!unbindable.succeeded && unbindable.errors.first?.contains("Address already in use") == true, "\(unbindable.errors)")
        #expect(Self.answer(port) == "old\n", "the kept listen still runs the old rules")
        #expect(Self.answer(free) == nil, "the listen bound before the failure was closed again")
        await gateway.stop()
    }

    @Test("a geoip2 database at the same path is not reopened; a new path is")
    func geoipCarried() async throws {
        let fixture = packageRoot.appendingPathComponent("Tests/Fixtures/geoip/types.mmdb").path
        let gateway = try await GatewayHarness.start("""
            stream {
                geoip2 \(fixture) { $country country iso_code; }
                server { listen 127.0.0.1:{PORT}; return "$country\\n"; }
            }
            """)
        let before = try #require(gateway.gateway.snapshot.geoipDatabases.first)
        let text = try String(contentsOfFile: gateway.rulePath, encoding: .utf8)
        let same = try await Self.reload(gateway, text + "\n")
        #expect(same.succeeded)
        #expect(gateway.gateway.snapshot.geoipDatabases.first === before)
        let copy = gateway.path("copy.mmdb")
        try FileManager.default.copyItem(atPath: fixture, toPath: copy)
        let moved = try await Self.reload(gateway, text.replacingOccurrences(of: fixture, with: copy))
        #expect(moved.succeeded)
        let after = try #require(gateway.gateway.snapshot.geoipDatabases.first)
        #expect(after !== before && after.path == copy)
        await gateway.stop()
    }

    @Test("a UDP listen kept across a reload keeps its socket and its sessions take the new rules from their next session")
    func udpListenKept() async throws {
        let gateway = try await GatewayHarness.start("""
            stream { server { listen 127.0.0.1:{PORT} udp; return "one\\n"; } }
            """)
        func ask() throws -> String {
            let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
            defer { close(fd) }
            var timeout = timeval(tv_sec: 3, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            var (address, length) = makeAddress("127.0.0.1", gateway.port)
            let sent = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, "?", 1, 0, $0, length) }
            }
            guard sent == 1 else { return "send failed" }
            var buffer = [UInt8](repeating: 0, count: 64)
            let n = recv(fd, &buffer, 64, 0)
            return n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self) : "no answer"
        }
        #expect(try ask() == "one\n")
        let report = try await Self.reload(gateway, """
            stream { server { listen 127.0.0.1:\(gateway.port) udp; return "two\\n"; } }
            """)
        #expect(report.succeeded && report.kept == ["127.0.0.1:\(gateway.port) udp"], "\(report)")
        #expect(try ask() == "two\n")
        await gateway.stop()
    }
}

/// The command line: SIGHUP, `portcullis reload`, `portcullis -s …`.
@Suite("Hot reload from the command line", .serialized)
struct ReloadCommandTests {
    @Test("portcullis reload and -s reload: exit 0 when the gateway took the rules, 1 with its errors when it refused them; -s reopen and -s quit")
    func reloadCommand() throws {
        let folder = try makeTemporaryDirectory("portcullis-reload")
        defer { try? FileManager.default.removeItem(at: folder) }
        let port = try freePort()
        let rules = folder.appendingPathComponent("gateway.conf")
        func write(_ answer: String, extra: String = "") throws {
            try """
                pid \(folder.path)/portcullis.pid;
                error_log \(folder.path)/error.log info;
                stream {
                    server { listen 127.0.0.1:\(port); return "\(answer)\\n"; }
                    \(extra)
                }
                """.write(to: rules, atomically: true, encoding: .utf8)
        }
        try write("one")
        let running = try PortcullisBinary.launch(["run", "-c", rules.path])
        defer { running.signal(SIGKILL); _ = running.wait(timeout: 5) }
        #expect(waitUntilListening(port: port))
        #expect(ReloadTests.answer(port) == "one\n")

        try write("two")
        let reloaded = try PortcullisBinary.run(["reload", "-c", rules.path])
        #expect(reloaded.status == 0 && reloaded.stdout.contains("generation 2 is running"), "\(reloaded.stdout)\(reloaded.stderr)")
        #expect(ReloadTests.answer(port) == "two\n")

        // Compiles, but the gateway cannot bind it: the gateway's own refusal comes back.
        let holder = try TestServer.echo()
        defer { holder.stop() }
        try write("three", extra: "server { listen 127.0.0.1:\(holder.port); return \"x\"; }")
        let refused = try PortcullisBinary.run(["-s", "reload", "-c", rules.path])
        #expect(refused.status == 1 && refused.stderr.contains("Address already in use")
                && refused.stderr.contains("generation 2 keeps running"), "\(refused.stderr)")
        #expect(ReloadTests.answer(port) == "two\n")

        // A file with errors is not even sent.
        try "stream { server { listen 127.0.0.1:\(port) } }".write(to: rules, atomically: true, encoding: .utf8)
        let unsent = try PortcullisBinary.run(["reload", "-c", rules.path])
        #expect(unsent.status == 1 && unsent.stderr.contains("has errors"), "\(unsent.stderr)")

        try write("two")
        let log = folder.appendingPathComponent("error.log").path
        try FileManager.default.moveItem(atPath: log, toPath: log + ".1")
        let reopen = try PortcullisBinary.run(["-s", "reopen", "-c", rules.path])
        #expect(reopen.status == 0)
        var reopened = false
        for _ in 0..<50 where !reopened {
            usleep(100_000)
            reopened = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("reopening logs") || FileManager.default.fileExists(atPath: log)
        }
        #expect(reopened, "-s reopen sends USR1: the error log is opened again")
        let quit = try PortcullisBinary.run(["-s", "quit", "-c", rules.path])
        #expect(quit.status == 0)
        #expect(running.wait(timeout: 10) == 0, "-s quit stops the gateway gracefully")
        #expect(!FileManager.default.fileExists(atPath: folder.appendingPathComponent("portcullis.pid.reload").path))
    }
}
