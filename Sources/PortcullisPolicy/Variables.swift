public import PortcullisCore

/// The variables a rule file defines with `geo`, `map`, `split_clients`, `geoip2` and `set`, numbered: the
/// compiler resolves every `$name` to an index here, so a session never looks a name up.
/// See docs/decisions/0005-variables-and-deny-by-variable.md.
public struct VariableTable: Sendable {
    public private(set) var names: [String] = []
    public private(set) var definitions: [VariableDefinition] = []
    /// Where each variable was defined, for diagnostics.
    public private(set) var locations: [SourceLocation] = []
    private var byName: [String: Int] = [:]

    public init() {}

    public var count: Int { names.count }
    public func index(of name: String) -> Int? { byName[name] }

    /// Reserves a number for `name` (definitions are filled in once every name is known, so a
    /// `map` may use a `geo` defined further down).
    mutating func declare(_ name: String, at location: SourceLocation) -> Int {
        if let existing = byName[name] { return existing }
        byName[name] = names.count
        names.append(name)
        definitions.append(.set([:]))
        locations.append(location)
        return names.count - 1
    }

    mutating func define(_ index: Int, as definition: VariableDefinition) {
        definitions[index] = definition
    }
}

public enum VariableDefinition: Sendable {
    case geo(GeoVariable)
    case map(MapVariable)
    case splitClients(SplitClientsVariable)
    case geoip2(GeoIP2Variable)
    case geoip2Metadata(any GeoIPDatabase, GeoIPMetadataField)
    /// `set $var VALUE;` — per server (by the server block's ordinal); a server that does not
    /// set it sees "not found".
    case set([Int: LogTemplate])

    /// The templates this definition reads, for cycle detection.
    var templates: [LogTemplate] {
        switch self {
        case .geo(let geo): return geo.source.map { [$0] } ?? []
        case .map(let map): return [map.source] + map.values
        case .splitClients(let split): return [split.source]
        case .geoip2(let variable): return variable.source.map { [$0] } ?? []
        case .geoip2Metadata: return []
        case .set(let values): return Array(values.values)
        }
    }
}

/// `$var [default=V] [source=$v] PATH…` in a `geoip2` block.
public struct GeoIP2Variable: Sendable {
    public var database: any GeoIPDatabase
    public var query: any GeoIPQuery
    public var defaultValue: [UInt8]?
    /// nil = the client address after realip (`$remote_addr`).
    public var source: LogTemplate?
}

/// One session's values of the rule-defined variables: each is evaluated the first time
/// something reads it (so a GeoIP lookup happens only if a rule or log line uses it) and then
/// remembered for the rest of the session.
///
/// Used by one session at a time: on its event loop while it runs, then by the log writer
/// after the session has ended (the record is handed over through the writer's queue, and the
/// session touches it no more).
public final class SessionVariables: @unchecked Sendable {
    private enum Slot {
        case unevaluated
        case evaluating
        case value([UInt8])
        case notFound
    }

    public let table: VariableTable
    /// The ordinal of the session's `server` block, for `set`.
    public let server: Int
    private var slots: [Slot]

    public init(table: VariableTable, server: Int) {
        self.table = table
        self.server = server
        self.slots = []
    }

    /// The value of variable `index` (nil = not found).
    public func value(_ index: Int, in record: SessionRecord, host: HostFacts = .current) -> [UInt8]? {
        if slots.isEmpty { slots = Array(repeating: .unevaluated, count: table.count) }
        switch slots[index] {
        case .value(let value): return value
        case .notFound: return nil
        case .evaluating:
            return nil  // a cycle; the compiler refuses those, so only reachable through set's self-use
        case .unevaluated:
            slots[index] = .evaluating
            let value = evaluate(table.definitions[index], record: record, host: host)
            slots[index] = value.map(Slot.value) ?? .notFound
            return value
        }
    }

    private func evaluate(_ definition: VariableDefinition, record: SessionRecord, host: HostFacts) -> [UInt8]? {
        switch definition {
        case .geo(let geo):
            let address = geo.source.map { Self.address(from: $0.bytes(for: record, host: host)) } ?? record.client.address
            return geo.value(for: address)
        case .map(let map):
            return map.value(for: map.source.bytes(for: record, host: host), record: record, host: host)
        case .splitClients(let split):
            return split.value(for: split.source.bytes(for: record, host: host))
        case .geoip2(let variable):
            var address = record.client.address
            if let source = variable.source {
                // nginx's geoip2: a source that is not an address is "not found" (or the default).
                guard let parsed = IPAddress(String(decoding: source.bytes(for: record, host: host), as: UTF8.self)) else {
                    return variable.defaultValue
                }
                address = parsed
            }
            return variable.query.value(for: address) ?? variable.defaultValue
        case .geoip2Metadata(let database, let field):
            return Array(String(database.metadata(field)).utf8)
        case .set(let values):
            return values[server].map { $0.bytes(for: record, host: host) }
        }
    }

    /// nginx's geo: a source value that is not an address is looked up as 255.255.255.255.
    static func address(from bytes: [UInt8]) -> IPAddress {
        IPAddress(String(decoding: bytes, as: UTF8.self)) ?? .v4(UInt32.max)
    }
}

extension LogTemplate {
    /// The rule-defined variables this template reads.
    public var definedVariables: [Int] {
        parts.compactMap { if case .variable(.defined(let index)) = $0 { index } else { nil } }
    }
}
