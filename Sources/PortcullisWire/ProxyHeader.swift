public import PortcullisCore

/// A PROXY protocol header (HAProxy's proxy-protocol.txt, revision 2026/04/27), v1 or v2.
public struct ProxyHeader: Sendable, Equatable {
    public enum Version: Sendable, Equatable { case v1, v2 }

    /// LOCAL: the proxy's own connection (health check); use the real endpoints.
    /// PROXY: a relayed connection; the addresses describe the original client.
    public enum Command: UInt8, Sendable { case local = 0, proxy = 1 }

    /// The v2 transport nibble (v1 is always a stream).
    public enum Transport: UInt8, Sendable { case unspecified = 0, stream = 1, datagram = 2 }

    public enum Addresses: Sendable, Equatable {
        /// v1 `UNKNOWN`, v2 AF_UNSPEC, or a LOCAL header: keep the real endpoints.
        case unspecified
        /// Source (the client) and destination (the address it connected to), one family.
        case inet(source: SocketEndpoint, destination: SocketEndpoint)
        /// AF_UNIX: 108-byte paths, as sent.
        case unix(source: [UInt8], destination: [UInt8])
    }

    public var version: Version
    public var command: Command
    public var transport: Transport
    public var addresses: Addresses
    /// The TLV area exactly as it was on the wire (v2 only), walked lazily by `tlvs`.
    public var tlvBytes: [UInt8]

    public init(version: Version, command: Command = .proxy, transport: Transport = .stream,
                addresses: Addresses, tlvBytes: [UInt8] = []) {
        self.version = version
        self.command = command
        self.transport = transport
        self.addresses = addresses
        self.tlvBytes = tlvBytes
    }

    /// The client, when the header names one.
    public var source: SocketEndpoint? {
        if command == .proxy, case .inet(let source, _) = addresses { return source }
        return nil
    }

    /// The address the client connected to, when the header names one.
    public var destination: SocketEndpoint? {
        if command == .proxy, case .inet(_, let destination) = addresses { return destination }
        return nil
    }

    /// Every TLV in order. The area was checked when decoding, so this never fails.
    public var tlvs: [ProxyTLV] { ProxyTLV.parseList(tlvBytes[...]) ?? [] }

    /// The first TLV of a type.
    public func tlv(_ type: UInt8) -> [UInt8]? { tlvs.first { $0.type == type }?.value }
}

/// One type-length-value field of a v2 header.
public struct ProxyTLV: Sendable, Equatable {
    public var type: UInt8
    public var value: [UInt8]

    public init(type: UInt8, value: [UInt8]) {
        self.type = type
        self.value = value
    }

    public init(_ type: ProxyTLVType, _ value: [UInt8]) {
        self.init(type: type.rawValue, value: value)
    }

    /// Splits a TLV area; nil if a field runs past the end.
    static func parseList(_ bytes: ArraySlice<UInt8>) -> [ProxyTLV]? {
        var out: [ProxyTLV] = []
        var i = bytes.startIndex
        while i < bytes.endIndex {
            guard bytes.endIndex - i >= 3 else { return nil }
            let length = Int(bytes[i + 1]) << 8 | Int(bytes[i + 2])
            guard bytes.endIndex - (i + 3) >= length else { return nil }
            out.append(ProxyTLV(type: bytes[i], value: Array(bytes[(i + 3)..<(i + 3 + length)])))
            i += 3 + length
        }
        return out
    }
}

/// The TLV types the spec names, with nginx's variable names for them.
public enum ProxyTLVType: UInt8, Sendable, CaseIterable {
    case alpn = 0x01
    case authority = 0x02
    case crc32c = 0x03
    case noop = 0x04
    case uniqueID = 0x05
    case ssl = 0x20
    case sslVersion = 0x21
    case sslCN = 0x22
    case sslCipher = 0x23
    case sslSigAlg = 0x24
    case sslKeyAlg = 0x25
    case netns = 0x30

    /// nginx's `$proxy_protocol_tlv_NAME` names (and the names `proxy_protocol_tlv` accepts).
    public var name: String {
        switch self {
        case .alpn: return "alpn"
        case .authority: return "authority"
        case .crc32c: return "crc32c"
        case .noop: return "noop"
        case .uniqueID: return "unique_id"
        case .ssl: return "ssl"
        case .sslVersion: return "ssl_version"
        case .sslCN: return "ssl_cn"
        case .sslCipher: return "ssl_cipher"
        case .sslSigAlg: return "ssl_sig_alg"
        case .sslKeyAlg: return "ssl_key_alg"
        case .netns: return "netns"
        }
    }

    public init?(name: String) {
        guard let found = Self.allCases.first(where: { $0.name == name }) else { return nil }
        self = found
    }

    /// Sub-TLVs live inside the SSL TLV, not at the top level.
    public var isSSLSubType: Bool { rawValue >= 0x21 && rawValue <= 0x2F }
}

/// The SSL TLV's value: client flags, verify result, then sub-TLVs.
public struct ProxySSLInfo: Sendable, Equatable {
    public var client: UInt8
    public var verify: UInt32
    public var subTLVs: [ProxyTLV]

    public init?(_ value: [UInt8]) {
        guard value.count >= 5 else { return nil }
        client = value[0]
        verify = value[1...4].reduce(0) { $0 << 8 | UInt32($1) }
        guard let sub = ProxyTLV.parseList(value[5...]) else { return nil }
        subTLVs = sub
    }
}

/// Why a header was refused. Each case says what the spec requires.
public enum ProxyHeaderError: Error, Sendable, Equatable, CustomStringConvertible {
    case notProxyProtocol
    case v1TooLong
    case v1Malformed(String)
    case v2BadVersion(UInt8)
    case v2BadCommand(UInt8)
    case v2BadFamily(UInt8)
    case v2AddressesTooShort(family: UInt8, length: Int)
    case v2TLVOverrun
    case v2BadCRC32CLength(Int)
    case v2DuplicateCRC32C
    case v2CRC32CMismatch(expected: UInt32, computed: UInt32)

    public var description: String {
        switch self {
        case .notProxyProtocol: return "no PROXY protocol signature"
        case .v1TooLong: return "v1 header without CRLF in the first 107 bytes"
        case .v1Malformed(let why): return "malformed v1 header: \(why)"
        case .v2BadVersion(let v): return "v2 header with version \(v) (only 2 is valid)"
        case .v2BadCommand(let c): return "v2 header with unknown command 0x\(String(c, radix: 16))"
        case .v2BadFamily(let f): return "v2 header with invalid family/transport byte 0x\(String(f, radix: 16))"
        case .v2AddressesTooShort(let f, let l):
            return "v2 header too short for family 0x\(String(f, radix: 16)): \(l) address bytes"
        case .v2TLVOverrun: return "v2 TLV runs past the end of the header"
        case .v2BadCRC32CLength(let l): return "v2 CRC32C TLV of \(l) bytes (must be 4)"
        case .v2DuplicateCRC32C: return "v2 header with two CRC32C TLVs"
        case .v2CRC32CMismatch(let e, let c):
            return "v2 CRC32C mismatch (header says 0x\(String(e, radix: 16)), computed 0x\(String(c, radix: 16)))"
        }
    }
}
