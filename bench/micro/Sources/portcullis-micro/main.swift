import Foundation
import PortcullisCore
import PortcullisPolicy
import PortcullisRules

/// Access-list lookups per second on one core, for lists of 10 to 100,000 rules, and the time
/// to compile the largest list from rule-file text.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E3779B97F4A7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) &* 0x94D049BB133111EB
        return z ^ (z >> 31)
    }
}

func rules(count: Int, rng: inout SplitMix64) -> [AccessRule] {
    var out: [AccessRule] = []
    for i in 0..<(count - 1) {
        let block: CIDR
        switch i % 3 {
        case 0: block = CIDR(address: .v4(UInt32(10) << 24 | UInt32.random(in: 0...0xFFFF, using: &rng) << 8), prefixLength: 24)
        case 1: block = CIDR(address: .v4(UInt32(172) << 24 | UInt32.random(in: 0x100000...0x1FFFFF, using: &rng)), prefixLength: 32)
        default: block = CIDR(address: .v6(UInt128(0x20010db8) << 96 | UInt128(UInt32.random(in: 0...UInt32.max, using: &rng)) << 64), prefixLength: 64)
        }
        out.append(AccessRule(action: .deny, match: .block(block), reference: RuleReference(file: "bench", line: i, text: "")))
    }
    out.append(AccessRule(action: .allow, match: .all, reference: RuleReference(file: "bench", line: count, text: "allow all;")))
    return out
}

func measure(_ label: String, lookups: Int, _ body: () -> Int) {
    let start = DispatchTime.now().uptimeNanoseconds
    let sink = body()
    let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
    print(String(format: "%-44@ %8.1f M lookups/s   (%.1f ns each, sink %d)",
                 label as NSString, Double(lookups) / seconds / 1e6, seconds / Double(lookups) * 1e9, sink))
}

var rng = SplitMix64(state: 42)
let probes: [IPAddress] = (0..<1_000_000).map { i in
    switch i % 4 {
    case 0: return .v4(UInt32(10) << 24 | UInt32.random(in: 0...0xFFFFFF, using: &rng))
    case 1: return .v4(UInt32(127) << 24 | 1)
    case 2: return .v6(UInt128(0xFFFF) << 32 | UInt128(UInt32(172) << 24 | UInt32.random(in: 0x100000...0x1FFFFF, using: &rng)))
    default: return .v6(UInt128(0x20010db8) << 96 | UInt128(rng.next()) << 32)
    }
}

print("Access list lookups, one core, \(ProcessInfo.processInfo.processorCount) cores present, \(Date())")
for count in [10, 1_000, 100_000] {
    let list = AccessList(rules: rules(count: count, rng: &rng))
    let rounds = 10
    measure("compiled table, \(count) rules", lookups: probes.count * rounds) {
        var denied = 0
        for _ in 0..<rounds { for probe in probes where !list.evaluate(probe).allowed { denied += 1 } }
        return denied
    }
    if count <= 1_000 {
        let sample = probes.prefix(100_000)
        measure("linear first-match scan, \(count) rules", lookups: sample.count) {
            var denied = 0
            for probe in sample where !list.evaluateByScan(probe).allowed { denied += 1 }
            return denied
        }
    }
}

// Compiling a 100,000-line rule file end to end (lex, parse, compile, build tables).
var text = "stream { server { listen 127.0.0.1:9999; \n"
for rule in rules(count: 100_000, rng: &rng) {
    switch rule.match {
    case .all: text += "allow all;\n"
    case .block(let block): text += "deny \(block);\n"
    case .variable: break
    }
}
text += "proxy_pass 127.0.0.1:9998; } }\n"
let start = DispatchTime.now().uptimeNanoseconds
let result = RuleLoader.load(text: text, file: "bench.conf")
let elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
print(String(format: "compile a 100,000-rule file: %.3f s (%@)", elapsed, result.hasErrors ? "errors!" : "ok"))

// geo (longest prefix): 1,000,000 IPv4 CIDRs of mixed lengths, issue #4's load test, from
// rule-file text through the real parser and compiler; then lookups through the compiled
// variable (what a session's `$geo` evaluation does after reading the client address).
func residentKiB() -> Int {
    let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
    let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
    return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
}
var geoText = "stream {\n geo $geo_test {\n  default ZZ;\n"
geoText.reserveCapacity(24_000_000)
for i in 0..<1_000_000 {
    let length = [16, 20, 24, 24, 24, 28, 32][i % 7]
    let cidr = CIDR(address: .v4(UInt32.random(in: 0...UInt32.max, using: &rng)), prefixLength: length)
    geoText += "  \(cidr) c\(i % 250);\n"
}
geoText += " }\n server { listen 127.0.0.1:9; proxy_pass 127.0.0.1:10; }\n}\n"
let rssBefore = residentKiB()
let geoStart = DispatchTime.now().uptimeNanoseconds
let geoResult = RuleLoader.load(text: geoText, file: "geo.conf")
let geoSeconds = Double(DispatchTime.now().uptimeNanoseconds - geoStart) / 1e9
guard let geoSnapshot = geoResult.snapshot, case .geo(let geo) = geoSnapshot.variables.definitions[0] else {
    fatalError("the geo file did not compile:\n\(geoResult.rendered)")
}
print(String(format: "geo block of 1,000,000 CIDRs from text: loaded in %.3f s, %d segments, RSS +%d KiB (text held too)",
             geoSeconds, geo.segmentCount, residentKiB() - rssBefore))
let geoProbes: [UInt32] = (0..<1_000_000).map { _ in UInt32.random(in: 0...UInt32.max, using: &rng) }
measure("geo variable lookup, 1,000,000 CIDRs", lookups: geoProbes.count * 20) {
    var found = 0
    for _ in 0..<20 { for probe in geoProbes where geo.value(for: .v4(probe)).count == 3 { found += 1 } }
    return found
}

// The same kind of table built directly from blocks, looked up by integer: what the variable
// adds (reading the address, the value's bytes) on top of the table search.
var rawBlocks: [UInt64] = []
var rawValues: [Int32] = []
for i in 0..<1_000_000 {
    let length = [16, 20, 24, 24, 24, 28, 32][i % 7]
    let cidr = CIDR(address: .v4(UInt32.random(in: 0...UInt32.max, using: &rng)), prefixLength: length)
    rawBlocks.append(LongestPrefixTable.pack(first: cidr.ipv4Range!.lowerBound, prefixLength: length, position: i))
    rawValues.append(Int32(i % 250))
}
let raw = LongestPrefixTable<UInt32>(packed: rawBlocks, values: rawValues)
measure("geo table lookup alone, 1,000,000 CIDRs", lookups: geoProbes.count * 20) {
    var found = 0
    for _ in 0..<20 { for probe in geoProbes where raw.lookup(probe) != nil { found += 1 } }
    return found
}

// Limits (issue #5): the cost of one limit check on one core. A key is a client address as
// `$remote_addr` renders it ("10.1.2.3"), made afresh for each check as a session makes it, for
// 1,000,000 distinct addresses drawn at random; the first line is that rendering alone, which
// the other lines include. Time is passed in (1 µs later for every check), as the gateway
// passes in its monotonic clock.
func measureChecks(_ label: String, checks: Int, _ body: () -> Int) {
    let start = DispatchTime.now().uptimeNanoseconds
    let sink = body()
    let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
    print(String(format: "%-60@ %7.1f M checks/s   (%.0f ns each, sink %d)",
                 label as NSString, Double(checks) / seconds / 1e6, seconds / Double(checks) * 1e9, sink))
}
/// "10.x.y.z" for address number `i`, as bytes: what rendering `$remote_addr` gives.
@Sendable func limitKey(_ i: Int32) -> [UInt8] {
    let a = UInt32(10) << 24 | UInt32(i + 1)
    var out: [UInt8] = []
    out.reserveCapacity(15)
    for shift in [24, 16, 8, 0] as [UInt32] {
        let octet = UInt8(truncatingIfNeeded: a >> shift)
        if octet >= 100 { out.append(48 + octet / 100) }
        if octet >= 10 { out.append(48 + octet / 10 % 10) }
        out.append(48 + octet % 10)
        if shift > 0 { out.append(UInt8(ascii: ".")) }
    }
    return out
}
print("Limit checks, one core")
let limitDraws: [Int32] = (0..<4_000_000).map { _ in Int32.random(in: 0..<1_000_000, using: &rng) }
let noKey = LogTemplate(parts: [])
measureChecks("render the key alone (included below)", checks: limitDraws.count) {
    var sum = 0
    for draw in limitDraws { sum &+= limitKey(draw).count }
    return sum
}

// limit_conn: acquire when the session starts, release when it ends. An empty zone (each key
// inserted and removed again), and one that holds 100,000 sessions of other keys.
for held in [0, 100_000] {
    let zone = LimitConnZone(name: "flood", key: noKey, size: 10 * 1024 * 1024, location: nil)
    for i in 0..<held { _ = zone.acquire(Array("held-\(i)".utf8), limit: 1) }
    measureChecks("limit_conn acquire+release, 10m zone, \(held) held", checks: limitDraws.count) {
        var refused = 0
        for draw in limitDraws {
            let key = limitKey(draw)
            if zone.acquire(key, limit: 1) == .acquired { zone.release(key) } else { refused += 1 }
        }
        return refused
    }
}

// limit_rate (sessions): one admit per new session. Drawn from 1,000,000 keys the 10m zone
// (81,920 keys) is full and nearly every check evicts its shard's least recently used key;
// drawn from 50,000 keys every key stays in the zone.
for population in [1_000_000, 50_000] as [Int32] {
    let zone = LimitRateZone(name: "rate", key: noKey, kind: .sessions, rate: 10, burst: 10,
                             size: 10 * 1024 * 1024, rateText: "10r/s", location: nil)
    var now: UInt64 = 1_000_000_000
    for draw in limitDraws.prefix(200_000) { now += 1_000; _ = zone.admit(limitKey(draw % population), now: now) }
    measureChecks("limit_rate admit, 10m zone, keys from \(population)", checks: limitDraws.count) {
        var refused = 0
        for draw in limitDraws {
            now += 1_000
            if !zone.admit(limitKey(draw % population), now: now) { refused += 1 }
        }
        return refused
    }
}

// Bandwidth: what a throttled read costs: spend the bytes read, then ask how long to wait.
do {
    let bucket = SharedBucket(TokenBucket(rate: 1024 * 1024, burst: 1024 * 1024, now: 0))
    var now: UInt64 = 0
    let rounds = 20_000_000
    measureChecks("SharedBucket spend(16 KiB) + wait, 1m/s", checks: rounds) {
        var waits = 0
        for _ in 0..<rounds {
            now += 1_000
            bucket.spend(16 * 1024, now: now)
            if bucket.wait(now: now) > 0 { waits += 1 }
        }
        return waits
    }
}

// The same limit_conn check from two threads at once (16 shards: different keys rarely share
// a lock).
do {
    let zone = LimitConnZone(name: "flood", key: noKey, size: 10 * 1024 * 1024, location: nil)
    let threads = 2
    let start = DispatchTime.now().uptimeNanoseconds
    DispatchQueue.concurrentPerform(iterations: threads) { t in
        for (i, draw) in limitDraws.enumerated() where i % threads == t {
            let key = limitKey(draw)
            if zone.acquire(key, limit: 1) == .acquired { zone.release(key) }
        }
    }
    let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
    print(String(format: "%-60@ %7.1f M checks/s   (all threads)",
                 "limit_conn acquire+release, \(threads) threads" as NSString, Double(limitDraws.count) / seconds / 1e6))
}

// Memory a full zone holds: resident memory before and after filling a 10m zone with fresh
// keys, as sessions would bring them (free heap pages handed back first, so that what earlier
// sections freed is not reused unseen).
#if os(Linux)
@_silgen_name("malloc_trim")
func mallocTrim(_ pad: Int) -> Int32
do {
    func heapInUse() -> Int {
        _ = mallocTrim(0)
        return residentKiB() * 1024
    }
    let size = 10 * 1024 * 1024
    var before = heapInUse()
    let connZone = LimitConnZone(name: "flood", key: noKey, size: size, location: nil)
    var held = 0
    for i in 0..<1_000_000 where connZone.acquire(limitKey(Int32(i)), limit: 1) == .acquired { held += 1 }
    var used = heapInUse() - before
    print(String(format: "limit_conn_zone 10m full: %d keys held, heap %.1f MiB (%.0f bytes a key, %.2f × SIZE)",
                 held, Double(used) / 1_048_576, Double(used) / Double(held), Double(used) / Double(size)))
    before = heapInUse()
    let rateZone = LimitRateZone(name: "rate", key: noKey, kind: .sessions, rate: 10, burst: 10, size: size,
                                 rateText: "10r/s", location: nil)
    for i in 0..<1_000_000 { _ = rateZone.admit(limitKey(Int32(i)), now: UInt64(i) * 1_000) }
    used = heapInUse() - before
    print(String(format: "limit_rate_zone 10m full: %d keys held, heap %.1f MiB (%.0f bytes a key, %.2f × SIZE)",
                 rateZone.keyCount, Double(used) / 1_048_576, Double(used) / Double(rateZone.keyCount), Double(used) / Double(size)))
    withExtendedLifetime((connZone, rateZone)) {}
}
#endif
