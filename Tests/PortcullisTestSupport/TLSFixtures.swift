#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Certificates for the TLS tests, made by `openssl` in a temporary folder when a test asks
/// (nothing private is committed). One CA signs the server and client certificates; a second,
/// untrusted CA signs a "stranger" client certificate.
///
/// Files (PEM): `ca.crt`; `other-ca.crt`; `server-ec.{crt,key}` and `server-rsa.{crt,key}` for
/// gateway.test (also *.gateway.test and 127.0.0.1); `a.test.{crt,key}`, `b.test.{crt,key}`
/// (ECDSA, for certificates chosen by SNI); `backend.test.{crt,key}`; `client.{crt,key}`
/// (CN=alice, O=Example, from `ca`); `stranger.{crt,key}` (CN=mallory, from `other-ca`).
public final class TestPKI: @unchecked Sendable {
    public let directory: URL

    public func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// Made once per test process.
    public static func shared() throws -> TestPKI {
        try lock.withLock {
            if let made { return made }
            let pki = try TestPKI()
            made = pki
            return pki
        }
    }

    private nonisolated(unsafe) static var made: TestPKI?
    private static let lock = NSLock()

    private init() throws {
        directory = try makeTemporaryDirectory("portcullis-pki")
        try makeCA("ca", subject: "/CN=Portcullis Test CA")
        try makeCA("other-ca", subject: "/CN=Someone Else's CA")
        try makeLeaf("server-ec", key: .ec, subject: "/CN=gateway.test", names: ["DNS:gateway.test", "DNS:*.gateway.test", "IP:127.0.0.1"])
        try makeLeaf("server-rsa", key: .rsa, subject: "/CN=gateway.test", names: ["DNS:gateway.test", "DNS:*.gateway.test", "IP:127.0.0.1"])
        try makeLeaf("a.test", key: .ec, subject: "/CN=a.test", names: ["DNS:a.test"])
        try makeLeaf("b.test", key: .ec, subject: "/CN=b.test", names: ["DNS:b.test"])
        try makeLeaf("backend.test", key: .ec, subject: "/CN=backend.test", names: ["DNS:backend.test", "IP:127.0.0.1"])
        try makeLeaf("client", key: .ec, subject: "/O=Example/CN=alice", names: [], clientAuth: true)
        try makeLeaf("stranger", key: .ec, subject: "/CN=mallory", names: [], clientAuth: true, ca: "other-ca")
    }

    enum KeyKind { case ec, rsa }

    private func openssl(_ arguments: [String]) throws {
        let result = try runTool("openssl", arguments, timeout: 60)
        guard result.status == 0 else {
            throw HarnessError("openssl \(arguments.joined(separator: " ")) failed: \(result.stderr)")
        }
    }

    private func keyArguments(_ kind: KeyKind) -> [String] {
        kind == .ec ? ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] : ["-newkey", "rsa:2048"]
    }

    private func makeCA(_ name: String, subject: String) throws {
        try openssl(["req", "-x509", "-nodes", "-days", "3"] + keyArguments(.ec) + [
            "-keyout", path("\(name).key"), "-out", path("\(name).crt"), "-subj", subject,
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ])
    }

    private func makeLeaf(_ name: String, key: KeyKind, subject: String, names: [String], clientAuth: Bool = false,
                          ca: String = "ca") throws {
        try openssl(["req", "-new", "-nodes"] + keyArguments(key) + [
            "-keyout", path("\(name).key"), "-out", path("\(name).csr"), "-subj", subject,
        ])
        var extensions = "basicConstraints=CA:FALSE\nextendedKeyUsage=\(clientAuth ? "clientAuth" : "serverAuth")\n"
        if !names.isEmpty { extensions += "subjectAltName=\(names.joined(separator: ","))\n" }
        try extensions.write(toFile: path("\(name).ext"), atomically: true, encoding: .utf8)
        try openssl(["x509", "-req", "-in", path("\(name).csr"), "-CA", path("\(ca).crt"), "-CAkey", path("\(ca).key"),
                     "-CAcreateserial", "-days", "3", "-sha256", "-extfile", path("\(name).ext"), "-out", path("\(name).crt")])
    }
}

/// A command-line tool's result.
public struct ToolOutput: Sendable {
    public var status: Int32
    public var stdout: [UInt8]
    public var stderr: String
    public var text: String { String(decoding: stdout, as: UTF8.self) }
    /// stdout then stderr (s_client reports on both).
    public var all: String { text + stderr }
}

/// Runs `tool` (found on PATH) with `input` on its stdin, bounded by `timeout` seconds (then
/// killed: status -1).
public func runTool(_ tool: String, _ arguments: [String], input: [UInt8] = [], timeout: Double = 15) throws -> ToolOutput {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = [tool] + arguments
    let stdin = Pipe(), stdout = Pipe(), stderr = Pipe()
    process.standardInput = stdin
    process.standardOutput = stdout
    process.standardError = stderr
    try process.run()
    // Read both pipes on their own threads, so a chatty tool never blocks on a full pipe.
    let outBox = DataBox(), errBox = DataBox()
    let readers = DispatchGroup()
    for (pipe, box) in [(stdout, outBox), (stderr, errBox)] {
        readers.enter()
        DispatchQueue.global().async {
            box.data = pipe.fileHandleForReading.readDataToEndOfFile()
            readers.leave()
        }
    }
    if !input.isEmpty { stdin.fileHandleForWriting.write(Data(input)) }
    try? stdin.fileHandleForWriting.close()
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning && Date() < deadline { usleep(5_000) }
    var killed = false
    if process.isRunning {
        process.terminate()
        killed = true
    }
    process.waitUntilExit()
    readers.wait()
    return ToolOutput(status: killed ? -1 : process.terminationStatus, stdout: [UInt8](outBox.data),
                      stderr: String(decoding: errBox.data, as: UTF8.self))
}

private final class DataBox: @unchecked Sendable {
    var data = Data()
}

/// `openssl s_client` against 127.0.0.1:`port`: sends `input`, then reads until the server
/// closes (`-quiet` ignores the end of stdin). `arguments` add -servername, -alpn, -cert, …
public func sClient(port: UInt16, host: String = "127.0.0.1", _ arguments: [String] = [], input: [UInt8] = [],
                    timeout: Double = 10) throws -> ToolOutput {
    try runTool("openssl", ["s_client", "-connect", "\(host):\(port)", "-quiet"] + arguments, input: input, timeout: timeout)
}

/// `openssl s_client` for its report of the handshake (certificate subject, protocol, ALPN,
/// "Reused"): not quiet, and it ends at the end of stdin.
public func sClientReport(port: UInt16, host: String = "127.0.0.1", _ arguments: [String] = [],
                          timeout: Double = 10) throws -> ToolOutput {
    try runTool("openssl", ["s_client", "-connect", "\(host):\(port)", "-no_ign_eof"] + arguments, input: [], timeout: timeout)
}

/// `openssl s_client -quiet` kept running: lines go in and come out while the test watches
/// (a TLS session that lives across a reload).
public final class InteractiveTLSClient: @unchecked Sendable {
    private let process = Process()
    private let input = Pipe()
    private let output = Pipe()
    private var buffer: [UInt8] = []

    public init(port: UInt16, _ arguments: [String] = []) throws {
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["openssl", "s_client", "-connect", "127.0.0.1:\(port)", "-quiet"] + arguments
        process.standardInput = input
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
    }

    public func send(_ line: String) {
        input.fileHandleForWriting.write(Data((line + "\n").utf8))
    }

    /// The next line (without its newline), or nil after `timeout` seconds.
    public func readLine(timeout: Double = 5) -> String? {
        let fd = output.fileHandleForReading.fileDescriptor
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let end = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[..<end], as: UTF8.self)
                buffer.removeSubrange(...end)
                return line
            }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 50) > 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = read(fd, &chunk, chunk.count)
            if count <= 0 { return nil }
            buffer += chunk[..<count]
        }
        return nil
    }

    /// Kills the client at once (its socket closes with unread bytes: a reset).
    public func kill() {
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    public func stop() {
        try? input.fileHandleForWriting.close()
        // SIGKILL: s_client -quiet ignores the end of its input, and a SIGTERM would wait while
        // the thread that launched it had signals blocked (a Dispatch worker passes its mask on).
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit { stop() }
}
