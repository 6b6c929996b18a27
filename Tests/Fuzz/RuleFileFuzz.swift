// libFuzzer harness for the rule-file front end: lexer, parser and compiler, as `portcullis
// check` runs them (RuleLoader.load). Built and run by `Tests/Fuzz/run-fuzzer.sh rule-file`
// together with Tests/PortcullisPolicyTests/FuzzChecks/RuleFileFuzzChecks.swift, whose checks
// RuleFileCorpusReplayTests also runs on the committed corpus; see docs/fuzzing.md. Not part
// of the SwiftPM package.
//
// The input is the rule file's text (invalid UTF-8 becomes U+FFFD, as `String(decoding:)`
// makes it; the parser's own UTF-8 check is for files read from disk). Inputs containing
// "include" are skipped, so the fuzzer never reads the file system. For the others: loading
// must not crash, every error is located inside the text, a snapshot comes exactly when there
// is no error, and loading again gives the same diagnostics.
#if canImport(Glibc)
import Glibc
#endif

@_cdecl("LLVMFuzzerTestOneInput")
public func ruleFileFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size))
    let text = String(decoding: bytes, as: UTF8.self)
    guard RuleFileFuzzChecks.accepts(text) else { return 0 }
    let violations = RuleFileFuzzChecks.violations(text)
    if !violations.isEmpty {
        // -O drops precondition messages; fatalError keeps its own.
        fatalError("rule-file: " + violations.joined(separator: "\n"))
    }
    return 0
}
