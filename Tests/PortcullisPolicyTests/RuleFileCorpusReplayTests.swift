import Foundation
import PortcullisRules
import Testing

/// Replays the rule-file fuzzer's committed corpus (Tests/Fuzz/corpus/rule-file) through the
/// harness's own checks (FuzzChecks/RuleFileFuzzChecks.swift), in every `swift test`. Names
/// say where a file came from: `seed-…` written by Tests/Fuzz/make-rule-file-corpus.py,
/// `crash-…` a reproducer of a fixed bug, anything else merged in by the fuzzer. See
/// docs/fuzzing.md.
@Suite struct RuleFileCorpusReplayTests {
    static let corpus = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent()
        .deletingLastPathComponent()
        .appendingPathComponent("Fuzz/corpus/rule-file")

    static let files: [String] = {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: corpus.path)) ?? []
        return names.filter { !$0.hasPrefix(".") }.sorted()
    }()

    @Test func corpusIsThere() {
        #expect(Self.files.filter { $0.hasPrefix("seed-") }.count >= 30, "corpus at \(Self.corpus.path)")
    }

    @Test func replaysEveryFile() throws {
        var skipped = 0
        for name in Self.files {
            let data = try Data(contentsOf: Self.corpus.appendingPathComponent(name))
            let text = String(decoding: data, as: UTF8.self)
            guard RuleFileFuzzChecks.accepts(text) else { skipped += 1; continue }
            for violation in RuleFileFuzzChecks.violations(text) {
                Issue.record("\(name): \(violation)")
            }
        }
        // The seed script takes `include` out; merged inputs may hold it, but not many.
        #expect(skipped * 10 <= Self.files.count, "\(skipped) of \(Self.files.count) files skipped")
    }

    /// Each problem the checks tolerate still happens for its reproducer; once it is fixed,
    /// take it out of `RuleFileFuzzChecks.toleratedUnlocated`.
    @Test func toleratedProblemsStillHappen() {
        for (message, reproducer) in RuleFileFuzzChecks.toleratedUnlocated {
            let result = RuleFileFuzzChecks.load(reproducer)
            #expect(result.diagnostics.contains { $0.location == nil && $0.message.hasPrefix(message) },
                    "fixed? \(message.debugDescription) for \(reproducer.debugDescription): \(result.rendered)")
        }
    }

    /// The suggestion tie's cause is still there: closestMatch keeps whichever best candidate
    /// comes first, so the order of a dictionary's keys decides. Once ties are broken by name,
    /// take the tolerance out of `RuleFileFuzzChecks.violations`.
    @Test func suggestionTieStillDependsOnOrder() {
        #expect(closestMatch(to: "u", in: ["l", "r"]) != closestMatch(to: "u", in: ["r", "l"]),
                "fixed? take the suggestion tolerance out of RuleFileFuzzChecks")
        let result = RuleFileFuzzChecks.load(RuleFileFuzzChecks.suggestionTieReproducer)
        #expect(result.diagnostics.contains { $0.message.hasPrefix("unknown upstream \"u\"") }, "\(result.rendered)")
    }

    /// Seeds that are whole rule files from rules/ must still compile without errors (a seed
    /// that stopped compiling would only exercise the error paths).
    @Test func exampleSeedsCompile() throws {
        let examples = Self.files.filter { $0.hasPrefix("seed-rules-") }
        #expect(!examples.isEmpty)
        for name in examples {
            let data = try Data(contentsOf: Self.corpus.appendingPathComponent(name))
            let result = RuleFileFuzzChecks.load(String(decoding: data, as: UTF8.self))
            #expect(!result.hasErrors, "\(name):\n\(result.rendered)")
        }
    }
}
