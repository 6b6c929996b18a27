#if canImport(Glibc)
import Glibc
#endif
import Foundation
import PortcullisGateway
import PortcullisGeoIP
import PortcullisPolicy
import PortcullisRules
import NIOCore

/// The repository's root folder, found from this file's path.
public let packageRoot: URL = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// A fresh folder for one test's rule files and logs.
public func makeTemporaryDirectory(_ name: String = "portcullis-test") throws -> URL {
    let url = FileManager.default.temporaryDirectory
        .appendingPathComponent("\(name)-\(getpid())-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

public struct HarnessError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// An in-process gateway on a free loopback port. Rule text may use `{PORT}` (the gateway's
/// port) and `{DIR}` (a temporary folder for logs); the file is written as `{DIR}/gateway.conf`.
public final class GatewayHarness: @unchecked Sendable {
    public let directory: URL
    public let port: UInt16
    public let gateway: Gateway
    public let rulePath: String

    public static func start(_ rules: String, host: String = "127.0.0.1") async throws -> GatewayHarness {
        var lastError: (any Error)?
        for _ in 0..<5 {  // a free port can be taken between finding and binding it
            let directory = try makeTemporaryDirectory()
            let port = try freePort(host: host)
            let text = rules.replacingOccurrences(of: "{PORT}", with: String(port))
                .replacingOccurrences(of: "{DIR}", with: directory.path)
            let path = directory.appendingPathComponent("gateway.conf").path
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            let result = RuleLoader.load(path: path, geoip: MaxMindOpener())
            guard let snapshot = result.snapshot else { throw HarnessError("rules do not compile:\n\(result.rendered)") }
            let gateway = try Gateway(snapshot: snapshot)
            do {
                try await gateway.start()
                return GatewayHarness(directory: directory, port: port, gateway: gateway, rulePath: path)
            } catch {
                lastError = error
                await gateway.stop()
            }
        }
        throw lastError ?? HarnessError("could not start")
    }

    private init(directory: URL, port: UInt16, gateway: Gateway, rulePath: String) {
        self.directory = directory
        self.port = port
        self.gateway = gateway
        self.rulePath = rulePath
    }

    public func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// The lines of a log file in the test folder, after everything queued has been written.
    public func lines(of name: String) -> [String] {
        gateway.flushLogs()
        guard let text = try? String(contentsOfFile: path(name), encoding: .utf8) else { return [] }
        return text.split(separator: "\n").map(String.init)
    }

    /// Waits until `condition` holds for the lines of `name`, up to `timeout` seconds.
    public func waitForLines(of name: String, timeout: Double = 5, until condition: ([String]) -> Bool) async -> [String] {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let current = lines(of: name)
            if condition(current) || Date() > deadline { return current }
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    /// Stops with a short drain: a test's leftover client must not cost 5 s.
    public func stop() async {
        gateway.setDrainTimeout(.milliseconds(200))
        await gateway.stop()
        try? FileManager.default.removeItem(at: directory)
    }
}

/// The `portcullis` executable built next to the test bundle.
public enum PortcullisBinary {
    public static var url: URL {
        let beside = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [beside, beside.deletingLastPathComponent()] {
            let url = candidate.appendingPathComponent("portcullis")
            if FileManager.default.isExecutableFile(atPath: url.path) { return url }
        }
        return packageRoot.appendingPathComponent(".build/debug/portcullis")
    }

    public struct Output {
        public var status: Int32
        public var stdout: String
        public var stderr: String
    }

    /// Runs to completion (bounded by `timeout` seconds, then killed).
    public static func run(_ arguments: [String], timeout: Double = 30, in directory: URL? = nil) throws -> Output {
        let process = try launch(arguments, in: directory)
        let deadline = Date().addingTimeInterval(timeout)
        while process.process.isRunning && Date() < deadline { usleep(10_000) }
        if process.process.isRunning { process.process.terminate() }
        process.process.waitUntilExit()
        return Output(status: process.process.terminationStatus, stdout: process.stdout(), stderr: process.stderr())
    }

    public final class Running: @unchecked Sendable {
        public let process: Process
        private let out: Pipe
        private let err: Pipe

        init(process: Process, out: Pipe, err: Pipe) {
            self.process = process
            self.out = out
            self.err = err
        }

        public var pid: Int32 { process.processIdentifier }
        public func stdout() -> String { String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self) }
        public func stderr() -> String { String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self) }
        public func signal(_ number: Int32) { kill(process.processIdentifier, number) }

        /// Waits for the process to exit, up to `timeout` seconds; nil if it did not.
        public func wait(timeout: Double) -> Int32? {
            let deadline = Date().addingTimeInterval(timeout)
            while process.isRunning && Date() < deadline { usleep(10_000) }
            if process.isRunning { return nil }
            process.waitUntilExit()
            return process.terminationStatus
        }

        /// Resident memory in KiB, from /proc.
        public func residentKiB() -> Int? {
            guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
            for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
                return Int(line.split(separator: " ").dropFirst().first ?? "")
            }
            return nil
        }

        deinit {
            if process.isRunning {
                process.terminate()
                process.waitUntilExit()
            }
        }
    }

    public static func launch(_ arguments: [String], in directory: URL? = nil) throws -> Running {
        let process = Process()
        process.executableURL = url
        process.arguments = arguments
        if let directory { process.currentDirectoryURL = directory }
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        return Running(process: process, out: out, err: err)
    }
}

/// Waits until a TCP connect to `port` succeeds (a launched gateway is listening).
public func waitUntilListening(host: String = "127.0.0.1", port: UInt16, timeout: Double = 10) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if let connection = try? TestConnection.connect(to: host, port: port, timeout: 1) {
            connection.close()
            return true
        }
        usleep(20_000)
    }
    return false
}
