import Foundation
import PortcullisWire
import Testing

// MARK: building ClientHellos by hand (RFC 8446 §4.1.2, RFC 6066 §3, RFC 7301 §3.1)

/// Builds handshake messages and records byte by byte, independently of the peeker. The fixed
/// fields are those of Tests/Fuzz/make-client-hello-corpus.py, so both build the same bytes
/// (ClientHelloCorpusReplayTests checks a few).
enum HelloBytes {
    static let random: [UInt8] = Array(0..<32)
    static let sessionID: [UInt8] = Array(0xA0..<0xC0)
    static let ciphers: [UInt8] = [0x13, 0x01, 0x13, 0x02, 0xC0, 0x2F, 0x00, 0x9C]

    static func u16(_ n: Int) -> [UInt8] { [UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)] }
    static func u24(_ n: Int) -> [UInt8] { [UInt8(n >> 16 & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)] }
    static func vec8(_ b: [UInt8]) -> [UInt8] { [UInt8(b.count)] + b }
    static func vec16(_ b: [UInt8]) -> [UInt8] { u16(b.count) + b }
    static func text(_ s: String) -> [UInt8] { Array(s.utf8) }

    static func ext(_ type: Int, _ data: [UInt8]) -> [UInt8] { u16(type) + vec16(data) }
    static func sni(_ names: [UInt8]..., nameType: UInt8 = 0) -> [UInt8] {
        ext(0, vec16(names.flatMap { [nameType] + vec16($0) }))
    }
    static func sni(_ name: String) -> [UInt8] { sni(text(name)) }
    static func alpn(_ names: [UInt8]...) -> [UInt8] { ext(16, vec16(names.flatMap { vec8($0) })) }
    static func alpn(_ names: String...) -> [UInt8] { ext(16, vec16(names.flatMap { vec8(text($0)) })) }
    static func supportedVersions(_ versions: Int...) -> [UInt8] { ext(43, vec8(versions.flatMap { u16($0) })) }

    /// The ClientHello body; `extensions: nil` leaves the extensions block out.
    static func body(_ extensions: [[UInt8]]?, version: Int = 0x0303, sessionID: [UInt8] = sessionID,
                     ciphers: [UInt8] = ciphers, compression: [UInt8] = [0], rawExtensions: [UInt8]? = nil) -> [UInt8] {
        var out = u16(version) + random + vec8(sessionID) + vec16(ciphers) + vec8(compression)
        if let rawExtensions {
            out += rawExtensions
        } else if let extensions {
            out += vec16(extensions.flatMap { $0 })
        }
        return out
    }

    static func handshake(_ body: [UInt8], type: UInt8 = 1) -> [UInt8] { [type] + u24(body.count) + body }

    static func record(_ payload: [UInt8], type: UInt8 = 0x16, version: Int = 0x0301) -> [UInt8] {
        [type] + u16(version) + vec16(payload)
    }

    /// The handshake bytes in records of at most `size` bytes (one record if nil).
    static func records(_ handshake: [UInt8], size: Int? = nil, version: Int = 0x0301) -> [UInt8] {
        let size = size ?? max(handshake.count, 1)
        return stride(from: 0, to: handshake.count, by: size).flatMap {
            record(Array(handshake[$0..<min($0 + size, handshake.count)]), version: version)
        }
    }

    static let typicalExtensions = [sni("example.com"), alpn("h2", "http/1.1"), supportedVersions(0x0304, 0x0303)]
    /// SNI example.com, ALPN h2,http/1.1, TLS 1.3 and 1.2.
    static let typical = handshake(body(typicalExtensions))

    /// An SSLv2-compatible ClientHello: 2-byte length with the top bit set, type 1, version,
    /// cipher specs, session id and challenge lengths, then those.
    static func sslv2(version: Int = 0x0301, type: UInt8 = 1) -> [UInt8] {
        let specs: [UInt8] = [0x00, 0x00, 0x2F, 0x00, 0x00, 0x35, 0x01, 0x00, 0x80]
        let challenge: [UInt8] = Array(0..<16)
        let body = [type] + u16(version) + u16(specs.count) + u16(0) + u16(challenge.count) + specs + challenge
        return u16(0x8000 | body.count) + body
    }

    /// The handshake bytes carried by a sequence of well-formed records (test-side, for
    /// re-fragmenting captured hellos).
    static func handshakeBytes(ofRecords bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        var at = 0
        while at + 5 <= bytes.count {
            let length = Int(bytes[at + 3]) << 8 | Int(bytes[at + 4])
            out += bytes[(at + 5)..<min(at + 5 + length, bytes.count)]
            at += 5 + length
        }
        return out
    }
}

func peek(_ bytes: [UInt8]) -> ClientHelloPeek { ClientHelloPeeker.peek(bytes) }

func helloInfo(_ bytes: [UInt8]) -> ClientHelloInfo? {
    if case .hello(let info) = ClientHelloPeeker.peek(bytes) { return info }
    return nil
}

/// Every proper prefix needs more bytes and the whole is a hello; returns it.
@discardableResult
func expectHelloArrivingByteByByte(_ bytes: [UInt8], _ what: String,
                                   sourceLocation: SourceLocation = #_sourceLocation) -> ClientHelloInfo? {
    for cut in 0..<bytes.count where peek(Array(bytes[..<cut])) != .needMore {
        Issue.record("\(what): \(cut) of \(bytes.count) bytes gave \(peek(Array(bytes[..<cut])))",
                     sourceLocation: sourceLocation)
        return nil
    }
    let info = helloInfo(bytes)
    #expect(info != nil, "\(what): the whole \(bytes.count) bytes gave \(peek(bytes))", sourceLocation: sourceLocation)
    return info
}

typealias H = HelloBytes

// MARK: real clients

/// ClientHellos captured from real clients over loopback by
/// `python3 Tests/Fuzz/make-client-hello-corpus.py --capture` (the options are in its CAPTURES).
@Suite struct ClientHelloCapturedTests {
    static let corpus = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/corpus/client-hello")

    struct Capture: Sendable, CustomTestStringConvertible {
        let name: String
        let serverName: String
        let alpn: [String]
        let protocolVersion: String
        var testDescription: String { name }
    }

    static let both = ["h2", "http/1.1"]
    static let captures: [Capture] = [
        Capture(name: "openssl-tls13", serverName: "example.com", alpn: both, protocolVersion: "TLSv1.3"),
        Capture(name: "openssl-tls12", serverName: "example.com", alpn: both, protocolVersion: "TLSv1.2"),
        Capture(name: "openssl-tls1-no-alpn", serverName: "example.com", alpn: [], protocolVersion: "TLSv1"),
        Capture(name: "openssl-no-sni", serverName: "", alpn: both, protocolVersion: "TLSv1.3"),
        Capture(name: "openssl-fragmented", serverName: "example.com",
                alpn: both + (0..<40).map { "x-protocol-" + String("00\($0)".suffix(3)) }, protocolVersion: "TLSv1.3"),
        Capture(name: "curl", serverName: "example.com", alpn: both, protocolVersion: "TLSv1.3"),
        Capture(name: "curl-http1.1-tls12", serverName: "example.com", alpn: ["http/1.1"], protocolVersion: "TLSv1.2"),
        Capture(name: "python-ssl", serverName: "example.com", alpn: both, protocolVersion: "TLSv1.3"),
        Capture(name: "wget", serverName: "localhost", alpn: [], protocolVersion: "TLSv1.3"),  // GnuTLS
    ]

    static func bytes(_ name: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: corpus.appendingPathComponent("hello-capture-\(name).bin")))
    }

    @Test(arguments: captures)
    func capturedHelloParses(_ capture: Capture) throws {
        let bytes = try Self.bytes(capture.name)
        let info = try #require(helloInfo(bytes), "\(peek(bytes))")
        #expect(info.serverName == capture.serverName)
        #expect(info.serverNameBytes == Array(capture.serverName.utf8))
        #expect(info.alpnProtocols == capture.alpn)
        #expect(info.alpnProtocolsValue == Array(capture.alpn.joined(separator: ",").utf8))
        #expect(info.protocolVersion == capture.protocolVersion)
        #expect(info.nginxProtocolVersion == capture.protocolVersion)
        #expect(info.legacyVersion == (capture.protocolVersion == "TLSv1" ? 0x0301 : 0x0303))
        #expect((info.supportedVersions?.first == 0x0304) == (capture.protocolVersion == "TLSv1.3"))
    }

    @Test(arguments: captures)
    func everyPrefixOfACaptureNeedsMore(_ capture: Capture) throws {
        expectHelloArrivingByteByByte(try Self.bytes(capture.name), capture.name)
    }

    /// The same handshake bytes in 1-byte records, in records split at every byte boundary,
    /// and with empty records between: the same hello.
    @Test(arguments: captures)
    func capturedHelloRefragmented(_ capture: Capture) throws {
        let bytes = try Self.bytes(capture.name)
        let expected = try #require(helloInfo(bytes))
        let handshake = H.handshakeBytes(ofRecords: bytes)
        #expect(helloInfo(H.records(handshake, size: 1)) == expected)
        #expect(helloInfo(H.records(handshake, size: 1).flatMap { [$0] } + H.record([])) == expected)
        for cut in 1..<handshake.count {
            let split = H.record(Array(handshake[..<cut])) + H.record([]) + H.record(Array(handshake[cut...]), version: 0x0303)
            #expect(helloInfo(split) == expected, "split at \(cut)")
        }
    }

    @Test func fragmentedCaptureReallySpansRecords() throws {
        let bytes = try Self.bytes("openssl-fragmented")
        #expect(bytes[3] == 0x02 && bytes[4] == 0x00, "first record of 512 bytes (-max_send_frag 512)")
        #expect(bytes.count > 512 + 5 * 2)
    }

    /// curl (OpenSSL), Python (OpenSSL) and wget (GnuTLS) pad their hellos to 512 bytes; the
    /// padding extension (21) is skipped.
    @Test func paddedCapturesAre512Bytes() throws {
        for name in ["curl", "python-ssl", "wget"] {
            #expect(try Self.bytes(name).count == 5 + 512, "\(name)")
        }
    }
}

// MARK: handcrafted hellos

@Suite struct ClientHelloValueTests {
    @Test func typicalHello() throws {
        let info = try #require(helloInfo(H.records(H.typical)))
        #expect(info == ClientHelloInfo(serverName: "example.com", alpnProtocols: ["h2", "http/1.1"],
                                        protocolVersion: "TLSv1.3", legacyVersion: 0x0303,
                                        supportedVersions: [0x0304, 0x0303]))
        #expect(info.alpnProtocolsValue == H.text("h2,http/1.1"))
        #expect(info.nginxProtocolVersion == "TLSv1.3")
    }

    @Test func noExtensionsAtAll() throws {
        let info = try #require(helloInfo(H.records(H.handshake(H.body(nil)))))
        #expect(info == ClientHelloInfo(protocolVersion: "TLSv1.2", legacyVersion: 0x0303))
        // An empty extensions block is the same.
        #expect(helloInfo(H.records(H.handshake(H.body([])))) == info)
    }

    @Test func noSNI() throws {
        let info = try #require(helloInfo(H.records(H.handshake(H.body([H.alpn("h2"), H.supportedVersions(0x0304)])))))
        #expect(info.serverName == "" && info.serverNameBytes.isEmpty)
        #expect(info.alpnProtocols == ["h2"])
        #expect(info.protocolVersion == "TLSv1.3")
    }

    @Test func noALPN() throws {
        let info = try #require(helloInfo(H.records(H.handshake(H.body([H.sni("example.com")])))))
        #expect(info.serverName == "example.com")
        #expect(info.alpnProtocols.isEmpty && info.alpnProtocolsValue.isEmpty)
        #expect(info.protocolVersion == "TLSv1.2")
        #expect(info.supportedVersions == nil)
    }

    /// GREASE (RFC 8701) extension types, versions and cipher suites are skipped.
    @Test func grease() throws {
        let extensions = [H.ext(0x0A0A, []), H.sni("grease.example"), H.supportedVersions(0x3A3A, 0x0304, 0x0303),
                          H.alpn("h2"), H.ext(0xFAFA, [0])]
        let info = try #require(helloInfo(H.records(H.handshake(H.body(extensions, ciphers: [0xDA, 0xDA] + H.ciphers)))))
        #expect(info.serverName == "grease.example")
        #expect(info.alpnProtocols == ["h2"])
        #expect(info.protocolVersion == "TLSv1.3")
        #expect(info.supportedVersions == [0x3A3A, 0x0304, 0x0303])
        #expect(ClientHelloPeeker.isGREASE(0x3A3A) && ClientHelloPeeker.isGREASE(0x0A0A) && ClientHelloPeeker.isGREASE(0xFAFA))
        #expect(!ClientHelloPeeker.isGREASE(0x0304) && !ClientHelloPeeker.isGREASE(0x0A1A) && !ClientHelloPeeker.isGREASE(0x0B0B))
        // A GREASE value above every real one, or first, does not win.
        let last = try #require(helloInfo(H.records(H.handshake(H.body([H.supportedVersions(0x0303, 0xFAFA)])))))
        #expect(last.protocolVersion == "TLSv1.2")
    }

    @Test func legacyVersions() throws {
        func version(_ legacy: Int) -> String? { helloInfo(H.records(H.handshake(H.body(nil, version: legacy))))?.protocolVersion }
        #expect(version(0x0300) == "SSLv3")
        #expect(version(0x0301) == "TLSv1")
        #expect(version(0x0302) == "TLSv1.1")
        #expect(version(0x0303) == "TLSv1.2")
        #expect(version(0x0304) == "TLSv1.3")
        #expect(version(0x0002) == "SSLv2")
        #expect(version(0x0305) == "")       // nginx's variable is empty for a version it cannot name
        #expect(version(0x0200) == "")
        #expect(version(0xFEFD) == "")       // DTLS 1.2
    }

    /// supported_versions: the highest named version offered. nginx says TLSv1.3 whenever the
    /// extension is there; `nginxProtocolVersion` is that.
    @Test func supportedVersionsHighestNamed() throws {
        func info(_ versions: Int...) -> ClientHelloInfo? {
            helloInfo(H.records(H.handshake(H.body([H.ext(43, H.vec8(versions.flatMap { H.u16($0) }))]))))
        }
        #expect(info(0x0304, 0x0303)?.protocolVersion == "TLSv1.3")
        #expect(info(0x0303, 0x0304)?.protocolVersion == "TLSv1.3")           // order does not matter
        #expect(info(0x0303)?.protocolVersion == "TLSv1.2")
        #expect(info(0x0303)?.nginxProtocolVersion == "TLSv1.3")
        #expect(info(0x0302, 0x0301)?.protocolVersion == "TLSv1.1")
        #expect(info(0x7A7A)?.protocolVersion == "TLSv1.2")                   // only GREASE: the legacy version
        #expect(info(0x7A7A)?.nginxProtocolVersion == "TLSv1.3")
        #expect(info(0x0305, 0x0304)?.protocolVersion == "TLSv1.3")           // an unknown newer one is skipped
        #expect(info(0x7F1C)?.protocolVersion == "TLSv1.2")                   // a TLS 1.3 draft has no name
        #expect(info()?.protocolVersion == "TLSv1.2")                          // empty list: not refused
        #expect(info()?.supportedVersions == [])
        #expect(info()?.nginxProtocolVersion == "TLSv1.3")
        #expect(info(0x0304)?.legacyVersion == 0x0303)
    }

    @Test func onlyTheFirstOfDuplicateExtensionsIsRead() throws {
        let sni = try #require(helloInfo(H.records(H.handshake(H.body([H.sni("first.example"), H.sni("second.example")])))))
        #expect(sni.serverName == "first.example")
        let alpn = try #require(helloInfo(H.records(H.handshake(H.body([H.alpn("h2"), H.alpn("spdy/3")])))))
        #expect(alpn.alpnProtocols == ["h2"])
        let versions = try #require(helloInfo(H.records(H.handshake(H.body(
            [H.supportedVersions(0x0303), H.supportedVersions(0x0304)])))))
        #expect(versions.protocolVersion == "TLSv1.2")
        // A later duplicate is skipped unread, as nginx skips it: even a malformed one.
        let malformed = H.handshake(H.body([H.sni("first.example"), H.ext(0, [0xFF]), H.alpn("h2"), H.ext(16, [])]))
        #expect(helloInfo(H.records(malformed))?.serverName == "first.example")
        #expect(helloInfo(H.records(malformed))?.alpnProtocols == ["h2"])
    }

    /// The first entry of the server_name list is the name; the rest are not read.
    @Test func sniListEntries() throws {
        #expect(helloInfo(H.records(H.handshake(H.body([H.sni(H.text("first.example"), H.text("second.example"))]))))?
            .serverName == "first.example")
        let otherType = H.ext(0, H.vec16([0] + H.vec16(H.text("first.example")) + [7] + H.vec16([0x78])))
        #expect(helloInfo(H.records(H.handshake(H.body([otherType]))))?.serverName == "first.example")
        // An empty host name is "" (nginx's variable is empty too).
        let empty = try #require(helloInfo(H.records(H.handshake(H.body([H.sni(H.text("")), H.alpn("h2")])))))
        #expect(empty.serverName == "" && empty.alpnProtocols == ["h2"])
        // A 255-byte name, the DNS maximum; nothing limits it below the extension's 65,535.
        let long = String(repeating: "a", count: 63) + "." + String(repeating: "b", count: 191)
        #expect(helloInfo(H.records(H.handshake(H.body([H.sni(long)]))))?.serverName == long)
    }

    /// The SNI value is the bytes as sent, Latin-1: nothing validated, lower-cased or cut.
    @Test func sniBytesAreKeptAsLatin1() throws {
        let raw: [UInt8] = H.text("caf") + [0xC3, 0xA9, 0x00, 0x1B] + H.text("[31m.example") + [0xFF, 0x0A]
        let info = try #require(helloInfo(H.records(H.handshake(H.body([H.sni(raw)])))))
        #expect(info.serverNameBytes == raw)
        #expect(info.serverName.unicodeScalars.map(\.value) == raw.map(UInt32.init))
        #expect(info.serverName == "caf\u{C3}\u{A9}\u{0}\u{1B}[31m.example\u{FF}\n")
        #expect(info.serverName.unicodeScalars.count == raw.count)
        let upper = try #require(helloInfo(H.records(H.handshake(H.body([H.sni("WWW.Example.COM.")])))))
        #expect(upper.serverName == "WWW.Example.COM.")
    }

    @Test func alpnOrderCommasAndBinaryNames() throws {
        let names = (0..<40).map { "proto-\($0)" }
        let many = try #require(helloInfo(H.records(H.handshake(H.body([H.ext(16, H.vec16(names.flatMap { H.vec8(H.text($0)) }))])))))
        #expect(many.alpnProtocols == names)
        #expect(many.alpnProtocolsValue == H.text(names.joined(separator: ",")))
        let comma = try #require(helloInfo(H.records(H.handshake(H.body([H.alpn("a,b", "c")])))))
        #expect(comma.alpnProtocols == ["a,b", "c"])
        #expect(comma.alpnProtocolsValue == H.text("a,b,c"))     // nginx's join cannot tell them apart either
        let binary = try #require(helloInfo(H.records(H.handshake(H.body([H.alpn([0x0A, 0x0A], [0x00, 0xFF])])))))
        #expect(binary.alpnProtocols == ["\u{0A}\u{0A}", "\u{00}\u{FF}"])
        #expect(binary.alpnProtocolsValue == [0x0A, 0x0A, 0x2C, 0x00, 0xFF])
    }

    /// Other extensions, also before SNI, are skipped by their lengths.
    @Test func unknownExtensionsAreSkipped() throws {
        let extensions = [H.ext(0xFF01, [0]), H.ext(21, [UInt8](repeating: 0, count: 200)), H.ext(0x1234, []),
                          H.sni("late.example")]
        #expect(helloInfo(H.records(H.handshake(H.body(extensions))))?.serverName == "late.example")
    }

    /// Values inside skipped vectors are not checked, as in nginx.
    @Test func contentsOfSkippedFieldsAreNotChecked() throws {
        let odd = H.handshake(H.body([H.sni("example.com")], sessionID: [UInt8](repeating: 1, count: 40),
                                     ciphers: [0x13], compression: []))
        #expect(helloInfo(H.records(odd))?.serverName == "example.com")
    }
}

// MARK: SSLv2-compatible hellos

/// nginx: first byte with the top bit set, byte 2 (the message type) 1, byte 3 (version major)
/// 0 or 3: a version 2 ClientHello; `$ssl_preread_protocol` names bytes 3-4, no SNI, no ALPN.
@Suite struct ClientHelloSSLv2Tests {
    @Test func versionComesFromTheHeader() throws {
        #expect(helloInfo(H.sslv2(version: 0x0301)) == ClientHelloInfo(protocolVersion: "TLSv1", legacyVersion: 0x0301))
        #expect(helloInfo(H.sslv2(version: 0x0303))?.protocolVersion == "TLSv1.2")
        #expect(helloInfo(H.sslv2(version: 0x0300))?.protocolVersion == "SSLv3")
        #expect(helloInfo(H.sslv2(version: 0x0002))?.protocolVersion == "SSLv2")
        #expect(helloInfo(H.sslv2(version: 0x0001))?.protocolVersion == "")
        #expect(helloInfo(H.sslv2(version: 0x0303))?.nginxProtocolVersion == "TLSv1.2")
    }

    @Test func decidedAtFiveBytes() throws {
        let hello = H.sslv2()
        #expect(peek([]) == .needMore)
        for cut in 1..<5 { #expect(peek(Array(hello[..<cut])) == .needMore, "\(cut) bytes") }
        let five = try #require(helloInfo(Array(hello[..<5])))
        #expect(five.protocolVersion == "TLSv1")
        #expect(helloInfo(hello) == five)
        // The length in the first two bytes is not checked (nginx does not read it).
        #expect(helloInfo([0xFF, 0xFF, 0x01, 0x03, 0x03])?.protocolVersion == "TLSv1.2")
    }

    @Test func otherShapesAreNotTLS() {
        #expect(peek(H.sslv2(type: 2)) == .notTLS)
        #expect(peek(Array(H.sslv2(type: 2)[..<3])) == .notTLS)        // refused as soon as the type arrives
        #expect(peek(H.sslv2(version: 0x0101)) == .notTLS)
        #expect(peek(Array(H.sslv2(version: 0x0201)[..<4])) == .notTLS)
        #expect(peek([0xFF, 0xFF, 0xFF, 0xFF, 0xFF]) == .notTLS)
    }

    /// Only the first bytes of the connection can be an SSLv2 hello. (nginx also takes one at
    /// a later record boundary, with the values read so far: see the type's documentation.)
    @Test func notAfterATLSRecord() {
        let half = H.records(Array(H.typical[..<60]))
        #expect(peek(half) == .needMore)
        #expect(peek(half + [0x80, 0x2E, 0x01, 0x03, 0x01]) == .notTLS)
    }
}

// MARK: records and fragmentation

@Suite struct ClientHelloRecordTests {
    static let vectors: [(String, [UInt8])] = [
        ("typical", H.typical),
        ("no extensions", H.handshake(H.body(nil))),
        ("empty extensions", H.handshake(H.body([]))),
        ("grease", H.handshake(H.body([H.ext(0x0A0A, []), H.sni("g.example"), H.supportedVersions(0x1A1A, 0x0304)]))),
        ("no session id", H.handshake(H.body([H.sni("example.com")], sessionID: [], compression: []))),
    ]

    @Test func everyPrefixNeedsMoreBytes() {
        for (name, handshake) in Self.vectors {
            expectHelloArrivingByteByByte(H.records(handshake), name)
            expectHelloArrivingByteByByte(H.records(handshake, size: 1), "\(name) in 1-byte records")
            expectHelloArrivingByteByByte(H.records(handshake, size: 7, version: 0x0303), "\(name) in 7-byte records")
        }
    }

    @Test func splitAtEveryByteBoundary() throws {
        for (name, handshake) in Self.vectors {
            let expected = try #require(helloInfo(H.records(handshake)))
            for cut in 1..<handshake.count {
                let split = H.record(Array(handshake[..<cut])) + H.record(Array(handshake[cut...]))
                #expect(helloInfo(split) == expected, "\(name) split at \(cut)")
            }
            #expect(helloInfo(H.records(handshake, size: 1)) == expected, "\(name) in 1-byte records")
        }
    }

    /// Empty handshake records are skipped (nginx skips them), anywhere before the end.
    @Test func zeroLengthRecords() throws {
        let hs = H.typical
        let bytes = H.record([]) + H.record(Array(hs[..<50])) + H.record([]) + H.record([]) + H.record(Array(hs[50...]))
        #expect(helloInfo(bytes)?.serverName == "example.com")
        #expect(peek(H.record([])) == .needMore)
        #expect(peek([UInt8]((0..<5).flatMap { _ in H.record([]) })) == .needMore)
    }

    /// The record version's minor byte is not checked (nginx checks only the major, 3).
    @Test func recordVersions() throws {
        let hs = H.typical
        for version in [0x0300, 0x0301, 0x0302, 0x0303, 0x0304, 0x03FF] {
            #expect(helloInfo(H.records(hs, version: version))?.serverName == "example.com", "\(version)")
        }
        #expect(peek(H.records(hs, version: 0x0201)) == .notTLS)
        #expect(peek(H.records(hs, version: 0x0401)) == .notTLS)
        #expect(peek([0x16, 0x02]) == .notTLS)                      // refused as soon as the byte arrives
        #expect(peek([0x16, 0x03]) == .needMore)
    }

    @Test func recordLengthBound() throws {
        #expect(ClientHelloPeeker.maximumRecordLength == 18_432)
        let hs = H.typical
        // The length field alone decides: a record of 18,433 bytes is refused before its body.
        #expect(peek([0x16, 0x03, 0x01] + H.u16(18_433) + hs) == .notTLS)
        #expect(peek([0x16, 0x03, 0x01, 0xFF, 0xFF]) == .notTLS)
        // 18,432 is accepted: a hello padded to fill the record exactly.
        let bare = H.handshake(H.body([H.sni("big.example"), H.ext(21, [])])).count
        let full = H.handshake(H.body([H.sni("big.example"), H.ext(21, [UInt8](repeating: 0, count: 18_432 - bare))]))
        #expect(full.count == 18_432)
        #expect(helloInfo(H.records(full))?.serverName == "big.example")
        #expect(peek(Array(H.records(full).dropLast())) == .needMore)
    }

    /// A hello larger than one record, as a client must send it.
    @Test func helloSpanningRecordsOf16K() throws {
        let hs = H.handshake(H.body([H.ext(21, [UInt8](repeating: 0, count: 20_000)), H.sni("huge.example")]))
        let bytes = H.records(hs, size: 16_384)
        #expect(helloInfo(bytes)?.serverName == "huge.example")
        #expect(peek(Array(bytes.dropLast())) == .needMore)
    }

    /// Nothing after the hello's last byte is looked at: the rest of its record (nginx waits for
    /// it; the peeker does not need it), and what follows.
    @Test func stopsAtTheEndOfTheHello() throws {
        let expected = try #require(helloInfo(H.records(H.typical)))
        let declaredLonger = Array(H.record(H.typical + [UInt8](repeating: 0, count: 100))[..<(5 + H.typical.count)])
        #expect(helloInfo(declaredLonger) == expected)
        #expect(helloInfo(H.records(H.typical) + H.record([1], type: 0x17)) == expected)
        #expect(helloInfo(H.records(H.typical) + [0xFF, 0x00, 0x00]) == expected)
        #expect(helloInfo(H.records(H.typical) + H.text("GET / HTTP/1.1\r\n")) == expected)
        // Other handshake bytes after the hello in the same record: ignored too.
        #expect(helloInfo(H.records(H.typical + [0x0B, 0x00, 0x00, 0x00])) == expected)
    }

    @Test func arrayAndRawBufferAgree() {
        let inputs: [[UInt8]] = [[], [0x16], H.records(H.typical), H.records(H.typical, size: 3), H.sslv2(),
                                 H.text("GET /"), Array(H.records(H.typical).dropLast(9))]
        for input in inputs {
            #expect(input.withUnsafeBytes { ClientHelloPeeker.peek($0) } == peek(input))
        }
    }

    /// Linear work: a megabyte of empty records, and a hello in 1-byte records.
    @Test func largeInputsAreCheap() throws {
        let empties = [UInt8]((0..<200_000).flatMap { _ in H.record([]) })
        #expect(peek(empties) == .needMore)
        let hs = H.handshake(H.body([H.ext(21, [UInt8](repeating: 0, count: 16_000)), H.sni("slow.example")]))
        #expect(helloInfo(H.records(hs, size: 1))?.serverName == "slow.example")
    }
}

// MARK: not TLS

@Suite struct ClientHelloNotTLSTests {
    @Test func otherProtocols() {
        #expect(peek(H.text("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")) == .notTLS)
        #expect(peek(H.text("G")) == .notTLS)                      // decided at the first byte
        #expect(peek(H.text("SSH-2.0-OpenSSH_9.2p1\r\n")) == .notTLS)
        #expect(peek(H.text("PROXY TCP4 192.0.2.1 192.0.2.2 1 443\r\n") + H.records(H.typical)) == .notTLS)
        #expect(peek([0x00]) == .notTLS)
        #expect(peek([]) == .needMore)
    }

    /// A record of another type before the hello is complete: nginx declines ("not a handshake").
    @Test func nonHandshakeRecords() {
        #expect(peek(H.record([0x02, 0x28], type: 0x15)) == .notTLS)                     // alert
        #expect(peek(H.record([0x01], type: 0x14) + H.records(H.typical)) == .notTLS)    // change_cipher_spec
        #expect(peek(H.record(H.text("hello"), type: 0x17)) == .notTLS)                  // application data
        let half = H.records(Array(H.typical[..<60]))
        #expect(peek(half + H.record(Array(H.typical[60...]), type: 0x17)) == .notTLS)
        #expect(peek(half + [0x15]) == .notTLS)
        #expect(peek(half + [0x16, 0x02]) == .notTLS)
    }

    @Test func notAClientHello() {
        #expect(peek(H.records(H.handshake(H.body(nil), type: 2))) == .notTLS)       // ServerHello
        #expect(peek(H.records(H.handshake([], type: 0))) == .notTLS)                // HelloRequest
        #expect(peek([0x16, 0x03, 0x01, 0x00, 0x01, 0x02]) == .notTLS)              // decided at the type byte
        #expect(peek([0x16, 0x03, 0x01, 0x00, 0x01, 0x01]) == .needMore)
        #expect(peek(H.records([0x01, 0x00, 0x00, 0x00])) == .notTLS)              // an empty ClientHello
    }

    /// Lengths that point past the vector holding them, or do not fill it.
    @Test func malformedLengths() {
        let v = H.u16(0x0303) + H.random
        func bad(_ body: [UInt8], _ what: String) {
            #expect(peek(H.records(H.handshake(body))) == .notTLS, "\(what)")
        }
        bad(Array(v[..<10]), "hello shorter than version + random")
        bad(v + [40] + H.sessionID, "session id past the end")
        bad(v + [0] + H.u16(200) + H.ciphers, "cipher suites past the end")
        bad(v + [0] + H.vec16(H.ciphers) + [9, 0], "compression methods past the end")
        bad(H.body(nil) + [0x00], "one byte where the extensions length goes")
        bad(H.body(nil, rawExtensions: H.u16(3) + H.sni("example.com")), "extensions block shorter than the hello")
        bad(H.body(nil, rawExtensions: H.u16(100) + H.sni("example.com")), "extensions block past the end")
        bad(H.body(nil, rawExtensions: H.u16(3) + [0, 0, 0]), "extension header cut")
        bad(H.body(nil, rawExtensions: H.u16(6) + H.u16(21) + H.u16(10) + [0, 0]), "extension data past the block")
        bad(H.body([H.ext(0, H.vec16([1] + H.vec16(H.text("example.com"))))]), "SNI name type 1 (nginx: not DNS)")
        bad(H.body([H.ext(0, H.vec16([]))]), "empty server_name list")
        bad(H.body([H.ext(0, []), H.alpn("h2")]), "empty server_name extension")
        bad(H.body([H.ext(0, H.vec16([0] + H.vec16(H.text("example.com"))) + [0])]), "SNI list shorter than the extension")
        bad(H.body([H.ext(0, H.u16(20) + [0] + H.vec16(H.text("example.com")))]), "SNI list past the extension")
        bad(H.body([H.ext(0, H.vec16([0] + H.u16(50) + H.text("example.com")))]), "host name past the list")
        bad(H.body([H.ext(16, H.vec16([]))]), "empty ALPN list")
        bad(H.body([H.ext(16, H.vec16([2] + H.text("h2") + [0]))]), "empty ALPN name")
        bad(H.body([H.ext(16, H.vec16([9] + H.text("h2")))]), "ALPN name past the list")
        bad(H.body([H.ext(16, H.u16(2) + [2] + H.text("h2"))]), "ALPN list shorter than the extension")
        bad(H.body([H.ext(16, [])]), "empty ALPN extension")
        bad(H.body([H.ext(43, [3, 3, 4, 3])]), "supported_versions of odd length")
        bad(H.body([H.ext(43, [4, 3, 4])]), "supported_versions past the extension")
        bad(H.body([H.ext(43, [])]), "empty supported_versions extension")
        // An odd supported_versions list is refused at its length byte, not at its last byte.
        let odd = H.records(H.handshake(H.body([H.ext(43, [3, 3, 4, 3])])))
        #expect(peek(Array(odd.dropLast(3))) == .notTLS)
    }

    /// Every length field of the typical hello, one more or one less, breaks it (with two
    /// exceptions that are still well-formed hellos, checked at the end).
    @Test func everyLengthFieldOffByOne() throws {
        let hs = H.typical
        // Offsets in the handshake message: header length (1, 3 bytes), session id length,
        // cipher suites length, compression length, extensions length, and in each extension
        // its data length and inner list length (ALPN: also each name's length).
        var fields: [(offset: Int, width: Int, what: String)] = [(1, 3, "handshake length")]
        var at = 4 + 2 + 32
        fields.append((at, 1, "session id")); at += 1 + H.sessionID.count
        let cipherSuites = at
        fields.append((at, 2, "cipher suites")); at += 2 + H.ciphers.count
        fields.append((at, 1, "compression")); at += 1 + 1
        fields.append((at, 2, "extensions")); at += 2
        let hostName = at + 7
        fields.append((at + 2, 2, "SNI extension")); fields.append((at + 4, 2, "SNI list"))
        fields.append((hostName, 2, "SNI host name")); at += 4 + 2 + 3 + 11
        fields.append((at + 2, 2, "ALPN extension")); fields.append((at + 4, 2, "ALPN list"))
        fields.append((at + 6, 1, "ALPN h2")); fields.append((at + 9, 1, "ALPN http/1.1")); at += 4 + 2 + 3 + 9
        fields.append((at + 2, 2, "supported_versions extension")); fields.append((at + 4, 1, "supported_versions list"))
        #expect(at + 4 + 1 + 4 == hs.count)

        func adjusted(_ offset: Int, _ width: Int, by delta: Int) -> [UInt8] {
            var mutated = hs
            var value = 0
            for i in 0..<width { value = value << 8 | Int(mutated[offset + i]) }
            value += delta
            for i in 0..<width { mutated[offset + i] = UInt8(value >> (8 * (width - 1 - i)) & 0xFF) }
            return mutated
        }
        for field in fields {
            for delta in [1, -1] {
                if (field.offset == hostName && delta == -1) || (field.offset == cipherSuites && delta == 1) { continue }
                #expect(peek(H.records(adjusted(field.offset, field.width, by: delta))) == .notTLS,
                         "\(field.what) \(delta > 0 ? "+1" : "-1")")
            }
        }
        // The host name one shorter: a shorter name, and one byte of the list left unread
        // (nginx skips the rest of the list too).
        #expect(helloInfo(H.records(adjusted(hostName, 2, by: -1)))?.serverName == "example.co")
        // Cipher suites one longer: the compression length byte (1) becomes the last cipher
        // byte and the null method (0) an empty compression list; the rest lines up again.
        #expect(helloInfo(H.records(adjusted(cipherSuites, 2, by: 1))) == helloInfo(H.records(hs)))
    }

    /// A refused input stays refused whatever follows, and is refused at the byte that decides.
    @Test func refusalIsFinal() {
        let cases: [[UInt8]] = [
            H.text("GET /"),
            H.records(H.handshake(H.body([H.ext(16, H.vec16([2] + H.text("h2") + [0]))]))),
            H.records(Array(H.typical[..<60])) + H.record([1], type: 0x17),
            H.sslv2(type: 4),
        ]
        for input in cases {
            var refusedAt: Int?
            for cut in 0...input.count {
                let result = peek(Array(input[..<cut]))
                if let refusedAt { #expect(result == .notTLS, "needs more at \(cut) after refusing at \(refusedAt)") }
                else if result == .notTLS { refusedAt = cut }
                else { #expect(result == .needMore, "\(cut) bytes: \(result)") }
            }
            #expect(refusedAt != nil)
            #expect(peek(input + H.records(H.typical)) == .notTLS)
        }
    }
}
