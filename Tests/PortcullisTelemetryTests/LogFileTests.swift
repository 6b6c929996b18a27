import Foundation
import Testing
import PortcullisTelemetry
import PortcullisPolicy
import PortcullisTestSupport
#if canImport(Glibc)
import Glibc
#endif

struct LogFolder {
    let path: String
    init() throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("portcullis-log-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func cleanup() { try? FileManager.default.removeItem(atPath: path) }
}

func contents(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

/// Polls until `condition` holds (the writer is a background thread), for at most `seconds`.
func eventually(_ seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(2_000)
    }
    return condition()
}

@Suite(.serialized) struct LogFileTests {
    @Test func writesLines() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let path = dir.path + "/access.log"
        let log = try LogFile(path: path)
        log.write("first")
        log.write("second line")
        log.flush()
        #expect(eventually { contents(path) == "first\nsecond line\n" }, "\(contents(path))")
        log.close()
        #expect(log.writtenLines == 2)
        #expect(log.droppedLines == 0)
        // Lines after close are dropped, not written.
        log.write("late")
        #expect(log.droppedLines == 1)
        #expect(contents(path) == "first\nsecond line\n")
    }

    @Test func appendsToAnExistingFile() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let path = dir.path + "/access.log"
        try "old\n".write(toFile: path, atomically: true, encoding: .utf8)
        let log = try LogFile(path: path)
        log.write("new")
        log.close()
        #expect(contents(path) == "old\nnew\n")
    }

    @Test func badPathFailsAtOpen() throws {
        #expect(throws: LogFile.OpenError.self) { try LogFile(path: "/nonexistent-portcullis-dir/x.log") }
    }

    @Test func reopenAfterRenameCreatesANewFile() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let path = dir.path + "/access.log"
        let rotated = dir.path + "/access.log.1"
        let log = try LogFile(path: path)
        log.write("before")
        log.flush()
        #expect(eventually { contents(path) == "before\n" })
        try FileManager.default.moveItem(atPath: path, toPath: rotated)
        log.write("still old")  // not reopened yet: goes to the renamed file
        #expect(eventually { contents(rotated) == "before\nstill old\n" })
        #expect(!FileManager.default.fileExists(atPath: path))
        log.reopen()
        log.write("after")
        log.flush()
        #expect(eventually { contents(path) == "after\n" }, "\(contents(path))")
        log.close()
        #expect(contents(rotated) == "before\nstill old\n")
        #expect(contents(path) == "after\n")
    }

    @Test func fullQueueDropsInsteadOfBlocking() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let path = dir.path + "/fifo"
        #expect(mkfifo(path, 0o600) == 0)
        // A reader that never reads (yet): the writer thread blocks once the pipe is full.
        let reader = open(path, O_RDONLY | O_NONBLOCK)
        #expect(reader >= 0)
        defer { close(reader) }
        let log = try LogFile(path: path, capacity: 4)
        let big = String(repeating: "x", count: 300_000)  // far beyond the pipe buffer
        log.write(big)
        // Wait until the writer has taken the batch and is inside write(2): data appears in the pipe.
        var byte: UInt8 = 0
        var received = 0
        #expect(eventually { () -> Bool in
            let n = read(reader, &byte, 1)
            if n > 0 { received += n }
            return received > 0
        })
        let start = Date()
        for i in 0..<10 { log.write("line \(i)") }
        let elapsed = Date().timeIntervalSince(start)
        #expect(elapsed < 1, "write() must never wait for the disk")
        #expect(log.droppedLines == 6)
        #expect(log.writtenLines == 0)

        // Drain the pipe while close() finishes, then check what made it through.
        let closed = Atomic(false)
        let closer = Thread { log.close(); closed.store(true) }
        closer.start()
        var data: [UInt8] = [byte]
        var buffer = [UInt8](repeating: 0, count: 65_536)
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            let n = read(reader, &buffer, buffer.count)
            if n > 0 { data += buffer[0..<n]; continue }
            if n == 0 && closed.load() { break }  // writer closed its end
            usleep(1_000)
        }
        #expect(closed.load())
        let text = String(decoding: data, as: UTF8.self)
        #expect(text == big + "\nline 0\nline 1\nline 2\nline 3\n")
        #expect(log.writtenLines == 5)
    }
}

/// `access_log … buffer= flush= gzip` (issue #13 point 7): nginx's buffered writing rules, and
/// gzip members that real gzip tools read.
@Suite(.serialized) struct BufferedLogFileTests {
    static func size(_ path: String) -> Int {
        ((try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int) ?? -1
    }

    @Test("buffer= without flush=: nothing reaches the file until the buffer is full; the line that does not fit sends out what was held first")
    func heldUntilFull() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let path = dir.path + "/access.log"
        // Each line is 10 bytes with its newline: three fit in 32 bytes, the fourth does not.
        let log = try LogFile(path: path, buffer: LogBuffer(size: 32))
        for i in 1...3 { log.write("line \(i)   ") }
        usleep(300_000)
        #expect(contents(path) == "", "three lines fit in the buffer and must still be held")
        log.write("line 4   ")
        #expect(eventually { contents(path) == "line 1   \nline 2   \nline 3   \n" }, "\(contents(path))")
        // A line longer than the whole buffer goes out by itself, after what was held.
        let long = String(repeating: "y", count: 40)
        log.write(long)
        #expect(eventually { contents(path).hasSuffix("line 4   \n" + long + "\n") }, "\(contents(path))")
        log.close()
        #expect(contents(path) == "line 1   \nline 2   \nline 3   \nline 4   \n" + long + "\n")
    }

    @Test("flush= writes held lines that long after the first one went in; reopen writes them to the old file first")
    func flushTimeAndReopen() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let path = dir.path + "/access.log"
        let log = try LogFile(path: path, buffer: LogBuffer(size: 65_536, flushMilliseconds: 600))
        let start = Date()
        log.write("a")
        #expect(eventually(5) { contents(path) == "a\n" })
        let waited = Date().timeIntervalSince(start)
        #expect(waited >= 0.55 && waited < 2.5, "the line was held \(waited) s; flush=600ms")
        log.write("b")
        usleep(100_000)
        try FileManager.default.moveItem(atPath: path, toPath: path + ".1")
        log.reopen()
        log.write("c")
        log.close()
        #expect(contents(path + ".1") == "a\nb\n", "the held line belongs to the rotated file")
        #expect(contents(path) == "c\n")
    }

    @Test("gzip: each write of the buffer is one complete gzip member; the file's members read back in order as the lines written")
    func gzipMembersInOrder() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let path = dir.path + "/access.log.gz"
        let log = try LogFile(path: path, buffer: LogBuffer(size: 100, gzipLevel: 1))
        var expected: [String] = []
        for i in 0..<30 {
            let line = "session \(i) 127.0.0.\(i % 7) 200 \(i * 13)"
            expected.append(line)
            log.write(line)
        }
        log.close()
        guard let members = gzipMembers(path) else {
            Issue.record("not a valid gzip file: \(Self.size(path)) bytes")
            return
        }
        #expect(members.count > 5, "a 100-byte buffer holds only a few lines: \(members.count) members")
        #expect(members.allSatisfy { $0.utf8.count <= 100 && $0.hasSuffix("\n") })
        #expect(members.joined() == expected.map { $0 + "\n" }.joined())
    }

    @Test("gzip=9 compresses repetitive lines far below their size and flush() writes the buffer")
    func gzipLevelAndFlush() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let path = dir.path + "/access.log.gz"
        let log = try LogFile(path: path, buffer: LogBuffer(size: 1 << 20, gzipLevel: 9))
        let line = "127.0.0.1 [07/Dec/2026:10:00:00 +0000] TCP 200 1024 512 0.010"
        for _ in 0..<2000 { log.write(line) }
        log.flush()
        let members = gzipMembers(path)
        #expect(members == [String(repeating: line + "\n", count: 2000)])
        #expect(Self.size(path) < 2000 * (line.utf8.count + 1) / 50, "\(Self.size(path)) bytes")
        log.close()
    }
}

/// A tiny lock-protected flag (Synchronization.Atomic needs a `let` in a class or global).
final class Atomic: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Bool
    init(_ value: Bool) { self.value = value }
    func store(_ newValue: Bool) { lock.lock(); value = newValue; lock.unlock() }
    func load() -> Bool { lock.lock(); defer { lock.unlock() }; return value }
}
