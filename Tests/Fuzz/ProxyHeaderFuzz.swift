// libFuzzer harness for the PROXY protocol codec (PortcullisWire). Built and run by
// Tests/Fuzz/run-fuzzer.sh; see docs/fuzzing.md. Not part of the SwiftPM package.
//
// For every input: decode must not crash; a success must be self-consistent (the header alone
// decodes to the same header, one byte less asks for more, the raw-buffer entry point agrees),
// and a decoded header re-encoded by ProxyHeaderEncoder must decode to the same meaning.
// Inputs starting with 0xEE (never a PROXY header) instead drive the encoder: the rest is read
// as arguments (endpoints, transport, TLVs of any size and type) and what the encoder writes
// must decode back to them. A selector byte keeps the decoder's runs fast; libFuzzer finds
// the 0xEE branch at once and mutates the encoder inputs on their own.
import PortcullisCore
import PortcullisWire

@_cdecl("LLVMFuzzerTestOneInput")
public func proxyHeaderFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size))
    if bytes.first == encoderSelector {
        checkEncoder(Array(bytes.dropFirst()))
        return 0
    }
    let outcome = Result { () throws(ProxyHeaderError) in try ProxyHeaderDecoder.decode(bytes) }

    // The raw-buffer entry point must give exactly the same answer.
    let raw = bytes.withUnsafeBytes { buffer in
        Result { () throws(ProxyHeaderError) in try ProxyHeaderDecoder.decode(buffer) }
    }
    precondition(same(outcome, raw), "array and raw-buffer decoders disagree")

    guard case .success(let decoded?) = outcome else { return 0 }
    let (header, length) = decoded
    precondition(length > 0 && length <= size, "length \(length) for \(size) input bytes")
    if header.version == .v1 {
        precondition(length <= ProxyHeaderDecoder.v1MaximumLength, "v1 line of \(length) bytes")
    }

    // Parse-or-rewind: the header alone decodes the same, one byte less is "need more".
    let exact = Result { () throws(ProxyHeaderError) in try ProxyHeaderDecoder.decode(Array(bytes[..<length])) }
    guard case .success(let again?) = exact, again.header == header, again.length == length else {
        preconditionFailure("the header's own \(length) bytes do not decode the same")
    }
    let short = Result { () throws(ProxyHeaderError) in try ProxyHeaderDecoder.decode(Array(bytes[..<(length - 1)])) }
    guard case .success(nil) = short else { preconditionFailure("\(length - 1) of \(length) header bytes did not ask for more") }

    // Lazy views must not fail on anything the decoder accepted.
    let tlvs = header.tlvs
    precondition(tlvs.reduce(0) { $0 + 3 + $1.value.count } == header.tlvBytes.count, "TLV walk lost bytes")
    if let ssl = header.tlv(ProxyTLVType.ssl.rawValue) { _ = ProxySSLInfo(ssl) }

    switch header.version {
    case .v1: checkV1RoundTrip(header)
    case .v2: checkV2RoundTrip(header, tlvs: tlvs)
    }
    return 0
}

private func same(_ a: Result<(header: ProxyHeader, length: Int)?, ProxyHeaderError>,
                  _ b: Result<(header: ProxyHeader, length: Int)?, ProxyHeaderError>) -> Bool {
    switch (a, b) {
    case (.success(nil), .success(nil)): return true
    case (.success(let x?), .success(let y?)): return x.header == y.header && x.length == y.length
    case (.failure(let x), .failure(let y)): return x == y
    default: return false
    }
}

private func decodeWhole(_ bytes: [UInt8], _ what: String) -> ProxyHeader {
    let result = Result { () throws(ProxyHeaderError) in try ProxyHeaderDecoder.decode(bytes) }
    guard case .success(let decoded?) = result, decoded.length == bytes.count else {
        preconditionFailure("re-encoded \(what) header does not decode: \(result) \(bytes)")
    }
    return decoded.header
}

/// IPv4-mapped IPv6 is the same client as IPv4: the encoder folds it (both mapped → AF_INET).
private func folded(_ addresses: ProxyHeader.Addresses) -> ProxyHeader.Addresses {
    guard case .inet(var source, var destination) = addresses else { return addresses }
    source.address = source.address.folded
    destination.address = destination.address.folded
    return .inet(source: source, destination: destination)
}

private func checkV1RoundTrip(_ header: ProxyHeader) {
    let encoded = ProxyHeaderEncoder.v1(source: header.source, destination: header.destination)
    let again = decodeWhole(encoded, "v1")
    precondition(again.version == .v1 && again.command == .proxy, "v1 re-encoding changed the command")
    precondition(folded(again.addresses) == folded(header.addresses), "v1 re-encoding changed the addresses")
}

private func checkV2RoundTrip(_ header: ProxyHeader, tlvs: [ProxyTLV]) {
    let crc = ProxyTLVType.crc32c.rawValue
    let plain = tlvs.filter { $0.type != crc }
    let hadCRC = plain.count != tlvs.count
    let encoded: [UInt8]
    switch (header.command, header.addresses) {
    case (.local, _):
        encoded = ProxyHeaderEncoder.v2(source: nil, destination: nil, command: .local)
    case (.proxy, .inet(let source, let destination)):
        encoded = ProxyHeaderEncoder.v2(source: source, destination: destination, transport: header.transport,
                                        tlvs: plain, crc32c: hadCRC)
    case (.proxy, .unspecified):
        encoded = ProxyHeaderEncoder.v2(source: nil, destination: nil, transport: header.transport,
                                        tlvs: plain, crc32c: hadCRC)
    case (.proxy, .unix):
        return  // the encoder writes only inet and unspecified addresses
    }
    let again = decodeWhole(encoded, "v2")
    precondition(again.version == .v2 && again.command == header.command, "v2 re-encoding changed the command")
    precondition(folded(again.addresses) == folded(header.addresses), "v2 re-encoding changed the addresses")
    if case .inet = header.addresses {
        precondition(again.transport == header.transport, "v2 re-encoding changed the transport")
    }
    if header.command == .proxy {
        let againTLVs = again.tlvs
        precondition(againTLVs.filter { $0.type != crc } == plain, "v2 re-encoding changed the TLVs")
        precondition(againTLVs.contains { $0.type == crc } == hadCRC, "v2 re-encoding lost the CRC32C")
    }
}

// MARK: encoder

let encoderSelector: UInt8 = 0xEE

/// Reads encoder arguments from fuzzer bytes; past the end it reads zeros.
private struct ArgumentReader {
    let bytes: [UInt8]
    var at = 0
    var atEnd: Bool { at >= bytes.count }
    mutating func byte() -> UInt8 {
        defer { at += 1 }
        return at < bytes.count ? bytes[at] : 0
    }
    mutating func endpoint(ipv6: Bool) -> SocketEndpoint {
        let address: IPAddress
        if ipv6 {
            address = .v6((0..<16).reduce(UInt128(0)) { value, _ in value << 8 | UInt128(byte()) })
        } else {
            address = .v4((0..<4).reduce(UInt32(0)) { value, _ in value << 8 | UInt32(byte()) })
        }
        return SocketEndpoint(address: address, port: UInt16(byte()) << 8 | UInt16(byte()))
    }
}

/// flags: bits 0-1 families (none, v4, v6, v4 -> v6), 2-3 transport, 4 LOCAL, 5 crc32c,
/// 6 also v1, 7 first TLV's length ×300 if its type is 0xF0 or more (so a value can exceed
/// what a 16-bit length holds).
/// Then the endpoints, then up to 16 TLVs as type, length byte, value (the type byte repeated
/// where the input runs out).
private func checkEncoder(_ bytes: [UInt8]) {
    var reader = ArgumentReader(bytes: bytes)
    let flags = reader.byte()
    var source: SocketEndpoint?, destination: SocketEndpoint?
    switch flags & 3 {
    case 1: source = reader.endpoint(ipv6: false); destination = reader.endpoint(ipv6: false)
    case 2: source = reader.endpoint(ipv6: true); destination = reader.endpoint(ipv6: true)
    case 3: source = reader.endpoint(ipv6: false); destination = reader.endpoint(ipv6: true)
    default: break
    }
    let transport = ProxyHeader.Transport(rawValue: (flags >> 2 & 3) % 3)!
    let command: ProxyHeader.Command = flags & 0x10 != 0 ? .local : .proxy
    let crc = flags & 0x20 != 0
    var tlvs: [ProxyTLV] = []
    while !reader.atEnd && tlvs.count < 16 {
        let type = reader.byte()
        let length = Int(reader.byte())
        if tlvs.isEmpty && flags & 0x80 != 0 && type >= 0xF0 {
            // One large value: alone it may not fit a 16-bit length, or it leaves the later
            // TLVs only a little room. (Rare on purpose: a 64 KiB header costs ~50 runs.)
            tlvs.append(ProxyTLV(type: type, value: [UInt8](repeating: type, count: length * 300)))
            continue
        }
        let value = (0..<length).map { _ in reader.atEnd ? type : reader.byte() }
        tlvs.append(ProxyTLV(type: type, value: value))
    }

    if flags & 0x40 != 0 {
        let header = decodeWhole(ProxyHeaderEncoder.v1(source: source, destination: destination), "v1")
        if let source, let destination {
            precondition(folded(header.addresses) == folded(.inet(source: source, destination: destination)), "v1 addresses")
        } else {
            precondition(header.addresses == .unspecified, "v1 UNKNOWN")
        }
    }

    let encoded = ProxyHeaderEncoder.v2(source: source, destination: destination, transport: transport,
                                        command: command, tlvs: tlvs, crc32c: crc)
    precondition(encoded.count <= 16 + 65_535, "v2 header of \(encoded.count) bytes")
    let header = decodeWhole(encoded, "encoded v2")
    precondition(header.command == command, "command")
    guard command == .proxy else {
        precondition(header.addresses == .unspecified && header.tlvs.isEmpty, "LOCAL")
        return
    }
    if let source, let destination {
        precondition(folded(header.addresses) == folded(.inet(source: source, destination: destination)), "v2 addresses")
        precondition(header.transport == transport, "v2 transport")
    } else {
        precondition(header.addresses == .unspecified, "v2 AF_UNSPEC")
    }
    // The documented rule: in order, a TLV is written if it is not a CRC32C and still fits.
    var addressLength = 0
    if case .inet(let source, _) = header.addresses { addressLength = source.address.isIPv4 ? 12 : 36 }
    let room = 65_535 - (crc ? 7 : 0) - addressLength
    var expected: [ProxyTLV] = []
    var used = 0
    for tlv in tlvs where tlv.type != ProxyTLVType.crc32c.rawValue && used + 3 + tlv.value.count <= room {
        expected.append(tlv)
        used += 3 + tlv.value.count
    }
    var written = header.tlvs
    if crc {
        precondition(written.last?.type == ProxyTLVType.crc32c.rawValue, "CRC32C TLV missing")
        written.removeLast()
    }
    precondition(written == expected, "v2 TLVs: wrote \(written.map(\.type)), expected \(expected.map(\.type))")
}
