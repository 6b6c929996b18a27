#if canImport(Glibc)
import Glibc
#endif
import CMaxMindDB
public import PortcullisCore

/// A MaxMind DB opened with libmaxminddb. Every C pointer stays inside this file.
///
/// The `MMDB_s` lives at a fixed heap address for the database's whole life (libmaxminddb keeps
/// pointers into it), and it is never written after `MMDB_open`: libmaxminddb lookups only read
/// it, so any number of event loops may look up at once. Replacing a database (reload) means
/// opening a new `MaxMindDatabase` and swapping the reference; the old one closes when the last
/// session using it lets go.
///
/// libmaxminddb maps a private in-memory copy of the file, not the file itself (`PrivateCopy`):
/// truncating or rewriting the file in place cannot crash a lookup, and the database keeps
/// answering from the bytes it was opened with until a reload replaces it.
public final class MaxMindDatabase: Sendable {
    /// The file as the operator named it (libmaxminddb itself only ever sees the copy).
    public let path: String
    public let metadata: Metadata
    /// The file version the copy was made from, for reload checks.
    public let fileIdentity: FileIdentity
    nonisolated(unsafe) private let mmdb: UnsafeMutablePointer<MMDB_s>

    public struct Metadata: Sendable, Equatable {
        public var buildEpoch: UInt64
        public var databaseType: String
        public var ipVersion: Int
        public var nodeCount: Int
    }

    /// Why a database could not be opened, in words an operator can act on.
    public enum OpenError: Error, Equatable, CustomStringConvertible {
        case missing(path: String, reason: String)
        case notMaxMindDB(path: String)
        case corrupt(path: String, reason: String)
        /// The file's size or times moved while it was being copied: someone is writing it.
        case changedWhileReading(path: String)
        /// The in-memory copy could not be made (memory limit, no memfd, no /proc).
        case privateCopyFailed(path: String, reason: String)

        public var description: String {
            switch self {
            case .missing(let path, let reason): return "cannot open GeoIP database \"\(path)\": \(reason)"
            case .notMaxMindDB(let path):
                return "\"\(path)\" is not a MaxMind DB file (no metadata section found; is it truncated or another format?)"
            case .corrupt(let path, let reason): return "GeoIP database \"\(path)\" is damaged: \(reason)"
            case .changedWhileReading(let path):
                return "GeoIP database \"\(path)\" changed while being read (is it being written in place? "
                    + "write the new file under another name and rename it over the old one)"
            case .privateCopyFailed(let path, let reason):
                return "cannot load GeoIP database \"\(path)\" into memory: \(reason)"
            }
        }
    }

    /// Copies the file into memory, opens the copy with libmaxminddb, and reads a few records
    /// to make sure the search tree and data section are sound (`MMDB_open` only checks the
    /// metadata, so a damaged file would otherwise be found by the first session to look up).
    public init(path: String) throws(OpenError) {
        let (copy, identity) = try PrivateCopy.make(of: path)
        // libmaxminddb opens by name: the memfd's name in /proc. Once mapped, the mapping keeps
        // the memory alive and the descriptor can go.
        defer { close(copy) }
        let mmdb = UnsafeMutablePointer<MMDB_s>.allocate(capacity: 1)
        mmdb.initialize(to: MMDB_s())
        let status = MMDB_open("/proc/self/fd/\(copy)", UInt32(MMDB_MODE_MMAP), mmdb)
        guard status == MMDB_SUCCESS else {
            mmdb.deallocate()
            let reason = String(cString: MMDB_strerror(status))
            switch status {
            case MMDB_INVALID_METADATA_ERROR, MMDB_UNKNOWN_DATABASE_FORMAT_ERROR:
                throw .notMaxMindDB(path: path)
            case MMDB_FILE_OPEN_ERROR:
                // The file itself was read already: what failed is reopening the copy by name.
                throw .privateCopyFailed(path: path, reason: "\(reason) (through /proc/self/fd; is /proc mounted?)")
            case MMDB_IO_ERROR, MMDB_OUT_OF_MEMORY_ERROR:
                throw .privateCopyFailed(path: path, reason: reason)
            default:
                throw .corrupt(path: path, reason: reason)
            }
        }
        if let damage = Self.damage(in: mmdb) {
            MMDB_close(mmdb)
            mmdb.deallocate()
            throw .corrupt(path: path, reason: damage)
        }
        self.mmdb = mmdb
        self.path = path
        self.fileIdentity = identity
        let meta = mmdb.pointee.metadata
        metadata = Metadata(
            buildEpoch: meta.build_epoch,
            databaseType: meta.database_type.map { String(cString: $0) } ?? "",
            ipVersion: Int(meta.ip_version),
            nodeCount: Int(meta.node_count))
    }

    /// Addresses looked up once at open: two common IPv4 ones, a documentation IPv6 one, and an
    /// IPv4-mapped one (not folded, so the walk goes through the tree's ::ffff:0:0/96 alias).
    private static let probes: [IPAddress] = ["1.1.1.1", "8.8.8.8", "2001:db8::1", "::ffff:1.2.3.4"].map {
        IPAddress($0)!
    }

    /// What is wrong with a freshly opened database, or nil: the metadata decodes, and the
    /// probe lookups and the full records they find decode. A few tree walks and record
    /// decodes, so cheap even for a city database.
    private static func damage(in mmdb: UnsafeMutablePointer<MMDB_s>) -> String? {
        var list: UnsafeMutablePointer<MMDB_entry_data_list_s>? = nil
        var status = MMDB_get_metadata_as_entry_data_list(mmdb, &list)
        MMDB_free_entry_data_list(list)
        guard status == MMDB_SUCCESS else {
            return "its metadata cannot be decoded (\(String(cString: MMDB_strerror(status))))"
        }
        let isIPv4Only = mmdb.pointee.metadata.ip_version == 4
        for probe in probes {
            // An IPv4 database refuses IPv6 lookups by design; that is no damage.
            if isIPv4Only, case .v6 = probe { continue }
            var error: Int32 = 0
            var result = withSocketAddress(probe) { MMDB_lookup_sockaddr(mmdb, $0, &error) }
            guard error == MMDB_SUCCESS else {
                return "looking up \(probe) fails (\(String(cString: MMDB_strerror(error))))"
            }
            guard result.found_entry else { continue }
            list = nil
            status = MMDB_get_entry_data_list(&result.entry, &list)
            MMDB_free_entry_data_list(list)
            guard status == MMDB_SUCCESS else {
                return "the record for \(probe) cannot be decoded (\(String(cString: MMDB_strerror(status))))"
            }
        }
        return nil
    }

    deinit {
        MMDB_close(mmdb)
        mmdb.deallocate()
    }

    /// The value at `path` for `address`, or nil when the address is not in the database, the
    /// path does not exist, or the value is a map or an array (not a value, as nginx's geoip2).
    /// IPv4-mapped IPv6 addresses are looked up as IPv4.
    public func lookup(_ address: IPAddress, path: GeoPath) -> GeoValue? {
        var error: Int32 = 0
        var result = Self.withSocketAddress(address.folded) { MMDB_lookup_sockaddr(mmdb, $0, &error) }
        guard error == MMDB_SUCCESS, result.found_entry else { return nil }
        var data = MMDB_entry_data_s()
        let status = path.withCPath { MMDB_aget_value(&result.entry, &data, $0) }
        guard status == MMDB_SUCCESS, data.has_data else { return nil }
        return GeoValue(data)
    }

    private static func withSocketAddress<T>(_ address: IPAddress, _ body: (UnsafePointer<sockaddr>) -> T) -> T {
        switch address {
        case .v4(let value):
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_addr.s_addr = value.bigEndian
            return withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1, body) }
        case .v6:
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            let bytes = address.bytes
            withUnsafeMutableBytes(of: &sin6.sin6_addr) { raw in
                for i in 0..<16 { raw[i] = bytes[i] }
            }
            return withUnsafePointer(to: &sin6) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1, body) }
        }
    }
}

/// A lookup path (`country iso_code`, as `mmdblookup` takes it), turned into C strings once.
public final class GeoPath: Sendable {
    public let components: [String]
    nonisolated(unsafe) private let cPath: UnsafeMutablePointer<UnsafePointer<CChar>?>

    public init(_ components: [String]) {
        self.components = components
        cPath = .allocate(capacity: components.count + 1)
        for (i, component) in components.enumerated() {
            cPath[i] = UnsafePointer(strdup(component))
        }
        cPath[components.count] = nil
    }

    deinit {
        for i in 0..<components.count { free(UnsafeMutableRawPointer(mutating: cPath[i])) }
        cPath.deallocate()
    }

    func withCPath<T>(_ body: (UnsafePointer<UnsafePointer<CChar>?>) -> T) -> T { body(cPath) }
}

/// A value from a MaxMind DB, and its text as nginx's geoip2 module renders it.
public enum GeoValue: Sendable, Equatable {
    case string(String)
    case bytes([UInt8])
    case double(Double)
    case float(Float)
    case uint16(UInt16)
    case uint32(UInt32)
    case int32(Int32)
    case uint64(UInt64)
    case uint128(UInt128)
    case boolean(Bool)

    init?(_ data: MMDB_entry_data_s) {
        var data = data
        switch Int32(data.type) {
        case MMDB_DATA_TYPE_UTF8_STRING:
            let bytes = UnsafeRawBufferPointer(start: data.utf8_string, count: Int(data.data_size))
            self = .string(String(decoding: bytes, as: UTF8.self))
        case MMDB_DATA_TYPE_BYTES:
            self = .bytes(Array(UnsafeRawBufferPointer(start: data.bytes, count: Int(data.data_size))))
        case MMDB_DATA_TYPE_DOUBLE: self = .double(data.double_value)
        case MMDB_DATA_TYPE_FLOAT: self = .float(data.float_value)
        case MMDB_DATA_TYPE_UINT16: self = .uint16(data.uint16)
        case MMDB_DATA_TYPE_UINT32: self = .uint32(data.uint32)
        case MMDB_DATA_TYPE_INT32: self = .int32(data.int32)
        case MMDB_DATA_TYPE_UINT64: self = .uint64(data.uint64)
        case MMDB_DATA_TYPE_UINT128:
            var high: UInt64 = 0, low: UInt64 = 0
            portcullis_mmdb_uint128(&data, &high, &low)
            self = .uint128(UInt128(high) << 64 | UInt128(low))
        case MMDB_DATA_TYPE_BOOLEAN: self = .boolean(data.boolean)
        default:
            return nil  // maps and arrays are not values
        }
    }

    /// nginx geoip2's text: strings and bytes as they are, floats with five decimals,
    /// integers in decimal, uint128 as 0x and 32 hex digits, booleans as 1 or 0.
    public var nginxText: [UInt8] {
        switch self {
        case .string(let text): return Array(text.utf8)
        case .bytes(let bytes): return bytes
        case .double(let value): return Array(Self.fiveDecimals(value).utf8)
        case .float(let value): return Array(Self.fiveDecimals(Double(value)).utf8)
        case .uint16(let value): return Array(String(value).utf8)
        case .uint32(let value): return Array(String(value).utf8)
        case .int32(let value): return Array(String(value).utf8)
        case .uint64(let value): return Array(String(value).utf8)
        case .uint128(let value):
            let hex = String(value, radix: 16)
            return Array(("0x" + String(repeating: "0", count: 32 - hex.count) + hex).utf8)
        case .boolean(let value): return value ? [UInt8(ascii: "1")] : [UInt8(ascii: "0")]
        }
    }

    /// printf's "%.5f".
    static func fiveDecimals(_ value: Double) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        _ = withVaList([value]) { vsnprintf(&buffer, buffer.count, "%.5f", $0) }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
