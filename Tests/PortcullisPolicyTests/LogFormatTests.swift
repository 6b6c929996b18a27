import Foundation
import Testing
import PortcullisCore
@testable import PortcullisPolicy

func record(client: String = "192.0.2.7", port: UInt16 = 51000) -> SessionRecord {
    var r = SessionRecord(
        connection: 42, transport: .tcp,
        client: SocketEndpoint(address: IPAddress(client)!, port: port),
        server: SocketEndpoint(address: IPAddress("10.0.0.1")!, port: 8080),
        listener: "10.0.0.1:8080", startTime: 1_764_270_000.0)
    r.endTime = r.startTime + 0.123
    r.bytesSent = 1000
    r.bytesReceived = 20
    return r
}

func format(_ text: String, escape: LogEscape = .default) throws -> LogFormat {
    LogFormat(name: "t", escape: escape, template: try LogTemplate.parse(text))
}

let host = HostFacts(hostname: "gw1", pid: 4242)

@Suite struct LogFormatTests {
    @Test func basicVariables() throws {
        let f = try format("$remote_addr:$remote_port $server_addr:$server_port $protocol $connection $status $bytes_sent $bytes_received $session_time $hostname $pid")
        #expect(f.render(record(), host: host) == "192.0.2.7:51000 10.0.0.1:8080 TCP 42 200 1000 20 0.123 gw1 4242")
    }

    @Test func bracedNamesAndLiterals() throws {
        let f = try format("[${remote_addr}]${status}x 100%")
        #expect(f.render(record(), host: host) == "[192.0.2.7]200x 100%")
        // A name runs over letters, digits and "_": "$status_x" is one unknown name.
        #expect(throws: LogTemplate.ParseError.unknownVariable("status_x", offset: 0)) { try LogTemplate.parse("$status_x") }
        #expect(try LogTemplate.parse("$status-x").variables == [.fixed(.status)])
    }

    @Test func parseErrors() {
        #expect(throws: LogTemplate.ParseError.unknownVariable("remote_adr", offset: 2)) { try LogTemplate.parse("a $remote_adr") }
        #expect(throws: LogTemplate.ParseError.unterminatedBrace(offset: 1)) { try LogTemplate.parse("x${status") }
        #expect(throws: LogTemplate.ParseError.emptyName(offset: 0)) { try LogTemplate.parse("$ x") }
        #expect(throws: LogTemplate.ParseError.emptyName(offset: 0)) { try LogTemplate.parse("${}") }
    }

    @Test func templateParts() throws {
        let t = try LogTemplate.parse("[${remote_addr}]$status-x")
        #expect(t.parts == [.literal("["), .variable(.fixed(.remoteAddr)), .literal("]"), .variable(.fixed(.status)), .literal("-x")])
        #expect(t.variables == [.fixed(.remoteAddr), .fixed(.status)])
    }

    @Test func defaultEscapingOfBinaryAddress() throws {
        let f = try format("\"$binary_remote_addr\" $remote_addr")
        #expect(f.render(record(client: "127.0.0.1"), host: host) == "\"\\x7F\\x00\\x00\\x01\" 127.0.0.1")
        let v6 = f.render(record(client: "::1"), host: host)
        #expect(v6 == "\"" + String(repeating: "\\x00", count: 15) + "\\x01\" ::1")
    }

    @Test func escapingOfEveryByteClass() {
        let value: [UInt8] = Array("a\"b\\c".utf8) + [0x00, 0x1F, 0x20, 0x7E, 0x7F, 0xC3, 0xA9, 0x0A]
        var out = ""
        LogEscaping.append(value, escape: .default, to: &out)
        #expect(out == "a\\x22b\\x5Cc\\x00\\x1F ~\\x7F\\xC3\\xA9\\x0A")
        out = ""
        LogEscaping.append(value, escape: .json, to: &out)
        #expect(out == "a\\\"b\\\\c\\u0000\\u001F ~\u{7F}é\\n")
        out = ""
        LogEscaping.append(Array("a\"b\\c\n".utf8), escape: .none, to: &out)
        #expect(out == "a\"b\\c\n")
    }

    @Test func jsonEscapes() {
        var out = ""
        LogEscaping.appendJSONEscaped([0x22, 0x5C, 0x0A, 0x0D, 0x09, 0x08, 0x0C, 0x01, 0x41], to: &out)
        #expect(out == #"\"\\\n\r\t\b\f\u0001A"#)
        #expect(LogEscaping.jsonString("say \"hi\"\n") == #""say \"hi\"\n""#)
    }

    @Test func lineSeparatorsAreEscapedOnlyWhenAsked() {
        // The access log's escape=json is nginx's: U+0085, U+2028, U+2029 pass as they are.
        // The audit log asks for them escaped; a lone or truncated lead byte is not a separator.
        let value = Array("a\u{85}b\u{2028}c\u{2029}d".utf8) + [0xE2, 0x80]
        var nginx = "", audit = ""
        LogEscaping.appendJSONEscaped(value, to: &nginx)
        LogEscaping.appendJSONEscaped(value, to: &audit, lineSeparators: true)
        #expect(nginx == String(decoding: value, as: UTF8.self))
        #expect(audit == #"a\u0085b\u2028c\u2029d"# + String(decoding: [0xE2, 0x80] as [UInt8], as: UTF8.self))
    }

    @Test func jsonFormatRendersValidJSON() throws {
        let f = try format("{\"addr\":\"$binary_remote_addr\",\"status\":$status}", escape: .json)
        let line = f.render(record(client: "10.0.0.1"), host: host)
        #expect(line == "{\"addr\":\"\\n\\u0000\\u0000\\u0001\",\"status\":200}")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["addr"] as? String == "\n\0\0\u{1}")
        #expect(object["status"] as? Int == 200)
    }

    @Test func noEscaping() throws {
        let f = try format("$binary_remote_addr", escape: .none)
        #expect(Array(f.render(record(client: "65.66.67.68"), host: host).utf8) == [65, 66, 67, 68])
    }

    @Test func missingValuesRenderAsDashOnlyWithDefaultEscaping() throws {
        let f = try format("$upstream_addr $upstream_connect_time $upstream_bytes_sent $upstream_bytes_received $upstream_session_time")
        #expect(f.render(record(), host: host) == "- - - - -")
        // nginx writes nothing for a missing value with escape=json and escape=none.
        #expect(try format("\"$upstream_addr\"", escape: .json).render(record(), host: host) == "\"\"")
        #expect(try format("[$upstream_addr]", escape: .none).render(record(), host: host) == "[]")
    }

    @Test func upstreamVariables() throws {
        var r = record()
        r.upstreamAttempts = [
            UpstreamAttempt(address: SocketEndpoint(address: IPAddress("10.0.0.9")!, port: 80), connectTime: nil),
            UpstreamAttempt(address: SocketEndpoint(address: IPAddress("::1")!, port: 81), connectTime: 0.0015),
        ]
        r.upstreamBytesSent = 20
        r.upstreamBytesReceived = 1000
        r.upstreamSessionTime = 0.1
        let f = try format("$upstream_addr|$upstream_connect_time|$upstream_bytes_sent|$upstream_bytes_received|$upstream_session_time")
        #expect(f.render(r, host: host) == "10.0.0.9:80, [::1]:81|-, 0.002|20|1000|0.100")
    }

    @Test(arguments: [(0.123, "0.123"), (0, "0.000"), (1.5, "1.500"), (12.0004, "12.000"), (0.0005, "0.001"), (61.25, "61.250")])
    func sessionTimeText(seconds: Double, text: String) {
        #expect(TimeText.seconds(seconds) == text)
    }

    @Test func sessionTimeFromRecord() throws {
        var r = record()
        r.endTime = r.startTime - 5  // a clock step backwards never prints a negative time
        #expect(try format("$session_time").render(r, host: host) == "0.000")
    }

    @Test func timeShapes() throws {
        let r = record()
        let local = try format("$time_local").render(r, host: host)
        #expect(local.wholeMatch(of: /\d\d\/(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)\/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}/) != nil, "\(local)")
        let iso = try format("$time_iso8601").render(r, host: host)
        #expect(iso.wholeMatch(of: /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d/) != nil, "\(iso)")
        #expect(try format("$msec").render(r, host: host) == "1764270000.123")
        #expect(TimeText.iso8601(r.endTime, milliseconds: true).contains(":00.123"))
    }

    @Test func basicFormat() {
        let line = LogFormat.basic.render(record(), host: host)
        #expect(line.wholeMatch(of: /192\.0\.2\.7 \[[^\]]+\] TCP 200 1000 20 0\.123/) != nil, "\(line)")
    }
}
