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
    }
}
