public import PortcullisPolicy
import PortcullisCore
import Foundation
import Synchronization

/// Where finished sessions go: their access log lines and, for refusals, audit lines.
/// Only the `if=` condition is evaluated on the caller's thread; lines are formatted and
/// written by each log file's own thread.
public final class SessionLogger: Sendable {
    private let files: [String: LogFile]
    private let pool: LogFilePool
    /// Every finished session is counted here too (`metrics_listen`); nil without one.
    public let metrics: GatewayMetrics?
    /// Each audit file with its flood cap (`audit_log … sample=N/s`): the stream's and those
    /// of servers with an `audit_log` of their own.
    private let audits: [String: AuditFile]

    private final class AuditFile: Sendable {
        let file: LogFile
        let sampler: Mutex<AuditSampler>
        init(file: LogFile, linesPerSecond: Int) {
            self.file = file
            sampler = Mutex(AuditSampler(linesPerSecond: linesPerSecond))
        }
    }

    /// Opens every log file the snapshot names, or takes it from `pool` where it is open
    /// already (a reload). Throws on the first that cannot be opened, holding none.
    public init(snapshot: PolicySnapshot, pool: LogFilePool = LogFilePool(), metrics: GatewayMetrics? = nil) throws {
        self.pool = pool
        self.metrics = metrics
        var files: [String: LogFile] = [:]
        do {
            for path in snapshot.logPaths {
                files[path] = try pool.acquire(path, buffer: snapshot.logBuffers[path])
            }
        } catch {
            for (path, file) in files { pool.release(path, file) }
            throw error
        }
        self.files = files
        var audits: [String: AuditFile] = [:]
        // (One cap per file: the first `audit_log` naming it sets its `sample=`.)
        for spec in [snapshot.auditLog].compactMap({ $0 }) + snapshot.servers.compactMap(\.auditLog)
            where audits[spec.path] == nil {
            if let file = files[spec.path] { audits[spec.path] = AuditFile(file: file, linesPerSecond: spec.linesPerSecond) }
        }
        self.audits = audits
    }

    /// The last session of replaced rules has ended: files only they named are closed.
    deinit {
        writePendingSummaries()
        for (path, file) in files { pool.release(path, file) }
    }

    /// Logs a finished session to the access logs of its server and, if refused, its audit log.
    /// `audit`: false when the refusal's audit line was written already (`logRefusal`).
    /// `upstream`: the server's upstream block name, for the metrics' labels.
    public func log(_ record: SessionRecord, accessLogs: [AccessLogSpec], auditLog: AuditLogSpec?, audit: Bool = true,
                    upstream: String? = nil) {
        metrics?.recordSession(record, upstream: upstream)
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
        if record.refused && audit { writeAudit(record, to: auditLog) }
    }

    /// The audit line of a refusal, written when it is decided (a UDP session refused on its
    /// first datagram ends only when its client goes quiet).
    /// Also the line of a refusal a dry run did not carry out (`limit_conn_dry_run`,
    /// `limit_rate_dry_run`): its outcome has the status the refusal would have had and says
    /// `.dryRun`, which the line prints as `"dry_run": true`.
    public func logRefusal(_ record: SessionRecord, to auditLog: AuditLogSpec?) {
        // (An enforced refusal is counted when its session ends, with the rest of it.)
        if record.outcome.enforcement == .dryRun { metrics?.recordRefusal(record) }
        writeAudit(record, to: auditLog)
    }

    private func writeAudit(_ record: SessionRecord, to spec: AuditLogSpec?) {
        guard let spec, let audit = audits[spec.path] else { return }
        let (write, summary) = audit.sampler.withLock {
            $0.admit(phase: record.phase.rawValue, now: Date().timeIntervalSince1970)
        }
        if let summary { audit.file.write(summary) }
        if write { audit.file.writeAudit(record) } else { metrics?.auditLinesSuppressed(1) }
    }

    private func writePendingSummaries() {
        for audit in audits.values {
            if let summary = audit.sampler.withLock({ $0.takeSummary() }) { audit.file.write(summary) }
        }
    }

    public func flushAll() {
        writePendingSummaries()
        files.values.forEach { $0.flush() }
    }
    /// Writes what is pending and closes every file of the pool (the gateway's stop).
    public func closeAll() {
        writePendingSummaries()
        pool.closeAll()
    }
}

/// Every access and audit log file the gateway has open, shared by the session loggers of
/// the running rules and of rules a reload replaced, whose sessions may still be writing
/// (docs/decisions/0014-hot-reload.md). A reload opens only paths not open yet; a file is
/// closed when the last logger naming it goes, that is when the last session that could write
/// to it has ended.
public final class LogFilePool: Sendable {
    private struct Entry {
        let file: LogFile
        var users: Int
    }

    /// By path and buffer settings: a changed `buffer=` gets a file of its own (both append).
    private let entries = Mutex<[String: Entry]>([:])

    public init() {}

    private static func key(_ path: String, _ buffer: LogBuffer?) -> String {
        guard let buffer else { return path }
        return path + " \(buffer.size) \(buffer.flushMilliseconds ?? -1) \(buffer.gzipLevel ?? -1)"
    }

    func acquire(_ path: String, buffer: LogBuffer?) throws(LogFile.OpenError) -> LogFile {
        let key = Self.key(path, buffer)
        if let file = entries.withLock({ entries -> LogFile? in
            entries[key]?.users += 1
            return entries[key]?.file
        }) { return file }
        let file = try LogFile(path: path, buffer: buffer)
        entries.withLock { $0[key] = Entry(file: file, users: 1) }
        return file
    }

    func release(_ path: String, _ file: LogFile) {
        let unused = entries.withLock { entries -> Bool in
            guard let key = entries.first(where: { $0.value.file === file })?.key else { return false }
            entries[key]!.users -= 1
            guard entries[key]!.users == 0 else { return false }
            entries[key] = nil
            return true
        }
        // (Closing waits for the writer: not on the event loop that ended the last session.)
        if unused { DispatchQueue.global().async { file.close() } }
    }

    /// Every open file reopens (SIGUSR1, and each reload, as nginx).
    public func reopenAll() { entries.withLock { $0.values.map(\.file) }.forEach { $0.reopen() } }

    public var openPaths: [String] { entries.withLock { $0.values.map(\.file.path) }.sorted() }

    func closeAll() {
        let files = entries.withLock { entries in
            defer { entries = [:] }
            return entries.values.map(\.file)
        }
        files.forEach { $0.close() }
    }
}
