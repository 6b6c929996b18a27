public import PortcullisCore
import Synchronization

/// One `server` line of an `upstream` block (or the single address of `proxy_pass HOST:PORT`).
public struct UpstreamServer: Sendable, Equatable {
    public var endpoint: SocketEndpoint
    public var name: String
    public var weight: Int = 1
    public var maxFails: Int = 1
    public var failTimeoutMilliseconds: Int = 10_000
    public var backup = false
    public var down = false

    public init(endpoint: SocketEndpoint, name: String) {
        self.endpoint = endpoint
        self.name = name
    }
}

/// A group of upstream servers and its balancer state: nginx's smooth weighted round-robin,
/// `max_fails` within `fail_timeout`, `backup` servers used only when every primary is
/// unavailable, `down` servers never used. State is shared by every event loop behind a mutex:
/// a pick is a few dozen instructions, far below the cost of the connect it precedes.
public final class UpstreamGroup: Sendable {
    public let name: String
    public let servers: [UpstreamServer]
    public let location: SourceLocation?

    private struct PeerState {
        var currentWeight = 0
        var fails = 0
        var checkedAt: Int64 = 0  // ms, when the last failure was counted
    }

    private let state: Mutex<[PeerState]>

    public init(name: String, servers: [UpstreamServer], location: SourceLocation?) {
        self.name = name
        self.servers = servers
        self.location = location
        self.state = Mutex(Array(repeating: PeerState(), count: servers.count))
    }

    /// Picks the next server to try, skipping those already tried by this session.
    /// `now` is a monotonic time in milliseconds.
    public func pick(excluding tried: [Int], now: Int64) -> Int? {
        state.withLock { peers in
            if let primary = pick(in: &peers, backup: false, excluding: tried, now: now) { return primary }
            return pick(in: &peers, backup: true, excluding: tried, now: now)
        }
    }

    private func pick(in peers: inout [PeerState], backup: Bool, excluding tried: [Int], now: Int64) -> Int? {
        var total = 0
        var best: Int?
        let single = servers.count == 1
        for index in servers.indices where servers[index].backup == backup && !servers[index].down {
            if tried.contains(index) { continue }
            let server = servers[index]
            if !single, server.maxFails > 0, peers[index].fails >= server.maxFails,
               now - peers[index].checkedAt <= Int64(server.failTimeoutMilliseconds) {
                continue
            }
            peers[index].currentWeight += server.weight
            total += server.weight
            if best.map({ peers[index].currentWeight > peers[$0].currentWeight }) ?? true { best = index }
        }
        if let best { peers[best].currentWeight -= total }
        return best
    }

    /// Reports how a connect attempt to `index` ended, for `max_fails`/`fail_timeout`.
    public func report(_ index: Int, succeeded: Bool, now: Int64) {
        state.withLock { peers in
            if succeeded {
                // nginx forgets failures once fail_timeout has passed since the last one.
                if now - peers[index].checkedAt > Int64(servers[index].failTimeoutMilliseconds) {
                    peers[index].fails = 0
                }
            } else {
                peers[index].fails += 1
                peers[index].checkedAt = now
            }
        }
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
