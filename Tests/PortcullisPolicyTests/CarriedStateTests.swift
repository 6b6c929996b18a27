import Testing
import PortcullisCore
import PortcullisRules
@testable import PortcullisPolicy

/// Knows no host: nothing below names one.
private struct NoHosts: HostResolver {
    func addresses(of host: String) -> [IPAddress] { [] }
}

/// `CarriedState` (docs/decisions/0014-hot-reload.md): a reload compiles the new file with
/// the running snapshot on offer, and takes the running zone or upstream group — the very
/// object, with its counts, buckets and balancer state — when its definition did not change.
/// Every check compiles two texts, the second `carrying` the first's state, and compares
/// object identity.
@Suite struct CarriedStateTests {
    static func compile(_ text: String, carrying carried: CarriedState = CarriedState()) throws -> PolicySnapshot {
        let result = RuleLoader.load(text: text, file: "rules.conf", resolver: NoHosts(), carrying: carried)
        #expect(!result.hasErrors, "\(result.rendered)")
        return try #require(result.snapshot, "\(result.rendered)")
    }

    /// The first file, then the second compiled with the first's state on offer.
    static func reload(_ old: String, _ new: String) throws -> (old: PolicySnapshot, new: PolicySnapshot) {
        let before = try compile(old)
        return (before, try compile(new, carrying: CarriedState(from: before)))
    }

    static func server(_ snapshot: PolicySnapshot, port: UInt16) throws -> ServerPolicy {
        try #require(snapshot.servers.first { $0.listens.contains { $0.port == port } }, "no server listens on \(port)")
    }

    static func connZone(_ snapshot: PolicySnapshot, port: UInt16 = 8080) throws -> LimitConnZone {
        try #require(try server(snapshot, port: port).limits.conn.first?.zone)
    }

    static func rateZone(_ snapshot: PolicySnapshot, port: UInt16 = 8080) throws -> LimitRateZone {
        try #require(try server(snapshot, port: port).limits.rate.first?.zone)
    }

    static func group(_ snapshot: PolicySnapshot, port: UInt16 = 8080) throws -> UpstreamGroup {
        try #require(try server(snapshot, port: port).upstream)
    }

    // MARK: limit_conn_zone

    static func connRules(_ zone: String, comment: String = "") -> String {
        """
        stream {
            \(zone)
            # \(comment)
            server { listen 127.0.0.1:8080; limit_conn addr 10; return "x"; }
        }
        """
    }

    @Test("limit_conn_zone: the same key and size is the running object, counts included")
    func sameConnZoneCarried() throws {
        let zone = "limit_conn_zone $binary_remote_addr zone=addr:1m;"
        let (old, new) = try Self.reload(Self.connRules(zone), Self.connRules(zone, comment: "an unrelated change"))
        let before = try Self.connZone(old), after = try Self.connZone(new)
        #expect(after === before, "an unchanged zone must be carried")
        // The state goes with it: a session counted before the reload still counts.
        let key = Array("10.0.0.1".utf8)
        #expect(before.acquire(key, limit: 1) == .acquired)
        #expect(after.count(key) == 1, "the carried zone still holds the session counted before the reload")
        #expect(after.acquire(key, limit: 1) == .overLimit)
        before.release(key)
    }

    @Test("limit_conn_zone: a new size or a new key is a new, empty zone", arguments: [
        "limit_conn_zone $binary_remote_addr zone=addr:2m;",  // size
        "limit_conn_zone $remote_addr zone=addr:1m;",  // key
        "limit_conn_zone $binary_remote_addr$server_port zone=addr:1m;",  // key
    ])
    func changedConnZoneIsNew(_ changed: String) throws {
        let (old, new) = try Self.reload(Self.connRules("limit_conn_zone $binary_remote_addr zone=addr:1m;"), Self.connRules(changed))
        let before = try Self.connZone(old), after = try Self.connZone(new)
        #expect(after !== before, "\(changed) changes the zone's definition")
        #expect(after.name == "addr")
        let key = Array("10.0.0.1".utf8)
        #expect(before.acquire(key, limit: 1) == .acquired)
        #expect(after.count(key) == 0, "a new zone starts empty")
    }

    // MARK: limit_rate_zone

    static func rateRules(_ zone: String, comment: String = "") -> String {
        """
        stream {
            \(zone)
            # \(comment)
            server { listen 127.0.0.1:8080; limit_rate slow; return "x"; }
        }
        """
    }

    @Test("limit_rate_zone: the same key, size, rate and burst is the running object")
    func sameRateZoneCarried() throws {
        let zone = "limit_rate_zone $binary_remote_addr zone=slow:1m rate=10r/s burst=5;"
        let (old, new) = try Self.reload(Self.rateRules(zone), Self.rateRules(zone, comment: "an unrelated change"))
        #expect(try Self.rateZone(new) === Self.rateZone(old))
    }

    @Test("limit_rate_zone: the same rate written another way (600r/m is 10r/s) is still the same zone")
    func sameRateOtherSpellingCarried() throws {
        let (old, new) = try Self.reload(
            Self.rateRules("limit_rate_zone $binary_remote_addr zone=slow:1m rate=10r/s burst=5;"),
            Self.rateRules("limit_rate_zone $binary_remote_addr zone=slow:1m rate=600r/m burst=5;"))
        #expect(try Self.rateZone(new) === Self.rateZone(old))
    }

    @Test("limit_rate_zone: a changed rate, burst, kind, size or key is a new zone", arguments: [
        "limit_rate_zone $binary_remote_addr zone=slow:1m rate=20r/s burst=5;",  // rate
        "limit_rate_zone $binary_remote_addr zone=slow:1m rate=10r/s burst=6;",  // burst
        "limit_rate_zone $binary_remote_addr zone=slow:1m rate=10r/s;",  // burst (default 10)
        "limit_rate_zone $binary_remote_addr zone=slow:1m rate=10 burst=5;",  // kind: 10 bytes/s
        "limit_rate_zone $binary_remote_addr zone=slow:2m rate=10r/s burst=5;",  // size
        "limit_rate_zone $remote_addr zone=slow:1m rate=10r/s burst=5;",  // key
    ])
    func changedRateZoneIsNew(_ changed: String) throws {
        let (old, new) = try Self.reload(
            Self.rateRules("limit_rate_zone $binary_remote_addr zone=slow:1m rate=10r/s burst=5;"), Self.rateRules(changed))
        let before = try Self.rateZone(old), after = try Self.rateZone(new)
        #expect(after !== before, "\(changed) changes the zone's definition")
        #expect(after.name == "slow")
    }

    @Test("a conn zone and a rate zone carried together, each by its own name")
    func bothZoneKindsCarried() throws {
        let text = """
            stream {
                limit_conn_zone $binary_remote_addr zone=addr:1m;
                limit_rate_zone $binary_remote_addr zone=slow:1m rate=10r/s;
                server { listen 127.0.0.1:8080; limit_conn addr 10; limit_rate slow; return "x"; }
            }
            """
        let old = try Self.compile(text)
        let carried = CarriedState(from: old)
        #expect(carried.count == 2, "one conn zone, one rate zone, no group")
        let new = try Self.compile(text, carrying: carried)
        #expect(try Self.connZone(new) === Self.connZone(old))
        #expect(try Self.rateZone(new) === Self.rateZone(old))
    }

    // MARK: upstream blocks

    static let servers = "server 127.0.0.1:9001; server 127.0.0.1:9002 weight=2 max_fails=3;"

    static func upstreamRules(_ block: String, proxyPass: String = "app", comment: String = "") -> String {
        """
        stream {
            upstream \(block)
            # \(comment)
            server { listen 127.0.0.1:8080; proxy_pass \(proxyPass); }
        }
        """
    }

    @Test("an upstream block with the same servers, parameters and method is the running group, round-robin position included")
    func sameUpstreamCarried() throws {
        let block = "app { \(Self.servers) }"
        let old = try Self.compile(Self.upstreamRules(block))
        let before = try Self.group(old)
        // Move the round-robin on, mark a server failed: the carried object keeps both.
        #expect(before.pick(excluding: [], now: 0) == 1)
        before.setHealth(0, healthy: false)
        let new = try Self.compile(Self.upstreamRules(block, comment: "an unrelated change"), carrying: CarriedState(from: old))
        let after = try Self.group(new)
        #expect(after === before, "an unchanged upstream block must be carried")
        #expect(new.upstreams["app"] === before, "the snapshot's table names the carried group too")
        #expect(!after.isHealthy(0), "health carried")
    }

    @Test("an upstream block that changed is a new group", arguments: [
        // a weight
        "app { server 127.0.0.1:9001 weight=3; server 127.0.0.1:9002 weight=2 max_fails=3; }",
        // another parameter
        "app { server 127.0.0.1:9001; server 127.0.0.1:9002 weight=2 max_fails=4; }",
        // a server added
        "app { \(servers) server 127.0.0.1:9003; }",
        // a server removed
        "app { server 127.0.0.1:9001; }",
        // the same servers in another order
        "app { server 127.0.0.1:9002 weight=2 max_fails=3; server 127.0.0.1:9001; }",
        // a method
        "app { least_conn; \(servers) }",
        "app { hash $remote_addr; \(servers) }",
        "app { random; \(servers) }",
        // a backup
        "app { server 127.0.0.1:9001; server 127.0.0.1:9002 weight=2 max_fails=3 backup; }",
    ])
    func changedUpstreamIsNew(_ changed: String) throws {
        let (old, new) = try Self.reload(Self.upstreamRules("app { \(Self.servers) }"), Self.upstreamRules(changed))
        let before = try Self.group(old), after = try Self.group(new)
        #expect(after !== before, "upstream \(changed) changes the group's definition")
        #expect(after.name == "app")
    }

    @Test("a changed hash key is a new group; the same key is the running one")
    func hashKey() throws {
        let same = try Self.reload(Self.upstreamRules("app { hash $remote_addr; \(Self.servers) }"),
                                   Self.upstreamRules("app { hash $remote_addr; \(Self.servers) }"))
        #expect(try Self.group(same.new) === Self.group(same.old))
        let changed = try Self.reload(Self.upstreamRules("app { hash $remote_addr; \(Self.servers) }"),
                                      Self.upstreamRules("app { hash $remote_addr consistent; \(Self.servers) }"))
        #expect(try Self.group(changed.new) !== Self.group(changed.old))
    }

    @Test("a group is carried by name: another block with the same servers is not the running one")
    func otherNameIsNew() throws {
        let (old, new) = try Self.reload(Self.upstreamRules("app { \(Self.servers) }"),
                                         Self.upstreamRules("other { \(Self.servers) }", proxyPass: "other"))
        #expect(try Self.group(new) !== Self.group(old))
    }

    @Test("upstream names are compared without regard to case: proxy_pass spelt another way still gets the carried group")
    func caseInsensitiveReference() throws {
        let (old, new) = try Self.reload(Self.upstreamRules("app { \(Self.servers) }", proxyPass: "APP"),
                                         Self.upstreamRules("app { \(Self.servers) }", proxyPass: "App"))
        let before = try Self.group(old)
        #expect(try Self.group(new) === before)
        #expect(new.upstreams["app"] === before)
    }

    @Test("an upstream block whose name is spelt with other capitals is the same block (nginx ignores case) and is carried")
    func caseInsensitiveBlockName() throws {
        let (old, new) = try Self.reload(Self.upstreamRules("Backend { \(Self.servers) }", proxyPass: "backend"),
                                         Self.upstreamRules("BACKEND { \(Self.servers) }", proxyPass: "backend"))
        let before = try Self.group(old), after = try Self.group(new)
        // CarriedState looks the group up by its lowercased name, and hasSameDefinition
        // compares names without case too (it once compared them as written).
        #expect(after === before, "a block renamed only in case lost its state")
    }

    // MARK: proxy_pass ADDRESS

    static func twoServers(_ count: Int, comment: String = "") -> String {
        let servers = (0..<count).map { "server { listen 127.0.0.1:\(8080 + $0); proxy_pass 127.0.0.1:9000; }" }
        return "stream {\n    # \(comment)\n    " + servers.joined(separator: "\n    ") + "\n}\n"
    }

    @Test("two servers with proxy_pass 127.0.0.1:9000 keep their own group each across a reload (each handed out once)")
    func proxyPassGroupsHandedOutOnce() throws {
        let old = try Self.compile(Self.twoServers(2))
        let first = try Self.group(old, port: 8080), second = try Self.group(old, port: 8081)
        #expect(first !== second, "each proxy_pass makes its own group")
        let carried = CarriedState(from: old)
        #expect(carried.count == 2, "two groups on offer under one name")
        let new = try Self.compile(Self.twoServers(2, comment: "an unrelated change"), carrying: carried)
        let newFirst = try Self.group(new, port: 8080), newSecond = try Self.group(new, port: 8081)
        #expect(newFirst === first)
        #expect(newSecond === second)
        #expect(newFirst !== newSecond, "one running group must not be handed to two servers")
    }

    @Test("a third server proxying to the same address gets a new group; one server takes only the first")
    func proxyPassGroupsMoreAndFewer() throws {
        let old = try Self.compile(Self.twoServers(2))
        let first = try Self.group(old, port: 8080), second = try Self.group(old, port: 8081)

        let more = try Self.compile(Self.twoServers(3), carrying: CarriedState(from: old))
        let third = try Self.group(more, port: 8082)
        #expect(try Self.group(more, port: 8080) === first)
        #expect(try Self.group(more, port: 8081) === second)
        #expect(third !== first && third !== second, "only two groups were on offer")

        let fewer = try Self.compile(Self.twoServers(1), carrying: CarriedState(from: old))
        #expect(try Self.group(fewer, port: 8080) === first)
    }

    @Test("proxy_pass to another address is a new group")
    func proxyPassOtherAddressIsNew() throws {
        let old = try Self.compile(Self.twoServers(1))
        let new = try Self.compile(Self.twoServers(1).replacingOccurrences(of: "127.0.0.1:9000", with: "127.0.0.1:9009"),
                                   carrying: CarriedState(from: old))
        #expect(try Self.group(new) !== Self.group(old))
    }

    @Test("a named upstream and a proxy_pass group are not confused: a block named like nothing carried is new, the carried address group stays with its server")
    func namedAndAddressGroups() throws {
        let text = """
            stream {
                upstream app { server 127.0.0.1:9000; }
                server { listen 127.0.0.1:8080; proxy_pass app; }
                server { listen 127.0.0.1:8081; proxy_pass 127.0.0.1:9000; }
            }
            """
        let old = try Self.compile(text)
        let carried = CarriedState(from: old)
        #expect(carried.count == 2, "the block and the address group, the block once although a server names it")
        let new = try Self.compile(text, carrying: carried)
        #expect(try Self.group(new, port: 8080) === Self.group(old, port: 8080))
        #expect(try Self.group(new, port: 8081) === Self.group(old, port: 8081))
        #expect(try Self.group(new, port: 8080) !== Self.group(new, port: 8081))
    }

    @Test("nothing to carry at a start: every object is new")
    func startCarriesNothing() throws {
        let text = Self.upstreamRules("app { \(Self.servers) }")
        let a = try Self.compile(text), b = try Self.compile(text)
        #expect(CarriedState().count == 0)
        #expect(try Self.group(a) !== Self.group(b))
    }
}
