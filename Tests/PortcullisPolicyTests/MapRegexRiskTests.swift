import Foundation
import Testing
import PortcullisRules
@testable import PortcullisPolicy

/// A client can choose the string a map matches (a PROXY TLV, an SNI name). The patterns that
/// used to be refused because a backtracking matcher could take exponential time on them now
/// compile, and the linear-time engine answers hostile 10–100 KB keys quickly and correctly.
@Suite struct MapRegexRiskTests {
    private func errors(_ key: String) -> [String] {
        let text = "stream {\n    map $remote_addr $m {\n        \"\(key)\" x;\n    }\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n"
        return RuleLoader.load(text: text, file: "rules.conf").diagnostics.filter { $0.severity == .error }.map(\.description)
    }

    @Test(.timeLimit(.minutes(1)), arguments: [
        // pattern, a hostile key, does it match, the match's length
        ("~^(a+)+$", String(repeating: "a", count: 100_000) + "!", false, 0),
        ("~(\\w*\\s?)*x", String(repeating: "ab ", count: 20_000), false, 0),
        ("~(\\w*\\s?)*x", String(repeating: "ab ", count: 20_000) + "x", true, 60_001),
        ("~^(a|ab)+$", String(repeating: "ab", count: 30_000) + "c", false, 0),
        ("~(x{2,})*", String(repeating: "x", count: 50_000), true, 50_000),
        ("~*((ab)*c)+", String(repeating: "AB", count: 40_000) + "c", true, 80_001),
        ("~^(?:[a-z]+\\.)+example$", String(repeating: "a.", count: 20_000) + "example.", false, 0),
    ] as [(String, String, Bool, Int)])
    func nestedRepetitionIsAllowedAndLinear(key: String, subject: String, matches: Bool, length: Int) throws {
        let problems = errors(key)
        #expect(problems.isEmpty, "\(key): \(problems)")
        let caseInsensitive = key.hasPrefix("~*")
        let regex = try MapRegex(pattern: String(key.dropFirst(caseInsensitive ? 2 : 1)), caseInsensitive: caseInsensitive, value: 0)
        let start = ContinuousClock.now
        let match = regex.firstMatch(in: subject)
        let elapsed = ContinuousClock.now - start
        #expect((match != nil) == matches, "\(key)")
        if let match { #expect(match.numbered(0).count == length, "\(key)") }
        #expect(elapsed < .seconds(10), "\(key) on \(subject.utf8.count) bytes took \(elapsed)")
    }

    @Test(arguments: [
        "~^(www\\.)?example\\.(com|org)$", "~^10\\.(\\d+)\\.", "~^(?<cc>[A-Z]{2})$", "~(ab)+", "~[a+]+x",
        "~\\(a+\\)+", "~^(a{1,3}b)+$", "~*^(GET|POST) ",
    ])
    func ordinaryPatternsAreAccepted(key: String) {
        let problems = errors(key)
        #expect(problems.isEmpty, "\(key): \(problems)")
    }
}
