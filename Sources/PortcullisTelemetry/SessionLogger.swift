public import PortcullisPolicy
import PortcullisCore

/// Where finished sessions go: their access log lines and, for refusals, audit lines.
/// Only the `if=` condition is evaluated on the caller's thread; lines are formatted and
/// written by each log file's own thread.
public final class SessionLogger: Sendable {
    private let files: [String: LogFile]
    private let audit: LogFile?

    /// Opens every log file the snapshot names. Throws on the first that cannot be opened.
    public init(snapshot: PolicySnapshot) throws {
        var files: [String: LogFile] = [:]
        for path in snapshot.logPaths {
            files[path] = try LogFile(path: path)
        }
        self.files = files
        self.audit = snapshot.auditLog.flatMap { files[$0.path] }
    }

    /// Logs a finished session to the access logs of its server and, if refused, the audit log.
    public func log(_ record: SessionRecord, accessLogs: [AccessLogSpec]) {
        if let variables = record.variables {
            // Lines are formatted on the writers' threads: evaluate every rule-defined variable
            // they print here, on the session's thread, so the writers only read remembered values.
            for spec in accessLogs {
                for index in spec.format.template.definedVariables { _ = variables.value(index, in: record) }
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
        if record.refused, let audit {
            audit.writeAudit(record)
        }
    }

    public func reopenAll() { files.values.forEach { $0.reopen() } }
    public func flushAll() { files.values.forEach { $0.flush() } }
    public func closeAll() { files.values.forEach { $0.close() } }
}
