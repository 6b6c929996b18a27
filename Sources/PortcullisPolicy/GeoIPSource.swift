public import PortcullisCore

/// What the policy needs from a GeoIP database, without knowing libmaxminddb: the compiler
/// prepares one query per `geoip2` variable, and sessions ask it for values. The
/// implementation (PortcullisGeoIP) keeps every C pointer to itself and may swap the database
/// underneath (`auto_reload`); a query always answers from the database current at the call.
public protocol GeoIPDatabase: AnyObject, Sendable {
    /// The path as written in the rule file.
    var path: String { get }
    /// A prepared lookup path (`country iso_code`, as `mmdblookup` takes it).
    func makeQuery(_ path: [String]) -> any GeoIPQuery
    /// `metadata build_epoch|last_check|last_change`, as nginx's geoip2 module prints them
    /// (seconds since 1970).
    func metadata(_ field: GeoIPMetadataField) -> UInt64
}

public protocol GeoIPQuery: Sendable {
    /// The value's text as nginx's geoip2 module renders it, or nil when the address is not in
    /// the database, the path does not exist, or the value is a map or an array.
    /// IPv4-mapped IPv6 addresses are looked up as IPv4.
    func value(for address: IPAddress) -> [UInt8]?
}

public enum GeoIPMetadataField: String, Sendable, CaseIterable {
    case buildEpoch = "build_epoch"
    case lastCheck = "last_check"
    case lastChange = "last_change"
}

/// Opens the databases `geoip2` blocks name. The gateway passes the libmaxminddb one; the
/// compiler reports a failure at the block's file argument and refuses the rules.
public protocol GeoIPOpener: Sendable {
    /// `autoReloadMilliseconds`: nil = never reload (nginx's default).
    func open(path: String, autoReloadMilliseconds: Int?) throws(GeoIPOpenFailure) -> any GeoIPDatabase
}

public struct GeoIPOpenFailure: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
