/// What a reload carries over from the running rules (docs/decisions/0014-hot-reload.md):
/// the compiler asks for the running zone or upstream group of the same name, and takes it —
/// counts, buckets, round-robin position, failure counts and health included — when its
/// definition is unchanged. A changed definition gets a fresh object, as nginx makes a new
/// zone when a zone's size changes. (nginx refuses a reload that gives a zone a new key; here
/// the zone starts empty instead.)
public struct CarriedState: Sendable {
    private var connZones: [String: LimitConnZone] = [:]
    private var rateZones: [String: LimitRateZone] = [:]
    /// Named `upstream` blocks by lowercased name, and the groups `proxy_pass ADDRESS` makes by
    /// their text (each handed out once: two servers that proxy to one address keep one each).
    private var groups: [String: [UpstreamGroup]] = [:]

    /// Nothing to carry (a start).
    public init() {}

    /// The state of the running `snapshot`.
    public init(from snapshot: PolicySnapshot) {
        for server in snapshot.servers {
            for rule in server.limits.conn { connZones[rule.zone.name] = rule.zone }
            for rule in server.limits.rate { rateZones[rule.zone.name] = rule.zone }
            if let group = server.upstream, snapshot.upstreams[group.name.lowercased()] !== group {
                groups[group.name.lowercased(), default: []].append(group)
            }
        }
        for (name, group) in snapshot.upstreams { groups[name, default: []].append(group) }
    }

    /// The running zone if `fresh` defines the same one (key, size), else `fresh`.
    func carry(_ fresh: LimitConnZone) -> LimitConnZone {
        guard let running = connZones[fresh.name], running.key == fresh.key, running.size == fresh.size else { return fresh }
        return running
    }

    /// The running zone if `fresh` defines the same one (key, size, rate, burst), else `fresh`.
    func carry(_ fresh: LimitRateZone) -> LimitRateZone {
        guard let running = rateZones[fresh.name], running.key == fresh.key, running.size == fresh.size,
              running.kind == fresh.kind, running.rate == fresh.rate, running.burst == fresh.burst else { return fresh }
        return running
    }

    /// The running group if `fresh` has the same definition (and was not handed out yet).
    mutating func carry(_ fresh: UpstreamGroup) -> UpstreamGroup {
        let name = fresh.name.lowercased()
        guard let index = groups[name]?.firstIndex(where: { $0.hasSameDefinition(as: fresh) }) else { return fresh }
        return groups[name]!.remove(at: index)
    }

    /// How many objects could be carried (tests, the reload's log line).
    public var count: Int { connZones.count + rateZones.count + groups.values.reduce(0) { $0 + $1.count } }
}
