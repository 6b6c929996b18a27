import Foundation
import Testing
import PortcullisTelemetry
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

/// A tiny lock-protected flag (Synchronization.Atomic needs a `let` in a class or global).
final class Atomic: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Bool
    init(_ value: Bool) { self.value = value }
    func store(_ newValue: Bool) { lock.lock(); value = newValue; lock.unlock() }
    func load() -> Bool { lock.lock(); defer { lock.unlock() }; return value }
}
