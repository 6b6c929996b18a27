// Per-operation cost of the decisions a session's first moments make, on one thread:
// an access-list lookup, a `geo` lookup, a limit check and a PROXY v2 header decode.
//
// Each benchmark iteration does 1,000 operations (`scalingFactor: .kilo`), so the table's
// time, throughput and malloc columns are per operation. The tables, zones and inputs are
// built in each benchmark's `setup`, outside what is measured; every operation's result goes
// to `blackHole` so that none can be optimised away.
//
// mallocCountTotal is a check as much as a measure: none of these operations should allocate,
// so its column should read 0 (the LRU-evicting limit_rate case is the exception: an evicted
// key's slot gets a new bucket).
import Benchmark
import PortcullisCore
import PortcullisPolicy
import PortcullisWire

let perOperation: [BenchmarkMetric] = [.wallClock, .throughput, .mallocCountTotal]

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: perOperation,
        timeUnits: .nanoseconds,
        warmupIterations: 10,
        scalingFactor: .kilo,
        maxDuration: .seconds(3),
        maxIterations: 20_000
    )

    // 1. Access list: 100,000 allow/deny rules compiled from rule-file text.
    Benchmark("access list lookup, 100,000 rules") { (benchmark: Benchmark, state: AccessListState) in
        let list = state.list
        var cursor = state.cursor.take(benchmark.scaledIterations.count)
        for _ in benchmark.scaledIterations {
            blackHole(list.evaluate(state.probes[cursor]).allowed)
            cursor = (cursor + 1) & state.mask
        }
    } setup: {
        try AccessListState(ruleCount: 100_000)
    }

    // 2. geo: 1,000,000 CIDRs compiled from rule-file text, looked up through the compiled
    // variable (what evaluating `$geo_test` does once the client address is known).
    Benchmark("geo lookup, 1,000,000 CIDRs") { (benchmark: Benchmark, state: GeoState) in
        let geo = state.geo
        var cursor = state.cursor.take(benchmark.scaledIterations.count)
        for _ in benchmark.scaledIterations {
            blackHole(geo.value(for: state.probes[cursor]).count)
            cursor = (cursor + 1) & state.mask
        }
    } setup: {
        try GeoState(blockCount: 1_000_000)
    }

    // 3. Limits. Keys are rendered `$remote_addr` values ("10.x.y.z") made in setup, so what is
    // measured is the zone alone (rendering the key is the session's work, not the zone's).
    Benchmark("limit_conn acquire+release, 10m zone, 100,000 held") { (benchmark: Benchmark, state: LimitConnState) in
        let zone = state.zone
        var cursor = state.cursor.take(benchmark.scaledIterations.count)
        for _ in benchmark.scaledIterations {
            let key = state.keys[cursor]
            if zone.acquire(key, limit: 1) == .acquired { zone.release(key) } else { blackHole(key) }
            cursor = (cursor + 1) & state.mask
        }
    } setup: {
        LimitConnState(held: 100_000)
    }

    // limit_rate (sessions): one admit per new session, time passed in 1 µs apart as the gateway
    // passes its monotonic clock. From 50,000 keys every key stays in the 10m zone (81,920 keys);
    // from 1,000,000 keys the zone is full and nearly every admit evicts its shard's least
    // recently used key and makes a new bucket.
    for population in [50_000, 1_000_000] {
        Benchmark("limit_rate admit, 10m zone, keys from \(grouped(population))") { (benchmark: Benchmark, state: LimitRateState) in
            let zone = state.zone
            var cursor = state.cursor.take(benchmark.scaledIterations.count)
            var now = state.clock.take(UInt64(benchmark.scaledIterations.count) * 1_000)
            for _ in benchmark.scaledIterations {
                now &+= 1_000
                blackHole(zone.admit(state.keys[cursor], now: now))
                cursor = (cursor + 1) & state.mask
            }
        } setup: {
            LimitRateState(population: population)
        }
    }

    // 4. PROXY v2: a TCP4 header with AUTHORITY and UNIQUE_ID TLVs followed by payload, decoded
    // through the raw-buffer entry point the channel handler uses on a ByteBuffer's bytes.
    Benchmark("PROXY v2 decode, TCP4 + 2 TLVs") { (benchmark: Benchmark, state: ProxyState) in
        state.input.withUnsafeBytes { raw in
            for _ in benchmark.scaledIterations {
                guard let (header, length) = try? ProxyHeaderDecoder.decode(raw) else {
                    benchmark.error("the header did not decode")
                    return
                }
                blackHole(length &+ header.tlvBytes.count &+ Int(header.source?.port ?? 0))
            }
        }
    } setup: {
        try ProxyState()
    }
}
