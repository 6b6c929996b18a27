import Foundation
import Testing
import PortcullisCore
import PortcullisTelemetry
import PortcullisPolicy
#if canImport(Glibc)
import Glibc
#endif

/// `LogFilePool` (docs/decisions/0014-hot-reload.md): the session loggers of the running
/// rules and of the rules a reload replaced share one `LogFile` per path; a file is closed
/// when the last logger naming it goes (that is, when the last session of its rules ended).
/// Whether a file is open is read from the pool (`openPaths`) and from the process's own
/// descriptors (/proc/self/fd), which is what "open" means to logrotate.
@Suite struct LogFilePoolTests {
    /// One server writing `$connection` to each of `paths`.
    static func snapshot(_ paths: [String], buffer: String = "") throws -> PolicySnapshot {
        let logs = paths.map { "access_log \($0) f\(buffer);" }.joined(separator: " ")
        let result = RuleLoader.load(text: """
            stream {
                log_format f '$connection';
                server { listen 127.0.0.1:8080; \(logs) return "x"; }
            }
            """)
        return try #require(result.snapshot, "\(result.rendered)")
    }

    /// Writes one finished session numbered `connection` through `logger`, to every access
    /// log of `snapshot`'s server.
    static func log(_ logger: SessionLogger, _ snapshot: PolicySnapshot, connection: UInt64) {
        let record = SessionRecord(connection: connection, transport: .tcp,
                                   client: SocketEndpoint(address: IPAddress("192.0.2.7")!, port: 51000),
                                   server: SocketEndpoint(address: IPAddress("127.0.0.1")!, port: 8080),
                                   listener: "127.0.0.1:8080", startTime: 1_764_270_000)
        logger.log(record, accessLogs: snapshot.servers[0].accessLogs, auditLog: nil)
    }

    /// How many of this process's descriptors are open on the file at `path`.
    static func descriptors(on path: String) -> Int {
        guard let real = realpath(path, nil) else { return 0 }
        let target = String(cString: real)
        free(real)
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return entries.count { entry in
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + entry)) == target
        }
    }

    static func lines(_ path: String) -> [String] { contents(path).split(separator: "\n").map(String.init) }

    @Test("a path both the old and the new rules name is one file, open once, written by both loggers; it stays open while either is alive")
    func sharedPathIsOneFile() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let shared = dir.path + "/shared.log", oldOnly = dir.path + "/old.log", newOnly = dir.path + "/new.log"
        let pool = LogFilePool()
        let oldRules = try Self.snapshot([shared, oldOnly]), newRules = try Self.snapshot([shared, newOnly])
        var old: SessionLogger? = try SessionLogger(snapshot: oldRules, pool: pool)
        #expect(pool.openPaths == [oldOnly, shared].sorted())
        #expect(Self.descriptors(on: shared) == 1)

        var new: SessionLogger? = try SessionLogger(snapshot: newRules, pool: pool)
        #expect(pool.openPaths == [newOnly, oldOnly, shared].sorted(), "the shared path is open once, not twice")
        #expect(Self.descriptors(on: shared) == 1, "the new logger did not open the shared path again")
        #expect(Self.descriptors(on: newOnly) == 1)

        // Both write through the one file, in order: their lines interleave as written.
        Self.log(old!, oldRules, connection: 1)
        new!.flushAll()
        old!.flushAll()
        Self.log(new!, newRules, connection: 2)
        new!.flushAll()
        Self.log(old!, oldRules, connection: 3)
        old!.flushAll()
        #expect(eventually { Self.lines(shared) == ["1", "2", "3"] }, "\(contents(shared))")
        #expect(Self.lines(oldOnly) == ["1", "3"])
        #expect(Self.lines(newOnly) == ["2"])

        // The new logger goes first (as in a second reload that dropped the path, while the
        // old rules' last session is still on): the shared file stays open for the old one.
        new = nil
        #expect(pool.openPaths == [oldOnly, shared].sorted())
        #expect(eventually { Self.descriptors(on: newOnly) == 0 }, "new.log is named by nobody now")
        #expect(Self.descriptors(on: shared) == 1, "shared.log is still named by the old logger")
        Self.log(old!, oldRules, connection: 4)
        old!.flushAll()
        #expect(eventually { Self.lines(shared) == ["1", "2", "3", "4"] }, "\(contents(shared))")

        withExtendedLifetime(old) {}
        old = nil
        #expect(pool.openPaths == [])
        #expect(eventually { Self.descriptors(on: shared) == 0 && Self.descriptors(on: oldOnly) == 0 })
    }

    @Test("a path only the old rules named stays open while the old logger lives and is closed when it goes, its lines on disk")
    func oldOnlyPathClosedWithLastLogger() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let shared = dir.path + "/shared.log", oldOnly = dir.path + "/old.log"
        let pool = LogFilePool()
        let oldRules = try Self.snapshot([shared, oldOnly]), newRules = try Self.snapshot([shared])
        var old: SessionLogger? = try SessionLogger(snapshot: oldRules, pool: pool)
        let new = try SessionLogger(snapshot: newRules, pool: pool)

        // The old rules' last session is still running: its file is open and takes lines.
        #expect(pool.openPaths.contains(oldOnly))
        #expect(Self.descriptors(on: oldOnly) == 1)
        Self.log(old!, oldRules, connection: 7)
        Self.log(old!, oldRules, connection: 8)
        // (No flush: closing must write what is queued.)

        old = nil  // that session ended
        #expect(pool.openPaths == [shared], "old.log left the pool when its last logger went")
        #expect(eventually { Self.descriptors(on: oldOnly) == 0 }, "old.log is closed")
        #expect(Self.lines(oldOnly) == ["7", "8"], "lines queued before the close are on disk")

        // The shared file is still open and the new rules write to it; nothing more reaches
        // old.log.
        #expect(Self.descriptors(on: shared) == 1)
        Self.log(new, newRules, connection: 9)
        new.flushAll()
        #expect(eventually { Self.lines(shared) == ["7", "8", "9"] }, "\(contents(shared))")
        #expect(Self.lines(oldOnly) == ["7", "8"])
        withExtendedLifetime(new) {}
    }

    @Test("a new logger that cannot open one of its paths holds none: the shared file is still closed with the old logger")
    func failedLoggerHoldsNothing() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let shared = dir.path + "/shared.log"
        let pool = LogFilePool()
        var old: SessionLogger? = try SessionLogger(snapshot: Self.snapshot([shared]), pool: pool)
        let broken = try Self.snapshot([shared, dir.path + "/no-such-folder/x.log"])
        #expect(throws: LogFile.OpenError.self) { _ = try SessionLogger(snapshot: broken, pool: pool) }
        #expect(pool.openPaths == [shared])
        withExtendedLifetime(old) {}
        old = nil
        #expect(pool.openPaths == [], "the failed logger's use of shared.log was given back")
        #expect(eventually { Self.descriptors(on: shared) == 0 })
    }

    @Test("the same path with another buffer= is a file of its own; each closes with its own logger")
    func changedBufferIsAnotherFile() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let path = dir.path + "/access.log"
        let pool = LogFilePool()
        let plain = try Self.snapshot([path]), buffered = try Self.snapshot([path], buffer: " buffer=4k")
        var old: SessionLogger? = try SessionLogger(snapshot: plain, pool: pool)
        var new: SessionLogger? = try SessionLogger(snapshot: buffered, pool: pool)
        #expect(pool.openPaths == [path, path])
        #expect(Self.descriptors(on: path) == 2)
        withExtendedLifetime(old) {}
        old = nil
        #expect(pool.openPaths == [path])
        #expect(eventually { Self.descriptors(on: path) == 1 })
        Self.log(new!, buffered, connection: 5)
        new!.flushAll()
        #expect(eventually { Self.lines(path) == ["5"] }, "\(contents(path))")
        withExtendedLifetime(new) {}
        new = nil
        #expect(pool.openPaths == [])
        #expect(eventually { Self.descriptors(on: path) == 0 })
    }

    @Test("closeAll closes every file of the pool, whoever names it")
    func closeAllClosesEverything() throws {
        let dir = try LogFolder()
        defer { dir.cleanup() }
        let a = dir.path + "/a.log", b = dir.path + "/b.log"
        let pool = LogFilePool()
        let old = try SessionLogger(snapshot: Self.snapshot([a]), pool: pool)
        let new = try SessionLogger(snapshot: Self.snapshot([a, b]), pool: pool)
        #expect(pool.openPaths == [a, b])
        new.closeAll()
        #expect(pool.openPaths == [])
        #expect(Self.descriptors(on: a) == 0 && Self.descriptors(on: b) == 0)
        withExtendedLifetime(old) {}
    }
}
