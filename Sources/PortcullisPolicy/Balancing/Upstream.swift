public import PortcullisCore
import Synchronization

/// One `server` line of an `upstream` block (or the single address of `proxy_pass HOST:PORT`).
public struct UpstreamServer: Sendable, Equatable {
    public var endpoint: SocketEndpoint
    /// The `server` line's address as written: what `hash … consistent` hashes, so several
    /// addresses of one name share their points, as in nginx.
    public var name: String
    public var weight: Int = 1
    /// At most this many sessions at once (0: no limit).
    public var maxConns: Int = 0
    public var maxFails: Int = 1
    public var failTimeoutMilliseconds: Int = 10_000
    public var backup = false
    public var down = false
    /// `server NAME resolve`: which such line this address came from (its index among the
    /// group's templates); nil for a server written with its address.
    public var resolvedFrom: Int?
    /// An address its name no longer resolves to: kept (sessions may still hold its index)
    /// but never picked; it comes back if the name resolves to it again.
    public var removed = false

    public init(endpoint: SocketEndpoint, name: String) {
        self.endpoint = endpoint
        self.name = name
    }
}

/// How an `upstream` block picks a server (nginx's `ngx_stream_upstream_*_module`s).
public enum BalancingMethod: Sendable, Equatable {
    /// The default: nginx's smooth weighted round-robin.
    case roundRobin
    /// `least_conn`: the fewest sessions for its weight; ties go round-robin.
    case leastConn
    /// `hash KEY`: crc32 of the key as Cache::Memcached does, rehashed on a miss.
    case hash(LogTemplate)
    /// `hash KEY consistent`: ketama points, 160 per unit of weight, as Cache::Memcached::Fast.
    case consistentHash(LogTemplate)
    /// `random [two [least_conn]]`: a weighted random server, or the less loaded of two.
    case random(two: Bool)

    /// The key a hash method hashes, if any.
    public var key: LogTemplate? {
        switch self {
        case .hash(let key), .consistentHash(let key): key
        default: nil
        }
    }
}

/// A group of upstream servers and its balancer state: the method's pick, `max_conns`,
/// `max_fails` within `fail_timeout`, `backup` servers used only when every primary is
/// unavailable (round-robin and least_conn), `down` servers never used. State is shared by
/// every event loop behind a mutex (as nginx's `zone` makes it shared by every worker): a pick
/// is a few dozen instructions, far below the cost of the connect it precedes.
public final class UpstreamGroup: Sendable {
    public let name: String
    public let location: SourceLocation?
    public let method: BalancingMethod
    /// `server NAME resolve` lines: what the resolver turns into servers (`resolvedFrom`).
    public let resolvable: [UpstreamServer]
    /// The servers as the block lists them (before `resolve` adds any): with `method` and
    /// `resolvable`, the definition a reload compares to decide whether this group's state
    /// carries over (docs/decisions/0014-hot-reload.md).
    public let configured: [UpstreamServer]

    private struct PeerState {
        var currentWeight = 0
        var fails = 0
        var checkedAt: Int64 = 0  // ms, when the last failure was counted
        /// Sessions that picked this server and have not ended (or failed to connect) yet.
        var conns = 0
        /// Active health checks that hold this server out of rotation now (`health_check`:
        /// one failing check is enough, as nginx Plus).
        var unhealthyVotes = 0
    }

    /// The servers and the per-server state, under one lock: `resolve` can change the
    /// servers while sessions pick. Indices are stable: a server that leaves stays as
    /// `removed`, so an index a session holds always means the same address.
    private struct State {
        var balancer: Balancer
        var peers: [PeerState]
    }

    private let state: Mutex<State>

    public init(name: String, servers: [UpstreamServer], location: SourceLocation?, method: BalancingMethod = .roundRobin,
                resolvable: [UpstreamServer] = []) {
        self.name = name
        self.location = location
        self.method = method
        self.resolvable = resolvable
        configured = servers
        state = Mutex(State(balancer: Balancer(servers: servers, method: method),
                            peers: Array(repeating: PeerState(), count: servers.count)))
    }

    /// Whether `other` is the same block as far as its state goes: same name (in any case, as
    /// nginx compares upstream names), servers, method and `resolve` lines (where it was
    /// written does not matter).
    public func hasSameDefinition(as other: UpstreamGroup) -> Bool {
        name.lowercased() == other.name.lowercased() && configured == other.configured && method == other.method && resolvable == other.resolvable
    }

    /// Every server, in order (addresses that left through `resolve` too, `removed`).
    public var servers: [UpstreamServer] { state.withLock { $0.balancer.servers } }

    public func server(_ index: Int) -> UpstreamServer { state.withLock { $0.balancer.servers[index] } }

    /// `server NAME resolve`: the addresses template `template`'s name resolves to now. New
    /// ones join (or come back), ones no longer there leave (sessions on them go on); state of
    /// the ones that stay is kept. Returns the addresses that joined and left, for the log.
    @discardableResult
    public func updateResolved(_ template: Int, to addresses: [SocketEndpoint]) -> (added: [SocketEndpoint], removed: [SocketEndpoint]) {
        state.withLock { s in
            var servers = s.balancer.servers
            var added: [SocketEndpoint] = [], removed: [SocketEndpoint] = []
            let wanted = Set(addresses)
            for i in servers.indices where servers[i].resolvedFrom == template {
                let keep = wanted.contains(servers[i].endpoint)
                if servers[i].removed == keep {
                    servers[i].removed = !keep
                    if keep { added.append(servers[i].endpoint) } else { removed.append(servers[i].endpoint) }
                }
            }
            for address in addresses where !servers.contains(where: { $0.resolvedFrom == template && $0.endpoint == address }) {
                var server = resolvable[template]
                server.endpoint = address
                server.resolvedFrom = template
                servers.append(server)
                s.peers.append(PeerState())
                added.append(address)
            }
            if !added.isEmpty || !removed.isEmpty { s.balancer = Balancer(servers: servers, method: method) }
            return (added, removed)
        }
    }

    /// What one session's picks remember from one attempt to the next (nginx's per-request
    /// hash data): the key, the hash so far, and how often it was rehashed.
    public struct PickState: Sendable {
        var key: [UInt8]
        var hash: UInt32 = 0
        var rehash = 0
        var tries = 0
        var started = false

        public init(key: [UInt8] = []) { self.key = key }
    }

    /// Picks the next server to try with round-robin, skipping those already tried by this
    /// session. `now` is a monotonic time in milliseconds.
    public func pick(excluding tried: [Int], now: Int64) -> Int? {
        var pickState = PickState()
        return pick(&pickState, excluding: tried, now: now)
    }

    /// Picks the next server to try by the group's method; the pick counts as one of that
    /// server's sessions until `release`.
    public func pick(_ session: inout PickState, excluding tried: [Int], now: Int64) -> Int? {
        pickServer(&session, excluding: tried, now: now)?.index
    }

    /// The same, with the picked server's address read under the same lock: a session needs
    /// it for every attempt, and `resolve` may change the servers meanwhile.
    public func pickServer(_ session: inout PickState, excluding tried: [Int], now: Int64) -> (index: Int, endpoint: SocketEndpoint)? {
        state.withLock { s in
            let b = s.balancer
            let picked: Int?
            switch method {
            case .roundRobin:
                picked = b.roundRobin(&s.peers, excluding: tried, now: now)
            case .leastConn:
                picked = b.leastConn(&s.peers, among: b.primaries, excluding: tried, now: now)
                    ?? b.leastConn(&s.peers, among: b.backups, excluding: tried, now: now)
            case .hash:
                picked = b.hash(&s.peers, &session, excluding: tried, now: now)
            case .consistentHash:
                picked = b.consistentHash(&s.peers, &session, excluding: tried, now: now)
            case .random(let two):
                picked = b.random(&s.peers, &session, two: two, excluding: tried, now: now)
            }
            guard let picked else { return nil }
            s.peers[picked].conns += 1
            return (picked, b.servers[picked].endpoint)
        }
    }

    /// The session that picked `index` is done with it (its connect failed, or it ended).
    public func release(_ index: Int) {
        state.withLock { s in s.peers[index].conns = max(s.peers[index].conns - 1, 0) }
    }

    /// Sessions that picked `index` and have not released it (tests, and later metrics).
    public func sessions(on index: Int) -> Int { state.withLock { $0.peers[index].conns } }

    /// Reports how a connect attempt to `index` ended, for `max_fails`/`fail_timeout`.
    public func report(_ index: Int, succeeded: Bool, now: Int64) {
        state.withLock { s in
            if succeeded {
                // nginx forgets failures once fail_timeout has passed since the last one.
                if now - s.peers[index].checkedAt > Int64(s.balancer.servers[index].failTimeoutMilliseconds) {
                    s.peers[index].fails = 0
                }
            } else {
                s.peers[index].fails += 1
                s.peers[index].checkedAt = now
            }
        }
    }

    /// A `health_check` found server `index` unhealthy (`false`) or healthy again (`true`).
    /// Each check reports only its own transitions, so the votes stay balanced.
    public func setHealth(_ index: Int, healthy: Bool) {
        state.withLock { s in s.peers[index].unhealthyVotes = max(s.peers[index].unhealthyVotes + (healthy ? -1 : 1), 0) }
    }

    /// Whether no health check holds server `index` out (tests, `explain`, metrics).
    public func isHealthy(_ index: Int) -> Bool { state.withLock { $0.peers[index].unhealthyVotes == 0 } }

    /// The servers as the balancing methods see them, rebuilt when `resolve` changes them.
    private struct Balancer: Sendable {
        let servers: [UpstreamServer]
        let method: BalancingMethod
        /// Indices of the primary (non-backup) servers and of the backups, in the file's
        /// order (without `removed` ones).
        let primaries: [Int]
        let backups: [Int]
        /// Sum of the primaries' weights (down ones too, as nginx's `total_weight`).
        let totalWeight: Int
        /// `hash … consistent`: the ring, sorted by hash, one entry per distinct hash.
        let points: [(hash: UInt32, name: String)]
        /// `random`: where each primary's share of `totalWeight` starts.
        let ranges: [Int]
        /// Servers not `removed` by `resolve`: nginx's "a group's only server" counts these.
        let liveCount: Int

        init(servers: [UpstreamServer], method: BalancingMethod) {
            self.servers = servers
            self.method = method
            liveCount = servers.count { !$0.removed }
            primaries = servers.indices.filter { !servers[$0].backup && !servers[$0].removed }
            backups = servers.indices.filter { servers[$0].backup && !servers[$0].removed }
            let primaries = self.primaries
            totalWeight = primaries.reduce(0) { $0 + servers[$1].weight }
            var start = 0
            ranges = primaries.map { index in
                defer { start += servers[index].weight }
                return start
            }
            points = if case .consistentHash = method { UpstreamGroup.ring(primaries.map { servers[$0] }) } else { [] }
        }

        // MARK: Methods

        /// Whether `index` may take a session now: not tried by it, not down, not failed (a
        /// group's only server is never failed, as in nginx), not unhealthy (`health_check`: a
        /// group's only server too), not at `max_conns`.
        func available(_ index: Int, _ peers: [PeerState], excluding tried: [Int], now: Int64) -> Bool {
            let server = servers[index]
            if server.down || server.removed || tried.contains(index) || peers[index].unhealthyVotes > 0 { return false }
            if server.maxConns > 0 && peers[index].conns >= server.maxConns { return false }
            if liveCount > 1, server.maxFails > 0, peers[index].fails >= server.maxFails,
               now - peers[index].checkedAt <= Int64(server.failTimeoutMilliseconds) {
                return false
            }
            return true
        }

        func roundRobin(_ peers: inout [PeerState], excluding tried: [Int], now: Int64) -> Int? {
            smoothWeighted(&peers, among: primaries, excluding: tried, now: now)
                ?? smoothWeighted(&peers, among: backups, excluding: tried, now: now)
        }

        /// nginx's smooth weighted round-robin over `candidates`.
        func smoothWeighted(_ peers: inout [PeerState], among candidates: [Int], excluding tried: [Int], now: Int64,
                                    where extra: (Int) -> Bool = { _ in true }) -> Int? {
            var total = 0
            var best: Int?
            for index in candidates where available(index, peers, excluding: tried, now: now) && extra(index) {
                peers[index].currentWeight += servers[index].weight
                total += servers[index].weight
                if best.map({ peers[index].currentWeight > peers[$0].currentWeight }) ?? true { best = index }
            }
            if let best { peers[best].currentWeight -= total }
            return best
        }

        /// `least_conn`: the fewest sessions per unit of weight; among equals, round-robin from
        /// the first of them on (nginx's second pass).
        func leastConn(_ peers: inout [PeerState], among candidates: [Int], excluding tried: [Int], now: Int64) -> Int? {
            var best: Int?
            var many = false
            var bestPosition = 0
            for (position, index) in candidates.enumerated() where available(index, peers, excluding: tried, now: now) {
                guard let current = best else {
                    (best, bestPosition) = (index, position)
                    continue
                }
                let mine = peers[index].conns * servers[current].weight
                let theirs = peers[current].conns * servers[index].weight
                if mine < theirs {
                    (best, bestPosition, many) = (index, position, false)
                } else if mine == theirs {
                    many = true
                }
            }
            guard let first = best else { return nil }
            guard many else { return first }
            let tied = candidates[bestPosition...].filter { index in
                peers[index].conns * servers[first].weight == peers[first].conns * servers[index].weight
            }
            return smoothWeighted(&peers, among: tied, excluding: tried, now: now)
        }

        /// `hash KEY`: ((crc32([REHASH] KEY) >> 16) & 0x7fff) added to the hash so far, modulo the
        /// primaries' total weight; a server that cannot take the session means a rehash, and after
        /// 20 of them (or with one primary, or an empty key) round-robin decides.
        func hash(_ peers: inout [PeerState], _ session: inout PickState, excluding tried: [Int], now: Int64) -> Int? {
            guard session.tries <= 20, primaries.count > 1, !session.key.isEmpty, totalWeight > 0 else {
                return roundRobin(&peers, excluding: tried, now: now)
            }
            while true {
                var crc = CRC32()
                if session.rehash > 0 { crc.update(String(session.rehash).utf8) }
                crc.update(session.key)
                session.hash &+= (crc.value >> 16) & 0x7FFF
                session.rehash += 1
                var w = Int(session.hash % UInt32(totalWeight))
                var position = 0
                while w >= servers[primaries[position]].weight {
                    w -= servers[primaries[position]].weight
                    position += 1
                }
                let index = primaries[position]
                if available(index, peers, excluding: tried, now: now) { return index }
                session.tries += 1
                if session.tries > 20 { return roundRobin(&peers, excluding: tried, now: now) }
            }
        }

        /// `hash KEY consistent`: the first ring point at or after crc32(KEY); the servers of that
        /// point's name, round-robin among them; if none can take the session, the next point.
        func consistentHash(_ peers: inout [PeerState], _ session: inout PickState, excluding tried: [Int],
                                    now: Int64) -> Int? {
            guard session.tries <= 20, primaries.count > 1, !session.key.isEmpty else {
                return roundRobin(&peers, excluding: tried, now: now)
            }
            guard !points.isEmpty else { return nil }
            if !session.started {
                session.started = true
                session.hash = UInt32(UpstreamGroup.firstPoint(atOrAfter: CRC32.checksum(session.key), in: points))
            }
            while true {
                let name = points[Int(session.hash % UInt32(points.count))].name
                if let best = smoothWeighted(&peers, among: primaries, excluding: tried, now: now,
                                             where: { servers[$0].name == name }) {
                    return best
                }
                session.hash &+= 1
                session.tries += 1
                if session.tries > 20 { return roundRobin(&peers, excluding: tried, now: now) }
            }
        }

        /// `random`: a primary drawn with its weight's share; `random two`: two distinct draws, the
        /// one with fewer sessions per unit of weight (the first on a tie). After 20 draws that
        /// could not be used, round-robin decides.
        func random(_ peers: inout [PeerState], _ session: inout PickState, two: Bool, excluding tried: [Int],
                            now: Int64) -> Int? {
            guard session.tries <= 20, primaries.count > 1, totalWeight > 0 else {
                return roundRobin(&peers, excluding: tried, now: now)
            }
            var first: Int?
            while true {
                let x = Int.random(in: 0..<totalWeight)
                var low = 0, high = ranges.count
                while high - low > 1 {
                    let middle = (low + high) / 2
                    if x < ranges[middle] { high = middle } else { low = middle }
                }
                let index = primaries[low]
                if index != first, available(index, peers, excluding: tried, now: now) {
                    guard two else { return index }
                    if let chosen = first {
                        let heavier = peers[index].conns * servers[chosen].weight > peers[chosen].conns * servers[index].weight
                        return heavier ? chosen : index
                    }
                    first = index
                }
                session.tries += 1
                if session.tries > 20 { return roundRobin(&peers, excluding: tried, now: now) }
            }
        }
    }

    // MARK: The consistent-hash ring

    /// crc32(HOST "\0" PORT PREV_HASH) for `weight × 160` points per server, sorted, equal
    /// hashes kept once (the first in sort order wins, as nginx's qsort run leaves it).
    static func ring(_ servers: [UpstreamServer]) -> [(hash: UInt32, name: String)] {
        var points: [(hash: UInt32, name: String)] = []
        for server in servers {
            let (host, port) = hostAndPort(server.name)
            var base = CRC32()
            base.update(host.utf8)
            base.update([0])
            base.update(port.utf8)
            var previous: UInt32 = 0
            for _ in 0..<server.weight * 160 {
                var crc = base
                crc.update([UInt8(truncatingIfNeeded: previous), UInt8(truncatingIfNeeded: previous >> 8),
                            UInt8(truncatingIfNeeded: previous >> 16), UInt8(truncatingIfNeeded: previous >> 24)])
                let hash = crc.value
                points.append((hash, server.name))
                previous = hash
            }
        }
        // nginx's qsort is not stable; for equal hashes the survivor is whichever sorts first.
        // Equal 32-bit hashes between different servers are rare enough not to matter.
        points.sort { $0.hash < $1.hash }
        var unique: [(hash: UInt32, name: String)] = []
        for point in points where unique.last?.hash != point.hash { unique.append(point) }
        return unique
    }

    /// A server name split as nginx splits it for the ring: the digits after the last colon
    /// are the port; `unix:PATH` has no port.
    static func hostAndPort(_ name: String) -> (host: String, port: String) {
        if name.lowercased().hasPrefix("unix:") { return (String(name.dropFirst(5)), "") }
        let digits = name.reversed().prefix { $0.isASCII && $0.isNumber }
        let rest = name.dropLast(digits.count)
        guard rest.last == ":" else { return (name, "") }
        return (String(rest.dropLast()), String(digits.reversed()))
    }

    /// The index of the first point whose hash is at or after `hash` (the count when none is:
    /// the caller wraps it).
    static func firstPoint(atOrAfter hash: UInt32, in points: [(hash: UInt32, name: String)]) -> Int {
        var low = 0, high = points.count
        while low < high {
            let middle = (low + high) / 2
            if hash > points[middle].hash { low = middle + 1 } else if hash < points[middle].hash { high = middle } else { return middle }
        }
        return low
    }
}

extension ServerPolicy {
    /// The upstream for one session: the fixed `proxy_pass`, or what `proxy_pass $var` names
    /// (an upstream block's name, else `ADDRESS:PORT`, as nginx). nil with the rendered text
    /// when it names neither; a host name would need a resolver, which Portcullis does not have.
    public func upstream(for record: SessionRecord) -> (group: UpstreamGroup?, text: String) {
        if let upstream { return (upstream, upstream.name) }
        guard let upstreamTemplate else { return (nil, "") }
        let text = String(decoding: upstreamTemplate.bytes(for: record), as: UTF8.self)
        if let group = upstreams[text.lowercased()] { return (group, text) }  // names ignore case, as nginx
        guard let endpoint = SocketEndpoint(text) else { return (nil, text) }
        return (UpstreamGroup(name: text, servers: [UpstreamServer(endpoint: endpoint, name: text)], location: nil), text)
    }
}
