public import PortcullisCore

/// One `allow`/`deny` line. A class: a verdict carries its rule out of every lookup, and
/// copying a reference is one retain where copying this struct went through value witnesses
/// (it made lookups three times slower when the variable case was added).
public final class AccessRule: Sendable, Equatable {
    public enum Action: String, Sendable { case allow, deny }
    public enum Match: Sendable, Equatable {
        case all
        case block(CIDR)
        /// `allow unix:;` / `deny unix:;`: clients on unix-domain sockets (which no address
        /// rule matches, as in nginx; `all` does).
        case unix
        /// `allow $var;` / `deny $var;` (an extension): matches when the value is non-empty and
        /// not "0".
        case variable(Variable)
    }

    public let action: Action
    public let match: Match
    public let reference: RuleReference
    /// For a variable rule, the variable as written (`$bad_country`), for the audit line.
    public let variableName: String?

    public static func == (a: AccessRule, b: AccessRule) -> Bool {
        a.action == b.action && a.match == b.match && a.reference == b.reference && a.variableName == b.variableName
    }

    public init(action: Action, match: Match, reference: RuleReference, variableName: String? = nil) {
        self.action = action
        self.match = match
        self.reference = reference
        self.variableName = variableName
    }
}

/// The outcome of the access phase: whether the session may pass, and which rule said so
/// (nil when no rule matched, which nginx treats as "allowed").
public struct AccessVerdict: Sendable, Equatable {
    public var allowed: Bool
    public var rule: AccessRule?
    /// For a variable rule: the value that made it match.
    public var variableValue: [UInt8]?

    public init(allowed: Bool, rule: AccessRule?, variableValue: [UInt8]? = nil) {
        self.allowed = allowed
        self.rule = rule
        self.variableValue = variableValue
    }
}

/// An ordered allow/deny list compiled for lookups that do not grow with its length.
///
/// Semantics are nginx's `ngx_stream_access_module`: rules are checked in order, first match
/// wins, no match allows. IPv4 and IPv6 rules live in separate lists and `all` belongs to both.
/// An IPv4-mapped client (`::ffff:a.b.c.d`) is checked against the IPv4 list whenever the IPv4
/// list has any rule, and against the IPv6 list otherwise.
///
/// A unix-domain client is checked against `unix:` rules and `all` only: `allow 0.0.0.0/0`
/// does not let it in, as in nginx.
///
/// One deliberate difference, for safety: an IPv6 rule inside `::ffff:0:0/96` is also entered,
/// at its place in the order, into the IPv4 list (the compiler warns), so
/// `deny ::ffff:10.0.0.0/104` denies 10.0.0.0/8 however the client arrives. nginx would ignore
/// such a rule for IPv4 clients. Which list a mapped client uses is still decided by nginx's
/// test, on the genuine IPv4 rules and `all` only, so adding a rule never lets a client in.
public struct AccessList: Sendable {
    public let rules: [AccessRule]
    private let ipv4: FirstMatchTable<UInt32>
    private let ipv6: FirstMatchTable<UInt128>
    /// IPv4 rules and `all`, not counting folded mapped-IPv6 rules: nginx's test for whether
    /// a mapped client is checked as IPv4.
    private let hasGenuineIPv4Rules: Bool
    /// `allow $var` / `deny $var` rules with their positions, in order. Few, so walked.
    private let variableRules: [(position: Int32, variable: Variable)]
    /// The first `unix:` or `all` rule: what decides for a unix-domain client.
    private let unixMatch: Int32?

    public static let empty = AccessList(rules: [])

    public init(rules: [AccessRule]) {
        self.rules = rules
        var v4: [(range: ClosedRange<UInt32>, rule: Int32)] = []
        var v6: [(range: ClosedRange<UInt128>, rule: Int32)] = []
        var genuineIPv4 = false
        var variableRules: [(position: Int32, variable: Variable)] = []
        var unixMatch: Int32?
        for (index, rule) in rules.enumerated() {
            let index = Int32(index)
            switch rule.match {
            case .variable(let variable):
                variableRules.append((index, variable))
            case .unix:
                if unixMatch == nil { unixMatch = index }
            case .all:
                if unixMatch == nil { unixMatch = index }
                genuineIPv4 = true
                v4.append((0...UInt32.max, index))
                v6.append((0...UInt128.max, index))
            case .block(let block):
                if let range = block.ipv4Range {
                    genuineIPv4 = true
                    v4.append((range, index))
                }
                if let range = block.ipv6Range { v6.append((range, index)) }
                if let range = block.mappedIPv4Block?.ipv4Range { v4.append((range, index)) }
            }
        }
        hasGenuineIPv4Rules = genuineIPv4
        self.variableRules = variableRules
        self.unixMatch = unixMatch
        ipv4 = FirstMatchTable(ranges: v4)
        ipv6 = FirstMatchTable(ranges: v6)
    }

    public var isEmpty: Bool { rules.isEmpty }
    public var hasVariableRules: Bool { !variableRules.isEmpty }

    /// Whether a variable rule matches a value: non-empty and not "0".
    public static func isSet(_ value: [UInt8]?) -> Bool {
        guard let value, !value.isEmpty else { return false }
        return value != [UInt8(ascii: "0")]
    }

    /// First match over address and variable rules together: the lowest-positioned address
    /// rule that matches (one table lookup), unless a variable rule before it matches first.
    /// `value` reads a variable; it is called only for variable rules that precede the address
    /// match, in order, so `deny $country` costs a lookup only when no earlier rule decided.
    public func evaluate(_ address: IPAddress, value: (Variable) -> [UInt8]?) -> AccessVerdict {
        firstMatch(addressMatch(address), value: value)
    }

    /// A session's client: an IP address, or a unix-domain socket (`unix:` and `all` rules).
    public func evaluate(_ client: SocketEndpoint, value: (Variable) -> [UInt8]?) -> AccessVerdict {
        client.isUnix ? firstMatch(unixMatch, value: value) : evaluate(client.address, value: value)
    }

    public func evaluate(_ client: SocketEndpoint) -> AccessVerdict {
        client.isUnix ? verdict(unixMatch) : evaluate(client.address)
    }

    /// `position`, the first address rule that matched, unless a variable rule before it
    /// matches first.
    private func firstMatch(_ position: Int32?, value: (Variable) -> [UInt8]?) -> AccessVerdict {
        let limit = position ?? Int32.max
        for (position, variable) in variableRules where position < limit {
            let current = value(variable)
            if Self.isSet(current) {
                let rule = rules[Int(position)]
                return AccessVerdict(allowed: rule.action == .allow, rule: rule, variableValue: current)
            }
        }
        return verdict(position)
    }

    /// Address rules only (variable rules never match here).
    public func evaluate(_ address: IPAddress) -> AccessVerdict {
        verdict(addressMatch(address))
    }

    @inline(__always)
    private func verdict(_ position: Int32?) -> AccessVerdict {
        guard let position else { return AccessVerdict(allowed: true, rule: nil) }
        let rule = rules[Int(position)]
        return AccessVerdict(allowed: rule.action == .allow, rule: rule)
    }

    /// The position of the first address rule (or `all`) that matches.
    @inline(__always)
    private func addressMatch(_ address: IPAddress) -> Int32? {
        switch address {
        case .v4(let value):
            return ipv4.firstMatch(value)
        case .v6(let value):
            if let mapped = address.mappedIPv4, hasGenuineIPv4Rules {
                return ipv4.firstMatch(mapped)
            }
            return ipv6.firstMatch(value)
        }
    }

    /// The obvious implementation, kept as the reference the compiled tables are tested against.
    public func evaluateByScan(_ address: IPAddress, value: (Variable) -> [UInt8]? = { _ in nil }) -> AccessVerdict {
        let useIPv4List = address.isIPv4 || (address.mappedIPv4 != nil && hasGenuineIPv4Rules)
        let probe: IPAddress = address.mappedIPv4.map { useIPv4List ? .v4($0) : address } ?? address
        for rule in rules {
            switch rule.match {
            case .variable(let variable):
                let current = value(variable)
                if Self.isSet(current) {
                    return AccessVerdict(allowed: rule.action == .allow, rule: rule, variableValue: current)
                }
            case .all:
                return AccessVerdict(allowed: rule.action == .allow, rule: rule)
            case .unix:
                continue  // an IP address is never a unix socket
            case .block(let block):
                if block.contains(probe) || (useIPv4List && block.mappedIPv4Block?.contains(probe) == true) {
                    return AccessVerdict(allowed: rule.action == .allow, rule: rule)
                }
            }
        }
        return AccessVerdict(allowed: true, rule: nil)
    }
}
