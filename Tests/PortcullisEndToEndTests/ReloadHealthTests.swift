#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisGateway
import PortcullisPolicy
import PortcullisTestSupport

/// Hot reload and active health checks (docs/decisions/0014-hot-reload.md, "Health votes move
/// without a gap"): a group carried by a reload keeps its health, so a server a check holds
/// out is never handed a session in between the old checker stopping and the new one's first
/// probe; with `mandatory` (and no `persistent`) every server is "checking" again after the
/// reload, as nginx Plus.
@Suite("Hot reload and health checks", .serialized)
struct ReloadHealthTests {
    /// An upstream that answers a probe ("PING") with PONG after `probeDelay` milliseconds
    /// (or never, when `silent`), and any other session with its name.
    final class ProbedBackend: Sendable {
        let name: String
        let probeDelay = Atomic<Int>(0)
        let silent: Bool
        let probes = Atomic<Int>(0)
        let sessions = Atomic<Int>(0)
        private(set) nonisolated(unsafe) var server: TestServer!

        init(_ name: String, silent: Bool = false) throws {
            self.name = name
            self.silent = silent
            server = try TestServer { [self] connection in
                var line: [UInt8] = []
                while line.last != 10, let chunk = try? connection.receive(max: 1), !chunk.isEmpty { line += chunk }
                if line == Array("PING\r\n".utf8) {
                    probes.wrappingAdd(1, ordering: .relaxed)
                    if self.silent {
                        usleep(6_000_000)  // longer than health_check_timeout: the probe times out
                    } else {
                        let delay = probeDelay.load(ordering: .relaxed)
                        if delay > 0 { usleep(UInt32(delay) * 1000) }
                        try? connection.send("PONG\r\n")
                    }
                } else {
                    sessions.wrappingAdd(1, ordering: .relaxed)
                    try? connection.send(name)
                }
                connection.close()
            }
        }
        var port: UInt16 { server.port }
        var address: String { "127.0.0.1:\(port)" }
    }

    /// Polls `condition` every 20 ms for at most `seconds`.
    static func eventually(_ seconds: Double, _ condition: () -> Bool) async -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if condition() { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return condition()
    }

    @Test("servers a health check holds out (a closed port, a server whose probes time out) stay out across a reload of the same upstream block: right after it, no session goes to them; a changed block starts afresh")
    func downServerStaysOutAcrossReload() async throws {
        let live = try ProbedBackend("L"), sick = try ProbedBackend("S", silent: true)
        defer { [live, sick].forEach { $0.server.stop() } }
        let dead = try freePort()
        let other = try freePort()
        // max_fails=0: no passive checks, only the health check keeps a server out.
        func rules(_ port: String, dir: String, liveWeight: Int = 1, extra: String = "") -> String {
            """
            stream {
                error_log \(dir)/error.log info;
                log_format up '$upstream_addr';
                access_log \(dir)/access.log up;
                match ping { send "PING\\r\\n"; expect ~ "^PONG"; }
                upstream app {
                    server 127.0.0.1:\(dead) max_fails=0;
                    server \(sick.address) max_fails=0;
                    server \(live.address) weight=\(liveWeight);
                }
                server {
                    listen 127.0.0.1:\(port);
                    health_check interval=200ms fails=1 passes=1 match=ping;
                    health_check_timeout 4s;
                    proxy_pass app;
                }
                \(extra)
            }
            """
        }
        let gateway = try await GatewayHarness.start(rules("{PORT}", dir: "{DIR}"))
        let dir = gateway.directory.path, port = String(gateway.port)
        let before = try #require(gateway.gateway.snapshot.upstreams["app"])
        // No session before both are out: nothing but the checks decides.
        let out = await gateway.waitForLines(of: "error.log", timeout: 12) { lines in
            lines.contains { $0.contains("peer is unhealthy") && $0.contains("127.0.0.1:\(dead) ") }
                && lines.contains { $0.contains("peer is unhealthy") && $0.contains("\(sick.address) ") }
        }
        #expect(out.filter { $0.contains("peer is unhealthy") }.count == 2, "\(out)")
        #expect(!before.isHealthy(0) && !before.isHealthy(1) && before.isHealthy(2))

        // The same block, an unrelated change (a server added, a comment).
        let report = try await ReloadTests.reload(gateway, rules(port, dir: dir, extra: """
            # generation 2
            server { listen 127.0.0.1:\(other); return "other\\n"; }
            """))
        #expect(report.succeeded && report.carried == 1 && report.added == ["127.0.0.1:\(other)"], "\(report)")
        let after = try #require(gateway.gateway.snapshot.upstreams["app"])
        #expect(after === before, "the group is carried")
        // At once, before the new checker's first probe of the silent server could time out
        // (4 s, long enough for a loaded machine): its verdicts came with the group.
        #expect(!after.isHealthy(0), "the closed port is still out")
        #expect(!after.isHealthy(1), "the server whose probes time out is still out")
        var answers: [String] = []
        for _ in 0..<8 { answers.append(HealthCheckTests.ask(gateway.port)) }
        #expect(answers == Array(repeating: "L", count: 8), "\(answers)")
        let lines = await gateway.waitForLines(of: "access.log") { $0.count == 8 }
        #expect(lines == Array(repeating: live.address, count: 8), "no session was sent to a server out of rotation: \(lines)")
        #expect(sick.sessions.load(ordering: .relaxed) == 0)
        // Nobody was let back in meanwhile (no "peer is healthy" line).
        #expect(!gateway.lines(of: "error.log").contains { $0.contains("peer is healthy") })

        // The control: a changed block (the live server's weight) is a new group with fresh
        // checks, which take the bad servers out again by themselves.
        let changed = try await ReloadTests.reload(gateway, rules(port, dir: dir, liveWeight: 2))
        #expect(changed.succeeded && changed.carried == 0, "\(changed)")
        let fresh = try #require(gateway.gateway.snapshot.upstreams["app"])
        #expect(fresh !== before)
        // (That it starts with the silent server in rotation, and sends it sessions until the
        // first probe times out, is checked in isolation only: on a loaded machine the reload
        // can outlast that probe. The unit tests show a changed block is a new group.)
        // ... until the new checker takes it out again.
        #expect(await Self.eventually(12) { !fresh.isHealthy(1) && !fresh.isHealthy(0) })
        #expect(Set((0..<4).map { _ in HealthCheckTests.ask(gateway.port) }) == ["L"])
        // The replaced group is let go by the checker that stopped (no vote left behind).
        #expect(before.isHealthy(0) && before.isHealthy(1), "the stopped checker gave its votes back")
        await gateway.stop()
    }

    /// `upstream app` of one server whose probes pass after `backend.probeDelay`.
    static func mandatoryRules(_ port: String, dir: String, backend: ProbedBackend, persistent: Bool, note: String = "") -> String {
        """
        stream {
            error_log \(dir)/error.log info;
            match ping { send "PING\\r\\n"; expect ~ "^PONG"; }
            upstream app { server \(backend.address); }
            server {
                listen 127.0.0.1:\(port);
                health_check interval=200ms fails=1 passes=1 mandatory\(persistent ? " persistent" : "") match=ping;
                health_check_timeout 8s;
                proxy_pass app;
            }
            # \(note)
        }
        """
    }

    @Test("mandatory without persistent: after a reload a healthy server of a carried group is \"checking\" again, out of rotation until its first probe passes")
    func mandatoryChecksAgainAfterReload() async throws {
        let backend = try ProbedBackend("A")
        defer { backend.server.stop() }
        let gateway = try await GatewayHarness.start(Self.mandatoryRules("{PORT}", dir: "{DIR}", backend: backend, persistent: false))
        let dir = gateway.directory.path, port = String(gateway.port)
        let group = try #require(gateway.gateway.snapshot.upstreams["app"])
        #expect(await Self.eventually(10) { group.isHealthy(0) }, "the first probe passes")
        #expect(HealthCheckTests.ask(gateway.port) == "A")

        // From now on a probe takes 5 s to pass (long: the suite runs beside others on 2 cores): the old checker's keep the server healthy
        // (a probe in flight changes nothing); the new checker's first one is slow to let it in.
        backend.probeDelay.store(5000, ordering: .relaxed)
        let started = Date()
        let report = try await ReloadTests.reload(gateway, Self.mandatoryRules(port, dir: dir, backend: backend, persistent: false, note: "2"))
        #expect(report.succeeded && report.carried == 1, "\(report)")
        #expect(gateway.gateway.snapshot.upstreams["app"] === group)
        #expect(!group.isHealthy(0), "checking again: out of rotation at once")
        #expect(HealthCheckTests.ask(gateway.port) == "", "no live upstreams while the server is checked again")
        #expect(Date().timeIntervalSince(started) < 4.8, "(the checks above ran before the first probe could pass)")

        // Back at its first pass, about 5 s after the reload.
        #expect(await Self.eventually(12) { group.isHealthy(0) })
        #expect(Date().timeIntervalSince(started) >= 4.8, "let in by a probe, not by the reload")
        #expect(HealthCheckTests.ask(gateway.port) == "A")
        await gateway.stop()
    }

    @Test("mandatory persistent: after a reload a healthy server of a carried group stays in rotation")
    func mandatoryPersistentStaysIn() async throws {
        let backend = try ProbedBackend("A")
        defer { backend.server.stop() }
        let gateway = try await GatewayHarness.start(Self.mandatoryRules("{PORT}", dir: "{DIR}", backend: backend, persistent: true))
        let dir = gateway.directory.path, port = String(gateway.port)
        let group = try #require(gateway.gateway.snapshot.upstreams["app"])
        #expect(await Self.eventually(10) { group.isHealthy(0) }, "the first probe passes")
        backend.probeDelay.store(1500, ordering: .relaxed)
        let report = try await ReloadTests.reload(gateway, Self.mandatoryRules(port, dir: dir, backend: backend, persistent: true, note: "2"))
        #expect(report.succeeded && report.carried == 1, "\(report)")
        #expect(gateway.gateway.snapshot.upstreams["app"] === group)
        #expect(group.isHealthy(0), "persistent: the server stays in")
        #expect(HealthCheckTests.ask(gateway.port) == "A")
        await gateway.stop()
    }
}

extension ReloadHealthTests {
    /// Found while writing these tests: the reload used to bind new listens before the new
    /// checker cast its votes (a race that showed every time it was tried); fixed.
    @Test("a reload that adds a listen proxying to a new group with a mandatory check: no session reaches a server before its first check passes")
    func newGroupMandatoryOnNewListen() async throws {
        let backend = try ProbedBackend("A")
        defer { backend.server.stop() }
        backend.probeDelay.store(5000, ordering: .relaxed)  // its first pass is 5 s away
        let gateway = try await GatewayHarness.start("""
            stream { server { listen 127.0.0.1:{PORT}; return "x"; } }
            """)
        let added = try freePort()
        var more: [UInt16] = []
        for _ in 0..<20 { more.append(try freePort()) }
        // The new listen is bound in step 3 of the reload and accepts at once; the checker
        // that holds the mandatory group's servers out ("checking") is made in step 4, after
        // the other listens are bound. Twenty more listens widen that gap to a few ms.
        let text = """
            stream {
                match ping { send "PING\\r\\n"; expect ~ "^PONG"; }
                upstream fresh { server \(backend.address); }
                server { listen 127.0.0.1:\(gateway.port); return "x"; }
                server {
                    listen 127.0.0.1:\(added);
                    health_check interval=200ms mandatory match=ping;
                    health_check_timeout 8s;
                    proxy_pass fresh;
                }
                \(more.map { "server { listen 127.0.0.1:\($0); return \"y\"; }" }.joined(separator: "\n    "))
            }
            """
        // A client knocking on the new listen from before the reload until just after it.
        let stop = Atomic<Bool>(false)
        let knocks = Atomic<Int>(0)
        let client = Thread {
            while !stop.load(ordering: .relaxed) {
                guard let connection = try? TestConnection.connect(to: "127.0.0.1", port: added, timeout: 3) else {
                    usleep(200)
                    continue
                }
                connection.setTimeout(3)
                try? connection.send("GET\r\n")
                _ = try? connection.receiveAll(limit: 100)
                connection.close()
                knocks.wrappingAdd(1, ordering: .relaxed)
            }
        }
        let started = Date()
        client.start()
        let report = try await ReloadTests.reload(gateway, text)
        #expect(report.succeeded && report.added.count == 21, "\(report)")
        try await Task.sleep(for: .milliseconds(300))
        stop.store(true, ordering: .relaxed)
        try await Task.sleep(for: .milliseconds(50))
        let group = try #require(gateway.gateway.snapshot.upstreams["fresh"])
        #expect(knocks.load(ordering: .relaxed) > 0, "the new listen was reached")
        #expect(!group.isHealthy(0), "still checking: the first probe is still on its way")
        let early = Date().timeIntervalSince(started) < 4.8
        // The new checker casts its votes before the reload binds or swaps anything.
        #expect(backend.sessions.load(ordering: .relaxed) == 0 || !early,
                "\(backend.sessions.load(ordering: .relaxed)) session(s) went to a server whose first check had not passed")
        await gateway.stop()
    }
}
