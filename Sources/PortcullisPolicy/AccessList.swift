public import PortcullisCore

/// One `allow`/`deny` line.
public struct AccessRule: Sendable, Equatable {
    public enum Action: String, Sendable { case allow, deny }
    public enum Match: Sendable, Equatable {
        case all
        case block(CIDR)
    }

    public var action: Action
    public var match: Match
    public var reference: RuleReference

    public init(action: Action, match: Match, reference: RuleReference) {
        self.action = action
        self.match = match
        self.reference = reference
    }
}

/// The outcome of the access phase: whether the session may pass, and which rule said so
/// (nil when no rule matched, which nginx treats as "allowed").
public struct AccessVerdict: Sendable, Equatable {
    public var allowed: Bool
    public var rule: AccessRule?
}

/// An ordered allow/deny list compiled for lookups that do not grow with its length.
///
/// Semantics are nginx's `ngx_stream_access_module`: rules are checked in order, first match
/// wins, no match allows. IPv4 and IPv6 rules live in separate lists and `all` belongs to both.
/// An IPv4-mapped client (`::ffff:a.b.c.d`) is checked against the IPv4 list whenever the IPv4
/// list has any rule, and against the IPv6 list otherwise.
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

    public static let empty = AccessList(rules: [])

    public init(rules: [AccessRule]) {
        self.rules = rules
        var v4: [(range: ClosedRange<UInt32>, rule: Int32)] = []
        var v6: [(range: ClosedRange<UInt128>, rule: Int32)] = []
        var genuineIPv4 = false
        for (index, rule) in rules.enumerated() {
            let index = Int32(index)
            switch rule.match {
            case .all:
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
        ipv4 = FirstMatchTable(ranges: v4)
        ipv6 = FirstMatchTable(ranges: v6)
    }

    public var isEmpty: Bool { rules.isEmpty }

    public func evaluate(_ address: IPAddress) -> AccessVerdict {
        let index: Int32?
        switch address {
        case .v4(let value):
            index = ipv4.firstMatch(value)
        case .v6(let value):
            if let mapped = address.mappedIPv4, hasGenuineIPv4Rules {
                index = ipv4.firstMatch(mapped)
            } else {
                index = ipv6.firstMatch(value)
            }
        }
        guard let index else { return AccessVerdict(allowed: true, rule: nil) }
        let rule = rules[Int(index)]
        return AccessVerdict(allowed: rule.action == .allow, rule: rule)
    }

    /// The obvious implementation, kept as the reference the compiled tables are tested against.
    public func evaluateByScan(_ address: IPAddress) -> AccessVerdict {
        let useIPv4List = address.isIPv4 || (address.mappedIPv4 != nil && hasGenuineIPv4Rules)
        let probe: IPAddress = address.mappedIPv4.map { useIPv4List ? .v4($0) : address } ?? address
        for rule in rules {
            switch rule.match {
            case .all:
                return AccessVerdict(allowed: rule.action == .allow, rule: rule)
            case .block(let block):
                if block.contains(probe) || (useIPv4List && block.mappedIPv4Block?.contains(probe) == true) {
                    return AccessVerdict(allowed: rule.action == .allow, rule: rule)
                }
            }
        }
        return AccessVerdict(allowed: true, rule: nil)
    }
}
