#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization

/// A real HAProxy or nginx, run as a child process for PROXY protocol interop tests.
///
/// The peer runs in the foreground (`haproxy -f CONF -db`; `nginx -c CONF -p DIR -g 'daemon off;'`
/// with `master_process off`, so there is one process to stop) on a loopback port from
/// `freePort()`. Config text may use `{PORT}` (that port) and `{DIR}` (the peer's own temporary
/// folder, which holds its config, pid file, logs, and its standard output and error).
///
/// A missing executable is an error, not a skip: CI installs both with `.ci/install-deps`.
public final class ExternalPeer: @unchecked Sendable {
    public enum Kind: String, Sendable {
        case haproxy, nginx

        /// The file the peer's log lines go to, in its folder: HAProxy logs to its standard
        /// output (`log stdout format raw`), nginx to the `access_log` the test names
        /// `{DIR}/access.log`.
        var logName: String { self == .haproxy ? "haproxy.log" : "access.log" }
        var stdoutName: String { self == .haproxy ? "haproxy.log" : "stdout.log" }
    }

    public let kind: Kind
    public let directory: URL
    public let port: UInt16
    public let configPath: String
    public let pid: pid_t
    /// nil while running; the raw wait status once reaped.
    private let exitStatus = Mutex<Int32?>(nil)
    private let stopped = Atomic<Bool>(false)

    private init(kind: Kind, directory: URL, port: UInt16, configPath: String, pid: pid_t) {
        self.kind = kind
        self.directory = directory
        self.port = port
        self.configPath = configPath
        self.pid = pid
    }

    deinit { stop() }

    // MARK: Starting

    /// HAProxy with `sections` (frontends, backends, listens) after a fixed preamble: one
    /// thread, TCP mode, logs as raw lines on standard output (the file `haproxy.log`).
    public static func haproxy(_ sections: String, host: String = "127.0.0.1") throws -> ExternalPeer {
        let preamble = """
            global
                nbthread 1
                log stdout format raw local0
            defaults
                mode tcp
                log global
                timeout connect 3s
                timeout client 10s
                timeout server 10s

            """
        return try start(.haproxy, config: preamble + sections, host: host)
    }

    /// nginx with `stream` (a `stream { }` block) after a preamble that loads the stream module
    /// when it is a separate file, keeps one process, and puts pid and error log in the folder.
    ///
    /// `modules` names further dynamic modules to load after the stream module, by file name
    /// without `.so` in nginx's module folder (e.g. `ngx_stream_geoip2_module`, which Debian's
    /// libnginx-mod-stream-geoip2 installs). A missing one is an error, not a skip.
    public static func nginx(_ stream: String, host: String = "127.0.0.1", modules: [String] = []) throws -> ExternalPeer {
        var preamble = ""
        if FileManager.default.fileExists(atPath: nginxStreamModule) {
            preamble += "load_module \(nginxStreamModule);\n"
        }
        for module in modules {
            let path = "\(nginxModuleFolder)/\(module).so"
            guard FileManager.default.fileExists(atPath: path) else {
                let package = nginxModulePackages[module].map { "`apt-get install \($0)`" } ?? "install it"
                throw HarnessError("""
                    the nginx module \(path) is missing, and this test needs it: \
                    run .ci/install-deps (CI does) or \(package)
                    """)
            }
            preamble += "load_module \(path);\n"
        }
        preamble += """
            master_process off;
            pid {DIR}/nginx.pid;
            error_log {DIR}/error.log info;
            events { worker_connections 256; }

            """
        return try start(.nginx, config: preamble + stream, host: host)
    }

    public static let nginxModuleFolder = "/usr/lib/nginx/modules"
    public static let nginxStreamModule = "\(nginxModuleFolder)/ngx_stream_module.so"
    /// The Debian package that installs each module `nginx(_:modules:)` is asked for.
    static let nginxModulePackages = ["ngx_stream_geoip2_module": "libnginx-mod-stream-geoip2"]

    /// The executable, from PATH or the sbin folders Debian installs to (often not on a normal
    /// user's PATH). Throws a message that says how to get it.
    public static func executable(_ kind: Kind) throws -> String {
        var folders = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map(String.init)
        folders += ["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin"]
        for folder in folders where !folder.isEmpty {
            let candidate = URL(fileURLWithPath: folder).appendingPathComponent(kind.rawValue).path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        let package = kind == .haproxy ? "haproxy" : "nginx libnginx-mod-stream"
        throw HarnessError("""
            \(kind.rawValue) is not installed, and the PROXY protocol interop tests need it as a real peer: \
            run .ci/install-deps (CI does) or `apt-get install \(package)`
            """)
    }

    static func start(_ kind: Kind, config: String, host: String, timeout: Double = 10) throws -> ExternalPeer {
        let executable = try executable(kind)
        var lastProblem = ""
        for _ in 0..<5 {  // a free port can be taken between finding and binding it
            let directory = try makeTemporaryDirectory("portcullis-\(kind.rawValue)")
            let port = try freePort(host: host)
            let text = config.replacingOccurrences(of: "{PORT}", with: String(port))
                .replacingOccurrences(of: "{DIR}", with: directory.path) + "\n"  // HAProxy wants a final newline
            let configPath = directory.appendingPathComponent("\(kind.rawValue).conf").path
            try text.write(toFile: configPath, atomically: true, encoding: .utf8)
            let arguments: [String]
            switch kind {
            case .haproxy:
                arguments = ["-f", configPath, "-db"]
            case .nginx:
                arguments = ["-c", configPath, "-p", directory.path + "/",
                             "-e", directory.appendingPathComponent("error.log").path, "-g", "daemon off;"]
            }
            let pid = try spawn(executable, arguments,
                                stdout: directory.appendingPathComponent(kind.stdoutName).path,
                                stderr: directory.appendingPathComponent("stderr.log").path)
            let peer = ExternalPeer(kind: kind, directory: directory, port: port, configPath: configPath, pid: pid)

            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline && peer.isRunning && !isListening(port: port) { usleep(10_000) }
            if peer.isRunning && isListening(port: port) { return peer }
            peer.stop(removingFolder: false)
            lastProblem = peer.diagnostics
            try? FileManager.default.removeItem(at: directory)
            if !lastProblem.contains("in use") { break }
        }
        if kind == .nginx && lastProblem.contains("unknown directive \"stream\"") {
            lastProblem += "\nnginx has no stream module: install libnginx-mod-stream (.ci/install-deps does)"
        }
        throw HarnessError("\(kind.rawValue) did not start listening:\n\(lastProblem)")
    }

    /// posix_spawn rather than Process, for a clean start: Process lets the child inherit every
    /// descriptor the test runner has open without close-on-exec (other tests' sockets, whose
    /// peers would then never see them close) and the runner's blocked signal mask (nginx
    /// without its master process would never see SIGTERM). Here the child gets /dev/null, two
    /// files, nothing else, no blocked signals and default signal actions.
    public static func spawn(_ path: String, _ arguments: [String], stdout: String, stderr: String) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        let flags = O_WRONLY | O_CREAT | O_TRUNC | O_APPEND
        try checkSpawn(posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0), "addopen stdin")
        try checkSpawn(posix_spawn_file_actions_addopen(&actions, 1, stdout, flags, 0o644), "addopen stdout")
        try checkSpawn(posix_spawn_file_actions_addopen(&actions, 2, stderr, flags, 0o644), "addopen stderr")
        try closeInheritedDescriptors(&actions)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        try checkSpawn(posix_spawnattr_setsigmask(&attributes, &none), "setsigmask")
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCHLD, SIGALRM] {
            sigaddset(&defaults, signal)
        }
        try checkSpawn(posix_spawnattr_setsigdefault(&attributes, &defaults), "setsigdefault")
        try checkSpawn(posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)), "setflags")

        var argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        try checkSpawn(posix_spawn(&pid, path, &actions, &attributes, &argv, environ), "posix_spawn \(path)")
        return pid
    }

    /// Closes every descriptor from 3 up in the child: glibc's addclosefrom_np (2.34+; Swift's
    /// Glibc module does not declare it), else one close per descriptor open now.
    private static func closeInheritedDescriptors(_ actions: inout posix_spawn_file_actions_t) throws {
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>?, Int32) -> Int32
        if let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") {  // nil: RTLD_DEFAULT
            try checkSpawn(unsafeBitCast(symbol, to: CloseFrom.self)(&actions, 3), "addclosefrom")
            return
        }
        let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        for fd in open.compactMap(Int32.init) where fd > 2 {
            try checkSpawn(posix_spawn_file_actions_addclose(&actions, fd), "addclose")
        }
    }

    private static func checkSpawn(_ result: Int32, _ what: String) throws {
        if result != 0 { throw TestSocketError.system(what, result) }
    }

    /// Whether some socket listens on TCP `port`, from /proc/net/tcp{,6}: no probe connection,
    /// which the peer would log (or count as a broken PROXY header).
    static func isListening(port: UInt16) -> Bool {
        let files = ["/proc/net/tcp", "/proc/net/tcp6"]
        guard files.contains(where: { FileManager.default.fileExists(atPath: $0) }) else {
            return waitUntilListening(port: port, timeout: 0.1)  // not Linux: fall back to a probe
        }
        let wanted = String(format: "%04X", port)
        for file in files {
            guard let text = readAll(file) else { continue }
            for line in text.split(separator: "\n").dropFirst() {
                let fields = line.split(separator: " ", omittingEmptySubsequences: true)
                guard fields.count > 3 else { continue }
                // fields[1] = "ADDRHEX:PORTHEX", fields[3] = state; 0A is LISTEN.
                if fields[3] == "0A", fields[1].split(separator: ":").last.map(String.init) == wanted { return true }
            }
        }
        return false
    }

    /// The whole of a /proc file. Foundation's readers stop after the first short read, which
    /// for /proc/net/tcp is one page (about 27 sockets): a busy test run has hundreds.
    static func readAll(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return n == 0 ? String(decoding: bytes, as: UTF8.self) : nil }
            bytes += chunk[0..<n]
        }
    }

    // MARK: Reading

    public func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// The complete lines of the peer's log so far (a line still being written is left out).
    public func logLines() -> [String] { lines(of: kind.logName) }

    public func lines(of name: String) -> [String] {
        guard let text = try? String(contentsOfFile: path(name), encoding: .utf8) else { return [] }
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        lines.removeLast()  // after the last newline: empty, or a partial line
        return lines.filter { !$0.isEmpty }
    }

    /// Waits until `condition` holds for the peer's log lines, up to `timeout` seconds.
    public func waitForLogLines(timeout: Double = 5, until condition: ([String]) -> Bool) async -> [String] {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let current = logLines()
            if condition(current) || Date() > deadline { return current }
            try? await Task.sleep(for: .milliseconds(20))
        }
    }

    /// What the peer said on standard error (and nginx's error log), for failure messages.
    public var diagnostics: String {
        var parts: [String] = []
        for name in ["stderr.log", "stdout.log", "error.log"] {
            if let text = try? String(contentsOfFile: path(name), encoding: .utf8), !text.isEmpty {
                parts.append("[\(name)]\n\(text)")
            }
        }
        if let status = exitStatus.withLock({ $0 }) {
            let signal = status & 0x7F
            parts.append(signal == 0 ? "[exited with status \((status >> 8) & 0xFF)]" : "[killed by signal \(signal)]")
        }
        return parts.joined(separator: "\n")
    }

    /// Whether the process is still running (reaping it if it has exited).
    public var isRunning: Bool {
        exitStatus.withLock { exitStatus in
            guard exitStatus == nil else { return false }
            var status: Int32 = 0
            let result = waitpid(pid, &status, WNOHANG)
            if result == pid {
                exitStatus = status
                return false
            }
            if result < 0 && errno == ECHILD {  // reaped elsewhere
                exitStatus = -1
                return false
            }
            return true
        }
    }

    // MARK: Stopping

    /// Stops the peer (TERM, then KILL after 3 s), reaps it and removes its folder.
    public func stop() { stop(removingFolder: true) }

    private func stop(removingFolder: Bool) {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        if isRunning {
            kill(pid, SIGTERM)
            let deadline = Date().addingTimeInterval(3)
            while isRunning && Date() < deadline { usleep(2_000) }
            if isRunning {
                kill(pid, SIGKILL)
                while isRunning { usleep(2_000) }
            }
        }
        if removingFolder { try? FileManager.default.removeItem(at: directory) }
    }
}

extension TestConnection {
    /// This socket's own address and port (getsockname): the client endpoint a peer sees.
    public func localEndpoint() throws -> (address: String, port: UInt16) { try endpoint(remote: false) }

    /// The other end's address and port (getpeername): the source an upstream sees.
    public func remoteEndpoint() throws -> (address: String, port: UInt16) { try endpoint(remote: true) }

    private func endpoint(remote: Bool) throws -> (address: String, port: UInt16) {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        try withUnsafeMutablePointer(to: &storage) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                remote ? try check(getpeername(fd, $0, &length), "getpeername") : try check(getsockname(fd, $0, &length), "getsockname")
            }
        }
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        if Int32(storage.ss_family) == AF_INET6 {
            var sin6 = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in6.self) }
            inet_ntop(AF_INET6, &sin6.sin6_addr, &text, socklen_t(text.count))
            return (Self.string(text), UInt16(bigEndian: sin6.sin6_port))
        }
        var sin = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in.self) }
        inet_ntop(AF_INET, &sin.sin_addr, &text, socklen_t(text.count))
        return (Self.string(text), UInt16(bigEndian: sin.sin_port))
    }

    private static func string(_ text: [CChar]) -> String {
        String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
