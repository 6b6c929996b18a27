import Foundation
import PortcullisRules
import PortcullisTestSupport
import Testing

/// Replays the rule-file fuzzer's committed corpus (Tests/Fuzz/corpus/rule-file) through the
/// harness's own checks (FuzzChecks/RuleFileFuzzChecks.swift), in every `swift test`. Names
/// say where a file came from: `seed-…` written by Tests/Fuzz/make-rule-file-corpus.py,
/// `crash-…` a reproducer of a fixed bug, anything else merged in by the fuzzer. See
/// docs/fuzzing.md.
@Suite struct RuleFileCorpusReplayTests {
    static let corpus = FuzzCorpus("rule-file")
    static var files: [String] { corpus.files }

    @Test func corpusIsThere() {
        #expect(Self.files.filter { $0.hasPrefix("seed-") }.count >= 30, "corpus at \(Self.corpus.directory.path)")
    }

    @Test func replaysEveryFile() throws {
        var skipped = 0
        for name in Self.files {
            let data = try Data(contentsOf: Self.corpus.directory.appendingPathComponent(name))
            let text = String(decoding: data, as: UTF8.self)
            guard RuleFileFuzzChecks.accepts(text) else { skipped += 1; continue }
            for violation in RuleFileFuzzChecks.violations(text) {
                Issue.record("\(name): \(violation)")
            }
        }
        // The seed script takes `include` out; merged inputs may hold it, but not many.
        #expect(skipped * 10 <= Self.files.count, "\(skipped) of \(Self.files.count) files skipped")
    }

    /// The two problems the fuzzer found, as fixed: a tie between equally close names is
    /// broken by name, whatever order the candidates come in (an upstream table's), and a
    /// file without a stream block is told so at its first line.
    @Test func foundProblemsStayFixed() {
        let tie = """
            stream {
                upstream l { server 10.0.0.1:80; }
                upstream r { server 10.0.0.1:80; }
                server { listen 1; proxy_pass u; }
            }
            """
        var suggestions: Set<String> = []
        for _ in 0..<20 {
            let result = RuleFileFuzzChecks.load(tie)
            for diagnostic in result.diagnostics where diagnostic.message.hasPrefix("unknown upstream \"u\"") {
                suggestions.insert(diagnostic.message)
            }
        }
        #expect(suggestions.count == 1 && suggestions.first?.contains("did you mean \"l\"") == true, "\(suggestions)")
        #expect(RuleFileFuzzChecks.violations(tie).isEmpty)
        let empty = RuleFileFuzzChecks.load("")
        #expect(empty.diagnostics.map(\.description) == ["fuzz.conf:1:1: error: no \"stream\" block is defined: there is nothing to listen on"])
        #expect(RuleFileFuzzChecks.violations("").isEmpty)
    }

    /// Seeds that are whole rule files from rules/ must still compile without errors (a seed
    /// that stopped compiling would only exercise the error paths).
    @Test func exampleSeedsCompile() throws {
        let examples = Self.files.filter { $0.hasPrefix("seed-rules-") }
        #expect(!examples.isEmpty)
        for name in examples {
            let data = try Data(contentsOf: Self.corpus.directory.appendingPathComponent(name))
            let result = RuleFileFuzzChecks.load(String(decoding: data, as: UTF8.self))
            #expect(!result.hasErrors, "\(name):\n\(result.rendered)")
        }
    }
}
