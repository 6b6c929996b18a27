import Foundation
import PortcullisCore
import PortcullisPolicy
import PortcullisWire

/// The checks of the `log-format` fuzzer (Tests/Fuzz/LogFormatFuzz.swift), shared with the test
/// that replays its corpus (LogFormatCorpusReplayTests): the harness stops on the first
/// violation, the test reports them all. Only public API, no Testing, so that
/// Tests/Fuzz/run-fuzzer.sh can compile this file into the fuzzer with plain swiftc.
///
/// An input is split at its 0xFF bytes: the first part is a `log_format` template, the others
/// are the values of the session's client-controlled strings, in `Slot` order (a value that is
/// not there is not set). 0xFF never occurs in UTF-8, so the template is never cut inside a
/// character; values that need 0xFF lose it, which the other bytes above 0x7F stand in for.
enum LogFormatFuzzChecks {
    /// Where each value goes. What a client chooses: the ClientHello's SNI and ALPN names (as
    /// ssl_preread reads them, Latin-1), PROXY v2 TLVs (raw bytes), what OpenSSL reports of the
    /// handshake (UTF-8 text), the value of a variable that refused the session, a limit key,
    /// a unix datagram client's own socket path, a host name from `proxy_pass $var`.
    enum Slot: Int, CaseIterable {
        case prereadServerName, prereadALPN, tlvAuthority, tlvUniqueID, tlvCustom, tlvSSLCommonName
        case tlsServerName, tlsClientSubject, tlsALPN, decidingValue, limitKey, unixClientPath
        case unresolvedHost, ruleText
    }

    /// The variables the fixed templates print, in order: one for each value a client chooses,
    /// then some the session sets itself.
    static let variables = [
        "ssl_preread_server_name", "ssl_preread_alpn_protocols", "proxy_protocol_tlv_authority",
        "proxy_protocol_tlv_unique_id", "proxy_protocol_tlv_0xE0", "proxy_protocol_tlv_ssl_cn",
        "ssl_server_name", "ssl_client_s_dn", "ssl_alpn_protocol", "remote_addr", "realip_remote_addr",
        "remote_port", "status", "protocol", "server_addr", "proxy_protocol_addr", "ssl_preread_protocol",
    ]

    static let parsedVariables = variables.map { Variable(name: $0)! }
    static let defaultTemplate = try! LogTemplate.parse(variables.map { "\"$\($0)\"" }.joined(separator: " "))
    static let jsonTemplate = try! LogTemplate.parse("{" + variables.map { "\"\($0)\":\"$\($0)\"" }.joined(separator: ",") + "}")
    static let rawTemplate = try! LogTemplate.parse(variables.map { "$" + $0 }.joined())

    static func split(_ bytes: [UInt8]) -> (template: String, values: [[UInt8]?]) {
        let parts = bytes.split(separator: 0xFF, omittingEmptySubsequences: false).map(Array.init)
        var values: [[UInt8]?] = Array(repeating: nil, count: Slot.allCases.count)
        for (index, part) in parts.dropFirst().prefix(values.count).enumerated() { values[index] = part }
        return (String(decoding: parts[0], as: UTF8.self), values)
    }

    static func latin1(_ bytes: [UInt8]) -> String {
        String(String.UnicodeScalarView(bytes.map { Unicode.Scalar($0) }))
    }

    /// A refused session carrying every value that is set.
    static func record(_ values: [[UInt8]?]) -> SessionRecord {
        func value(_ slot: Slot) -> [UInt8]? { values[slot.rawValue] }
        func text(_ slot: Slot) -> String? { value(slot).map { String(decoding: $0, as: UTF8.self) } }
        let server = SocketEndpoint(address: .v4(0x7F00_0001), port: 8443)
        let client = text(.unixClientPath).map { SocketEndpoint(unixPath: $0) }
            ?? SocketEndpoint(address: .v6(0x2001_0DB8 << 96 | 0x17), port: 40_000)
        var r = SessionRecord(connection: 42, transport: value(.unixClientPath) == nil ? .tcp : .udp, client: client,
                              server: server, listener: "127.0.0.1:8443", startTime: 1_764_270_000.25)
        r.endTime = 1_764_270_003.5
        if value(.prereadServerName) != nil || value(.prereadALPN) != nil {
            let names = (value(.prereadALPN) ?? []).split(separator: 0x00).map { latin1(Array($0)) }
            r.preread = ClientHelloInfo(serverName: latin1(value(.prereadServerName) ?? []), alpnProtocols: names,
                                        protocolVersion: "TLSv1.3", legacyVersion: 0x0303, supportedVersions: [0x0304])
        }
        var tlvs: [(UInt8, [UInt8])] = []
        if let v = value(.tlvAuthority) { tlvs.append((ProxyTLVType.authority.rawValue, v)) }
        if let v = value(.tlvUniqueID) { tlvs.append((ProxyTLVType.uniqueID.rawValue, v)) }
        if let v = value(.tlvCustom) { tlvs.append((0xE0, v)) }
        if let v = value(.tlvSSLCommonName) {
            tlvs.append((ProxyTLVType.ssl.rawValue, [0x07, 0, 0, 0, 0] + tlv(ProxyTLVType.sslCN.rawValue, v)))
        }
        if !tlvs.isEmpty {
            r.proxyHeader = ProxyHeader(
                version: .v2,
                addresses: .inet(source: SocketEndpoint(address: .v4(0xC000_0201), port: 5555),
                                 destination: SocketEndpoint(address: .v4(0xC000_0202), port: 443)),
                tlvBytes: tlvs.flatMap { tlv($0.0, $0.1) })
        }
        if text(.tlsServerName) != nil || text(.tlsClientSubject) != nil || text(.tlsALPN) != nil {
            r.tls = TLSSessionInfo(
                protocolName: "TLSv1.3", cipher: "TLS_AES_128_GCM_SHA256", serverName: text(.tlsServerName) ?? "",
                alpnProtocol: text(.tlsALPN) ?? "", sessionReused: false, clientVerify: "NONE",
                clientSubject: text(.tlsClientSubject) ?? "", clientCommonName: "",
                clientPresentedCertificate: text(.tlsClientSubject) != nil, signatureAlgorithm: "", keyAlgorithm: "")
        }
        let rule = text(.ruleText).map { RuleReference(file: "/etc/portcullis/" + $0, line: 3, text: $0) }
        if let host = text(.unresolvedHost) {
            r.outcome = SessionOutcome(phase: .content, cause: .hostNotResolved(host), rule: rule)
        } else if let key = value(.limitKey) {
            r.outcome = SessionOutcome(phase: .limitConn, cause: .connectionLimit(zone: "per_ip"), rule: rule,
                                       enforcement: .dryRun)
            r.limit = LimitDecision(zone: "per_ip", key: key, limit: "1")
        } else {
            r.outcome = SessionOutcome(phase: .access, cause: .accessDenied, rule: rule)
        }
        if let v = value(.decidingValue) { r.decidingVariable = (name: "$blocked", value: v) }
        return r
    }

    static func tlv(_ type: UInt8, _ value: [UInt8]) -> [UInt8] {
        [type, UInt8(value.count >> 8 & 0xFF), UInt8(value.count & 0xFF)] + value
    }

    static let host = HostFacts(hostname: "gw\n\"1\"", pid: 4242)

    /// Everything that is wrong with what the input renders to.
    static func violations(_ bytes: [UInt8]) -> [String] {
        let (templateText, values) = split(bytes)
        let r = record(values)
        var found: [String] = []
        found += valuesAsSet(r, values)
        found += fuzzedTemplate(templateText, r)
        found += defaultEscaping(r)
        found += jsonEscaping(r)
        found += rawBytes(r)
        found += auditLine(r, values)
        return found
    }

    /// The variables give back what the session was given: raw bytes for TLVs and limit keys,
    /// Latin-1 bytes for preread names, UTF-8 for what OpenSSL said.
    static func valuesAsSet(_ r: SessionRecord, _ values: [[UInt8]?]) -> [String] {
        var found: [String] = []
        func expect(_ name: String, _ expected: [UInt8]?) {
            let got = VariableRenderer.value(of: Variable(name: name)!, in: r, host: host)
            if got != expected { found.append("$\(name) is \(String(describing: got)), expected \(String(describing: expected))") }
        }
        let v = { (slot: Slot) in values[slot.rawValue] }
        let prereadSet = v(.prereadServerName) != nil || v(.prereadALPN) != nil
        expect("ssl_preread_server_name", prereadSet ? v(.prereadServerName) ?? [] : nil)
        let names = (v(.prereadALPN) ?? []).split(separator: 0x00).map(Array.init)
        expect("ssl_preread_alpn_protocols", prereadSet ? Array(names.joined(separator: [UInt8(ascii: ",")])) : nil)
        expect("proxy_protocol_tlv_authority", v(.tlvAuthority))
        expect("proxy_protocol_tlv_unique_id", v(.tlvUniqueID))
        expect("proxy_protocol_tlv_0xE0", v(.tlvCustom))
        expect("proxy_protocol_tlv_ssl_cn", v(.tlvSSLCommonName))
        func utf8(_ slot: Slot) -> [UInt8]? {
            v(slot).flatMap { $0.isEmpty ? nil : Array(String(decoding: $0, as: UTF8.self).utf8) }
        }
        expect("ssl_server_name", utf8(.tlsServerName))
        expect("ssl_client_s_dn", utf8(.tlsClientSubject))
        expect("ssl_alpn_protocol", utf8(.tlsALPN))
        return found
    }

    /// The fuzzed template: parsing never crashes; when it parses, rendering in every escaping
    /// never crashes, and with default and json escaping the line's newlines and quotes are
    /// only those of the template's own text (a value can add none).
    static func fuzzedTemplate(_ text: String, _ r: SessionRecord) -> [String] {
        guard let template = try? LogTemplate.parse(text) else { return [] }
        var literal: [UInt8] = []
        for case .literal(let part) in template.parts { literal += Array(part.utf8) }
        var found: [String] = []
        for escape in [LogEscape.default, .json, .none] {
            let line = Array(LogFormat(name: "f", escape: escape, template: template).render(r, host: host).utf8)
            guard escape != .none else { continue }
            for byte: UInt8 in [0x0A, 0x0D, 0x00] where count(byte, in: line) != count(byte, in: literal) {
                found.append("escape=\(escape): \(count(byte, in: line)) bytes 0x\(String(byte, radix: 16)) in the line, "
                             + "\(count(byte, in: literal)) in the template's text")
            }
            if escape == .default, count(UInt8(ascii: "\""), in: line) != count(UInt8(ascii: "\""), in: literal) {
                found.append("escape=default: a value added a quote")
            }
        }
        return found
    }

    static func count(_ byte: UInt8, in bytes: [UInt8]) -> Int { bytes.reduce(0) { $0 + ($1 == byte ? 1 : 0) } }

    /// `"$a" "$b" …` with default escaping: only printable ASCII, the fields are where the
    /// template put them, and each field unescapes (`\xHH`) to the value, or is `-` for none.
    static func defaultEscaping(_ r: SessionRecord) -> [String] {
        let line = Array(LogFormat(name: "d", escape: .default, template: defaultTemplate).render(r, host: host).utf8)
        var found: [String] = []
        if let bad = line.first(where: { $0 < 0x20 || $0 > 0x7E }) {
            found.append("escape=default: byte 0x\(String(bad, radix: 16)) in \(String(decoding: line, as: UTF8.self))")
        }
        let fields = line.split(separator: UInt8(ascii: "\""), omittingEmptySubsequences: false)
        guard fields.count == 2 * variables.count + 1 else {
            return found + ["escape=default: \(fields.count) quote-separated parts, expected \(2 * variables.count + 1)"]
        }
        for (index, name) in variables.enumerated() {
            let field = Array(fields[2 * index + 1])
            let value = VariableRenderer.value(of: parsedVariables[index], in: r, host: host)
            guard let value else {
                if field != [UInt8(ascii: "-")] { found.append("escape=default: $\(name) not found but printed as \(field)") }
                continue
            }
            guard let unescaped = unescapeDefault(field) else {
                found.append("escape=default: $\(name) printed as \(String(decoding: field, as: UTF8.self)), which does not unescape")
                continue
            }
            if unescaped != value { found.append("escape=default: $\(name) is \(value), unescaped \(unescaped)") }
        }
        return found
    }

    /// nginx's default escaping backwards: `\xHH` is a byte, a backslash is never anything else.
    static func unescapeDefault(_ field: [UInt8]) -> [UInt8]? {
        var out: [UInt8] = []
        var i = 0
        while i < field.count {
            guard field[i] == UInt8(ascii: "\\") else { out.append(field[i]); i += 1; continue }
            guard i + 3 < field.count, field[i + 1] == UInt8(ascii: "x"),
                  let byte = UInt8(String(decoding: field[(i + 2)...(i + 3)], as: UTF8.self), radix: 16) else { return nil }
            out.append(byte)
            i += 4
        }
        return out
    }

    /// `{"a":"$a",…}` with escape=json: one line, a JSON object, each value the variable's text
    /// (invalid UTF-8 as U+FFFD; "" for none).
    static func jsonEscaping(_ r: SessionRecord) -> [String] {
        let line = LogFormat(name: "j", escape: .json, template: jsonTemplate).render(r, host: host)
        var found = oneLine(line, "escape=json")
        guard let object = jsonObject(line) else { return found + ["escape=json: not a JSON object: \(line)"] }
        for (name, variable) in zip(variables, parsedVariables) {
            let value = VariableRenderer.value(of: variable, in: r, host: host) ?? []
            found += same(object[name], String(decoding: value, as: UTF8.self), "escape=json: $\(name)")
        }
        return found
    }

    /// `$a$b…` as bytes (for TLVs sent upstream): exactly the values, unescaped.
    static func rawBytes(_ r: SessionRecord) -> [String] {
        let expected = parsedVariables.flatMap { VariableRenderer.value(of: $0, in: r, host: host) ?? [] }
        return rawTemplate.bytes(for: r, host: host) == expected ? [] : ["template bytes are not the values joined"]
    }

    /// The audit line: one line, one JSON object, the hostile values round trip.
    static func auditLine(_ r: SessionRecord, _ values: [[UInt8]?]) -> [String] {
        let line = AuditLine.render(r)
        var found = oneLine(line, "audit line")
        // The audit log is Portcullis's own: one line even for readers that also end lines at
        // NEL, LINE SEPARATOR or PARAGRAPH SEPARATOR (Python's splitlines, Swift's isNewline).
        if let separator = line.unicodeScalars.first(where: { [0x85, 0x2028, 0x2029].contains($0.value) }) {
            found.append("audit line: raw U+\(String(separator.value, radix: 16, uppercase: true)) in \(line.debugDescription)")
        }
        guard let object = jsonObject(line) else { return found + ["audit line: not a JSON object: \(line)"] }
        found += same(object["client"], r.client.hostText, "audit client")
        found += same(object["peer"], r.peer.description, "audit peer")
        found += same(object["listener"], r.listener, "audit listener")
        found += same(object["reason"], r.reason ?? "", "audit reason")
        if let rule = r.rule {
            let inner = object["rule"] as? [String: Any] ?? [:]
            found += same(inner["text"], rule.text, "audit rule text")
            found += same(inner["file"], rule.file, "audit rule file")
            found += same(inner["at"], rule.position, "audit rule position")
        } else if !(object["rule"] is NSNull) {
            found.append("audit line: rule is not null")
        }
        if let variable = r.decidingVariable {
            found += same((object["variable"] as? [String: Any])?["value"], String(decoding: variable.value, as: UTF8.self),
                          "audit variable value")
        }
        if let limit = r.limit {
            found += same((object["limit"] as? [String: Any])?["key"], String(decoding: limit.key, as: UTF8.self),
                          "audit limit key")
        }
        return found
    }

    /// No byte below 0x20 at all: a log line ends only at the newline the writer adds.
    static func oneLine(_ line: String, _ what: String) -> [String] {
        guard let bad = line.utf8.first(where: { $0 < 0x20 }) else { return [] }
        return ["\(what): raw byte 0x\(String(bad, radix: 16)) in \(line.debugDescription)"]
    }

    static func jsonObject(_ line: String) -> [String: Any]? {
        (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
    }

    /// Compared scalar by scalar: String's == would call canonically equivalent texts equal.
    static func same(_ got: Any?, _ expected: String, _ what: String) -> [String] {
        guard let got = got as? String else { return ["\(what): \(String(describing: got)), expected \(expected.debugDescription)"] }
        if Array(got.unicodeScalars) == Array(expected.unicodeScalars) { return [] }
        return ["\(what): \(got.debugDescription), expected \(expected.debugDescription)"]
    }
}
