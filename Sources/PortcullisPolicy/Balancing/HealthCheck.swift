public import PortcullisCore

/// `match NAME { send …; expect …; }` (nginx Plus's stream match): what a health check sends
/// and what the answer must hold. Without `send` nothing is written; without `expect` any
/// answer (or none) passes once the send is done.
public struct HealthMatch: Sendable {
    public enum Expectation: Sendable {
        /// `expect "text";`: the answer contains these bytes (HAProxy's `expect string`).
        case contains([UInt8])
        /// `expect ~ regex;` / `expect ~* regex;`: the answer, read byte for byte as characters
        /// (so `\x00`…`\xff` in the pattern match raw bytes), matches.
        case regex(HealthRegex)
    }

    public var name: String
    public var send: [UInt8]?
    public var expect: Expectation?

    /// What the answer so far says. `ended`: the server closed, or the read buffer is full,
    /// so no more is coming.
    public func verdict(_ received: [UInt8], ended: Bool) -> HealthVerdict {
        guard let expect else { return .passed }
        let matched: Bool
        switch expect {
        case .contains(let bytes):
            matched = bytes.isEmpty || received.indices.contains { received[$0...].starts(with: bytes) }
        case .regex(let regex):
            matched = regex.matches(received)
        }
        if matched { return .passed }
        return ended ? .failed("the answer does not match \"\(name)\"") : .needMore
    }
}

/// A `~` expectation, matched by the linear-time engine of map regexes (`MapRegex`).
public struct HealthRegex: Sendable {
    let regex: MapRegex

    init(pattern: String, caseInsensitive: Bool) throws(RegexSyntaxError) {
        regex = try MapRegex(pattern: pattern, caseInsensitive: caseInsensitive, value: 0)
    }

    func matches(_ bytes: [UInt8]) -> Bool {
        // One character per byte (ISO 8859-1), so binary answers are matched byte for byte.
        regex.matches(latin1: bytes)
    }
}

public enum HealthVerdict: Sendable, Equatable {
    case passed
    case failed(String)
    case needMore
}

/// One `health_check` of a server's upstream group (nginx Plus's stream `health_check`,
/// HAProxy's `check`): every `interval` each server of the group (backups too; `down` ones
/// are never checked) is connected to (TCP) or sent a datagram (`udp`), within `timeout`;
/// `fails` failures in a row take it out of rotation, `passes` passes in a row bring it back.
public struct HealthCheck: Sendable {
    public var group: UpstreamGroup
    public var intervalMilliseconds = 5_000
    /// Each check starts up to this much later, at random, so checks of many gateways spread.
    public var jitterMilliseconds = 0
    public var fails = 1
    public var passes = 1
    /// A server starts out of rotation ("checking") until its first check passes.
    public var mandatory = false
    /// With `mandatory`: after a reload, a server that was healthy stays in (issue #15's reload).
    public var persistent = false
    public var match: HealthMatch?
    /// `port=`: check this port instead of the server's.
    public var port: UInt16?
    public var udp = false
    /// `health_check_timeout`: connect, send and expect together.
    public var timeoutMilliseconds = 5_000
    public var location: SourceLocation?

    public init(group: UpstreamGroup) { self.group = group }

    /// What a UDP check sends without a `match` (nginx's): it passes unless the server's host
    /// answers with ICMP port unreachable.
    public static let defaultDatagram = Array("nginx health check".utf8)

    /// The servers this check probes: every one but the `down` ones.
    public var checkedServers: [Int] { group.servers.indices.filter { !group.servers[$0].down } }

    /// Where server `index` is checked: its address, or its address with `port=`.
    public func target(_ index: Int) -> SocketEndpoint {
        var endpoint = group.servers[index].endpoint
        if let port, !endpoint.isUnix { endpoint.port = port }
        return endpoint
    }
}

/// One server as one check sees it: passes and failures in a row, and whether it is healthy.
/// A transition is returned once, when `passes` or `fails` in a row are reached.
public struct HealthTracker: Sendable, Equatable {
    public private(set) var healthy: Bool
    private var passesInARow = 0
    private var failuresInARow = 0
    let passes: Int
    let fails: Int

    /// `healthy`: where it starts (nil: in rotation, or "checking" with `mandatory`).
    public init(check: HealthCheck, healthy: Bool? = nil) {
        self.healthy = healthy ?? !check.mandatory
        passes = check.passes
        fails = check.fails
    }

    /// The new state when this result changes it; nil when it does not. A `mandatory` server
    /// ("checking") becomes healthy at its first pass, as nginx Plus.
    public mutating func record(passed: Bool, firstResult: Bool = false) -> Bool? {
        if passed {
            failuresInARow = 0
            passesInARow += 1
            if !healthy && (passesInARow >= passes || firstResult) {
                healthy = true
                return true
            }
        } else {
            passesInARow = 0
            failuresInARow += 1
            if healthy && failuresInARow >= fails {
                healthy = false
                return false
            }
        }
        return nil
    }
}
