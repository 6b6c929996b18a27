import Foundation
import Testing
import PortcullisRules
import PortcullisTestSupport
@testable import PortcullisPolicy

/// The map-regex engine (`Sources/PortcullisPolicy/Regex/`): PCRE's matches and captures from a
/// linear-time Pike VM.
@Suite struct RegexEngineTests {
    /// Group 0…n of the leftmost-first match (nil: unset), or nil for no match.
    static func captures(_ pattern: String, _ subject: String, caseInsensitive: Bool = false) throws -> [String?]? {
        let regex = try MapRegex(pattern: pattern, caseInsensitive: caseInsensitive, value: 0)
        guard let match = regex.firstMatch(in: subject) else { return nil }
        return (0...regex.program.groupCount).map { n in
            match.slots[2 * n] < 0 ? nil : String(decoding: match.numbered(n), as: UTF8.self)
        }
    }

    struct Case: Sendable, CustomTestStringConvertible {
        var pattern: String
        var subject: String
        var expected: [String?]?
        var caseInsensitive = false
        var testDescription: String { "\(caseInsensitive ? "~*" : "~")\(pattern) on \(subject.debugDescription)" }
    }

    // Expected values are PCRE2's (checked with libpcre2-8 where PCRE and Swift's Regex differ).
    static let table: [Case] = [
        // Leftmost-first alternation: the first alternative that leads to a match, not the longest.
        Case(pattern: "(a|ab)(c|bcd)(d*)", subject: "abcd", expected: ["abcd", "a", "bcd", ""]),
        Case(pattern: "a|ab", subject: "ab", expected: ["a"]),
        Case(pattern: "ab|a", subject: "ab", expected: ["ab"]),
        // The leftmost match wins over a longer later one.
        Case(pattern: "b+|a", subject: "xabbb", expected: ["a"]),
        // An iteration that matches empty ends the loop (PCRE), so the group keeps "".
        Case(pattern: "(a*)+", subject: "aa", expected: ["aa", ""]),
        Case(pattern: "(a*)+", subject: "b", expected: ["", ""]),
        Case(pattern: "(a*)*", subject: "aa", expected: ["aa", ""]),
        Case(pattern: "(a|)+b", subject: "aab", expected: ["aab", ""]),
        Case(pattern: "(a*?)*", subject: "aa", expected: ["", ""]),
        // PCRE (not Swift's Regex) for {n,} of an empty-matching group: two copies, then a loop.
        Case(pattern: "(((c|\\b)){2,})", subject: "  cA", expected: ["c", "c", "c", "c"]),
        // A group inside a repeat keeps its last value.
        Case(pattern: "(?:(a)|b)+", subject: "ab", expected: ["ab", "a"]),
        Case(pattern: "((a)|b)*", subject: "ab", expected: ["ab", "b", "a"]),
        Case(pattern: "(a)|b", subject: "b", expected: ["b", nil]),
        // Greedy and lazy.
        Case(pattern: "<(.+)>", subject: "<a><b>", expected: ["<a><b>", "a><b"]),
        Case(pattern: "<(.+?)>", subject: "<a><b>", expected: ["<a>", "a"]),
        Case(pattern: "a{2,3}", subject: "aaaa", expected: ["aaa"]),
        Case(pattern: "a{2,3}?", subject: "aaaa", expected: ["aa"]),
        Case(pattern: "a{2,}?b", subject: "aaaab", expected: ["aaaab"]),
        Case(pattern: "(a|b)*?c", subject: "abc", expected: ["abc", "b"]),
        Case(pattern: "x{,2}", subject: "xxx", expected: ["xx"]),
        Case(pattern: "x{2}", subject: "x{2}xx", expected: ["xx"]),
        Case(pattern: "x{a}", subject: "x{a}", expected: ["x{a}"]),
        Case(pattern: "a??b", subject: "ab", expected: ["ab"]),
        // Anchors; `$` and `\Z` also before a final newline, `\z` not.
        Case(pattern: "^abc$", subject: "abc\n", expected: ["abc"]),
        Case(pattern: "^abc$", subject: "abc\n\n", expected: nil),
        Case(pattern: "abc\\Z", subject: "abc\n", expected: ["abc"]),
        Case(pattern: "abc\\z", subject: "abc\n", expected: nil),
        Case(pattern: "\\Aab", subject: "xab", expected: nil),
        Case(pattern: "^b", subject: "a\nb", expected: nil),
        Case(pattern: "(?m)^b$", subject: "a\nb\nc", expected: ["b"]),
        Case(pattern: "\\bfoo\\b", subject: "a foo.", expected: ["foo"]),
        Case(pattern: "\\bfoo\\b", subject: "afoo", expected: nil),
        Case(pattern: "\\Boo\\B", subject: "food", expected: ["oo"]),
        Case(pattern: "\\b", subject: "", expected: nil),
        Case(pattern: "", subject: "", expected: [""]),
        // `.` is not a newline, except with (?s).
        Case(pattern: "a.c", subject: "a\nc", expected: nil),
        Case(pattern: "(?s)a.c", subject: "a\nc", expected: ["a\nc"]),
        Case(pattern: "a.c", subject: "a\rc", expected: ["a\rc"]),
        // Case-insensitivity: `~*`, (?i), (?i:…) and (?-i).
        Case(pattern: "^mail\\.", subject: "MAIL.example", expected: ["MAIL."], caseInsensitive: true),
        Case(pattern: "[a-c]+", subject: "xABCa", expected: ["ABCa"], caseInsensitive: true),
        Case(pattern: "[^a-c]", subject: "ABCd", expected: ["d"], caseInsensitive: true),
        Case(pattern: "a(?i)b", subject: "aB", expected: ["aB"]),
        Case(pattern: "A(?i)b", subject: "aB", expected: nil),
        Case(pattern: "(?i:a)b", subject: "AB", expected: nil),
        Case(pattern: "(?i)a(?-i)b", subject: "Ab", expected: ["Ab"]),
        Case(pattern: "(a(?i)b|c)", subject: "C", expected: ["C", "C"]),
        Case(pattern: "[[:upper:]]+", subject: "abC", expected: ["abC"], caseInsensitive: true),
        // Named groups, numbered with the others.
        Case(pattern: "^(?<sub>[^.]+)\\.example\\.com$", subject: "www.example.com", expected: ["www.example.com", "www"]),
        Case(pattern: "(?P<a>x)(y)(?'c'z)", subject: "xyz", expected: ["xyz", "x", "y", "z"]),
        // Classes and escapes.
        Case(pattern: "[]a]+", subject: "x]a]", expected: ["]a]"]),
        Case(pattern: "[^]a]", subject: "]ab", expected: ["b"]),
        Case(pattern: "[a-]+", subject: "x-a-", expected: ["-a-"]),
        Case(pattern: "[\\d.]+", subject: "v1.20", expected: ["1.20"]),
        Case(pattern: "[^\\D]+", subject: "ab12", expected: ["12"]),
        Case(pattern: "\\w+\\s\\S", subject: "  ab_1 !", expected: ["ab_1 !"]),
        Case(pattern: "[[:alpha:]][[:digit:]][[:^space:]]", subject: "a1 a1b", expected: ["a1b"]),
        Case(pattern: "\\x41\\x{42}\\t\\n\\.", subject: "AB\t\n.", expected: ["AB\t\n."]),
        Case(pattern: "\\Q.*\\E+", subject: "a.**", expected: [".**"]),
        Case(pattern: "a\\/b\\-c", subject: "a/b-c", expected: ["a/b-c"]),
        Case(pattern: "(?x) a b # comment\n c", subject: "abc", expected: ["abc"]),
        Case(pattern: "a(?#note)b", subject: "ab", expected: ["ab"]),
        Case(pattern: "\\d+", subject: "٣3", expected: ["3"]),  // \d is ASCII, as PCRE without UCP
        // Non-ASCII: `.` and classes take a whole UTF-8 scalar.
        Case(pattern: "^(.)(.)$", subject: "éñ", expected: ["éñ", "é", "ñ"]),
        Case(pattern: "[^a]+", subject: "aпривет", expected: ["привет"]),
        Case(pattern: "[а-я]+", subject: "xпривет", expected: ["привет"]),
        Case(pattern: "ПРИВЕТ", subject: "привет", expected: ["привет"], caseInsensitive: true),
        Case(pattern: "(?i)é", subject: "É", expected: ["É"]),
        Case(pattern: "\\p{L}+", subject: "1été2", expected: ["été"]),
        Case(pattern: "\\P{L}+", subject: "été12", expected: ["12"]),
        Case(pattern: "[\\p{Lu}\\d]+", subject: "abÉ1c", expected: ["É1"]),
        Case(pattern: "\\x{1F600}.", subject: "😀😁", expected: ["😀😁"]),
    ]

    @Test(arguments: table)
    func cases(_ c: Case) throws {
        #expect(try Self.captures(c.pattern, c.subject, caseInsensitive: c.caseInsensitive) == c.expected)
    }

    /// 3,000 random patterns and subjects whose answers came from PCRE2 itself.
    @Test("PCRE2 vectors", .timeLimit(.minutes(1)))
    func pcre2Vectors() throws {
        let file = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/regex/pcre2-vectors.tsv")
        let text = try String(contentsOf: file, encoding: .utf8)
        var checked = 0
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            let fields = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
            try #require(fields.count == 4, "\(line)")
            let subject = fields[2].replacingOccurrences(of: "\\n", with: "\n")
            let found = try Self.captures(fields[1], subject, caseInsensitive: fields[0] == "~*")
            let rendered = found.map { $0.map { $0.map { "[" + $0.replacingOccurrences(of: "\n", with: "\\n") + "]" } ?? "nil" }.joined(separator: " ") } ?? "no"
            #expect(rendered == fields[3], "\(fields[0])\(fields[1]) on \(subject.debugDescription)")
            checked += 1
        }
        #expect(checked == 3_000)
    }

    /// Swift's `Regex` backtracks leftmost-first too, so on small inputs its captures must be ours.
    /// Left out, where Swift's Regex is not PCRE: `\n` and `\r` (its `$` and `.`), digits in
    /// subjects (its `\b`, even the "simple" kind asked for here, is not PCRE's next to one), and
    /// `{n,}` with n ≥ 2 (it skips the copies of an empty-matching group).
    @Test("differential against Swift's Regex", .timeLimit(.minutes(2)))
    func differential() throws {
        var random = SplitMix64(seed: 0x5EED_0016)
        var compared = 0, matched = 0, captured = 0
        for _ in 0..<2_000 {
            let pattern = Self.randomPattern(&random, depth: 4)
            let caseInsensitive = random.next() % 5 == 0
            var swift = try Regex(pattern).matchingSemantics(.unicodeScalar).wordBoundaryKind(.simple)
            if caseInsensitive { swift = swift.ignoresCase() }
            let ours = try MapRegex(pattern: pattern, caseInsensitive: caseInsensitive, value: 0)
            for _ in 0..<4 {
                let alphabet = Array("abcA ")
                let subject = String((0..<Int(random.next() % 8)).map { _ in alphabet[Int(random.next() % UInt64(alphabet.count))] })
                var theirs: [String?]?
                if let match = try swift.firstMatch(in: subject) {
                    theirs = (0..<match.output.count).map { match.output[$0].substring.map(String.init) }
                }
                var mine: [String?]?
                if let match = ours.firstMatch(in: subject) {
                    mine = (0...ours.program.groupCount).map { n in
                        match.slots[2 * n] < 0 ? nil : String(decoding: match.numbered(n), as: UTF8.self)
                    }
                }
                #expect(mine == theirs, "~\(caseInsensitive ? "*" : "")\(pattern) on \(subject.debugDescription)")
                compared += 1
                if mine != nil { matched += 1 }
                if mine?.dropFirst().contains(where: { $0 != nil && $0 != "" }) == true { captured += 1 }
            }
        }
        #expect(compared == 8_000)
        // The comparison means something only if both sides often match, and often capture
        // text: an engine that never matched would agree with Swift's Regex on no-match only.
        print("regex differential: \(compared) compared, \(matched) matched, \(captured) with non-empty groups")
        #expect(matched > compared / 4 && matched < compared, "\(matched) of \(compared) matched")
        #expect(captured > compared / 10, "\(captured) of \(compared) captured text")
    }

    static func randomPattern(_ random: inout SplitMix64, depth: Int) -> String {
        let atoms = ["a", "b", "c", ".", "[ab]", "[^a]", "\\b", "\\B", "^", "$", "a", "b", "", "\\w", "\\s", "[a-c]", "\\d", "[[:alpha:]]", "\\z"]
        let choice = random.next() % 10
        if depth == 0 || choice < 3 { return atoms[Int(random.next() % UInt64(atoms.count))] }
        switch choice {
        case 3, 4: return randomPattern(&random, depth: depth - 1) + randomPattern(&random, depth: depth - 1)
        case 5: return randomPattern(&random, depth: depth - 1) + "|" + randomPattern(&random, depth: depth - 1)
        case 6: return "(" + randomPattern(&random, depth: depth - 1) + ")"
        case 7: return "(?:" + randomPattern(&random, depth: depth - 1) + ")"
        default:
            let quantifiers = ["*", "+", "?", "{2}", "{1,3}", "{0,2}", "{1,}", "*?", "+?", "??", "{1,2}?"]
            return "(" + randomPattern(&random, depth: depth - 1) + ")" + quantifiers[Int(random.next() % UInt64(quantifiers.count))]
        }
    }

    /// Patterns that take a backtracking engine exponential or high-polynomial time, on
    /// 30–50 KB subjects: each answers correctly, in well under the limit even in a debug build.
    @Test(.timeLimit(.minutes(1)), arguments: [
        ("(.*a){20}", String(repeating: "a", count: 30_000) + "b", true, 30_000),
        ("(.*a){20}", String(repeating: "a", count: 19) + String(repeating: "b", count: 30_000), false, 0),
        ("a*a*a*a*a*b", String(repeating: "a", count: 40_000), false, 0),
        ("a*a*a*a*a*b", String(repeating: "a", count: 40_000) + "b", true, 40_001),
        ("(a+)+$", String(repeating: "a", count: 50_000) + "!", false, 0),
        ("(a+)+$", String(repeating: "a", count: 50_000), true, 50_000),
        ("(a|aa)*b", String(repeating: "a", count: 40_000), false, 0),
        ("(a|aa)*b", String(repeating: "a", count: 40_000) + "b", true, 40_001),
        ("(x+x+)+y", String(repeating: "x", count: 40_000), false, 0),
        ("^(\\w*\\s?)*$", String(repeating: "ab ", count: 12_000) + "!", false, 0),
    ] as [(String, String, Bool, Int)])
    func catastrophicPatternsAreLinear(pattern: String, subject: String, matches: Bool, length: Int) throws {
        let regex = try MapRegex(pattern: pattern, caseInsensitive: false, value: 0)
        let start = ContinuousClock.now
        let match = regex.firstMatch(in: subject)
        let elapsed = ContinuousClock.now - start
        #expect((match != nil) == matches)
        if let match { #expect(match.numbered(0).count == length) }
        #expect(elapsed < .seconds(10), "\(pattern) on \(subject.utf8.count) bytes took \(elapsed)")
    }

    @Test("a program over 10,000 instructions is refused, with the reason")
    func instructionLimit() throws {
        #expect(throws: Never.self) { try MapRegex(pattern: "a{9000}", caseInsensitive: false, value: 0) }
        for pattern in ["a{10000}", "(a{100}){100}", "(?:[a-z]{1,100}\\.){1,100}", "((a|b){1000}){1000}"] {
            do {
                _ = try MapRegex(pattern: pattern, caseInsensitive: false, value: 0)
                Issue.record("\(pattern) compiled")
            } catch {
                guard case .tooLarge(_, let limit) = error.kind else { Issue.record("\(pattern): \(error)"); continue }
                #expect(limit == 10_000)
                #expect(error.description.hasPrefix("the pattern compiles to more than 10000 instructions"))
            }
        }
    }

    @Test(arguments: [
        ("(a)\\1", "a backreference", 3), ("(?<x>a)\\k<x>", "a backreference", 7), ("(?P<x>a)(?P=x)", "a backreference", 8),
        ("\\g1", "a backreference", 0), ("a(?=b)", "a lookahead assertion", 1), ("a(?!b)", "a lookahead assertion", 1),
        ("(?<=a)b", "a lookbehind assertion", 0), ("(?<!a)b", "a lookbehind assertion", 0), ("(?>a+)b", "an atomic group", 0),
        ("a++", "a possessive quantifier", 2), ("a*+b", "a possessive quantifier", 2), ("a{2,}+", "a possessive quantifier", 5),
        ("(a|(?R))", "recursion or a subroutine call", 3), ("(a)(?1)", "recursion or a subroutine call", 3),
        ("(?(1)a|b)", "a conditional group", 0), ("a\\Kb", "\\K (reset match start)", 1), ("(*UTF)a", "a backtracking control verb \"(*…)\"", 0),
        ("\\X", "\\X (extended grapheme cluster)", 0), ("\\p{Greek}", "the Unicode property \"Greek\" (only general categories such as \\p{L}, \\p{Lu}, \\p{Nd})", 0),
    ] as [(String, String, Int)])
    func backtrackingFeaturesAreRefused(pattern: String, feature: String, offset: Int) {
        do {
            _ = try MapRegex(pattern: pattern, caseInsensitive: false, value: 0)
            Issue.record("\(pattern) compiled")
        } catch {
            #expect(error == RegexSyntaxError(kind: .unsupported(feature: feature), offset: offset), "\(pattern): \(error)")
            #expect(error.description.hasSuffix("is not supported (it needs backtracking; the map regex engine runs in linear time)"))
        }
    }

    @Test(arguments: ["(unclosed", "a)", "[a", "*a", "a{3,2}", "[z-a]", "\\", "(?<1a>x)", "(?<n>a)(?<n>b)", "[[:nope:]]", "(?Z)", "\\x{110000}"])
    func malformedPatternsAreRefused(pattern: String) {
        #expect(throws: RegexSyntaxError.self) { try MapRegex(pattern: pattern, caseInsensitive: false, value: 0) }
    }

    @Test("refusals are located errors of the rules")
    func locatedErrors() {
        let text = "stream {\n    map $remote_addr $m {\n        ~^(a)\\1 x;\n    }\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n"
        let errors = RuleLoader.load(text: text, file: "rules.conf").diagnostics.filter { $0.severity == .error }.map(\.description)
        #expect(errors.count == 1)
        #expect(errors.first?.hasPrefix("rules.conf:3:9: error: invalid regular expression \"^(a)\\1\" in \"map\": a backreference at offset 4 is not supported (it needs backtracking") == true, "\(errors)")
        let large = "stream {\n    map $remote_addr $m {\n        \"~x{20000}\" x;\n    }\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n"
        let largeErrors = RuleLoader.load(text: large, file: "rules.conf").diagnostics.filter { $0.severity == .error }.map(\.description)
        #expect(largeErrors.first?.hasPrefix("rules.conf:3:9: error: invalid regular expression \"x{20000}\" in \"map\": the pattern compiles to more than 10000 instructions") == true, "\(largeErrors)")
    }

    @Test("health-check answers are matched byte for byte (Latin-1)")
    func latin1() throws {
        let regex = try MapRegex(pattern: "^\\x24\\x00.\\xff$", caseInsensitive: false, value: 0)
        #expect(regex.matches(latin1: [0x24, 0x00, 0xC3, 0xFF]))
        #expect(!regex.matches(latin1: [0x24, 0x00, 0xC3, 0xA9, 0xFF]), "one byte is one character")
        #expect(try MapRegex(pattern: "ok", caseInsensitive: true, value: 0).matches(latin1: Array("200 OK".utf8)))
    }
}
