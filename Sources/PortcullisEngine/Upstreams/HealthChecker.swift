import CPortcullisLinux
import Foundation
import Glibc
public import Logging
import PortcullisCore
public import PortcullisPolicy
import Synchronization

/// Runs every `health_check` (docs/directives.md#health_check) on one thread of its own, off
/// the event loops: each checked server is probed every `interval` with a non-blocking socket,
/// and all probes in flight are watched with one `poll(2)`. Checks are a few per second, so
/// one thread is plenty, and a slow or silent server never holds up a relay.
///
/// A probe passes when the connect succeeds (TCP), the `match`'s `send` is written, and the
/// answer satisfies its `expect`, all within `health_check_timeout`. A UDP probe sends the
/// match's datagram (or nginx's "nginx health check") and passes unless the host answers with
/// ICMP port unreachable before the timeout, or, with an `expect`, when a matching answer comes.
/// Only changes of state are logged above `info`: one line when a server leaves rotation, one
/// when it comes back.
public final class HealthChecker: @unchecked Sendable {
    private let checks: [HealthCheck]
    private let log: Logger
    private let thread = PollThread()

    /// Only what a probe reads: the first 16 KiB of an answer (nginx's proxy_buffer_size).
    static let answerLimit = 16 * 1024

    private enum Stage { case connecting, sending, reading }

    private struct Probe {
        var fd: Int32
        var stage: Stage
        var deadline: UInt64
        var payload: [UInt8]
        var sent = 0
        var received: [UInt8] = []
    }

    private struct Target {
        let check: Int
        let server: Int
        var tracker: HealthTracker
        var nextAt: UInt64
        var probe: Probe?
        var results = 0
    }

    /// Where each check's servers start: in rotation, or out (a `mandatory` check's
    /// "checking", or a server a reload's carried group had out).
    private let initialHealth: [[Int: Bool]]

    /// `carried`: the groups a reload took over from the running rules. Their servers start as
    /// they are now (a server that was out stays out until it passes), except that a
    /// `mandatory` check without `persistent` starts "checking" again, as nginx Plus.
    public init(checks: [HealthCheck], errorLog: Logger, carried: Set<ObjectIdentifier> = []) {
        self.checks = checks
        log = errorLog
        initialHealth = checks.map { check in
            var start: [Int: Bool] = [:]
            let keepsState = carried.contains(ObjectIdentifier(check.group)) && (!check.mandatory || check.persistent)
            for server in check.checkedServers {
                start[server] = keepsState ? check.group.isHealthy(server) : !check.mandatory
            }
            return start
        }
        // Out of rotation from the start, before any listener takes a session; a carried
        // group's old checker gives its own votes back when it stops.
        for (check, start) in zip(checks, initialHealth) {
            for (server, healthy) in start where !healthy { check.group.setHealth(server, healthy: false) }
        }
    }

    /// Starts probing (the first probe of every server now, as nginx Plus). A server that
    /// starts out of rotation stays out until it passes.
    public func start() {
        var targets: [Target] = []
        let now = Clock.monotonic()
        for (index, check) in checks.enumerated() {
            for server in check.checkedServers {
                let tracker = HealthTracker(check: check, healthy: initialHealth[index][server])
                targets.append(Target(check: index, server: server, tracker: tracker, nextAt: now))
            }
        }
        let initial = targets
        let checks = self.checks
        thread.start(name: "health checks") { [self] in
            var targets = initial
            run(&targets)
            for target in targets {
                if let probe = target.probe { Glibc.close(probe.fd) }
                // The votes of this checker go with it: after a reload the new one holds its own.
                if !target.tracker.healthy { checks[target.check].group.setHealth(target.server, healthy: true) }
            }
        }
    }

    /// A reload that failed after this checker was made: the servers it held out from the
    /// start are let go (it never started).
    public func abandon() {
        for (check, start) in zip(checks, initialHealth) {
            for (server, healthy) in start where !healthy { check.group.setHealth(server, healthy: true) }
        }
    }

    /// Stops the thread and waits for it (in-flight probes are abandoned, and the servers it
    /// held out of rotation are let go).
    public func stop() { thread.stop() }

    // MARK: The loop

    private func run(_ targets: inout [Target]) {
        while !thread.isStopped {
            var now = Clock.monotonic()
            for i in targets.indices where targets[i].probe == nil && now >= targets[i].nextAt {
                begin(&targets[i], now: now)
            }
            // Wait for a probe's socket, its deadline, or the next probe to start.
            var wakeAt = now + 1_000_000_000
            var fds = [pollfd(fd: thread.wakeup, events: Int16(POLLIN), revents: 0)]
            var owners: [Int] = []
            for (i, target) in targets.enumerated() {
                guard let probe = target.probe else {
                    wakeAt = min(wakeAt, target.nextAt)
                    continue
                }
                wakeAt = min(wakeAt, probe.deadline)
                let events = probe.stage == .reading ? POLLIN : POLLOUT
                fds.append(pollfd(fd: probe.fd, events: Int16(events), revents: 0))
                owners.append(i)
            }
            let timeout = wakeAt > now ? Int32(min((wakeAt - now) / 1_000_000 + 1, 1_000)) : 0
            _ = poll(&fds, nfds_t(fds.count), timeout)
            if thread.isStopped { return }
            now = Clock.monotonic()
            for (slot, i) in owners.enumerated() where fds[slot + 1].revents != 0 {
                advance(&targets[i], now: now)
            }
            for i in targets.indices {
                if let probe = targets[i].probe, now >= probe.deadline { timedOut(&targets[i], now: now) }
            }
        }
    }

    private func begin(_ target: inout Target, now: UInt64) {
        let check = checks[target.check]
        let endpoint = check.target(target.server)
        let type = check.udp ? SOCK_DGRAM : SOCK_STREAM
        let fd = socket(endpoint.family, Int32(type.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            return finish(&target, passed: false, reason: "\(SystemCallError("socket"))", while: "connecting to upstream", now: now)
        }
        if check.udp && endpoint.isUnix {
            // Autobind, so the server can answer (as UDP sessions do).
            var family = sockaddr_storage()
            family.ss_family = sa_family_t(AF_UNIX)
            _ = withUnsafePointer(to: &family) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sa_family_t>.size)) }
            }
        }
        let payload = check.match?.send ?? (check.udp ? HealthCheck.defaultDatagram : [])
        let deadline = now + NameResolver.nanoseconds(UInt64(check.timeoutMilliseconds))
        var probe = Probe(fd: fd, stage: .sending, deadline: deadline, payload: payload)
        if endpoint.withSockAddr({ connect(fd, $0, $1) }) != 0 {
            guard errno == EINPROGRESS else {
                let error = SystemCallError("connect")
                Glibc.close(fd)
                return finish(&target, passed: false, reason: "\(error)", while: "connecting to upstream", now: now)
            }
            probe.stage = .connecting
        }
        target.probe = probe
        if probe.stage == .sending { advance(&target, now: now) }
    }

    private func advance(_ target: inout Target, now: UInt64) {
        guard var probe = target.probe else { return }
        let check = checks[target.check]
        switch probe.stage {
        case .connecting:
            let error = Socket.pendingError(probe.fd)
            guard error == 0 else {
                return finish(&target, passed: false, reason: "\(SystemCallError("connect", errno: error))", while: "connecting to upstream", now: now)
            }
            probe.stage = .sending
            target.probe = probe
            advance(&target, now: now)
        case .sending:
            while probe.sent < probe.payload.count {
                let n = probe.payload[probe.sent...].withUnsafeBytes { send(probe.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if n < 0 {
                    if errno == EAGAIN { target.probe = probe; return }
                    return finish(&target, passed: false, reason: "\(SystemCallError("send"))", while: "sending to upstream", now: now)
                }
                probe.sent += n
            }
            // TCP without an expectation: connected (and sent) is all it takes.
            if !check.udp && check.match?.expect == nil {
                return finish(&target, passed: true, reason: "", while: "connecting to upstream", now: now)
            }
            probe.stage = .reading
            target.probe = probe
        case .reading:
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buffer.withUnsafeMutableBytes { recv(probe.fd, $0.baseAddress, $0.count, 0) }
                if n < 0 {
                    if errno == EAGAIN { target.probe = probe; return }
                    // UDP: ICMP port unreachable arrives as ECONNREFUSED.
                    return finish(&target, passed: false, reason: "\(SystemCallError("recv"))", while: "reading from upstream", now: now)
                }
                let ended = n == 0 && !check.udp
                if check.udp {
                    probe.received = Array(buffer.prefix(n))  // one datagram is one answer
                } else {
                    probe.received += buffer.prefix(min(n, Self.answerLimit - probe.received.count))
                }
                let full = probe.received.count >= Self.answerLimit
                let verdict = check.match?.verdict(probe.received, ended: ended || full) ?? .passed
                switch verdict {
                case .passed:
                    return finish(&target, passed: true, reason: "", while: "checking response", now: now)
                case .failed(let why):
                    return finish(&target, passed: false, reason: why, while: "checking response", now: now)
                case .needMore:
                    if ended || full { return }
                }
            }
        }
    }

    private func timedOut(_ target: inout Target, now: UInt64) {
        guard let probe = target.probe else { return }
        let check = checks[target.check]
        // A UDP server that is not expected to answer passes when no ICMP error came.
        if check.udp && check.match?.expect == nil && probe.stage == .reading {
            return finish(&target, passed: true, reason: "", while: "reading from upstream", now: now)
        }
        let stage = switch probe.stage {
        case .connecting: "connecting to upstream"
        case .sending: "sending to upstream"
        case .reading: "reading from upstream"
        }
        finish(&target, passed: false, reason: "upstream timed out (110: Connection timed out)", while: stage, now: now)
    }

    private func finish(_ target: inout Target, passed: Bool, reason: String, while action: String, now: UInt64) {
        if let probe = target.probe { Glibc.close(probe.fd) }
        target.probe = nil
        let check = checks[target.check]
        let jitter = check.jitterMilliseconds > 0 ? UInt64.random(in: 0...UInt64(check.jitterMilliseconds)) : 0
        target.nextAt = now + NameResolver.nanoseconds(UInt64(check.intervalMilliseconds) + jitter)
        target.results += 1
        let server = check.group.servers[target.server]
        let place = "health check \"\(check.match?.name ?? "")\" of peer \(check.target(target.server)) in upstream \"\(check.group.name)\""
            + (server.backup ? " (backup)" : "")
        if !passed { log.info("\(reason) while \(action), \(place)") }
        guard let healthy = target.tracker.record(passed: passed, firstResult: target.results == 1 && check.mandatory) else { return }
        check.group.setHealth(target.server, healthy: healthy)
        if healthy {
            log.notice("peer is healthy while \(action), \(place)")
        } else {
            log.warning("peer is unhealthy while \(action) (\(reason)), \(place)")
        }
    }
}
