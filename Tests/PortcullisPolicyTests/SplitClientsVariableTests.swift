import Testing
import PortcullisCore
import PortcullisRules
@testable import PortcullisPolicy

/// `split_clients` without sockets: percentages as nginx reads them, bucket bounds, and the
/// located errors (the buckets themselves are checked against nginx in SplitClientsTests).
@Suite struct SplitClientsVariableTests {
    @Test("percentages in hundredths as ngx_atofp(…, 2) reads them; zero, three decimals and junk are refused")
    func percentages() {
        #expect(SplitClientsVariable.hundredths("0.5") == 50)
        #expect(SplitClientsVariable.hundredths("33.33") == 3333)
        #expect(SplitClientsVariable.hundredths("20") == 2000)
        #expect(SplitClientsVariable.hundredths(".5") == 50)
        #expect(SplitClientsVariable.hundredths("100") == 10_000)
        for bad in ["0", "0.00", "1.234", "x", "", "1.2.3", "-1"] {
            #expect(SplitClientsVariable.hundredths(Substring(bad)) == nil, "\(bad)")
        }
    }

    @Test("bounds are running sums of percent × 0xffffffff / 10000; * takes the rest; over 100 % is refused")
    func bounds() {
        #expect(SplitClientsVariable.bounds([5_000, 0]) == [0x7FFF_FFFF, 0])
        #expect(SplitClientsVariable.bounds([10_000]) == [0xFFFF_FFFF])
        #expect(SplitClientsVariable.bounds([6_000, 5_000]) == nil)
        #expect(SplitClientsVariable.bounds([5_000, 0, 100]) == nil)  // nginx: * counts as the rest
        let split = SplitClientsVariable(source: LogTemplate(parts: []), buckets: [(0x7FFF_FFFF, Array("a".utf8)), (0, Array("b".utf8))])
        let keys = (0..<1_000).map { Array("client-\($0)".utf8) }
        let a = keys.filter { split.value(for: $0) == Array("a".utf8) }.count
        #expect(a > 430 && a < 570, "\(a) of 1000 in the 50 % bucket")
    }

    static func errors(_ block: String) -> [String] {
        let result = RuleLoader.load(text: """
            stream {
                split_clients "$remote_addr" $v {
                    \(block)
                }
                server { listen 1; return $v; }
            }
            """, file: "rules.conf")
        return result.diagnostics.map { "\($0.location.map { "\($0.line):\($0.column)" } ?? "?") \($0.message)" }
    }

    @Test("located errors: a bad percentage, a total over 100 %, an entry without a value")
    func compilerErrors() {
        #expect(Self.errors("50% a; * b;").isEmpty)
        #expect(Self.errors("0.125% a;") == [
            "3:9 invalid percent value \"0.125%\" in \"split_clients\"; expected a percentage such as 0.5% or 25%, with at most two decimals, or \"*\"",
        ])
        #expect(Self.errors("60% a; 50% b;") == ["2:5 percent total is greater than 100% in \"split_clients\""])
        #expect(Self.errors("50%;").first?.contains("expected \"PERCENT% VALUE;\"") == true)
    }
}
