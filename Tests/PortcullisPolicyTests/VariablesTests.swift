import Foundation
import Synchronization
import Testing
import PortcullisCore
import PortcullisGeoIP
import PortcullisRules
import PortcullisTestSupport
import PortcullisWire
@testable import PortcullisPolicy

// `geo`, `map`, `geoip2`, `set`, `allow|deny $var` and `proxy_pass $var` (issue #4), compiled from
// rule text and evaluated through a session record, the way the relay and the log writer read
// them. Semantics: nginx's ngx_stream_geo_module / ngx_stream_map_module, leev's geoip2 module
// (see /work/shared/reference/anchors.md §1.2–1.5) and RULES.md.

// MARK: - Helpers

/// Tests/Fixtures/geoip/, found from this file's path.
private let geoipFixtures = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures/geoip")
private func geoipFixture(_ name: String) -> String { geoipFixtures.appendingPathComponent(name).path }
/// 1.2.3.0/24 → NL (every value type), 1.2.4.0/24 → DE, 2001:db8:1::/48 → JP; build epoch 1700000000.
private let typesDB = geoipFixture("types.mmdb")
/// data/country.mmdb, the real-world country database shipped with the repository.
private let countryDB = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("data/country.mmdb").path

/// No test ever asks DNS.
private struct NoDNS: HostResolver {
    func addresses(of host: String) -> [IPAddress] { [] }
}

private func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

/// `stream { STREAM  server {listen 8080+i; SERVERS[i]; proxy_pass …;} … }`
private func rulesText(_ stream: String, servers: [String] = [""], proxyPass: String = "127.0.0.1:9000") -> String {
    var text = "stream {\n" + stream + "\n"
    for (index, extra) in servers.enumerated() {
        text += "    server {\n        listen \(8080 + index);\n        \(extra)\n        proxy_pass \(proxyPass);\n    }\n"
    }
    return text + "}\n"
}

private func compileRules(_ text: String, geoip: (any GeoIPOpener)? = MaxMindOpener()) -> CompileResult {
    RuleLoader.load(text: text, file: "rules.conf", resolver: NoDNS(), geoip: geoip)
}

/// The error lines (`file:line:col: error: message`) of a compile.
private func compileErrors(_ text: String, geoip: (any GeoIPOpener)? = MaxMindOpener()) -> [String] {
    let result = compileRules(text, geoip: geoip)
    return result.diagnostics.filter { $0.severity == .error }.map(\.description)
}

private struct CompileFailed: Error, CustomStringConvertible {
    var description: String
}

/// A compiled snapshot and a way to read its variables in fresh sessions.
private struct Probe {
    let snapshot: PolicySnapshot

    init(text: String, geoip: (any GeoIPOpener)? = MaxMindOpener()) throws {
        let result = compileRules(text, geoip: geoip)
        guard let snapshot = result.snapshot else { throw CompileFailed(description: "rules do not compile:\n" + result.rendered) }
        self.snapshot = snapshot
    }

    init(_ stream: String, servers: [String] = [""], geoip: (any GeoIPOpener)? = MaxMindOpener()) throws {
        try self.init(text: rulesText(stream, servers: servers), geoip: geoip)
    }

    /// A new session of server `server`, with its variables attached (nothing evaluated yet).
    /// `authority` becomes a PROXY v2 AUTHORITY TLV (`$proxy_protocol_tlv_authority`), a
    /// convenient string source for maps.
    func record(client: String = "192.0.2.7", port: UInt16 = 40000, server: Int = 0,
                authority: String? = nil, proxySource: String? = nil) -> SessionRecord {
        var record = SessionRecord(
            connection: 7, transport: .tcp,
            client: SocketEndpoint(address: IPAddress(client)!, port: port),
            server: SocketEndpoint(address: .v4(0x7F00_0001), port: 8080 + UInt16(server)),
            listener: "127.0.0.1:\(8080 + server)", startTime: 1_764_270_000)
        if authority != nil || proxySource != nil {
            var tlvs: [UInt8] = []
            if let authority {
                let value = bytes(authority)
                tlvs = [ProxyTLVType.authority.rawValue, UInt8(value.count >> 8), UInt8(value.count & 0xFF)] + value
            }
            let addresses: ProxyHeader.Addresses = proxySource.map {
                .inet(source: SocketEndpoint(address: IPAddress($0)!, port: 1234),
                      destination: SocketEndpoint(address: .v4(0x7F00_0001), port: 443))
            } ?? .unspecified
            record.proxyHeader = ProxyHeader(version: .v2, addresses: addresses, tlvBytes: tlvs)
        }
        record.variables = snapshot.servers[server].makeSessionVariables()
        return record
    }

    func index(_ name: String) -> Int? {
        let index = snapshot.variables.index(of: name)
        if index == nil { Issue.record("no variable $\(name) in the snapshot") }
        return index
    }

    /// `$name` in `record` (nil = not found).
    func raw(_ name: String, in record: SessionRecord) -> [UInt8]? {
        guard let index = index(name) else { return nil }
        return VariableRenderer.value(of: .defined(index), in: record, host: .current)
    }

    func value(_ name: String, in record: SessionRecord) -> String? {
        raw(name, in: record).map { String(decoding: $0, as: UTF8.self) }
    }

    /// `$name` in a fresh session.
    func value(_ name: String, client: String = "192.0.2.7", port: UInt16 = 40000, server: Int = 0,
               authority: String? = nil, proxySource: String? = nil) -> String? {
        value(name, in: record(client: client, port: port, server: server, authority: authority, proxySource: proxySource))
    }
}

/// Counts the lookups the `geoip2` variables make, around the real libmaxminddb opener.
private final class LookupCounter: Sendable {
    private let count = Atomic<Int>(0)
    var value: Int { count.load(ordering: .relaxed) }
    func increment() { count.wrappingAdd(1, ordering: .relaxed) }
}

private struct CountingOpener: GeoIPOpener {
    let counter: LookupCounter

    func open(path: String, autoReloadMilliseconds: Int?) throws(GeoIPOpenFailure) -> any GeoIPDatabase {
        CountingDatabase(inner: try MaxMindOpener().open(path: path, autoReloadMilliseconds: autoReloadMilliseconds),
                         counter: counter)
    }
}

private final class CountingDatabase: GeoIPDatabase {
    let inner: any GeoIPDatabase
    let counter: LookupCounter

    init(inner: any GeoIPDatabase, counter: LookupCounter) {
        self.inner = inner
        self.counter = counter
    }

    var path: String { inner.path }
    func makeQuery(_ path: [String]) -> any GeoIPQuery { CountingQuery(inner: inner.makeQuery(path), counter: counter) }
    func metadata(_ field: GeoIPMetadataField) -> UInt64 { inner.metadata(field) }
}

private struct CountingQuery: GeoIPQuery {
    let inner: any GeoIPQuery
    let counter: LookupCounter

    func value(for address: IPAddress) -> [UInt8]? {
        counter.increment()
        return inner.value(for: address)
    }
}

@Suite struct VariablesTests {}

// MARK: - geo

extension VariablesTests {
    @Suite struct Geo {
        static let cidrEntries = [
            "default def;",
            "10.0.0.0/8 eight;",
            "10.1.0.0/16 sixteen;",
            "10.1.2.0/24 twentyfour;",
            "10.1.2.3 host;",
            "2001:db8::/32 v6wide;",
            "2001:db8:1::/48 v6narrow;",
            "2001:db8:1::7/128 v6host;",
        ]

        static let cidrExpectations: [(String, String)] = [
            ("10.1.2.3", "host"), ("10.1.2.4", "twentyfour"), ("10.1.2.255", "twentyfour"), ("10.1.1.255", "sixteen"),
            ("10.1.3.0", "sixteen"), ("10.2.0.0", "eight"), ("10.0.255.255", "eight"), ("10.255.255.255", "eight"),
            ("9.255.255.255", "def"), ("11.0.0.0", "def"), ("0.0.0.0", "def"), ("255.255.255.255", "def"),
            ("2001:db8:1::7", "v6host"), ("2001:db8:1::8", "v6narrow"), ("2001:db8:1:ffff::1", "v6narrow"),
            ("2001:db8:2::1", "v6wide"), ("2001:db8::", "v6wide"), ("2001:db9::1", "def"), ("::1", "def"),
            // IPv4-mapped clients are looked up in the IPv4 table, not in the IPv6 one.
            ("::ffff:10.1.2.3", "host"), ("::ffff:10.1.2.4", "twentyfour"), ("::ffff:11.0.0.1", "def"),
        ]

        @Test("CIDR mode: the most specific block wins, whatever the order of the lines")
        func longestPrefixInAnyOrder() throws {
            var rng = SplitMix64(seed: 0x6E0_0001)
            var orders = [Self.cidrEntries, Array(Self.cidrEntries.reversed())]
            for _ in 0..<6 { orders.append(Self.cidrEntries.shuffled(using: &rng)) }
            for entries in orders {
                let probe = try Probe("geo $g {\n" + entries.joined(separator: "\n") + "\n}")
                for (client, expected) in Self.cidrExpectations {
                    #expect(probe.value("g", client: client) == expected, "client \(client), order \(entries)")
                }
            }
        }

        @Test("CIDR mode: the same block twice — the later value wins")
        func duplicateBlockLaterWins() throws {
            let probe = try Probe("""
                geo $g {
                    192.168.0.0/16 first;
                    10.0.0.0/8 ten;
                    192.168.0.0/16 second;
                    2001:db8::/32 v6first;
                    2001:db8::/32 v6second;
                    10.0.0.0/8 ten-again;
                }
                """)
            #expect(probe.value("g", client: "192.168.5.5") == "second")
            #expect(probe.value("g", client: "10.9.9.9") == "ten-again")
            #expect(probe.value("g", client: "2001:db8::5") == "v6second")
        }

        @Test("no default: an address in no block is the empty string (a value, not \"not found\")")
        func noDefaultIsEmpty() throws {
            let probe = try Probe("geo $g {\n 10.0.0.0/8 ten;\n 2001:db8::/32 doc;\n}")
            #expect(probe.value("g", client: "10.0.0.1") == "ten")
            #expect(probe.value("g", client: "11.0.0.1") == "")
            #expect(probe.value("g", client: "2001:db9::1") == "")
            #expect(probe.value("g", client: "::ffff:11.0.0.1") == "")
        }

        @Test("default applies to IPv4 and IPv6 clients alike")
        func defaultCoversBothFamilies() throws {
            let probe = try Probe("geo $g {\n default d;\n 10.0.0.0/8 ten;\n}")
            #expect(probe.value("g", client: "11.0.0.1") == "d")
            #expect(probe.value("g", client: "2001:db8::1") == "d")
            #expect(probe.value("g", client: "::ffff:10.0.0.1") == "ten")
        }

        /// nginx's stream geo (ngx_stream_geo_cidr): `default V` *is* `0.0.0.0/0 V` plus `::/0 V`,
        /// inserted into the same radix trees, so whichever of `default` and `0.0.0.0/0` comes
        /// later wins ("duplicate network" warning, later value kept).
        @Test("default and 0.0.0.0/0 / ::/0 are the same entry, as nginx: the later one wins")
        func defaultIsTheZeroBlock() throws {
            let zeroFirst = try Probe("geo $g {\n 0.0.0.0/0 zero;\n ::/0 zero6;\n default d;\n 10.0.0.0/8 ten;\n}")
            #expect(zeroFirst.value("g", client: "10.0.0.1") == "ten")
            #expect(zeroFirst.value("g", client: "11.0.0.1") == "d")
            #expect(zeroFirst.value("g", client: "2001:db8::1") == "d")
            let defaultFirst = try Probe("geo $g {\n default d;\n 0.0.0.0/0 zero;\n}")
            #expect(defaultFirst.value("g", client: "11.0.0.1") == "zero")
            #expect(defaultFirst.value("g", client: "2001:db8::1") == "d")
            // `delete 0.0.0.0/0` after `default` takes the default away from IPv4 clients only.
            let deleted = try Probe("geo $g {\n default d;\n delete 0.0.0.0/0;\n 10.0.0.0/8 ten;\n}")
            #expect(deleted.value("g", client: "11.0.0.1") == "")
            #expect(deleted.value("g", client: "10.0.0.1") == "ten")
            #expect(deleted.value("g", client: "2001:db8::1") == "d")
            // In ranges mode, default is only the fallback.
            let ranges = try Probe("geo $g {\n ranges;\n 0.0.0.0-255.255.255.255 all;\n default d;\n}")
            #expect(ranges.value("g", client: "11.0.0.1") == "all")
        }

        @Test("delete removes a block entered before it; a block entered again after it stays")
        func deleteBlocks() throws {
            let probe = try Probe("""
                geo $g {
                    default none;
                    10.0.0.0/8 wide;
                    10.1.0.0/16 narrow;
                    delete 10.1.0.0/16;
                    172.16.0.0/12 gone;
                    delete 172.16.0.0/12;
                    172.16.0.0/12 back;
                    192.168.0.0/16 kept;
                    delete 192.168.1.0/24;
                    2001:db8::/32 v6;
                    2001:db8:1::/48 v6narrow;
                    delete 2001:db8:1::/48;
                    198.51.100.0/24 only;
                    delete 198.51.100.0/24;
                }
                """)
            #expect(probe.value("g", client: "10.1.2.3") == "wide")  // the /16 is gone, the /8 remains
            #expect(probe.value("g", client: "10.2.0.1") == "wide")
            #expect(probe.value("g", client: "172.16.1.1") == "back")
            #expect(probe.value("g", client: "192.168.1.1") == "kept")  // deleting a block never entered: no effect
            #expect(probe.value("g", client: "2001:db8:1::1") == "v6")
            #expect(probe.value("g", client: "198.51.100.7") == "none")
        }

        @Test("geo $src $var: the source's text is the address; a mapped address uses the IPv4 table; anything else is 255.255.255.255")
        func sourceVariable() throws {
            let probe = try Probe("""
                map $remote_port $src {
                    1 10.1.1.1;
                    2 ::ffff:10.2.2.2;
                    3 not-an-address;
                    4 2001:db8::9;
                    5 "";
                    6 10.0.0.0/8;
                }
                geo $src $g {
                    default def;
                    10.0.0.0/8 ten;
                    2001:db8::/32 doc6;
                    255.255.255.255/32 broadcast;
                }
                geo $proxy_protocol_addr $pp {
                    default def;
                    198.51.100.0/24 pp-net;
                    255.255.255.255 none;
                }
                geo $remote_addr $plain {
                    default def;
                    192.0.2.0/24 doc;
                }
                """)
            // The client (192.0.2.7) must not be what is looked up.
            #expect(probe.value("g", client: "192.0.2.7", port: 1) == "ten")
            #expect(probe.value("g", client: "192.0.2.7", port: 2) == "ten")
            #expect(probe.value("g", client: "192.0.2.7", port: 3) == "broadcast")
            #expect(probe.value("g", client: "192.0.2.7", port: 4) == "doc6")
            #expect(probe.value("g", client: "192.0.2.7", port: 5) == "broadcast")
            #expect(probe.value("g", client: "192.0.2.7", port: 6) == "broadcast")
            #expect(probe.value("g", client: "10.0.0.1", port: 7) == "broadcast")  // map default "" → not an address
            // No PROXY header: $proxy_protocol_addr is empty, so 255.255.255.255.
            #expect(probe.value("pp", client: "198.51.100.1") == "none")
            #expect(probe.value("pp", client: "192.0.2.7", proxySource: "198.51.100.9") == "pp-net")
            // An explicit $remote_addr source behaves like the default source.
            #expect(probe.value("plain", client: "192.0.2.200") == "doc")
            #expect(probe.value("plain", client: "::ffff:192.0.2.200") == "doc")
        }

        @Test("ranges: inner ranges win where nested, delete removes a range, IPv6 clients are 255.255.255.255")
        func rangesMode() throws {
            let probe = try Probe("""
                geo $r {
                    ranges;
                    default def;
                    10.0.0.0-10.0.0.255 a;
                    10.0.0.10-10.0.0.19 b;
                    10.0.0.0-10.0.0.3 head;
                    10.0.0.250-10.0.0.255 tail;
                    10.0.1.0-10.0.1.255 c;
                    10.0.1.0-10.0.1.255 c-again;
                    10.0.3.0-10.0.3.255 gone;
                    delete 10.0.3.0-10.0.3.255;
                    10.0.4.0-10.0.4.255 span;
                    10.0.4.100-10.0.4.100 one;
                    delete 10.0.4.100-10.0.4.100;
                    9.255.255.255-10.0.0.0 cross;
                    255.255.255.0-255.255.255.255 top;
                }
                """)
            let expectations: [(String, String)] = [
                ("10.0.0.5", "a"), ("10.0.0.9", "a"), ("10.0.0.10", "b"), ("10.0.0.19", "b"), ("10.0.0.20", "a"),
                ("10.0.0.1", "head"), ("10.0.0.3", "head"), ("10.0.0.4", "a"), ("10.0.0.249", "a"), ("10.0.0.250", "tail"),
                ("10.0.0.255", "tail"), ("10.0.1.0", "c-again"), ("10.0.1.255", "c-again"), ("10.0.2.0", "def"),
                ("10.0.3.7", "def"), ("10.0.4.99", "span"), ("10.0.4.100", "def"), ("10.0.4.101", "span"),
                ("9.255.255.255", "cross"), ("9.255.255.254", "def"),
                ("255.255.255.255", "top"), ("255.255.254.255", "def"),
                // A mapped client is its IPv4 address; any other IPv6 client is 255.255.255.255.
                ("::ffff:10.0.0.12", "b"), ("2001:db8::1", "top"), ("::1", "top"), ("::ffff:255.255.255.1", "top"),
            ]
            for (client, expected) in expectations {
                #expect(probe.value("r", client: client) == expected, "client \(client)")
            }
            // Nothing covers 255.255.255.255 and no default: an IPv6 client gets "".
            let bare = try Probe("geo $r {\n ranges;\n 10.0.0.0-10.0.0.255 a;\n}")
            #expect(bare.value("r", client: "2001:db8::1") == "")
            #expect(bare.value("r", client: "10.0.1.0") == "")
            #expect(bare.value("r", client: "10.0.0.0") == "a")
        }

        /// nginx's ranges store: a range inside an earlier one (strictly, or sharing its start
        /// or its end) overrides that part; any other overlap is refused, located.
        @Test("ranges: nesting splits an earlier range, a partial overlap is an error (as nginx)")
        func rangesNestingAndOverlap() throws {
            let probe = try Probe("""
                geo $r {
                    ranges;
                    10.0.1.0-10.0.1.255 c;
                    10.0.1.16-10.0.1.31 inner;
                    10.0.1.0-10.0.1.3 head;
                    10.0.1.250-10.0.1.255 tail;
                    10.0.1.16-10.0.1.31 again;
                }
                """)
            let expectations: [(String, String)] = [
                ("10.0.0.255", ""), ("10.0.1.0", "head"), ("10.0.1.3", "head"), ("10.0.1.4", "c"),
                ("10.0.1.15", "c"), ("10.0.1.16", "again"), ("10.0.1.31", "again"), ("10.0.1.32", "c"),
                ("10.0.1.249", "c"), ("10.0.1.250", "tail"), ("10.0.1.255", "tail"), ("10.0.2.0", ""),
            ]
            for (client, expected) in expectations {
                #expect(probe.value("r", client: client) == expected, "client \(client)")
            }
            let crossing = compileErrors(rulesText("    geo $r {\n        ranges;\n        10.0.1.0-10.0.1.255 c;\n        10.0.1.128-10.0.2.127 d;\n    }"))
            #expect(crossing == ["rules.conf:5:9: error: range \"10.0.1.128-10.0.2.127\" overlaps \"10.0.1.0-10.0.1.255\"; in \"ranges\" mode a range may only lie inside an earlier one (as nginx)"])
            let covering = compileErrors(rulesText("    geo $r {\n        ranges;\n        10.0.1.16-10.0.1.31 c;\n        10.0.1.0-10.0.1.255 d;\n    }"))
            #expect(covering.count == 1 && covering[0].contains("overlaps \"10.0.1.16-10.0.1.31\""), "\(covering)")
        }

        /// nginx deletes only pieces exactly as stored (ranges are cut at /16 boundaries), and
        /// warns about the rest.
        @Test("ranges: delete removes only a range as stored, per /16; anything else warns")
        func rangesDelete() throws {
            let probe = try Probe("""
                geo $r {
                    ranges;
                    default d;
                    1.0.0.0-1.0.0.255 ok;
                    delete 1.0.0.0-1.0.0.127;
                    2.0.0.0-2.1.255.255 wide;
                    delete 2.1.0.0-2.1.255.255;
                    3.0.0.0-3.0.0.9 gone;
                    delete 3.0.0.0-3.0.0.9;
                }
                """)
            #expect(probe.value("r", client: "1.0.0.0") == "ok")  // not deleted: not a stored piece
            #expect(probe.value("r", client: "2.0.255.255") == "wide")
            #expect(probe.value("r", client: "2.1.0.0") == "d")  // its own /16 piece: deleted
            #expect(probe.value("r", client: "3.0.0.5") == "d")
            let result = RuleLoader.load(text: rulesText("    geo $r {\n        ranges;\n        1.0.0.0-1.0.0.255 ok;\n        delete 1.0.0.0-1.0.0.127;\n    }"), file: "rules.conf")
            #expect(result.diagnostics.filter { $0.severity == .warning }.map(\.description)
                == ["rules.conf:5:16: warning: no address range \"1.0.0.0-1.0.0.127\" to delete (only a range exactly as written before, within each /16, can be deleted)"])
        }

        @Test("ranges must come first: after an entry (or default) it is an error, located")
        func rangesAfterEntry() {
            let afterEntry = compileErrors(rulesText("    geo $r {\n        10.0.0.0-10.0.0.5 a;\n        ranges;\n    }"))
            #expect(afterEntry.count == 1)
            #expect(afterEntry.first?.hasPrefix("rules.conf:4:9: error: \"ranges\" must come before the first entry") == true,
                    "\(afterEntry)")
            let afterDefault = compileErrors(rulesText("    geo $r {\n        default x;\n        ranges;\n        10.0.0.0-10.0.0.5 a;\n    }"))
            #expect(afterDefault.first?.hasPrefix("rules.conf:4:9: error: \"ranges\" must come before") == true, "\(afterDefault)")
            // CIDR text in ranges mode, and an inverted range, are errors too.
            #expect(!compileErrors(rulesText("    geo $r {\n        ranges;\n        10.0.0.0/8 a;\n    }")).isEmpty)
            #expect(!compileErrors(rulesText("    geo $r {\n        ranges;\n        10.0.0.9-10.0.0.1 a;\n    }")).isEmpty)
            #expect(!compileErrors(rulesText("    geo $r {\n        ranges;\n        2001:db8::1-2001:db8::9 a;\n    }")).isEmpty)
        }

        /// A reference model for CIDR mode: among the blocks that contain the address, the
        /// longest; among equal blocks, the last one entered. Randomized, bounded.
        @Test("CIDR mode agrees with a brute-force longest-prefix model (randomized)")
        func randomizedAgainstModel() throws {
            var rng = SplitMix64(seed: 0xC1D2_0004)
            for _ in 0..<12 {
                var lines: [String] = []
                var blocks: [(CIDR, String)] = []
                for index in 0..<Int.random(in: 1...40, using: &rng) {
                    let base = 0x0A00_0000 | UInt32.random(in: 0..<0x1_0000, using: &rng) << 8
                    let block = CIDR(address: .v4(base), prefixLength: Int.random(in: 8...32, using: &rng))
                    let text = "\(block)"
                    guard let parsed = CIDR(text) else { continue }
                    let value = "v\(index % 7)"
                    lines.append("\(text) \(value);")
                    blocks.append((parsed, value))
                }
                let probe = try Probe("geo $g {\n default none;\n" + lines.joined(separator: "\n") + "\n}")
                var probes: [UInt32] = []
                for (block, _) in blocks {
                    let range = block.ipv4Range!
                    probes += [range.lowerBound, range.upperBound, range.lowerBound &- 1, range.upperBound &+ 1]
                }
                for _ in 0..<50 { probes.append(0x0A00_0000 | UInt32.random(in: 0..<0x100_0000, using: &rng)) }
                for address in probes {
                    var best: (length: Int, value: String)?
                    for (block, value) in blocks where block.contains(.v4(address)) {
                        if best == nil || block.prefixLength >= best!.length { best = (block.prefixLength, value) }
                    }
                    let client = IPAddress.v4(address).description
                    #expect(probe.value("g", client: client) == (best?.value ?? "none"), "client \(client) with \(lines)")
                }
            }
        }
    }
}

// MARK: - map

extension VariablesTests {
    @Suite struct Map {
        @Test("exact keys match case-insensitively; \\default is a literal key; no match and no default is \"\"")
        func exactKeys() throws {
            let probe = try Probe(#"""
                map $proxy_protocol_tlv_authority $m {
                    Example.COM   upper;
                    foo.test      foo;
                    \default      literal-default;
                    default       other;
                }
                map $proxy_protocol_tlv_authority $nodefault {
                    a.test  a;
                }
                """#)
            #expect(probe.value("m", authority: "example.com") == "upper")
            #expect(probe.value("m", authority: "EXAMPLE.com") == "upper")
            #expect(probe.value("m", authority: "FOO.TEST") == "foo")
            #expect(probe.value("m", authority: "default") == "literal-default")
            #expect(probe.value("m", authority: "DEFAULT") == "literal-default")
            #expect(probe.value("m", authority: "example.com.") == "other")  // no hostnames: the dot matters
            #expect(probe.value("m", authority: "bar") == "other")
            #expect(probe.value("m") == "other")  // no PROXY header: the source is ""
            #expect(probe.value("nodefault", authority: "A.test") == "a")
            #expect(probe.value("nodefault", authority: "b.test") == "")
        }

        @Test("hostnames: exact → longest prefix mask → longest suffix mask → first regex → default")
        func hostnamesPriority() throws {
            let probe = try Probe(#"""
                map $proxy_protocol_tlv_authority $site {
                    hostnames;
                    default           dflt;
                    www.example.com   exact;
                    *.example.com     star;
                    .shop.example.com dotshop;
                    *.a.example.com   star-a;
                    www.example.*     tail-www-example;
                    www.*             tail-www;
                    ~^www             regex-www;
                    ~^api\d+\.        regex-api;
                    ~*^MAIL\.         regex-mail;
                    ~^api             regex-api-later;
                }
                """#)
            let expectations: [(String, String)] = [
                ("www.example.com", "exact"), ("WWW.Example.Com", "exact"), ("www.example.com.", "exact"),
                ("x.example.com", "star"), ("deep.x.example.com", "star"), ("example.com", "dflt"),
                // `.shop.example.com` matches the bare name and every subdomain, and is longer than *.example.com.
                ("shop.example.com", "dotshop"), ("x.shop.example.com", "dotshop"), ("SHOP.example.COM", "dotshop"),
                ("b.a.example.com", "star-a"), ("a.example.com", "star"),
                // A prefix mask beats a suffix mask.
                ("www.x.example.com", "star"),
                ("www.example.org", "tail-www-example"), ("www.example.co.uk", "tail-www-example"),
                ("www.other.org", "tail-www"), ("WWW.other.org", "tail-www"),
                // Masks beat regexes; the first regex in file order wins; `~` is case-sensitive, `~*` not.
                ("api1.example.com", "star"), ("api1.internal", "regex-api"), ("apix.internal", "regex-api-later"),
                ("API1.internal", "dflt"), ("mail.internal", "regex-mail"), ("Mail.Internal", "regex-mail"),
                ("wwwx", "regex-www"), ("nothing", "dflt"),
            ]
            for (key, expected) in expectations {
                #expect(probe.value("site", authority: key) == expected, "key \(key)")
            }
        }

        @Test("without hostnames, mask-looking keys are plain strings")
        func masksNeedHostnames() throws {
            let probe = try Probe("map $proxy_protocol_tlv_authority $m {\n *.example.com star;\n default d;\n}")
            #expect(probe.value("m", authority: "x.example.com") == "d")
            #expect(probe.value("m", authority: "*.example.com") == "star")
        }

        @Test("regex captures: $1…$9 and named groups in the value, with other variables")
        func captures() throws {
            let probe = try Probe(#"""
                map $proxy_protocol_tlv_authority $cap {
                    "~^(?<cc>[a-z]{2})-(\d+)\.example$"  "$cc:$2:$1";
                    ~*^X-(.*)$                           "x=$1 from $remote_addr";
                    ~^(a)(b)?c                           "[$1][$2]";
                    default                              "none for ${remote_addr}:$remote_port";
                }
                """#)
            #expect(probe.value("cap", client: "192.0.2.7", authority: "nl-42.example") == "nl:42:nl")
            #expect(probe.value("cap", client: "192.0.2.7", authority: "NL-42.example") == "none for 192.0.2.7:40000")
            #expect(probe.value("cap", client: "192.0.2.8", authority: "x-Foo Bar") == "x=Foo Bar from 192.0.2.8")
            #expect(probe.value("cap", client: "192.0.2.8", authority: "X-") == "x= from 192.0.2.8")
            #expect(probe.value("cap", authority: "ac") == "[a][]")  // an unmatched group is empty
            #expect(probe.value("cap", authority: "zzz-1.example") == "none for 192.0.2.7:40000")
        }

        @Test("values may read other variables: built-ins, geo, other maps")
        func valuesWithVariables() throws {
            let probe = try Probe("""
                geo $zone {
                    default outside;
                    10.0.0.0/8 inside;
                }
                map $zone $label {
                    inside "in:$remote_addr";
                    default $remote_addr;
                }
                map $label $shout {
                    default "<$label|$zone>";
                }
                """)
            #expect(probe.value("label", client: "10.1.1.1") == "in:10.1.1.1")
            #expect(probe.value("label", client: "192.0.2.9") == "192.0.2.9")
            #expect(probe.value("shout", client: "10.1.1.1") == "<in:10.1.1.1|inside>")
            #expect(probe.value("shout", client: "2001:db8::1") == "<2001:db8::1|outside>")
        }

        @Test("conflicting exact keys (case-insensitively) are an error at the second key, naming the first")
        func conflictingKeys() {
            let errors = compileErrors(rulesText("    map $remote_addr $m {\n        Foo 1;\n        foo 2;\n    }"))
            #expect(errors.count == 1)
            let first = errors.first ?? ""
            #expect(first.hasPrefix("rules.conf:4:9: error: conflicting key"), "\(errors)")
            #expect(first.contains("rules.conf:3:9"), "\(errors)")
        }

        /// ngx_stream_map_module: a second `default` is "duplicate default map parameter", and a
        /// mask given twice is "conflicting parameter" (ngx_hash_add_key answers NGX_BUSY), just
        /// like an exact key given twice. Accepting them silently hides a typo'd rule file.
        @Test("a second default, or the same mask twice, is an error as in nginx")
        func duplicateDefaultAndMask() {
            let twoDefaults = compileErrors(rulesText("    map $remote_addr $m {\n        default 1;\n        default 2;\n    }"))
            #expect(twoDefaults.count == 1, "\(twoDefaults)")
            #expect(twoDefaults.first?.hasPrefix("rules.conf:4:9: error: ") == true, "\(twoDefaults)")
            let twoMasks = compileErrors(rulesText(
                "    map $remote_addr $m {\n        hostnames;\n        *.example.com 1;\n        *.EXAMPLE.com 2;\n    }"))
            #expect(twoMasks.count == 1, "\(twoMasks)")
            #expect(twoMasks.first?.hasPrefix("rules.conf:5:9: error: ") == true, "\(twoMasks)")
        }

        @Test("an invalid regex is an error at the key's line:column")
        func invalidRegex() {
            let errors = compileErrors(rulesText("    map $remote_addr $m {\n        default 0;\n        \"~(unclosed\" 1;\n    }"))
            #expect(errors.count == 1)
            #expect(errors.first?.hasPrefix("rules.conf:4:9: error: invalid regular expression \"(unclosed\"") == true, "\(errors)")
        }

        @Test("hostnames after an entry is an error")
        func hostnamesMustComeFirst() {
            let errors = compileErrors(rulesText("    map $remote_addr $m {\n        a 1;\n        hostnames;\n    }"))
            #expect(errors.first?.hasPrefix("rules.conf:4:9: error: \"hostnames\" must come before") == true, "\(errors)")
        }

        @Test("the source may combine variables and text")
        func compositeSource() throws {
            let probe = try Probe("""
                map "$remote_addr:$remote_port" $pair {
                    192.0.2.7:1 one;
                    "~^192\\.0\\.2\\.7:(\\d+)$" "port $1";
                    default none;
                }
                """)
            #expect(probe.value("pair", client: "192.0.2.7", port: 1) == "one")
            #expect(probe.value("pair", client: "192.0.2.7", port: 443) == "port 443")
            #expect(probe.value("pair", client: "192.0.2.8", port: 1) == "none")
        }
    }
}

// MARK: - set

extension VariablesTests {
    @Suite struct SetDirective {
        @Test("set is per server: a server without it sees \"not found\"; values may use variables")
        func perServer() throws {
            let probe = try Probe("""
                geo $zone {
                    default outside;
                    10.0.0.0/8 inside;
                }
                log_format who '$who|$zone';
                """, servers: [
                    #"set $who "alpha-$remote_addr-$zone";"#,
                    "",
                    "set $who beta; set $who gamma;",
                ])
            #expect(probe.value("who", client: "10.1.1.1", server: 0) == "alpha-10.1.1.1-inside")
            #expect(probe.value("who", client: "10.1.1.1", server: 1) == nil)
            #expect(probe.value("who", client: "10.1.1.1", server: 2) == "gamma")  // the later set wins
            // In a log line "not found" is "-".
            let format = try #require(probe.snapshot.logFormats["who"])
            #expect(format.render(probe.record(client: "192.0.2.1", server: 1)) == "-|outside")
            #expect(format.render(probe.record(client: "192.0.2.1", server: 0)) == "alpha-192.0.2.1-outside|outside")
        }
    }
}

// MARK: - Compile-time checks

extension VariablesTests {
    @Suite struct Checks {
        @Test("variables that refer to each other in a cycle are refused")
        func cycles() {
            let direct = compileErrors(rulesText("""
                    map $a $b { default x; }
                    map $b $a { default y; }
                """))
            #expect(direct.contains { $0.contains("cycle") }, "\(direct)")
            let throughValues = compileErrors(rulesText("""
                    map $remote_addr $p { default "<$q>"; }
                    map $remote_addr $q { 1.2.3.4 x; default $r; }
                    geo $p $r { default z; }
                """))
            #expect(throughValues.contains { $0.contains("cycle") }, "\(throughValues)")
            let selfReference = compileErrors(rulesText("    map $s $s { default 1; }"))
            #expect(selfReference.contains { $0.contains("cycle") }, "\(selfReference)")
            // A chain that is not a cycle compiles.
            #expect(compileErrors(rulesText("""
                    map $remote_addr $x { default 1; }
                    map $x $y { default $x; }
                    map $y $z { default "$x$y"; }
                """)).isEmpty)
        }

        @Test("an unknown variable is an error with a \"did you mean\"")
        func unknownVariable() {
            let builtin = compileErrors(rulesText("    map $remote_adr $m { default 1; }"))
            #expect(builtin.first?.contains("unknown variable \"$remote_adr\" in \"map\"; did you mean \"$remote_addr\"?") == true,
                    "\(builtin)")
            let defined = compileErrors(rulesText("""
                    geo $geo_country { default ZZ; }
                    log_format f "$geo_countyr";
                """))
            #expect(defined.first?.contains("did you mean \"$geo_country\"?") == true, "\(defined)")
            let inDeny = compileErrors(rulesText("    geo $bad_country { default 0; }", servers: ["deny $bad_contry;"]))
            #expect(inDeny.first?.contains("did you mean \"$bad_country\"?") == true, "\(inDeny)")
            let inValue = compileErrors(rulesText("    map $remote_addr $m { default $sever_port; }"))
            #expect(inValue.first?.contains("did you mean \"$server_port\"?") == true, "\(inValue)")
            let inProxyPass = compileErrors(rulesText("    map $remote_addr $backend { default 127.0.0.1:1; }",
                                                      proxyPass: "$backnd"))
            #expect(inProxyPass.first?.contains("did you mean \"$backend\"?") == true, "\(inProxyPass)")
        }

        @Test("a built-in variable cannot be redefined")
        func builtinRedefinition() {
            for stream in ["    geo $remote_addr { default 1; }", "    map $remote_addr $status { default 1; }",
                           "    geo $remote_addr $proxy_protocol_tlv_authority { default 1; }",
                           "    geoip2 \(typesDB) { $remote_port country iso_code; }"] {
                let errors = compileErrors(rulesText(stream))
                #expect(errors.contains { $0.contains("built-in variable") }, "\(stream): \(errors)")
            }
            let set = compileErrors(rulesText("", servers: ["set $remote_port 1;"]))
            #expect(set.contains { $0.contains("built-in variable") }, "\(set)")
        }

        @Test("a name defined twice (geo, map, geoip2, set) is an error naming the first definition")
        func duplicates() {
            let cases = [
                "    geo $dup { default 1; }\n    geo $dup { default 2; }",
                "    geo $dup { default 1; }\n    map $remote_addr $dup { default 2; }",
                "    map $remote_addr $dup { default 1; }\n    map $remote_port $dup { default 2; }",
                "    geoip2 \(typesDB) { $dup country iso_code; }\n    map $remote_addr $dup { default 2; }",
                "    geoip2 \(typesDB) { $dup country iso_code; $dup asn; }",
            ]
            for stream in cases {
                let errors = compileErrors(rulesText(stream))
                #expect(errors.count == 1, "\(stream): \(errors)")
                #expect(errors.first?.contains("duplicate variable \"$dup\"; it was first defined at rules.conf:2:") == true,
                        "\(stream): \(errors)")
            }
            let setAndMap = compileErrors(rulesText("    map $remote_addr $dup { default 1; }", servers: ["set $dup 2;"]))
            #expect(setAndMap.contains { $0.contains("duplicate variable \"$dup\"") }, "\(setAndMap)")
            // The same `set` name in two servers (or twice in one) is not a duplicate.
            #expect(compileErrors(rulesText("", servers: ["set $x 1;", "set $x 2; set $x 3;"])).isEmpty)
        }
    }
}

// MARK: - allow / deny $var

extension VariablesTests {
    @Suite struct AccessByVariable {
        static func rule(_ action: AccessRule.Action, _ match: AccessRule.Match, line: Int) -> AccessRule {
            AccessRule(action: action, match: match, reference: RuleReference(file: "t.conf", line: line, text: "rule \(line)"))
        }

        static func variable(_ index: Int) -> AccessRule.Match { .variable(.defined(index)) }

        /// Builds a list from "allow 10.0.0.0/8", "deny $0", "allow all" lines.
        static func list(_ lines: [String]) -> AccessList {
            AccessList(rules: lines.enumerated().map { offset, line in
                let words = line.split(separator: " ").map(String.init)
                let action: AccessRule.Action = words[0] == "allow" ? .allow : .deny
                let match: AccessRule.Match
                if words[1] == "all" {
                    match = .all
                } else if words[1].hasPrefix("$") {
                    match = variable(Int(words[1].dropFirst())!)
                } else {
                    match = .block(CIDR(words[1])!)
                }
                return rule(action, match, line: offset + 1)
            })
        }

        /// Evaluates with variable values by index, recording which variables were read, in order.
        static func evaluate(_ list: AccessList, _ address: String, _ values: [Int: String?]) -> (AccessVerdict, [Int]) {
            var reads: [Int] = []
            let verdict = list.evaluate(IPAddress(address)!) { variable in
                guard case .defined(let index) = variable else { Issue.record("unexpected \(variable)"); return nil }
                reads.append(index)
                return (values[index] ?? nil).map { Array($0.utf8) }
            }
            return (verdict, reads)
        }

        @Test("first match wins across address and variable rules")
        func ordering() {
            let addressFirst = Self.list(["allow 10.0.0.0/8", "deny $0"])
            var (verdict, reads) = Self.evaluate(addressFirst, "10.1.2.3", [0: "1"])
            #expect(verdict.allowed && verdict.rule?.reference.line == 1 && verdict.variableValue == nil)
            #expect(reads.isEmpty, "an earlier address rule decided: the variable must not be read")
            (verdict, reads) = Self.evaluate(addressFirst, "11.1.2.3", [0: "CN"])
            #expect(!verdict.allowed && verdict.rule?.reference.line == 2)
            #expect(verdict.variableValue == Array("CN".utf8))
            #expect(reads == [0])
            (verdict, reads) = Self.evaluate(addressFirst, "11.1.2.3", [0: ""])
            #expect(verdict.allowed && verdict.rule == nil)  // no match: allowed

            let variableFirst = Self.list(["deny $0", "allow all"])
            (verdict, reads) = Self.evaluate(variableFirst, "10.1.2.3", [0: "1"])
            #expect(!verdict.allowed && verdict.rule?.reference.line == 1 && reads == [0])
            (verdict, reads) = Self.evaluate(variableFirst, "10.1.2.3", [0: "0"])
            #expect(verdict.allowed && verdict.rule?.reference.line == 2 && reads == [0])
            (verdict, _) = Self.evaluate(variableFirst, "2001:db8::1", [0: "x"])
            #expect(!verdict.allowed)

            // allow $var before a deny: a set variable lets the client in.
            let allowVariable = Self.list(["allow $0", "deny 10.0.0.0/8", "deny $1", "allow all"])
            (verdict, reads) = Self.evaluate(allowVariable, "10.0.0.1", [0: "yes", 1: "1"])
            #expect(verdict.allowed && verdict.rule?.reference.line == 1 && reads == [0])
            (verdict, reads) = Self.evaluate(allowVariable, "10.0.0.1", [0: "", 1: "1"])
            #expect(!verdict.allowed && verdict.rule?.reference.line == 2 && reads == [0])
            (verdict, reads) = Self.evaluate(allowVariable, "11.0.0.1", [0: nil, 1: "1"])
            #expect(!verdict.allowed && verdict.rule?.reference.line == 3 && reads == [0, 1])
            (verdict, reads) = Self.evaluate(allowVariable, "11.0.0.1", [0: "0", 1: "0"])
            #expect(verdict.allowed && verdict.rule?.reference.line == 4 && reads == [0, 1])
        }

        @Test("a variable rule matches a value that is neither empty nor \"0\" (and not \"not found\")")
        func truthiness() {
            let list = Self.list(["deny $0", "allow all"])
            let cases: [(String?, Bool)] = [
                (nil, false), ("", false), ("0", false),
                ("00", true), ("x", true), ("1", true), (" ", true), ("0 ", true), ("false", true), ("-", true),
            ]
            for (value, matches) in cases {
                let (verdict, _) = Self.evaluate(list, "192.0.2.1", [0: value])
                #expect(verdict.allowed == !matches, "value \(String(describing: value))")
                #expect(AccessList.isSet(value.map { Array($0.utf8) }) == matches, "value \(String(describing: value))")
            }
        }

        @Test("laziness: variables after the deciding address rule are never read")
        func laziness() {
            let list = Self.list(["allow 10.0.0.0/8", "deny $0", "deny 192.0.2.0/24", "deny $1", "allow all"])
            var (verdict, reads) = Self.evaluate(list, "10.9.9.9", [0: "1", 1: "1"])
            #expect(verdict.allowed && reads.isEmpty)
            (verdict, reads) = Self.evaluate(list, "192.0.2.1", [0: "", 1: "1"])
            #expect(!verdict.allowed && verdict.rule?.reference.line == 3 && reads == [0])
            (verdict, reads) = Self.evaluate(list, "198.51.100.1", [0: "", 1: ""])
            #expect(verdict.allowed && verdict.rule?.reference.line == 5 && reads == [0, 1])
            (verdict, reads) = Self.evaluate(list, "198.51.100.1", [0: "1", 1: "1"])
            #expect(!verdict.allowed && verdict.rule?.reference.line == 2 && reads == [0])
        }

        /// `evaluate` (tables + walk of the variable rules before the address match) against
        /// `evaluateByScan` (the obvious loop): same verdict, and the same variables read in the
        /// same order — which is also the laziness contract.
        @Test("evaluate equals evaluateByScan on random mixtures of address and variable rules")
        func randomizedAgainstScan() {
            var rng = SplitMix64(seed: 0xDE11_0004)
            let blocks = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "192.0.2.0/24", "0.0.0.0/0", "2001:db8::/32",
                          "2001:db8:1::/48", "::/0", "::ffff:10.0.0.0/104", "::ffff:0:0/96", "::1"]
            let addresses = ["10.1.2.3", "10.1.2.4", "10.2.0.0", "192.0.2.9", "198.51.100.1", "::ffff:10.1.2.3",
                             "::ffff:192.0.2.9", "::ffff:8.8.8.8", "2001:db8::1", "2001:db8:1::1", "::1", "2001:db9::1"]
            let values: [String?] = [nil, "", "0", "1", "00", "CN"]
            var compared = 0
            for _ in 0..<250 {
                var rules: [AccessRule] = []
                for line in 1...Int.random(in: 1...8, using: &rng) {
                    let action: AccessRule.Action = Bool.random(using: &rng) ? .allow : .deny
                    let match: AccessRule.Match
                    switch Int.random(in: 0..<10, using: &rng) {
                    case 0: match = .all
                    case 1...4: match = Self.variable(Int.random(in: 0..<3, using: &rng))
                    default: match = .block(CIDR(blocks.randomElement(using: &rng)!)!)
                    }
                    rules.append(Self.rule(action, match, line: line))
                }
                let list = AccessList(rules: rules)
                for address in addresses {
                    let assignment = (0..<3).map { _ in values.randomElement(using: &rng)! }
                    var fastReads: [Int] = []
                    var scanReads: [Int] = []
                    let fast = list.evaluate(IPAddress(address)!) { variable in
                        guard case .defined(let index) = variable else { return nil }
                        fastReads.append(index)
                        return assignment[index].map { Array($0.utf8) }
                    }
                    let scan = list.evaluateByScan(IPAddress(address)!) { variable in
                        guard case .defined(let index) = variable else { return nil }
                        scanReads.append(index)
                        return assignment[index].map { Array($0.utf8) }
                    }
                    #expect(fast == scan, "\(address) with \(rules.map { "\($0.action) \($0.match)" }) and \(assignment)")
                    #expect(fastReads == scanReads, "\(address) with \(rules.map { "\($0.action) \($0.match)" }) and \(assignment)")
                    compared += 1
                }
            }
            #expect(compared == 250 * addresses.count)
        }

        @Test("compiled rules: allow 10.0.0.0/8; deny $bad lets 10.x in; deny $bad; allow all refuses")
        func compiledOrdering() throws {
            let probe = try Probe("""
                geo $bad {
                    default "";
                    10.0.0.0/8 1;
                    192.0.2.0/24 1;
                    198.51.100.0/24 0;
                }
                """, servers: ["allow 10.0.0.0/8; deny $bad;", "deny $bad; allow all;", ""])
            func verdict(_ client: String, server: Int) -> AccessVerdict {
                let record = probe.record(client: client, server: server)
                return probe.snapshot.servers[server].access.evaluate(record.client.address) {
                    VariableRenderer.value(of: $0, in: record, host: .current)
                }
            }
            #expect(verdict("10.1.1.1", server: 0).allowed)
            #expect(verdict("10.1.1.1", server: 0).rule?.reference.text == "allow 10.0.0.0/8;")
            #expect(!verdict("192.0.2.1", server: 0).allowed)
            #expect(verdict("198.51.100.1", server: 0).allowed)  // "0" is not set
            #expect(!verdict("10.1.1.1", server: 1).allowed)
            let denied = verdict("192.0.2.1", server: 1)
            #expect(denied.rule?.reference.text == "deny $bad;")
            #expect(denied.rule?.match == .variable(.defined(probe.snapshot.variables.index(of: "bad")!)))
            #expect(denied.rule?.variableName == "$bad")
            #expect(denied.variableValue == Array("1".utf8))
            #expect(verdict("203.0.113.1", server: 1).rule?.reference.text == "allow all;")
            #expect(probe.snapshot.servers[1].access.hasVariableRules)
            #expect(!probe.snapshot.servers[2].access.hasVariableRules)
            // Stream-level rules are inherited by a server with none of its own.
            let inherited = try Probe("geo $bad {\n default 1;\n}\ndeny $bad;")
            #expect(inherited.snapshot.servers[0].access.hasVariableRules)
        }
    }
}

// MARK: - geoip2

extension VariablesTests {
    @Suite struct GeoIP2 {
        static let block = """
            geoip2 \(typesDB) {
                $cc default=XX country iso_code;
                $cc_plain country iso_code;
                $cc_empty_default default= country iso_code;
                $country_name country names en;
                $asn asn;
                $latitude location latitude;
                $flag flag_true;
                $list list;
                $src_cc default=ZZ source=$lookup country iso_code;
                $pp_cc source=$proxy_protocol_addr country iso_code;
                $epoch metadata build_epoch;
            }
            map $remote_port $lookup {
                1 1.2.3.4;
                2 ::ffff:1.2.4.5;
                3 not-an-address;
                4 2001:db8:1::5;
            }
            """

        @Test("values found and not found, default=, source=, metadata build_epoch")
        func lookups() throws {
            let probe = try Probe(Self.block)
            #expect(probe.value("cc", client: "1.2.3.4") == "NL")
            #expect(probe.value("cc", client: "::ffff:1.2.3.4") == "NL")
            #expect(probe.value("cc", client: "1.2.4.5") == "DE")
            #expect(probe.value("cc", client: "2001:db8:1::5") == "JP")
            #expect(probe.value("cc", client: "10.1.2.3") == "XX")
            #expect(probe.value("cc_plain", client: "1.2.3.4") == "NL")
            #expect(probe.value("cc_plain", client: "10.1.2.3") == nil)  // not found, no default (leev: not_found)
            #expect(probe.value("country_name", client: "1.2.3.4") == "Netherlands")
            #expect(probe.value("asn", client: "1.2.3.4") == "64500")
            #expect(probe.value("flag", client: "1.2.3.4") == "1")
            #expect(probe.value("list", client: "1.2.3.4") == nil)  // an array has no text
            #expect(probe.value("latitude", client: "1.2.3.4")?.hasPrefix("52.37") == true)
            // source=: the variable's text is the address; one that is not an address is "not found".
            #expect(probe.value("src_cc", client: "10.1.2.3", port: 1) == "NL")
            #expect(probe.value("src_cc", client: "10.1.2.3", port: 2) == "DE")
            #expect(probe.value("src_cc", client: "1.2.3.4", port: 3) == "ZZ")
            #expect(probe.value("src_cc", client: "1.2.3.4", port: 4) == "JP")
            #expect(probe.value("src_cc", client: "1.2.3.4", port: 5) == "ZZ")  // map gives ""
            #expect(probe.value("pp_cc", client: "10.1.2.3", proxySource: "1.2.4.9") == "DE")
            #expect(probe.value("pp_cc", client: "1.2.3.4") == nil)
            #expect(probe.value("epoch") == "1700000000")
        }

        /// leev's module only uses a default whose length is > 0: `default=` is "not found".
        @Test("default= (empty) behaves as no default, as leev's geoip2")
        func emptyDefault() throws {
            let probe = try Probe(Self.block)
            #expect(probe.value("cc_empty_default", client: "1.2.3.4") == "NL")
            #expect(probe.value("cc_empty_default", client: "10.1.2.3") == nil)
        }

        @Test("the real country database: CN, RU, US")
        func countryDatabase() throws {
            let probe = try Probe("geoip2 \(countryDB) {\n $country default=-- country iso_code;\n}")
            #expect(probe.value("country", client: "1.0.1.1") == "CN")
            #expect(probe.value("country", client: "2a02:6b8::1") == "RU")
            #expect(probe.value("country", client: "8.8.8.8") == "US")
            #expect(probe.value("country", client: "10.0.0.1") == "--")
        }

        @Test("a missing or broken database is a compile error naming the file, at the geoip2 argument")
        func openFailures() {
            for path in ["/nonexistent/portcullis/missing.mmdb", geoipFixture("not-an-mmdb.mmdb"), geoipFixture("truncated.mmdb")] {
                let text = "stream {\n    geoip2 \(path) {\n        $cc country iso_code;\n    }\n"
                    + "    server { listen 8080; deny $cc; proxy_pass 127.0.0.1:9000; }\n}\n"
                let result = compileRules(text)
                #expect(result.snapshot == nil)
                let errors = result.diagnostics.filter { $0.severity == .error }.map(\.description)
                #expect(errors.count == 1, "\(path): \(errors)")
                #expect(errors.first?.hasPrefix("rules.conf:2:12: error: ") == true, "\(path): \(errors)")
                #expect(errors.first?.contains(path) == true, "\(path): \(errors)")
            }
            // Without an opener (a context that cannot open databases) it is an error too, not a crash.
            let noOpener = compileErrors("stream {\n    geoip2 \(typesDB) { $cc country iso_code; }\n"
                + "    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n", geoip: nil)
            #expect(noOpener.first?.hasPrefix("rules.conf:2:12: error: ") == true, "\(noOpener)")
        }

        @Test("lookups are lazy: nothing that does not read the variable looks up; reading it twice looks up once")
        func lazyAndMemoised() throws {
            let counter = LookupCounter()
            let probe = try Probe("""
                geoip2 \(typesDB) {
                    $cc default=XX country iso_code;
                    $build metadata build_epoch;
                }
                map $cc $bad {
                    NL 1;
                    default 0;
                }
                log_format plain '$remote_addr $status $connection';
                log_format geo '$cc $bad $cc';
                """, servers: ["allow 10.0.0.0/8; deny $bad; allow all;"], geoip: CountingOpener(counter: counter))
            let access = probe.snapshot.servers[0].access
            let plain = try #require(probe.snapshot.logFormats["plain"])
            let geo = try #require(probe.snapshot.logFormats["geo"])

            // An address rule decides and the log line does not read $cc: no lookup at all.
            let inside = probe.record(client: "10.1.2.3")
            #expect(access.evaluate(inside.client.address) { VariableRenderer.value(of: $0, in: inside, host: .current) }.allowed)
            _ = plain.render(inside)
            #expect(probe.value("build", in: inside) == "1700000000")  // metadata is no lookup
            #expect(counter.value == 0)

            // Access reads $bad → $cc (one lookup); the log line reads $cc twice and $bad: no more.
            let nl = probe.record(client: "1.2.3.4")
            #expect(!access.evaluate(nl.client.address) { VariableRenderer.value(of: $0, in: nl, host: .current) }.allowed)
            #expect(counter.value == 1)
            #expect(geo.render(nl) == "NL 1 NL")
            #expect(probe.value("cc", in: nl) == "NL")
            #expect(counter.value == 1)

            // A copy of the record (the relay copies it) shares the session's memo.
            let copy = nl
            #expect(probe.value("cc", in: copy) == "NL")
            #expect(counter.value == 1)

            // A new session looks up again (the memo is per session, not a cache).
            let other = probe.record(client: "1.2.4.5")
            #expect(geo.render(other) == "DE 0 DE")
            #expect(counter.value == 2)
        }
    }
}

// MARK: - audit line

extension VariablesTests {
    @Suite struct Audit {
        static func refused(value: [UInt8]) -> SessionRecord {
            var record = SessionRecord(
                connection: 9, transport: .tcp,
                client: SocketEndpoint(address: IPAddress("1.0.1.1")!, port: 40000),
                server: SocketEndpoint(address: IPAddress("127.0.0.1")!, port: 8080),
                listener: "127.0.0.1:8080", startTime: 1_764_270_000)
            record.outcome = SessionOutcome(phase: .access, cause: .accessDenied,
                                            rule: RuleReference(file: "/etc/portcullis/rules.conf", line: 12, text: "deny $bad_country;"))
            record.decidingVariable = ("$bad_country", value)
            return record
        }

        @Test("the audit line names the deciding variable and its value")
        func namesVariable() throws {
            let line = AuditLine.render(Self.refused(value: Array("CN".utf8)))
            #expect(line.contains(#""variable":{"name":"$bad_country","value":"CN"}"#), "\(line)")
            #expect(line.contains(#""rule":{"at":"/etc/portcullis/rules.conf:12""#), "\(line)")
            let entry = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            #expect(entry["status"] as? Int == 403)
        }

        @Test("hostile bytes in the value are escaped: one valid JSON object on one line")
        func hostileValue() throws {
            let hostile = #"CN","forged":true,"x":"\"# + "\n{\"status\":200}\r\u{1}\t"
            let line = AuditLine.render(Self.refused(value: Array(hostile.utf8)))
            #expect(!line.contains("\n") && !line.contains("\r"))
            #expect(line.unicodeScalars.allSatisfy { $0.value >= 0x20 })
            let entry = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            #expect(entry["forged"] == nil)
            #expect(entry["status"] as? Int == 403)
            let variable = try #require(entry["variable"] as? [String: Any])
            #expect(variable["name"] as? String == "$bad_country")
            #expect(variable["value"] as? String == hostile)
            #expect(line.contains(#"\u0001"#))
            // Bytes that are not UTF-8 still leave valid JSON.
            let binary = AuditLine.render(Self.refused(value: [0x43, 0xFF, 0xFE, 0x22, 0x00]))
            #expect((try? JSONSerialization.jsonObject(with: Data(binary.utf8))) != nil, "\(binary)")
        }

        @Test("no deciding variable: no variable field")
        func noVariable() {
            var record = Self.refused(value: [])
            record.decidingVariable = nil
            #expect(!AuditLine.render(record).contains("\"variable\""))
        }
    }
}

// MARK: - proxy_pass $var

extension VariablesTests {
    @Suite struct ProxyPassVariable {
        @Test("proxy_pass $var names an upstream block, or ADDRESS:PORT; a host name gives nil")
        func upstreamForRecord() throws {
            let probe = try Probe(text: """
                stream {
                    upstream pool_a { server 127.0.0.1:9001; }
                    upstream pool_b { server 127.0.0.1:9002; server 127.0.0.1:9003; }
                    map $remote_addr $backend {
                        10.0.0.1 pool_a;
                        10.0.0.2 pool_b;
                        10.0.0.3 127.0.0.1:9100;
                        10.0.0.4 [::1]:9200;
                        10.0.0.5 example.com:80;
                        10.0.0.6 "";
                        default pool_missing;
                    }
                    map $remote_addr $port {
                        default 9300;
                    }
                    server { listen 8080; proxy_pass $backend; }
                    server { listen 8081; proxy_pass 127.0.0.1:$port; }
                    server { listen 8082; proxy_pass pool_b; }
                }
                """)
            let server = probe.snapshot.servers[0]
            #expect(server.upstream == nil)
            func pick(_ client: String, server index: Int = 0) -> (group: UpstreamGroup?, text: String) {
                probe.snapshot.servers[index].upstream(for: probe.record(client: client, server: index))
            }
            let a = pick("10.0.0.1")
            #expect(a.group === probe.snapshot.upstreams["pool_a"] && a.text == "pool_a")
            let b = pick("10.0.0.2")
            #expect(b.group === probe.snapshot.upstreams["pool_b"] && b.group?.servers.count == 2)
            let direct = pick("10.0.0.3")
            #expect(direct.group?.servers.map(\.endpoint) == [SocketEndpoint("127.0.0.1:9100")!])
            #expect(direct.text == "127.0.0.1:9100")
            let v6 = pick("10.0.0.4")
            #expect(v6.group?.servers.map(\.endpoint) == [SocketEndpoint(address: IPAddress("::1")!, port: 9200)])
            let host = pick("10.0.0.5")
            #expect(host.group == nil && host.text == "example.com:80")
            #expect(pick("10.0.0.6").group == nil)
            let missing = pick("192.0.2.1")
            #expect(missing.group == nil && missing.text == "pool_missing")
            // A template mixing text and variables.
            let mixed = pick("192.0.2.1", server: 1)
            #expect(mixed.group?.servers.map(\.endpoint) == [SocketEndpoint("127.0.0.1:9300")!])
            // A fixed proxy_pass still answers with its group.
            let fixed = pick("192.0.2.1", server: 2)
            #expect(fixed.group === probe.snapshot.upstreams["pool_b"])
        }
    }
}
