/// The closed list of phases a session walks, in order. The raw values are the names used in
/// logs, the audit log and metrics, so they are part of the output format.
public enum Phase: String, Sendable, CaseIterable, Codable {
    case accept
    case proxyHeaderRead = "proxy_header_read"
    case realip
    case preread
    case variables
    case access
    case limitConn = "limit_conn"
    case limitRate = "limit_rate"
    case upstreamPick = "upstream_pick"
    case proxyHeaderWrite = "proxy_header_write"
    case relay
    case log
}

/// nginx's `$status` for a stream session.
public enum SessionStatus: Int, Sendable, Codable {
    case ok = 200
    case badRequest = 400
    case forbidden = 403
    case internalError = 500
    case badGateway = 502
    case serviceUnavailable = 503
}

public enum TransportProtocol: String, Sendable {
    case tcp = "TCP"
    case udp = "UDP"
}

/// Where something was written in a rule file: 1-based line and column, as compilers print.
public struct SourceLocation: Hashable, Sendable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var column: Int

    public init(file: String, line: Int, column: Int) {
        self.file = file
        self.line = line
        self.column = column
    }

    public var description: String { "\(file):\(line):\(column)" }
}

/// The rule that decided a session, as the audit log names it: `file:line` and the rule's text.
public struct RuleReference: Hashable, Sendable {
    public var file: String
    public var line: Int
    public var text: String

    public init(file: String, line: Int, text: String) {
        self.file = file
        self.line = line
        self.text = text
    }

    public var position: String { "\(file):\(line)" }
}
