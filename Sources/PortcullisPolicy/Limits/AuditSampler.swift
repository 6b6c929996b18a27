/// `audit_log PATH sample=N/s`: a flood of refusals must not flood the disk. At most N audit
/// lines are written per second (wall clock, whole seconds); the rest are counted, and when a
/// later second begins (or the log is closed) one summary line says how many were left out
/// and in which phases.
public struct AuditSampler: Sendable {
    public let linesPerSecond: Int
    private var second: Int64 = .min
    private var written = 0
    private var suppressed: [String: Int] = [:]
    private var suppressedSince: Double = 0
    private var lastSuppressed: Double = 0

    public init(linesPerSecond: Int) { self.linesPerSecond = linesPerSecond }

    /// For one line about to be written at `now` (seconds since 1970) from `phase`: whether to
    /// write it, and a summary line to write before it, if a flood just ended a second.
    public mutating func admit(phase: String, now: Double) -> (write: Bool, summary: String?) {
        let current = Int64(now.rounded(.down))
        var summary: String?
        if current != second {
            summary = takeSummary()
            second = current
            written = 0
        }
        guard written < linesPerSecond else {
            if suppressed.isEmpty { suppressedSince = now }
            suppressed[phase, default: 0] += 1
            lastSuppressed = now
            return (false, summary)
        }
        written += 1
        return (true, summary)
    }

    /// The summary of lines left out and not yet reported (at close, or a new second).
    public mutating func takeSummary() -> String? {
        guard !suppressed.isEmpty else { return nil }
        defer { suppressed = [:] }
        let total = suppressed.values.reduce(0, +)
        let phases = suppressed.keys.sorted().map { "\(LogEscaping.jsonString($0)):\(suppressed[$0]!)" }
        return "{\"time\":\(LogEscaping.jsonString(TimeText.iso8601(lastSuppressed, milliseconds: true))),"
            + "\"summary\":\"audit lines suppressed\",\"suppressed\":\(total),"
            + "\"by_phase\":{\(phases.joined(separator: ","))},"
            + "\"from\":\(LogEscaping.jsonString(TimeText.iso8601(suppressedSince, milliseconds: true))),"
            + "\"lines_per_second\":\(linesPerSecond)}"
    }
}
