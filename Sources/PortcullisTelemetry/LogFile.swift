#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
public import PortcullisPolicy

/// What waits in a log file's queue: ready text, or a record still to be formatted.
enum LogEntry: Sendable {
    case text(String)
    case access(SessionRecord, LogFormat)
    case audit(SessionRecord)

    var text: String {
        switch self {
        case .text(let line): return line
        case .access(let record, let format): return format.render(record)
        case .audit(let record): return AuditLine.render(record)
        }
    }
}

/// One log file written by one background thread. Event loops hand it finished lines (or
/// records to format) through a bounded queue and never wait: when the queue is full the line
/// is dropped and counted, because a stalled disk must never stall the relay.
///
/// `reopen()` (SIGUSR1) closes and reopens the path at the next batch, as logrotate expects.
///
/// With a `LogBuffer` (`access_log … buffer= flush= gzip`) the writer keeps lines in memory as
/// nginx does and writes them when the next line would not fit, `flush` after the first one,
/// before a reopen and at close; with gzip each such write is one gzip member.
public final class LogFile: Sendable {
    public let path: String
    private let capacity: Int
    private let buffer: LogBuffer?

    private struct State {
        var pending: [LogEntry] = []
        var dropped: UInt64 = 0
        var reopenRequested = false
        var closing = false
        var written: UInt64 = 0
        /// `flush()` asks for the memory buffer to be written too.
        var bufferFlushRequested = false
    }

    private let state = Mutex(State())
    private let wakeup = ConditionLock()
    private let finished = Atomic<Bool>(false)
    /// File descriptor, owned by the writer thread after start.
    private let fd = Atomic<Int32>(-1)

    public struct OpenError: Error, CustomStringConvertible {
        public var path: String
        public var reason: String
        public var description: String { "cannot open log file \"\(path)\": \(reason)" }
    }

    /// Opens (creating, appending) `path` now, so that a bad path fails at start-up.
    public init(path: String, capacity: Int = 65_536, buffer: LogBuffer? = nil) throws(OpenError) {
        self.path = path
        self.capacity = capacity
        self.buffer = buffer
        let descriptor = Self.open(path)
        guard descriptor >= 0 else { throw OpenError(path: path, reason: String(cString: strerror(errno))) }
        fd.store(descriptor, ordering: .relaxed)
        let thread = Thread { [self] in
            self.run()
            self.finished.store(true, ordering: .releasing)
        }
        thread.name = "log " + (path as NSString).lastPathComponent
        thread.start()
    }

    private static func open(_ path: String) -> Int32 {
        if path == "stderr" || path == "/dev/stderr" { return dup(STDERR_FILENO) }
        if path == "stdout" || path == "/dev/stdout" { return dup(STDOUT_FILENO) }
        return Glibc.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
    }

    /// Queues one line (a newline is added). Never blocks.
    public func write(_ line: String) { enqueue(.text(line)) }

    /// Queues a finished session; the line is formatted on the writer thread, not the caller's.
    public func write(_ record: SessionRecord, format: LogFormat) { enqueue(.access(record, format)) }

    /// Queues the audit line of a refused session, formatted on the writer thread.
    public func writeAudit(_ record: SessionRecord) { enqueue(.audit(record)) }

    private func enqueue(_ line: LogEntry) {
        let accepted = state.withLock { s -> Bool in
            guard !s.closing, s.pending.count < capacity else {
                s.dropped += 1
                return false
            }
            s.pending.append(line)
            return s.pending.count == 1
        }
        if accepted { wakeup.signal() }
    }

    /// Asks the writer to reopen the file before its next write (log rotation).
    public func reopen() {
        state.withLock { $0.reopenRequested = true }
        wakeup.signal()
    }

    /// Lines dropped because the queue was full.
    public var droppedLines: UInt64 { state.withLock { $0.dropped } }
    public var writtenLines: UInt64 { state.withLock { $0.written } }

    /// Writes what is queued and stops the thread. Blocks until done.
    public func close() {
        let alreadyClosing = state.withLock { s -> Bool in
            defer { s.closing = true }
            return s.closing
        }
        guard !alreadyClosing else { return }
        wakeup.signal()
        while !finished.load(ordering: .acquiring) { usleep(1000) }
    }

    /// Blocks until every line queued so far is on disk (tests, shutdown).
    /// A buffered file's memory buffer is written as well.
    public func flush() {
        if buffer != nil { state.withLock { $0.bufferFlushRequested = true } }
        // (Once the writer has finished, a close wrote everything: nothing to wait for.)
        while !finished.load(ordering: .acquiring), state.withLock({ !$0.pending.isEmpty || $0.bufferFlushRequested }) {
            wakeup.signal()
            usleep(500)
        }
        // The batch taken last may still be in write(2); a final round trip settles it.
        usleep(1000)
    }

    private func run() {
        var held = HeldLines(buffer)
        while true {
            wakeup.wait(timeoutMilliseconds: held.millisecondsUntilFlush(max: 200))
            let (batch, reopen, closing, flushBuffer) = state.withLock { s -> ([LogEntry], Bool, Bool, Bool) in
                var taken: [LogEntry] = []
                swap(&taken, &s.pending)
                defer { s.reopenRequested = false }
                return (taken, s.reopenRequested, s.closing, s.bufferFlushRequested)
            }
            if reopen {
                // As nginx: what the buffer holds belongs to the file being rotated away.
                writeOut(held.takeAll())
                let fresh = Self.open(path)
                if fresh >= 0 {
                    Glibc.close(fd.exchange(fresh, ordering: .relaxed))
                } else {
                    // Keep writing to the old file rather than lose lines; say why once.
                    let message = "portcullis: cannot reopen log file \"\(path)\": \(String(cString: strerror(errno))); still writing to the old file\n"
                    _ = message.withCString { Glibc.write(STDERR_FILENO, $0, strlen($0)) }
                }
            }
            if !batch.isEmpty {
                if held.isBuffered {
                    for entry in batch {
                        for chunk in held.add(line: entry.text) { writeOut(chunk) }
                    }
                } else {
                    var data = batch.map(\.text).joined(separator: "\n")
                    data += "\n"
                    writeOut(Array(data.utf8))
                }
                state.withLock { $0.written += UInt64(batch.count) }
                // Let lines gather before the next batch: under load the event loops would
                // otherwise wake this thread for nearly every line (52,700 context switches a
                // second at 20,000 sessions a second). A line waits at most this much longer.
                if !closing { usleep(2_000) }
            }
            if held.flushIsDue() || flushBuffer { writeOut(held.takeAll()) }
            if flushBuffer { state.withLock { $0.bufferFlushRequested = false } }
            if closing {
                let remaining = state.withLock { !$0.pending.isEmpty }
                if remaining { continue }
                writeOut(held.takeAll())
                Glibc.close(fd.exchange(-1, ordering: .relaxed))
                return
            }
        }
    }

    /// Writes bytes as they are, or as one gzip member when the buffer says gzip.
    private func writeOut(_ bytes: [UInt8]) {
        guard !bytes.isEmpty else { return }
        if let level = buffer?.gzipLevel {
            // zlib fails only without memory: the lines are lost, the relay keeps going.
            if let member = Gzip.member(of: bytes, level: level) { writeAll(member) }
        } else {
            writeAll(bytes)
        }
    }

    private func writeAll(_ bytes: [UInt8]) {
        bytes.withUnsafeBufferPointer { buffer in
            var offset = 0
            while offset < buffer.count {
                let n = Glibc.write(fd.load(ordering: .relaxed), buffer.baseAddress! + offset, buffer.count - offset)
                if n < 0 {
                    if errno == EINTR { continue }
                    return  // disk full or similar: drop the batch, keep serving
                }
                offset += n
            }
        }
    }
}

/// The memory buffer of a buffered log, with nginx's rules: a line that does not fit in what is
/// left sends the buffer out first; a line longer than the whole buffer goes out on its own;
/// the flush clock starts when the first line goes into an empty buffer. Writer thread only.
struct HeldLines {
    private let settings: LogBuffer?
    private var bytes: [UInt8] = []
    private var firstLineAt: ContinuousClock.Instant?

    init(_ settings: LogBuffer?) {
        self.settings = settings
        if let settings { bytes.reserveCapacity(settings.size) }
    }

    var isBuffered: Bool { settings != nil }

    /// Adds one line (a newline is appended); returns what must be written now, in order.
    mutating func add(line: String) -> [[UInt8]] {
        guard let settings else { return [Array((line + "\n").utf8)] }
        var out: [[UInt8]] = []
        let length = line.utf8.count + 1
        if length > settings.size - bytes.count, !bytes.isEmpty { out.append(takeAll()) }
        if length > settings.size {
            out.append(Array((line + "\n").utf8))
            return out
        }
        if bytes.isEmpty { firstLineAt = .now }
        bytes.append(contentsOf: line.utf8)
        bytes.append(UInt8(ascii: "\n"))
        return out
    }

    mutating func takeAll() -> [UInt8] {
        firstLineAt = nil
        defer { bytes.removeAll(keepingCapacity: true) }
        return bytes
    }

    func flushIsDue(now: ContinuousClock.Instant = .now) -> Bool {
        guard let due = flushDeadline else { return false }
        return now >= due
    }

    /// How long the writer may sleep before the buffer's `flush=` time is up.
    func millisecondsUntilFlush(max: Int) -> Int {
        guard let due = flushDeadline else { return max }
        let left = ContinuousClock.now.duration(to: due)
        let ms = Int(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000)
        return Swift.max(1, Swift.min(max, ms + 1))
    }

    private var flushDeadline: ContinuousClock.Instant? {
        guard let first = firstLineAt, let ms = settings?.flushMilliseconds else { return nil }
        return first + .milliseconds(ms)
    }
}

/// A condition variable with a "something happened" flag, so a signal sent before the
/// writer waits is not lost.
final class ConditionLock: @unchecked Sendable {
    private let condition = NSCondition()
    private var signalled = false

    func signal() {
        condition.lock()
        signalled = true
        condition.signal()
        condition.unlock()
    }

    func wait(timeoutMilliseconds: Int) {
        condition.lock()
        if !signalled {
            _ = condition.wait(until: Date(timeIntervalSinceNow: Double(timeoutMilliseconds) / 1000))
        }
        signalled = false
        condition.unlock()
    }
}
