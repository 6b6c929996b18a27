import Testing
import PortcullisCore
import PortcullisRules
@testable import PortcullisPolicy

/// The balancing methods without sockets (their choices are checked against real nginx in
/// BalancingSameAsNginxTests), `max_conns`, and the located errors of the upstream block.
@Suite struct BalancingTests {
    static func group(_ method: BalancingMethod, _ servers: [UpstreamServer]) -> UpstreamGroup {
        UpstreamGroup(name: "g", servers: servers, location: nil, method: method)
    }

    static func key(_ text: String) throws -> LogTemplate {
        let result = RuleLoader.load(text: """
            stream { upstream u { hash \(text); server 10.0.0.1:80; server 10.0.0.2:80; } server { listen 1; proxy_pass u; } }
            """, file: "rules.conf")
        let snapshot = try #require(result.snapshot, "\(result.rendered)")
        return try #require(snapshot.upstreams["u"]?.method.key)
    }

    @Test("CRC-32 is zlib's: the check value of \"123456789\" is 0xCBF43926, and updates compose")
    func crc32() {
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
        var split = CRC32()
        split.update(Array("1234".utf8))
        split.update(Array("56789".utf8))
        #expect(split.value == 0xCBF4_3926)
        #expect(CRC32.checksum([UInt8]()) == 0)
    }

    @Test("hash: one key, one server, every time; a tried server is rehashed away from; one primary or an empty key is round-robin")
    func hash() throws {
        let g = Self.group(.hash(try Self.key("$remote_addr")), [peer("a"), peer("b"), peer("c"), peer("d")])
        var first = UpstreamGroup.PickState(key: Array("192.0.2.1".utf8))
        let chosen = try #require(g.pick(&first, excluding: [], now: 0))
        for _ in 0..<5 {
            var again = UpstreamGroup.PickState(key: Array("192.0.2.1".utf8))
            #expect(g.pick(&again, excluding: [], now: 0) == chosen)
        }
        // The session's next attempt (its first server failed) rehashes to another one.
        let retry = try #require(g.pick(&first, excluding: [chosen], now: 0))
        #expect(retry != chosen)
        // An empty key: round-robin, so consecutive sessions spread.
        let spread = Set((0..<4).compactMap { _ in
            var empty = UpstreamGroup.PickState(key: [])
            return g.pick(&empty, excluding: [], now: 0)
        })
        #expect(spread.count == 4)
    }

    @Test("hash consistent: 160 points per unit of weight; taking one server out moves only the keys that were on it")
    func consistentHashMovesOnlyTheLostServersKeys() throws {
        let key = try Self.key("$remote_addr consistent")
        let servers = [peer("a"), peer("b", weight: 2), peer("c"), peer("d")].enumerated().map { offset, server in
            var named = server
            named.name = "10.0.0.\(offset + 1):80"
            return named
        }
        #expect(UpstreamGroup.ring(servers).count == 5 * 160)
        #expect(UpstreamGroup.hostAndPort("10.0.0.1:80") == ("10.0.0.1", "80"))
        #expect(UpstreamGroup.hostAndPort("[2001:db8::1]:8080") == ("[2001:db8::1]", "8080"))
        #expect(UpstreamGroup.hostAndPort("unix:/run/app.sock") == ("/run/app.sock", ""))
        #expect(UpstreamGroup.hostAndPort("backend") == ("backend", ""))
        let all = Self.group(.consistentHash(key), servers)
        var fewer = servers
        fewer[2].down = true
        let withoutC = Self.group(.consistentHash(key), fewer)
        var moved = 0, kept = 0
        for n in 0..<2_000 {
            let bytes = Array("198.51.\(n / 256).\(n % 256)".utf8)
            var a = UpstreamGroup.PickState(key: bytes), b = UpstreamGroup.PickState(key: bytes)
            let before = try #require(all.pick(&a, excluding: [], now: 0))
            let after = try #require(withoutC.pick(&b, excluding: [], now: 0))
            all.release(before)
            withoutC.release(after)
            if before == 2 { moved += 1; #expect(after != 2) } else { kept += 1; #expect(after == before, "key \(n)") }
        }
        #expect(moved > 200 && kept > 1_200, "moved \(moved), kept \(kept)")
    }

    @Test("least_conn: the fewest sessions per unit of weight wins, equals take turns, a release counts; backups only when no primary can take one")
    func leastConn() {
        var servers = [peer("a"), peer("b", weight: 2), peer("c", backup: true)]
        servers[0].maxConns = 1
        servers[1].maxConns = 2
        let g = Self.group(.leastConn, servers)
        func next() -> String { g.pick(excluding: [], now: 0).map { g.servers[$0].name } ?? "-" }
        // 0/1 vs 0/2: equal, round-robin by weight → b; then a (0 vs 1/2 → a has fewer).
        let first = next(), second = next()
        #expect(Set([first, second]) == ["a", "b"])
        #expect(next() == "b")  // a at max_conns 1; b at 1 of 2
        #expect(next() == "c")  // both primaries full: the backup
        #expect(g.sessions(on: 2) == 1)
        g.release(0)
        #expect(next() == "a")
        #expect(g.sessions(on: 0) == 1 && g.sessions(on: 1) == 2)
    }

    @Test("max_conns with round-robin: a full server is skipped; all full is no server, until one is released")
    func maxConnsRoundRobin() {
        var servers = [peer("a"), peer("b")]
        servers[0].maxConns = 1
        servers[1].maxConns = 1
        let g = Self.group(.roundRobin, servers)
        let picks = [g.pick(excluding: [], now: 0), g.pick(excluding: [], now: 0)]
        #expect(Set(picks.compactMap { $0 }) == [0, 1])
        #expect(g.pick(excluding: [], now: 0) == nil)
        g.release(1)
        #expect(g.pick(excluding: [], now: 0) == 1)
        // 0 means no limit.
        let unlimited = Self.group(.roundRobin, [peer("a")])
        #expect((0..<100).allSatisfy { _ in unlimited.pick(excluding: [], now: 0) == 0 })
    }

    @Test("random: every primary drawn about its weight's share; random two takes the less loaded of its two draws")
    func random() {
        let g = Self.group(.random(two: false), [peer("a"), peer("b", weight: 3), peer("c", down: true)])
        var counts = [0, 0, 0]
        for _ in 0..<4_000 {
            var session = UpstreamGroup.PickState()
            if let index = g.pick(&session, excluding: [], now: 0) {
                counts[index] += 1
                g.release(index)
            }
        }
        #expect(counts[2] == 0)
        #expect(counts[1] > 2 * counts[0] && counts[1] < 4 * counts[0], "\(counts)")
        // Two servers, one already busy with 5 sessions: random two always picks the other.
        let two = Self.group(.random(two: true), [peer("a"), peer("b")])
        for _ in 0..<5 { var s = UpstreamGroup.PickState(); _ = two.pick(&s, excluding: [1], now: 0) }
        #expect(two.sessions(on: 0) == 5)
        for _ in 0..<20 {
            var s = UpstreamGroup.PickState()
            let index = two.pick(&s, excluding: [], now: 0)
            #expect(index == 1)
            if let index { two.release(index) }
        }
    }

    // MARK: Compiling

    static func diagnostics(_ upstream: String) -> [String] {
        let result = RuleLoader.load(text: """
            stream {
                upstream u {
                    \(upstream)
                }
                server { listen 1; proxy_pass u; }
            }
            """, file: "rules.conf")
        return result.diagnostics.map { "\($0.location.map { "\($0.line):\($0.column)" } ?? "?") \($0.severity): \($0.message)" }
    }

    @Test("the upstream block's balancing directives and parameters: located errors as nginx's, the redefinition warning, zone sizes")
    func compilerErrors() {
        #expect(Self.diagnostics("hash $remote_addr; server 10.0.0.1:80 backup; server 10.0.0.2:80;") == [
            "3:47 error: balancing method \"hash\" (rules.conf:3:9) does not support parameter \"backup\"",
        ])
        #expect(Self.diagnostics("random two; server 10.0.0.1:80; server 10.0.0.2:80 backup;") == [
            "3:60 error: balancing method \"random\" (rules.conf:3:9) does not support parameter \"backup\"",
        ])
        // As nginx: a method after the server lines does not object to their backups.
        #expect(Self.diagnostics("server 10.0.0.1:80 backup; server 10.0.0.2:80; hash $remote_addr;").isEmpty)
        #expect(Self.diagnostics("least_conn; server 10.0.0.1:80 backup; server 10.0.0.2:80 max_conns=2;").isEmpty)
        #expect(Self.diagnostics("hash $remote_addr foo; server 10.0.0.1:80;") == [
            "3:27 error: invalid parameter \"foo\" in \"hash\"; expected \"consistent\" or nothing",
        ])
        #expect(Self.diagnostics("random three; server 10.0.0.1:80;") == [
            "3:16 error: invalid parameter \"three\" in \"random\"; expected \"two\" or nothing",
        ])
        #expect(Self.diagnostics("random two least_time; server 10.0.0.1:80;").first?.contains("expected \"least_conn\"") == true)
        #expect(Self.diagnostics("least_conn x; server 10.0.0.1:80;").first?.contains("invalid number of arguments in \"least_conn\"") == true)
        #expect(Self.diagnostics("hash; server 10.0.0.1:80;").first?.contains("invalid number of arguments in \"hash\"") == true)
        #expect(Self.diagnostics("least_conn; hash $remote_addr; server 10.0.0.1:80;") == [
            "3:21 warning: load balancing method redefined; \"least_conn\" at rules.conf:3:9 no longer applies",
        ])
        #expect(Self.diagnostics("server 10.0.0.1:80 max_conns=-1;") == [
            "3:28 error: invalid max_conns \"-1\"; expected a number (0: no limit)",
        ])
        #expect(Self.diagnostics("zone z 64k; server 10.0.0.1:80;").isEmpty)
        #expect(Self.diagnostics("zone z 16k; server 10.0.0.1:80;") == [
            "3:16 error: zone \"z\" is too small; nginx needs at least 32k",
        ])
        #expect(Self.diagnostics("zone z; server 10.0.0.1:80;").first?.contains("zero size shared memory zone \"z\"") == true)
        #expect(Self.diagnostics("zone z x; server 10.0.0.1:80;").first?.contains("invalid zone size \"x\"") == true)
    }

    @Test("the compiled group carries its method and max_conns")
    func compiledGroup() throws {
        let result = RuleLoader.load(text: """
            stream {
                upstream u { hash $remote_addr consistent; zone u 64k; server 10.0.0.1:80 max_conns=7; server 10.0.0.2:80; }
                upstream l { least_conn; server 10.0.0.1:80; }
                upstream r { random two least_conn; server 10.0.0.1:80; }
                server { listen 1; proxy_pass u; }
            }
            """, file: "rules.conf")
        let snapshot = try #require(result.snapshot, "\(result.rendered)")
        let u = try #require(snapshot.upstreams["u"])
        guard case .consistentHash = u.method else { Issue.record("\(u.method)"); return }
        #expect(u.servers.map(\.maxConns) == [7, 0])
        #expect(snapshot.upstreams["l"]?.method == .leastConn)
        #expect(snapshot.upstreams["r"]?.method == .random(two: true))
    }
}
