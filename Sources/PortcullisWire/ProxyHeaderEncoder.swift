import PortcullisCore

/// Writes PROXY headers as a sender should (as nginx and HAProxy do).
public enum ProxyHeaderEncoder {
    /// `PROXY TCP4 …\r\n`, `PROXY TCP6 …\r\n` or `PROXY UNKNOWN\r\n`. Mixed families are sent as
    /// TCP6 with the IPv4 side written IPv4-mapped; two IPv4-mapped addresses as TCP4.
    public static func v1(source: SocketEndpoint?, destination: SocketEndpoint?) -> [UInt8] {
        guard let (src, dst) = sameFamily(source, destination) else { return Array("PROXY UNKNOWN\r\n".utf8) }
        let proto = src.address.isIPv4 ? "TCP4" : "TCP6"
        return Array("PROXY \(proto) \(src.address) \(dst.address) \(src.port) \(dst.port)\r\n".utf8)
    }

    /// A v2 header. `tlvs` are written in order; with `crc32c`, a CRC32C TLV is appended and
    /// filled in over the whole header. Mixed families follow nginx: the wider family wins
    /// (IPv4 written IPv4-mapped); two IPv4-mapped addresses are sent as AF_INET.
    /// `len` cannot describe more than 65,535 bytes: a TLV that would not fit (a value built
    /// from a long variable, or forwarded from a large received header) is left out, and the
    /// ones after it that still fit are kept (a longer header would trap on the UInt16).
    /// A CRC32C TLV in `tlvs` is not written either: only `crc32c: true` can fill one in, and a
    /// caller's could only be wrong, making the receiver drop the connection.
    public static func v2(source: SocketEndpoint?, destination: SocketEndpoint?,
                          transport: ProxyHeader.Transport = .stream, command: ProxyHeader.Command = .proxy,
                          tlvs: [ProxyTLV] = [], crc32c: Bool = false) -> [UInt8] {
        var out = ProxyHeaderDecoder.v2Signature
        out.reserveCapacity(64)
        out.append(0x20 | command.rawValue)
        var body: [UInt8] = []
        if command == .proxy, let (src, dst) = sameFamily(source, destination) {
            switch (src.address, dst.address) {
            case (.v4(let s), .v4(let d)):
                out.append(0x10 | transport.rawValue)
                append32(s, to: &body)
                append32(d, to: &body)
            case (.v6(let s), .v6(let d)):
                out.append(0x20 | transport.rawValue)
                append128(s, to: &body)
                append128(d, to: &body)
            default:
                fatalError("sameFamily returns one family")
            }
            append16(src.port, to: &body)
            append16(dst.port, to: &body)
        } else {
            out.append(0x00)  // AF_UNSPEC: LOCAL, or nothing to say about the client
        }
        let room = Int(UInt16.max) - (crc32c ? 7 : 0)
        for tlv in tlvs where tlv.type != ProxyTLVType.crc32c.rawValue && body.count + 3 + tlv.value.count <= room {
            appendTLV(tlv.type, tlv.value, to: &body)
        }
        var crcOffset = -1
        if crc32c {
            crcOffset = 16 + body.count + 3
            appendTLV(ProxyTLVType.crc32c.rawValue, [0, 0, 0, 0], to: &body)
        }
        append16(UInt16(body.count), to: &out)
        out += body
        if crcOffset >= 0 {
            let crc = CRC32C.checksum(out)
            for j in 0..<4 { out[crcOffset + j] = UInt8(truncatingIfNeeded: crc >> (24 - 8 * UInt32(j))) }
        }
        return out
    }

    /// Both endpoints in one family, or nil when either is unknown or a unix socket.
    static func sameFamily(_ source: SocketEndpoint?, _ destination: SocketEndpoint?) -> (SocketEndpoint, SocketEndpoint)? {
        // A unix-domain socket has no address a header can carry (HAProxy sends UNKNOWN too).
        guard var src = source, var dst = destination, !src.isUnix, !dst.isUnix else { return nil }
        src.address = src.address.folded
        dst.address = dst.address.folded
        switch (src.address, dst.address) {
        case (.v4(let s), .v6):
            src.address = .v6(UInt128(0xFFFF) << 32 | UInt128(s))
        case (.v6, .v4(let d)):
            dst.address = .v6(UInt128(0xFFFF) << 32 | UInt128(d))
        default:
            break
        }
        return (src, dst)
    }

    static func appendTLV(_ type: UInt8, _ value: [UInt8], to out: inout [UInt8]) {
        out.append(type)
        append16(UInt16(value.count), to: &out)
        out += value
    }

    static func append16(_ v: UInt16, to out: inout [UInt8]) { out += [UInt8(v >> 8), UInt8(v & 0xFF)] }

    static func append32(_ v: UInt32, to out: inout [UInt8]) {
        out += [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)]
    }

    static func append128(_ v: UInt128, to out: inout [UInt8]) {
        for i in 0..<16 { out.append(UInt8(truncatingIfNeeded: v >> (120 - 8 * i))) }
    }
}
