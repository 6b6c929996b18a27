public import PortcullisPolicy
import PortcullisCore
import Foundation
import Synchronization

/// Where finished sessions go: their access log lines and, for refusals, audit lines.
/// Only the `if=` condition is evaluated on the caller's thread; lines are formatted and
/// written by each log file's own thread.
public final class SessionLogger: Sendable {
    private let files: [String: LogFile]
    private let audit: LogFile?
    /// The audit flood cap (`audit_log … sample=N/s`).
    private let sampler: Mutex<AuditSampler>

    /// Opens every log file the snapshot names. Throws on the first that cannot be opened.
    public init(snapshot: PolicySnapshot) throws {
        var files: [String: LogFile] = [:]
        for path in snapshot.logPaths {
            files[path] = try LogFile(path: path)
        }
        self.files = files
        self.audit = snapshot.auditLog.flatMap { files[$0.path] }
        sampler = Mutex(AuditSampler(linesPerSecond: snapshot.auditLog?.linesPerSecond ?? 100))
    }

    /// Logs a finished session to the access logs of its server and, if refused, the audit log.
    /// `audit`: false when the refusal's audit line was written already (`logRefusal`).
    public func log(_ record: SessionRecord, accessLogs: [AccessLogSpec], audit: Bool = true) {
        if let variables = record.variables {
            // Lines are formatted on the writers' threads: evaluate every rule-defined variable
            // they print here, on the session's thread, so the writers only read remembered values.
            for spec in accessLogs {
                for index in spec.formatVariables { _ = variables.value(index, in: record) }
            }
        }
        for spec in accessLogs {
            guard let file = files[spec.path] else { continue }
            if let condition = spec.condition {
                // nginx skips the line when the condition is empty or "0".
                let value = condition.bytes(for: record)
                if value.isEmpty || value == [UInt8(ascii: "0")] { continue }
            }
            file.write(record, format: spec.format)
        }
        if record.refused && audit { writeAudit(record) }
    }

    /// The audit line of a refusal, written when it is decided (a UDP session refused on its
    /// first datagram ends only when its client goes quiet).
    /// Also the line of a refusal a dry run did not carry out (`limit_conn_dry_run`,
    /// `limit_rate_dry_run`): its outcome has the status the refusal would have had and says
    /// `.dryRun`, which the line prints as `"dry_run": true`.
    public func logRefusal(_ record: SessionRecord) {
        writeAudit(record)
    }

    private func writeAudit(_ record: SessionRecord) {
        guard let audit else { return }
        let (write, summary) = sampler.withLock {
            $0.admit(phase: record.phase.rawValue, now: Date().timeIntervalSince1970)
        }
        if let summary { audit.write(summary) }
        if write { audit.writeAudit(record) }
    }

    private func writePendingSummary() {
        if let summary = sampler.withLock({ $0.takeSummary() }) { audit?.write(summary) }
    }

    public func reopenAll() { files.values.forEach { $0.reopen() } }
    public func flushAll() {
        writePendingSummary()
        files.values.forEach { $0.flush() }
    }
    public func closeAll() {
        writePendingSummary()
        files.values.forEach { $0.close() }
    }
}
