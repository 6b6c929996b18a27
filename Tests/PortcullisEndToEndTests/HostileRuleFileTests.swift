#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisCore
import PortcullisTestSupport
import PortcullisWire

/// Issue #16 item 2: hostile rule files through `portcullis check` and `portcullis run`, as
/// separate processes whose wall time and peak RSS are measured. The peak is VmHWM from
/// /proc/PID/status, sampled every 10 ms: wait4's ru_maxrss would include the test runner's
/// own RSS, which posix_spawn's child shares until exec and Linux carries over as its maximum. Each is a
/// located error and exit 1, or a bounded load; never a crash, a hang or a runaway allocation.
/// The figures are printed as HOSTILE-FIGURES lines (docs/threat-model.md quotes them).
@Suite(.serialized) struct HostileRuleFileTests {
    struct Measured {
        var status: Int32?      // nil: killed at the deadline (a hang)
        var signal: Int32?      // set if it died of a signal
        var seconds: Double
        var peakMiB: Double
        var stderr: String
        var described: String {
            String(format: "%.2f s, peak RSS %.1f MiB", seconds, peakMiB)
        }
    }

    /// Runs the gateway with `arguments` to completion (at most `timeout` seconds, then SIGKILL).
    /// `whileRunning` is called once with its pid after `waitFor` listens, then it gets SIGTERM.
    static func measure(_ arguments: [String], in directory: URL, timeout: Double = 60,
                        waitFor port: UInt16? = nil, whileRunning: (() throws -> Void)? = nil) throws -> Measured {
        let out = directory.appendingPathComponent("stdout.txt").path
        let err = directory.appendingPathComponent("stderr.txt").path
        let started = Date()
        let pid = try ExternalPeer.spawn(PortcullisBinary.url.path, arguments, stdout: out, stderr: err)
        let deadline = started.addingTimeInterval(timeout)
        var status: Int32 = 0
        var usage = rusage()
        var reaped: pid_t = 0
        var signalled = false
        var peakKiB = 0
        while reaped == 0 && Date() < deadline {
            peakKiB = max(peakKiB, highWaterKiB(pid))
            reaped = wait4(pid, &status, WNOHANG, &usage)
            if reaped == 0, !signalled, let port, waitUntilListening(port: port, timeout: 0.05) {
                defer {
                    peakKiB = max(peakKiB, highWaterKiB(pid))
                    kill(pid, SIGTERM)
                    signalled = true
                }
                do {
                    try whileRunning?()
                } catch {
                    kill(pid, SIGKILL)
                    _ = wait4(pid, &status, 0, &usage)
                    throw error
                }
            }
            if reaped == 0 { usleep(10_000) }
        }
        var hung = false
        if reaped == 0 {
            hung = true
            kill(pid, SIGKILL)
            _ = wait4(pid, &status, 0, &usage)
        }
        let seconds = Date().timeIntervalSince(started)
        let stderr = (try? String(contentsOfFile: err, encoding: .utf8)) ?? ""
        // WIFEXITED / WIFSIGNALED, spelled out: Swift does not import the macros.
        let exited = status & 0x7F == 0
        return Measured(status: hung ? nil : (exited ? (status >> 8) & 0xFF : nil),
                        signal: !hung && !exited ? status & 0x7F : nil,
                        seconds: seconds, peakMiB: Double(peakKiB) / 1024, stderr: stderr)
    }

    /// VmHWM (peak resident set) of a running process, in KiB; 0 once it has exited.
    static func highWaterKiB(_ pid: pid_t) -> Int {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
        for line in status.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
        }
        return 0
    }

    /// `check` and `run` on the rule file `main.conf` in `directory`: both must exit 1 with
    /// `expected` (a located message) on stderr, within `seconds` and `peakMiB` (an exit within
    /// 10 ms may not be sampled: the bound is on what was seen).
    static func expectRefused(_ name: String, in directory: URL, expected: String,
                              seconds: Double = 10, peakMiB: Double = 200) throws {
        let path = directory.appendingPathComponent("main.conf").path
        for command in ["check", "run"] {
            let result = try measure([command, "-c", path], in: directory, timeout: 60)
            print("HOSTILE-FIGURES \(name) \(command): exit \(result.status.map(String.init) ?? "none"), \(result.described)")
            #expect(result.status == 1, "\(name) \(command): status \(String(describing: result.status)), signal \(String(describing: result.signal)): \(result.stderr.prefix(2000))")
            #expect(result.stderr.contains(expected), "\(name) \(command): \(result.stderr.prefix(2000))")
            #expect(result.seconds < seconds, "\(name) \(command): \(result.described)")
            #expect(result.peakMiB < peakMiB, "\(name) \(command): \(result.described)")
            // A run that lasted past a few samples must have been measured, or the bound says nothing.
            #expect(result.seconds < 0.1 || result.peakMiB > 0, "\(name) \(command): no memory sample")
            // The rendered diagnostics stay readable: no 50 MB line quoted back.
            #expect(result.stderr.utf8.count < 20_000, "\(name) \(command): \(result.stderr.utf8.count) bytes on stderr")
        }
    }

    static func folder(_ files: [String: [UInt8]]) throws -> URL {
        let directory = try makeTemporaryDirectory("portcullis-hostile")
        for (name, bytes) in files {
            let url = directory.appendingPathComponent(name)
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try Data(bytes).write(to: url)
        }
        return directory
    }

    static let server = Array("    server { listen 127.0.0.1:1; return ok; }\n".utf8)

    @Test("an include loop: a located error naming the file that includes itself")
    func includeLoop() throws {
        let dir = try Self.folder([
            "main.conf": Array("stream {\n    include a.conf;\n}\n".utf8),
            "a.conf": Array("include b.conf;\n".utf8),
            "b.conf": Array("include a.conf;\n".utf8),
        ])
        defer { try? FileManager.default.removeItem(at: dir) }
        try Self.expectRefused("include-loop", in: dir, expected: "b.conf:1:9: error: \"\(dir.path)/a.conf\" includes itself")
    }

    @Test("including a directory and /dev/zero: located errors, nothing read")
    func includeDirectoryAndDevZero() throws {
        let dir = try Self.folder([
            "main.conf": Array("stream {\n    include conf.d;\n    include /dev/zero;\n".utf8) + Self.server + Array("}\n".utf8),
            "conf.d/a.conf": Array("allow all;\n".utf8),
        ])
        defer { try? FileManager.default.removeItem(at: dir) }
        try Self.expectRefused("include-dir", in: dir, expected: "main.conf:2:13: error: cannot read rule file \"\(dir.path)/conf.d\": it is a directory")
        try Self.expectRefused("include-dev-zero", in: dir, expected: "main.conf:3:13: error: cannot read rule file \"/dev/zero\": it is not a regular file")
    }

    @Test("a 50 MB token: one located error after at most 4 KiB of it, memory about the file's size")
    func hugeToken() throws {
        let dir = try Self.folder([
            "main.conf": Array("stream {\n    allow ".utf8) + [UInt8](repeating: UInt8(ascii: "z"), count: 50_000_000) + Array(";\n}\n".utf8),
        ])
        defer { try? FileManager.default.removeItem(at: dir) }
        try Self.expectRefused("token-50MB", in: dir, expected: "main.conf:2:11: error: too long word (more than 4096 bytes) starting \"zzzz",
                               peakMiB: 120)
    }

    @Test("100,000 nested blocks: a located error at the 65th level, not a stack overflow")
    func nestedBlocks() throws {
        let depth = 100_000
        let dir = try Self.folder([
            "main.conf": Array(("stream {\n" + String(repeating: "b {", count: depth) + String(repeating: "}", count: depth) + "\n}\n").utf8),
        ])
        defer { try? FileManager.default.removeItem(at: dir) }
        // Level 65 is the 64th "b {", at column 3 × 63 + 1 of line 2.
        try Self.expectRefused("nested-100000", in: dir, expected: "main.conf:2:190: error: blocks nested deeper than 64 levels")
    }

    @Test("invalid UTF-8 and a NUL byte: located at the byte")
    func invalidUTF8AndNul() throws {
        let dir = try Self.folder([
            "main.conf": Array("stream {\n    include bad.conf;\n".utf8) + Self.server + Array("}\n".utf8),
            "bad.conf": Array("allow 10.0.0.1; # ".utf8) + [0xFF, 0xFE] + Array("\n".utf8),
        ])
        defer { try? FileManager.default.removeItem(at: dir) }
        try Self.expectRefused("invalid-utf8", in: dir, expected: "bad.conf:1:19: error: invalid UTF-8 (byte 0xFF)")
        try Data(Array("allow 10.0.0.1;\n\n  ".utf8) + [0, 0, 0]).write(to: dir.appendingPathComponent("bad.conf"))
        try Self.expectRefused("nul-byte", in: dir, expected: "bad.conf:3:3: error: a NUL byte (0x00) in a rule file")
    }

    @Test("a geo block of 2,000,000 lines: check passes and run answers from it, in bounded time and memory")
    func hugeGeo() throws {
        var text = Array("stream {\n    geo $where {\n        default miss;\n        127.0.0.2 hit;\n".utf8)
        text.reserveCapacity(2_000_000 * 30)
        for i in 0..<2_000_000 {
            // Distinct /32s in 10.0.0.0/8, with 100 different values.
            text += Array("        10.\(i >> 16 & 0xFF).\(i >> 8 & 0xFF).\(i & 0xFF) v\(i % 100);\n".utf8)
        }
        let port = try freePort()
        text += Array("    }\n    server { listen 127.0.0.1:\(port); return \"$where\\n\"; }\n}\n".utf8)
        let dir = try Self.folder(["main.conf": text])
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("main.conf").path
        print("HOSTILE-FIGURES geo-2000000: file \(text.count / 1_048_576) MiB")

        let check = try Self.measure(["check", "-c", path], in: dir, timeout: 120)
        print("HOSTILE-FIGURES geo-2000000 check: exit \(check.status.map(String.init) ?? "none"), \(check.described)")
        #expect(check.status == 0, "\(check.stderr.prefix(2000))")
        #expect(check.seconds < 90 && check.peakMiB > 0 && check.peakMiB < 600, "\(check.described)")

        var answers: [String] = []
        let run = try Self.measure(["run", "-c", path], in: dir, timeout: 120, waitFor: port) {
            for source in ["127.0.0.2", "127.0.0.3"] {
                let connection = try TestConnection.connect(to: "127.0.0.1", port: port, from: source)
                defer { connection.close() }
                answers.append(String(decoding: try connection.receiveAll(limit: 100), as: UTF8.self))
            }
        }
        print("HOSTILE-FIGURES geo-2000000 run: exit \(run.status.map(String.init) ?? "none"), \(run.described)")
        #expect(answers == ["hit\n", "miss\n"], "\(run.stderr.prefix(2000))")
        #expect(run.status == 0, "stopped by SIGTERM: \(String(describing: run.status)), signal \(String(describing: run.signal))")
        #expect(run.seconds < 90 && run.peakMiB > 0 && run.peakMiB < 600, "\(run.described)")
    }

    @Test("map regexes built for catastrophic backtracking: the file loads, and 60 KB client-chosen PROXY TLVs matched against each are decided within seconds on a debug build")
    func catastrophicRegexes() throws {
        let port = try freePort()
        // Each pattern backtracks exponentially, or as a high power of the length, in a
        // backtracking engine on the values below ((.*a){20} took 24.7 s on 33 bytes with
        // Swift's Regex); each gets its own map so every value meets every pattern.
        let patterns = ["(.*a){20}", "a*a*a*a*a*b", "^(a+)+$", "(a|aa)*c", "(x+x+)+y", "^(\\\\w+\\\\s?)*$"]
        let maps = patterns.enumerated().map { index, pattern in
            "        map $proxy_protocol_tlv_0xe0 $h\(index) { default 0; \"~\(pattern)\" 1; }"
        }
        let rules = """
            error_log {DIR}/error.log;
            stream {
            \(maps.joined(separator: "\n"))
                server {
                    listen 127.0.0.1:\(port) proxy_protocol;
                    set_real_ip_from 127.0.0.0/8;
                    return "$h0$h1$h2$h3$h4$h5\\n";
                }
            }
            """
        let directory = try makeTemporaryDirectory("portcullis-hostile-regex")
        defer { try? FileManager.default.removeItem(at: directory) }
        try Data(rules.replacingOccurrences(of: "{DIR}", with: directory.path).utf8)
            .write(to: directory.appendingPathComponent("main.conf"))
        let path = directory.appendingPathComponent("main.conf").path
        let check = try Self.measure(["check", "-c", path], in: directory, timeout: 60)
        print("HOSTILE-FIGURES regex check: exit \(check.status.map(String.init) ?? "none"), \(check.described)")
        #expect(check.status == 0, "\(check.stderr.prefix(2000))")

        // Each value fails some patterns only at its very end, after every split was possible.
        let values: [(value: String, expected: String)] = [
            (String(repeating: "a", count: 19) + String(repeating: "-", count: 60_000), "000000"),  // 19 a's for 20 groups
            (String(repeating: "a", count: 60_000) + "!", "100000"),  // no b, no c, not all a's
            (String(repeating: "x", count: 60_000), "000001"),  // no y
            (String(repeating: "ab ", count: 20_000) + "!", "110000"),  // words, then a non-word
        ]
        var answers: [String] = []
        var slowest = 0.0
        let run = try Self.measure(["run", "-c", path], in: directory, timeout: 180, waitFor: port) {
            for (value, _) in values {
                let header = ProxyHeaderEncoder.v2(
                    source: SocketEndpoint("198.51.100.7:40000")!, destination: SocketEndpoint("203.0.113.9:443")!,
                    tlvs: [ProxyTLV(type: 0xE0, value: Array(value.utf8))])
                let started = Date()
                let client = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 60)
                defer { client.close() }
                try client.send(header)
                answers.append(String(decoding: try client.receiveAll(limit: 100), as: UTF8.self))
                slowest = max(slowest, Date().timeIntervalSince(started))
            }
        }
        print("HOSTILE-FIGURES regex run: \(values.count) values of 60 KB against \(patterns.count) patterns, slowest answer \(String(format: "%.3f", slowest)) s; \(run.described)")
        #expect(answers == values.map { $0.expected + "\n" })
        #expect(slowest < 10, "the slowest value took \(slowest) s")
        #expect(run.status == 0, "stopped by SIGTERM: \(String(describing: run.status)), signal \(String(describing: run.signal))")
    }
}
