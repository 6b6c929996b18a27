#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisCore
import PortcullisRules
@testable import PortcullisPolicy

/// Knows no host: the rules below name none.
private struct NoHosts: HostResolver {
    func addresses(of host: String) -> [IPAddress] { [] }
}

/// Issue #16 item 3: 1,000,000 distinct keys against a `limit_conn_zone` and a
/// `limit_rate_zone` of 1m each, compiled from a rule file as `run` compiles it. The zones must
/// hold no more keys than their size allows whatever arrives, a full `limit_conn` zone must
/// refuse new keys (503, as nginx's "no memory in limit_conn_zone"), a full `limit_rate` zone
/// must evict its least recently used key (counted), and a key in use must keep its count or
/// its bucket through the flood. Keys are `$remote_addr` as the gateway renders it
/// (10.0.0.1, 10.0.0.2, …).
@Suite("1,000,000 keys against limit zones", .serialized)
struct KeyFloodTests {
    static let keys = 1_000_000
    static let second: UInt64 = 1_000_000_000

    static let rules = """
        stream {
            limit_conn_zone $remote_addr zone=conn:1m;
            limit_rate_zone $remote_addr zone=rate:1m rate=10r/s burst=5;
            server {
                listen 127.0.0.1:8080;
                limit_conn conn 1;
                proxy_pass 127.0.0.1:9000;
            }
            server {
                listen 127.0.0.1:8081;
                limit_rate rate;
                proxy_pass 127.0.0.1:9000;
            }
        }
        """

    static func servers() throws -> (conn: ServerPolicy, rate: ServerPolicy) {
        let result = RuleLoader.load(text: rules, file: "flood.conf", resolver: NoHosts())
        let snapshot = try #require(result.snapshot, "\(result.rendered)")
        let conn = try #require(snapshot.servers.first { $0.listens.contains { $0.port == 8080 } })
        let rate = try #require(snapshot.servers.first { $0.listens.contains { $0.port == 8081 } })
        return (conn, rate)
    }

    /// The n-th flood address as text bytes, as `$remote_addr` renders it (n from 0: 10.0.0.1 …).
    static func key(_ n: Int) -> [UInt8] {
        let a = (10 << 24) + n + 1
        var out: [UInt8] = []
        out.reserveCapacity(15)
        for (i, shift) in [24, 16, 8, 0].enumerated() {
            if i > 0 { out.append(UInt8(ascii: ".")) }
            let octet = (a >> shift) & 255
            if octet >= 100 { out.append(UInt8(48 + octet / 100)) }
            if octet >= 10 { out.append(UInt8(48 + (octet / 10) % 10)) }
            out.append(UInt8(48 + octet % 10))
        }
        return out
    }

    /// The process's private heap now (RssAnon), in KiB.
    static func anonymousKiB() -> Int {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return 0 }
        for line in status.split(separator: "\n") where line.hasPrefix("RssAnon:") {
            return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
        }
        return 0
    }

    /// One session of `client` through the server's limits, as the session machine runs them.
    static func session(_ server: ServerPolicy, client: String, now: UInt64, gate: inout SessionGate) -> SessionRecord {
        var record = SessionRecord(connection: 1, transport: .tcp, client: SocketEndpoint(client + ":40000")!,
                                   server: SocketEndpoint("127.0.0.1:\(server.listens[0].port)")!,
                                   listener: "127.0.0.1:\(server.listens[0].port)", startTime: 1_700_000_000)
        _ = gate.limits(server, record: &record, now: now, wallClock: 1_700_000_000) { _ in }
        return record
    }

    @Test("limit_conn_zone 1m under 1,000,000 new keys held open: 16,384 keys at most, every other new key refused 503, a key already in it still counted")
    func connZoneHoldsItsSize() throws {
        let server = try Self.servers().conn
        let zone = try #require(server.limits.conn.first?.zone)
        #expect(zone.capacity == 16_384, "1m ÷ 64 bytes a key")

        // The ordinary client holds one session from before the flood.
        var ordinary = SessionGate()
        #expect(Self.session(server, client: "198.51.100.1", now: 0, gate: &ordinary).status == .ok)

        let heapBefore = Self.anonymousKiB()
        let started = Date()
        var acquired = 0, full = 0, over = 0
        // Worst case for memory: no flood session ever ends, so no key ever leaves.
        for n in 0..<Self.keys {
            switch zone.acquire(Self.key(n), limit: 1) {
            case .acquired: acquired += 1
            case .zoneFull: full += 1
            case .overLimit: over += 1
            }
        }
        let elapsed = Date().timeIntervalSince(started)
        let heapGrowth = Self.anonymousKiB() - heapBefore
        print("limit_conn flood: \(Self.keys) keys in \(String(format: "%.2f", elapsed)) s "
              + "(\(Int(Double(Self.keys) / elapsed)) keys/s); acquired \(acquired), zone full \(full); "
              + "keys held \(zone.keyCount) of \(zone.capacity); heap +\(heapGrowth) KiB")

        // Every shard filled to its share (1,024) and no further: the zone's capacity exactly.
        #expect(zone.keyCount == zone.capacity, "keys held: \(zone.keyCount)")
        #expect(acquired + 1 == zone.capacity, "the ordinary key took one place: \(acquired)")
        #expect(full == Self.keys - acquired, "every key that found no room was refused: \(full)")
        #expect(over == 0)
        // 16,384 short keys and their counts; 1,000,000 kept would be well over 60 MiB.
        #expect(heapGrowth < 24 * 1024, "heap grew by \(heapGrowth) KiB")
        #expect(elapsed < 60, "\(elapsed) s")

        // A new client now is refused as nginx refuses it: 503, phase limit_conn, zone full.
        var stranger = SessionGate()
        let refused = Self.session(server, client: "203.0.113.7", now: 0, gate: &stranger)
        #expect(refused.status == .serviceUnavailable)
        #expect(refused.phase == .limitConn)
        #expect(refused.outcome.cause == .connectionZoneFull(zone: "conn"))

        // The ordinary client's key is still counted (1 session): a second one is over its limit
        // (not "zone full"), and once its first session ends it gets in again.
        #expect(zone.count(Array("198.51.100.1".utf8)) == 1)
        var second = SessionGate()
        let again = Self.session(server, client: "198.51.100.1", now: 0, gate: &second)
        #expect(again.status == .serviceUnavailable && again.outcome.cause == .connectionLimit(zone: "conn"))
        ordinary.release()
        #expect(zone.count(Array("198.51.100.1".utf8)) == 0)
        var third = SessionGate()
        #expect(Self.session(server, client: "198.51.100.1", now: 0, gate: &third).status == .ok,
                "a key leaving makes room for one in its part of the zone")
        third.release()

        // The flood's sessions end: the zone empties (keys with no session are not kept).
        for n in 0..<Self.keys { zone.release(Self.key(n)) }
        #expect(zone.keyCount == 0)
        var late = SessionGate()
        #expect(Self.session(server, client: "203.0.113.7", now: 0, gate: &late).status == .ok)
        late.release()
    }

    @Test("limit_rate_zone 1m under 1,000,000 new keys: 8,192 keys at most, never refused for lack of room, 991,810 evictions counted, a key in use keeps its bucket and its rate")
    func rateZoneEvictsLeastRecentlyUsed() throws {
        let server = try Self.servers().rate
        let zone = try #require(server.limits.rate.first?.zone)
        #expect(zone.capacity == 8_192, "1m ÷ 128 bytes a key")
        let ordinaryKey = Array("198.51.100.1".utf8)
        let idleKey = Array("198.51.100.2".utf8)

        // Before the flood: the idle key spends its whole burst (5) and is left alone.
        for _ in 0..<5 { #expect(zone.admit(idleKey, now: 0)) }
        #expect(!zone.admit(idleKey, now: 0), "burst=5 spent")
        let ordinaryBucket = zone.bucket(for: ordinaryKey, now: 0)

        let heapBefore = Self.anonymousKiB()
        let started = Date()
        var refusedFlood = 0, ordinaryAdmitted = 0, ordinaryRefused = 0
        var now: UInt64 = 0
        for n in 0..<Self.keys {
            // 1,000 new keys each 100 ms of the zone's clock: 10,000 new keys a second.
            if n % 1000 == 0 {
                now += Self.second / 10
                // The ordinary client: one session every 100 ms, at its rate of 10r/s.
                if zone.admit(ordinaryKey, now: now) { ordinaryAdmitted += 1 } else { ordinaryRefused += 1 }
            }
            if !zone.admit(Self.key(n), now: now) { refusedFlood += 1 }
        }
        let elapsed = Date().timeIntervalSince(started)
        let heapGrowth = Self.anonymousKiB() - heapBefore
        print("limit_rate flood: \(Self.keys) keys in \(String(format: "%.2f", elapsed)) s "
              + "(\(Int(Double(Self.keys) / elapsed)) keys/s); keys held \(zone.keyCount) of \(zone.capacity), "
              + "evictions \(zone.evictions); ordinary client \(ordinaryAdmitted) admitted, \(ordinaryRefused) refused; "
              + "heap +\(heapGrowth) KiB")

        #expect(zone.keyCount == zone.capacity, "keys held: \(zone.keyCount)")
        // Every new key past the zone's capacity pushed one out: the flood's keys, the two
        // keys from before, less the places they all fit in.
        #expect(zone.evictions == Self.keys + 2 - zone.capacity, "evictions: \(zone.evictions)")
        #expect(refusedFlood == 0, "a new key gets a full bucket: a rate zone never refuses for room")
        #expect(heapGrowth < 24 * 1024, "heap grew by \(heapGrowth) KiB")
        #expect(elapsed < 60, "\(elapsed) s")

        // The ordinary key was used every 1,000 keys (about 62 new keys in its part of the zone,
        // which holds 512): never evicted, the same bucket, every session within its rate admitted.
        #expect(zone.bucket(for: ordinaryKey, now: now) === ordinaryBucket, "the ordinary key kept its bucket")
        #expect(ordinaryAdmitted == Self.keys / 1000 && ordinaryRefused == 0)
        // Still limited: a burst beyond its 5 tokens is refused (its bucket was not reset).
        var burst = 0
        for _ in 0..<10 where zone.admit(ordinaryKey, now: now) { burst += 1 }
        // Exactly its burst less the token its last session, at `now`, spent: each 100 ms gave
        // back one token (10r/s) and its session took one, so the bucket never filled or drained.
        #expect(burst == 4, "\(burst) admitted at once")
        var gate = SessionGate()
        let refused = Self.session(server, client: "198.51.100.1", now: now, gate: &gate)
        #expect(refused.status == .serviceUnavailable && refused.phase == .limitRate)

        // The price of eviction (docs/threat-model.md): the idle key was pushed out, and comes
        // back with a full bucket.
        #expect(zone.admit(idleKey, now: now), "an evicted key starts again with a full bucket")
    }
}
