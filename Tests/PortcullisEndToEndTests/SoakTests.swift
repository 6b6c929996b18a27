#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisTestSupport

/// Issue #16 item 5, the short soak (bench/soak.sh is the long one): the built gateway as a
/// subprocess, so its RSS is its own and not the test process's, relays 1 GiB for 50 client
/// connections that open, upload, download, close and reopen, while SIGHUP reloads switch it
/// between two rule files several times a second.
///
/// Both ends check every byte in order against the bytes they expect, with memcmp: uploads and
/// downloads are slices of one pseudo-random pool at offsets the header names, so the upstream
/// knows what it must receive and the client what it must get back. (A hash per byte in a
/// debug build would cost more than the relay; memcmp runs at memory speed.)
@Suite("Soak", .serialized)
struct SoakTests {
    static let pool = Pool(bytes: 32 << 20)
    static let maxPart = 4 << 20
    static let magic: UInt64 = 0x534F_414B_5445_5354  // "SOAKTEST"
    /// Header: magic, connection, upload offset, upload length, download offset, download length.
    static let headerSize = 6 * 8
    /// A debug build relays the 1 GiB in a few seconds here, and a reload of the debug build
    /// takes about 0.2 s to answer, so the next one starts 0.1 s after the last answered:
    /// several reloads a second rather than one, so that there are several while the bytes flow.
    static let reloadEvery = 0.1

    /// The pseudo-random bytes every upload and download is a slice of.
    final class Pool: @unchecked Sendable {
        let base: UnsafeMutableRawPointer
        let count: Int
        init(bytes: Int) {
            count = bytes
            base = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
            var generator = SplitMix64(seed: 0x50A4)
            let words = base.bindMemory(to: UInt64.self, capacity: bytes / 8)
            for i in 0..<(bytes / 8) { words[i] = generator.next() }
        }
    }

    final class Counters: Sendable {
        let scheduled = Atomic<Int>(0)
        let upVerified = Atomic<Int>(0)      // upload bytes the upstream matched
        let downVerified = Atomic<Int>(0)    // download bytes the client matched
        let connections = Atomic<Int>(0)     // connections that passed every check, client side
        let upstreamDone = Atomic<Int>(0)    // the same, upstream side
        let failures = Atomic<Int>(0)
        let finished = Atomic<Int>(0)
        let stop = Atomic<Bool>(false)
        let firstProblem = Mutex<String?>(nil)

        func fail(_ what: String) {
            failures.wrappingAdd(1, ordering: .relaxed)
            firstProblem.withLock { if $0 == nil { $0 = what } }
        }
    }

    enum Trouble: Error { case io(String) }

    static func sendAll(_ fd: Int32, _ pointer: UnsafeRawPointer, _ count: Int) throws {
        var offset = 0
        while offset < count {
            let n = Glibc.send(fd, pointer + offset, min(count - offset, 256 << 10), Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                throw Trouble.io("send: \(String(cString: strerror(errno)))")
            }
            offset += n
        }
    }

    /// Receives exactly `count` bytes into `buffer` chunk by chunk and compares each chunk with
    /// the pool from `offset` on: returns the first byte that differs, or nil.
    static func receiveMatching(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, offset: Int, count: Int) throws -> Int? {
        var done = 0
        while done < count {
            let n = recv(fd, buffer.baseAddress!, min(count - done, buffer.count), 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw Trouble.io("recv after \(done) of \(count) bytes: \(String(cString: strerror(errno)))")
            }
            if n == 0 { throw Trouble.io("EOF after \(done) of \(count) bytes") }
            if memcmp(buffer.baseAddress!, pool.base + offset + done, n) != 0 { return done }
            done += n
        }
        return nil
    }

    static func receiveExactly(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, _ count: Int) throws {
        var done = 0
        while done < count {
            let n = recv(fd, buffer.baseAddress! + done, count - done, 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw Trouble.io("recv: \(String(cString: strerror(errno)))")
            }
            if n == 0 { throw Trouble.io("EOF after \(done) of \(count) header bytes") }
            done += n
        }
    }

    /// True if the peer's next event is an orderly EOF (nothing more was sent).
    static func atEOF(_ fd: Int32) -> Bool {
        var byte: UInt8 = 0
        while true {
            let n = recv(fd, &byte, 1, 0)
            if n < 0 && errno == EINTR { continue }
            return n == 0
        }
    }

    /// The upstream: checks the upload against the pool, sends the download, closes.
    static func upstream(_ connection: TestConnection, _ counters: Counters) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 << 10, alignment: 8)
        defer { buffer.deallocate(); connection.close() }
        do {
            try receiveExactly(connection.fd, buffer, headerSize)
            let header = (0..<6).map { buffer.load(fromByteOffset: $0 * 8, as: UInt64.self) }
            guard header[0] == magic else { return counters.fail("upstream: bad header \(header)") }
            let (conn, upOffset, upLength, downOffset, downLength) = (header[1], Int(header[2]), Int(header[3]), Int(header[4]), Int(header[5]))
            if let at = try receiveMatching(connection.fd, buffer, offset: upOffset, count: upLength) {
                return counters.fail("connection \(conn): upload differs within the chunk at byte \(at) of \(upLength)")
            }
            counters.upVerified.wrappingAdd(upLength, ordering: .relaxed)
            try sendAll(connection.fd, pool.base + downOffset, downLength)
            connection.shutdownWrite()
            guard atEOF(connection.fd) else { return counters.fail("connection \(conn): bytes after the upload") }
            counters.upstreamDone.wrappingAdd(1, ordering: .relaxed)
        } catch {
            counters.fail("upstream: \(error)")
        }
    }

    /// SIGHUP, then the gateway's answer beside its pid file, "ATTEMPT GENERATION ok|failed"
    /// (what `portcullis reload` waits for; launching that debug binary several times a second
    /// would cost more CPU than the reload). Nil if no answer came within 10 s.
    static func reload(_ gateway: PortcullisBinary.Running, attempt: Int, statusFile: String) -> (ok: Bool, generation: Int)? {
        gateway.signal(SIGHUP)
        for _ in 0..<2000 {
            // The file is rewritten in place: an empty or partial read is simply retried.
            if let text = try? String(contentsOfFile: statusFile, encoding: .utf8),
               let first = text.split(separator: "\n").first {
                let fields = first.split(separator: " ")
                if fields.count == 3, Int(fields[0]) == attempt, let generation = Int(fields[1]) {
                    return (fields[2] == "ok", generation)
                }
            }
            usleep(5_000)
        }
        return nil
    }

    /// A log-uniform length from 0 to maxPart - 1, and an offset where it fits in the pool.
    static func part(_ generator: inout SplitMix64) -> (offset: Int, length: Int) {
        let unit = Double(generator.next() >> 11) / Double(1 << 53)
        let length = Int(pow(2, unit * log2(Double(maxPart)))) - 1
        return (Int(generator.next() % UInt64(pool.count - length + 1)), length)
    }

    /// One client: connections one after another until the total is handed out.
    static func client(_ index: Int, port: UInt16, total: Int, counters: Counters) {
        var generator = SplitMix64(seed: UInt64(index) &* 0x9E37 &+ 17)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 << 10, alignment: 8)
        defer { buffer.deallocate() }
        var conn = UInt64(index) << 32
        while !counters.stop.load(ordering: .relaxed) {
            let up = part(&generator), down = part(&generator)
            guard counters.scheduled.wrappingAdd(up.length + down.length, ordering: .relaxed).oldValue < total else { return }
            conn += 1
            do {
                let client = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 20)
                defer { client.close() }
                let header = [magic, conn, UInt64(up.offset), UInt64(up.length), UInt64(down.offset), UInt64(down.length)]
                try header.withUnsafeBytes { try sendAll(client.fd, $0.baseAddress!, headerSize) }
                try sendAll(client.fd, pool.base + up.offset, up.length)
                if let at = try receiveMatching(client.fd, buffer, offset: down.offset, count: down.length) {
                    counters.fail("connection \(conn): download differs within the chunk at byte \(at) of \(down.length)")
                    continue
                }
                guard atEOF(client.fd) else {
                    counters.fail("connection \(conn): bytes after the download")
                    continue
                }
                counters.downVerified.wrappingAdd(down.length, ordering: .relaxed)
                counters.connections.wrappingAdd(1, ordering: .relaxed)
            } catch {
                counters.fail("connection \(conn): \(error)")
            }
        }
    }

    @Test("1 GiB relayed for 50 connections opening and closing in parallel, reloaded several times a second: both ends match every byte in order, 0 failed connections or reloads, the access log adds up, RSS flat from 10 % to the end and after the clients close")
    func soak() throws {
        let total = (Int(ProcessInfo.processInfo.environment["PORTCULLIS_SOAK_MIB"] ?? "") ?? 1024) << 20
        let clients = 50
        let counters = Counters()
        let upstream = try TestServer { Self.upstream($0, counters) }
        defer { upstream.stop() }

        let folder = try makeTemporaryDirectory("portcullis-soak")
        defer { try? FileManager.default.removeItem(at: folder) }
        let port = try freePort()
        let rules = folder.appendingPathComponent("gateway.conf").path
        let accessLog = folder.appendingPathComponent("access.log").path
        // Two files that differ only in the log line's first field and in the allow list.
        func variant(_ tag: String, _ allow: String) -> String {
            """
            pid \(folder.path)/portcullis.pid;
            error_log \(folder.path)/error.log notice;
            stream {
                log_format soak '\(tag) $status $bytes_received $bytes_sent';
                access_log \(accessLog) soak;
                server { listen 127.0.0.1:\(port); \(allow) deny all; proxy_pass 127.0.0.1:\(upstream.port); }
            }
            """
        }
        let variants = [variant("a", "allow 127.0.0.1;"), variant("b", "allow 127.0.0.0/8; allow ::1; allow 10.0.0.0/8;")]
        try variants[0].write(toFile: rules, atomically: true, encoding: .utf8)
        let gateway = try PortcullisBinary.launch(["run", "-c", rules])
        defer { if gateway.process.isRunning { gateway.signal(SIGKILL); _ = gateway.wait(timeout: 5) } }
        // The pid file is written once every listener is bound. (Not a probe connection: it
        // would be a session that the access log and the upstream count.)
        let pidFile = folder.appendingPathComponent("portcullis.pid").path
        for _ in 0..<500 where !FileManager.default.fileExists(atPath: pidFile) { usleep(20_000) }
        try #require(FileManager.default.fileExists(atPath: pidFile), "the gateway started")

        let started = Date()
        let initialRSS = try #require(gateway.residentKiB())
        for index in 0..<clients {
            Thread {
                Self.client(index, port: port, total: total, counters: counters)
                counters.finished.wrappingAdd(1, ordering: .relaxed)
            }.start()
        }

        // Reload (reloadEvery after the last answer) and sample the RSS every 100 ms until the
        // clients are done.
        var reloads = 0, reloadFailures: [String] = [], reloadSeconds = 0.0
        var samples: [(relayed: Int, rss: Int)] = []
        var lastReload = Date()
        let deadline = started.addingTimeInterval(150)
        while counters.finished.load(ordering: .relaxed) < clients && Date() < deadline {
            usleep(100_000)
            let relayed = counters.upVerified.load(ordering: .relaxed) + counters.downVerified.load(ordering: .relaxed)
            if let rss = gateway.residentKiB() { samples.append((relayed, rss)) }
            if Date().timeIntervalSince(lastReload) >= Self.reloadEvery {
                let attempt = reloads + reloadFailures.count + 1
                try variants[attempt % 2].write(toFile: rules, atomically: true, encoding: .utf8)
                let began = Date()
                let answer = Self.reload(gateway, attempt: attempt, statusFile: pidFile + ".reload")
                reloadSeconds += Date().timeIntervalSince(began)
                if let answer,
                   answer.ok && answer.generation == reloads + 2 {
                    reloads += 1
                } else {
                    reloadFailures.append("reload \(attempt): \((try? String(contentsOfFile: pidFile + ".reload", encoding: .utf8)) ?? "no answer")")
                }
                lastReload = Date()
            }
        }
        let seconds = Date().timeIntervalSince(started)
        counters.stop.store(true, ordering: .relaxed)
        #expect(counters.finished.load(ordering: .relaxed) == clients, "the clients finished within 150 s")
        let endRSS = try #require(gateway.residentKiB())
        usleep(1_000_000)  // the last sessions end on the gateway's side
        let closedRSS = try #require(gateway.residentKiB())

        let up = counters.upVerified.load(ordering: .relaxed), down = counters.downVerified.load(ordering: .relaxed)
        let connections = counters.connections.load(ordering: .relaxed)
        let tenth = try #require(samples.first { $0.relayed >= total / 10 }, "an RSS sample after 10 % of the bytes")
        print("soak: \(up + down) bytes (\(up) up, \(down) down) in \(String(format: "%.1f", seconds)) s "
              + "= \(String(format: "%.0f", Double(up + down) / seconds / 1e6)) MB/s; \(connections) connections; \(reloads) reloads "
              + "(\(String(format: "%.0f", reloadSeconds * 1000 / Double(max(1, reloads)))) ms each to answer); "
              + "RSS KiB at start \(initialRSS), at 10 % \(tenth.rss), end \(endRSS), closed \(closedRSS), peak \(max(samples.map(\.rss).max() ?? 0, endRSS, closedRSS))")

        #expect(counters.failures.load(ordering: .relaxed) == 0, "\(counters.firstProblem.withLock { $0 } ?? "")")
        #expect(up + down >= total, "the whole total was relayed and matched")
        #expect(counters.upstreamDone.load(ordering: .relaxed) == connections, "both ends counted the same connections")
        #expect(connections > 2 * clients, "connections were opened and closed: \(connections)")
        #expect(reloadFailures.isEmpty, "\(reloadFailures)")
        #expect(reloads >= max(2, Int(seconds / 2)), "reloads all along: \(reloads) in \(seconds) s")
        let limit = max(16 << 10, tenth.rss / 10)
        #expect(endRSS - tenth.rss <= limit, "RSS from 10 % to the end: \(tenth.rss) -> \(endRSS) KiB")
        #expect(closedRSS - tenth.rss <= limit, "RSS after the clients closed: \(tenth.rss) -> \(closedRSS) KiB")

        // A graceful stop writes every access line: one per connection, all 200, and the bytes
        // the gateway counted are the clients' to the byte (headers included).
        let quit = try PortcullisBinary.run(["-s", "quit", "-c", rules])
        #expect(quit.status == 0)
        #expect(gateway.wait(timeout: 20) == 0)
        let lines = try String(contentsOfFile: accessLog, encoding: .utf8).split(separator: "\n").map { $0.split(separator: " ") }
        #expect(lines.count == connections)
        #expect(lines.allSatisfy { $0.count == 4 && $0[1] == "200" }, "\(lines.first { $0.count != 4 || $0[1] != "200" } ?? [])")
        #expect(lines.reduce(0) { $0 + ($1.count == 4 ? Int($1[2]) ?? 0 : 0) } == up + Self.headerSize * connections, "bytes received from the clients")
        #expect(lines.reduce(0) { $0 + ($1.count == 4 ? Int($1[3]) ?? 0 : 0) } == down, "bytes sent to the clients")
        #expect(Set(lines.compactMap { $0.first }) == ["a", "b"], "sessions ran under both rule files")
    }
}
