public import PortcullisCore
import Synchronization

/// `limit_conn_zone KEY zone=NAME:SIZE;` — concurrent sessions per key, exact across every
/// event loop: 16 shards, each a mutex around a dictionary of at most its share of the zone's
/// capacity (SIZE ÷ 64 bytes, nginx's figure for its own states on 64-bit). A key's count is
/// removed when it returns to 0, as nginx deletes its node.
public final class LimitConnZone: Sendable {
    public let name: String
    public let key: LogTemplate
    /// Bytes, as written (`10m`).
    public let size: Int
    public let capacity: Int
    public let location: SourceLocation?

    static let shardCount = 16
    static let bytesPerState = 64

    private let shards: [Locked<[[UInt8]: Int]>]
    /// So that the zone says it is full at most once a second.
    private let fullReports = ReportThrottle(interval: 1)
    private let shardCapacity: Int

    public init(name: String, key: LogTemplate, size: Int, location: SourceLocation?) {
        self.name = name
        self.key = key
        self.size = size
        self.location = location
        capacity = Swift.max(Self.shardCount, size / Self.bytesPerState)
        shardCapacity = capacity / Self.shardCount
        shards = (0..<Self.shardCount).map { _ in Locked([:]) }
    }

    public enum Outcome: Sendable, Equatable {
        /// Counted; release it when the session ends.
        case acquired
        /// The key already has `limit` sessions.
        case overLimit
        /// A new key, and its shard is full (nginx: no memory in the zone).
        case zoneFull
    }

    /// A per-process seed: which keys share a shard cannot be worked out from outside.
    private static let seed = UInt64.random(in: 1...UInt64.max)

    /// FNV-1a over the key, seeded, then mixed (MurmurHash3's finalizer) so that every bit of
    /// every byte reaches the top bits the shard is taken from. (Plain FNV-1a modulo 16 depends
    /// only on the low 4 bits of each byte: 10.0.0.0, .16, .32 … would share one shard.)
    static func shard(of key: [UInt8]) -> Int {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325 ^ seed
        for byte in key { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        hash ^= hash >> 33
        hash &*= 0xff51_afd7_ed55_8ccd
        hash ^= hash >> 33
        hash &*= 0xc4ce_b9fe_1a85_ec53
        hash ^= hash >> 33
        return Int(hash >> 60)
    }

    /// Counts one more session for `key` unless it already has `limit`.
    public func acquire(_ key: [UInt8], limit: Int) -> Outcome {
        shards[Self.shard(of: key)].withLock { counts in
            if let current = counts[key] {
                guard current < limit else { return .overLimit }
                counts[key] = current + 1
                return .acquired
            }
            guard limit > 0 else { return .overLimit }
            guard counts.count < shardCapacity else { return .zoneFull }
            counts[key] = 1
            return .acquired
        }
    }

    /// Gives back one session of `key` (once per `.acquired`).
    public func release(_ key: [UInt8]) {
        shards[Self.shard(of: key)].withLock { counts in
            guard let current = counts[key] else { return }
            if current <= 1 { counts.removeValue(forKey: key) } else { counts[key] = current - 1 }
        }
    }

    /// Whether to log "zone full" now (`now`: seconds): true at most once per second.
    public func shouldReportFull(now: Int64) -> Bool { fullReports.allows(now: now) }

    /// Sessions counted for `key` now.
    public func count(_ key: [UInt8]) -> Int {
        shards[Self.shard(of: key)].withLock { $0[key] ?? 0 }
    }

    /// Keys held now, over every shard.
    public var keyCount: Int { shards.reduce(0) { total, shard in total + shard.withLock { $0.count } } }
}
