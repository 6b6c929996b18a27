import Testing
@testable import PortcullisCore

@Suite struct CIDRTests {
    @Test func ipv4ZeroPrefixCoversEverything() throws {
        let block = try #require(CIDR("0.0.0.0/0"))
        #expect(block.network == .v4(0))
        #expect(block.prefixLength == 0)
        #expect(block.hostBitsSet == false)
        #expect(block.ipv4Range == 0...UInt32.max)
        #expect(block.ipv6Range == nil)
        #expect(block.contains(.v4(0)))
        #expect(block.contains(.v4(UInt32.max)))
        #expect(!block.contains(.v6(0)))
        #expect(block.description == "0.0.0.0/0")
    }

    @Test func ipv4ZeroPrefixWithHostBitsIsMasked() throws {
        let block = try #require(CIDR("10.1.2.3/0"))
        #expect(block.network == .v4(0))
        #expect(block.hostBitsSet)
        #expect(block.ipv4Range == 0...UInt32.max)
    }

    @Test func ipv4HostPrefix() throws {
        let block = try #require(CIDR("10.1.2.3/32"))
        #expect(block.network == .v4(0x0A01_0203))
        #expect(block.hostBitsSet == false)
        #expect(block.ipv4Range == 0x0A01_0203...0x0A01_0203)
        #expect(block.contains(.v4(0x0A01_0203)))
        #expect(!block.contains(.v4(0x0A01_0202)))
        #expect(!block.contains(.v4(0x0A01_0204)))
        // A bare address is a host prefix.
        #expect(CIDR("10.1.2.3") == block)
        #expect(block.description == "10.1.2.3/32")
    }

    @Test func ipv6Prefixes() throws {
        let all = try #require(CIDR("::/0"))
        #expect(all.ipv6Range == 0...UInt128.max)
        #expect(all.ipv4Range == nil)
        #expect(all.contains(.v6(UInt128.max)))
        #expect(!all.contains(.v4(0)))

        let host = try #require(CIDR("2001:db8::1/128"))
        #expect(host.ipv6Range == (UInt128(0x2001_0db8) << 96 | 1)...(UInt128(0x2001_0db8) << 96 | 1))
        #expect(host.hostBitsSet == false)
        #expect(CIDR("2001:db8::1") == host)

        let net = try #require(CIDR("2001:db8::/32"))
        let low = UInt128(0x2001_0db8) << 96
        #expect(net.ipv6Range == low...(low | (UInt128.max >> 32)))
        #expect(net.contains(.v6(low)))
        #expect(net.contains(.v6(low | (UInt128.max >> 32))))
        #expect(!net.contains(.v6(low - 1)))
        #expect(!net.contains(.v6((low | (UInt128.max >> 32)) + 1)))
        #expect(net.network == IPAddress("2001:db8::"))
        #expect(net.description == "2001:db8::/32")
    }

    @Test(arguments: [
        ("10.0.0.0/8", false, "10.0.0.0/8"),
        ("10.1.0.0/8", true, "10.0.0.0/8"),
        ("10.0.0.1/31", true, "10.0.0.0/31"),
        ("10.0.0.2/31", false, "10.0.0.2/31"),
        ("192.168.1.255/24", true, "192.168.1.0/24"),
        ("::1/127", true, "::/127"),
        ("::ffff:10.1.0.0/104", true, "::ffff:10.0.0.0/104"),
    ])
    func hostBitsAreDetectedAndMasked(text: String, hostBits: Bool, masked: String) throws {
        let block = try #require(CIDR(text))
        #expect(block.hostBitsSet == hostBits)
        #expect(block.description == masked)
    }

    @Test(arguments: [
        ("2001:db8::1/64", true, "2001:db8::", 64),
        ("2001:db8::/64", false, "2001:db8::", 64),
        ("2001:db8:ffff::/32", true, "2001:db8::", 32),
        ("fe80::1:2/112", true, "fe80::1:0", 112),
    ])
    func ipv6HostBitsAreDetectedAndMasked(text: String, hostBits: Bool, network: String, length: Int) throws {
        let block = try #require(CIDR(text))
        #expect(block.hostBitsSet == hostBits)
        #expect(block.network == IPAddress(network))
        #expect(block.prefixLength == length)
    }

    @Test func containsAtBoundaries() throws {
        let block = try #require(CIDR("192.168.4.0/22"))
        #expect(block.ipv4Range == 0xC0A8_0400...0xC0A8_07FF)
        #expect(!block.contains(.v4(0xC0A8_03FF)))
        #expect(block.contains(.v4(0xC0A8_0400)))
        #expect(block.contains(.v4(0xC0A8_07FF)))
        #expect(!block.contains(.v4(0xC0A8_0800)))
        // An IPv4 block does not contain the IPv4-mapped form of its addresses.
        #expect(!block.contains(.v6(0xFFFF_C0A8_0400)))
    }

    @Test func mappedIPv4Block() throws {
        let block = try #require(CIDR("::ffff:10.0.0.0/104"))
        #expect(block.mappedIPv4Block == CIDR("10.0.0.0/8"))
        #expect(CIDR("::ffff:0:0/96")?.mappedIPv4Block == CIDR("0.0.0.0/0"))
        #expect(CIDR("::ffff:1.2.3.4/128")?.mappedIPv4Block == CIDR("1.2.3.4/32"))
        #expect(CIDR("::ffff:1.2.3.4")?.mappedIPv4Block == CIDR("1.2.3.4/32"))
        // Wider than /96, or outside ::ffff:0:0/96, or IPv4: not a mapped block.
        #expect(CIDR("::ffff:0:0/95")?.mappedIPv4Block == nil)
        #expect(CIDR("::/0")?.mappedIPv4Block == nil)
        #expect(CIDR("::10.0.0.0/104")?.mappedIPv4Block == nil)
        #expect(CIDR("10.0.0.0/8")?.mappedIPv4Block == nil)
    }

    @Test(arguments: [
        "10.0.0.0/33", "10.0.0.0/", "::/129", "x/8", "10.0.0.0/-1", "10.0.0.0/+8", "10.0.0.0/8/8",
        "10.0.0.0/08a", "10.0.0.0/ 8", "/8", "", "10.0.0/8", "10.0.0.0/1000", "::/٣",
    ])
    func rejectsInvalid(text: String) {
        #expect(CIDR(text) == nil)
    }

    @Test func acceptsLeadingZeroPrefix() {
        // nginx's ngx_atoi accepts "08"; so does CIDR.
        #expect(CIDR("10.0.0.0/08") == CIDR("10.0.0.0/8"))
    }
}
