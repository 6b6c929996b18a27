#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
public import PortcullisPolicy

/// Process-wide settings from the main context: what nginx's master process would do.
public enum ProcessSetup {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// `worker_rlimit_nofile`, before any socket is opened.
    public static func applyLimits(_ main: MainSettings) throws {
        guard let limit = main.workerRlimitNofile else { return }
        var value = rlimit(rlim_cur: rlim_t(limit), rlim_max: rlim_t(limit))
        if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &value) != 0 {
            throw Failure(description: "setrlimit(RLIMIT_NOFILE, \(limit)) failed: \(String(cString: strerror(errno)))")
        }
    }

    /// `user`: drop root after the listeners are bound. Ignored (with a warning) when not root.
    public static func dropPrivileges(_ main: MainSettings, log: Logger) throws {
        guard let user = main.user else { return }
        guard geteuid() == 0 else {
            log.warning("the \"user\" directive makes sense only if portcullis runs as root, ignored")
            return
        }
        guard let entry = getpwnam(user) else { throw Failure(description: "getpwnam(\"\(user)\") failed: no such user") }
        var gid = entry.pointee.pw_gid
        if let groupName = main.group {
            guard let group = getgrnam(groupName) else { throw Failure(description: "getgrnam(\"\(groupName)\") failed: no such group") }
            gid = group.pointee.gr_gid
        }
        let uid = entry.pointee.pw_uid
        guard setgroups(0, nil) == 0, setgid(gid) == 0, setuid(uid) == 0 else {
            throw Failure(description: "cannot switch to user \"\(user)\": \(String(cString: strerror(errno)))")
        }
    }

    /// `pid FILE`, written once listening.
    public static func writePidFile(_ main: MainSettings) throws {
        guard let path = main.pidFile else { return }
        do {
            try "\(getpid())\n".write(toFile: path, atomically: true, encoding: .utf8)
        } catch {
            throw Failure(description: "cannot write pid file \"\(path)\": \(error.localizedDescription)")
        }
    }

    public static func removePidFile(_ main: MainSettings) {
        guard let path = main.pidFile else { return }
        unlink(path)
        if let status = reloadStatusPath(main) { unlink(status) }
    }

    /// Where the running gateway says how its last reload went, beside the pid file
    /// (`portcullis reload` waits for it): nil without `pid`.
    public static func reloadStatusPath(_ main: MainSettings) -> String? {
        main.pidFile.map { $0 + ".reload" }
    }

    /// Writes the reload status: a first line `ATTEMPT GENERATION ok|failed`, then the errors.
    /// Created at start (attempt 0) before privileges are dropped and given to `user`, so the
    /// process can still rewrite it afterwards.
    public static func writeReloadStatus(_ main: MainSettings, attempt: Int, generation: Int, errors: [String],
                                         log: Logger) {
        guard let path = reloadStatusPath(main) else { return }
        let text = "\(attempt) \(generation) \(errors.isEmpty ? "ok" : "failed")\n" + errors.map { $0 + "\n" }.joined()
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            log.warning("cannot write the reload status file \"\(path)\": \(String(cString: strerror(errno)))")
            return
        }
        defer { close(fd) }
        if attempt == 0, geteuid() == 0, let user = main.user, let entry = getpwnam(user) {
            _ = fchown(fd, entry.pointee.pw_uid, entry.pointee.pw_gid)
        }
        _ = text.withCString { write(fd, $0, strlen($0)) }
    }

    /// The status file's first line: (attempt, generation, succeeded), nil if unreadable.
    public static func readReloadStatus(_ path: String) -> (attempt: Int, generation: Int, succeeded: Bool, errors: [String])? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        let lines = text.split(separator: "\n").map(String.init)
        guard let first = lines.first else { return nil }
        let fields = first.split(separator: " ")
        guard fields.count == 3, let attempt = Int(fields[0]), let generation = Int(fields[1]) else { return nil }
        return (attempt, generation, fields[2] == "ok", Array(lines.dropFirst()))
    }
}
