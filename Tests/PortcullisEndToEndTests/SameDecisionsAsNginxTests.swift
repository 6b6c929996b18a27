#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisTestSupport

/// Issue #4 point 6: the same rule file, run by Debian's nginx (stream module and the geoip2
/// module) and by Portcullis, must pass and refuse the same clients.
///
/// Both listen with `proxy_protocol` and trust 127.0.0.1 (`set_real_ip_from`), so each probe
/// claims its client address in a PROXY v1 header: IPv4, IPv6 and IPv4-mapped IPv6 alike,
/// from one loopback connection. A probe passes when the upstream's "OK\n" comes back, and is
/// refused when the connection closes without data: by `deny`, or because the variables sent
/// it (`proxy_pass $backend`) to the upstream block whose port refuses connections (nginx has
/// no `deny $var`). Each side also logs the variables behind the decision, keyed by the
/// PROXY header's source port (`$remote_port`, unique per probe), and those lines must agree
/// too.
///
/// Every rule file is written once, with placeholders: `{PORT}` and `{DIR}` (each side fills
/// in its own), `{OK}` (the upstream that answers), `{DEAD}` (a port that refuses: bound, never
/// listening, held for the whole test so that nothing else can take it) and `{MMDB}` (the
/// project's own country database, data/country.mmdb).
@Suite("Same decisions as nginx", .serialized)
struct SameDecisionsAsNginxTests {
    struct RuleFile: Sendable, CustomTestStringConvertible {
        var name: String
        var seed: UInt64
        /// The whole `stream { }` block, with the placeholders above.
        var body: String
        /// IPv6 prefixes (beyond the rules' own) that random IPv6 probes are drawn from.
        var ipv6Pools: [String] = []
        /// Whether the file decides by `$country` (logged in the first `[…]` field).
        var decidesByCountry = false

        var testDescription: String { name }
    }

    // MARK: The rule files

    /// The rules preamble every file shares: the log line both sides write, and the upstreams.
    static func preamble(logging fields: String) -> String {
        """
            error_log {DIR}/error.log;
            log_format probe '$remote_port $remote_addr\(fields)';
            access_log {DIR}/access.log probe;
            upstream ok { server 127.0.0.1:{OK}; }
            upstream dead { server 127.0.0.1:{DEAD}; }
        """
    }

    static let server = """
            listen 127.0.0.1:{PORT} proxy_protocol;
            set_real_ip_from 127.0.0.1;
        """

    static let accessLists = RuleFile(name: "access lists", seed: 0xACCE55, body: """
        stream {
        \(preamble(logging: ""))
            server {
        \(server)
                deny 10.1.2.3;
                allow 10.1.2.0/24;
                deny 10.1.0.0/16;
                allow 10.0.0.0/8;
                allow 172.20.5.0/24;
                deny 172.16.0.0/12;
                allow 172.16.0.0/12;
                deny 192.168.77.0/24;
                allow 192.168.0.0/16;
                allow 64.0.0.0/3;
                deny 128.0.0.0/9;
                allow 128.0.0.0/2;
                deny 203.0.113.7;
                allow 203.0.113.0/24;
                allow 100.64.1.1/10;
                deny 2001:db8:dead::/48;
                allow 2001:db8::/32;
                deny fd00::/8;
                allow fc00::/7;
                allow 2400::/6;
                deny 2600::/7;
                allow ::/8;
                deny all;
                proxy_pass ok;
            }
        }
        """)

    /// `geo` in CIDR mode (nested blocks, a single address, a duplicate, `delete`, IPv6, an
    /// IPv4-mapped block that mapped clients never reach: they are looked up as IPv4, and a
    /// `default` that replaces the 0.0.0.0/0 before it, being the same entry to nginx) and in
    /// `ranges` mode (nested ranges; `delete` of a range as entered, and of part of one, which
    /// nginx ignores with a warning; IPv6 clients are looked up as 255.255.255.255),
    /// combined by a `map` with exact keys. The access list has IPv6 rules only, so nginx checks
    /// IPv4-mapped clients against them (`deny ::/80` refuses every one).
    static let geo = RuleFile(name: "geo (CIDR and ranges)", seed: 0x6E0, body: """
        stream {
        \(preamble(logging: " [$net] [$band] [$backend]"))
            geo $net {
                0.0.0.0/0 ok;
                default dead;
                10.0.0.0/8 ok;
                10.20.0.0/16 dead;
                10.20.30.0/24 ok;
                10.20.30.40 dead;
                0.0.0.0/2 ok;
                32.0.0.0/4 dead;
                40.0.0.0/8 ok;
                40.0.0.0/8 dead;
                100.64.0.0/10 ok;
                192.0.2.0/24 ok;
                delete 192.0.2.0/24;
                198.51.0.0/16 ok;
                198.51.100.0/24 dead;
                delete 198.51.100.0/24;
                ::ffff:0:0/96 ok;
                2001:db8::/32 ok;
                2001:db8:1::/48 dead;
                2001:db8:1:2::/64 ok;
                2400::/6 ok;
                2600::/8 dead;
                ::/8 ok;
            }
            geo $remote_addr $band {
                ranges;
                default dead;
                128.0.0.0-191.255.255.255 ok;
                150.0.0.0-150.0.255.255 dead;
                150.0.3.4-150.0.3.200 ok;
                160.10.0.0-160.10.255.255 dead;
                delete 160.10.0.0-160.10.255.255;
                1.0.0.0-1.0.0.255 ok;
                delete 1.0.0.0-1.0.0.127;
                1.2.3.4-1.2.3.4 ok;
                224.0.0.0-255.255.255.254 ok;
                0.0.0.0-0.255.255.255 ok;
            }
            map "$net:$band" $backend {
                ok:dead ok;
                dead:ok ok;
                default dead;
            }
            server {
        \(server)
                deny 2001:db8:bad::/48;
                deny ::/80;
                proxy_pass $backend;
            }
        }
        """)

    /// `map` over `$remote_addr`'s text: exact keys (case-insensitive, an IPv6 and an IPv4-mapped
    /// one, an escaped `\\default`), regexes with numbered and named captures used in values,
    /// `~` against `~*`, first regex in file order, and a second map whose captures name the
    /// upstream block (`u$1`), or whose value names it in capitals (nginx finds upstream blocks
    /// by name case-insensitively).
    static let maps = RuleFile(name: "map with regexes", seed: 0x3A9, body: """
        stream {
        \(preamble(logging: " [$kind] [$backend]"))
            upstream u0 { server 127.0.0.1:{OK}; }
            upstream u1 { server 127.0.0.1:{DEAD}; }
            upstream u2 { server 127.0.0.1:{OK}; }
            upstream u3 { server 127.0.0.1:{DEAD}; }
            upstream u4 { server 127.0.0.1:{OK}; }
            upstream u5 { server 127.0.0.1:{DEAD}; }
            upstream u6 { server 127.0.0.1:{OK}; }
            upstream u7 { server 127.0.0.1:{OK}; }
            upstream u8 { server 127.0.0.1:{DEAD}; }
            upstream u9 { server 127.0.0.1:{DEAD}; }
            map $remote_addr $kind {
                default other;
                10.9.8.7 pass;
                10.9.8.5 upper;
                2001:DB8::1 pass;
                ::FFFF:10.9.8.6 pass;
                \\default pass;
                ~^10\\.(\\d+)\\.(\\d+)\\. "ten:$1:$2";
                ~^::ffff:(?<v4>[\\d.]+)$ "mapped:$v4";
                ~*^2001:DB8:(?<group>[0-9a-f]+): "doc:$group";
                ~^(\\d+)\\.(\\d+)\\.(\\d+)\\.(\\d+)$ "v4:$1:$4";
                ~*^([0-9a-f]+):.*:([0-9a-f]*)$ "v6:$1:$2";
            }
            map $kind $backend {
                default dead;
                pass ok;
                upper OK;
                ~^ten:\\d*[02468]: ok;
                ~^ten:\\d+:\\d*(\\d)$ u$1;
                ~^mapped:10\\. dead;
                ~^mapped:(\\d+)\\.\\d+\\.\\d+\\.\\d*(\\d)$ u$2;
                "~^doc:[0-9a-f]{0,3}$" ok;
                ~^doc: dead;
                ~^v4:(1\\d\\d|2[0-4]\\d): dead;
                ~^v4:\\d+:\\d*(\\d)$ u$1;
                "~*^v6:2[0-9A-F]{3}:[0-9a-f]*[0-7]$" ok;
                ~^V6: ok;
            }
            server {
        \(server)
                proxy_pass $backend;
            }
        }
        """)

    /// `geoip2` on the shipped country database, a `map` on the country (exact keys, which are
    /// case-insensitive; `~*`; `~`, which is not; an exact key beating a regex), a `geo`, and an
    /// access list at the `stream` level that the server inherits.
    static let countries = RuleFile(
        name: "geoip2 country", seed: 0xC0DE,
        body: """
            stream {
            \(preamble(logging: " [$country] [$trusted] [$by_country] [$backend]"))
                geoip2 "{MMDB}" {
                    $country default=ZZ country iso_code;
                }
                geo $trusted {
                    default no;
                    8.8.0.0/16 yes;
                    5.5.0.0/16 yes;
                    ::ffff:0:0/96 yes;
                    2001:4860::/32 yes;
                }
                map $country $by_country {
                    default dead;
                    ZZ dead;
                    us ok;
                    CN dead;
                    ~*^(de|fr|nl|it|es)$ ok;
                    ~^[A-C] ok;
                    ~^[a-z] ok;
                    "~^(J|K)[A-Z]$" ok;
                }
                map "$trusted:$by_country" $backend {
                    ~^yes: ok;
                    ~:ok$ ok;
                    default dead;
                }
                deny 6.0.0.0/8;
                deny 5.5.5.0/24;
                deny 2a01::/16;
                server {
            \(server)
                    proxy_pass $backend;
                }
            }
            """,
        // Where the regional registries allocate, plus the 6to4 and Teredo prefixes that a
        // MaxMind database aliases to its IPv4 data.
        ipv6Pools: ["2001:200::/23", "2400::/12", "2600::/12", "2800::/12", "2a00::/12", "2a02::/16",
                    "2c0f::/16", "2002::/16", "2001::/32"],
        decidesByCountry: true)

    static let ruleFiles = [accessLists, geo, maps, countries]

    // MARK: The test

    @Test("nginx and Portcullis pass and refuse the same ≥1,000 clients (IPv4, IPv6, IPv4-mapped)",
          arguments: ruleFiles)
    func sameDecisions(file: RuleFile) async throws {
        let database = packageRoot.appendingPathComponent("data/country.mmdb").path
        try #require(FileManager.default.fileExists(atPath: database), "the shipped database \(database) is missing")
        let upstream = try TestServer { connection in
            try? connection.send("OK\n")
            connection.close()
        }
        defer { withExtendedLifetime(upstream) {} }  // to the end; its deinit stops it
        let dead = try RefusingPort()
        defer { dead.close() }
        let rules = file.body
            .replacingOccurrences(of: "{OK}", with: String(upstream.port))
            .replacingOccurrences(of: "{DEAD}", with: String(dead.port))
            .replacingOccurrences(of: "{MMDB}", with: database)

        let addresses = Self.addresses(for: file)
        try #require(addresses.count >= 1000, "only \(addresses.count) distinct addresses")
        try #require(addresses.count < 60_000, "the source ports would not stay unique")

        let nginx = try ExternalPeer.nginx(rules, modules: ["ngx_stream_geoip2_module"])
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)

        let started = Date()
        let outcomes = await Self.probeBoth(nginxPort: nginx.port, gatewayPort: gateway.port, addresses: addresses)
        let elapsed = Date().timeIntervalSince(started)

        let theirLog = await nginx.waitForLogLines(timeout: 10) { $0.count >= addresses.count }
        let ourLog = await gateway.waitForLines(of: "access.log", timeout: 10) { $0.count >= addresses.count }
        await gateway.stop()

        let theirLines = Self.linesByPort(theirLog), ourLines = Self.linesByPort(ourLog)
        func logged(_ index: Int) -> String {
            let port = Self.sourcePort(index)
            return "nginx logged \"\(theirLines[port] ?? "nothing")\", Portcullis \"\(ourLines[port] ?? "nothing")\""
        }

        // Outcomes.
        var disagreements: [String] = []
        var undecided: [String] = []
        var passed = 0
        var byFamily: [String: (pass: Int, refuse: Int)] = [:]
        for (index, address) in addresses.enumerated() {
            let theirs = outcomes.nginx[index], ours = outcomes.portcullis[index]
            if theirs != ours {
                disagreements.append("\(address) (\(address.family)): nginx \(theirs), Portcullis \(ours); \(logged(index))")
            }
            if case .other = theirs { undecided.append("\(address): nginx \(theirs)") }
            if theirs == .pass { passed += 1 }
            var counts = byFamily[address.family, default: (0, 0)]
            if theirs == .pass { counts.pass += 1 } else if theirs == .refuse { counts.refuse += 1 }
            byFamily[address.family] = counts
        }
        let refused = addresses.count - passed - undecided.count
        let summary = byFamily.sorted { $0.key < $1.key }
            .map { "\($0.key) \($0.value.pass) pass / \($0.value.refuse) refuse" }.joined(separator: ", ")
        print("same decisions as nginx, \(file.name): \(addresses.count) addresses, \(passed) pass, "
              + "\(refused) refused (\(summary)), \(disagreements.count) disagreements, probed in \(String(format: "%.1f", elapsed)) s")

        #expect(disagreements.isEmpty, """
            \(disagreements.count) of \(addresses.count) addresses decided differently; the first 20:
            \(disagreements.prefix(20).joined(separator: "\n"))
            """)
        #expect(undecided.isEmpty, "probes that neither passed nor were refused: \(undecided.prefix(20))\n\(nginx.diagnostics.suffix(2000))")
        // Not vacuous: each outcome is common, and every family is probed.
        #expect(passed * 10 >= addresses.count, "only \(passed) of \(addresses.count) passed")
        #expect(refused * 10 >= addresses.count, "only \(refused) of \(addresses.count) were refused")
        for family in ["IPv4", "IPv6", "IPv4-mapped"] {
            let counts = byFamily[family, default: (0, 0)]
            #expect(counts.pass + counts.refuse >= 100, "only \(counts.pass + counts.refuse) \(family) addresses")
        }

        // The variables behind the decisions, line by line.
        #expect(theirLines.count == addresses.count, "nginx logged \(theirLines.count) of \(addresses.count) sessions")
        #expect(ourLines.count == addresses.count, "Portcullis logged \(ourLines.count) of \(addresses.count) sessions")
        var differentLines: [String] = []
        for (index, address) in addresses.enumerated() {
            let port = Self.sourcePort(index)
            if theirLines[port] != ourLines[port] { differentLines.append("\(address): \(logged(index))") }
        }
        #expect(differentLines.isEmpty, """
            \(differentLines.count) log lines differ; the first 20:
            \(differentLines.prefix(20).joined(separator: "\n"))
            """)

        if file.decidesByCountry {
            // The countries really vary, and decide both ways.
            var countries: Set<String> = []
            var byCountry = (ok: 0, dead: 0)
            for line in theirLines.values {
                let fields = Self.bracketed(line)
                guard fields.count == 4 else { continue }
                countries.insert(fields[0])
                if fields[2] == "ok" { byCountry.ok += 1 } else { byCountry.dead += 1 }
            }
            print("same decisions as nginx, \(file.name): \(countries.count) distinct countries")
            #expect(countries.count >= 20, "only \(countries.count) distinct countries: \(countries.sorted())")
            #expect(byCountry.ok >= 100 && byCountry.dead >= 100, "by country: \(byCountry.ok) ok, \(byCountry.dead) dead")
        }
    }

    // MARK: Probing

    enum Outcome: Equatable, Sendable, CustomStringConvertible {
        case pass, refuse
        case other(String)

        var description: String {
            switch self {
            case .pass: return "pass"
            case .refuse: return "refuse"
            case .other(let what): return what
            }
        }
    }

    /// The PROXY header's source port for the probe at `index`, unique within a file.
    static func sourcePort(_ index: Int) -> UInt16 { UInt16(1024 + index) }

    /// Probes every address against both gateways at once, a few connections at a time on
    /// each, on threads of their own (the probes block).
    static func probeBoth(nginxPort: UInt16, gatewayPort: UInt16, addresses: [ProbeAddress],
                          lanes: Int = 3) async -> (nginx: [Outcome], portcullis: [Outcome]) {
        let results = Results(count: addresses.count)
        await withTaskGroup(of: Void.self) { group in
            for side in 0..<2 {
                for lane in 0..<lanes {
                    group.addTask {
                        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                            Thread {
                                let port = side == 0 ? nginxPort : gatewayPort
                                for index in stride(from: lane, to: addresses.count, by: lanes) {
                                    let outcome = probe(port: port, address: addresses[index], sourcePort: sourcePort(index))
                                    results.set(side: side, index: index, outcome)
                                }
                                done.resume()
                            }.start()
                        }
                    }
                }
            }
        }
        return results.both
    }

    final class Results: Sendable {
        private let table: Mutex<[[Outcome]]>

        init(count: Int) {
            table = Mutex(Array(repeating: Array(repeating: .other("not probed"), count: count), count: 2))
        }

        func set(side: Int, index: Int, _ outcome: Outcome) { table.withLock { $0[side][index] = outcome } }
        var both: (nginx: [Outcome], portcullis: [Outcome]) { table.withLock { ($0[0], $0[1]) } }
    }

    /// One connection: the PROXY v1 header, then "OK\n" (pass) or a close without data (refuse).
    static func probe(port: UInt16, address: ProbeAddress, sourcePort: UInt16) -> Outcome {
        let connection: TestConnection
        do {
            connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
        } catch {
            return .other("connect: \(error)")
        }
        defer { connection.close() }
        do {
            try connection.send(address.proxyHeader(sourcePort: sourcePort))
        } catch {
            return .other("send: \(error)")
        }
        var received: [UInt8] = []
        for _ in 0..<4 where !received.contains(UInt8(ascii: "\n")) {
            do {
                let chunk = try connection.receive(max: 64)
                if chunk.isEmpty { break }
                received += chunk
            } catch TestSocketError.system(_, let code) where code == ECONNRESET {
                break
            } catch {
                return .other("receive after \(received.count) bytes: \(error)")
            }
        }
        if received.isEmpty { return .refuse }
        if received == Array("OK\n".utf8) { return .pass }
        return .other("unexpected reply \(String(decoding: received, as: UTF8.self).debugDescription)")
    }

    /// Log lines by their first field, `$remote_port`.
    static func linesByPort(_ lines: [String]) -> [UInt16: String] {
        var out: [UInt16: String] = [:]
        for line in lines {
            guard let first = line.split(separator: " ").first, let port = UInt16(first) else { continue }
            out[port] = line
        }
        return out
    }

    /// The `[…]` fields of a log line.
    static func bracketed(_ line: String) -> [String] {
        line.split(separator: "[").dropFirst().map { String($0.prefix { $0 != "]" }) }
    }

    // MARK: Addresses

    /// At least 1,000 distinct addresses for `file`, the same on every run: the edges of every
    /// address, block and range the rules name (first, last, one before, one after), some
    /// awkward ones, random IPv4, random IPv6 (inside the rules' IPv6 blocks, the file's pools
    /// and 2000::/3), and the IPv4-mapped form of many IPv4 ones.
    static func addresses(for file: RuleFile) -> [ProbeAddress] {
        var rng = SplitMix64(seed: file.seed)
        var seen: Set<ProbeAddress> = []
        var list: [ProbeAddress] = []
        func add(_ address: ProbeAddress) {
            if seen.insert(address).inserted { list.append(address) }
        }
        let blocks = ProbeAddress.blocks(in: file.body)
        for (first, last) in blocks {
            for address in [first.adding(-1), first, last, last.adding(1)] {
                if let address, !nginxCannotClaim.contains(address) { add(address) }
            }
        }
        // Text forms matter to `map` on $remote_addr: nginx writes ::102 as "::0.0.1.2" (its own
        // ngx_inet6_ntop, unlike glibc's inet_ntop) but ::2 and ::101 as they are.
        let awkward = ["0.0.0.0", "127.0.0.1", "::", "::1", "::2", "::101", "::102", "::abcd", "::1:2", "::1.2.3.4",
                       "::10.9.8.7", "::ffff:0.0.0.0", "::ffff:10.9.8.6", "::ffff:10.9.8.7", "2001:db8::1", "2001:db8::2",
                       "fe80::1", "ff02::1", "2002:c000:201::1", "2001:0:5ef5:79fd::1", "1:0:0:1::1",
                       "2001:db8:0:1:0:0:0:1", "2001:db8:1:0:0:1::"]
        for text in awkward { add(ProbeAddress(text)!) }
        for _ in 0..<480 {
            let address = ProbeAddress.v4(UInt32.random(in: 0...UInt32.max, using: &rng))
            if !nginxCannotClaim.contains(address) { add(address) }
        }

        var pools = blocks.filter { $0.0.isIPv6 && !$0.0.isMapped && $0.1 > $0.0 }
        pools += file.ipv6Pools.compactMap { ProbeAddress.block($0) }
        for (first, last) in pools {
            for _ in 0..<12 { add(random(in: first...last, using: &rng)) }
        }
        let global = ProbeAddress.block("2000::/3")!
        var plainIPv6 = list.filter { $0.isIPv6 && !$0.isMapped }.count
        for _ in 0..<1000 where plainIPv6 < 300 {
            let before = list.count
            add(random(in: global.0...global.1, using: &rng))
            plainIPv6 += list.count - before
        }
        // The mapped form of the IPv4 ones, edges first, until there are enough of everything.
        let ipv4 = list.compactMap { address -> UInt32? in if case .v4(let value) = address { return value } else { return nil } }
        for (index, value) in ipv4.enumerated() where index < 300 || list.count < 1100 {
            add(.mapped(value))
        }
        return list
    }

    /// Addresses a PROXY header cannot give a client in nginx: its realip module parses the
    /// header's address with ngx_inet_addr, which returns INADDR_NONE for 255.255.255.255 (also
    /// inside ::ffff:255.255.255.255), so it declines and the client stays the proxy itself
    /// (127.0.0.1 here). Probing them would compare a decision on 127.0.0.1 with Portcullis's
    /// decision on the address claimed.
    static let nginxCannotClaim: Set<ProbeAddress> = [.v4(.max), .mapped(.max)]

    static func random(in range: ClosedRange<ProbeAddress>, using rng: inout SplitMix64) -> ProbeAddress {
        switch (range.lowerBound, range.upperBound) {
        case (.v4(let a), .v4(let b)): return .v4(UInt32.random(in: a...b, using: &rng))
        case (.v6(let a), .v6(let b)): return .v6(UInt128.random(in: a...b, using: &rng))
        default: return range.lowerBound
        }
    }
}

// MARK: - Addresses, independent of PortcullisCore (glibc's inet_pton and inet_ntop)

enum ProbeAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    case v4(UInt32)
    case v6(UInt128)

    static func mapped(_ value: UInt32) -> ProbeAddress { .v6(0xFFFF << 32 | UInt128(value)) }

    init?(_ text: String) {
        if text.contains(":") {
            var bytes = [UInt8](repeating: 0, count: 16)
            guard inet_pton(AF_INET6, text, &bytes) == 1 else { return nil }
            self = .v6(bytes.reduce(UInt128(0)) { $0 << 8 | UInt128($1) })
        } else {
            var bytes = [UInt8](repeating: 0, count: 4)
            guard inet_pton(AF_INET, text, &bytes) == 1 else { return nil }
            self = .v4(bytes.reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        }
    }

    var isIPv6: Bool { if case .v6 = self { return true } else { return false } }
    var isMapped: Bool { if case .v6(let value) = self { return value >> 32 == 0xFFFF } else { return false } }
    var family: String { isMapped ? "IPv4-mapped" : isIPv6 ? "IPv6" : "IPv4" }

    var description: String {
        var text = [CChar](repeating: 0, count: 64)
        switch self {
        case .v4(let value):
            var bytes = (0..<4).map { UInt8(truncatingIfNeeded: value >> (24 - 8 * $0)) }
            inet_ntop(AF_INET, &bytes, &text, 64)
        case .v6(let value):
            var bytes = (0..<16).map { UInt8(truncatingIfNeeded: value >> (120 - 8 * $0)) }
            inet_ntop(AF_INET6, &bytes, &text, 64)
        }
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    func proxyHeader(sourcePort: UInt16) -> String {
        isIPv6 ? "PROXY TCP6 \(self) ::1 \(sourcePort) 80\r\n" : "PROXY TCP4 \(self) 127.0.0.1 \(sourcePort) 80\r\n"
    }

    /// The neighbour `delta` (±1) away; nil past either end of the family.
    func adding(_ delta: Int) -> ProbeAddress? {
        switch self {
        case .v4(let value):
            if delta < 0 { return value == 0 ? nil : .v4(value - 1) }
            return value == .max ? nil : .v4(value + 1)
        case .v6(let value):
            if delta < 0 { return value == 0 ? nil : .v6(value - 1) }
            return value == .max ? nil : .v6(value + 1)
        }
    }

    static func < (lhs: ProbeAddress, rhs: ProbeAddress) -> Bool {
        switch (lhs, rhs) {
        case (.v4(let a), .v4(let b)): return a < b
        case (.v6(let a), .v6(let b)): return a < b
        case (.v4, .v6): return true
        case (.v6, .v4): return false
        }
    }

    /// `ADDRESS/LENGTH` → its first and last address (host bits ignored, as nginx).
    static func block(_ text: String) -> (ProbeAddress, ProbeAddress)? {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let address = ProbeAddress(String(parts[0])), let length = Int(parts[1]) else { return nil }
        switch address {
        case .v4(let value):
            guard (0...32).contains(length) else { return nil }
            let host: UInt32 = length == 0 ? .max : (length == 32 ? 0 : UInt32.max >> length)
            return (.v4(value & ~host), .v4(value | host))
        case .v6(let value):
            guard (0...128).contains(length) else { return nil }
            let host: UInt128 = length == 0 ? .max : (length == 128 ? 0 : UInt128.max >> length)
            return (.v6(value & ~host), .v6(value | host))
        }
    }

    /// Every address, block (`A/N`) and IPv4 range (`A-B`) a rule file names, as first and
    /// last address: a word of the file that reads as one, with `;` and quotes stripped.
    static func blocks(in rules: String) -> [(ProbeAddress, ProbeAddress)] {
        var out: [(ProbeAddress, ProbeAddress)] = []
        for word in rules.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }) {
            let text = word.trimmingCharacters(in: CharacterSet(charactersIn: ";\"'"))
            if text.contains("/") {
                if let block = block(text) { out.append(block) }
            } else if text.contains("-") && !text.contains(":") {
                let ends = text.split(separator: "-").map(String.init)
                if ends.count == 2, let first = ProbeAddress(ends[0]), let last = ProbeAddress(ends[1]) {
                    out.append((first, last))
                }
            } else if let address = ProbeAddress(text) {
                out.append((address, address))
            }
        }
        return out
    }
}

/// A loopback port that refuses connections: a socket bound to it that never listens, held
/// until `close()` so that nothing else can take the port meanwhile.
final class RefusingPort: @unchecked Sendable {
    let port: UInt16
    private let fd: Int32
    private let closed = Atomic<Bool>(false)

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket failed: \(String(cString: strerror(errno)))") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard bound else {
            let problem = String(cString: strerror(errno))
            Glibc.close(fd)
            throw HarnessError("could not bind a loopback port to refuse connections: \(problem)")
        }
        self.fd = fd
        port = UInt16(bigEndian: address.sin_port)
    }

    func close() {
        if !closed.exchange(true, ordering: .relaxed) { Glibc.close(fd) }
    }

    deinit { close() }
}
