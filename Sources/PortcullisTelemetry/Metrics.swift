public import CoreMetrics
import PortcullisCore
public import PortcullisPolicy
public import Prometheus
import Synchronization

/// The gateway's Prometheus metrics (docs/metrics.md lists every name and label). Recorded
/// through swift-metrics' types with a swift-prometheus factory of the gateway's own (not the
/// process-wide `MetricsSystem`: tests run several gateways in one process).
///
/// What costs the relay: one lookup under a lock per finished session for its counters (the
/// counters themselves are atomic), nothing per byte — bytes are added when a session ends.
/// Gauges (zone fill, upstream health, live sessions) are read from the running rules when
/// the endpoint is scraped.
///
/// Label values are bounded by the rule file: servers are listen addresses, rules are
/// `file:line`, causes and phases are fixed lists, upstream servers are those of `upstream`
/// blocks (a `proxy_pass $var` that names an address counts under `upstream="$variable"`,
/// without the address, so clients cannot grow the label set).
public final class GatewayMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    private let factory: PrometheusMetricsFactory

    private struct Key: Hashable {
        let name: String
        let labels: [String]
    }

    /// Every counter, gauge and timer made so far (the key's name says which kind it is).
    private let metrics = Mutex<[Key: any AnyObject & Sendable]>([:])
    /// Each rate zone's eviction total at the last scrape.
    private let seenEvictions = Mutex<[ObjectIdentifier: Int]>([:])

    /// Connect times on a LAN are well under a millisecond; a WAN's, tens to hundreds.
    static let connectBuckets: [Duration] = [
        .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2),
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
        .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
    ]

    public init() {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets = ["portcullis_upstream_connect_duration_seconds": Self.connectBuckets]
        self.factory = factory
    }

    // MARK: Recording

    public func counter(_ name: String, _ labels: KeyValuePairs<String, String> = [:]) -> CoreMetrics.Counter {
        cached(name, labels) { CoreMetrics.Counter(label: name, dimensions: $0, factory: factory) }
    }

    public func gauge(_ name: String, _ labels: KeyValuePairs<String, String> = [:]) -> CoreMetrics.Gauge {
        cached(name, labels) { CoreMetrics.Gauge(label: name, dimensions: $0, factory: factory) }
    }

    private func timer(_ name: String, _ labels: KeyValuePairs<String, String>) -> CoreMetrics.Timer {
        cached(name, labels) { CoreMetrics.Timer(label: name, dimensions: $0, factory: factory) }
    }

    /// The metric of this name and labels, made on first use (swift-metrics' initialisers go
    /// through the factory and allocate: once per label set, not once per session).
    private func cached<Metric: AnyObject & Sendable>(_ name: String, _ labels: KeyValuePairs<String, String>,
                                           make: ([(String, String)]) -> Metric) -> Metric {
        let key = Key(name: name, labels: labels.flatMap { [$0.key, $0.value] })
        return metrics.withLock { metrics in
            if let metric = metrics[key] as? Metric { return metric }
            let metric = make(labels.map { ($0.key, $0.value) })
            metrics[key] = metric
            return metric
        }
    }

    /// A finished session: its status, refusal, bytes and upstream attempts. `upstream`: the
    /// name of the server's `upstream` block (or its `proxy_pass ADDRESS`), nil with variables.
    public func recordSession(_ record: SessionRecord, upstream: String?) {
        let server = record.listener
        let proto = record.transport == .tcp ? "tcp" : "udp"
        counter("portcullis_sessions_total", ["server": server, "protocol": proto, "status": String(record.status.rawValue)])
            .increment()
        if record.refused { recordRefusal(record) }
        if record.bytesReceived > 0 {
            counter("portcullis_client_received_bytes_total", ["server": server]).increment(by: Int64(clamping: record.bytesReceived))
        }
        if record.bytesSent > 0 {
            counter("portcullis_client_sent_bytes_total", ["server": server]).increment(by: Int64(clamping: record.bytesSent))
        }
        guard !record.upstreamAttempts.isEmpty else { return }
        let group = upstream ?? "$variable"
        if record.upstreamBytesSent > 0 {
            counter("portcullis_upstream_sent_bytes_total", ["upstream": group]).increment(by: Int64(clamping: record.upstreamBytesSent))
        }
        if record.upstreamBytesReceived > 0 {
            counter("portcullis_upstream_received_bytes_total", ["upstream": group])
                .increment(by: Int64(clamping: record.upstreamBytesReceived))
        }
        for attempt in record.upstreamAttempts {
            let address = upstream == nil ? "" : attempt.address.description
            counter("portcullis_upstream_attempts_total", ["upstream": group, "server": address]).increment()
            if let seconds = attempt.connectTime {
                timer("portcullis_upstream_connect_duration_seconds", ["upstream": group])
                    .recordNanoseconds(Int64(seconds * 1_000_000_000))
            } else {
                counter("portcullis_upstream_failures_total", ["upstream": group, "server": address]).increment()
            }
        }
    }

    /// A refusal, carried out or (`*_dry_run`) only reported.
    public func recordRefusal(_ record: SessionRecord) {
        counter("portcullis_refusals_total", [
            "server": record.listener, "phase": record.phase.rawValue, "cause": record.outcome.cause.name,
            "rule": record.rule?.position ?? "", "enforcement": record.outcome.enforcement.rawValue,
        ]).increment()
    }

    public func auditLinesSuppressed(_ count: Int) {
        counter("portcullis_audit_lines_suppressed_total").increment(by: Int64(count))
    }

    /// UDP datagrams dropped on `listen`: `reason` is `proxy_header` or `session_table_full`.
    public func udpDropped(_ count: Int, listen: String, reason: String) {
        counter("portcullis_udp_dropped_datagrams_total", ["server": listen, "reason": reason]).increment(by: Int64(count))
    }

    public func reloaded(succeeded: Bool, generation: Int) {
        counter("portcullis_reloads_total", ["result": succeeded ? "ok" : "failed"]).increment()
        gauge("portcullis_rules_generation").record(generation)
    }

    // MARK: Scrapes

    /// The metrics in Prometheus' text format, with the gauges read from `snapshot` now.
    public func exposition(snapshot: PolicySnapshot, liveSessions: Int) -> [UInt8] {
        gauge("portcullis_sessions_active").record(liveSessions)
        var connZones: [String: LimitConnZone] = [:], rateZones: [String: LimitRateZone] = [:]
        for server in snapshot.servers {
            for rule in server.limits.conn { connZones[rule.zone.name] = rule.zone }
            for rule in server.limits.rate { rateZones[rule.zone.name] = rule.zone }
        }
        for (name, zone) in connZones {
            gauge("portcullis_limit_zone_keys", ["zone": name, "kind": "limit_conn"]).record(zone.keyCount)
            gauge("portcullis_limit_zone_capacity_keys", ["zone": name, "kind": "limit_conn"]).record(zone.capacity)
        }
        for (name, zone) in rateZones {
            gauge("portcullis_limit_zone_keys", ["zone": name, "kind": "limit_rate"]).record(zone.keyCount)
            gauge("portcullis_limit_zone_capacity_keys", ["zone": name, "kind": "limit_rate"]).record(zone.capacity)
            // The zone keeps the total; the counter is moved on by what was added since the
            // last scrape (a zone a reload made anew starts again from 0).
            let total = zone.evictions
            let added = seenEvictions.withLock { seen -> Int in
                let before = seen[ObjectIdentifier(zone)] ?? 0
                seen[ObjectIdentifier(zone)] = total
                return total - before
            }
            let counter = counter("portcullis_limit_zone_evictions_total", ["zone": name])
            if added > 0 { counter.increment(by: Int64(added)) }
        }
        for (_, group) in snapshot.upstreams {
            for (index, server) in group.servers.enumerated() where !server.removed {
                let healthy = !server.down && group.isHealthy(index)
                gauge("portcullis_upstream_server_up", ["upstream": group.name, "server": server.endpoint.description])
                    .record(healthy ? 1 : 0)
            }
        }
        return registry.emitToBuffer()
    }
}
