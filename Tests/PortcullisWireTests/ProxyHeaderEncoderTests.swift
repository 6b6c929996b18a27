import PortcullisCore
import PortcullisWire
import Testing

/// The encoder's output checked against the specification's bytes, then fed back to the decoder.
@Suite struct ProxyHeaderEncoderGoldenTests {
    func vector(_ name: String) -> [UInt8] { SpecVectors.valid.first { $0.name == name }!.bytes }

    @Test func v1TCP4() {
        #expect(ProxyHeaderEncoder.v1(source: endpoint("192.168.0.1", 56324), destination: endpoint("192.168.0.11", 443))
            == vector("v1-tcp4"))
        #expect(ProxyHeaderEncoder.v1(source: endpoint("255.255.255.255", 65535), destination: endpoint("255.255.255.255", 65535))
            == vector("v1-tcp4-longest"))
    }

    /// A unix-domain end has no address a header can carry: UNKNOWN (v1) and AF_UNSPEC (v2),
    /// as nginx sends for a unix client and HAProxy for mixed families.
    @Test func unixEndsAreUnknown() {
        let unix = SocketEndpoint(unixPath: "/run/gw.sock")
        #expect(ProxyHeaderEncoder.v1(source: SocketEndpoint(unixPath: ""), destination: unix) == Array("PROXY UNKNOWN\r\n".utf8))
        #expect(ProxyHeaderEncoder.v1(source: endpoint("192.0.2.1", 1111), destination: unix) == Array("PROXY UNKNOWN\r\n".utf8))
        let v2 = ProxyHeaderEncoder.v2(source: endpoint("192.0.2.1", 1111), destination: unix)
        #expect(v2.count == 16 && v2[12] == 0x21 && v2[13] == 0x00, "\(v2)")
    }

    @Test func v1TCP6() {
        #expect(ProxyHeaderEncoder.v1(source: endpoint("2001:db8::1", 51234), destination: endpoint("2001:db8::2", 443))
            == vector("v1-tcp6"))
        let all = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        #expect(ProxyHeaderEncoder.v1(source: endpoint(all, 65535), destination: endpoint(all, 65535)) == vector("v1-tcp6-longest"))
    }

    @Test func v1Unknown() {
        #expect(ProxyHeaderEncoder.v1(source: nil, destination: nil) == vector("v1-unknown"))
        #expect(ProxyHeaderEncoder.v1(source: endpoint("10.0.0.1", 1), destination: nil) == vector("v1-unknown"))
        #expect(ProxyHeaderEncoder.v1(source: nil, destination: endpoint("10.0.0.1", 1)) == vector("v1-unknown"))
    }

    @Test func v2TCP4AndTCP6() {
        #expect(ProxyHeaderEncoder.v2(source: endpoint("192.168.0.1", 56324), destination: endpoint("192.168.0.11", 443))
            == vector("v2-tcp4"))
        #expect(ProxyHeaderEncoder.v2(source: endpoint("2001:db8::1", 51234), destination: endpoint("2001:db8::2", 443))
            == vector("v2-tcp6"))
    }

    @Test func v2Datagram() {
        #expect(ProxyHeaderEncoder.v2(source: endpoint("10.0.0.1", 12345), destination: endpoint("10.0.0.2", 53),
                                      transport: .datagram) == vector("v2-udp4"))
        #expect(ProxyHeaderEncoder.v2(source: endpoint("::1", 1234), destination: endpoint("::2", 5353),
                                      transport: .datagram) == vector("v2-udp6"))
    }

    @Test func v2LocalAndUnspec() {
        #expect(ProxyHeaderEncoder.v2(source: nil, destination: nil, command: .local) == vector("v2-local"))
        // LOCAL never describes a client, even when endpoints are given.
        #expect(ProxyHeaderEncoder.v2(source: endpoint("10.0.0.1", 1), destination: endpoint("10.0.0.2", 2), command: .local)
            == vector("v2-local"))
        #expect(ProxyHeaderEncoder.v2(source: nil, destination: nil) == vector("v2-proxy-unspec"))
        #expect(ProxyHeaderEncoder.v2(source: nil, destination: nil, tlvs: [ProxyTLV(.authority, ascii("host"))])
            == vector("v2-proxy-unspec-authority"))
    }

    @Test func v2TLVs() {
        let tcp4 = (endpoint("192.168.0.1", 56324), endpoint("192.168.0.11", 443))
        #expect(ProxyHeaderEncoder.v2(source: tcp4.0, destination: tcp4.1,
                                      tlvs: [ProxyTLV(.alpn, ascii("h2")), ProxyTLV(.authority, ascii("example.com"))])
            == vector("v2-tcp4-alpn-authority"))
        #expect(ProxyHeaderEncoder.v2(source: tcp4.0, destination: tcp4.1,
                                      tlvs: [ProxyTLV(.authority, ascii("example.com")), ProxyTLV(.uniqueID, Array(0...15))])
            == vector("v2-tcp4-two-tlvs"))
        #expect(ProxyHeaderEncoder.v2(source: tcp4.0, destination: tcp4.1, tlvs: [ProxyTLV(.netns, ascii("blue"))])
            == vector("v2-tcp4-netns"))
        #expect(ProxyHeaderEncoder.v2(source: tcp4.0, destination: tcp4.1,
                                      tlvs: [ProxyTLV(type: 0xE0, value: [0xAB, 0xCD]), ProxyTLV(type: 0xEF, value: []),
                                             ProxyTLV(type: 0xE7, value: [0xFF])])
            == vector("v2-tcp4-custom-tlvs"))
        let ssl = hex(SpecVectors.sslTLV)
        #expect(ProxyHeaderEncoder.v2(source: endpoint("2001:db8::1", 51234), destination: endpoint("2001:db8::2", 443),
                                      tlvs: [ProxyTLV(type: ssl[0], value: Array(ssl[3...]))])
            == vector("v2-tcp6-ssl"))
    }

    /// The CRC32C the encoder fills in equals the one computed independently for the spec vector.
    @Test func v2CRC32CMatchesIndependentComputation() {
        #expect(ProxyHeaderEncoder.v2(source: endpoint("192.168.0.1", 56324), destination: endpoint("192.168.0.11", 443),
                                      crc32c: true) == vector("v2-tcp4-crc32c"))
    }
}

@Suite struct ProxyHeaderRoundTripTests {
    static let v4a = endpoint("203.0.113.7", 40000)
    static let v4b = endpoint("198.51.100.1", 443)
    static let v6a = endpoint("2001:db8:1::7", 40000)
    static let v6b = endpoint("2001:db8:2::1", 8443)
    static let mappedA = endpoint("::ffff:203.0.113.7", 40000)
    static let mappedB = endpoint("::ffff:198.51.100.1", 443)

    func decodeAll(_ bytes: [UInt8]) throws -> ProxyHeader {
        let decoded = try #require(try ProxyHeaderDecoder.decode(bytes + ascii("payload")))
        #expect(decoded.length == bytes.count)
        return decoded.header
    }

    @Test func v1IPv4() throws {
        let header = try decodeAll(ProxyHeaderEncoder.v1(source: Self.v4a, destination: Self.v4b))
        #expect(header == ProxyHeader(version: .v1, addresses: .inet(source: Self.v4a, destination: Self.v4b)))
    }

    @Test func v1IPv6() throws {
        let bytes = ProxyHeaderEncoder.v1(source: Self.v6a, destination: Self.v6b)
        #expect(bytes == ascii("PROXY TCP6 2001:db8:1::7 2001:db8:2::1 40000 8443\r\n"))
        #expect(try decodeAll(bytes) == ProxyHeader(version: .v1, addresses: .inet(source: Self.v6a, destination: Self.v6b)))
    }

    /// Mixed families: TCP6, with the IPv4 side IPv4-mapped.
    @Test func v1Mixed() throws {
        let bytes = ProxyHeaderEncoder.v1(source: Self.v4a, destination: Self.v6b)
        #expect(bytes == ascii("PROXY TCP6 ::ffff:203.0.113.7 2001:db8:2::1 40000 8443\r\n"))
        #expect(try decodeAll(bytes) == ProxyHeader(version: .v1, addresses: .inet(source: Self.mappedA, destination: Self.v6b)))
        let reversed = ProxyHeaderEncoder.v1(source: Self.v6a, destination: Self.v4b)
        #expect(try decodeAll(reversed) == ProxyHeader(version: .v1, addresses: .inet(source: Self.v6a, destination: Self.mappedB)))
    }

    /// Two IPv4-mapped addresses are sent as TCP4.
    @Test func v1BothMapped() throws {
        let bytes = ProxyHeaderEncoder.v1(source: Self.mappedA, destination: Self.mappedB)
        #expect(bytes == ascii("PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\n"))
        #expect(try decodeAll(bytes) == ProxyHeader(version: .v1, addresses: .inet(source: Self.v4a, destination: Self.v4b)))
    }

    @Test func v1Unknown() throws {
        #expect(try decodeAll(ProxyHeaderEncoder.v1(source: nil, destination: Self.v4b)).addresses == .unspecified)
    }

    @Test func v2IPv4() throws {
        let bytes = ProxyHeaderEncoder.v2(source: Self.v4a, destination: Self.v4b)
        #expect(bytes[13] == 0x11)
        #expect(try decodeAll(bytes) == ProxyHeader(version: .v2, addresses: .inet(source: Self.v4a, destination: Self.v4b)))
    }

    @Test func v2IPv6Datagram() throws {
        let bytes = ProxyHeaderEncoder.v2(source: Self.v6a, destination: Self.v6b, transport: .datagram)
        #expect(bytes[13] == 0x22)
        #expect(try decodeAll(bytes)
            == ProxyHeader(version: .v2, transport: .datagram, addresses: .inet(source: Self.v6a, destination: Self.v6b)))
    }

    /// Mixed families: AF_INET6 with the IPv4 side IPv4-mapped.
    @Test func v2Mixed() throws {
        let bytes = ProxyHeaderEncoder.v2(source: Self.v4a, destination: Self.v6b)
        #expect(bytes[13] == 0x21)
        #expect(Array(bytes[16..<32]) == hex("00000000 00000000 0000FFFF CB007107"))
        #expect(try decodeAll(bytes) == ProxyHeader(version: .v2, addresses: .inet(source: Self.mappedA, destination: Self.v6b)))
        let reversed = ProxyHeaderEncoder.v2(source: Self.v6a, destination: Self.v4b)
        #expect(try decodeAll(reversed) == ProxyHeader(version: .v2, addresses: .inet(source: Self.v6a, destination: Self.mappedB)))
    }

    /// Two IPv4-mapped addresses are sent as AF_INET.
    @Test func v2BothMapped() throws {
        let bytes = ProxyHeaderEncoder.v2(source: Self.mappedA, destination: Self.mappedB)
        #expect(bytes[13] == 0x11)
        #expect(bytes.count == 16 + 12)
        #expect(try decodeAll(bytes) == ProxyHeader(version: .v2, addresses: .inet(source: Self.v4a, destination: Self.v4b)))
    }

    /// An unknown endpoint gives AF_UNSPEC (v2) or UNKNOWN (v1).
    @Test func v2Unknown() throws {
        for (source, destination) in [(nil, Self.v4b), (Self.v4a, nil), (nil, nil)] as [(SocketEndpoint?, SocketEndpoint?)] {
            let bytes = ProxyHeaderEncoder.v2(source: source, destination: destination)
            #expect(bytes == hex("\(signature) 21 00 0000"))
            let header = try decodeAll(bytes)
            #expect(header.command == .proxy && header.addresses == .unspecified)
        }
    }

    @Test func v2Local() throws {
        let header = try decodeAll(ProxyHeaderEncoder.v2(source: Self.v4a, destination: Self.v4b, command: .local))
        #expect(header.command == .local && header.source == nil)
    }

    @Test func v2WithTLVs() throws {
        let tlvs = [
            ProxyTLV(.alpn, ascii("http/1.1")),
            ProxyTLV(.authority, ascii("www.example.org")),
            ProxyTLV(.uniqueID, Array(repeating: 0x5A, count: 128)),
            ProxyTLV(.noop, [0, 0, 0]),
            ProxyTLV(.netns, ascii("ns1")),
            ProxyTLV(type: 0xE5, value: Array(0...255)),
            ProxyTLV(.ssl, [0x01, 0, 0, 0, 0] + hex("21 0007 544C5376312E32")),
        ]
        let header = try decodeAll(ProxyHeaderEncoder.v2(source: Self.v6a, destination: Self.v6b, tlvs: tlvs))
        #expect(header.tlvs == tlvs)
        #expect(header.addresses == .inet(source: Self.v6a, destination: Self.v6b))
        let sslValue = try #require(header.tlv(ProxyTLVType.ssl.rawValue))
        let ssl = try #require(ProxySSLInfo(sslValue))
        #expect(ssl.subTLVs == [ProxyTLV(.sslVersion, ascii("TLSv1.2"))])
    }

    @Test func v2WithCRC32CVerifies() throws {
        let tlvs = [ProxyTLV(.authority, ascii("example.com")), ProxyTLV(.uniqueID, Array(0...15))]
        for (source, destination) in [(Self.v4a, Self.v4b), (Self.v6a, Self.v6b), (Self.v4a, Self.v6b)] {
            let bytes = ProxyHeaderEncoder.v2(source: source, destination: destination, tlvs: tlvs, crc32c: true)
            let header = try decodeAll(bytes)
            #expect(Array(header.tlvs.dropLast()) == tlvs)
            #expect(header.tlvs.last?.type == ProxyTLVType.crc32c.rawValue)
            #expect(header.tlvs.last?.value.count == 4)
            // Any change to what the CRC covers is caught.
            var tampered = bytes
            tampered[17] ^= 0x01
            guard case .v2CRC32CMismatch? = decodeError(tampered) else {
                Issue.record("tampered header accepted")
                continue
            }
        }
        // Also with nothing else to protect.
        let unspec = ProxyHeaderEncoder.v2(source: nil, destination: nil, crc32c: true)
        #expect(try decodeAll(unspec).tlvs.map(\.type) == [ProxyTLVType.crc32c.rawValue])
    }
}

/// `len` is 16 bits: TLVs that would not fit are left out instead of trapping.
@Suite struct ProxyHeaderEncoderLimitTests {
    static let source = endpoint("2001:db8::1", 1)
    static let destination = endpoint("2001:db8::2", 2)

    func decode(_ bytes: [UInt8]) throws -> ProxyHeader {
        let decoded = try #require(try ProxyHeaderDecoder.decode(bytes))
        #expect(decoded.length == bytes.count)
        return decoded.header
    }

    @Test func valueLongerThanALengthFieldIsLeftOut() throws {
        let tlvs = [ProxyTLV(.authority, ascii("a.example")), ProxyTLV(type: 0xE0, value: Array(repeating: 1, count: 70_000)),
                    ProxyTLV(.uniqueID, [9])]
        let header = try decode(ProxyHeaderEncoder.v2(source: Self.source, destination: Self.destination, tlvs: tlvs))
        #expect(header.tlvs == [tlvs[0], tlvs[2]])
    }

    @Test func tlvsThatOverflowTheHeaderAreLeftOutInOrder() throws {
        let big = ProxyTLV(type: 0xE1, value: Array(repeating: 2, count: 40_000))
        let small = ProxyTLV(.netns, ascii("blue"))
        let bytes = ProxyHeaderEncoder.v2(source: Self.source, destination: Self.destination, tlvs: [big, big, small])
        #expect(try decode(bytes).tlvs == [big, small])
    }

    /// Only `crc32c: true` writes a CRC32C TLV; one passed in could only be wrong.
    @Test func callerCRC32CTLVIsNotWritten() throws {
        let tlvs = [ProxyTLV(.crc32c, [1, 2, 3, 4]), ProxyTLV(.authority, ascii("a")), ProxyTLV(.crc32c, [1])]
        let plain = ProxyHeaderEncoder.v2(source: Self.source, destination: Self.destination, tlvs: tlvs)
        #expect(try decode(plain).tlvs == [ProxyTLV(.authority, ascii("a"))])
        let checked = ProxyHeaderEncoder.v2(source: Self.source, destination: Self.destination, tlvs: tlvs, crc32c: true)
        #expect(try decode(checked).tlvs.map(\.type) == [ProxyTLVType.authority.rawValue, ProxyTLVType.crc32c.rawValue])
    }

    @Test func exactlyFullHeader() throws {
        // 36 address bytes + 3 + 65,496 = 65,535, the most len can say.
        let fill = ProxyTLV(.noop, Array(repeating: 0, count: 65_496))
        let full = ProxyHeaderEncoder.v2(source: Self.source, destination: Self.destination, tlvs: [fill])
        #expect(full.count == 16 + 65_535)
        #expect(try decode(full).tlvs == [fill])
        // With a CRC32C to add, the same TLV no longer fits but the CRC still goes out.
        let withCRC = ProxyHeaderEncoder.v2(source: Self.source, destination: Self.destination, tlvs: [fill], crc32c: true)
        #expect(try decode(withCRC).tlvs.map(\.type) == [ProxyTLVType.crc32c.rawValue])
        let shorter = ProxyTLV(.noop, Array(repeating: 0, count: 65_496 - 7))
        let fullWithCRC = ProxyHeaderEncoder.v2(source: Self.source, destination: Self.destination, tlvs: [shorter], crc32c: true)
        #expect(fullWithCRC.count == 16 + 65_535)
        #expect(try decode(fullWithCRC).tlvs.map(\.type) == [ProxyTLVType.noop.rawValue, ProxyTLVType.crc32c.rawValue])
    }
}
