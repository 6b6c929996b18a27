import Foundation
import Testing
import PortcullisCore
import PortcullisRules
import PortcullisWire
@testable import PortcullisPolicy

private struct NoBypassResolver: HostResolver {
    func addresses(of host: String) -> [IPAddress] { [] }
}

/// Issue #16 item 4, without sockets: every address form a client can arrive in, against every
/// kind of rule that decides on the address, and PROXY headers of every form from trusted and
/// untrusted peers — all through the session machine, on rule files compiled as `run` does.
@Suite("No bypass through address forms (policy)")
struct NoBypassTests {
    static let t0: UInt64 = 1_000 * 1_000_000_000

    static func listener(_ server: String, stream: String = "") throws -> ListenerPolicy {
        let text = "stream {\n\(stream)\nserver {\n\(server)\n}\n}\n"
        let result = RuleLoader.load(text: text, file: "bypass.conf", resolver: NoBypassResolver())
        let snapshot = try #require(result.snapshot, "\(result.rendered)")
        let policy = try #require(snapshot.servers.first)
        return ListenerPolicy(server: policy, listen: try #require(policy.listens.first))
    }

    static func compileErrors(_ server: String, stream: String = "") -> String? {
        let text = "stream {\n\(stream)\nserver {\n\(server)\n}\n}\n"
        let result = RuleLoader.load(text: text, file: "bypass.conf", resolver: NoBypassResolver())
        return result.snapshot == nil ? result.rendered : nil
    }

    static func machine(_ listener: ListenerPolicy, client: SocketEndpoint, connection: UInt64 = 1) -> SessionMachine {
        SessionMachine(listener: listener, connection: connection, client: client,
                       server: SocketEndpoint("127.0.0.1:8080")!, now: t0, wallClock: 1_764_000_000)
    }

    /// The four ways one host can be written, plus a plain IPv6 client.
    enum Form: String, CaseIterable, CustomStringConvertible {
        case ipv4, mapped, compatible, ipv6
        var address: IPAddress {
            switch self {
            case .ipv4: IPAddress("10.1.2.3")!
            case .mapped: IPAddress("::ffff:10.1.2.3")!
            case .compatible: IPAddress("::10.1.2.3")!
            case .ipv6: IPAddress("2001:db8::1")!
            }
        }
        var description: String { rawValue }
    }

    /// One rule set and the status (200 or 403) each form must get, with the rule text that
    /// decides a 403.
    struct Row: CustomStringConvertible {
        var name: String
        var server: String
        var stream: String = ""
        /// ipv4, mapped, compatible, ipv6
        var denied: [Form: Bool]
        var description: String { name }
    }

    static func row(_ name: String, _ server: String, stream: String = "", denies: Set<Form>) -> Row {
        Row(name: name, server: server, stream: stream,
            denied: Dictionary(uniqueKeysWithValues: Form.allCases.map { ($0, denies.contains($0)) }))
    }

    /// nginx's semantics (ngx_stream_access_module, ngx_stream_geo_module, ngx_stream_map_module),
    /// plus Portcullis's one documented extension (an IPv6 rule inside ::ffff:0:0/96 also applies
    /// to IPv4 clients). Only the mapped form is folded to IPv4; the compatible form `::a.b.c.d`
    /// is an IPv6 address like any other, as in nginx.
    static let table: [Row] = [
        row("IPv4 address rule", "deny 10.1.2.3;", denies: [.ipv4, .mapped]),
        row("IPv4 network rule", "deny 10.0.0.0/8;", denies: [.ipv4, .mapped]),
        row("IPv4 everything", "deny 0.0.0.0/0;", denies: [.ipv4, .mapped]),
        row("IPv4 allow-list", "allow 10.0.0.0/8; deny all;", denies: [.compatible, .ipv6]),
        row("IPv4 allow-list of another network", "allow 192.0.2.0/24; deny all;", denies: Set(Form.allCases)),
        row("mapped-IPv6 rule (extension: applies to IPv4 too)", "deny ::ffff:10.1.2.3;", denies: [.ipv4, .mapped]),
        row("mapped-IPv6 network rule", "deny ::ffff:10.0.0.0/104;", denies: [.ipv4, .mapped]),
        row("mapped-IPv6 allow-list (extension residual)", "allow ::ffff:10.0.0.0/104; deny all;", denies: [.compatible, .ipv6]),
        row("IPv4-compatible rule", "deny ::10.1.2.3;", denies: [.compatible]),
        row("IPv6 network rule", "deny 2001:db8::/32;", denies: [.ipv6]),
        // Only IPv6 rules: nginx checks a mapped client against the IPv6 list, where ::/0 holds it.
        row("IPv6 everything, no IPv4 rule", "deny ::/0;", denies: [.mapped, .compatible, .ipv6]),
        // With an IPv4 rule present the mapped client is checked as IPv4 only, and passes ::/0.
        row("IPv6 everything after an IPv4 rule", "allow 192.0.2.1; deny ::/0;", denies: [.compatible, .ipv6]),
        row("geo (CIDR) on an IPv4 network", "deny $bad;", stream: "geo $bad { default 0; 10.0.0.0/8 1; }",
            denies: [.ipv4, .mapped]),
        row("geo (CIDR) on an IPv6 network", "deny $bad;", stream: "geo $bad { default 0; 2001:db8::/32 1; }",
            denies: [.ipv6]),
        row("geo (CIDR) on the compatible form", "deny $bad;", stream: "geo $bad { default 0; ::10.1.2.3/128 1; }",
            denies: [.compatible]),
        row("geo (CIDR) default denies, IPv4 allowed", "deny $bad;", stream: "geo $bad { default 1; 10.0.0.0/8 0; }",
            denies: [.compatible, .ipv6]),
        row("geo ranges on an IPv4 range", "deny $bad;",
            stream: "geo $bad { ranges; default 0; 10.0.0.0-10.255.255.255 1; }", denies: [.ipv4, .mapped]),
        // ranges mode has no IPv6 table: other IPv6 clients are looked up as 255.255.255.255.
        row("geo ranges on 255.255.255.255", "deny $bad;",
            stream: "geo $bad { ranges; default 0; 255.255.255.255-255.255.255.255 1; }", denies: [.compatible, .ipv6]),
        row("geo ranges default denies", "deny $bad;",
            stream: "geo $bad { ranges; default 1; 10.0.0.0-10.255.255.255 0; }", denies: [.compatible, .ipv6]),
        // A map compares text: `$remote_addr` of a mapped client is "::ffff:10.1.2.3", which the
        // key "10.1.2.3" does not match (nginx does the same). Documented as a residual.
        row("map on $remote_addr, IPv4 key", "deny $bad;",
            stream: "map $remote_addr $bad { default 0; 10.1.2.3 1; }", denies: [.ipv4]),
        row("map on $remote_addr, regex for both forms", "deny $bad;",
            stream: #"map $remote_addr $bad { default 0; "~^(::ffff:)?10\.1\.2\.3$" 1; }"#, denies: [.ipv4, .mapped]),
        row("map on $remote_addr, allow-list by key", "allow $good; deny all;",
            stream: "map $remote_addr $good { default 0; 10.1.2.3 1; }", denies: [.mapped, .compatible, .ipv6]),
    ]

    @Test("every address form against IPv4, IPv6, mapped and compatible rules, geo (both modes) and map keys")
    func addressFormsTable() throws {
        var checked = 0
        for row in Self.table {
            let listener = try Self.listener("listen 8080;\n\(row.server)\nproxy_pass 127.0.0.1:9000;", stream: row.stream)
            for form in Form.allCases {
                var m = Self.machine(listener, client: SocketEndpoint(address: form.address, port: 40000))
                let action = m.accepted(now: Self.t0)
                let refused: Bool
                switch action {
                case .closeClient: refused = true
                case .dial: refused = false
                default: Issue.record("\(row) / \(form): unexpected action \(action)"); continue
                }
                let expected = row.denied[form]!
                #expect(refused == expected, "\(row) / \(form) \(form.address): refused \(refused), expected \(expected)")
                #expect(m.record.status == (expected ? .forbidden : .ok), "\(row) / \(form)")
                // The audit line names the client as it arrived, never a rewritten form.
                #expect(m.record.client.address == form.address)
                if expected { #expect(m.record.rule != nil, "\(row) / \(form): a 403 without its rule") }
                checked += 1
            }
        }
        #expect(checked == Self.table.count * Form.allCases.count)
    }

    @Test("the compiled access tables decide exactly as the linear reference for every form and many rule sets")
    func compiledMatchesReferenceForAllForms() {
        let ruleSets: [[String]] = [
            ["deny 10.1.2.3", "allow all"], ["deny ::ffff:10.0.0.0/104"], ["allow ::ffff:10.0.0.0/104", "deny all"],
            ["deny ::10.1.2.3"], ["deny ::/0"], ["allow 192.0.2.1", "deny ::/0"], ["deny ::ffff:0:0/96", "allow all"],
            ["allow ::/0", "deny 0.0.0.0/0"], ["deny 0.0.0.0/0", "allow ::/0"], ["deny ::/96"],
        ]
        var probes = Form.allCases.map(\.address)
        for last in [0, 1, 255] as [UInt32] {
            probes += [IPAddress.v4(0x0A01_0200 | last), .v6(0xFFFF_0A01_0200 | UInt128(last)), .v6(0x0A01_0200 | UInt128(last))]
        }
        for set in ruleSets {
            let list = AccessList(rules: rules(set))
            for probe in probes {
                #expect(list.evaluate(probe) == list.evaluateByScan(probe), "\(set) for \(probe)")
            }
        }
    }

    @Test("limit zone keys: $binary_remote_addr and $remote_addr of a mapped client are not the IPv4 client's key (as nginx)")
    func limitKeysPerForm() throws {
        // nginx's ngx_stream_variable_binary_remote_addr gives the 16 bytes of sin6_addr for
        // any AF_INET6 client, mapped or not, and $remote_addr is the text: two keys. On one
        // listener an IPv4 host has one form only (a dual-stack socket maps every IPv4 client).
        for key in ["$binary_remote_addr", "$remote_addr"] {
            let listener = try Self.listener("listen 8080; limit_conn perip 1; proxy_pass 127.0.0.1:9000;",
                                             stream: "limit_conn_zone \(key) zone=perip:1m;")
            var plain = Self.machine(listener, client: SocketEndpoint(address: Form.ipv4.address, port: 1), connection: 1)
            guard case .dial = plain.accepted(now: Self.t0) else { Issue.record("\(key): the first session was refused"); continue }
            var mapped = Self.machine(listener, client: SocketEndpoint(address: Form.mapped.address, port: 2), connection: 2)
            guard case .dial = mapped.accepted(now: Self.t0) else { Issue.record("\(key): mapped form shared the IPv4 key"); continue }
            var compatible = Self.machine(listener, client: SocketEndpoint(address: Form.compatible.address, port: 3), connection: 3)
            guard case .dial = compatible.accepted(now: Self.t0) else { Issue.record("\(key): compatible form shared a key"); continue }
            // The same form again is the same key: refused, and the audit key is that form's.
            var again = Self.machine(listener, client: SocketEndpoint(address: Form.mapped.address, port: 4), connection: 4)
            guard case .closeClient = again.accepted(now: Self.t0) else { Issue.record("\(key): a second mapped session passed limit_conn 1"); continue }
            let expectedKey = key == "$remote_addr" ? Array("::ffff:10.1.2.3".utf8) : Form.mapped.address.bytes
            #expect(again.record.limit?.key == expectedKey)
            #expect(again.record.status == .serviceUnavailable)
        }
        // The key bytes themselves, as the renderer gives them.
        let binary = LogFormat(name: "k", escape: .default, template: try LogTemplate.parse("$binary_remote_addr"))
        func key(_ address: IPAddress) -> String {
            var r = SessionRecord(connection: 1, transport: .tcp, client: SocketEndpoint(address: address, port: 1),
                                  server: SocketEndpoint("127.0.0.1:8080")!, listener: "127.0.0.1:8080", startTime: 0)
            r.endTime = 0
            return binary.render(r, host: HostFacts(hostname: "h", pid: 1))
        }
        #expect(key(Form.ipv4.address) == "\\x0A\\x01\\x02\\x03")
        #expect(key(Form.mapped.address) == String(repeating: "\\x00", count: 10) + "\\xFF\\xFF\\x0A\\x01\\x02\\x03")
        #expect(key(Form.compatible.address) == String(repeating: "\\x00", count: 12) + "\\x0A\\x01\\x02\\x03")
    }

    @Test("zone-suffixed IPv6 (fe80::1%lo) is no address: refused in rules, geo, set_real_ip_from; a link-local peer meets fe80::/10")
    func zoneSuffixes() throws {
        #expect(IPAddress("fe80::1%lo") == nil)
        #expect(IPAddress("fe80::1%1") == nil)
        #expect(CIDR("fe80::1%lo/64") == nil && CIDR("fe80::%lo/10") == nil)
        #expect(SocketEndpoint("[fe80::1%lo]:80") == nil)
        // nginx's ngx_ptocidr (ngx_inet6_addr) takes only hex digits, ':' and '.': an error there too.
        #expect(Self.compileErrors("listen 8080; deny fe80::1%lo; proxy_pass 127.0.0.1:9000;") != nil)
        #expect(Self.compileErrors("listen 8080; allow fe80::/10%lo; proxy_pass 127.0.0.1:9000;") != nil)
        #expect(Self.compileErrors("listen 8080 proxy_protocol; set_real_ip_from fe80::1%eth0; proxy_pass 127.0.0.1:9000;") != nil)
        #expect(Self.compileErrors("listen 8080; deny $z; proxy_pass 127.0.0.1:9000;", stream: "geo $z { fe80::1%lo 1; }") != nil)
        // The control: the same lines without the zone compile.
        #expect(Self.compileErrors("listen 8080; deny fe80::1; proxy_pass 127.0.0.1:9000;") == nil)
        #expect(Self.compileErrors("listen 8080; deny $z; proxy_pass 127.0.0.1:9000;", stream: "geo $z { fe80::1 1; }") == nil)
        // A link-local peer the kernel reports (its scope id is not part of the address): the
        // rule for fe80::/10 applies whatever interface it came in on.
        let listener = try Self.listener("listen 8080; deny fe80::/10; proxy_pass 127.0.0.1:9000;")
        var m = Self.machine(listener, client: SocketEndpoint("[fe80::1]:5000")!)
        guard case .closeClient = m.accepted(now: Self.t0) else { Issue.record("a link-local client passed deny fe80::/10"); return }
        #expect(m.record.rule?.text == "deny fe80::/10;")
    }

    // MARK: PROXY-supplied addresses

    /// A v2 header built byte for byte (the encoder folds mapped addresses, so it cannot write
    /// some of the forms under test).
    static func v2(family: UInt8, command: UInt8 = 0x1, addresses: [UInt8], tlvs: [UInt8] = []) -> [UInt8] {
        let body = addresses + tlvs
        return ProxyHeaderDecoder.v2Signature + [0x20 | command, family, UInt8(body.count >> 8), UInt8(body.count & 0xFF)] + body
    }

    static func inet(_ source: String, _ destination: String = "203.0.113.9", sourcePort: UInt16 = 40000) -> [UInt8] {
        IPAddress(source)!.bytes + IPAddress(destination)!.bytes + [UInt8(sourcePort >> 8), UInt8(sourcePort & 0xFF), 0x01, 0xBB]
    }

    static func inet6(_ source: String, _ destination: String = "2001:db8::443", sourcePort: UInt16 = 40000) -> [UInt8] {
        func sixteen(_ text: String) -> [UInt8] {
            let a = IPAddress(text)!
            if case .v4(let v) = a { return IPAddress.v6(0xFFFF_0000_0000 | UInt128(v)).bytes }
            return a.bytes
        }
        return sixteen(source) + sixteen(destination) + [UInt8(sourcePort >> 8), UInt8(sourcePort & 0xFF), 0x01, 0xBB]
    }

    /// A header and what it must do: `names` is the client a trusted peer's header makes
    /// (nil = the peer stays the client), or `broken` for a 400.
    struct HeaderCase: CustomStringConvertible {
        var name: String
        var bytes: [UInt8]
        var names: String?
        var broken = false
        var description: String { name }
    }

    /// The rule set both PROXY tables run against: IPv4 and IPv6 deny rules, and a denied
    /// trusted peer, so that "the peer stays the client" shows as a 403 for that peer.
    static let proxyServer = """
        listen 8080 proxy_protocol;
        set_real_ip_from 127.0.0.0/29;
        deny 192.0.2.1;
        deny 2001:db8::bad;
        deny 127.0.0.3;
        allow all;
        proxy_pass 127.0.0.1:9000;
        """

    static let headerCases: [HeaderCase] = [
        HeaderCase(name: "v1 TCP4 denied", bytes: Array("PROXY TCP4 192.0.2.1 203.0.113.9 40000 443\r\n".utf8), names: "192.0.2.1"),
        HeaderCase(name: "v1 TCP4 allowed", bytes: Array("PROXY TCP4 198.51.100.7 203.0.113.9 40000 443\r\n".utf8), names: "198.51.100.7"),
        HeaderCase(name: "v1 TCP6 denied", bytes: Array("PROXY TCP6 2001:db8::bad 2001:db8::1 40000 443\r\n".utf8), names: "2001:db8::bad"),
        HeaderCase(name: "v1 TCP6 mapped denied", bytes: Array("PROXY TCP6 ::ffff:192.0.2.1 ::ffff:203.0.113.9 40000 443\r\n".utf8),
                   names: "::ffff:192.0.2.1"),
        HeaderCase(name: "v1 TCP6 mapped in hex", bytes: Array("PROXY TCP6 ::FFFF:C000:201 ::1 40000 443\r\n".utf8),
                   names: "::ffff:192.0.2.1"),
        HeaderCase(name: "v1 TCP6 compatible (not folded)", bytes: Array("PROXY TCP6 ::192.0.2.1 ::1 40000 443\r\n".utf8),
                   names: "::192.0.2.1"),
        HeaderCase(name: "v1 TCP6 with a zone", bytes: Array("PROXY TCP6 fe80::1%eth0 fe80::2 40000 443\r\n".utf8), broken: true),
        HeaderCase(name: "v1 TCP6 with a numeric zone", bytes: Array("PROXY TCP6 fe80::1%2 fe80::2 40000 443\r\n".utf8), broken: true),
        HeaderCase(name: "v1 TCP4 naming an IPv6 address", bytes: Array("PROXY TCP4 ::ffff:192.0.2.1 203.0.113.9 40000 443\r\n".utf8),
                   broken: true),
        HeaderCase(name: "v1 TCP6 bracketed", bytes: Array("PROXY TCP6 [2001:db8::bad] ::1 40000 443\r\n".utf8), broken: true),
        HeaderCase(name: "v1 UNKNOWN", bytes: Array("PROXY UNKNOWN 192.0.2.1 203.0.113.9 40000 443\r\n".utf8), names: nil),
        HeaderCase(name: "v2 INET denied", bytes: v2(family: 0x11, addresses: inet("192.0.2.1")), names: "192.0.2.1"),
        HeaderCase(name: "v2 INET allowed", bytes: v2(family: 0x11, addresses: inet("198.51.100.7")), names: "198.51.100.7"),
        HeaderCase(name: "v2 INET6 denied", bytes: v2(family: 0x21, addresses: inet6("2001:db8::bad")), names: "2001:db8::bad"),
        HeaderCase(name: "v2 INET6 carrying a mapped address", bytes: v2(family: 0x21, addresses: inet6("192.0.2.1", "203.0.113.9")),
                   names: "::ffff:192.0.2.1"),
        HeaderCase(name: "v2 INET6 carrying a compatible address", bytes: v2(family: 0x21, addresses: inet6("::192.0.2.1")),
                   names: "::192.0.2.1"),
        HeaderCase(name: "v2 UNIX", bytes: v2(family: 0x31, addresses: [UInt8](repeating: 0x41, count: 216)), names: nil),
        HeaderCase(name: "v2 AF_UNSPEC", bytes: v2(family: 0x00, addresses: []), names: nil),
        HeaderCase(name: "v2 LOCAL with INET addresses", bytes: v2(family: 0x11, command: 0x0, addresses: inet("192.0.2.1")), names: nil),
        HeaderCase(name: "v2 INET over DGRAM", bytes: v2(family: 0x12, addresses: inet("192.0.2.1")), names: nil),
    ]

    /// The status a client address gets from `proxyServer`'s rules.
    static func expectedStatus(_ client: String) -> SessionStatus {
        let address = IPAddress(client)!
        let denied: Set<IPAddress> = [IPAddress("192.0.2.1")!, IPAddress("2001:db8::bad")!, IPAddress("127.0.0.3")!]
        return denied.contains(address.folded) ? .forbidden : .ok
    }

    @Test("PROXY addresses of every form: a trusted peer's header decides exactly by the named address; an untrusted one's never")
    func proxyHeaderForms() throws {
        let listener = try Self.listener(Self.proxyServer)
        var checked = 0
        for peer in ["127.0.0.1", "127.0.0.3", "127.0.0.9", "::1"] {
            let trusted = peer.hasPrefix("127.0.0.") && peer != "127.0.0.9"
            for header in Self.headerCases {
                var m = Self.machine(listener, client: SocketEndpoint(address: IPAddress(peer)!, port: 50000))
                guard case .readProxyHeader = m.accepted(now: Self.t0) else { Issue.record("no header read"); continue }
                let action = (header.bytes + Array("payload".utf8)).withUnsafeBytes { m.received($0, now: Self.t0) }
                let refused: Bool
                switch action {
                case .closeClient: refused = true
                case .dial: refused = false
                default: Issue.record("\(header) from \(peer): unexpected \(action)"); continue
                }
                #expect(m.record.peer.address == IPAddress(peer)!, "\(header): the peer is always the TCP peer")
                if header.broken {
                    #expect(refused && m.record.status == .badRequest, "\(header) from \(peer): \(m.record.outcome)")
                    #expect(m.record.client.address == IPAddress(peer)!)
                    checked += 1
                    continue
                }
                let client = (trusted ? header.names : nil) ?? peer
                #expect(m.record.client.address == IPAddress(client)!, "\(header) from \(peer): client \(m.record.client)")
                #expect(m.record.client.hostText == client, "\(header) from \(peer): written as \(m.record.client.hostText)")
                let status = Self.expectedStatus(client)
                #expect(m.record.status == status, "\(header) from \(peer): \(m.record.status), expected \(status)")
                #expect(refused == (status != .ok))
                if trusted, header.names != nil {
                    #expect(m.record.client.port == 40000, "\(header): the named port")
                } else {
                    #expect(m.record.client.port == 50000, "\(header) from \(peer): the peer's port")
                }
                checked += 1
            }
        }
        #expect(checked == 4 * Self.headerCases.count)
    }
}

/// Client-controlled bytes through the log renderers, without sockets: every escape mode of
/// access lines and the audit line.
@Suite("No injection through logged values (policy)")
struct NoInjectionRendererTests {
    /// Values a client can choose (PROXY TLVs, SNI, ALPN): quotes, backslashes, CR, LF, NUL,
    /// other control bytes, DEL, invalid UTF-8, valid UTF-8, JSON and log-line look-alikes, long.
    static let hostile: [[UInt8]] = {
        var values: [[UInt8]] = [
            Array("a\"b\\c\\\"d".utf8),
            Array("x\n{\"forged\":true}\n".utf8),
            Array("cr\rlf\r\ncrlf".utf8),
            [0x61, 0x00, 0x62, 0x00],
            Array(0x00...0x1F) + [0x7F],
            [0xC3, 0x28, 0xFF, 0xFE, 0x80, 0xBF, 0xE2, 0x82],
            Array("caf\u{E9} \u{1F600}".utf8),
            Array("\\u0000\\n\\x0A\",\"status\":200,\"x\":\"".utf8),
            Array("127.0.0.1 - - [01/Jan/2026:00:00:00 +0000] TCP 200 0 0 0.000".utf8) + [0x0A],
        ]
        var long: [UInt8] = []
        var state: UInt64 = 0x5EED
        for _ in 0..<5000 {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            long.append(UInt8(truncatingIfNeeded: state >> 56))
        }
        values.append(long)
        return values
    }()

    /// `escape=default` as docs/logs.md states it: `"`, `\`, 0x00–0x1F and 0x7F–0xFF as \xXX.
    static func documentedDefault(_ value: [UInt8]) -> String {
        value.map { byte -> String in
            if byte == 0x22 || byte == 0x5C || byte < 0x20 || byte > 0x7E {
                return "\\x" + String(byte, radix: 16, uppercase: true).leftPadded(to: 2)
            }
            return String(UnicodeScalar(byte))
        }.joined()
    }

    static func record(tlv value: [UInt8]) -> SessionRecord {
        var r = SessionRecord(connection: 9, transport: .tcp, client: SocketEndpoint("198.51.100.7:40000")!,
                              server: SocketEndpoint("127.0.0.1:8080")!, listener: "127.0.0.1:8080", startTime: 1_764_270_000)
        r.endTime = r.startTime + 0.5
        let tlvs = [ProxyTLV(.authority, value), ProxyTLV(.uniqueID, value), ProxyTLV(type: 0xE0, value: value)]
        let header = ProxyHeaderEncoder.v2(source: r.client, destination: r.server, tlvs: tlvs)
        r.proxyHeader = try! ProxyHeaderDecoder.decode(header)!.header
        return r
    }

    static let host = HostFacts(hostname: "gw", pid: 1)

    @Test("escape=default: exactly the documented \\xXX form, never a raw control byte, quote or backslash")
    func defaultEscape() throws {
        let format = LogFormat(name: "d", escape: .default, template: try LogTemplate.parse(
            "\"$proxy_protocol_tlv_authority\" \"$proxy_protocol_tlv_unique_id\" \"$proxy_protocol_tlv_0xe0\""))
        for value in Self.hostile {
            let line = format.render(Self.record(tlv: value), host: Self.host)
            let one = Self.documentedDefault(value)
            #expect(line == "\"\(one)\" \"\(one)\" \"\(one)\"")
            #expect(line.utf8.allSatisfy { $0 >= 0x20 && $0 <= 0x7E }, "only printable ASCII in a default-escaped line")
            #expect(line.utf8.filter { $0 == 0x22 }.count == 6, "only the format's own quotes")
        }
    }

    @Test("escape=json: a JSON-object format parses as one object and every field round-trips the value")
    func jsonEscape() throws {
        let format = LogFormat(name: "j", escape: .json, template: try LogTemplate.parse(
            #"{"a":"$proxy_protocol_tlv_authority","u":"$proxy_protocol_tlv_unique_id","c":"$proxy_protocol_tlv_0xe0","s":$status}"#))
        for value in Self.hostile {
            let line = format.render(Self.record(tlv: value), host: Self.host)
            #expect(!line.contains("\n") && !line.contains("\r"))
            let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], "\(line.prefix(200))")
            #expect(object.count == 4 && object["s"] as? Int == 200, "no field was forged")
            // Invalid UTF-8 is written as U+FFFD (docs/logs.md); everything else is exact.
            let expected = String(decoding: value, as: UTF8.self)
            for key in ["a", "u", "c"] { #expect(object[key] as? String == expected, "\(key)") }
        }
    }

    @Test("escape=none: the value is written as it is (CR and LF included) — the operator's choice, as nginx")
    func noEscape() throws {
        let format = LogFormat(name: "n", escape: .none, template: try LogTemplate.parse("[$proxy_protocol_tlv_0xe0]"))
        let line = format.render(Self.record(tlv: Array("a\nb\rc\"d".utf8)), host: Self.host)
        #expect(line == "[a\nb\rc\"d]")
        let invalid = format.render(Self.record(tlv: [0x61, 0xFF, 0x62]), host: Self.host)
        #expect(invalid == "[a\u{FFFD}b]", "invalid UTF-8 becomes U+FFFD (nginx writes it raw)")
    }

    @Test("the audit line: one JSON object whose variable value and limit key round-trip any client bytes")
    func auditLine() throws {
        for value in Self.hostile {
            var r = Self.record(tlv: value)
            r.outcome = SessionOutcome(phase: .access, cause: .accessDenied,
                                       rule: RuleReference(file: "r.conf", line: 3, text: "deny $proxy_protocol_tlv_0xe0;"))
            r.decidingVariable = (name: "$proxy_protocol_tlv_0xe0", value: value)
            let line = AuditLine.render(r)
            #expect(!line.contains("\n") && !line.contains("\r"))
            #expect(line.utf8.allSatisfy { $0 >= 0x20 }, "no raw control byte in the audit line")
            let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            #expect(object["status"] as? Int == 403 && object["forged"] == nil && object["x"] == nil)
            let variable = try #require(object["variable"] as? [String: Any])
            #expect(variable["value"] as? String == String(decoding: value, as: UTF8.self))
            #expect(variable["name"] as? String == "$proxy_protocol_tlv_0xe0")

            var limited = Self.record(tlv: value)
            limited.outcome = SessionOutcome(phase: .limitConn, cause: .connectionLimit(zone: "auth"))
            limited.limit = LimitDecision(zone: "auth", key: value, limit: "1")
            let limitLine = AuditLine.render(limited)
            let limitObject = try #require(try JSONSerialization.jsonObject(with: Data(limitLine.utf8)) as? [String: Any])
            let limit = try #require(limitObject["limit"] as? [String: Any])
            #expect(limit["key"] as? String == String(decoding: value, as: UTF8.self))
            #expect(limitObject["status"] as? Int == 503)
        }
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
