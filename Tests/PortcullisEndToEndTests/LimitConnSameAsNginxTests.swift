#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

/// Issue #5 point 7: `limit_conn` must pass and refuse the same connections as nginx 1.22's
/// built-in ngx_stream_limit_conn_module, given the same rule file and the same sequence of
/// connections.
///
/// Both listen with `proxy_protocol` and trust 127.0.0.1, so every probe claims its client in
/// a PROXY v1 header (IPv4, IPv6 and IPv4-mapped IPv6; `$remote_addr` of a mapped client is
/// its text "::ffff:a.b.c.d", a different key from "a.b.c.d" in nginx), and the server port it
/// claims to have reached, which a second zone (`$proxy_protocol_server_port`) counts: several
/// `limit_conn` all apply, and a session that passed the first zone and is refused by the
/// second must give its first slot back. The upstream greets each connection with "OK\n" and
/// holds it, so a probe passes when "OK\n" comes back and is refused when the connection closes
/// without data (nginx: 503). Connections are held, then some closed and more opened, in the
/// same order on both sides; a step waits until both sides have logged the sessions that ended
/// (each gives its slots back before it logs), so the comparison does not race the release.
///
/// nginx runs limit_conn before access and Portcullis after: these rules have no access rules.
@Suite("limit_conn: same decisions as nginx", .serialized)
struct LimitConnSameAsNginxTests {
    static func rules(_ limits: String) -> String {
        """
        stream {
            error_log {DIR}/error.log info;
            log_format probe '$remote_port $remote_addr $proxy_protocol_server_port $status $limit_conn_status';
            access_log {DIR}/access.log probe;
            limit_conn_zone $remote_addr zone=addr:1m;
            limit_conn_zone $proxy_protocol_server_port zone=dport:1m;
            upstream ok { server 127.0.0.1:{OK}; }
            server {
                listen 127.0.0.1:{PORT} proxy_protocol;
                set_real_ip_from 127.0.0.1;
        \(limits)
                proxy_pass ok;
            }
        }
        """
    }

    static let addresses = ["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "198.51.100.20", "2001:db8::abcd",
                            "::ffff:198.51.100.20"].map { ProbeAddress($0)! }

    struct Probe: CustomStringConvertible {
        var address: ProbeAddress
        var sourcePort: UInt16
        var serverPort: UInt16

        var header: String {
            address.isIPv6
                ? "PROXY TCP6 \(address) ::1 \(sourcePort) \(serverPort)\r\n"
                : "PROXY TCP4 \(address) 127.0.0.1 \(sourcePort) \(serverPort)\r\n"
        }
        var description: String { "\(address) → :\(serverPort) (source port \(sourcePort))" }
    }

    /// One gateway under test: its port, its log lines, the connections it passed and holds.
    final class Side: @unchecked Sendable {
        let name: String
        let port: UInt16
        let logLines: () -> [String]
        let errorLines: () -> [String]
        var held: [UInt16: TestConnection] = [:]

        init(name: String, port: UInt16, logLines: @escaping () -> [String], errorLines: @escaping () -> [String]) {
            self.name = name
            self.port = port
            self.logLines = logLines
            self.errorLines = errorLines
        }

        /// Waits (bounded) until the sessions from `ports` are all in the access log.
        func waitForLogged(_ ports: Set<UInt16>, timeout: Double = 5) async -> Bool {
            let deadline = Date().addingTimeInterval(timeout)
            while true {
                let logged = Set(LimitConnSameAsNginxTests.linesByPort(logLines()).keys)
                if ports.isSubset(of: logged) { return true }
                if Date() > deadline { return false }
                try? await Task.sleep(for: .milliseconds(10))
            }
        }

        /// Opens one probe: its outcome; a passed connection is held.
        func open(_ probe: Probe) async -> LimitsEndToEndTests.Outcome {
            let connection: TestConnection
            do {
                connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
                try connection.send(probe.header)
            } catch {
                return .other("connect or send: \(error)")
            }
            let outcome = LimitsEndToEndTests.outcome(of: connection)
            if outcome == .passed {
                held[probe.sourcePort] = connection
            } else {
                connection.close()
                // Logged means its slots are back: the next probe must not race the release.
                if !(await waitForLogged([probe.sourcePort])) {
                    return .other("\(outcome), but not logged within 5 s")
                }
            }
            return outcome
        }

        func close(_ ports: [UInt16]) async -> Bool {
            for port in ports { held.removeValue(forKey: port)?.close() }
            return await waitForLogged(Set(ports))
        }

        /// Error log lines about `zone`: "limiting connections[, dry run,] by zone "NAME"".
        func limiting(_ zone: String) -> Int {
            errorLines().filter { $0.contains("limiting connections") && $0.contains("by zone \"\(zone)\"") }.count
        }
    }

    struct Tally {
        var probes = 0
        var passed = 0
        var disagreements: [String] = []
    }

    @Test("limit_conn addr 2 and limit_conn dport 3: nginx and Portcullis pass and refuse the same connections, also after some close")
    func sameDecisions() async throws {
        try await Self.compare(limits: """
                    limit_conn addr 2;
                    limit_conn dport 3;
            """, dryRun: false, serverPorts: [80, 443, 8080, 8443])
    }

    /// nginx: a dry-run rejection gives back the slots the session took in earlier zones and
    /// checks no later zone (ngx_stream_limit_conn_handler: cleanup_all, then NGX_DECLINED), so
    /// `$limit_conn_status` stays REJECTED_DRY_RUN and later zones do not count the session.
    @Test("limit_conn_dry_run with two zones: the same $limit_conn_status per connection as nginx, and the same dry-run lines per zone")
    func sameDryRun() async throws {
        try await Self.compare(limits: """
                    limit_conn_dry_run on;
                    limit_conn addr 1;
                    limit_conn dport 2;
            """, dryRun: true, serverPorts: [80, 443])
    }

    /// Runs the probes on both sides. `serverPorts`: the ports the PROXY headers claim (the
    /// dry run uses two, so that a client that passes `addr` finds its port's 2 slots taken).
    static func compare(limits: String, dryRun: Bool, serverPorts: [UInt16]) async throws {
        let upstream = try LimitsEndToEndTests.greetingServer()
        defer { upstream.stop() }
        let rules = Self.rules(limits).replacingOccurrences(of: "{OK}", with: String(upstream.port))
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        let sides = [
            Side(name: "nginx", port: nginx.port, logLines: { nginx.logLines() }, errorLines: { nginx.lines(of: "error.log") }),
            Side(name: "Portcullis", port: gateway.port, logLines: { gateway.lines(of: "access.log") },
                 errorLines: { gateway.lines(of: "error.log") }),
        ]

        var rng = SplitMix64(seed: dryRun ? 0xD27 : 0x11C0)
        var nextSourcePort: UInt16 = 2000
        var tally = Tally()
        var held: [UInt16] = []  // passed on both sides, in order
        var problems: [String] = []

        /// `perAddress` connections from every address, in a shuffled order, each to a random
        /// server port; the same probe on both sides, nginx first.
        func openRound(_ round: Int, perAddress: Int) async {
            var order = addresses.flatMap { Array(repeating: $0, count: perAddress) }
            order.shuffle(using: &rng)
            for address in order {
                let probe = Probe(address: address, sourcePort: nextSourcePort,
                                  serverPort: serverPorts[Int.random(in: 0..<serverPorts.count, using: &rng)])
                nextSourcePort += 1
                var outcomes: [LimitsEndToEndTests.Outcome] = []
                for side in sides { outcomes.append(await side.open(probe)) }
                tally.probes += 1
                if outcomes[0] != outcomes[1] {
                    tally.disagreements.append("round \(round), \(probe): nginx \(outcomes[0]), Portcullis \(outcomes[1])")
                }
                for (side, outcome) in zip(sides, outcomes) {
                    if case .other(let what) = outcome { problems.append("\(side.name), \(probe): \(what)") }
                }
                if outcomes == [.passed, .passed] {
                    tally.passed += 1
                    held.append(probe.sourcePort)
                } else {
                    // Keep the sides alike: what one side passed alone, it lets go at once.
                    let alone = zip(sides, outcomes).filter { $0.1 == .passed }.map(\.0)
                    for side in alone { _ = await side.close([probe.sourcePort]) }
                }
            }
        }

        /// Closes the held connections whose position in `held` `pick` chooses, on both sides,
        /// and waits until both have logged them.
        func closeHeld(_ pick: (Int) -> Bool) async {
            let ports = held.enumerated().filter { pick($0.offset) }.map(\.element)
            held.removeAll { ports.contains($0) }
            for side in sides where !(await side.close(ports)) {
                problems.append("\(side.name) did not log the \(ports.count) closed sessions within 5 s")
            }
        }

        if dryRun {
            await openRound(1, perAddress: 3)
            await closeHeld { _ in true }
        } else {
            await openRound(1, perAddress: 3)
            await closeHeld { $0 % 2 == 0 }
            await openRound(2, perAddress: 3)
            await closeHeld { $0 % 3 != 1 }
            await openRound(3, perAddress: 2)
            await closeHeld { _ in true }
        }

        // The log lines: `$status $limit_conn_status` (and the client and port) per session.
        let theirs = linesByPort(sides[0].logLines()), ours = linesByPort(sides[1].logLines())
        var differentLines: [String] = []
        for port in 2000..<nextSourcePort where theirs[port] != ours[port] {
            differentLines.append("nginx \"\(theirs[port] ?? "nothing")\", Portcullis \"\(ours[port] ?? "nothing")\"")
        }
        let zones = ["addr", "dport"].map { zone in (zone, sides.map { $0.limiting(zone) }) }
        let statuses = Dictionary(grouping: theirs.values.map { $0.split(separator: " ").suffix(2).joined(separator: " ") }) { $0 }
            .mapValues(\.count)
        print("""
            limit_conn same as nginx\(dryRun ? " (dry run)" : ""): \(tally.probes) connections, \(tally.passed) passed on both, \
            \(tally.disagreements.count) disagreements, \(differentLines.count) log lines differ; nginx logged \(statuses.sorted { $0.key < $1.key }); \
            "limiting connections" lines by zone (nginx, Portcullis): \(zones)
            """)

        #expect(problems.isEmpty, "\(problems.prefix(10))\n\(nginx.diagnostics.suffix(1500))")
        #expect(tally.disagreements.isEmpty, """
            \(tally.disagreements.count) of \(tally.probes) connections decided differently:
            \(tally.disagreements.prefix(20).joined(separator: "\n"))
            """)
        #expect(differentLines.isEmpty, """
            \(differentLines.count) log lines differ; the first 20:
            \(differentLines.prefix(20).joined(separator: "\n"))
            """)
        #expect(theirs.count == tally.probes && ours.count == tally.probes, "logged: nginx \(theirs.count), Portcullis \(ours.count) of \(tally.probes)")
        for (zone, counts) in zones {
            #expect(counts[0] == counts[1], "\"limiting connections\" lines for zone \(zone): nginx \(counts[0]), Portcullis \(counts[1])")
            // Not vacuous: each zone refused (or would have) some.
            #expect(counts[0] >= 2, "nginx limited only \(counts[0]) by zone \(zone)")
        }
        if dryRun {
            #expect(tally.passed == tally.probes, "a dry run refuses nothing")
        } else {
            #expect(tally.passed >= 10 && tally.probes - tally.passed >= 10, "\(tally.passed) of \(tally.probes) passed")
        }
        await gateway.stop()
    }

    /// Log lines by their first field, `$remote_port` (the PROXY header's, unique per probe).
    static func linesByPort(_ lines: [String]) -> [UInt16: String] {
        var out: [UInt16: String] = [:]
        for line in lines {
            guard let first = line.split(separator: " ").first, let port = UInt16(first) else { continue }
            out[port] = line
        }
        return out
    }
}
