import Foundation
import Testing
import PortcullisCore
@testable import PortcullisPolicy

@Suite struct AuditLineTests {
    func refused(ruleText: String, file: String = "/etc/portcullis/rules.conf") -> SessionRecord {
        var r = SessionRecord(
            connection: 7, transport: .tcp,
            client: SocketEndpoint(address: IPAddress("::ffff:10.1.2.3")!, port: 40000),
            server: SocketEndpoint(address: IPAddress("127.0.0.1")!, port: 8080),
            listener: "127.0.0.1:8080", startTime: 1_764_270_000.5)
        r.outcome = SessionOutcome(phase: .access, cause: .accessDenied, rule: RuleReference(file: file, line: 12, text: ruleText))
        return r
    }

    func dryRun(_ record: SessionRecord) -> SessionRecord {
        var record = record
        record.outcome.enforcement = .dryRun
        return record
    }

    func parse(_ line: String) throws -> [String: Any] {
        #expect(!line.contains("\n"))
        return try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
    }

    @Test("a record is a value: a copy keeps its refusal details when the other copy changes (they live in a copy-on-write box)")
    func recordCopiesKeepTheirDetails() {
        let original = refused(ruleText: "deny 10.0.0.0/8;")
        var changed = original
        changed.outcome = SessionOutcome(phase: .limitConn, cause: .connectionLimit(zone: "perip"))
        changed.limit = LimitDecision(zone: "perip", key: Array("10.1.2.3".utf8), limit: "1")
        #expect(original.reason == "access forbidden by rule")
        #expect(original.rule?.text == "deny 10.0.0.0/8;")
        #expect(original.limit == nil)
        #expect(changed.reason == "limiting connections by zone \"perip\"" && changed.rule == nil && changed.limit?.zone == "perip")
        #expect(original.status == .forbidden && changed.status == .serviceUnavailable)
        // A record that never set any detail reads nil everywhere.
        let plain = SessionRecord(connection: 1, transport: .udp,
                                  client: SocketEndpoint(address: IPAddress("127.0.0.1")!, port: 1),
                                  server: SocketEndpoint(address: IPAddress("127.0.0.1")!, port: 2),
                                  listener: "127.0.0.1:2", startTime: 0)
        #expect(plain.proxyHeader == nil && plain.rule == nil && plain.decidingVariable == nil && plain.reason == nil)
        #expect(plain.outcome == .completed && plain.status == .ok && plain.phase == .relay && !plain.refused)
    }

    @Test func refusedSessionLine() throws {
        let line = AuditLine.render(refused(ruleText: "deny 10.0.0.0/8;"))
        let object = try parse(line)
        #expect(object["status"] as? Int == 403)
        #expect(object["phase"] as? String == "access")
        #expect(object["client"] as? String == "::ffff:10.1.2.3")
        #expect(object["client_port"] as? Int == 40000)
        #expect(object["server"] as? String == "127.0.0.1:8080")
        #expect(object["listener"] as? String == "127.0.0.1:8080")
        #expect(object["protocol"] as? String == "TCP")
        #expect(object["connection"] as? Int == 7)
        #expect(object["reason"] as? String == "access forbidden by rule")
        #expect(object["dry_run"] as? Bool == false)
        #expect(object["upstream"] == nil)
        let rule = try #require(object["rule"] as? [String: Any])
        #expect(rule["file"] as? String == "/etc/portcullis/rules.conf")
        #expect(rule["line"] as? Int == 12)
        #expect(rule["at"] as? String == "/etc/portcullis/rules.conf:12")
        #expect(rule["text"] as? String == "deny 10.0.0.0/8;")
        let time = try #require(object["time"] as? String)
        #expect(time.wholeMatch(of: /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.500[+-]\d\d:\d\d/) != nil, "\(time)")
        #expect(line.hasPrefix("{\"time\":"))
        #expect(line.hasSuffix(",\"dry_run\":false}"))
    }

    @Test func hostileRuleTextCannotBreakTheLine() throws {
        let hostile = "deny \"x\",\"status\":200}\n{\"forged\":true \\ \u{1}"
        let line = AuditLine.render(dryRun(refused(ruleText: hostile, file: "a\"b\n.conf")))
        let object = try parse(line)
        #expect(object["status"] as? Int == 403)
        #expect(object["forged"] == nil)
        #expect(object["dry_run"] as? Bool == true)
        let rule = try #require(object["rule"] as? [String: Any])
        #expect(rule["text"] as? String == hostile)
        #expect(rule["file"] as? String == "a\"b\n.conf")
    }

    @Test func withoutRuleAndWithUpstreams() throws {
        var r = refused(ruleText: "")
        r.outcome = SessionOutcome(phase: .upstreamPick, cause: .noLiveUpstreams)
        r.upstreamAttempts = [
            UpstreamAttempt(address: SocketEndpoint(address: IPAddress("10.0.0.9")!, port: 80), connectTime: nil),
            UpstreamAttempt(address: SocketEndpoint(address: IPAddress("::1")!, port: 81), connectTime: nil),
        ]
        let line = AuditLine.render(r)
        #expect(line.contains("\"rule\":null"))
        let object = try parse(line)
        #expect(object["status"] as? Int == 502)
        #expect(object["phase"] as? String == "upstream_pick")
        #expect(object["reason"] as? String == "no live upstreams")
        #expect(object["upstream"] as? [String] == ["10.0.0.9:80", "[::1]:81"])
    }

    /// JSON allows U+2028 raw in a string, but readers that split lines the Unicode way
    /// (Python's splitlines, Swift's isNewline) would cut the line there. The log-format
    /// fuzzer checks the same (its seed-hostile-line-separators holds all three).
    @Test func unicodeLineSeparatorsAreEscaped() throws {
        var r = refused(ruleText: "deny $v; # a\u{2028}b")
        r.decidingVariable = (name: "$v", value: Array("x\u{85}y\u{2029}z".utf8))
        let line = AuditLine.render(r)
        #expect(line.split(whereSeparator: \.isNewline).count == 1)
        #expect(line.contains(#"a\u2028b"#) && line.contains(#"x\u0085y\u2029z"#))
        let object = try parse(line)
        #expect((object["rule"] as? [String: Any])?["text"] as? String == "deny $v; # a\u{2028}b")
        #expect((object["variable"] as? [String: Any])?["value"] as? String == "x\u{85}y\u{2029}z")
    }
}
