#if canImport(Glibc)
import Glibc
#endif
import Foundation
import PortcullisTestSupport

/// `portcullis run -c` as a child process in a fresh folder (`{DIR}` in the rules), optionally
/// under `ulimit -n`, with what /proc says about it: its descriptors, CPU time and memory are
/// its own, not the test process's. Used by the flood, fault and hostile-input tests.
final class MeasuredGateway: @unchecked Sendable {
    let process: Process
    let directory: URL
    var pid: Int32 { process.processIdentifier }

    /// `waitFor`: a port to wait for (up to 20 s) before returning; the gateway is killed and
    /// its output thrown as the error if it exits or does not listen by then.
    init(rules: String, descriptorLimit: Int? = nil, waitFor port: UInt16? = nil) throws {
        directory = try makeTemporaryDirectory("portcullis-measured")
        let path = directory.appendingPathComponent("gateway.conf").path
        try rules.replacingOccurrences(of: "{DIR}", with: directory.path).write(toFile: path, atomically: true, encoding: .utf8)
        let binary = PortcullisBinary.url.path
        let process = Process()
        if let limit = descriptorLimit {
            // Without -H or -S, ulimit sets both the soft and the hard limit; exec keeps the pid.
            process.executableURL = URL(fileURLWithPath: "/bin/sh")
            process.arguments = ["-c", "ulimit -n \(limit) && exec \"$0\" run -c \"$1\"", binary, path]
        } else {
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = ["run", "-c", path]
        }
        // Output to a file, not a pipe nobody reads (a full pipe would block the gateway).
        let outputPath = directory.appendingPathComponent("output.txt").path
        FileManager.default.createFile(atPath: outputPath, contents: nil)
        process.standardOutput = FileHandle(forWritingAtPath: outputPath)
        process.standardError = FileHandle(forWritingAtPath: outputPath)
        process.standardInput = FileHandle.nullDevice
        try process.run()
        self.process = process
        guard let port else { return }
        let deadline = Flood.now() + 20
        var listening = false
        while process.isRunning && !listening && Flood.now() < deadline {
            listening = waitUntilListening(port: port, timeout: 0.5)
        }
        guard listening else {
            kill()
            throw HarnessError("the gateway did not listen on \(port): \(output())")
        }
    }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// What it wrote to stdout and stderr.
    func output() -> String { (try? String(contentsOfFile: path("output.txt"), encoding: .utf8)) ?? "" }

    /// Why it is no longer running ("" while it is).
    var exitDescription: String {
        process.isRunning ? "" : "status \(process.terminationStatus), reason \(process.terminationReason.rawValue)"
    }

    var isRunning: Bool { process.isRunning }

    /// Open descriptors, counted in /proc/PID/fd.
    var descriptors: Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1 }

    /// RLIMIT_NOFILE as /proc/PID/limits shows it.
    var descriptorLimits: (soft: Int, hard: Int)? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("Max open files") {
            let fields = line.dropFirst("Max open files".count).split(separator: " ")
            guard fields.count >= 2, let soft = Int(fields[0]), let hard = Int(fields[1]) else { return nil }
            return (soft, hard)
        }
        return nil
    }

    /// User plus system CPU time of all its threads, from /proc/PID/stat.
    var cpuSeconds: Double? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        // After "pid (comm)": field 3 (state) is index 0, utime (14) index 11, stime (15) index 12.
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// VmRSS, KiB.
    var residentKiB: Int? { Self.field("VmRSS:", in: "/proc/\(pid)/status") }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM, RssAnon), -1 if it cannot be read.
    func status(_ field: String) -> Int { Self.field(field + ":", in: "/proc/\(pid)/status") ?? -1 }

    /// Pss from smaps_rollup, KiB.
    var proportionalKiB: Int? { Self.field("Pss:", in: "/proc/\(pid)/smaps_rollup") }

    private static func field(_ name: String, in path: String) -> Int? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(name) {
            return Int(line.dropFirst(name.count).split(whereSeparator: \.isWhitespace).first ?? "")
        }
        return nil
    }

    func lines(of name: String) -> [String] {
        let path = directory.appendingPathComponent(name).path
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").map(String.init)
    }

    /// Waits until `condition` holds for the lines of `name` (the gateway writes its logs from
    /// a thread of its own), up to `timeout` seconds.
    func waitForLines(of name: String, timeout: Double, until condition: ([String]) -> Bool) -> [String] {
        let deadline = Flood.now() + timeout
        while true {
            let current = lines(of: name)
            if condition(current) || Flood.now() > deadline { return current }
            usleep(50_000)
        }
    }

    /// SIGTERM, then its exit status (nil if it was still running after 15 s: then SIGKILL).
    @discardableResult
    func stop() -> Int32? {
        guard process.isRunning else { return process.terminationStatus }
        Glibc.kill(pid, SIGTERM)
        let deadline = Flood.now() + 15
        while process.isRunning && Flood.now() < deadline { usleep(20_000) }
        if process.isRunning {
            self.kill()
            return nil
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    func kill() {
        if process.isRunning {
            Glibc.kill(pid, SIGKILL)
            process.waitUntilExit()
        }
    }

    deinit {
        kill()
        try? FileManager.default.removeItem(at: directory)
    }
}
