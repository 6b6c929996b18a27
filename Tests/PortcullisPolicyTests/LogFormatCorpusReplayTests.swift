import Foundation
import PortcullisTestSupport
import Testing

/// Replays the log-format fuzzer's committed corpus (Tests/Fuzz/corpus/log-format) through the
/// harness's own checks (FuzzChecks/LogFormatFuzzChecks.swift), in every `swift test`. Names
/// say where a file came from: `seed-…` written by Tests/Fuzz/make-log-format-corpus.py,
/// `crash-…` a reproducer of a fixed bug, anything else merged in by the fuzzer. See
/// docs/fuzzing.md.
@Suite struct LogFormatCorpusReplayTests {
    static let corpus = FuzzCorpus("log-format")
    static var files: [String] { corpus.files }

    @Test func corpusIsThere() {
        #expect(Self.files.filter { $0.hasPrefix("seed-") }.count >= 30, "corpus at \(Self.corpus.directory.path)")
    }

    @Test func replaysEveryFile() throws {
        for name in Self.files {
            let bytes = [UInt8](try Data(contentsOf: Self.corpus.directory.appendingPathComponent(name)))
            for violation in LogFormatFuzzChecks.violations(bytes) {
                Issue.record("\(name): \(violation)")
            }
        }
    }

    /// The checks' own helpers tell good lines from bad ones.
    @Test func checksTellBadLinesApart() {
        #expect(LogFormatFuzzChecks.oneLine("x\ny", "line").count == 1)
        #expect(LogFormatFuzzChecks.oneLine("x\\ny", "line").isEmpty)
        #expect(LogFormatFuzzChecks.unescapeDefault(Array(#"a\x22\x0Ab"#.utf8)) == Array("a\"\nb".utf8))
        #expect(LogFormatFuzzChecks.unescapeDefault(Array(#"a\x2"#.utf8)) == nil)
        #expect(LogFormatFuzzChecks.unescapeDefault(Array(#"a\"#.utf8)) == nil)
        // "é" as one scalar and as e + combining acute: equal Strings, different lines.
        #expect(!LogFormatFuzzChecks.same("\u{E9}", "e\u{301}", "text").isEmpty)
        // A value split off at 0xFF lands in its slot.
        let (template, values) = LogFormatFuzzChecks.split([0x24, 0x41, 0xFF, 0x0A, 0xFF])
        #expect(template == "$A" && values[0] == [0x0A] && values[1] == [] && values[2] == nil)
    }
}
