import Testing
@testable import PortcullisRules

@Suite struct UnitsTests {
    @Test(arguments: [
        ("512", 512), ("0", 0), ("16k", 16 * 1024), ("16K", 16 * 1024), ("10m", 10 << 20), ("10M", 10 << 20),
        ("1g", 1 << 30), ("2G", 2 << 30),
    ])
    func sizes(text: String, bytes: Int) {
        #expect(Units.size(text) == bytes)
    }

    @Test(arguments: ["", "k", "16kb", "1.5k", "-1", "+1", "16 k", "1t", "abc", "99999999999999999999", "9223372036854775807k"])
    func badSizes(text: String) {
        #expect(Units.size(text) == nil)
    }

    @Test(arguments: [
        ("500ms", 500), ("30s", 30_000), ("10m", 600_000), ("1h", 3_600_000), ("1d", 86_400_000),
        ("1w", 604_800_000), ("1M", 2_592_000_000), ("1y", 31_536_000_000), ("1m30s", 90_000), ("30", 30_000),
        ("0", 0), ("1h1m1s1ms", 3_661_001), ("2s500ms", 2_500), ("0s", 0),
    ])
    func times(text: String, milliseconds: Int) {
        #expect(Units.milliseconds(text) == milliseconds)
    }

    @Test(arguments: ["30s1m", "10x", "", "s", "ms", "1m1m", "1.5s", "-1s", "1s ", " 1s", "1S", "1mss", "1hm",
                      "99999999999999999999"])
    func badTimes(text: String) {
        #expect(Units.milliseconds(text) == nil)
    }
}
