import PortcullisCore

/// Reads PROXY headers with the parse-or-rewind contract: `nil` means "not enough bytes yet",
/// a thrown error means the bytes can never become a valid header, and on success the header
/// and the number of bytes it used are returned. Nothing is consumed in the first two cases.
public enum ProxyHeaderDecoder {
    /// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
    public static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    static let v1Prefix: [UInt8] = Array("PROXY ".utf8)
    /// A v1 line is at most 107 bytes including CRLF.
    public static let v1MaximumLength = 107

    public static func decode(_ bytes: [UInt8]) throws(ProxyHeaderError) -> (header: ProxyHeader, length: Int)? {
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(ProxyHeaderError) in try decode(raw) }
        }
        return try result.get()
    }

    public static func decode(_ bytes: UnsafeRawBufferPointer) throws(ProxyHeaderError) -> (header: ProxyHeader, length: Int)? {
        guard !bytes.isEmpty else { return nil }
        if bytes[0] == v2Signature[0] {
            let n = min(bytes.count, v2Signature.count)
            for i in 0..<n where bytes[i] != v2Signature[i] { throw .notProxyProtocol }
            return try decodeV2(bytes)
        }
        let n = min(bytes.count, v1Prefix.count)
        for i in 0..<n where bytes[i] != v1Prefix[i] { throw .notProxyProtocol }
        return try decodeV1(bytes)
    }

    // MARK: v1

    static func decodeV1(_ bytes: UnsafeRawBufferPointer) throws(ProxyHeaderError) -> (header: ProxyHeader, length: Int)? {
        // Find CRLF in the first 107 bytes; a lone CR or LF is not a line end. A CR in the
        // 107th byte cannot start a CRLF that ends within 107 bytes.
        let limit = min(bytes.count, v1MaximumLength)
        var end = -1
        var i = 0
        while i < limit {
            if bytes[i] == 0x0D {
                guard i + 1 < v1MaximumLength else { throw .v1TooLong }
                guard i + 1 < bytes.count else { return nil }
                guard bytes[i + 1] == 0x0A else { throw .v1Malformed("CR not followed by LF") }
                end = i
                break
            }
            if bytes[i] == 0x0A { throw .v1Malformed("LF without CR") }
            i += 1
        }
        guard end >= 0 else {
            if bytes.count >= v1MaximumLength { throw .v1TooLong }
            return nil
        }
        let line = Array(bytes[v1Prefix.count..<end])
        let fields = line.split(separator: 0x20, omittingEmptySubsequences: false)
        guard let proto = fields.first else { throw .v1Malformed("no protocol") }
        let length = end + 2
        switch Array(proto) {
        case Array("UNKNOWN".utf8):
            // The rest of the line may be anything (or nothing); the real endpoints apply.
            return (ProxyHeader(version: .v1, command: .proxy, transport: .stream, addresses: .unspecified), length)
        case Array("TCP4".utf8), Array("TCP6".utf8):
            let isV6 = proto.last == UInt8(ascii: "6")
            guard fields.count == 5 else {
                throw .v1Malformed("expected \"TCP4|TCP6 SRC DST SPORT DPORT\" separated by single spaces")
            }
            let source = try v1Address(fields[1], ipv6: isV6)
            let destination = try v1Address(fields[2], ipv6: isV6)
            let sourcePort = try v1Port(fields[3])
            let destinationPort = try v1Port(fields[4])
            let addresses = ProxyHeader.Addresses.inet(
                source: SocketEndpoint(address: source, port: sourcePort),
                destination: SocketEndpoint(address: destination, port: destinationPort))
            return (ProxyHeader(version: .v1, command: .proxy, transport: .stream, addresses: addresses), length)
        default:
            throw .v1Malformed("unknown protocol \"\(String(decoding: proto, as: UTF8.self))\"")
        }
    }

    private static func v1Address(_ field: ArraySlice<UInt8>, ipv6: Bool) throws(ProxyHeaderError) -> IPAddress {
        let text = String(decoding: field, as: UTF8.self)
        guard let address = IPAddress(text), address.isIPv4 != ipv6 else {
            throw .v1Malformed("invalid \(ipv6 ? "IPv6" : "IPv4") address \"\(text)\"")
        }
        return address
    }

    private static func v1Port(_ field: ArraySlice<UInt8>) throws(ProxyHeaderError) -> UInt16 {
        guard !field.isEmpty, field.count <= 5, field.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
              field.count == 1 || field.first != 0x30,
              let value = UInt16(String(decoding: field, as: UTF8.self))
        else { throw .v1Malformed("invalid port \"\(String(decoding: field, as: UTF8.self))\"") }
        return value
    }

    // MARK: v2

    /// Called with at least the first byte of the signature matched; each fixed field is checked
    /// as soon as it has arrived, so a bad one is refused without waiting for `len` bytes.
    static func decodeV2(_ bytes: UnsafeRawBufferPointer) throws(ProxyHeaderError) -> (header: ProxyHeader, length: Int)? {
        guard bytes.count > 12 else { return nil }
        let versionCommand = bytes[12]
        guard versionCommand >> 4 == 2 else { throw .v2BadVersion(versionCommand >> 4) }
        guard let command = ProxyHeader.Command(rawValue: versionCommand & 0x0F) else {
            throw .v2BadCommand(versionCommand & 0x0F)
        }
        guard bytes.count > 13 else { return nil }
        let familyByte = bytes[13]
        let family = familyByte >> 4
        // A LOCAL header's family is ignored (the spec; HAProxy does the same): only a PROXY
        // header must name a valid family and transport.
        let parsedTransport = ProxyHeader.Transport(rawValue: familyByte & 0x0F)
        guard command == .local || (family <= 3 && parsedTransport != nil) else {
            throw .v2BadFamily(familyByte)
        }
        let transport = parsedTransport ?? .unspecified
        guard bytes.count >= 16 else { return nil }
        let length = Int(bytes[14]) << 8 | Int(bytes[15])
        let total = 16 + length

        let addressLength: Int
        switch family {
        case 1: addressLength = 12
        case 2: addressLength = 36
        case 3: addressLength = 216
        default: addressLength = 0
        }
        // A PROXY header whose block cannot hold its family's addresses never becomes valid.
        guard command == .local || length >= addressLength else {
            throw .v2AddressesTooShort(family: familyByte, length: length)
        }
        guard bytes.count >= total else { return nil }
        // `len` is always honoured; a LOCAL header's block is skipped whatever it holds.
        if command == .local {
            return (ProxyHeader(version: .v2, command: .local, transport: transport, addresses: .unspecified), total)
        }

        let addresses: ProxyHeader.Addresses
        switch family {
        case 1:
            let src = read32(bytes, 16), dst = read32(bytes, 20)
            addresses = .inet(source: SocketEndpoint(address: .v4(src), port: read16(bytes, 24)),
                              destination: SocketEndpoint(address: .v4(dst), port: read16(bytes, 26)))
        case 2:
            addresses = .inet(source: SocketEndpoint(address: .v6(read128(bytes, 16)), port: read16(bytes, 48)),
                              destination: SocketEndpoint(address: .v6(read128(bytes, 32)), port: read16(bytes, 50)))
        case 3:
            addresses = .unix(source: Array(bytes[16..<124]), destination: Array(bytes[124..<232]))
        default:
            addresses = .unspecified
        }

        // TLVs: walk once to check bounds and find a CRC32C, then keep the area as one copy.
        let tlvStart = 16 + addressLength
        var i = tlvStart
        var crcOffset = -1
        while i < total {
            guard total - i >= 3 else { throw .v2TLVOverrun }
            let tlvLength = Int(bytes[i + 1]) << 8 | Int(bytes[i + 2])
            guard total - (i + 3) >= tlvLength else { throw .v2TLVOverrun }
            if bytes[i] == ProxyTLVType.crc32c.rawValue {
                guard tlvLength == 4 else { throw .v2BadCRC32CLength(tlvLength) }
                // Two checksums could disagree; checking only one would be checking neither.
                guard crcOffset < 0 else { throw .v2DuplicateCRC32C }
                crcOffset = i + 3
            }
            i += 3 + tlvLength
        }
        if crcOffset >= 0 {
            let expected = read32(bytes, crcOffset)
            var header = Array(bytes[0..<total])
            for j in 0..<4 { header[crcOffset + j] = 0 }
            let computed = CRC32C.checksum(header)
            guard computed == expected else { throw .v2CRC32CMismatch(expected: expected, computed: computed) }
        }
        let tlvBytes = tlvStart < total ? Array(bytes[tlvStart..<total]) : []
        return (ProxyHeader(version: .v2, command: command, transport: transport, addresses: addresses,
                            tlvBytes: tlvBytes), total)
    }

    @inline(__always) static func read16(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt16 {
        UInt16(b[at]) << 8 | UInt16(b[at + 1])
    }

    @inline(__always) static func read32(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
        UInt32(b[at]) << 24 | UInt32(b[at + 1]) << 16 | UInt32(b[at + 2]) << 8 | UInt32(b[at + 3])
    }

    @inline(__always) static func read128(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt128 {
        var value: UInt128 = 0
        for i in 0..<16 { value = value << 8 | UInt128(b[at + i]) }
        return value
    }
}
