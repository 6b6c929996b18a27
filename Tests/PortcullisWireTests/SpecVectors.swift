import PortcullisCore
import PortcullisWire
import Testing

// Golden vectors written by hand from the PROXY protocol specification (HAProxy's
// doc/proxy-protocol.txt, revision 2026/04/27; summarised in anchors.md §2), not produced by
// ProxyHeaderEncoder. CRC32C values were computed independently (bitwise CRC-32C in Python).
// Tests/Fuzz/make-seed-corpus.py writes the same vectors as the fuzzer's seed corpus.

/// Bytes from hex text; spaces and newlines are ignored.
func hex(_ text: String) -> [UInt8] {
    let digits = text.utf8.filter { $0 != UInt8(ascii: " ") && $0 != UInt8(ascii: "\n") }
    precondition(digits.count % 2 == 0, "odd hex string: \(text)")
    return stride(from: 0, to: digits.count, by: 2).map { i in
        UInt8(String(decoding: digits[i..<(i + 2)], as: UTF8.self), radix: 16)!
    }
}

func ascii(_ text: String) -> [UInt8] { Array(text.utf8) }

/// An AF_UNIX path as the v2 address block carries it: 108 bytes, NUL-padded.
func unixPath(_ path: String) -> [UInt8] {
    var bytes = ascii(path)
    bytes += [UInt8](repeating: 0, count: 108 - bytes.count)
    return bytes
}

func endpoint(_ address: String, _ port: UInt16) -> SocketEndpoint {
    SocketEndpoint(address: IPAddress(address)!, port: port)
}

/// The v2 signature, `\r\n\r\n\0\r\nQUIT\n`.
let signature = "0D0A0D0A 000D0A51 5549540A"

/// A header the specification says is valid; `bytes` is exactly the header.
struct ValidVector: Sendable, CustomTestStringConvertible {
    let name: String
    let bytes: [UInt8]
    let header: ProxyHeader
    var testDescription: String { name }
}

/// Bytes the specification says can never become a valid header.
struct InvalidVector: Sendable, CustomTestStringConvertible {
    let name: String
    let bytes: [UInt8]
    let error: ProxyHeaderError
    var testDescription: String { name }
}

/// Same error, ignoring the human-readable reason of `v1Malformed`.
func sameKind(_ a: ProxyHeaderError, _ b: ProxyHeaderError) -> Bool {
    if case .v1Malformed = a, case .v1Malformed = b { return true }
    return a == b
}

/// The error decode throws, or nil when it returns.
func decodeError(_ bytes: [UInt8]) -> ProxyHeaderError? {
    do {
        _ = try ProxyHeaderDecoder.decode(bytes)
        return nil
    } catch {
        return error
    }
}

private func inet(_ s: SocketEndpoint, _ d: SocketEndpoint) -> ProxyHeader.Addresses {
    .inet(source: s, destination: d)
}

private let ffff8 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
/// 192.168.0.1:56324 -> 192.168.0.11:443, the address block of most v2 vectors.
let tcp4Block = "C0A80001 C0A8000B DC04 01BB"
let tcp4Addresses = ProxyHeader.Addresses.inet(source: endpoint("192.168.0.1", 56324),
                                               destination: endpoint("192.168.0.11", 443))
/// 2001:db8::1:51234 -> 2001:db8::2:443.
let tcp6Block = "20010DB8 00000000 00000000 00000001  20010DB8 00000000 00000000 00000002  C822 01BB"
let tcp6Addresses = ProxyHeader.Addresses.inet(source: endpoint("2001:db8::1", 51234),
                                               destination: endpoint("2001:db8::2", 443))

/// `PROXY UNKNOWN` followed by filler so that the whole input is `count` bytes.
func v1Filler(count: Int, ending: String = "") -> [UInt8] {
    let head = ascii("PROXY UNKNOWN ")
    let tail = ascii(ending)
    return head + [UInt8](repeating: UInt8(ascii: "a"), count: count - head.count - tail.count) + tail
}

enum SpecVectors {
    static let valid: [ValidVector] = v1Valid + v2Valid

    static let v1Valid: [ValidVector] = [
        ValidVector(name: "v1-tcp4", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
                    header: ProxyHeader(version: .v1, addresses: tcp4Addresses)),
        // The longest TCP4 line: 56 bytes.
        ValidVector(name: "v1-tcp4-longest",
                    bytes: ascii("PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"),
                    header: ProxyHeader(version: .v1, addresses: inet(endpoint("255.255.255.255", 65535),
                                                                       endpoint("255.255.255.255", 65535)))),
        ValidVector(name: "v1-tcp4-port-zero", bytes: ascii("PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n"),
                    header: ProxyHeader(version: .v1, addresses: inet(endpoint("0.0.0.0", 0), endpoint("10.0.0.1", 0)))),
        ValidVector(name: "v1-tcp6", bytes: ascii("PROXY TCP6 2001:db8::1 2001:db8::2 51234 443\r\n"),
                    header: ProxyHeader(version: .v1, addresses: tcp6Addresses)),
        // The longest TCP6 line: 104 bytes.
        ValidVector(name: "v1-tcp6-longest", bytes: ascii("PROXY TCP6 \(ffff8) \(ffff8) 65535 65535\r\n"),
                    header: ProxyHeader(version: .v1, addresses: inet(endpoint(ffff8, 65535), endpoint(ffff8, 65535)))),
        ValidVector(name: "v1-tcp6-ipv4-mapped", bytes: ascii("PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n"),
                    header: ProxyHeader(version: .v1, addresses: inet(SocketEndpoint(address: .v6(0xFFFF_0A00_0001), port: 1),
                                                                       SocketEndpoint(address: .v6(1), port: 2)))),
        // The short UNKNOWN form: 15 bytes.
        ValidVector(name: "v1-unknown", bytes: ascii("PROXY UNKNOWN\r\n"),
                    header: ProxyHeader(version: .v1, addresses: .unspecified)),
        ValidVector(name: "v1-unknown-with-addresses", bytes: ascii("PROXY UNKNOWN 10.0.0.1 10.0.0.2 1234 80\r\n"),
                    header: ProxyHeader(version: .v1, addresses: .unspecified)),
        // The worst case the spec sizes buffers for: 107 bytes including CRLF.
        ValidVector(name: "v1-unknown-worst-case-107",
                    bytes: ascii("PROXY UNKNOWN \(ffff8) \(ffff8) 65535 65535\r\n"),
                    header: ProxyHeader(version: .v1, addresses: .unspecified)),
        // Anything at all may follow UNKNOWN; the CRLF may end at byte 107.
        ValidVector(name: "v1-unknown-filler-107", bytes: v1Filler(count: 107, ending: "\r\n"),
                    header: ProxyHeader(version: .v1, addresses: .unspecified)),
    ]

    static let v2Valid: [ValidVector] = [
        // LOCAL: len 0, family ignored.
        ValidVector(name: "v2-local", bytes: hex("\(signature) 20 00 0000"),
                    header: ProxyHeader(version: .v2, command: .local, transport: .unspecified, addresses: .unspecified)),
        // LOCAL with an address block: it must be skipped (len is always honoured).
        ValidVector(name: "v2-local-with-tcp4-block", bytes: hex("\(signature) 20 11 000C \(tcp4Block)"),
                    header: ProxyHeader(version: .v2, command: .local, transport: .stream, addresses: .unspecified)),
        // LOCAL with a block that would be a TLV overrun: skipped, never parsed.
        ValidVector(name: "v2-local-with-garbage-block", bytes: hex("\(signature) 20 00 0005 FFFFFFFFFF"),
                    header: ProxyHeader(version: .v2, command: .local, transport: .unspecified, addresses: .unspecified)),
        // LOCAL with a family/transport byte that would be invalid for PROXY: ignored too.
        ValidVector(name: "v2-local-transport-3", bytes: hex("\(signature) 20 03 0000"),
                    header: ProxyHeader(version: .v2, command: .local, transport: .unspecified, addresses: .unspecified)),
        ValidVector(name: "v2-tcp4", bytes: hex("\(signature) 21 11 000C \(tcp4Block)"),
                    header: ProxyHeader(version: .v2, transport: .stream, addresses: tcp4Addresses)),
        ValidVector(name: "v2-udp4", bytes: hex("\(signature) 21 12 000C 0A000001 0A000002 3039 0035"),
                    header: ProxyHeader(version: .v2, transport: .datagram,
                                        addresses: inet(endpoint("10.0.0.1", 12345), endpoint("10.0.0.2", 53)))),
        ValidVector(name: "v2-tcp6", bytes: hex("\(signature) 21 21 0024 \(tcp6Block)"),
                    header: ProxyHeader(version: .v2, transport: .stream, addresses: tcp6Addresses)),
        ValidVector(name: "v2-udp6",
                    bytes: hex("\(signature) 21 22 0024 00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000002 04D2 14E9"),
                    header: ProxyHeader(version: .v2, transport: .datagram,
                                        addresses: inet(endpoint("::1", 1234), endpoint("::2", 5353)))),
        ValidVector(name: "v2-unix-stream",
                    bytes: hex("\(signature) 21 31 00D8") + unixPath("/var/run/client.sock") + unixPath("/var/run/server.sock"),
                    header: ProxyHeader(version: .v2, transport: .stream,
                                        addresses: .unix(source: unixPath("/var/run/client.sock"),
                                                         destination: unixPath("/var/run/server.sock")))),
        ValidVector(name: "v2-unix-dgram",
                    bytes: hex("\(signature) 21 32 00D8") + unixPath("/dev/log") + unixPath("/run/syslog"),
                    header: ProxyHeader(version: .v2, transport: .datagram,
                                        addresses: .unix(source: unixPath("/dev/log"), destination: unixPath("/run/syslog")))),
        // PROXY over AF_UNSPEC: no addresses; the receiver keeps the real ones.
        ValidVector(name: "v2-proxy-unspec", bytes: hex("\(signature) 21 00 0000"),
                    header: ProxyHeader(version: .v2, transport: .unspecified, addresses: .unspecified)),
        // AF_UNSPEC has no address block, so TLVs start right after the 16 fixed bytes.
        ValidVector(name: "v2-proxy-unspec-authority", bytes: hex("\(signature) 21 00 0007 02 0004 686F7374"),
                    header: ProxyHeader(version: .v2, transport: .unspecified, addresses: .unspecified,
                                        tlvBytes: hex("02 0004 686F7374"))),
        // ALPN "h2" and AUTHORITY "example.com": len = 12 + 5 + 14 = 31.
        ValidVector(name: "v2-tcp4-alpn-authority",
                    bytes: hex("\(signature) 21 11 001F \(tcp4Block) 01 0002 6832 02 000B 6578616D706C652E636F6D"),
                    header: ProxyHeader(version: .v2, addresses: tcp4Addresses,
                                        tlvBytes: hex("01 0002 6832 02 000B 6578616D706C652E636F6D"))),
        // AUTHORITY "example.com" and a 16-byte UNIQUE_ID (the benchmark's header): len = 12 + 14 + 19 = 45.
        ValidVector(name: "v2-tcp4-two-tlvs",
                    bytes: hex("\(signature) 21 11 002D \(tcp4Block) 02 000B 6578616D706C652E636F6D 05 0010 000102030405060708090A0B0C0D0E0F"),
                    header: ProxyHeader(version: .v2, addresses: tcp4Addresses,
                                        tlvBytes: hex("02 000B 6578616D706C652E636F6D 05 0010 000102030405060708090A0B0C0D0E0F"))),
        // NOOP: an empty one and three bytes of padding: len = 12 + 3 + 6 = 21.
        ValidVector(name: "v2-tcp4-noop", bytes: hex("\(signature) 21 11 0015 \(tcp4Block) 04 0000 04 0003 000000"),
                    header: ProxyHeader(version: .v2, addresses: tcp4Addresses, tlvBytes: hex("04 0000 04 0003 000000"))),
        // SSL: client = SSL|CERT_CONN|CERT_SESS, verify = 0, then VERSION, CN and CIPHER sub-TLVs.
        // SSL value = 5 + 10 + 11 + 25 = 51 bytes; len = 36 + 3 + 51 = 90.
        ValidVector(name: "v2-tcp6-ssl",
                    bytes: hex("\(signature) 21 21 005A \(tcp6Block) \(sslTLV)"),
                    header: ProxyHeader(version: .v2, addresses: tcp6Addresses, tlvBytes: hex(sslTLV))),
        // NETNS "blue": len = 12 + 7 = 19.
        ValidVector(name: "v2-tcp4-netns", bytes: hex("\(signature) 21 11 0013 \(tcp4Block) 30 0004 626C7565"),
                    header: ProxyHeader(version: .v2, addresses: tcp4Addresses, tlvBytes: hex("30 0004 626C7565"))),
        // Custom types 0xE0-0xEF, one of them empty: len = 12 + 5 + 3 + 4 = 24.
        ValidVector(name: "v2-tcp4-custom-tlvs", bytes: hex("\(signature) 21 11 0018 \(tcp4Block) E0 0002 ABCD EF 0000 E7 0001 FF"),
                    header: ProxyHeader(version: .v2, addresses: tcp4Addresses, tlvBytes: hex("E0 0002 ABCD EF 0000 E7 0001 FF"))),
        // CRC32C over the whole header with the CRC field zeroed: len = 12 + 7 = 19.
        ValidVector(name: "v2-tcp4-crc32c", bytes: hex("\(signature) 21 11 0013 \(tcp4Block) 03 0004 1C1AE9C6"),
                    header: ProxyHeader(version: .v2, addresses: tcp4Addresses, tlvBytes: hex("03 0004 1C1AE9C6"))),
        // The CRC32C TLV need not be last: len = 36 + 7 + 14 = 57.
        ValidVector(name: "v2-tcp6-crc32c-then-authority",
                    bytes: hex("\(signature) 21 21 0039 \(tcp6Block) 03 0004 A76572ED 02 000B 6578616D706C652E636F6D"),
                    header: ProxyHeader(version: .v2, addresses: tcp6Addresses,
                                        tlvBytes: hex("03 0004 A76572ED 02 000B 6578616D706C652E636F6D"))),
    ]

    /// client 0x07, verify 0; VERSION "TLSv1.3", CN "client-1", CIPHER "TLS_AES_128_GCM_SHA256".
    static let sslTLV = "20 0033 07 00000000 21 0007 544C5376312E33 22 0008 636C69656E742D31 "
        + "23 0016 544C535F4145535F3132385F47434D5F534841323536"

    static let invalid: [InvalidVector] = [
        // Signatures and detection.
        InvalidVector(name: "bad-v2-signature", bytes: hex("0D0A0D0A 000D0A51 5549540B 21 11 000C \(tcp4Block)"),
                      error: .notProxyProtocol),
        InvalidVector(name: "bad-http-request", bytes: ascii("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), error: .notProxyProtocol),
        InvalidVector(name: "bad-v1-lowercase-proxy", bytes: ascii("proxy TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
                      error: .notProxyProtocol),
        InvalidVector(name: "bad-v1-proxy-crlf", bytes: ascii("PROXY\r\n"), error: .notProxyProtocol),
        // v2 fixed fields.
        InvalidVector(name: "bad-v2-version-0", bytes: hex("\(signature) 01 11 000C \(tcp4Block)"), error: .v2BadVersion(0)),
        InvalidVector(name: "bad-v2-version-1", bytes: hex("\(signature) 11 11 000C \(tcp4Block)"), error: .v2BadVersion(1)),
        InvalidVector(name: "bad-v2-version-3", bytes: hex("\(signature) 31 11 000C \(tcp4Block)"), error: .v2BadVersion(3)),
        InvalidVector(name: "bad-v2-version-f", bytes: hex("\(signature) F1 11 000C \(tcp4Block)"), error: .v2BadVersion(15)),
    ] + (0x2...0xF).map { (command: UInt8) in
        InvalidVector(name: "bad-v2-command-\(String(command, radix: 16))",
                      bytes: hex("\(signature)") + [0x20 | command] + hex("11 000C \(tcp4Block)"), error: .v2BadCommand(command))
    } + [
        InvalidVector(name: "bad-v2-family-4", bytes: hex("\(signature) 21 41 000C \(tcp4Block)"), error: .v2BadFamily(0x41)),
        InvalidVector(name: "bad-v2-family-f", bytes: hex("\(signature) 21 F1 000C \(tcp4Block)"), error: .v2BadFamily(0xF1)),
        InvalidVector(name: "bad-v2-transport-3", bytes: hex("\(signature) 21 13 000C \(tcp4Block)"), error: .v2BadFamily(0x13)),
        InvalidVector(name: "bad-v2-transport-f", bytes: hex("\(signature) 21 1F 000C \(tcp4Block)"), error: .v2BadFamily(0x1F)),
        InvalidVector(name: "bad-v2-two-crc32c", bytes: hex("\(signature) 21 11 001A 7f000001 7f000002 0001 0002 03 0004 00000000 03 0004 00000000"), error: .v2DuplicateCRC32C),
        // Address blocks shorter than the family needs.
        InvalidVector(name: "bad-v2-tcp4-block-11", bytes: hex("\(signature) 21 11 000B C0A80001 C0A8000B DC04 01"),
                      error: .v2AddressesTooShort(family: 0x11, length: 11)),
        InvalidVector(name: "bad-v2-tcp4-block-0", bytes: hex("\(signature) 21 11 0000"),
                      error: .v2AddressesTooShort(family: 0x11, length: 0)),
        InvalidVector(name: "bad-v2-tcp6-with-tcp4-block", bytes: hex("\(signature) 21 21 000C \(tcp4Block)"),
                      error: .v2AddressesTooShort(family: 0x21, length: 12)),
        InvalidVector(name: "bad-v2-unix-with-tcp6-block", bytes: hex("\(signature) 21 31 0024 \(tcp6Block)"),
                      error: .v2AddressesTooShort(family: 0x31, length: 36)),
        // TLVs.
        InvalidVector(name: "bad-v2-tlv-overrun", bytes: hex("\(signature) 21 11 0011 \(tcp4Block) 02 0005 6162"),
                      error: .v2TLVOverrun),
        InvalidVector(name: "bad-v2-tlv-header-cut", bytes: hex("\(signature) 21 11 000E \(tcp4Block) 01 00"),
                      error: .v2TLVOverrun),
        InvalidVector(name: "bad-v2-unspec-tlv-overrun", bytes: hex("\(signature) 21 00 0004 02 FFFF 61"),
                      error: .v2TLVOverrun),
        InvalidVector(name: "bad-v2-crc32c-length-3", bytes: hex("\(signature) 21 11 0012 \(tcp4Block) 03 0003 1C1AE9"),
                      error: .v2BadCRC32CLength(3)),
        InvalidVector(name: "bad-v2-crc32c-length-5", bytes: hex("\(signature) 21 11 0014 \(tcp4Block) 03 0005 1C1AE9C600"),
                      error: .v2BadCRC32CLength(5)),
        InvalidVector(name: "bad-v2-crc32c-length-0", bytes: hex("\(signature) 21 11 000F \(tcp4Block) 03 0000"),
                      error: .v2BadCRC32CLength(0)),
        InvalidVector(name: "bad-v2-crc32c-mismatch", bytes: hex("\(signature) 21 11 0013 \(tcp4Block) 03 0004 1C1AE9C7"),
                      error: .v2CRC32CMismatch(expected: 0x1C1A_E9C7, computed: 0x1C1A_E9C6)),
        // The source address changed to 192.168.0.2 after the CRC was computed.
        InvalidVector(name: "bad-v2-crc32c-address-changed",
                      bytes: hex("\(signature) 21 11 0013 C0A80002 C0A8000B DC04 01BB 03 0004 1C1AE9C6"),
                      error: .v2CRC32CMismatch(expected: 0x1C1A_E9C6, computed: 0x0FE2_8935)),
        // v1 syntax: exactly one space between fields.
        InvalidVector(name: "bad-v1-double-space-after-proxy", bytes: ascii("PROXY  TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-double-space-after-tcp4", bytes: ascii("PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-double-space-between-ports", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324  443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-trailing-space", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-tab-separator", bytes: ascii("PROXY TCP4\t192.168.0.1 192.168.0.11 56324 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-missing-port", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-extra-field", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 1\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-empty-protocol", bytes: ascii("PROXY \r\n"), error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-udp4", bytes: ascii("PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-lowercase-tcp4", bytes: ascii("PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-unknownx", bytes: ascii("PROXY UNKNOWNX\r\n"), error: .v1Malformed("")),
        // v1 numbers: no leading zeros, ports 0-65535.
        InvalidVector(name: "bad-v1-leading-zero-octet", bytes: ascii("PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-leading-zero-first-octet", bytes: ascii("PROXY TCP4 192.168.0.1 010.0.0.1 56324 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-leading-zero-port", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324 0443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-double-zero-port", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 00 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-port-65536", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-port-99999", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324 99999\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-port-six-digits", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 100000 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-port-signed", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 +1 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-octet-256", bytes: ascii("PROXY TCP4 192.168.0.256 192.168.0.11 56324 443\r\n"),
                      error: .v1Malformed("")),
        // v1 families.
        InvalidVector(name: "bad-v1-tcp4-with-ipv6", bytes: ascii("PROXY TCP4 2001:db8::1 2001:db8::2 51234 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-tcp4-with-ipv4-mapped", bytes: ascii("PROXY TCP4 ::ffff:10.0.0.1 ::ffff:10.0.0.2 1 2\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-tcp6-with-ipv4", bytes: ascii("PROXY TCP6 192.168.0.1 192.168.0.11 56324 443\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-tcp6-two-double-colons", bytes: ascii("PROXY TCP6 2001::db8::1 ::2 1 2\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-tcp6-brackets", bytes: ascii("PROXY TCP6 [::1] [::2] 1 2\r\n"), error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-tcp6-zone", bytes: ascii("PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n"), error: .v1Malformed("")),
        // v1 line ends: only CRLF ends the line, and it must end within 107 bytes.
        InvalidVector(name: "bad-v1-lone-cr", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rX"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-lone-lf", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-cr-cr-lf", bytes: ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\r\n"),
                      error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-lf-before-crlf", bytes: ascii("PROXY UNKNOWN\nX\r\n"), error: .v1Malformed("")),
        InvalidVector(name: "bad-v1-no-crlf-in-107", bytes: v1Filler(count: 107), error: .v1TooLong),
        InvalidVector(name: "bad-v1-cr-at-byte-107", bytes: v1Filler(count: 107, ending: "\r"), error: .v1TooLong),
        InvalidVector(name: "bad-v1-crlf-ends-at-108", bytes: v1Filler(count: 108, ending: "\r\n"), error: .v1TooLong),
    ]
}
