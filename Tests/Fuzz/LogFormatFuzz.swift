// libFuzzer harness for log lines: `log_format` templates rendered with hostile values, and
// the audit line. Built and run by `Tests/Fuzz/run-fuzzer.sh log-format` together with
// Tests/PortcullisPolicyTests/FuzzChecks/LogFormatFuzzChecks.swift, whose checks
// LogFormatCorpusReplayTests also runs on the committed corpus; see docs/fuzzing.md. Not part
// of the SwiftPM package.
//
// The input is split at 0xFF bytes: a template, then the values a client chooses (SNI, ALPN,
// PROXY TLVs, TLS names, a refusing variable's value, a limit key, a unix client's path, …).
// Nothing may crash; with escape=default the line is printable ASCII and every value unescapes
// back; with escape=json and the audit line, the line is one JSON object in which the values
// come back; values add no newline or quote to the fuzzed template's line.

@_cdecl("LLVMFuzzerTestOneInput")
public func logFormatFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size))
    let violations = LogFormatFuzzChecks.violations(bytes)
    if !violations.isEmpty {
        // -O drops precondition messages; fatalError keeps its own.
        fatalError("log-format: " + violations.joined(separator: "\n"))
    }
    return 0
}
