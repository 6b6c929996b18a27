import CPortcullisLinux
import Foundation
import Glibc
public import Logging
import PortcullisCore
public import PortcullisPolicy
import PortcullisWire
import Synchronization

/// Keeps every `server NAME resolve` line's servers following what its name resolves to
/// (nginx 1.27.3's `resolve`), on one thread of its own with one `poll(2)`, like the health
/// checks. For each name: an A and an AAAA query (as `ipv4=`/`ipv6=` allow) to the next name
/// server of its `resolver` in turn, sent again to the next one every 5 s without an answer,
/// until `resolver_timeout`. Then, as nginx:
/// - answers: the group's servers for that line become exactly those addresses (new ones join,
///   gone ones leave; sessions on them are not touched); asked again after `valid=` or the
///   smallest TTL (at least 1 s);
/// - NXDOMAIN: the name has no servers any more; asked again after `valid=` or 10 s;
/// - a failure or no answer in time: the servers stay as they were, the error log says why,
///   and the name is asked again after `resolver_timeout` (at least 1 s).
public final class NameResolver: @unchecked Sendable {
    private let resolutions: [Resolution]
    private let log: Logger
    private let stopped = Atomic<Bool>(false)
    private let finished = Atomic<Bool>(false)
    private let wakeup: Int32
    private static let resendNanoseconds: UInt64 = 5_000_000_000

    private struct Query {
        let type: DNSMessage.RecordType
        var id: UInt16
        var fd: Int32 = -1
        var sentAt: UInt64 = 0
        var answer: DNSMessage.Answer?
    }

    private struct Name {
        let resolution: Resolution
        var nextAt: UInt64
        var queries: [Query] = []
        var startedAt: UInt64 = 0
        var server = 0
        var lastProblem: String?
    }

    public init(resolutions: [Resolution], errorLog: Logger) {
        self.resolutions = resolutions
        log = errorLog
        wakeup = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
    }

    /// Starts resolving (every name at once: until its first answer it has no servers).
    public func start() {
        let now = Clock.monotonic()
        let names = resolutions.map { Name(resolution: $0, nextAt: now) }
        let thread = Thread { [self] in
            var names = names
            run(&names)
            for name in names { for query in name.queries where query.fd >= 0 { Glibc.close(query.fd) } }
            finished.store(true, ordering: .releasing)
        }
        thread.name = "resolver"
        thread.start()
    }

    public func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        var one: UInt64 = 1
        _ = write(wakeup, &one, 8)
        while !finished.load(ordering: .acquiring) { usleep(1_000) }
        Glibc.close(wakeup)
    }

    private func run(_ names: inout [Name]) {
        while !stopped.load(ordering: .relaxed) {
            var now = Clock.monotonic()
            for i in names.indices where names[i].queries.isEmpty && now >= names[i].nextAt { begin(&names[i], now: now) }
            var wakeAt = now + 1_000_000_000
            var fds = [pollfd(fd: wakeup, events: Int16(POLLIN), revents: 0)]
            var owners: [(name: Int, query: Int)] = []
            for (i, name) in names.enumerated() {
                guard !name.queries.isEmpty else {
                    wakeAt = min(wakeAt, name.nextAt)
                    continue
                }
                wakeAt = min(wakeAt, name.startedAt + UInt64(name.resolution.resolver.timeoutMilliseconds) * 1_000_000)
                for (q, query) in name.queries.enumerated() where query.answer == nil && query.fd >= 0 {
                    wakeAt = min(wakeAt, query.sentAt + Self.resendNanoseconds)
                    fds.append(pollfd(fd: query.fd, events: Int16(POLLIN), revents: 0))
                    owners.append((i, q))
                }
            }
            let timeout = wakeAt > now ? Int32(min((wakeAt - now) / 1_000_000 + 1, 1_000)) : 0
            _ = poll(&fds, nfds_t(fds.count), timeout)
            if stopped.load(ordering: .relaxed) { return }
            now = Clock.monotonic()
            for (slot, owner) in owners.enumerated() where fds[slot + 1].revents != 0 {
                receive(&names[owner.name], query: owner.query)
            }
            for i in names.indices where !names[i].queries.isEmpty {
                let resolver = names[i].resolution.resolver
                if names[i].queries.allSatisfy({ $0.answer != nil }) {
                    finish(&names[i], now: now)
                } else if now >= names[i].startedAt + UInt64(resolver.timeoutMilliseconds) * 1_000_000 {
                    fail(&names[i], "Operation timed out", code: 110, now: now)
                } else {
                    for q in names[i].queries.indices where names[i].queries[q].answer == nil
                        && now >= names[i].queries[q].sentAt + Self.resendNanoseconds {
                        names[i].server += 1  // the next name server, as nginx resends
                        send(&names[i], query: q, now: now)
                    }
                }
            }
        }
    }

    private func begin(_ name: inout Name, now: UInt64) {
        let resolver = name.resolution.resolver
        var types: [DNSMessage.RecordType] = []
        if resolver.ipv4 { types.append(.a) }
        if resolver.ipv6 { types.append(.aaaa) }
        name.queries = types.map { Query(type: $0, id: UInt16.random(in: 0...UInt16.max)) }
        name.startedAt = now
        for q in name.queries.indices { send(&name, query: q, now: now) }
    }

    /// (Re)sends one query from a fresh socket (a fresh source port and id each time).
    private func send(_ name: inout Name, query q: Int, now: UInt64) {
        if name.queries[q].fd >= 0 { Glibc.close(name.queries[q].fd) }
        let servers = name.resolution.resolver.servers
        let server = servers[name.server % servers.count]
        name.queries[q].id = UInt16.random(in: 0...UInt16.max)
        name.queries[q].sentAt = now
        let fd = socket(server.family, Int32(SOCK_DGRAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        name.queries[q].fd = fd
        guard fd >= 0, server.withSockAddr({ connect(fd, $0, $1) }) == 0,
              let message = DNSMessage.query(id: name.queries[q].id, name: name.resolution.host, type: name.queries[q].type) else { return }
        _ = message.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, 0) }
    }

    private func receive(_ name: inout Name, query q: Int) {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(name.queries[q].fd, $0.baseAddress, $0.count, 0) }
            guard n >= 0 else { return }  // EAGAIN; ICMP from a dead name server: the resend moves on
            do {
                name.queries[q].answer = try DNSMessage.answer(Array(buffer.prefix(n)), id: name.queries[q].id,
                                                               name: name.resolution.host, type: name.queries[q].type)
                return
            } catch {
                continue  // not ours, or malformed: wait for the real answer
            }
        }
    }

    private func finish(_ name: inout Name, now: UInt64) {
        let answers = name.queries.compactMap(\.answer)
        closeQueries(&name)
        let resolution = name.resolution
        var addresses: [SocketEndpoint] = []
        var ttl = UInt32.max
        var nameError = true
        for answer in answers {
            switch answer {
            case .addresses(let found, let seconds):
                nameError = false
                addresses += found.map { SocketEndpoint(address: $0, port: resolution.port) }
                if !found.isEmpty { ttl = min(ttl, seconds) }
            case .nameError:
                continue
            case .failure(let code):
                return fail(&name, Self.rcodeText(code), code: Int(code), now: now)
            case .truncated:
                return fail(&name, "Truncated answer (over UDP)", code: 0, now: now)
            }
        }
        if nameError {
            // NXDOMAIN: no servers for this name now (nginx removes them too).
            log(problem: "\(resolution.host) could not be resolved (3: Host not found)", &name)
        } else {
            name.lastProblem = nil
        }
        let change = resolution.group.updateResolved(resolution.template, to: addresses)
        for endpoint in change.added {
            log.notice("upstream \"\(resolution.group.name)\": \(endpoint) added, \"\(resolution.host)\" resolves to it")
        }
        for endpoint in change.removed {
            log.notice("upstream \"\(resolution.group.name)\": \(endpoint) removed, \"\(resolution.host)\" no longer resolves to it")
        }
        let valid = resolution.resolver.validMilliseconds.map { UInt64($0) }
        let wait: UInt64
        if nameError || addresses.isEmpty {
            wait = valid ?? 10_000
        } else {
            wait = valid ?? UInt64(ttl) * 1_000
        }
        name.nextAt = now + max(wait, 1_000) * 1_000_000
    }

    /// No usable answer: the servers stay as they are.
    private func fail(_ name: inout Name, _ text: String, code: Int, now: UInt64) {
        closeQueries(&name)
        log(problem: "\(name.resolution.host) could not be resolved (\(code): \(text))", &name)
        name.nextAt = now + UInt64(max(name.resolution.resolver.timeoutMilliseconds, 1_000)) * 1_000_000
    }

    /// A problem is said when it starts or changes, not every time it is seen again.
    private func log(problem: String, _ name: inout Name) {
        guard name.lastProblem != problem else { return }
        name.lastProblem = problem
        log.error("\(problem), in upstream \"\(name.resolution.group.name)\"")
    }

    private func closeQueries(_ name: inout Name) {
        for query in name.queries where query.fd >= 0 { Glibc.close(query.fd) }
        name.queries = []
    }

    /// nginx's texts for DNS response codes.
    static func rcodeText(_ code: UInt8) -> String {
        switch code {
        case 1: "Format error"
        case 2: "Server failure"
        case 4: "Unimplemented"
        case 5: "Operation refused"
        default: "Unknown error"
        }
    }
}
