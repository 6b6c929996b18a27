#if canImport(Glibc)
import Glibc
#endif
import Foundation
import PortcullisCore
import PortcullisTestSupport
import PortcullisWire
import Testing

/// Issue #16 item 4, "no injection", over real sockets: client-chosen bytes in PROXY v2 TLVs
/// (AUTHORITY, UNIQUE_ID, 0xE0) and in the ClientHello's SNI and ALPN, logged through
/// `escape=default`, `escape=json` and `escape=none` access logs, the audit log and the error
/// log. Every audit line is one JSON object that gives the value back; default and json access
/// lines stay one line per session; escape=none writes the bytes as they are (the operator's choice).
@Suite("No injection through logged client values, end to end", .serialized)
struct LogInjectionTests {
    /// Quotes, backslashes, CR, LF, NUL, other control bytes, DEL, invalid and valid UTF-8,
    /// forged JSON and forged log lines, and long values.
    static func hostile(long: Int) -> [[UInt8]] {
        var values: [[UInt8]] = [
            Array("a\"b\\c\\\"d'e".utf8),
            Array("x\n{\"forged\":true}\n".utf8),
            Array("cr\rlf\r\ncrlf\n\r".utf8),
            [0x61, 0x00, 0x62, 0x00],
            Array(0x01...0x1F) + [0x7F, 0x00],
            [0xC3, 0x28, 0xFF, 0xFE, 0x80, 0xBF, 0xE2, 0x82],
            Array("caf\u{E9} \u{1F600}".utf8),
            Array("\",\"status\":200,\"client\":\"10.0.0.1\",\"x\":\"\\u0000".utf8),
            Array("127.0.0.1 - - [01/Jan/2026:00:00:00 +0000] TCP 200 0 0 0.000".utf8) + [0x0A],
        ]
        var state: UInt64 = 0x1EAF
        var big: [UInt8] = []
        for _ in 0..<long {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            big.append(UInt8(truncatingIfNeeded: state >> 57) == 0 ? 0x0A : UInt8(truncatingIfNeeded: state >> 56))
        }
        values.append(big)
        return values
    }

    /// docs/logs.md's `escape=default`: `"`, `\`, 0x00–0x1F and 0x7F–0xFF as `\xXX`.
    static func documentedDefault(_ value: [UInt8]) -> String {
        value.map { $0 == 0x22 || $0 == 0x5C || $0 < 0x20 || $0 > 0x7E ? String(format: "\\x%02X", $0) : String(UnicodeScalar($0)) }
            .joined()
    }

    /// docs/logs.md's `escape=json`, read back: the value with invalid UTF-8 as U+FFFD.
    static func asJSONString(_ value: [UInt8]) -> String { String(decoding: value, as: UTF8.self) }

    struct Sent {
        var variable: String
        var value: [UInt8]
    }

    /// Checks the three access logs, the audit log and the error log for `sent` (by the TCP
    /// peer, `ip:port`: each session comes from its own source address, so no two share one).
    /// `fields` are the variables each format logs, in order; `absent` is how escape=default
    /// writes the ones a session does not have: `-` for a TLV that is not there (not found),
    /// "" for the preread variables (an empty value, as nginx).
    static func checkLogs(_ gateway: GatewayHarness, sent: [String: Sent], fields: [String], noneField: String,
                          client: String?, absent: String) async throws {
        let count = sent.count
        let defaultLines = await gateway.waitForLines(of: "default.log") { $0.count >= count }
        let jsonLines = await gateway.waitForLines(of: "json.log") { $0.count >= count }
        let auditLines = await gateway.waitForLines(of: "audit.log") { $0.count >= count }
        gateway.gateway.flushLogs()

        // escape=default: one line per session, printable ASCII only, the value as documented.
        #expect(defaultLines.count == count, "escape=default: \(defaultLines.count) lines for \(count) sessions")
        for line in defaultLines {
            #expect(line.utf8.allSatisfy { $0 >= 0x20 && $0 <= 0x7E }, "a raw byte in an escape=default line")
            // `"` is always escaped in a value, so the format's own quotes delimit the fields
            // (a value may hold spaces): `PORT "v1" "v2" 403`.
            let parts = line.split(separator: "\"", omittingEmptySubsequences: false).map(String.init)
            let port = String(parts[0].dropLast())
            guard parts.count == 2 * fields.count + 1, let s = sent[port] else {
                Issue.record("escape=default line: \(line.prefix(200))"); continue
            }
            for (i, name) in fields.enumerated() {
                let want = name == s.variable ? Self.documentedDefault(s.value) : absent
                #expect(parts[2 * i + 1] == want, "\(name) on port \(port)")
            }
            #expect(parts.last == " 403")
        }

        // escape=json: one line per session, each one JSON object that gives the value back.
        #expect(jsonLines.count == count, "escape=json: \(jsonLines.count) lines for \(count) sessions")
        for object in jsonObjects(jsonLines) {
            guard let port = object["port"] as? String, let s = sent[port] else {
                Issue.record("escape=json object without a known port: \(object)"); continue
            }
            #expect(object.count == fields.count + 2 && object["status"] as? Int == 403, "a field was forged: \(object.keys)")
            for name in fields {
                let want = name == s.variable ? Self.asJSONString(s.value) : ""
                #expect(object[name] as? String == want, "\(name) on port \(port)")
            }
        }

        // The audit log: exactly one JSON object per refused session; its variable round-trips.
        #expect(auditLines.count == count, "audit: \(auditLines.count) lines for \(count) sessions")
        let audit = jsonObjects(auditLines)
        #expect(audit.count == count)
        for object in audit {
            let port = try #require(object["peer"] as? String)
            let s = try #require(sent[port], "\(port)")
            #expect(object["status"] as? Int == 403)
            #expect(object["client"] as? String == (client ?? String(port.split(separator: ":")[0])))
            #expect(object["forged"] == nil && object["x"] == nil, "a field was forged")
            let variable = try #require(object["variable"] as? [String: Any])
            #expect(variable["name"] as? String == "$" + s.variable)
            #expect(variable["value"] as? String == Self.asJSONString(s.value), "\(s.variable) on port \(port)")
            #expect((object["rule"] as? [String: Any])?["text"] as? String == "deny $\(s.variable);")
        }

        // escape=none: the bytes as they are, so a value's CR and LF are in the file raw. The
        // file is one "N<port|value>N\n" record per session; its newlines are the records' plus
        // the values' own.
        let none = try String(contentsOfFile: gateway.path("none.log"), encoding: .utf8)
        var newlines = count
        for (port, s) in sent {
            let value = s.variable == noneField ? Self.asJSONString(s.value) : ""
            #expect(none.contains("N<\(port)|\(value)>N\n"), "escape=none record for port \(port)")
            newlines += value.utf8.filter { $0 == 0x0A }.count
        }
        #expect(none.utf8.filter { $0 == 0x0A }.count == newlines)
        #expect(none.utf8.contains(0x0D), "escape=none keeps CR")

        // The error log: one line per message, each starting with its time stamp.
        let errors = gateway.lines(of: "error.log")
        #expect(errors.count >= count)
        for line in errors {
            #expect(line.wholeMatch(of: /\d{4}\/\d\d\/\d\d \d\d:\d\d:\d\d \[[a-z]+\] .*/) != nil, "error log line: \(line.prefix(200))")
        }
    }

    static func formats(_ fields: [String], none: String) -> String {
        let plain = fields.map { "\"$\($0)\"" }.joined(separator: " ")
        let json = fields.map { "\"\($0)\":\"$\($0)\"" }.joined(separator: ",")
        return """
            log_format d '$realip_remote_addr:$realip_remote_port \(plain) $status';
            log_format j escape=json '{"port":"$realip_remote_addr:$realip_remote_port",\(json),"status":$status}';
            log_format n escape=none 'N<$realip_remote_addr:$realip_remote_port|$\(none)>N';
            access_log {DIR}/default.log d;
            access_log {DIR}/json.log j;
            access_log {DIR}/none.log n;
            audit_log {DIR}/audit.log sample=10000/s;
            error_log {DIR}/error.log info;
            """
    }

    @Test("PROXY v2 AUTHORITY, UNIQUE_ID and 0xE0 TLVs holding hostile bytes: every log stays parseable and gives the value back")
    func proxyTLVs() async throws {
        let upstream = try TestServer.echo()
        let fields = ["proxy_protocol_tlv_authority", "proxy_protocol_tlv_unique_id", "proxy_protocol_tlv_0xe0"]
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.formats(fields, none: "proxy_protocol_tlv_0xe0"))
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.0/8;
                    deny $proxy_protocol_tlv_0xe0;
                    deny $proxy_protocol_tlv_unique_id;
                    deny $proxy_protocol_tlv_authority;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        let types: [(String, UInt8)] = [(fields[0], 0x02), (fields[1], 0x05), (fields[2], 0xE0)]
        var sent: [String: Sent] = [:]
        for (i, value) in Self.hostile(long: 20_000).enumerated() {
            for (j, (name, type)) in types.enumerated() {
                let header = ProxyHeaderEncoder.v2(
                    source: SocketEndpoint("198.51.100.7:40000")!, destination: SocketEndpoint("203.0.113.9:443")!,
                    tlvs: [ProxyTLV(type: type, value: value)])
                let source = "127.0.1.\(1 + i * types.count + j)"
                let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: source)
                sent["\(source):\(try client.localEndpoint().port)"] = Sent(variable: name, value: value)
                try client.send(header + Array("payload".utf8))
                #expect(client.isClosedByPeer(), "a session with \(name) set was not refused")
            }
        }
        #expect(sent.count == 30)
        // The trusted header named the client: refusals name 198.51.100.7, not the peer.
        try await Self.checkLogs(gateway, sent: sent, fields: fields, noneField: "proxy_protocol_tlv_0xe0", client: "198.51.100.7",
                                 absent: "-")
        await gateway.stop()
    }

    /// A ClientHello record whose server_name and ALPN hold any bytes (the builder in
    /// PortcullisWire takes Swift strings, which cannot hold invalid UTF-8).
    static func hello(serverName: [UInt8]?, alpn: [UInt8]?) -> [UInt8] {
        func u16(_ n: Int) -> [UInt8] { [UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n)] }
        func vector16(_ bytes: [UInt8]) -> [UInt8] { u16(bytes.count) + bytes }
        var extensions: [UInt8] = []
        if let serverName { extensions += u16(0) + vector16(vector16([0] + vector16(serverName))) }
        if let alpn { extensions += u16(16) + vector16(vector16([UInt8(alpn.count)] + alpn)) }
        extensions += u16(43) + vector16([4, 0x03, 0x04, 0x03, 0x03])
        let body: [UInt8] = [0x03, 0x03] + [UInt8](repeating: 7, count: 32) + [0] + vector16([0x13, 0x01]) + [1, 0]
            + vector16(extensions)
        let handshake: [UInt8] = [1, 0] + u16(body.count) + body
        return [0x16, 0x03, 0x01] + u16(handshake.count) + handshake
    }

    @Test("ssl_preread SNI and ALPN holding hostile bytes: every log stays parseable and gives the value back")
    func sniAndALPN() async throws {
        let upstream = try TestServer.echo()
        let fields = ["ssl_preread_server_name", "ssl_preread_alpn_protocols"]
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.formats(fields, none: "ssl_preread_server_name"))
                server {
                    listen 127.0.0.1:{PORT};
                    ssl_preread on;
                    preread_timeout 3s;
                    deny $ssl_preread_server_name;
                    deny $ssl_preread_alpn_protocols;
                    proxy_pass 127.0.0.1:\(upstream.port);
                }
            }
            """)
        var sent: [String: Sent] = [:]
        for (i, value) in Self.hostile(long: 8_000).enumerated() {
            for (j, name) in fields.enumerated() {
                // An ALPN name is at most 255 bytes; a server name here up to 8,000.
                let v = name == fields[1] ? Array(value.prefix(255)) : value
                let bytes = name == fields[0] ? Self.hello(serverName: v, alpn: nil) : Self.hello(serverName: nil, alpn: v)
                let source = "127.0.2.\(1 + i * fields.count + j)"
                let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, from: source)
                sent["\(source):\(try client.localEndpoint().port)"] = Sent(variable: name, value: v)
                try client.send(bytes)
                #expect(client.isClosedByPeer(), "a session with \(name) set was not refused")
            }
        }
        #expect(sent.count == 20)
        try await Self.checkLogs(gateway, sent: sent, fields: fields, noneField: "ssl_preread_server_name", client: nil,
                                 absent: "")
        await gateway.stop()
    }
}
