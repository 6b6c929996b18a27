import PortcullisCore
import PortcullisTestSupport
import Testing

@Suite struct LongestPrefixTableTests {
    static func block(_ text: String, _ value: Int32) -> (range: ClosedRange<UInt32>, prefixLength: Int, value: Int32) {
        let cidr = CIDR(text)!
        return (cidr.ipv4Range!, cidr.prefixLength, value)
    }

    static func key(_ text: String) -> UInt32 {
        guard case .v4(let value) = IPAddress(text)! else { fatalError() }
        return value
    }

    @Test func mostSpecificBlockWinsWhateverTheOrder() {
        let table = LongestPrefixTable<UInt32>(blocks: [
            Self.block("10.1.2.0/24", 2),
            Self.block("0.0.0.0/0", 0),
            Self.block("10.0.0.0/8", 1),
            Self.block("10.1.2.128/25", 3),
        ])
        #expect(table.lookup(Self.key("9.255.255.255")) == 0)
        #expect(table.lookup(Self.key("10.0.0.0")) == 1)
        #expect(table.lookup(Self.key("10.1.1.255")) == 1)
        #expect(table.lookup(Self.key("10.1.2.0")) == 2)
        #expect(table.lookup(Self.key("10.1.2.127")) == 2)
        #expect(table.lookup(Self.key("10.1.2.128")) == 3)
        #expect(table.lookup(Self.key("10.1.2.255")) == 3)
        #expect(table.lookup(Self.key("10.1.3.0")) == 1)
        #expect(table.lookup(Self.key("10.255.255.255")) == 1)
        #expect(table.lookup(Self.key("11.0.0.0")) == 0)
        #expect(table.lookup(Self.key("255.255.255.255")) == 0)
    }

    @Test func emptyAndUncoveredAreNil() {
        let empty = LongestPrefixTable<UInt32>(blocks: [])
        #expect(empty.lookup(0) == nil)
        #expect(empty.lookup(.max) == nil)
        let one = LongestPrefixTable<UInt32>(blocks: [Self.block("192.168.0.0/16", 7)])
        #expect(one.lookup(Self.key("192.167.255.255")) == nil)
        #expect(one.lookup(Self.key("192.168.0.0")) == 7)
        #expect(one.lookup(Self.key("192.168.255.255")) == 7)
        #expect(one.lookup(Self.key("192.169.0.0")) == nil)
    }

    @Test func theSameBlockTwiceKeepsTheLaterValue() {
        let table = LongestPrefixTable<UInt32>(blocks: [
            Self.block("10.0.0.0/8", 1), Self.block("10.5.0.0/16", 2), Self.block("10.0.0.0/8", 3),
        ])
        #expect(table.lookup(Self.key("10.1.0.0")) == 3)
        #expect(table.lookup(Self.key("10.5.1.1")) == 2)
    }

    @Test func ipv6Keys() {
        let blocks = [("2001:db8::/32", Int32(1)), ("2001:db8:1::/48", 2), ("::/0", 0)].map { text, value in
            let cidr = CIDR(text)!
            return (range: cidr.ipv6Range!, prefixLength: cidr.prefixLength, value: value)
        }
        let table = LongestPrefixTable<UInt128>(blocks: blocks)
        func key(_ text: String) -> UInt128 {
            guard case .v6(let value) = IPAddress(text)! else { fatalError() }
            return value
        }
        #expect(table.lookup(key("2001:db8:1::5")) == 2)
        #expect(table.lookup(key("2001:db8:2::5")) == 1)
        #expect(table.lookup(key("2001:db9::")) == 0)
        #expect(table.lookup(key("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")) == 0)
    }

    /// Against the definition: among the blocks containing the key, the longest prefix, and for
    /// equal blocks the one written last.
    @Test func randomizedAgainstDefinition() {
        var rng = SplitMix64(seed: 0x6E0)
        for _ in 0..<100 {
            var blocks: [(range: ClosedRange<UInt32>, prefixLength: Int, value: Int32)] = []
            let count = Int.random(in: 1...200, using: &rng)
            for i in 0..<count {
                // Shared high bits so that blocks nest and collide often.
                let length = Int.random(in: 0...32, using: &rng)
                let address = UInt32(10) << 24 | UInt32.random(in: 0...0x3FF, using: &rng) << 14
                    | UInt32.random(in: 0...0x3FFF, using: &rng)
                let cidr = CIDR(address: .v4(address), prefixLength: length)
                blocks.append((cidr.ipv4Range!, length, Int32(i)))
            }
            let table = LongestPrefixTable<UInt32>(blocks: blocks)
            var probes: [UInt32] = (0..<200).map { _ in UInt32(10) << 24 | UInt32.random(in: 0...0xFFFFFF, using: &rng) }
            for block in blocks.prefix(50) {
                probes += [block.range.lowerBound, block.range.upperBound]
                if block.range.lowerBound > 0 { probes.append(block.range.lowerBound - 1) }
                if block.range.upperBound < .max { probes.append(block.range.upperBound + 1) }
            }
            for probe in probes {
                var best: (length: Int, index: Int)?
                for (index, block) in blocks.enumerated() where block.range.contains(probe) {
                    if best == nil || block.prefixLength >= best!.length { best = (block.prefixLength, index) }
                }
                #expect(table.lookup(probe) == best.map { blocks[$0.index].value }, "probe \(probe)")
            }
        }
    }
}
