import CPortcullisLinux
import Foundation
import Glibc
public import Logging
import PortcullisCore
public import PortcullisPolicy
import PortcullisWire
import Synchronization

/// The process's DNS lookups, on one thread of its own with one `poll(2)`, like the health
/// checks. Two kinds:
/// - every `server NAME resolve` line's servers follow what its name resolves to (nginx
///   1.27.3's `resolve`): the name is looked up again and again (below);
/// - `proxy_pass $var` whose value is a host name: one lookup, its answer cached for `valid=`
///   or its TTL (`lookup(_:port:with:completion:)`), as nginx's resolver does.
///
/// For each lookup: an A and an AAAA query (as `ipv4=`/`ipv6=` allow) to the next name
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
    private let thread = PollThread()
    private static let resendNanoseconds: UInt64 = 5_000_000_000

    private struct Query {
        let type: DNSMessage.RecordType
        var id: UInt16
        var fd: Int32 = -1
        var sentAt: UInt64 = 0
        var answer: DNSMessage.Answer?
    }

    /// What one lookup is for.
    private enum Purpose {
        /// A `server NAME resolve` line, looked up again and again.
        case watch(Resolution)
        /// `proxy_pass $var`: whoever asked, told once.
        case once([@Sendable (HostLookupResult) -> Void])
    }

    private struct Name {
        var purpose: Purpose
        let host: String
        let resolver: ResolverSpec
        var nextAt: UInt64
        var queries: [Query] = []
        var startedAt: UInt64 = 0
        var server = 0
        var lastProblem: String?

        var key: String { Self.key(host, resolver) }
        static func key(_ host: String, _ resolver: ResolverSpec) -> String {
            host.lowercased() + " " + resolver.servers.map(\.description).joined(separator: ",")
                + (resolver.ipv4 ? " 4" : "") + (resolver.ipv6 ? " 6" : "")
        }
    }

    /// One-time lookups asked for and not yet taken by the thread; answers kept for their TTL.
    private struct Shared {
        var requests: [(host: String, resolver: ResolverSpec, completion: @Sendable (HostLookupResult) -> Void)] = []
        var cache: [String: (addresses: [IPAddress], expires: UInt64)] = [:]
    }

    private let shared = Mutex(Shared())
    /// At most this many cached answers: host names can come from clients (`proxy_pass
    /// $ssl_preread_server_name`), so the cache must not grow without bound.
    static let cacheLimit = 10_000
    /// At most this many one-time lookups in flight (each holds two sockets for up to
    /// `resolver_timeout`); beyond it a lookup fails at once, as a full table refuses.
    static let inFlightLimit = 256

    public init(resolutions: [Resolution], errorLog: Logger) {
        self.resolutions = resolutions
        log = errorLog
    }

    /// Looks `host` up with `resolver` (a cached answer at once, on the caller's thread; else
    /// later, on the resolver's thread). Identical lookups in flight share one.
    public func lookup(_ host: String, with resolver: ResolverSpec, completion: @escaping @Sendable (HostLookupResult) -> Void) {
        let key = Name.key(host, resolver)
        let now = Clock.monotonic()
        let cached = shared.withLock { s -> HostLookupResult? in
            if let entry = s.cache[key], entry.expires > now {
                // An empty entry is a name that did not exist (NXDOMAIN), kept as long too.
                return entry.addresses.isEmpty ? .failure(code: 3, text: "Host not found") : .addresses(entry.addresses)
            }
            s.requests.append((host, resolver, completion))
            return nil
        }
        if let cached { return completion(cached) }
        guard !thread.isStopped else { return completion(.failure(code: 110, text: "Operation timed out")) }
        thread.wake()
    }

    /// Starts resolving (every watched name at once: until its first answer it has no servers).
    public func start() {
        let now = Clock.monotonic()
        let names = resolutions.map { Name(purpose: .watch($0), host: $0.host, resolver: $0.resolver, nextAt: now) }
        thread.start(name: "resolver") { [self] in
            var names = names
            run(&names)
            for name in names { for query in name.queries where query.fd >= 0 { Glibc.close(query.fd) } }
            // Sessions waiting for an answer must not wait for ever (a graceful stop waits
            // for them): each hears that no answer came.
            let stopping = HostLookupResult.failure(code: 110, text: "Operation timed out")
            for name in names { if case .once(let waiting) = name.purpose { waiting.forEach { $0(stopping) } } }
            shared.withLock { s in
                defer { s.requests = [] }
                return s.requests
            }.forEach { $0.completion(stopping) }
        }
    }

    public func stop() { thread.stop() }

    /// Milliseconds as nanoseconds, saturating (a `valid=1000y` must not trap the thread).
    static func nanoseconds(_ milliseconds: UInt64) -> UInt64 { min(milliseconds, 1 << 40) * 1_000_000 }

    private func run(_ names: inout [Name]) {
        while !thread.isStopped {
            var now = Clock.monotonic()
            // One-time lookups that are over leave (before new ones could join them).
            names.removeAll { name in
                if case .once(let waiting) = name.purpose { return waiting.isEmpty && name.queries.isEmpty }
                return false
            }
            takeRequests(&names, now: now)
            for i in names.indices where names[i].queries.isEmpty && now >= names[i].nextAt { begin(&names[i], now: now) }
            var wakeAt = now + 1_000_000_000
            var fds = [pollfd(fd: thread.wakeup, events: Int16(POLLIN), revents: 0)]
            var owners: [(name: Int, query: Int)] = []
            for (i, name) in names.enumerated() {
                guard !name.queries.isEmpty else {
                    wakeAt = min(wakeAt, name.nextAt)
                    continue
                }
                wakeAt = min(wakeAt, name.startedAt + Self.nanoseconds(UInt64(name.resolver.timeoutMilliseconds)))
                for (q, query) in name.queries.enumerated() where query.answer == nil && query.fd >= 0 {
                    wakeAt = min(wakeAt, query.sentAt + Self.resendNanoseconds)
                    fds.append(pollfd(fd: query.fd, events: Int16(POLLIN), revents: 0))
                    owners.append((i, q))
                }
            }
            let timeout = wakeAt > now ? Int32(min((wakeAt - now) / 1_000_000 + 1, 1_000)) : 0
            _ = poll(&fds, nfds_t(fds.count), timeout)
            if thread.isStopped { return }
            if fds[0].revents != 0 { thread.clearWakeups() }
            now = Clock.monotonic()
            for (slot, owner) in owners.enumerated() where fds[slot + 1].revents != 0 {
                receive(&names[owner.name], query: owner.query)
            }
            for i in names.indices where !names[i].queries.isEmpty {
                let resolver = names[i].resolver
                if names[i].queries.allSatisfy({ $0.answer != nil }) {
                    finish(&names[i], now: now)
                } else if now >= names[i].startedAt + Self.nanoseconds(UInt64(resolver.timeoutMilliseconds)) {
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

    /// New one-time lookups join the loop (or the same lookup already in flight).
    private func takeRequests(_ names: inout [Name], now: UInt64) {
        let requests = shared.withLock { s in
            defer { s.requests = [] }
            return s.requests
        }
        for request in requests {
            let key = Name.key(request.host, request.resolver)
            if let i = names.firstIndex(where: { if case .once = $0.purpose { return $0.key == key } else { return false } }),
               case .once(let waiting) = names[i].purpose {
                names[i].purpose = .once(waiting + [request.completion])
                continue
            }
            guard DNSMessage.query(id: 0, name: request.host, type: .a) != nil else {
                request.completion(.failure(code: 1, text: "Format error"))  // not a name DNS can carry
                continue
            }
            let inFlight = names.count { if case .once = $0.purpose { return true } else { return false } }
            guard inFlight < Self.inFlightLimit else {
                request.completion(.failure(code: 2, text: "Server failure"))  // too many lookups at once
                continue
            }
            names.append(Name(purpose: .once([request.completion]), host: request.host, resolver: request.resolver, nextAt: now))
        }
    }

    private func begin(_ name: inout Name, now: UInt64) {
        let resolver = name.resolver
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
        let servers = name.resolver.servers
        let server = servers[name.server % servers.count]
        name.queries[q].id = UInt16.random(in: 0...UInt16.max)
        name.queries[q].sentAt = now
        let fd = socket(server.family, Int32(SOCK_DGRAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        name.queries[q].fd = fd
        guard fd >= 0, server.withSockAddr({ connect(fd, $0, $1) }) == 0,
              let message = DNSMessage.query(id: name.queries[q].id, name: name.host, type: name.queries[q].type) else { return }
        _ = message.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, 0) }
    }

    private func receive(_ name: inout Name, query q: Int) {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(name.queries[q].fd, $0.baseAddress, $0.count, 0) }
            guard n >= 0 else { return }  // EAGAIN; ICMP from a dead name server: the resend moves on
            do {
                name.queries[q].answer = try DNSMessage.answer(Array(buffer.prefix(n)), id: name.queries[q].id,
                                                               name: name.host, type: name.queries[q].type)
                return
            } catch {
                continue  // not ours, or malformed: wait for the real answer
            }
        }
    }

    private func finish(_ name: inout Name, now: UInt64) {
        let answers = name.queries.compactMap(\.answer)
        closeQueries(&name)
        var addresses: [IPAddress] = []
        var ttl = UInt32.max
        var nameError = true
        var failure: (code: Int, text: String)?
        for answer in answers {
            switch answer {
            case .addresses(let found, let seconds):
                nameError = false
                addresses += found
                if !found.isEmpty { ttl = min(ttl, seconds) }
            case .nameError:
                continue
            case .failure(let code):
                failure = (Int(code), Self.rcodeText(code))
            case .truncated:
                failure = (0, "Truncated answer (over UDP)")
            }
        }
        // One family's failure does not throw away the other family's addresses.
        if let failure, addresses.isEmpty { return fail(&name, failure.text, code: failure.code, now: now) }
        let valid = name.resolver.validMilliseconds.map { UInt64($0) }
        guard case .watch(let resolution) = name.purpose else {
            // No addresses (NXDOMAIN, or none of the types asked) is kept too, for `valid=` or
            // 10 s, so a client naming hosts that do not exist costs no query each time.
            let seconds = addresses.isEmpty ? nil : UInt64(ttl)
            let lifetime = Self.nanoseconds(max(valid ?? seconds.map { $0 * 1_000 } ?? 10_000, 1_000))
            let key = name.key
            shared.withLock { s in
                if s.cache.count >= Self.cacheLimit { s.cache = s.cache.filter { $0.value.expires > now } }
                if s.cache.count >= Self.cacheLimit { s.cache.removeAll(keepingCapacity: true) }
                s.cache[key] = (addresses, now + lifetime)
            }
            return complete(&name, addresses.isEmpty ? .failure(code: 3, text: "Host not found") : .addresses(addresses))
        }
        if nameError {
            // NXDOMAIN: no servers for this name now (nginx removes them too).
            log(problem: "\(resolution.host) could not be resolved (3: Host not found)", &name)
        } else {
            name.lastProblem = nil
        }
        let endpoints = addresses.map { SocketEndpoint(address: $0, port: resolution.port) }
        let change = resolution.group.updateResolved(resolution.template, to: endpoints)
        for endpoint in change.added {
            log.notice("upstream \"\(resolution.group.name)\": \(endpoint) added, \"\(resolution.host)\" resolves to it")
        }
        for endpoint in change.removed {
            log.notice("upstream \"\(resolution.group.name)\": \(endpoint) removed, \"\(resolution.host)\" no longer resolves to it")
        }
        let wait: UInt64
        if nameError || addresses.isEmpty {
            wait = valid ?? 10_000
        } else {
            wait = valid ?? UInt64(ttl) * 1_000
        }
        name.nextAt = now + Self.nanoseconds(max(wait, 1_000))
    }

    /// A one-time lookup is over: everyone waiting for it is told, and it leaves the loop
    /// (`nextAt` never comes: `sweep` removes it).
    private func complete(_ name: inout Name, _ result: HostLookupResult) {
        guard case .once(let waiting) = name.purpose else { return }
        for completion in waiting { completion(result) }
        name.purpose = .once([])
        name.nextAt = .max
    }

    /// No usable answer: the servers stay as they are.
    private func fail(_ name: inout Name, _ text: String, code: Int, now: UInt64) {
        closeQueries(&name)
        guard case .watch = name.purpose else { return complete(&name, .failure(code: code, text: text)) }
        log(problem: "\(name.host) could not be resolved (\(code): \(text))", &name)
        name.nextAt = now + Self.nanoseconds(UInt64(max(name.resolver.timeoutMilliseconds, 1_000)))
    }

    /// A problem is said when it starts or changes, not every time it is seen again.
    private func log(problem: String, _ name: inout Name) {
        guard name.lastProblem != problem, case .watch(let resolution) = name.purpose else { return }
        name.lastProblem = problem
        log.error("\(problem), in upstream \"\(resolution.group.name)\"")
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

extension ServerRuntime {
    /// `proxy_pass $var`'s lookup of `host` for a session on `loop`: `then` runs on that loop
    /// (a cached answer too, on its next turn, so the session is never re-entered).
    func lookUp(_ host: String, with resolver: ResolverSpec, on loop: EventLoop,
                then: @escaping (HostLookupResult) -> Void) {
        let box = UncheckedBox(then)  // the session's closure, only ever run on its own loop
        guard let lookups else {
            return loop.execute { box.value(.failure(code: 2, text: "Server failure")) }
        }
        lookups.lookup(host, with: resolver) { result in loop.execute { box.value(result) } }
    }
}
