import Testing
import PortcullisTestSupport
@testable import PortcullisCore

@Suite struct IPAddressParsingTests {
    @Test(arguments: [
        ("0.0.0.0", UInt32(0)),
        ("1.2.3.4", UInt32(0x0102_0304)),
        ("10.0.0.1", UInt32(0x0A00_0001)),
        ("255.255.255.255", UInt32.max),
        ("192.168.100.200", UInt32(0xC0A8_64C8)),
    ])
    func parsesIPv4(text: String, value: UInt32) {
        #expect(IPAddress(text) == .v4(value))
    }

    @Test(arguments: [
        "01.2.3.4", "1.02.3.4", "1.2.3.00", "256.1.1.1", "1.2.3.256", "1.2.3.1000", "1.2.3", "1.2.3.4.5",
        "1..2.3", ".1.2.3", "1.2.3.", "", "a.b.c.d", "1.2.3.4 ", " 1.2.3.4", "1.2.3.-4", "4294967296",
    ])
    func rejectsBadIPv4(text: String) {
        #expect(IPAddress(text) == nil)
    }

    static let ipv6Cases: [(String, [UInt16])] = [
        ("::", [0, 0, 0, 0, 0, 0, 0, 0]),
        ("::1", [0, 0, 0, 0, 0, 0, 0, 1]),
        ("1::", [1, 0, 0, 0, 0, 0, 0, 0]),
        ("2001:db8::1", [0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", [0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]),
        ("2001:DB8:0:0:1:0:0:1", [0x2001, 0xdb8, 0, 0, 1, 0, 0, 1]),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", [UInt16](repeating: 0xffff, count: 8)),
        ("::ffff:1.2.3.4", [0, 0, 0, 0, 0, 0xffff, 0x0102, 0x0304]),
        ("::ffff:10.0.0.1", [0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001]),
        ("::1.2.3.4", [0, 0, 0, 0, 0, 0, 0x0102, 0x0304]),
        ("64:ff9b::192.0.2.33", [0x64, 0xff9b, 0, 0, 0, 0, 0xc000, 0x0221]),
        ("1:2:3:4:5:6:7::", [1, 2, 3, 4, 5, 6, 7, 0]),
        ("::2:3:4:5:6:7:8", [0, 2, 3, 4, 5, 6, 7, 8]),
        ("fe80::1:2", [0xfe80, 0, 0, 0, 0, 0, 1, 2]),
        ("1:2:3:4:5:6:1.2.3.4", [1, 2, 3, 4, 5, 6, 0x0102, 0x0304]),
    ]

    @Test(arguments: ipv6Cases)
    func parsesIPv6(text: String, groups: [UInt16]) {
        let value = groups.reduce(UInt128(0)) { $0 << 16 | UInt128($1) }
        #expect(IPAddress(text) == .v6(value))
    }

    @Test(arguments: [
        "1::2::3",            // two "::"
        "::1::",
        "1:2:3:4:5:6:7:8:9",  // nine groups
        "1:2:3:4:5:6:7",      // seven groups, no "::"
        "1:2:3:4:5:6:7:8::",  // "::" with eight groups already
        "1:2:3:4:5:6:7:",     // trailing single ":"
        "1:",
        ":1",
        ":::",
        "12345::",            // group too long
        "g::1",
        "::ffff:1.2.3",       // short IPv4 tail
        "::ffff:01.2.3.4",    // leading zero in the tail
        "::1.2.3.4:5",        // tail not last
        "1:2:3:4:5:6:7:1.2.3.4",  // 7 groups + tail = 9 words
        "[::1]",
        "fe80::1%eth0",
    ])
    func rejectsBadIPv6(text: String) {
        #expect(IPAddress(text) == nil)
    }
}

@Suite struct IPAddressFormattingTests {
    @Test(arguments: [
        ("::", "::"),
        ("::1", "::1"),
        ("::ffff:10.0.0.1", "::ffff:10.0.0.1"),
        ("::ffff:a00:1", "::ffff:10.0.0.1"),
        ("::ffff:0.0.0.0", "::ffff:0.0.0.0"),
        ("::1.2.3.4", "::1.2.3.4"),
        ("::ffff:1:2", "::ffff:0.1.0.2"),
        ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2:3:4:5:6"),
        ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),  // one zero group is never "::" (RFC 5952 4.2.2)
        ("::2:3:4:5:6:7:8", "0:2:3:4:5:6:7:8"),
        ("1:2:3:4:5:6:7::", "1:2:3:4:5:6:7:0"),
        ("ABCD:EF01:2:3:4:5:6:7", "abcd:ef01:2:3:4:5:6:7"),  // lower case
        ("0:0:0:0:0:0:0:2", "::2"),
    ])
    func formatsIPv6(input: String, expected: String) throws {
        let address = try #require(IPAddress(input))
        #expect(address.description == expected)
    }

    /// A run of zeros that does not start the address must become "::" (RFC 5952 4.2.2, and
    /// what nginx prints); an early version wrote a single ":" there ("2001:db8:1").
    @Test(arguments: [
        ("1::", "1::"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),      // first of two equal runs
        ("2001:0:0:1:0:0:0:1", "2001:0:0:1::1"),             // the longest run wins
        ("fe80::1:2", "fe80::1:2"),
        ("1:2:3:4:5:6::", "1:2:3:4:5:6::"),
        ("ABCD:EF01::", "abcd:ef01::"),
        ("2001:db8::", "2001:db8::"),
    ])
    func formatsInteriorAndTrailingZeroRuns(input: String, expected: String) throws {
        let address = try #require(IPAddress(input))
        #expect(address.description == expected)
        // Whatever the text, it must at least parse back to the same address.
        #expect(IPAddress(address.description) == address)
    }

    @Test(arguments: ["0.0.0.0", "1.2.3.4", "10.0.0.1", "255.255.255.255", "192.168.1.100"])
    func formatsIPv4RoundTrip(text: String) throws {
        #expect(try #require(IPAddress(text)).description == text)
    }

    @Test func socketEndpointDescription() throws {
        #expect(SocketEndpoint(address: try #require(IPAddress("1.2.3.4")), port: 80).description == "1.2.3.4:80")
        #expect(SocketEndpoint(address: try #require(IPAddress("::1")), port: 8080).description == "[::1]:8080")
    }
}

@Suite struct IPAddressPropertyTests {
    @Test func mappedIPv4AndFolded() throws {
        let mapped = try #require(IPAddress("::ffff:10.1.2.3"))
        #expect(mapped.mappedIPv4 == 0x0A01_0203)
        #expect(mapped.folded == .v4(0x0A01_0203))
        #expect(mapped.isIPv4 == false)
        #expect(mapped.folded.isIPv4)

        // IPv4-compatible and ordinary IPv6 addresses are not mapped.
        let compatible = try #require(IPAddress("::10.1.2.3"))
        #expect(compatible.mappedIPv4 == nil)
        #expect(compatible.folded == compatible)
        let other = try #require(IPAddress("2001:db8::ffff:a01:203"))
        #expect(other.mappedIPv4 == nil)
        #expect(other.folded == other)
        // ::fffe:… and ::1:ffff:… are not mapped.
        #expect(IPAddress("::fffe:10.1.2.3")?.mappedIPv4 == nil)
        #expect(IPAddress("::1:ffff:a01:203")?.mappedIPv4 == nil)

        let v4 = IPAddress.v4(0x7F00_0001)
        #expect(v4.mappedIPv4 == nil)
        #expect(v4.folded == v4)
    }

    @Test func bytesRoundTrip() throws {
        #expect(IPAddress.v4(0x7F00_0001).bytes == [127, 0, 0, 1])
        #expect(IPAddress(bytes: [127, 0, 0, 1]) == .v4(0x7F00_0001))
        let v6 = try #require(IPAddress("2001:db8::ff01"))
        #expect(v6.bytes == [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0x01])
        #expect(IPAddress(bytes: v6.bytes) == v6)
        let mapped = try #require(IPAddress("::ffff:1.2.3.4"))
        #expect(mapped.bytes == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4])
        #expect(IPAddress(bytes: [UInt8]()) == nil)
        #expect(IPAddress(bytes: [1, 2, 3]) == nil)
        #expect(IPAddress(bytes: [UInt8](repeating: 0, count: 15)) == nil)

        var generator = SplitMix64(seed: 42)
        for _ in 0..<200 {
            let a = IPAddress.v4(UInt32.random(in: .min ... .max, using: &generator))
            #expect(IPAddress(bytes: a.bytes) == a)
            #expect(IPAddress(a.description) == a)
            let b = IPAddress.v6(UInt128(UInt64.random(in: .min ... .max, using: &generator)) << 64
                | UInt128(UInt64.random(in: .min ... .max, using: &generator)))
            #expect(IPAddress(bytes: b.bytes) == b)
        }
    }

    @Test func ordering() {
        #expect(IPAddress.v4(1) < IPAddress.v4(2))
        #expect(IPAddress.v4(UInt32.max) < IPAddress.v6(0))
        #expect(!(IPAddress.v6(0) < IPAddress.v4(0)))
        #expect(IPAddress.v6(1) < IPAddress.v6(2))
    }
}

@Suite struct UnixEndpointTests {
    @Test("unix:PATH parses as nginx reads it; variables print unix:/path, unix: without a name, and no port")
    func parsingAndText() {
        let named = SocketEndpoint("unix:/run/app.sock")
        #expect(named == SocketEndpoint(unixPath: "/run/app.sock"))
        #expect(named?.description == "unix:/run/app.sock" && named?.portText == "")
        #expect(SocketEndpoint("unix:/p:80")?.unixPath == "/p:80", "everything after unix: is the path")
        #expect(SocketEndpoint("unix:") == nil)
        #expect(SocketEndpoint("unix:/" + String(repeating: "a", count: 107)) == nil, "longer than sun_path holds")
        #expect(SocketEndpoint(unixPath: "").hostText == "unix:")
        #expect(SocketEndpoint(unixPath: "\0abstract").hostText == "unix:", "an abstract name prints as nginx prints it")
        #expect(SocketEndpoint(unixPath: "\0abstract").isUnnamedUnix && !named!.isUnnamedUnix)
        #expect(named?.address == .v4(0xFFFF_FFFF), "geo looks a unix client up as 255.255.255.255")
        #expect(SocketEndpoint(unixPath: "/a") != SocketEndpoint(address: .v4(0xFFFF_FFFF), port: 0))
    }
}
