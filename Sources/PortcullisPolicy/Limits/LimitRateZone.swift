public import PortcullisCore
import Synchronization

/// `limit_rate_zone KEY zone=NAME:SIZE rate=R [burst=B];` — a token bucket per key.
/// `R` in `r/s` or `r/m` limits new sessions; `R` as a size per second is bandwidth shared by
/// all of the key's connections. The zone keeps at most SIZE ÷ 128 keys in 16 shards, each with
/// its own least-recently-used order; a full shard evicts its LRU key (a key whose bucket was
/// full loses nothing by it). See docs/decisions/0007-limiter-state.md.
public final class LimitRateZone: Sendable {
    public enum Kind: Sendable, Equatable {
        /// New sessions per second.
        case sessions
        /// Bytes per second, both directions counted.
        case bandwidth
    }

    public let name: String
    public let key: LogTemplate
    public let kind: Kind
    /// Tokens per second (sessions or bytes).
    public let rate: Double
    public let burst: Double
    public let size: Int
    public let capacity: Int
    /// The rate as written (`5r/s`, `1m`), for logs.
    public let rateText: String
    public let location: SourceLocation?

    static let shardCount = 16
    static let bytesPerEntry = 128

    private let shards: [Locked<Shard>]

    public init(name: String, key: LogTemplate, kind: Kind, rate: Double, burst: Double, size: Int,
                rateText: String, location: SourceLocation?) {
        self.name = name
        self.key = key
        self.kind = kind
        self.rate = rate
        self.burst = burst
        self.size = size
        self.rateText = rateText
        self.location = location
        capacity = Swift.max(Self.shardCount, size / Self.bytesPerEntry)
        let perShard = capacity / Self.shardCount
        shards = (0..<Self.shardCount).map { _ in Locked(Shard(capacity: perShard)) }
    }

    /// The bucket of `key`, made (full) if the key is new, and marked most recently used.
    public func bucket(for key: [UInt8], now: UInt64) -> SharedBucket {
        shards[LimitConnZone.shard(of: key)].withLock { shard in
            shard.bucket(for: key) { SharedBucket(TokenBucket(rate: rate, burst: burst, now: now)) }
        }
    }

    /// Keys a full shard let go to make room (metrics).
    public var evictions: Int { shards.reduce(0) { total, shard in total + shard.withLock { $0.evictions } } }

    /// One new session for `key`: true if its bucket had a token.
    public func admit(_ key: [UInt8], now: UInt64) -> Bool {
        bucket(for: key, now: now).take(now: now)
    }

    public var keyCount: Int { shards.reduce(0) { total, shard in total + shard.withLock { $0.count } } }

    /// One shard: keys in a dictionary, buckets and LRU links in arrays (no allocation per
    /// entry beyond the key and its bucket; an evicted slot is reused).
    struct Shard {
        let capacity: Int
        private var slots: [[UInt8]: Int32] = [:]
        private var keys: [[UInt8]] = []
        private var buckets: [SharedBucket] = []
        private var newer: [Int32] = []
        private var older: [Int32] = []
        private var newest: Int32 = -1
        private var oldest: Int32 = -1

        init(capacity: Int) { self.capacity = Swift.max(1, capacity) }

        var count: Int { slots.count }
        private(set) var evictions = 0

        mutating func bucket(for key: [UInt8], make: () -> SharedBucket) -> SharedBucket {
            if let slot = slots[key] {
                touch(slot)
                return buckets[Int(slot)]
            }
            let slot: Int32
            if keys.count < capacity {
                slot = Int32(keys.count)
                keys.append(key)
                buckets.append(make())
                newer.append(-1)
                older.append(-1)
            } else {
                // Full: the least recently used key makes way.
                evictions += 1
                slot = oldest
                unlink(slot)
                slots.removeValue(forKey: keys[Int(slot)])
                keys[Int(slot)] = key
                buckets[Int(slot)] = make()
            }
            slots[key] = slot
            pushNewest(slot)
            return buckets[Int(slot)]
        }

        private mutating func touch(_ slot: Int32) {
            guard slot != newest else { return }
            unlink(slot)
            pushNewest(slot)
        }

        private mutating func unlink(_ slot: Int32) {
            let n = newer[Int(slot)], o = older[Int(slot)]
            if n >= 0 { older[Int(n)] = o } else { newest = o }
            if o >= 0 { newer[Int(o)] = n } else { oldest = n }
            newer[Int(slot)] = -1
            older[Int(slot)] = -1
        }

        private mutating func pushNewest(_ slot: Int32) {
            older[Int(slot)] = newest
            newer[Int(slot)] = -1
            if newest >= 0 { newer[Int(newest)] = slot }
            newest = slot
            if oldest < 0 { oldest = slot }
        }
    }
}

/// A token bucket several connections (on several event loops) draw from.
///
/// Sharing is by turns: a connection that finds the bucket empty is given the next free turn
/// (one read's worth of time after the turn before it), so the connections of one key read in
/// rotation instead of racing for each refill.
public final class SharedBucket: Sendable {
    private struct State {
        var bucket: TokenBucket
        /// When the last turn handed out ends (monotonic nanoseconds).
        var turnsUntil: UInt64 = 0
    }

    private let state: Mutex<State>

    public init(_ bucket: TokenBucket) { state = Mutex(State(bucket: bucket)) }

    public func take(now: UInt64) -> Bool { state.withLock { $0.bucket.take(now: now) } }

    public func spend(_ count: Int, now: UInt64) { state.withLock { $0.bucket.spend(Double(count), now: now) } }

    /// Nanoseconds until a read may go ahead; 0 now. A wait is a reserved turn: the caller
    /// reads when it is over without asking again. `chunk`: the bytes one read may take.
    /// `reserve: false` only asks (UDP drops a datagram rather than wait, so it takes no turn).
    public func wait(now: UInt64, chunk: Int = 16 * 1024, reserve: Bool = true) -> UInt64 {
        state.withLock { state in
            let ready = state.bucket.wait(now: now)
            guard reserve else { return ready }
            guard ready > 0 || state.turnsUntil > now else { return 0 }
            let turn = max(now + ready, state.turnsUntil)
            state.turnsUntil = turn + UInt64(Double(chunk) / state.bucket.rate * 1e9)
            return turn - now
        }
    }

    public var tokens: Double { state.withLock { $0.bucket.tokens } }
}
