/// An IPv4 or IPv6 address as a plain integer, so that CIDR arithmetic and table lookups are
/// integer comparisons. Parsing and formatting follow what nginx prints for `$remote_addr`.
public enum IPAddress: Hashable, Sendable, Comparable, CustomStringConvertible {
    case v4(UInt32)
    case v6(UInt128)

    /// The IPv4 address embedded in an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), if any.
    public var mappedIPv4: UInt32? {
        guard case .v6(let value) = self, value >> 32 == 0xFFFF else { return nil }
        return UInt32(truncatingIfNeeded: value)
    }

    /// IPv4-mapped IPv6 folded to IPv4; everything else unchanged. One client, one identity.
    public var folded: IPAddress {
        if let v4 = mappedIPv4 { return .v4(v4) }
        return self
    }

    public var isIPv4: Bool { if case .v4 = self { return true } else { return false } }

    /// Network-order bytes: 4 for IPv4, 16 for IPv6 (as nginx's `$binary_remote_addr`).
    public var bytes: [UInt8] {
        switch self {
        case .v4(let value):
            return (0..<4).map { UInt8(truncatingIfNeeded: value >> (24 - 8 * $0)) }
        case .v6(let value):
            return (0..<16).map { UInt8(truncatingIfNeeded: value >> (120 - 8 * $0)) }
        }
    }

    public init?(bytes: some Collection<UInt8>) {
        switch bytes.count {
        case 4: self = .v4(bytes.reduce(0) { $0 << 8 | UInt32($1) })
        case 16: self = .v6(bytes.reduce(0) { $0 << 8 | UInt128($1) })
        default: return nil
        }
    }

    /// Parses dotted-quad IPv4 (no leading zeros, as inet_pton) or IPv6 text (with `::` and
    /// an embedded IPv4 tail). Brackets and zone ids are not accepted here.
    public init?(_ text: some StringProtocol) {
        let utf8 = Array(text.utf8)
        if utf8.contains(UInt8(ascii: ":")) {
            guard let value = Self.parseIPv6(utf8) else { return nil }
            self = .v6(value)
        } else {
            guard let value = Self.parseIPv4(utf8[...]) else { return nil }
            self = .v4(value)
        }
    }

    static func parseIPv4(_ text: ArraySlice<UInt8>) -> UInt32? {
        var result: UInt32 = 0
        var octets = 0
        var current: UInt32 = 0
        var digits = 0
        for byte in text {
            if byte == UInt8(ascii: ".") {
                guard digits > 0, octets < 3 else { return nil }
                result = result << 8 | current
                octets += 1
                current = 0
                digits = 0
            } else if byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") {
                if digits > 0 && current == 0 { return nil }  // leading zero
                current = current * 10 + UInt32(byte - UInt8(ascii: "0"))
                digits += 1
                guard current <= 255 else { return nil }
            } else {
                return nil
            }
        }
        guard digits > 0, octets == 3 else { return nil }
        return result << 8 | current
    }

    static func parseIPv6(_ text: [UInt8]) -> UInt128? {
        var head: [UInt16] = []
        var tail: [UInt16] = []
        var sawDoubleColon = false
        var index = 0
        let count = text.count
        if count >= 2 && text[0] == UInt8(ascii: ":") {
            guard text[1] == UInt8(ascii: ":") else { return nil }
            sawDoubleColon = true
            index = 2
        }
        while index < count {
            // One group: hex digits, or a trailing dotted IPv4.
            var end = index
            while end < count && text[end] != UInt8(ascii: ":") { end += 1 }
            let group = text[index..<end]
            if group.contains(UInt8(ascii: ".")) {
                guard end == count, let v4 = parseIPv4(group) else { return nil }
                let words = [UInt16(v4 >> 16), UInt16(truncatingIfNeeded: v4)]
                if sawDoubleColon { tail += words } else { head += words }
                index = end
                break
            }
            guard !group.isEmpty, group.count <= 4 else { return nil }
            var word: UInt16 = 0
            for byte in group {
                guard let nibble = hexValue(byte) else { return nil }
                word = word << 4 | UInt16(nibble)
            }
            if sawDoubleColon { tail.append(word) } else { head.append(word) }
            index = end
            if index < count {
                // At a colon: either a separator or the start of "::".
                index += 1
                if index < count && text[index] == UInt8(ascii: ":") {
                    guard !sawDoubleColon else { return nil }
                    sawDoubleColon = true
                    index += 1
                } else if index == count {
                    return nil  // trailing single colon
                }
            }
        }
        let total = head.count + tail.count
        if sawDoubleColon {
            guard total <= 7 else { return nil }
        } else {
            guard total == 8 else { return nil }
        }
        let words = head + Array(repeating: 0, count: 8 - total) + tail
        return words.reduce(0) { $0 << 16 | UInt128($1) }
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    public var description: String {
        switch self {
        case .v4(let value): return Self.formatIPv4(value)
        case .v6(let value): return Self.formatIPv6(value)
        }
    }

    static func formatIPv4(_ value: UInt32) -> String {
        "\(value >> 24).\(value >> 16 & 0xFF).\(value >> 8 & 0xFF).\(value & 0xFF)"
    }

    /// RFC 5952 text, with nginx's (and glibc's) dotted tail for IPv4-mapped and
    /// IPv4-compatible addresses, e.g. `::ffff:10.0.0.1`.
    static func formatIPv6(_ value: UInt128) -> String {
        let words = (0..<8).map { UInt16(truncatingIfNeeded: value >> (112 - 16 * $0)) }
        var bestStart = -1, bestLength = 0, runStart = -1
        for i in 0...8 {
            if i < 8 && words[i] == 0 {
                if runStart < 0 { runStart = i }
            } else if runStart >= 0 {
                if i - runStart > bestLength { bestStart = runStart; bestLength = i - runStart }
                runStart = -1
            }
        }
        if bestLength < 2 { bestStart = -1 }
        // nginx's ngx_inet6_ntop: a dotted IPv4 tail after 96 zero bits, after ::ffff:, and
        // for `::x` when x's high byte is not 0 and its low byte is not 1 (`::102` prints as
        // `::0.0.1.2`, while `::2` and `::101` stay as they are).
        let dottedTail = bestStart == 0
            && (bestLength == 6 || (bestLength == 5 && words[5] == 0xFFFF)
                || (bestLength == 7 && words[7] >> 8 != 0 && words[7] & 0xFF != 1))
        let groups = dottedTail ? 6 : 8
        var out = ""
        var i = 0
        while i < groups {
            if i == bestStart {
                out += "::"
                i += bestLength
                continue
            }
            out += String(words[i], radix: 16)
            if i < groups - 1 && i + 1 != bestStart { out += ":" }
            i += 1
        }
        if dottedTail {
            if !out.hasSuffix(":") { out += ":" }
            out += formatIPv4(UInt32(truncatingIfNeeded: value))
        }
        return out
    }

    public static func < (lhs: IPAddress, rhs: IPAddress) -> Bool {
        switch (lhs, rhs) {
        case (.v4(let a), .v4(let b)): return a < b
        case (.v6(let a), .v6(let b)): return a < b
        case (.v4, .v6): return true
        case (.v6, .v4): return false
        }
    }
}

/// An address and port, as the two ends of a session are described in logs and PROXY headers;
/// or a unix-domain socket.
///
/// A unix endpoint's `address` is 255.255.255.255 and its port 0: what nginx looks a unix
/// client up as in `geo` (INADDR_NONE), so code that only knows IP addresses does what nginx
/// does with it. Access lists, variables and PROXY headers ask `isUnix` first.
public struct SocketEndpoint: Hashable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    public var port: UInt16
    /// A unix-domain socket's path; "" for an unnamed socket; a leading NUL for an abstract
    /// name. nil for an IP endpoint.
    public var unixPath: String?

    public init(address: IPAddress, port: UInt16) {
        self.address = address
        self.port = port
    }

    /// A unix-domain socket (`unix:/run/app.sock`).
    public init(unixPath: String) {
        self.address = .v4(0xFFFF_FFFF)
        self.port = 0
        self.unixPath = unixPath
    }

    /// The longest path a `sockaddr_un` holds (108 bytes less the terminating NUL).
    public static let maximumUnixPathLength = 107

    public var isUnix: Bool { unixPath != nil }

    /// A unix socket with no name to reply to or key on: unnamed, or abstract (nginx keys
    /// neither: each datagram of such a client is a session of its own).
    public var isUnnamedUnix: Bool {
        guard let unixPath else { return false }
        return unixPath.isEmpty || unixPath.utf8.first == 0
    }

    /// The host part as nginx's variables print it: `192.0.2.1`, `2001:db8::1`, or for a unix
    /// socket `unix:/path` (`unix:` when it has no path name).
    public var hostText: String {
        guard let unixPath else { return address.description }
        return isUnnamedUnix ? "unix:" : "unix:" + unixPath
    }

    /// The port as nginx's variables print it; "" for a unix socket.
    public var portText: String { isUnix ? "" : String(port) }

    /// Parses `1.2.3.4:80`, `[::1]:80` (a port from 1 to 65535; no host names) or
    /// `unix:/path` (everything after `unix:` is the path, as nginx reads it).
    public init?(_ text: some StringProtocol) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty, path.utf8.count <= Self.maximumUnixPathLength else { return nil }
            self.init(unixPath: path)
            return
        }
        guard let (host, port) = Self.split(String(text)), let address = IPAddress(host),
              let number = UInt16(port), number > 0 else { return nil }
        self.init(address: address, port: number)
    }

    /// A local address to bind to, as nginx's `proxy_bind` reads it: `1.2.3.4`, `::1`,
    /// `1.2.3.4:5555` or `[::1]:5555` (port 1-65535; brackets only with a port); port 0 = any.
    public static func local(_ text: String) -> SocketEndpoint? {
        if let address = IPAddress(text) { return SocketEndpoint(address: address, port: 0) }
        guard let (host, port) = split(text), let address = IPAddress(host),
              let number = UInt16(port), number > 0 else { return nil }
        return SocketEndpoint(address: address, port: number)
    }

    /// Splits `host:port` or `[v6]:port` into its two texts; nil if there is no port.
    public static func split(_ text: String) -> (host: String, port: String)? {
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { return nil }
            return (String(text[text.index(after: text.startIndex)..<close]), String(rest.dropFirst()))
        }
        guard let colon = text.lastIndex(of: ":"), text.firstIndex(of: ":") == colon else { return nil }
        return (String(text[..<colon]), String(text[text.index(after: colon)...]))
    }

    /// `1.2.3.4:80`, `[::1]:80` or `unix:/path`, as nginx prints `$upstream_addr`.
    public var description: String {
        if isUnix { return hostText }
        switch address {
        case .v4: return "\(address):\(port)"
        case .v6: return "[\(address)]:\(port)"
        }
    }
}
