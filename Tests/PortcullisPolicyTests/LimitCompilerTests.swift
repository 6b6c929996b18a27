import Testing
import PortcullisCore
import PortcullisRules
@testable import PortcullisPolicy

/// Knows no host: nothing below names one.
private struct NoHostsResolver: HostResolver {
    func addresses(of host: String) -> [IPAddress] { [] }
}

/// The limit directives: what compiles to what, inheritance, and the located errors.
@Suite struct LimitCompilerTests {
    static func load(_ text: String) -> CompileResult {
        RuleLoader.load(text: text, file: "rules.conf", resolver: NoHostsResolver())
    }

    static func compile(_ text: String) throws -> PolicySnapshot {
        let result = load(text)
        #expect(result.diagnostics.isEmpty, "\(result.rendered)")
        return try #require(result.snapshot, "\(result.rendered)")
    }

    static func server(_ snapshot: PolicySnapshot, port: UInt16) throws -> ServerPolicy {
        try #require(snapshot.servers.first { $0.listens.contains { $0.port == port } })
    }

    /// Line 2 declares zone "addr"; `stream` goes on line 3 (column 5), `server` on line 6
    /// (column 9).
    static func rules(stream: String = "", server: String = "") -> String {
        """
        stream {
            limit_conn_zone $remote_addr zone=addr:10m;
            \(stream)
            server {
                listen 8080;
                \(server)
                proxy_pass 127.0.0.1:9000;
            }
        }
        """
    }

    // MARK: What compiles to what

    @Test func limitConnCompiles() throws {
        let snapshot = try Self.compile(Self.rules(server: "limit_conn addr 3;"))
        let limits = snapshot.servers[0].limits
        #expect(limits.conn.count == 1)
        let rule = try #require(limits.conn.first)
        #expect(rule.limit == 3)
        #expect(rule.zone.name == "addr")
        #expect(rule.zone.size == 10 * 1_048_576)
        #expect(rule.zone.capacity == 163_840)
        #expect(rule.zone.key == LogTemplate(parts: [.variable(.fixed(.remoteAddr))]))
        #expect(rule.zone.location?.line == 2)
        #expect(rule.zone.location?.column == 5)
        #expect(rule.reference.text == "limit_conn addr 3;")
        #expect(rule.reference.line == 6)
        // nginx's defaults for the rest.
        #expect(!limits.connDryRun)
        #expect(limits.connLogLevel == .error)
        #expect(limits.rate.isEmpty)
        #expect(!limits.rateDryRun)
        #expect(limits.uploadRate == 0)
        #expect(limits.downloadRate == 0)
        #expect(!limits.throttles)
    }

    @Test func noLimitDirectivesMeansNoLimits() throws {
        let snapshot = try Self.compile("stream {\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n")
        let limits = snapshot.servers[0].limits
        #expect(limits.conn.isEmpty && limits.rate.isEmpty)
        #expect(!limits.throttles)
    }

    @Test func severalLimitConnAllApplyInOrder() throws {
        let snapshot = try Self.compile("""
            stream {
                limit_conn_zone $remote_addr zone=addr:10m;
                limit_conn_zone $server_port zone=perserver:1m;
                server {
                    listen 8080;
                    limit_conn perserver 100;
                    limit_conn addr 3;
                    proxy_pass 127.0.0.1:9000;
                }
            }
            """)
        let conn = snapshot.servers[0].limits.conn
        #expect(conn.map(\.zone.name) == ["perserver", "addr"])
        #expect(conn.map(\.limit) == [100, 3])
        #expect(conn[0].zone.capacity == 16_384)
    }

    @Test func oneZoneObjectIsSharedByEveryServerThatNamesIt() throws {
        let snapshot = try Self.compile("""
            stream {
                limit_conn_zone $binary_remote_addr zone=addr:1m;
                limit_rate_zone $binary_remote_addr zone=rate:1m rate=5r/s;
                server { listen 1001; limit_conn addr 1; limit_rate rate; proxy_pass 127.0.0.1:9000; }
                server { listen 1002; limit_conn addr 7; limit_rate rate; proxy_pass 127.0.0.1:9000; }
            }
            """)
        let (a, b) = (try Self.server(snapshot, port: 1001), try Self.server(snapshot, port: 1002))
        #expect(a.limits.conn[0].zone === b.limits.conn[0].zone, "one count per key across servers, as nginx's shared zone")
        #expect(a.limits.rate[0].zone === b.limits.rate[0].zone)
        #expect(a.limits.conn[0].limit == 1)
        #expect(b.limits.conn[0].limit == 7)
    }

    @Test func zonesMayBeDefinedAfterTheirUse() throws {
        let snapshot = try Self.compile("""
            stream {
                limit_conn addr 2;
                limit_rate perip;
                server { listen 8080; proxy_pass 127.0.0.1:9000; }
                limit_conn_zone $remote_addr zone=addr:64k;
                limit_rate_zone $remote_addr zone=perip:64k rate=1r/s;
            }
            """)
        let limits = snapshot.servers[0].limits
        #expect(limits.conn.map(\.zone.name) == ["addr"])
        #expect(limits.conn[0].zone.capacity == 1_024)
        #expect(limits.rate.map(\.zone.name) == ["perip"])
        #expect(limits.rate[0].zone.capacity == 512)
    }

    // MARK: Inheritance

    static let inheritance = """
        stream {
            limit_conn_zone $remote_addr zone=addr:10m;
            limit_conn_zone $binary_remote_addr zone=bin:1m;
            limit_rate_zone $remote_addr zone=sessions:1m rate=10r/s;
            limit_rate_zone $remote_addr zone=bytes:1m rate=512k;
            limit_conn addr 10;
            limit_conn bin 20;
            limit_rate sessions;
            limit_conn_dry_run on;
            limit_conn_log_level warn;
            limit_rate_dry_run on;
            proxy_upload_rate 1k;
            server { listen 1001; proxy_pass 127.0.0.1:9000; }
            server {
                listen 1002;
                limit_conn addr 1;
                proxy_pass 127.0.0.1:9000;
            }
            server {
                listen 1003;
                limit_rate bytes;
                limit_conn_dry_run off;
                limit_conn_log_level info;
                limit_rate_dry_run off;
                proxy_upload_rate 0;
                proxy_download_rate 2k;
                proxy_pass 127.0.0.1:9000;
            }
        }
        """

    @Test func aServerWithoutItsOwnInheritsEverything() throws {
        let limits = try Self.server(try Self.compile(Self.inheritance), port: 1001).limits
        #expect(limits.conn.map(\.zone.name) == ["addr", "bin"])
        #expect(limits.conn.map(\.limit) == [10, 20])
        #expect(limits.rate.map(\.zone.name) == ["sessions"])
        #expect(limits.connDryRun)
        #expect(limits.connLogLevel == .warn)
        #expect(limits.rateDryRun)
        #expect(limits.uploadRate == 1_024)
        #expect(limits.downloadRate == 0)
        #expect(limits.throttles, "an upload rate throttles")
    }

    @Test func aServerWithItsOwnLimitConnInheritsNoneOfTheStreamOnes() throws {
        let limits = try Self.server(try Self.compile(Self.inheritance), port: 1002).limits
        #expect(limits.conn.map(\.zone.name) == ["addr"], "nginx: a level with its own limit_conn inherits none")
        #expect(limits.conn.map(\.limit) == [1])
        // Everything else is still inherited.
        #expect(limits.rate.map(\.zone.name) == ["sessions"])
        #expect(limits.connDryRun)
        #expect(limits.connLogLevel == .warn)
        #expect(limits.rateDryRun)
        #expect(limits.uploadRate == 1_024)
    }

    @Test func aServerWithItsOwnLimitRateAndSwitches() throws {
        let limits = try Self.server(try Self.compile(Self.inheritance), port: 1003).limits
        #expect(limits.conn.map(\.zone.name) == ["addr", "bin"], "limit_conn inherited: this server has none")
        #expect(limits.rate.map(\.zone.name) == ["bytes"], "its own limit_rate replaces the stream's")
        #expect(limits.rate[0].zone.kind == .bandwidth)
        #expect(!limits.connDryRun)
        #expect(limits.connLogLevel == .info)
        #expect(!limits.rateDryRun)
        #expect(limits.uploadRate == 0)
        #expect(limits.downloadRate == 2_048)
        #expect(limits.throttles)
    }

    @Test func aSessionRateAloneDoesNotThrottleBytes() throws {
        let snapshot = try Self.compile(Self.rules(
            stream: "limit_rate_zone $remote_addr zone=perip:1m rate=10r/s;", server: "limit_rate perip;"))
        #expect(snapshot.servers[0].limits.rate.count == 1)
        #expect(!snapshot.servers[0].limits.throttles)
    }

    @Test(arguments: ["info", "notice", "warn", "error"])
    func everyAllowedLogLevel(level: String) throws {
        let snapshot = try Self.compile(Self.rules(server: "limit_conn_log_level \(level);"))
        #expect(snapshot.servers[0].limits.connLogLevel.rawValue == level)
    }

    // MARK: limit_rate_zone rates and bursts

    static let rates: [(String, LimitRateZone.Kind, Double, Double)] = [
        // (rate=, kind, tokens per second, default burst)
        ("10r/s", .sessions, 10, 10),
        ("1r/s", .sessions, 1, 1),
        ("100r/m", .sessions, 100.0 / 60, 2),  // one second's worth, rounded up
        ("1r/m", .sessions, 1.0 / 60, 1),  // at least one session
        ("60r/m", .sessions, 1, 1),
        ("512k", .bandwidth, 524_288, 524_288),
        ("1m/s", .bandwidth, 1_048_576, 1_048_576),
        ("1m", .bandwidth, 1_048_576, 1_048_576),
        ("64k/s", .bandwidth, 65_536, 65_536),
        ("1000", .bandwidth, 1_000, 1_000),
    ]

    @Test(arguments: rates)
    func rateForms(text: String, kind: LimitRateZone.Kind, rate: Double, burst: Double) throws {
        let snapshot = try Self.compile(Self.rules(
            stream: "limit_rate_zone $remote_addr zone=r:1m rate=\(text);", server: "limit_rate r;"))
        let zone = try #require(snapshot.servers[0].limits.rate.first?.zone)
        #expect(zone.kind == kind)
        #expect(abs(zone.rate - rate) < 1e-12, "\(text): \(zone.rate)")
        #expect(zone.burst == burst, "\(text): burst \(zone.burst)")
        #expect(zone.rateText == text)
        #expect(zone.name == "r")
        #expect(zone.size == 1_048_576)
        #expect(zone.capacity == 8_192)
    }

    static let bursts: [(String, LimitRateZone.Kind, Double)] = [
        ("rate=10r/s burst=20", .sessions, 20),
        ("burst=3 rate=1r/m", .sessions, 3),  // either order
        ("rate=512k burst=1m", .bandwidth, 1_048_576),
        ("rate=1m burst=64k", .bandwidth, 65_536),
        ("rate=1m burst=4096", .bandwidth, 4_096),
    ]

    @Test(arguments: bursts)
    func explicitBurst(parameters: String, kind: LimitRateZone.Kind, burst: Double) throws {
        let snapshot = try Self.compile(Self.rules(
            stream: "limit_rate_zone $remote_addr zone=r:1m \(parameters);", server: "limit_rate r;"))
        let zone = try #require(snapshot.servers[0].limits.rate.first?.zone)
        #expect(zone.kind == kind)
        #expect(zone.burst == burst)
    }

    @Test func theCompiledZoneLimitsAsConfigured() throws {
        // rate=5r/s: five at once, then one every 200 ms.
        let snapshot = try Self.compile(Self.rules(
            stream: "limit_rate_zone $remote_addr zone=r:1m rate=5r/s;", server: "limit_rate r;"))
        let zone = try #require(snapshot.servers[0].limits.rate.first?.zone)
        let key = Array("10.0.0.1".utf8), t: UInt64 = 1_000_000_000
        #expect((0..<6).map { _ in zone.admit(key, now: t) } == [true, true, true, true, true, false])
        #expect(zone.admit(key, now: t + 200_000_000))
    }

    // MARK: audit_log sample=

    @Test func auditLogSampleIsRead() throws {
        let sampled = try Self.compile(Self.rules(stream: "audit_log /tmp/portcullis-audit.log sample=50/s;"))
        #expect(sampled.auditLog?.linesPerSecond == 50)
        #expect(sampled.auditLog?.path == "/tmp/portcullis-audit.log")
        let plain = try Self.compile(Self.rules(stream: "audit_log /tmp/portcullis-audit.log;"))
        #expect(plain.auditLog?.linesPerSecond == 100, "the default")
    }

    // MARK: Errors, located

    /// (name, stream line 3, server line 6, the diagnostics)
    static let errors: [(String, String, String, [String])] = [
        ("unknownConnZone", "", "limit_conn adr 3;",
         ["rules.conf:6:20: error: unknown limit_conn_zone \"adr\"; did you mean \"addr\"?"]),
        ("unknownConnZoneNoGuess", "", "limit_conn zzzzzz 3;",
         ["rules.conf:6:20: error: unknown limit_conn_zone \"zzzzzz\""]),
        ("unknownRateZone", "limit_rate_zone $remote_addr zone=perip:1m rate=10r/s;", "limit_rate perp;",
         ["rules.conf:6:20: error: unknown limit_rate_zone \"perp\"; did you mean \"perip\"?"]),
        ("connZoneIsNotARateZone", "", "limit_rate addr;",
         ["rules.conf:6:20: error: unknown limit_rate_zone \"addr\""]),
        ("rateZoneIsNotAConnZone", "limit_rate_zone $remote_addr zone=perip:1m rate=10r/s;", "limit_conn perip 1;",
         ["rules.conf:6:20: error: unknown limit_conn_zone \"perip\""]),
        ("unknownConnZoneAtStreamLevel", "limit_conn adr 3;", "",
         ["rules.conf:3:16: error: unknown limit_conn_zone \"adr\"; did you mean \"addr\"?"]),
        ("zoneTooSmall", "limit_conn_zone $remote_addr zone=small:31k;", "",
         ["rules.conf:3:34: error: zone \"small\" is too small (31k); the least is 32k"]),
        ("zoneTooSmallBytes", "limit_rate_zone $remote_addr zone=small:32767 rate=1r/s;", "",
         ["rules.conf:3:34: error: zone \"small\" is too small (32767); the least is 32k"]),
        ("zoneNoColon", "limit_conn_zone $remote_addr zone=addr2;", "",
         ["rules.conf:3:34: error: invalid zone \"zone=addr2\" in \"limit_conn_zone\"; expected zone=NAME:SIZE such as zone=addr:10m"]),
        ("zoneNoPrefix", "limit_conn_zone $remote_addr addr2:10m;", "",
         ["rules.conf:3:34: error: invalid zone \"addr2:10m\" in \"limit_conn_zone\"; expected zone=NAME:SIZE such as zone=addr:10m"]),
        ("zoneNoName", "limit_conn_zone $remote_addr zone=:10m;", "",
         ["rules.conf:3:34: error: invalid zone \"zone=:10m\" in \"limit_conn_zone\": the zone has no name"]),
        ("zoneBadSize", "limit_conn_zone $remote_addr zone=addr2:10q;", "",
         ["rules.conf:3:34: error: invalid zone size \"10q\" in \"limit_conn_zone\"; expected a size such as 10m"]),
        ("rateZoneBadSize", "limit_rate_zone $remote_addr zone=r: rate=1r/s;", "",
         ["rules.conf:3:34: error: invalid zone size \"\" in \"limit_rate_zone\"; expected a size such as 10m"]),
        ("limitZero", "", "limit_conn addr 0;",
         ["rules.conf:6:25: error: invalid number of connections \"0\" in \"limit_conn\"; expected 1 to 65535"]),
        ("limitNegative", "", "limit_conn addr -1;",
         ["rules.conf:6:25: error: invalid number of connections \"-1\" in \"limit_conn\"; expected 1 to 65535"]),
        ("limitNotANumber", "", "limit_conn addr ten;",
         ["rules.conf:6:25: error: invalid number of connections \"ten\" in \"limit_conn\"; expected 1 to 65535"]),
        ("limit65536", "", "limit_conn addr 65536;",
         ["rules.conf:6:25: error: connection limit must be less 65536"]),
        ("limitHuge", "", "limit_conn addr 99999999999;",
         ["rules.conf:6:25: error: connection limit must be less 65536"]),
        ("badRateUnit", "limit_rate_zone $remote_addr zone=r:1m rate=10r/h;", "",
         ["rules.conf:3:44: error: invalid rate \"10r/h\" in \"limit_rate_zone\"; expected sessions such as 10r/s or 100r/m, or bytes per second such as 512k or 1m"]),
        ("zeroRate", "limit_rate_zone $remote_addr zone=r:1m rate=0r/s;", "",
         ["rules.conf:3:44: error: invalid rate \"0r/s\" in \"limit_rate_zone\"; expected sessions such as 10r/s or 100r/m, or bytes per second such as 512k or 1m"]),
        ("zeroBytes", "limit_rate_zone $remote_addr zone=r:1m rate=0;", "",
         ["rules.conf:3:44: error: invalid rate \"0\" in \"limit_rate_zone\"; expected sessions such as 10r/s or 100r/m, or bytes per second such as 512k or 1m"]),
        ("fractionalRate", "limit_rate_zone $remote_addr zone=r:1m rate=1.5r/s;", "",
         ["rules.conf:3:44: error: invalid rate \"1.5r/s\" in \"limit_rate_zone\"; expected sessions such as 10r/s or 100r/m, or bytes per second such as 512k or 1m"]),
        ("emptyRate", "limit_rate_zone $remote_addr zone=r:1m rate=;", "",
         ["rules.conf:3:44: error: invalid rate \"\" in \"limit_rate_zone\"; expected sessions such as 10r/s or 100r/m, or bytes per second such as 512k or 1m"]),
        ("missingRate", "limit_rate_zone $remote_addr zone=r:1m burst=5;", "",
         ["rules.conf:3:5: error: no \"rate=\" in \"limit_rate_zone\"; expected e.g. rate=10r/s or rate=1m"]),
        ("badBurst", "limit_rate_zone $remote_addr zone=r:1m rate=1r/s burst=0;", "",
         ["rules.conf:3:54: error: invalid burst \"0\" in \"limit_rate_zone\"; expected a positive number (or a size for a bandwidth rate)"]),
        ("unknownRateParameter", "limit_rate_zone $remote_addr zone=r:1m rate=1r/s nodelay;", "",
         ["rules.conf:3:54: error: invalid parameter \"nodelay\" in \"limit_rate_zone\"; expected rate= or burst="]),
        ("duplicateConnZone", "limit_conn_zone $binary_remote_addr zone=addr:1m;", "",
         ["rules.conf:3:41: error: duplicate zone \"addr\"; it was first defined at rules.conf:2:5"]),
        ("duplicateAcrossKinds", "limit_rate_zone $remote_addr zone=addr:1m rate=1r/s;", "",
         ["rules.conf:3:34: error: duplicate zone \"addr\"; it was first defined at rules.conf:2:5"]),
        ("badLogLevel", "", "limit_conn_log_level debug;",
         ["rules.conf:6:30: error: invalid value \"debug\" in \"limit_conn_log_level\"; it must be info, notice, warn or error"]),
        ("critLogLevel", "limit_conn_log_level crit;", "",
         ["rules.conf:3:26: error: invalid value \"crit\" in \"limit_conn_log_level\"; it must be info, notice, warn or error"]),
        ("badDryRun", "", "limit_conn_dry_run yes;",
         ["rules.conf:6:28: error: invalid value \"yes\" in \"limit_conn_dry_run\"; it must be \"on\" or \"off\""]),
        ("auditSampleNotANumber", "audit_log /tmp/a.log sample=abc;", "",
         ["rules.conf:3:26: error: invalid parameter \"sample=abc\" in \"audit_log\"; expected sample=N/s, the most lines a second (default 100)"]),
        ("auditSampleZero", "audit_log /tmp/a.log sample=0/s;", "",
         ["rules.conf:3:26: error: invalid parameter \"sample=0/s\" in \"audit_log\"; expected sample=N/s, the most lines a second (default 100)"]),
        ("auditSampleNoUnit", "audit_log /tmp/a.log sample=50;", "",
         ["rules.conf:3:26: error: invalid parameter \"sample=50\" in \"audit_log\"; expected sample=N/s, the most lines a second (default 100)"]),
        ("auditSamplePerMinute", "audit_log /tmp/a.log sample=50/m;", "",
         ["rules.conf:3:26: error: invalid parameter \"sample=50/m\" in \"audit_log\"; expected sample=N/s, the most lines a second (default 100)"]),
        ("uploadRateUnknownVariable", "", "proxy_upload_rate $rate;",
         ["rules.conf:6:27: error: unknown variable \"$rate\" in \"proxy_upload_rate\""]),
        ("uploadRateBadSize", "", "proxy_upload_rate fast;",
         ["rules.conf:6:27: error: invalid size \"fast\" in \"proxy_upload_rate\"; expected a size such as 512, 16k or 10m"]),
        ("zoneInServer", "", "limit_conn_zone $remote_addr zone=x:1m;",
         ["rules.conf:6:9: error: \"limit_conn_zone\" directive is not allowed in server context; it belongs in: stream"]),
        ("unknownKeyVariable", "limit_conn_zone $remote_adr zone=other:1m;", "",
         ["rules.conf:3:21: error: unknown variable \"$remote_adr\" in \"limit_conn_zone\"; did you mean \"$remote_addr\"?"]),
    ]

    @Test(arguments: errors)
    func locatedErrors(name: String, stream: String, server: String, expected: [String]) {
        let result = Self.load(Self.rules(stream: stream, server: server))
        #expect(result.diagnostics.map(\.description) == expected, "\(name)")
        #expect(result.snapshot == nil, "\(name)")
    }

    @Test func anErrorIsRenderedWithItsSourceLine() {
        let result = Self.load(Self.rules(server: "limit_conn adr 3;"))
        #expect(result.rendered == """
            rules.conf:6:20: error: unknown limit_conn_zone "adr"; did you mean "addr"?
                    limit_conn adr 3;
                               ^~~
            """)
    }

    @Test func aKeyWithoutVariablesIsOneCounterForEveryone() throws {
        // nginx allows a constant key: one count shared by every client of the servers that use it.
        let snapshot = try Self.compile(Self.rules(stream: "limit_conn_zone all zone=everyone:32k;", server: "limit_conn everyone 1000;"))
        let zone = try #require(snapshot.servers[0].limits.conn.first?.zone)
        #expect(zone.key == LogTemplate(parts: [.literal("all")]))
        #expect(zone.name == "everyone")
    }

    @Test func theLargestLimitIsAccepted() throws {
        let snapshot = try Self.compile(Self.rules(server: "limit_conn addr 65535;"))
        #expect(snapshot.servers[0].limits.conn.first?.limit == 65_535)
    }

    @Test func theSmallestZoneIsAccepted() throws {
        let snapshot = try Self.compile("""
            stream {
                limit_conn_zone $remote_addr zone=tiny:32k;
                limit_rate_zone $remote_addr zone=tinyrate:32768 rate=1r/s;
                server { listen 8080; limit_conn tiny 1; limit_rate tinyrate; proxy_pass 127.0.0.1:9000; }
            }
            """)
        let limits = snapshot.servers[0].limits
        #expect(limits.conn.first?.zone.capacity == 512)
        #expect(limits.rate.first?.zone.capacity == 256)
    }

    @Test func proxyRatesTakeSizes() throws {
        let snapshot = try Self.compile(Self.rules(server: "proxy_upload_rate 512k;\n        proxy_download_rate 1m;"))
        let limits = snapshot.servers[0].limits
        #expect(limits.uploadRate == 524_288)
        #expect(limits.downloadRate == 1_048_576)
        #expect(limits.throttles)
    }

    @Test func everyErrorIsReportedNotJustTheFirst() {
        let result = Self.load("""
            stream {
                limit_conn_zone $remote_addr zone=addr:10m;
                limit_conn_zone $remote_addr zone=small:1k;
                limit_rate_zone $remote_addr zone=r:1m rate=fast;
                server {
                    listen 8080;
                    limit_conn adr 3;
                    limit_conn addr 0;
                    limit_rate r;
                    proxy_pass 127.0.0.1:9000;
                }
            }
            """)
        // (What follows these — "limit_rate r" naming the refused zone — is a follow-on error
        // and not pinned here.)
        #expect(Array(result.diagnostics.map(\.description).prefix(4)) == [
            "rules.conf:3:34: error: zone \"small\" is too small (1k); the least is 32k",
            "rules.conf:4:44: error: invalid rate \"fast\" in \"limit_rate_zone\"; expected sessions such as 10r/s or 100r/m, or bytes per second such as 512k or 1m",
            "rules.conf:7:20: error: unknown limit_conn_zone \"adr\"; did you mean \"addr\"?",
            "rules.conf:8:25: error: invalid number of connections \"0\" in \"limit_conn\"; expected 1 to 65535",
        ])
        #expect(result.snapshot == nil)
    }
}
