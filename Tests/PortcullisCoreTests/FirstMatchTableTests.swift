import Testing
import PortcullisTestSupport
@testable import PortcullisCore

@Suite struct FirstMatchTableTests {
    @Test func emptyTableMatchesNothing() {
        let table = FirstMatchTable<UInt32>(ranges: [])
        #expect(table.isEmpty)
        #expect(table.segmentCount == 1)
        #expect(table.firstMatch(0) == nil)
        #expect(table.firstMatch(UInt32.max) == nil)
    }

    @Test func lowestIndexWinsOnOverlap() {
        // rule 0: 100...199, rule 1: 0...max, rule 2: 150...160
        let table = FirstMatchTable<UInt32>(ranges: [(100...199, 0), (0...UInt32.max, 1), (150...160, 2)])
        #expect(!table.isEmpty)
        #expect(table.firstMatch(0) == 1)
        #expect(table.firstMatch(99) == 1)
        #expect(table.firstMatch(100) == 0)
        #expect(table.firstMatch(155) == 0)
        #expect(table.firstMatch(199) == 0)
        #expect(table.firstMatch(200) == 1)
        #expect(table.firstMatch(UInt32.max) == 1)
        #expect(table.segmentCount == 3)
    }

    @Test func laterNarrowRuleShowsThroughAfterEarlierEnds() {
        let table = FirstMatchTable<UInt32>(ranges: [(10...20, 0), (15...30, 1), (25...25, 2)])
        #expect(table.firstMatch(9) == nil)
        #expect(table.firstMatch(10) == 0)
        #expect(table.firstMatch(20) == 0)
        #expect(table.firstMatch(21) == 1)
        #expect(table.firstMatch(25) == 1)
        #expect(table.firstMatch(30) == 1)
        #expect(table.firstMatch(31) == nil)
    }

    @Test func rangesTouchingTheEnds() {
        let table = FirstMatchTable<UInt8>(ranges: [(0...0, 3), (255...255, 1), (0...255, 2)])
        #expect(table.firstMatch(0) == 2)
        #expect(table.firstMatch(1) == 2)
        #expect(table.firstMatch(254) == 2)
        #expect(table.firstMatch(255) == 1)
    }

    @Test func adjacentSegmentsWithSameRuleAreMerged() {
        // Distinct rules: 0 on 0...9, 1 on 10...19, and rule 2 on 0...29 behind them.
        let table = FirstMatchTable<UInt32>(ranges: [(0...9, 0), (10...19, 1), (0...29, 2)])
        #expect(table.firstMatch(9) == 0)
        #expect(table.firstMatch(10) == 1)
        #expect(table.firstMatch(19) == 1)
        #expect(table.firstMatch(20) == 2)
        #expect(table.firstMatch(29) == 2)
        #expect(table.firstMatch(30) == nil)
        // [0,10) rule 0, [10,20) rule 1, [20,30) rule 2, [30,max] none.
        #expect(table.segmentCount == 4)
        let merged = FirstMatchTable<UInt32>(ranges: [(0...9, 1), (10...19, 2), (0...19, 0)])
        #expect(merged.firstMatch(15) == 0)
        #expect(merged.segmentCount == 2)
    }

    @Test func adjacentRangesOfOneRule() {
        // The same rule index on two touching ranges: the second opens where the first closes.
        let table = FirstMatchTable<UInt32>(ranges: [(0...9, 0), (10...19, 0), (5...15, 1)])
        #expect(table.firstMatch(0) == 0)
        #expect(table.firstMatch(12) == 0)
        #expect(table.firstMatch(19) == 0)
        #expect(table.firstMatch(20) == nil)
    }

    @Test func overlappingRangesOfOneRule() {
        // The same rule index given twice with overlapping ranges must still cover their union.
        let table = FirstMatchTable<UInt32>(ranges: [(0...10, 0), (5...20, 0)])
        #expect(table.firstMatch(15) == 0)
        #expect(table.firstMatch(3) == 0)
        #expect(table.firstMatch(21) == nil)
    }

    @Test func randomizedAgainstScan() {
        var rng = SplitMix64(seed: 0xF1257)
        for _ in 0..<200 {
            // Up to 120 ranges: tables on both sides of SegmentTable.unindexedLimit.
            let count = Int.random(in: 1...120, using: &rng)
            var ranges: [(range: ClosedRange<UInt16>, rule: Int32)] = []
            for rule in 0..<count {
                let a = UInt16.random(in: 0...UInt16.max, using: &rng) & 0xFF0F
                let b = UInt16.random(in: 0...UInt16.max, using: &rng) | (Bool.random(using: &rng) ? 0x00F0 : 0)
                ranges.append((min(a, b)...max(a, b), Int32(rule)))
            }
            ranges.shuffle(using: &rng)
            let table = FirstMatchTable<UInt16>(ranges: ranges)
            var probes: [UInt16] = [0, .max]
            for entry in ranges {
                probes += [entry.range.lowerBound, entry.range.upperBound]
                if entry.range.lowerBound > 0 { probes.append(entry.range.lowerBound - 1) }
                if entry.range.upperBound < .max { probes.append(entry.range.upperBound + 1) }
            }
            for _ in 0..<50 { probes.append(UInt16.random(in: 0...UInt16.max, using: &rng)) }
            for key in probes {
                let expected = ranges.filter { $0.range.contains(key) }.map(\.rule).min()
                #expect(table.firstMatch(key) == expected, "key \(key) in \(ranges)")
            }
        }
    }

    @Test func smallTablesHaveNoIndex() {
        let limit = SegmentTable<UInt32>.unindexedLimit
        // n disjoint single-key ranges with gaps make 2n + 1 segments.
        func table(_ n: Int) -> SegmentTable<UInt32> {
            var starts: [UInt32] = [0]
            var values: [Int32] = [-1]
            for i in 0..<n {
                starts += [UInt32(i * 10 + 5), UInt32(i * 10 + 6)]
                values += [Int32(i), -1]
            }
            return SegmentTable(starts: starts, values: values)
        }
        let small = table((limit - 1) / 2), large = table(limit)
        #expect(!small.isIndexed && small.count <= limit)
        #expect(large.isIndexed)
        for (n, t) in [((limit - 1) / 2, small), (limit, large)] {
            for i in 0..<n {
                #expect(t.value(at: UInt32(i * 10 + 5)) == Int32(i))
                #expect(t.value(at: UInt32(i * 10 + 6)) == nil)
            }
            #expect(t.value(at: .max) == nil)
        }
    }
}
