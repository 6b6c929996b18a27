#if canImport(Glibc)
import Glibc
#endif
import PortcullisCore
import PortcullisWire

/// A variable a format string may use: a fixed one, or one PROXY protocol TLV by type.
public enum Variable: Sendable, Equatable {
    case fixed(LogVariable)
    /// `$proxy_protocol_tlv_NAME` or `$proxy_protocol_tlv_0xNN`: a top-level TLV's raw value.
    case proxyProtocolTLV(UInt8)
    /// `$proxy_protocol_tlv_ssl_version`, `…_ssl_cn`, …: a sub-TLV inside the SSL TLV (nginx
    /// looks the names up there, and `0xNN` forms at the top level).
    case proxyProtocolSSLSubTLV(UInt8)
    /// A variable the rules define (`geo`, `map`, `geoip2`, `set`): an index into the
    /// snapshot's `VariableTable`.
    case defined(Int)
    /// `$0`…`$9` in a `map` value, or `$name` for a group `(?<name>…)` of the regex, whose
    /// number the compiler looks up: a capture of the regex that matched. (No strings in this
    /// enum: access rules hold variables, and a plain-data rule is copied without reference
    /// counting.)
    case capture(Int)

    public init?(name: String) {
        if let fixed = LogVariable(rawValue: name) {
            self = .fixed(fixed)
            return
        }
        let prefix = "proxy_protocol_tlv_"
        guard name.hasPrefix(prefix) else { return nil }
        let suffix = String(name.dropFirst(prefix.count))
        if let type = ProxyTLVType(name: suffix) {
            self = type.isSSLSubType ? .proxyProtocolSSLSubTLV(type.rawValue) : .proxyProtocolTLV(type.rawValue)
        } else if suffix.hasPrefix("0x"), suffix.count == 4, let type = UInt8(suffix.dropFirst(2), radix: 16) {
            self = .proxyProtocolTLV(type)
        } else {
            return nil
        }
    }

    /// Every name a variable may have, for "did you mean" suggestions.
    public static var knownNames: [String] {
        LogVariable.allCases.map(\.rawValue) + ProxyTLVType.allCases.map { "proxy_protocol_tlv_" + $0.name }
    }
}

/// The fixed variables that exist at this stage, with nginx's names. Anything else in a
/// format string is a compile error.
public enum LogVariable: String, Sendable, CaseIterable {
    case remoteAddr = "remote_addr"
    case remotePort = "remote_port"
    case binaryRemoteAddr = "binary_remote_addr"
    case serverAddr = "server_addr"
    case serverPort = "server_port"
    case `protocol` = "protocol"
    case connection
    case status
    case bytesSent = "bytes_sent"
    case bytesReceived = "bytes_received"
    case sessionTime = "session_time"
    case msec
    case timeISO8601 = "time_iso8601"
    case timeLocal = "time_local"
    case hostname
    case pid
    case upstreamAddr = "upstream_addr"
    case upstreamConnectTime = "upstream_connect_time"
    case upstreamFirstByteTime = "upstream_first_byte_time"
    case upstreamBytesSent = "upstream_bytes_sent"
    case upstreamBytesReceived = "upstream_bytes_received"
    case upstreamSessionTime = "upstream_session_time"
    case proxyProtocolAddr = "proxy_protocol_addr"
    case proxyProtocolPort = "proxy_protocol_port"
    case proxyProtocolServerAddr = "proxy_protocol_server_addr"
    case proxyProtocolServerPort = "proxy_protocol_server_port"
    case realipRemoteAddr = "realip_remote_addr"
    case realipRemotePort = "realip_remote_port"
    case limitConnStatus = "limit_conn_status"
    // ngx_stream_ssl_module: what the handshake with the client negotiated (`listen … ssl`).
    case sslProtocol = "ssl_protocol"
    case sslCipher = "ssl_cipher"
    case sslServerName = "ssl_server_name"
    case sslALPNProtocol = "ssl_alpn_protocol"
    case sslSessionReused = "ssl_session_reused"
    case sslClientSubjectDN = "ssl_client_s_dn"
    case sslClientVerify = "ssl_client_verify"
    // ngx_stream_ssl_preread_module: what the client's ClientHello says (`ssl_preread on`).
    case sslPrereadServerName = "ssl_preread_server_name"
    case sslPrereadALPNProtocols = "ssl_preread_alpn_protocols"
    case sslPrereadProtocol = "ssl_preread_protocol"
    /// The nginx version whose stream decisions Portcullis makes (and is tested against).
    case nginxVersion = "nginx_version"
    case portcullisVersion = "portcullis_version"
}

/// What `$nginx_version` and `$portcullis_version` say.
public enum ProductVersion {
    /// nginx 1.22.1 (Debian 12) is the nginx the differential tests run: rule files that test
    /// `$nginx_version` see the version whose decisions they get.
    public static let nginxCompatible = "1.22.1"
    public static let portcullis = "0.6.0"
}

/// `log_format`'s `escape=` parameter.
public enum LogEscape: String, Sendable {
    case `default`, json, none
}

/// A format string compiled into literal text and variable references.
public struct LogTemplate: Sendable, Equatable {
    public enum Part: Sendable, Equatable {
        case literal(String)
        case variable(Variable)
    }

    public var parts: [Part]

    public init(parts: [Part]) { self.parts = parts }

    public enum ParseError: Error, Equatable {
        /// The unknown name and its offset in the text (in characters).
        case unknownVariable(String, offset: Int)
        case unterminatedBrace(offset: Int)
        case emptyName(offset: Int)
    }

    /// Splits `text` on `$name` and `${name}` (names are letters, digits and `_`; as nginx,
    /// `$1` is one digit, so `$1x` is the capture then "x"). `resolve` turns a name into a
    /// variable; nil makes it an unknown variable.
    public static func parse(_ text: String) throws(ParseError) -> LogTemplate {
        try parse(text, resolve: Variable.init(name:))
    }

    public static func parse(_ text: String, resolve: (String) -> Variable?) throws(ParseError) -> LogTemplate {
        var parts: [Part] = []
        var literal = ""
        let chars = Array(text)
        var i = 0
        while i < chars.count {
            guard chars[i] == "$" else {
                literal.append(chars[i])
                i += 1
                continue
            }
            let start = i
            var name = ""
            if i + 1 < chars.count && chars[i + 1] == "{" {
                guard let close = chars[(i + 2)...].firstIndex(of: "}") else {
                    throw .unterminatedBrace(offset: start)
                }
                name = String(chars[(i + 2)..<close])
                i = close + 1
            } else {
                var j = i + 1
                if j < chars.count, chars[j].isASCII, chars[j].isNumber {
                    j += 1
                } else {
                    while j < chars.count && (chars[j].isLetter || chars[j].isNumber || chars[j] == "_") && chars[j].isASCII {
                        j += 1
                    }
                }
                name = String(chars[(i + 1)..<j])
                i = j
            }
            guard !name.isEmpty else { throw .emptyName(offset: start) }
            guard let variable = resolve(name) else { throw .unknownVariable(name, offset: start) }
            if !literal.isEmpty { parts.append(.literal(literal)); literal = "" }
            parts.append(.variable(variable))
        }
        if !literal.isEmpty { parts.append(.literal(literal)) }
        return LogTemplate(parts: parts)
    }

    /// The text, when the template has no variables.
    public var literalText: String? {
        var text = ""
        for part in parts {
            guard case .literal(let literal) = part else { return nil }
            text += literal
        }
        return text
    }

    public var variables: [Variable] {
        parts.compactMap { if case .variable(let v) = $0 { v } else { nil } }
    }
}

/// A named `log_format`.
public struct LogFormat: Sendable, Equatable {
    public var name: String
    public var escape: LogEscape
    public var template: LogTemplate

    public init(name: String, escape: LogEscape, template: LogTemplate) {
        self.name = name
        self.escape = escape
        self.template = template
    }

    /// Used by `access_log PATH;` without a format. nginx's stream module has no predefined
    /// format; this one is the example from nginx's own documentation.
    public static let basic = LogFormat(
        name: "basic", escape: .default,
        template: try! LogTemplate.parse(
            "$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time"))

    /// One log line (without the newline) for `record`.
    public func render(_ record: SessionRecord, host: HostFacts = .current) -> String {
        var out = ""
        out.reserveCapacity(128)
        for part in template.parts {
            switch part {
            case .literal(let text):
                out += text
            case .variable(let variable):
                guard let value = VariableRenderer.value(of: variable, in: record, host: host) else {
                    // nginx: "-" with default escaping, nothing with json or none.
                    if escape == .default { out += "-" }
                    continue
                }
                LogEscaping.append(value, escape: escape, to: &out)
            }
        }
        return out
    }
}

/// Facts about this process that variables expose (`$hostname`, `$pid`).
public struct HostFacts: Sendable {
    public var hostname: String
    public var pid: Int32

    public init(hostname: String, pid: Int32) {
        self.hostname = hostname
        self.pid = pid
    }

    public static let current: HostFacts = {
        var buffer = [CChar](repeating: 0, count: 256)
        gethostname(&buffer, buffer.count)
        let name = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return HostFacts(hostname: name, pid: getpid())
    }()
}

/// Values of variables as nginx prints them. nil means "not found": `-` with default
/// escaping, nothing with json or none (see `LogFormat.render`).
public enum VariableRenderer {
    public static func value(of variable: Variable, in r: SessionRecord, host: HostFacts) -> [UInt8]? {
        switch variable {
        case .fixed(let fixed): return value(of: fixed, in: r, host: host)
        case .proxyProtocolTLV(let type): return r.proxyHeader?.tlv(type)
        case .proxyProtocolSSLSubTLV(let type):
            guard let ssl = r.proxyHeader?.tlv(ProxyTLVType.ssl.rawValue).flatMap(ProxySSLInfo.init) else { return nil }
            return ssl.subTLVs.first { $0.type == type }?.value
        case .defined(let index): return r.variables?.value(index, in: r, host: host)
        case .capture: return nil  // only meaningful inside a map value
        }
    }

    public static func value(of variable: LogVariable, in r: SessionRecord, host: HostFacts) -> [UInt8]? {
        func text(_ s: String) -> [UInt8] { Array(s.utf8) }
        switch variable {
        case .remoteAddr: return text(r.client.hostText)
        case .remotePort: return text(r.client.portText)
        // A unix client's is its text, as nginx's (`unix:`: all unnamed clients share one key).
        case .binaryRemoteAddr: return r.client.isUnix ? text(r.client.hostText) : r.client.address.bytes
        case .serverAddr: return text(r.server.hostText)
        case .serverPort: return text(r.server.portText)
        case .protocol: return text(r.transport.rawValue)
        case .connection: return text(String(r.connection))
        case .status: return text(String(r.status.rawValue))
        case .bytesSent: return text(String(r.bytesSent))
        case .bytesReceived: return text(String(r.bytesReceived))
        case .sessionTime: return text(TimeText.seconds(r.sessionTime))
        case .msec: return text(TimeText.msec(r.endTime))
        case .timeISO8601: return text(TimeText.iso8601(r.endTime))
        case .timeLocal: return text(TimeText.local(r.endTime))
        case .hostname: return text(host.hostname)
        case .pid: return text(String(host.pid))
        case .upstreamAddr:
            guard !r.upstreamAttempts.isEmpty else { return nil }
            return text(r.upstreamAttempts.map(\.address.description).joined(separator: ", "))
        case .upstreamConnectTime:
            guard !r.upstreamAttempts.isEmpty else { return nil }
            return text(r.upstreamAttempts.map { $0.connectTime.map(TimeText.seconds) ?? "-" }.joined(separator: ", "))
        case .upstreamFirstByteTime:
            guard !r.upstreamAttempts.isEmpty else { return nil }
            return text(r.upstreamAttempts.map { $0.firstByteTime.map(TimeText.seconds) ?? "-" }.joined(separator: ", "))
        case .nginxVersion: return text(ProductVersion.nginxCompatible)
        case .portcullisVersion: return text(ProductVersion.portcullis)
        case .upstreamBytesSent:
            guard !r.upstreamAttempts.isEmpty else { return nil }
            return text(String(r.upstreamBytesSent))
        case .upstreamBytesReceived:
            guard !r.upstreamAttempts.isEmpty else { return nil }
            return text(String(r.upstreamBytesReceived))
        case .upstreamSessionTime:
            guard let time = r.upstreamSessionTime else { return nil }
            return text(TimeText.seconds(time))
        case .proxyProtocolAddr: return r.proxyHeader?.source.map { text($0.address.description) }
        case .proxyProtocolPort: return r.proxyHeader?.source.map { text(String($0.port)) }
        case .proxyProtocolServerAddr: return r.proxyHeader?.destination.map { text($0.address.description) }
        case .proxyProtocolServerPort: return r.proxyHeader?.destination.map { text(String($0.port)) }
        case .realipRemoteAddr: return text(r.peer.hostText)
        case .realipRemotePort: return text(r.peer.portText)
        case .limitConnStatus: return r.limitConnStatus.map(text)
        // nginx: not found without TLS; the empty ones (no SNI, no ALPN, no certificate) too.
        case .sslProtocol: return r.tls.map { text($0.protocolName) }
        case .sslCipher: return r.tls.map { text($0.cipher) }
        case .sslServerName: return r.tls.flatMap { $0.serverName.isEmpty ? nil : text($0.serverName) }
        case .sslALPNProtocol: return r.tls.flatMap { $0.alpnProtocol.isEmpty ? nil : text($0.alpnProtocol) }
        case .sslSessionReused: return r.tls.map { text($0.sessionReused ? "r" : ".") }
        case .sslClientSubjectDN: return r.tls.flatMap { $0.clientSubject.isEmpty ? nil : text($0.clientSubject) }
        case .sslClientVerify: return r.tls.map { text($0.clientVerify) }
        // nginx: the preread variables are empty (found) once preread ran, whatever it found.
        // The bytes as the client sent them (ClientHelloInfo keeps them as Latin-1).
        case .sslPrereadServerName: return r.preread.map(\.serverNameBytes)
        case .sslPrereadALPNProtocols: return r.preread.map(\.alpnProtocolsValue)
        case .sslPrereadProtocol: return r.preread.map { text($0.nginxProtocolVersion) }
        }
    }
}

/// nginx's three escapings of variable values in log lines.
public enum LogEscaping {
    private static let hex = Array("0123456789ABCDEF".utf8)

    public static func append(_ value: [UInt8], escape: LogEscape, to out: inout String) {
        switch escape {
        case .none:
            out += String(decoding: value, as: UTF8.self)
        case .default:
            // `"`, `\`, control bytes and everything above 0x7E become \xXX, so no client-chosen
            // byte can start a new log line or forge a field.
            var bytes: [UInt8] = []
            bytes.reserveCapacity(value.count)
            for byte in value {
                if byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") || byte < 0x20 || byte > 0x7E {
                    bytes += [UInt8(ascii: "\\"), UInt8(ascii: "x"), hex[Int(byte >> 4)], hex[Int(byte & 0xF)]]
                } else {
                    bytes.append(byte)
                }
            }
            out += String(decoding: bytes, as: UTF8.self)
        case .json:
            appendJSONEscaped(value, to: &out)
        }
    }

    /// The inside of a JSON string: `"` and `\` escaped, control bytes as `\n` or `\u00XX`
    /// (nginx's `escape=json`). `lineSeparators` also escapes NEL, LINE SEPARATOR and PARAGRAPH
    /// SEPARATOR, valid in JSON but line ends to some readers (Python's `splitlines`, Swift's
    /// `Character.isNewline`, JavaScript before ES2019): the audit log's lines must stay lines.
    public static func appendJSONEscaped(_ value: [UInt8], to out: inout String, lineSeparators: Bool = false) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(value.count)
        var i = 0
        while i < value.count {
            let byte = value[i]
            i += 1
            switch byte {
            case UInt8(ascii: "\""): bytes += Array("\\\"".utf8)
            case UInt8(ascii: "\\"): bytes += Array("\\\\".utf8)
            case 0x0A: bytes += Array("\\n".utf8)
            case 0x0D: bytes += Array("\\r".utf8)
            case 0x09: bytes += Array("\\t".utf8)
            case 0x08: bytes += Array("\\b".utf8)
            case 0x0C: bytes += Array("\\f".utf8)
            case 0..<0x20:
                bytes += Array("\\u00".utf8) + [hex[Int(byte >> 4)], hex[Int(byte & 0xF)]]
            case 0xC2 where lineSeparators && i < value.count && value[i] == 0x85:  // U+0085
                bytes += Array("\\u0085".utf8)
                i += 1
            case 0xE2 where lineSeparators && i + 1 < value.count && value[i] == 0x80
                && (value[i + 1] == 0xA8 || value[i + 1] == 0xA9):  // U+2028, U+2029
                bytes += Array((value[i + 1] == 0xA8 ? "\\u2028" : "\\u2029").utf8)
                i += 2
            default: bytes.append(byte)
            }
        }
        out += String(decoding: bytes, as: UTF8.self)
    }

    /// `text` as a JSON string for the audit log (line separators escaped too).
    public static func jsonString(_ text: String) -> String {
        var out = "\""
        appendJSONEscaped(Array(text.utf8), to: &out, lineSeparators: true)
        return out + "\""
    }
}

/// Time text as nginx prints it, in the local time zone.
public enum TimeText {
    private static let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

    /// `0.123` — seconds with millisecond resolution.
    public static func seconds(_ value: Double) -> String {
        let ms = Int((value * 1000).rounded())
        return "\(ms / 1000)." + pad(ms % 1000, 3)
    }

    /// `1764270000.123`
    public static func msec(_ time: Double) -> String { seconds(time) }

    /// `2026-11-27T18:57:55+00:00`
    public static func iso8601(_ time: Double, milliseconds: Bool = false) -> String {
        let (t, offset) = brokenDown(time)
        var text = "\(t.tm_year + 1900)-\(pad(Int(t.tm_mon) + 1, 2))-\(pad(Int(t.tm_mday), 2))T"
            + "\(pad(Int(t.tm_hour), 2)):\(pad(Int(t.tm_min), 2)):\(pad(Int(t.tm_sec), 2))"
        if milliseconds { text += "." + pad(Int((time * 1000).rounded(.down)) % 1000, 3) }
        return text + zone(offset, colon: true)
    }

    /// `27/Nov/2026:18:57:55 +0000`
    public static func local(_ time: Double) -> String {
        let (t, offset) = brokenDown(time)
        return "\(pad(Int(t.tm_mday), 2))/\(months[Int(t.tm_mon)])/\(t.tm_year + 1900):"
            + "\(pad(Int(t.tm_hour), 2)):\(pad(Int(t.tm_min), 2)):\(pad(Int(t.tm_sec), 2)) " + zone(offset, colon: false)
    }

    private static func brokenDown(_ time: Double) -> (tm, Int) {
        var seconds = time_t(time.rounded(.down))
        var result = tm()
        localtime_r(&seconds, &result)
        return (result, Int(result.tm_gmtoff))
    }

    private static func zone(_ offset: Int, colon: Bool) -> String {
        let sign = offset < 0 ? "-" : "+"
        let minutes = abs(offset) / 60
        return sign + pad(minutes / 60, 2) + (colon ? ":" : "") + pad(minutes % 60, 2)
    }

    private static func pad(_ value: Int, _ width: Int) -> String {
        let text = String(value)
        return String(repeating: "0", count: max(0, width - text.count)) + text
    }
}

extension LogTemplate {
    /// The template's text with raw variable values (no escaping; a missing value is empty),
    /// for values that leave in a protocol field rather than a log line, such as a TLV.
    public func bytes(for record: SessionRecord, host: HostFacts = .current) -> [UInt8] {
        var out: [UInt8] = []
        for part in parts {
            switch part {
            case .literal(let text): out += Array(text.utf8)
            case .variable(let variable): out += VariableRenderer.value(of: variable, in: record, host: host) ?? []
            }
        }
        return out
    }
}
