#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisTestSupport

/// Issue #13 point 2: active health checks (nginx Plus's `health_check` and `match`, HAProxy's
/// `check`): servers that fail leave rotation, backups take over when every primary has, and
/// servers that pass again come back; one error-log line per change of state. nginx OSS has no
/// active checks, so these run against Portcullis alone, with real sockets.
@Suite("health checks", .serialized)
struct HealthCheckTests {
    /// An upstream that answers a health probe ("PING") with PONG while `healthy`, and anything
    /// else with its name.
    final class Backend: Sendable {
        let name: String
        let healthy = Atomic<Bool>(true)
        let probes = Atomic<Int>(0)
        private(set) nonisolated(unsafe) var server: TestServer!

        init(_ name: String) throws {
            self.name = name
            server = try TestServer { [self] connection in
                var line: [UInt8] = []
                while line.last != 10, let chunk = try? connection.receive(max: 1), !chunk.isEmpty { line += chunk }
                if line == Array("PING\r\n".utf8) {
                    probes.wrappingAdd(1, ordering: .relaxed)
                    try? connection.send(healthy.load(ordering: .relaxed) ? "PONG\r\n" : "NOPE\r\n")
                } else {
                    try? connection.send(name)
                }
                connection.close()
            }
        }
        var port: UInt16 { server.port }
    }

    static func ask(_ port: UInt16) -> String {
        guard let connection = try? TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3) else { return "(no connect)" }
        connection.setTimeout(3)
        try? connection.send("GET\r\n")
        defer { connection.close() }
        return String(decoding: (try? connection.receiveAll(limit: 100)) ?? [], as: UTF8.self)
    }

    static func answers(_ port: UInt16, _ count: Int = 6) -> Set<String> {
        Set((0..<count).map { _ in ask(port) })
    }

    @Test("match with send and expect ~: a failing server leaves rotation after fails=2, the backup serves when both primaries fail, a server back after passes=2; one warn and one notice line per change")
    func leaveAndComeBack() async throws {
        let a = try Backend("A"), b = try Backend("B"), c = try Backend("C")
        defer { [a, b, c].forEach { $0.server.stop() } }
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log notice;
                match ping {
                    send "PING\\r\\n";
                    expect ~ "^PONG";
                }
                upstream app {
                    server 127.0.0.1:\(a.port);
                    server 127.0.0.1:\(b.port);
                    server 127.0.0.1:\(c.port) backup;
                }
                server {
                    listen 127.0.0.1:{PORT};
                    health_check interval=100ms fails=2 passes=2 match=ping;
                    health_check_timeout 1s;
                    proxy_pass app;
                }
            }
            """)
        #expect(Self.answers(gateway.port) == ["A", "B"])
        func waitForLog(_ text: String) async -> [String] {
            await gateway.waitForLines(of: "error.log", timeout: 5) { $0.contains { $0.contains(text) } }
        }

        a.healthy.store(false, ordering: .relaxed)
        var lines = await waitForLog("peer is unhealthy")
        let place = "health check \"ping\" of peer 127.0.0.1:\(a.port) in upstream \"app\""
        #expect(lines.contains { $0.contains("[warn]") && $0.contains("peer is unhealthy while checking response (the answer does not match \"ping\"), \(place)") },
                "\(lines)")
        #expect(Self.answers(gateway.port) == ["B"])

        b.healthy.store(false, ordering: .relaxed)
        lines = await gateway.waitForLines(of: "error.log", timeout: 5) { $0.filter { $0.contains("peer is unhealthy") }.count >= 2 }
        #expect(Self.answers(gateway.port) == ["C"], "every primary out: the backup serves")
        #expect(c.probes.load(ordering: .relaxed) > 0, "backups are checked too")

        a.healthy.store(true, ordering: .relaxed)
        lines = await waitForLog("peer is healthy")
        #expect(lines.contains { $0.contains("[notice]") && $0.contains("peer is healthy while checking response, \(place)") }, "\(lines)")
        #expect(Self.answers(gateway.port) == ["A"])
        // One line per change, not one per failed probe.
        let changes = gateway.lines(of: "error.log").filter { $0.contains("peer is") }
        #expect(changes.count == 3, "\(changes)")
        await gateway.stop()
    }

    @Test("a TCP check without match is a connect: a server whose port closes leaves rotation (connect() failed), and with mandatory a server never checked yet takes nothing; no live upstreams when none is left")
    func connectOnlyAndMandatory() async throws {
        let a = try Backend("A"), b = try Backend("B")
        defer { [a, b].forEach { $0.server.stop() } }
        let closed = try freePort()
        let mandatoryPort = try freePort()
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log notice;
                log_format l '$status';
                access_log {DIR}/access.log l;
                upstream app { server 127.0.0.1:\(a.port); server 127.0.0.1:\(b.port); }
                upstream gone { server 127.0.0.1:\(closed); }
                server { listen 127.0.0.1:{PORT}; health_check interval=100ms; proxy_pass app; }
                server { listen 127.0.0.1:\(mandatoryPort); health_check interval=100ms mandatory; proxy_pass gone; }
            }
            """)
        #expect(Self.answers(gateway.port) == ["A", "B"])
        b.server.stop()
        let lines = await gateway.waitForLines(of: "error.log", timeout: 5) { $0.contains { $0.contains("peer is unhealthy") && $0.contains("\(b.port)") } }
        #expect(lines.contains { $0.contains("peer is unhealthy while connecting to upstream (connect() failed (111: Connection refused)), health check \"\" of peer 127.0.0.1:\(b.port) in upstream \"app\"") },
                "\(lines)")
        #expect(Self.answers(gateway.port) == ["A"])
        // mandatory: the closed server started unhealthy and never passed, so it never
        // changed state (no line).
        #expect(!lines.contains { $0.contains("of peer 127.0.0.1:\(closed)") }, "\(lines)")
        // ... and no session is sent to it: "no live upstreams", no connect attempt.
        #expect(Self.ask(mandatoryPort) == "")
        let after = await gateway.waitForLines(of: "error.log", timeout: 3) { $0.contains { $0.contains("no live upstreams") } }
        #expect(after.contains { $0.contains("no live upstreams while connecting to upstream") }, "\(after.suffix(4))")
        #expect(!after.contains { $0.contains("connect() failed") && $0.contains("upstream: \"127.0.0.1:\(closed)\"") }, "\(after.suffix(4))")
        await gateway.stop()
    }

    @Test("health_check udp without match: a port that answers ICMP port unreachable is unhealthy; a live one is healthy")
    func udpCheck() async throws {
        let live = try UDPTestSocket(bind: "127.0.0.1")
        let dead = try freePort()
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log info;
                upstream dns { server 127.0.0.1:\(live.localPort); server 127.0.0.1:\(dead); }
                server {
                    listen 127.0.0.1:{PORT} udp;
                    health_check udp interval=100ms;
                    health_check_timeout 300ms;
                    proxy_pass dns;
                }
            }
            """)
        let lines = await gateway.waitForLines(of: "error.log", timeout: 5) { $0.contains { $0.contains("peer is unhealthy") } }
        #expect(lines.contains { $0.contains("peer is unhealthy while reading from upstream (recv() failed (111: Connection refused)), health check \"\" of peer 127.0.0.1:\(dead) in upstream \"dns\"") },
                "\(lines)")
        #expect(live.receive(timeout: 2) == Array("nginx health check".utf8))
        #expect(!lines.contains { $0.contains("unhealthy") && $0.contains("\(live.localPort)") })
        // New sessions (one per client socket) now go to the live server only.
        var clients: [UDPTestSocket] = []
        for _ in 0..<4 {
            let client = try UDPTestSocket(bind: "127.0.0.1")
            try client.connect("127.0.0.1", gateway.port)
            try client.send(Array("q".utf8))
            clients.append(client)
        }
        var forwarded = 0
        while let datagram = live.receive(timeout: 1) { if datagram == Array("q".utf8) { forwarded += 1 } ; if forwarded == 4 { break } }
        #expect(forwarded == 4)
        await gateway.stop()
    }
}
