import Testing
import PortcullisCore
import PortcullisRules
@testable import PortcullisPolicy

/// The pure side of `health_check` and `match` (issue #13 point 2: the parameters and their
/// errors, what counts as a pass, when a server changes state) and of `resolver` with
/// `server NAME resolve` (point 3: what is kept, the errors, how a group follows its names).
@Suite struct UpstreamDiscoveryCompilerTests {
    static func compile(_ text: String) -> CompileResult {
        RuleLoader.load(text: text, file: "rules.conf", resolver: StubResolver())
    }

    static func errors(_ text: String) -> [String] {
        compile(text).diagnostics.map { "\($0.location.map { "\($0.line):\($0.column)" } ?? "?") \($0.message)" }
    }

    @Test("parameters, nginx Plus's defaults, health_check_timeout inherited from stream")
    func parameters() throws {
        let result = Self.compile("""
            stream {
                health_check_timeout 2s;
                match dns { send "\\x00\\x01"; expect ~* "^ok"; }
                upstream app { server 127.0.0.1:9001; server 127.0.0.1:9002 backup; server 127.0.0.1:9003 down; }
                server { listen 1; proxy_pass app; health_check; }
                server { listen 2; health_check interval=10 jitter=1s fails=3 passes=2 mandatory persistent match=dns port=5353 udp; proxy_pass app; }
            }
            """)
        let snapshot = try #require(result.snapshot, "\(result.rendered)")
        let plain = snapshot.healthChecks[0]
        #expect(plain.intervalMilliseconds == 5_000 && plain.fails == 1 && plain.passes == 1 && !plain.mandatory && !plain.udp)
        #expect(plain.timeoutMilliseconds == 2_000)
        #expect(plain.checkedServers == [0, 1], "down servers are not checked; backups are")
        let full = snapshot.healthChecks[1]
        #expect(full.intervalMilliseconds == 10_000 && full.jitterMilliseconds == 1_000 && full.fails == 3 && full.passes == 2)
        #expect(full.mandatory && full.persistent && full.udp && full.port == 5353)
        #expect(full.target(0) == SocketEndpoint("127.0.0.1:5353"))
        #expect(full.match?.send == [0, 1], "\\xHH escapes")
    }

    @Test("located errors")
    func errors() {
        let upstream = "upstream app { server 127.0.0.1:9001; }"
        #expect(Self.errors("stream { \(upstream) server { listen 1; health_check interval=0; proxy_pass app; } }") == [
            "1:82 invalid value \"0\" in \"interval=\" of \"health_check\"; expected a time such as 5s"])
        #expect(Self.errors("stream { \(upstream) server { listen 1; health_check fails=x; proxy_pass app; } }") == [
            "1:82 invalid value \"x\" in \"fails=\" of \"health_check\"; expected a positive number"])
        #expect(Self.errors("stream { match ping { send x; } \(upstream) server { listen 1; health_check match=pign; proxy_pass app; } }") == [
            "1:105 unknown match \"pign\" in \"health_check\"; did you mean \"ping\"?"])
        #expect(Self.errors("stream { \(upstream) server { listen 1; health_check persistent; proxy_pass app; } }") == [
            "1:82 \"persistent\" in \"health_check\" needs \"mandatory\" before it"])
        #expect(Self.errors("stream { \(upstream) server { listen 1; health_check uri=/; proxy_pass app; } }").first?
            .hasPrefix("1:82 invalid parameter \"uri=/\" in \"health_check\"") == true)
        #expect(Self.errors("stream { server { listen 1; health_check; proxy_pass $x; } map $remote_addr $x { default a:1; } }") == [
            "1:29 \"health_check\" needs \"proxy_pass\" to name an upstream block or ADDRESS:PORT in this server (not a variable, not \"return\")"])
        #expect(Self.errors("stream { match m { expect ~ \"(a+)+\"; } \(upstream) server { listen 1; proxy_pass app; } }").isEmpty,
            "nested repetition is linear now")
        #expect(Self.errors("stream { match m { expect ~ \"(a)\\\\1\"; } \(upstream) server { listen 1; proxy_pass app; } }").first?
            .hasPrefix("1:29 invalid regex \"(a)\\1\" in match \"m\": a backreference at offset 3 is not supported") == true)
        #expect(Self.errors("stream { match m { send a; send b; } \(upstream) server { listen 1; proxy_pass app; } }").first?
            .contains("\"send\" directive is duplicate") == true)
        #expect(Self.errors("stream { \(upstream) server { listen 1; send x; proxy_pass app; } }").first?
            .contains("\"send\" directive is not allowed in server context; it belongs in: match") == true)
    }

    @Test("expect: a string anywhere in the answer; a regex over the bytes; no expect passes; a short answer waits for more until the end")
    func verdicts() throws {
        var match = HealthMatch(name: "m")
        #expect(match.verdict([], ended: true) == .passed)
        match.expect = .contains(Array("OK".utf8))
        #expect(match.verdict(Array("HTTP/1.0 200 OK\r\n".utf8), ended: false) == .passed)
        #expect(match.verdict(Array("HTTP/1.0 2".utf8), ended: false) == .needMore)
        #expect(match.verdict(Array("HTTP/1.0 500 Error".utf8), ended: true) == .failed("the answer does not match \"m\""))
        match.expect = .regex(try HealthRegex(pattern: "^\\x24\\x00", caseInsensitive: false))
        #expect(match.verdict([0x24, 0x00, 0xFF], ended: false) == .passed, "binary answers, byte for byte")
        #expect(match.verdict([0x25, 0x00], ended: true) != .passed)
        match.expect = .regex(try HealthRegex(pattern: "^pong", caseInsensitive: true))
        #expect(match.verdict(Array("PONG".utf8), ended: false) == .passed)
    }

    @Test("fails= failures in a row take a server out, passes= passes in a row bring it back; mandatory starts out and comes in at the first pass")
    func tracker() {
        var check = HealthCheck(group: UpstreamGroup(name: "g", servers: [UpstreamServer(endpoint: SocketEndpoint("127.0.0.1:1")!, name: "a")], location: nil))
        check.fails = 2
        check.passes = 3
        var tracker = HealthTracker(check: check)
        #expect(tracker.healthy)
        #expect(tracker.record(passed: false) == nil)
        #expect(tracker.record(passed: true) == nil, "a pass resets the failures")
        #expect(tracker.record(passed: false) == nil)
        #expect(tracker.record(passed: false) == false)
        #expect(tracker.record(passed: false) == nil, "a change is said once")
        #expect(tracker.record(passed: true) == nil)
        #expect(tracker.record(passed: true) == nil)
        #expect(tracker.record(passed: true) == true)
        check.mandatory = true
        var mandatory = HealthTracker(check: check)
        #expect(!mandatory.healthy)
        #expect(mandatory.record(passed: true, firstResult: true) == true)
        // The group: a server some check holds out is never picked; back in when released.
        let group = check.group
        group.setHealth(0, healthy: false)
        #expect(group.pick(excluding: [], now: 0) == nil, "a group's only server, unhealthy: no live upstreams")
        group.setHealth(0, healthy: true)
        #expect(group.pick(excluding: [], now: 0) == 0)
    }

    @Test("resolver and server NAME resolve: what is kept, nginx 1.27.3's errors")
    func resolve() throws {
        let result = Self.compile("""
            stream {
                resolver 127.0.0.1 [::1]:5353 valid=30s ipv6=off;
                resolver_timeout 3s;
                upstream app { zone app 64k; server backend.test:80 resolve weight=2; server 127.0.0.1:81 resolve; }
                server { listen 1; proxy_pass app; }
            }
            """)
        let snapshot = try #require(result.snapshot, "\(result.rendered)")
        #expect(snapshot.resolutions.count == 1, "an address with resolve is a plain server")
        let resolution = try #require(snapshot.resolutions.first)
        #expect(resolution.host == "backend.test" && resolution.port == 80 && resolution.group.resolvable[0].weight == 2)
        #expect(resolution.resolver == ResolverSpec(servers: [SocketEndpoint("127.0.0.1:53")!, SocketEndpoint("[::1]:5353")!],
                                                    validMilliseconds: 30_000, ipv4: true, ipv6: false, timeoutMilliseconds: 3_000))
        #expect(resolution.group.servers.map(\.endpoint) == [SocketEndpoint("127.0.0.1:81")!], "the name is not resolved at load")
        let noZone = Self.errors("stream { resolver 127.0.0.1; upstream app { server b.test:80 resolve; } server { listen 1; proxy_pass app; } }")
        #expect(noZone.first?.hasPrefix("1:45 resolving names at run time requires upstream \"app\" in rules.conf:1 to be in shared memory") == true, "\(noZone)")
        #expect(Self.errors("stream { upstream app { zone app 64k; server b.test:80 resolve; } server { listen 1; proxy_pass app; } }") == [
            "1:39 no resolver defined to resolve names at run time in upstream \"app\" in rules.conf:1"])
        #expect(Self.errors("stream { resolver 127.0.0.1 ipv4=off ipv6=off; server { listen 1; return x; } }") == [
            "1:10 \"ipv4\" and \"ipv6\" cannot both be \"off\" in \"resolver\""])
        #expect(Self.errors("stream { resolver 127.0.0.1; upstream app { zone app 64k; server b.test resolve; } server { listen 1; proxy_pass app; } }") == [
            "1:66 no port in upstream \"b.test\""])
        // The group follows the resolver's updates, keeping indices.
        let group = resolution.group
        group.updateResolved(0, to: [SocketEndpoint("127.0.0.5:80")!, SocketEndpoint("127.0.0.6:80")!])
        #expect(group.servers.count == 3 && group.servers[1].weight == 2)
        let change = group.updateResolved(0, to: [SocketEndpoint("127.0.0.6:80")!])
        #expect(change.removed == [SocketEndpoint("127.0.0.5:80")!] && change.added.isEmpty)
        #expect(group.servers.count == 3 && group.servers[1].removed, "a server that left keeps its index")
        let picked = (0..<6).compactMap { _ in group.pick(excluding: [], now: 0) }
        #expect(!picked.contains(1), "a removed server is never picked: \(picked)")
        #expect(group.updateResolved(0, to: [SocketEndpoint("127.0.0.5:80")!, SocketEndpoint("127.0.0.6:80")!]).added == [SocketEndpoint("127.0.0.5:80")!])
        #expect(group.servers.count == 3, "a server that comes back takes its old place")
        // One live server left (the others removed): nginx's "only server" rule ignores
        // max_fails for it, however many addresses the group once had.
        group.updateResolved(0, to: [SocketEndpoint("127.0.0.6:80")!])
        let single = try #require(UpstreamGroup(name: "s", servers: [], location: nil, resolvable: group.resolvable) as UpstreamGroup?)
        single.updateResolved(0, to: [SocketEndpoint("127.0.0.5:80")!])
        single.updateResolved(0, to: [SocketEndpoint("127.0.0.6:80")!])
        let live = try #require(single.pick(excluding: [], now: 0))
        single.release(live)
        single.report(live, succeeded: false, now: 0)
        #expect(single.pick(excluding: [], now: 1) == live, "a failed connect does not take the only live server out")
    }
}
