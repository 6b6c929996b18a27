import PortcullisCore
import PortcullisTestSupport
import PortcullisWire
import Testing

@Suite struct ProxyHeaderGoldenVectorTests {
    @Test(arguments: SpecVectors.valid)
    func decodesValidVector(_ vector: ValidVector) throws {
        let decoded = try #require(try ProxyHeaderDecoder.decode(vector.bytes))
        #expect(decoded.length == vector.bytes.count)
        #expect(decoded.header == vector.header)
    }

    @Test(arguments: SpecVectors.invalid)
    func rejectsInvalidVector(_ vector: InvalidVector) {
        let error = decodeError(vector.bytes)
        #expect(error.map { sameKind($0, vector.error) } == true, "got \(String(describing: error)), want \(vector.error)")
    }

    @Test func vectorNamesAreUnique() {
        let names = SpecVectors.valid.map(\.name) + SpecVectors.invalid.map(\.name)
        #expect(Set(names).count == names.count)
    }

    @Test func specifiedLineLengths() {
        func length(_ name: String) -> Int? { SpecVectors.valid.first { $0.name == name }?.bytes.count }
        #expect(length("v1-tcp4-longest") == 56)
        #expect(length("v1-tcp6-longest") == 104)
        #expect(length("v1-unknown") == 15)
        #expect(length("v1-unknown-worst-case-107") == 107)
        #expect(ProxyHeaderDecoder.v1MaximumLength == 107)
    }

    @Test func emptyInputNeedsMoreBytes() throws {
        #expect(try ProxyHeaderDecoder.decode([]) == nil)
    }

    @Test func rawBufferEntryPointAgreesWithArrayEntryPoint() throws {
        for vector in SpecVectors.valid {
            let viaRaw = try vector.bytes.withUnsafeBytes { raw throws(ProxyHeaderError) in try ProxyHeaderDecoder.decode(raw) }
            #expect(viaRaw?.header == vector.header)
            #expect(viaRaw?.length == vector.bytes.count)
        }
        for vector in SpecVectors.invalid {
            let error = vector.bytes.withUnsafeBytes { raw -> ProxyHeaderError? in
                do throws(ProxyHeaderError) {
                    _ = try ProxyHeaderDecoder.decode(raw)
                    return nil
                } catch {
                    return error
                }
            }
            #expect(error == decodeError(vector.bytes), "\(vector.name)")
        }
    }
}

/// Parse-or-rewind: a valid header arriving in pieces is "need more" until its last byte.
@Suite struct ProxyHeaderSplitPointTests {
    @Test(arguments: SpecVectors.valid)
    func everyPrefixNeedsMoreBytes(_ vector: ValidVector) throws {
        for cut in 0..<vector.bytes.count {
            let prefix = Array(vector.bytes[..<cut])
            do {
                let result = try ProxyHeaderDecoder.decode(prefix)
                #expect(result == nil, "\(vector.name): \(cut) of \(vector.bytes.count) bytes decoded")
            } catch {
                Issue.record("\(vector.name): \(cut) of \(vector.bytes.count) bytes threw \(error)")
            }
        }
        let whole = try #require(try ProxyHeaderDecoder.decode(vector.bytes))
        #expect(whole.length == vector.bytes.count)
    }

    /// The length returned excludes whatever follows the header: payload, or a second header.
    @Test(arguments: SpecVectors.valid)
    func lengthExcludesFollowingBytes(_ vector: ValidVector) throws {
        let followers: [[UInt8]] = [
            ascii("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"),
            [0x16, 0x03, 0x01, 0x02, 0x00, 0x01],  // a TLS ClientHello's first bytes
            [0x0D, 0x0A, 0x00, 0xFF],
            ascii("PROXY UNKNOWN\r\n"),
            hex("\(signature) 20 00 0000"),
            [UInt8](repeating: 0xAA, count: 300),
        ]
        for follower in followers {
            let decoded = try #require(try ProxyHeaderDecoder.decode(vector.bytes + follower))
            #expect(decoded.length == vector.bytes.count, "\(vector.name)")
            #expect(decoded.header == vector.header, "\(vector.name)")
        }
    }

    /// An invalid input is "need more" until the byte that makes it invalid, and stays refused
    /// with the same error however many bytes follow.
    @Test(arguments: SpecVectors.invalid)
    func invalidPrefixesNeedMoreThenFailTheSameWay(_ vector: InvalidVector) {
        var failedAt: Int?
        for cut in 0...vector.bytes.count {
            let prefix = Array(vector.bytes[..<cut])
            do {
                let result = try ProxyHeaderDecoder.decode(prefix)
                #expect(result == nil, "\(vector.name): \(cut) bytes decoded")
                #expect(failedAt == nil, "\(vector.name): refused at \(failedAt ?? -1) bytes, needs more at \(cut)")
            } catch {
                if failedAt == nil { failedAt = cut }
                #expect(sameKind(error, vector.error), "\(vector.name): \(cut) bytes threw \(error)")
            }
        }
        #expect(failedAt != nil)
        #expect(decodeError(vector.bytes + [UInt8](repeating: 0x0A, count: 200)).map { sameKind($0, vector.error) } == true)
    }
}

@Suite struct ProxyHeaderV1EdgeTests {
    @Test func exactly107BytesWithoutCRLFThrows() {
        #expect(decodeError(v1Filler(count: 107)) == .v1TooLong)
    }

    @Test func bytes106WithoutCRLFNeedsMore() throws {
        #expect(try ProxyHeaderDecoder.decode(v1Filler(count: 106)) == nil)
        // Also when byte 106 is the CR: its LF would still be byte 107.
        #expect(try ProxyHeaderDecoder.decode(v1Filler(count: 106, ending: "\r")) == nil)
    }

    @Test func crlfEndingAtByte107IsAccepted() throws {
        let decoded = try #require(try ProxyHeaderDecoder.decode(v1Filler(count: 107, ending: "\r\n") + ascii("tail")))
        #expect(decoded.length == 107)
    }

    @Test func crAsTheLastByteNeedsMore() throws {
        #expect(try ProxyHeaderDecoder.decode(ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r")) == nil)
    }

    @Test func loneCRAndLoneLFAreRefusedAtOnce() {
        #expect(decodeError(ascii("PROXY TCP4 192.168.0.1\r ")) != nil)
        #expect(decodeError(ascii("PROXY TCP4 192.168.0.1\n")) != nil)
    }

    @Test func unknownIgnoresTheRestOfTheLine() throws {
        for rest in ["", " ", " garbage \u{1} with  spaces", " ::1 ::2 99999 0"] {
            let decoded = try #require(try ProxyHeaderDecoder.decode(ascii("PROXY UNKNOWN\(rest)\r\n")))
            #expect(decoded.header.addresses == .unspecified)
            #expect(decoded.header.source == nil && decoded.header.destination == nil)
        }
    }

    @Test(arguments: ["0", "1", "80", "443", "9999", "65535"])
    func acceptsPorts(_ port: String) throws {
        let decoded = try #require(try ProxyHeaderDecoder.decode(ascii("PROXY TCP4 10.0.0.1 10.0.0.2 \(port) \(port)\r\n")))
        #expect(decoded.header.source?.port == UInt16(port))
        #expect(decoded.header.destination?.port == UInt16(port))
    }

    @Test func sourceAndDestinationAccessors() throws {
        let decoded = try #require(try ProxyHeaderDecoder.decode(ascii("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")))
        #expect(decoded.header.source == endpoint("192.168.0.1", 56324))
        #expect(decoded.header.destination == endpoint("192.168.0.11", 443))
        #expect(decoded.header.version == .v1)
        #expect(decoded.header.transport == .stream)
        #expect(decoded.header.tlvs.isEmpty)
    }
}

@Suite struct ProxyHeaderV2Tests {
    func decode(_ name: String) throws -> ProxyHeader {
        let vector = try #require(SpecVectors.valid.first { $0.name == name })
        return try #require(try ProxyHeaderDecoder.decode(vector.bytes)).header
    }

    @Test func localKeepsTheRealEndpoints() throws {
        for name in ["v2-local", "v2-local-with-tcp4-block", "v2-local-with-garbage-block"] {
            let header = try decode(name)
            #expect(header.command == .local)
            #expect(header.source == nil && header.destination == nil)
            #expect(header.tlvs.isEmpty)
        }
    }

    @Test func transports() throws {
        #expect(try decode("v2-tcp4").transport == .stream)
        #expect(try decode("v2-udp4").transport == .datagram)
        #expect(try decode("v2-tcp6").transport == .stream)
        #expect(try decode("v2-udp6").transport == .datagram)
        #expect(try decode("v2-unix-stream").transport == .stream)
        #expect(try decode("v2-unix-dgram").transport == .datagram)
        #expect(try decode("v2-proxy-unspec").transport == .unspecified)
    }

    @Test func unixAndUnspecHaveNoInetEndpoints() throws {
        for name in ["v2-unix-stream", "v2-unix-dgram", "v2-proxy-unspec"] {
            let header = try decode(name)
            #expect(header.command == .proxy)
            #expect(header.source == nil && header.destination == nil)
        }
    }

    @Test func alpnAndAuthority() throws {
        let header = try decode("v2-tcp4-alpn-authority")
        #expect(header.tlvs == [ProxyTLV(.alpn, ascii("h2")), ProxyTLV(.authority, ascii("example.com"))])
        #expect(header.tlv(ProxyTLVType.alpn.rawValue) == ascii("h2"))
        #expect(header.tlv(ProxyTLVType.authority.rawValue) == ascii("example.com"))
        #expect(header.tlv(ProxyTLVType.uniqueID.rawValue) == nil)
    }

    @Test func uniqueID() throws {
        let header = try decode("v2-tcp4-two-tlvs")
        #expect(header.tlv(ProxyTLVType.uniqueID.rawValue) == Array(0...15))
        #expect(header.tlvs.count == 2)
    }

    @Test func noopPadding() throws {
        #expect(try decode("v2-tcp4-noop").tlvs == [ProxyTLV(.noop, []), ProxyTLV(.noop, [0, 0, 0])])
    }

    @Test func netns() throws {
        #expect(try decode("v2-tcp4-netns").tlv(ProxyTLVType.netns.rawValue) == ascii("blue"))
    }

    @Test func customTypes() throws {
        let tlvs = try decode("v2-tcp4-custom-tlvs").tlvs
        #expect(tlvs == [ProxyTLV(type: 0xE0, value: [0xAB, 0xCD]), ProxyTLV(type: 0xEF, value: []),
                         ProxyTLV(type: 0xE7, value: [0xFF])])
        #expect(tlvs.allSatisfy { ProxyTLVType(rawValue: $0.type) == nil })
    }

    @Test func unspecCarriesTLVs() throws {
        #expect(try decode("v2-proxy-unspec-authority").tlvs == [ProxyTLV(.authority, ascii("host"))])
    }

    @Test func sslWithSubTLVs() throws {
        let header = try decode("v2-tcp6-ssl")
        let value = try #require(header.tlv(ProxyTLVType.ssl.rawValue))
        let ssl = try #require(ProxySSLInfo(value))
        #expect(ssl.client == 0x07)
        #expect(ssl.verify == 0)
        #expect(ssl.subTLVs == [
            ProxyTLV(.sslVersion, ascii("TLSv1.3")),
            ProxyTLV(.sslCN, ascii("client-1")),
            ProxyTLV(.sslCipher, ascii("TLS_AES_128_GCM_SHA256")),
        ])
        #expect(ssl.subTLVs.allSatisfy { ProxyTLVType(rawValue: $0.type)?.isSSLSubType == true })
    }

    @Test func sslInfoEdgeCases() {
        #expect(ProxySSLInfo([0x01, 0, 0, 0]) == nil)  // shorter than client + verify
        let bare = ProxySSLInfo([0x01, 0x00, 0x00, 0x01, 0x02])
        #expect(bare?.client == 0x01)
        #expect(bare?.verify == 0x102)
        #expect(bare?.subTLVs == [])
        #expect(ProxySSLInfo(hex("05 00000000 21 0009 544C53")) == nil)  // sub-TLV overrun
    }

    @Test func crc32cVerifies() throws {
        #expect(try decode("v2-tcp4-crc32c").tlv(ProxyTLVType.crc32c.rawValue) == hex("1C1AE9C6"))
        #expect(try decode("v2-tcp6-crc32c-then-authority").tlv(ProxyTLVType.authority.rawValue) == ascii("example.com"))
    }

    @Test func everyBitFlipBreaksTheCRC() throws {
        let vector = try #require(SpecVectors.valid.first { $0.name == "v2-tcp4-crc32c" })
        // Flip each bit of the address block and of the CRC itself (signature, version and
        // length flips are refused before the CRC is looked at, or change the framing).
        for byte in 16..<vector.bytes.count where !(28...30).contains(byte) {
            for bit in 0..<8 {
                var bytes = vector.bytes
                bytes[byte] ^= 1 << bit
                guard case .v2CRC32CMismatch? = decodeError(bytes) else {
                    Issue.record("flipping bit \(bit) of byte \(byte) was not caught")
                    continue
                }
            }
        }
    }

    @Test func tlvTypeNames() {
        for type in ProxyTLVType.allCases {
            #expect(ProxyTLVType(name: type.name) == type)
        }
        #expect(ProxyTLVType(name: "unique_id") == .uniqueID)
        #expect(ProxyTLVType(name: "nonsense") == nil)
        #expect(ProxyTLVType.sslCN.isSSLSubType)
        #expect(!ProxyTLVType.ssl.isSSLSubType)
        #expect(!ProxyTLVType.netns.isSSLSubType)
    }

    @Test func errorsDescribeThemselves() {
        for vector in SpecVectors.invalid {
            #expect(!vector.error.description.isEmpty)
        }
        #expect(ProxyHeaderError.v2BadFamily(0x41).description.contains("0x41"))
    }
}

/// Mutated valid headers: the decoder never crashes, and whatever it accepts is consistent.
@Suite struct ProxyHeaderMutationTests {
    static let seeds: [[UInt8]] = SpecVectors.valid.map(\.bytes)

    static func mutate(_ input: [UInt8], using rng: inout SplitMix64) -> [UInt8] {
        var bytes = input
        for _ in 0..<Int.random(in: 1...4, using: &rng) {
            switch Int.random(in: 0..<7, using: &rng) {
            case 0, 1:  // flip a byte
                if !bytes.isEmpty { bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng) }
            case 2:  // flip one bit
                if !bytes.isEmpty { bytes[Int.random(in: 0..<bytes.count, using: &rng)] ^= 1 << UInt8.random(in: 0..<8, using: &rng) }
            case 3:  // truncate
                bytes.removeLast(Int.random(in: 0...bytes.count, using: &rng))
            case 4:  // extend with random bytes
                bytes += (0..<Int.random(in: 1...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            case 5:  // insert or delete one byte in the middle
                let at = Int.random(in: 0...bytes.count, using: &rng)
                if Bool.random(using: &rng) || at == bytes.count {
                    bytes.insert(UInt8.random(in: 0...255, using: &rng), at: at)
                } else {
                    bytes.remove(at: at)
                }
            default:  // rewrite a v2 length field or a v1 character with an interesting value
                if bytes.count >= 16 && bytes[0] == 0x0D {
                    let length = [0, 1, 11, 12, 35, 36, 215, 216, bytes.count - 16, 0xFFFF].randomElement(using: &rng)!
                    bytes[14] = UInt8(truncatingIfNeeded: length >> 8)
                    bytes[15] = UInt8(truncatingIfNeeded: length)
                } else if !bytes.isEmpty {
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] = ascii(" \r\n0:.9fPROXY").randomElement(using: &rng)!
                }
            }
        }
        return bytes
    }

    @Test func mutatedHeadersNeverCrashTheDecoder() throws {
        var rng = SplitMix64(seed: 0x5052_4F58_5956_32)
        var outcomes = (needMore: 0, refused: 0, decoded: 0)
        for round in 0..<20_000 {
            let seed = Self.seeds[round % Self.seeds.count]
            let input = Self.mutate(seed, using: &rng)
            let result: (header: ProxyHeader, length: Int)?
            do {
                result = try ProxyHeaderDecoder.decode(input)
            } catch {
                outcomes.refused += 1
                continue
            }
            guard let (header, length) = result else {
                outcomes.needMore += 1
                continue
            }
            outcomes.decoded += 1
            #expect(length > 0 && length <= input.count, "length \(length) for \(input.count) bytes: \(input)")
            // The header alone decodes to the same thing, and a byte less is "need more".
            let exact = try ProxyHeaderDecoder.decode(Array(input[..<length]))
            #expect(exact?.header == header && exact?.length == length, "\(input)")
            #expect(try ProxyHeaderDecoder.decode(Array(input[..<(length - 1)])) == nil, "\(input)")
            _ = header.tlvs
        }
        // The mutator must exercise all three outcomes, or the test proves little.
        #expect(outcomes.needMore > 1000 && outcomes.refused > 1000 && outcomes.decoded > 1000, "\(outcomes)")
    }

    @Test func randomBytesNeverCrashTheDecoder() {
        var rng = SplitMix64(seed: 42)
        let prefixes: [[UInt8]] = [[], ascii("PROXY "), hex(signature), hex("\(signature) 21"), hex("\(signature) 21 11")]
        for round in 0..<10_000 {
            let prefix = prefixes[round % prefixes.count]
            let input = prefix + (0..<Int.random(in: 0...120, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if let (_, length) = try? ProxyHeaderDecoder.decode(input) {
                #expect(length > 0 && length <= input.count)
            }
        }
    }
}
