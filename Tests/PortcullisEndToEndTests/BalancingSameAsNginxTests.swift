#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

/// Issue #13 point 1: the same `upstream` block, run by Debian's nginx 1.22 and by Portcullis,
/// must send the same client to the same server: `hash KEY` and `hash KEY consistent` (ketama
/// points), with weights and a `down` server; `max_conns` must refuse the same connection.
///
/// Both listen with `proxy_protocol` and trust 127.0.0.1, so each probe claims its client in a
/// PROXY v1 header; both log `$upstream_addr` keyed by the header's source port (unique per
/// probe). The upstreams greet with "OK\n" and hold the connection until the client closes.
@Suite("Balancing: same servers as nginx", .serialized)
struct BalancingSameAsNginxTests {
    static func rules(_ upstream: String) -> String {
        """
        stream {
            error_log {DIR}/error.log info;
            log_format probe '$remote_port $remote_addr $upstream_addr $status';
            access_log {DIR}/access.log probe;
            upstream pool {
        \(upstream)
            }
            server {
                listen 127.0.0.1:{PORT} proxy_protocol;
                set_real_ip_from 127.0.0.1;
                proxy_pass pool;
            }
        }
        """
    }

    /// 150 clients: IPv4 and IPv6, from a fixed seed.
    static func clients() -> [String] {
        var rng = SplitMix64(seed: 0xBA1A)
        return (0..<150).map { index in
            if index % 3 == 2 {
                return "2001:db8:\(String(rng.next() & 0xFFFF, radix: 16))::\(String(rng.next() & 0xFFFF, radix: 16))"
            }
            let value = UInt32(truncatingIfNeeded: rng.next())
            return "\(value >> 24 | 1).\(value >> 16 & 0xFF).\(value >> 8 & 0xFF).\(value & 0xFF)"
        }
    }

    static func header(_ client: String, port: UInt16) -> String {
        client.contains(":") ? "PROXY TCP6 \(client) ::1 \(port) 80\r\n" : "PROXY TCP4 \(client) 127.0.0.1 \(port) 80\r\n"
    }

    /// Each client once, one after the other: `$upstream_addr` by source port.
    static func servers(for clients: [String], port: UInt16, lines: () -> [String]) async throws -> [UInt16: String] {
        for (offset, client) in clients.enumerated() {
            let connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
            try connection.send(header(client, port: UInt16(3000 + offset)))
            // Waited for, so that the session is at its upstream before the next one starts;
            // under a loaded machine an answer may come late, which the log comparison shows.
            _ = LimitsEndToEndTests.outcome(of: connection, timeout: 10)
            connection.close()
        }
        let deadline = Date().addingTimeInterval(20)  // bounded; a loaded CI machine logs late
        var byPort: [UInt16: String] = [:]
        while Date() < deadline {
            byPort = LimitConnSameAsNginxTests.linesByPort(lines()).mapValues { line in
                line.split(separator: " ").dropFirst(2).joined(separator: " ")
            }
            if byPort.count >= clients.count { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        return byPort
    }

    static func compare(_ upstream: (_ ports: [UInt16]) -> String) async throws {
        let peers = try (0..<4).map { _ in try LimitsEndToEndTests.greetingServer() }
        defer { peers.forEach { $0.stop() } }
        let rules = Self.rules(upstream(peers.map(\.port)))
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        let clients = Self.clients()
        let theirs = try await servers(for: clients, port: nginx.port) { nginx.logLines() }
        let ours = try await servers(for: clients, port: gateway.port) { gateway.lines(of: "access.log") }
        var differences: [String] = []
        for (offset, client) in clients.enumerated() {
            let port = UInt16(3000 + offset)
            if theirs[port] != ours[port] {
                differences.append("\(client): nginx \(theirs[port] ?? "nothing"), Portcullis \(ours[port] ?? "nothing")")
            }
        }
        let spread = Dictionary(grouping: theirs.values, by: { $0 }).mapValues(\.count)
        print("balancing same as nginx: \(clients.count) clients, \(differences.count) differ; nginx's spread \(spread.sorted { $0.key < $1.key })")
        #expect(theirs.count == clients.count && ours.count == clients.count, "logged: nginx \(theirs.count), Portcullis \(ours.count)\n\(nginx.diagnostics.suffix(1500))")
        #expect(differences.isEmpty, "\(differences.count) clients went elsewhere; the first 20:\n\(differences.prefix(20).joined(separator: "\n"))")
        // Not vacuous: every live server got clients.
        #expect(Set(theirs.values).count >= 3, "\(spread)")
        await gateway.stop()
    }

    @Test("hash $remote_addr with weights 1, 2, 1, 3: each of 150 clients reaches the same server as through nginx")
    func hash() async throws {
        try await Self.compare { ports in
            """
                    hash $remote_addr;
                    server 127.0.0.1:\(ports[0]);
                    server 127.0.0.1:\(ports[1]) weight=2;
                    server 127.0.0.1:\(ports[2]);
                    server 127.0.0.1:\(ports[3]) weight=3;
            """
        }
    }

    @Test("hash $remote_addr with a down server: the clients it would get are rehashed as nginx rehashes them")
    func hashWithDownServer() async throws {
        try await Self.compare { ports in
            """
                    hash $remote_addr;
                    server 127.0.0.1:\(ports[0]);
                    server 127.0.0.1:\(ports[1]) down;
                    server 127.0.0.1:\(ports[2]) weight=2;
                    server 127.0.0.1:\(ports[3]);
            """
        }
    }

    @Test("hash $remote_addr consistent (ketama) with weights and a down server: the same server as through nginx for each of 150 clients")
    func consistentHash() async throws {
        try await Self.compare { ports in
            """
                    hash $remote_addr consistent;
                    server 127.0.0.1:\(ports[0]) weight=2;
                    server 127.0.0.1:\(ports[1]);
                    server 127.0.0.1:\(ports[2]) down;
                    server 127.0.0.1:\(ports[3]) weight=3;
            """
        }
    }

    @Test("hash \"$remote_addr:$remote_port\" consistent: a key made of several variables lands as in nginx")
    func consistentHashCompositeKey() async throws {
        try await Self.compare { ports in
            """
                    hash "$remote_addr:$remote_port" consistent;
                    zone pool 64k;
                    server 127.0.0.1:\(ports[0]);
                    server 127.0.0.1:\(ports[1]);
                    server 127.0.0.1:\(ports[2]);
                    server 127.0.0.1:\(ports[3]);
            """
        }
    }

    @Test("least_conn with weights 1, 2, 1 and a backup: held connections spread as nginx spreads them, also after some close and while the primaries are at max_conns")
    func leastConn() async throws {
        let peers = try (0..<4).map { _ in try LimitsEndToEndTests.greetingServer() }
        defer { peers.forEach { $0.stop() } }
        let rules = Self.rules("""
                    least_conn;
                    server 127.0.0.1:\(peers[0].port) max_conns=3;
                    server 127.0.0.1:\(peers[1].port) weight=2 max_conns=4;
                    server 127.0.0.1:\(peers[2].port) max_conns=2;
                    server 127.0.0.1:\(peers[3].port) backup;
            """)
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        var results: [[UInt16: String]] = []
        for (port, lines) in [(nginx.port, { nginx.logLines() }), (gateway.port, { gateway.lines(of: "access.log") })] {
            var held: [UInt16: TestConnection] = [:]
            var next: UInt16 = 5000
            func open(_ count: Int) throws {
                for _ in 0..<count {
                    let connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
                    try connection.send(Self.header("10.8.0.1", port: next))
                    _ = LimitsEndToEndTests.outcome(of: connection)
                    held[next] = connection
                    next += 1
                }
            }
            func close(_ ports: [UInt16]) async throws {
                for port in ports { held.removeValue(forKey: port)?.close() }
                let deadline = Date().addingTimeInterval(5)
                while Date() < deadline, !Set(ports).isSubset(of: Set(LimitConnSameAsNginxTests.linesByPort(lines()).keys)) {
                    try await Task.sleep(for: .milliseconds(10))
                }
            }
            try open(6)
            try await close([5000, 5003])
            try open(6)  // past the primaries' 9 places: the backup takes the rest
            try await close(Array(held.keys))
            results.append(LimitConnSameAsNginxTests.linesByPort(lines()).mapValues { $0.split(separator: " ").dropFirst(2).joined(separator: " ") })
        }
        let differences = (5000..<5012).filter { results[0][$0] != results[1][$0] }.map {
            "connection \($0 - 5000): nginx \(results[0][$0] ?? "nothing"), Portcullis \(results[1][$0] ?? "nothing")"
        }
        #expect(results[0].count == 12 && results[1].count == 12, "logged: \(results.map(\.count))")
        #expect(differences.isEmpty, "\(differences.joined(separator: "\n"))")
        #expect(results[0].values.contains { $0.hasPrefix("127.0.0.1:\(peers[3].port) ") }, "the backup was used: \(results[0])")
        await gateway.stop()
    }

    @Test("max_conns=2 on a single server: the third connection held at once is refused by both (502, no live upstreams), and passes once one closes")
    func maxConns() async throws {
        let peer = try LimitsEndToEndTests.greetingServer()
        defer { peer.stop() }
        let rules = Self.rules("        server 127.0.0.1:\(peer.port) max_conns=2;")
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        for (name, port) in [("nginx", nginx.port), ("Portcullis", gateway.port)] {
            var held: [TestConnection] = []
            var outcomes: [LimitsEndToEndTests.Outcome] = []
            for offset in 0..<3 {
                let connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
                try connection.send(Self.header("10.9.0.\(offset + 1)", port: UInt16(4000 + offset)))
                outcomes.append(LimitsEndToEndTests.outcome(of: connection))
                held.append(connection)
            }
            #expect(outcomes == [.passed, .passed, .refused], "\(name): \(outcomes)")
            held[0].close()
            try await Task.sleep(for: .milliseconds(300))  // the session ends and gives its place back
            let again = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
            try again.send(Self.header("10.9.0.9", port: 4009))
            #expect(LimitsEndToEndTests.outcome(of: again) == .passed, "\(name): a place came free")
            again.close()
            held.forEach { $0.close() }
        }
        try await Task.sleep(for: .milliseconds(300))
        let refusedLines = [nginx.lines(of: "error.log"), gateway.lines(of: "error.log")].map { lines in
            lines.filter { $0.contains("no live upstreams while connecting to upstream") }.count
        }
        #expect(refusedLines == [1, 1], "\"no live upstreams\" lines (nginx, Portcullis): \(refusedLines)")
        let statuses = [nginx.logLines(), gateway.lines(of: "access.log")].map { lines in
            LimitConnSameAsNginxTests.linesByPort(lines)[4002].map { $0.split(separator: " ").last.map(String.init) ?? "" }
        }
        #expect(statuses == ["502", "502"], "the refused session's $status (nginx, Portcullis): \(statuses)")
        await gateway.stop()
    }
}
