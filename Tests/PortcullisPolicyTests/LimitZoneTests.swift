import Testing
import Foundation
import Synchronization
@testable import PortcullisPolicy

/// `LimitConnZone`, `LimitRateZone` (+ `SharedBucket`) and `AuditSampler`: counts, capacity,
/// eviction, exactness across threads. Times are passed in, as the gateway does.
@Suite struct LimitZoneTests {
    static let second: UInt64 = 1_000_000_000
    static let millisecond: UInt64 = 1_000_000
    static let t0: UInt64 = 42 * second

    static func key(_ text: String) -> [UInt8] { Array(text.utf8) }

    static func connZone(size: Int = 10 << 20) -> LimitConnZone {
        LimitConnZone(name: "addr", key: LogTemplate(parts: []), size: size, location: nil)
    }

    static func rateZone(kind: LimitRateZone.Kind = .sessions, rate: Double = 5, burst: Double = 5,
                         size: Int = 10 << 20) -> LimitRateZone {
        LimitRateZone(name: "perip", key: LogTemplate(parts: []), kind: kind, rate: rate, burst: burst, size: size,
                      rateText: "\(rate)r/s", location: nil)
    }

    /// `count` distinct keys that all land in shard `shard`.
    static func keys(inShard shard: Int, count: Int, prefix: String = "k") -> [[UInt8]] {
        var found: [[UInt8]] = []
        var i = 0
        while found.count < count {
            let k = key("\(prefix)\(i)")
            if LimitConnZone.shard(of: k) == shard { found.append(k) }
            i += 1
        }
        return found
    }

    // MARK: LimitConnZone: counting

    @Test func acquireCountsUpToTheLimitAndReleaseGivesBack() {
        let zone = Self.connZone()
        let a = Self.key("10.0.0.1")
        #expect(zone.count(a) == 0)
        for i in 1...3 {
            #expect(zone.acquire(a, limit: 3) == .acquired)
            #expect(zone.count(a) == i)
        }
        #expect(zone.acquire(a, limit: 3) == .overLimit)
        #expect(zone.count(a) == 3, "a refusal does not count")
        zone.release(a)
        #expect(zone.count(a) == 2)
        #expect(zone.acquire(a, limit: 3) == .acquired, "a released slot can be taken again")
        #expect(zone.acquire(a, limit: 3) == .overLimit)
        // A higher limit (another server's limit_conn on the same zone) lets it go further.
        #expect(zone.acquire(a, limit: 4) == .acquired)
        #expect(zone.count(a) == 4)
        #expect(zone.acquire(a, limit: 2) == .overLimit, "already over a lower limit")
    }

    @Test func keysAreIndependent() {
        let zone = Self.connZone()
        let a = Self.key("10.0.0.1"), b = Self.key("10.0.0.2")
        #expect(zone.acquire(a, limit: 1) == .acquired)
        #expect(zone.acquire(a, limit: 1) == .overLimit)
        #expect(zone.acquire(b, limit: 1) == .acquired)
        #expect(zone.count(a) == 1)
        #expect(zone.count(b) == 1)
        // Keys are bytes: a prefix is another key.
        #expect(zone.acquire(Self.key("10.0.0.1x"), limit: 1) == .acquired)
        #expect(zone.acquire([], limit: 1) == .acquired, "the zone itself does not skip empty keys")
    }

    @Test func aKeyIsRemovedWhenItsCountReturnsToZero() {
        let zone = Self.connZone()
        let a = Self.key("a"), b = Self.key("b")
        #expect(zone.keyCount == 0)
        _ = zone.acquire(a, limit: 5)
        _ = zone.acquire(a, limit: 5)
        _ = zone.acquire(b, limit: 5)
        #expect(zone.keyCount == 2)
        zone.release(a)
        #expect(zone.keyCount == 2, "a still has one session")
        zone.release(a)
        #expect(zone.keyCount == 1)
        #expect(zone.count(a) == 0)
        zone.release(b)
        #expect(zone.keyCount == 0)
        // Releasing more than was acquired does nothing (and never goes negative).
        zone.release(a)
        zone.release(Self.key("never seen"))
        #expect(zone.keyCount == 0)
        #expect(zone.count(a) == 0)
        #expect(zone.acquire(a, limit: 1) == .acquired)
        #expect(zone.count(a) == 1)
    }

    @Test func limitZeroAdmitsNothingAndStoresNothing() {
        let zone = Self.connZone()
        let a = Self.key("a")
        #expect(zone.acquire(a, limit: 0) == .overLimit)
        #expect(zone.keyCount == 0, "a refused new key must not be stored")
        #expect(zone.count(a) == 0)
        // An existing key under limit 0 is over it too.
        #expect(zone.acquire(a, limit: 1) == .acquired)
        #expect(zone.acquire(a, limit: 0) == .overLimit)
        #expect(zone.count(a) == 1)
    }

    // MARK: LimitConnZone: capacity

    @Test(arguments: [
        (32 * 1024, 512),
        (1 << 20, 16_384),  // nginx: "about 16 thousand 64-byte states" in one megabyte
        (10 << 20, 163_840),
        (100, 16),  // never fewer than one key per shard
    ])
    func capacityIsSizeOver64(size: Int, capacity: Int) {
        #expect(Self.connZone(size: size).capacity == capacity)
        #expect(Self.connZone(size: size).size == size)
    }

    @Test func aFullShardRefusesNewKeysButNotExistingOnes() {
        let zone = Self.connZone(size: 32 * 1024)  // 512 keys, 32 per shard
        #expect(zone.capacity == 512)
        let shard3 = Self.keys(inShard: 3, count: 40)
        for k in shard3.prefix(32) { #expect(zone.acquire(k, limit: 2) == .acquired) }
        #expect(zone.keyCount == 32)
        // A 33rd key in the same shard: no room.
        #expect(zone.acquire(shard3[32], limit: 2) == .zoneFull)
        #expect(zone.keyCount == 32)
        #expect(zone.count(shard3[32]) == 0)
        // Keys already there still count up to their limit, and then are over it, not "full".
        #expect(zone.acquire(shard3[0], limit: 2) == .acquired)
        #expect(zone.count(shard3[0]) == 2)
        #expect(zone.acquire(shard3[0], limit: 2) == .overLimit)
        // Other shards are not full.
        let shard4 = Self.keys(inShard: 4, count: 1)
        #expect(zone.acquire(shard4[0], limit: 2) == .acquired)
        // A key that goes back to 0 frees its room for a new key.
        zone.release(shard3[5])
        #expect(zone.acquire(shard3[33], limit: 2) == .acquired)
        #expect(zone.acquire(shard3[34], limit: 2) == .zoneFull)
        zone.release(shard3[0])  // 2 → 1: still held, no room yet
        #expect(zone.acquire(shard3[34], limit: 2) == .zoneFull)
        zone.release(shard3[0])  // 1 → 0: room
        #expect(zone.acquire(shard3[34], limit: 2) == .acquired)
    }

    @Test func aZoneFillsToItsCapacityAndNoFurther() {
        let zone = Self.connZone(size: 32 * 1024)
        var acquired: [[UInt8]] = [], full = 0
        for i in 0..<5_000 {
            let k = Self.key("client-\(i)")
            switch zone.acquire(k, limit: 1) {
            case .acquired: acquired.append(k)
            case .zoneFull: full += 1
            case .overLimit: Issue.record("a new key cannot be over its limit")
            }
            #expect(zone.keyCount <= 512)
        }
        #expect(zone.keyCount == 512, "5000 keys fill every shard")
        #expect(acquired.count == 512)
        #expect(full == 5_000 - 512)
        for k in acquired { zone.release(k) }
        #expect(zone.keyCount == 0)
        // After the releases, new keys fit again.
        var again = 0
        for i in 5_000..<10_000 where zone.acquire(Self.key("client-\(i)"), limit: 1) == .acquired { again += 1 }
        #expect(again == 512)
    }

    @Test func shardOfIsStableAndSpreads() {
        #expect(LimitConnZone.shard(of: Self.key("10.0.0.1")) == LimitConnZone.shard(of: Self.key("10.0.0.1")))
        var perShard = [Int](repeating: 0, count: 16)
        for i in 0..<16_000 { perShard[LimitConnZone.shard(of: Self.key("192.168.\(i / 256).\(i % 256)"))] += 1 }
        #expect(perShard.allSatisfy { $0 > 500 && $0 < 1_500 }, "\(perShard)")
    }

    // MARK: LimitConnZone: exact across threads

    final class Counter: Sendable {
        let value = Atomic<Int>(0)
        @discardableResult func add(_ n: Int = 1) -> Int { value.add(n, ordering: .relaxed).newValue }
        func raise(to candidate: Int) {
            var seen = value.load(ordering: .relaxed)
            while candidate > seen {
                let (exchanged, original) = value.compareExchange(expected: seen, desired: candidate, ordering: .relaxed)
                if exchanged { return }
                seen = original
            }
        }
        var load: Int { value.load(ordering: .relaxed) }
    }

    /// Threads that wait for one another at the start of each round (so that they really do
    /// collide, even on two cores); `arrive(round:)` returns once every thread reached `round`.
    final class Barrier: Sendable {
        let threads: Int
        private let arrived = Atomic<Int>(0)
        init(threads: Int) { self.threads = threads }
        func arrive(round: Int) {
            arrived.add(1, ordering: .sequentiallyConsistent)
            while arrived.load(ordering: .sequentiallyConsistent) < threads * (round + 1) { sched_yield() }
        }
    }

    /// Runs `body(thread)` on `count` real threads, started together; returns when all are done.
    static func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
        let start = Barrier(threads: count)
        let done = DispatchSemaphore(value: 0)
        for index in 0..<count {
            let thread = Thread {
                start.arrive(round: 0)
                body(index)
                done.signal()
            }
            thread.start()
        }
        for _ in 0..<count { done.wait() }
    }

    final class Tally: Sendable {
        let holders: [Counter]
        let maxHolders = Counter(), maxCount = Counter()
        let acquired = Counter(), overLimit = Counter(), zoneFull = Counter()
        init(keys: Int) { holders = (0..<keys).map { _ in Counter() } }
    }

    @Test func countsStayExactUnderEightThreads() {
        let zone = Self.connZone()
        // Three keys in three shards (three locks).
        let keys = [0, 5, 11].map { Self.keys(inShard: $0, count: 1, prefix: "shared-")[0] }
        let limit = 2, threads = 8, pairs = 10_000
        let tally = Tally(keys: keys.count)
        Self.onThreads(threads) { thread in
            for i in 0..<pairs {
                // Eight threads on three keys: at least three on one key at any moment.
                let index = (i / 64 + thread) % keys.count
                let k = keys[index]
                switch zone.acquire(k, limit: limit) {
                case .acquired:
                    tally.acquired.add()
                    // Every holder is counted: at most `limit` hold a key at once.
                    tally.maxHolders.raise(to: tally.holders[index].add())
                    if i % 8 == 0 { tally.maxCount.raise(to: zone.count(k)) }
                    tally.holders[index].add(-1)
                    zone.release(k)
                case .overLimit:
                    tally.overLimit.add()
                case .zoneFull:
                    tally.zoneFull.add()
                }
            }
        }
        let maxHolders = tally.maxHolders.load
        let maxCount = tally.maxCount.load
        #expect(maxHolders <= limit, "\(maxHolders) sessions held one key with limit \(limit)")
        #expect(maxHolders >= 1)
        #expect(maxCount <= limit, "the zone counted \(maxCount) for a key with limit \(limit)")
        #expect(tally.zoneFull.load == 0)
        #expect(tally.acquired.load + tally.overLimit.load == threads * pairs)
        for k in keys { #expect(zone.count(k) == 0) }
        #expect(zone.keyCount == 0, "every count returned to 0, so every key was removed")
    }

    @Test func heldSlotsAreNeverOvercommittedAcrossThreads() {
        // Eight threads grab and keep, key after key in the same order: each of 400 keys with
        // limit 3 must end with exactly 3 sessions, however the attempts interleaved.
        let zone = Self.connZone()
        let keys = (0..<400).map { Self.key("hot-\($0)") }
        let acquired = Counter(), full = Counter()
        Self.onThreads(8) { _ in
            for k in keys {
                for _ in 0..<2 {
                    switch zone.acquire(k, limit: 3) {
                    case .acquired: acquired.add()
                    case .zoneFull: full.add()
                    case .overLimit: break
                    }
                }
            }
        }
        #expect(full.load == 0)
        #expect(acquired.load == 3 * keys.count)
        let over = keys.filter { zone.count($0) != 3 }
        #expect(over.isEmpty, "\(over.count) keys do not hold exactly 3: \(over.prefix(5).map { zone.count($0) })")
        Self.onThreads(4) { thread in
            for (i, k) in keys.enumerated() where i % 4 == thread {
                for _ in 0..<3 { zone.release(k) }
            }
        }
        #expect(zone.keyCount == 0)
    }

    // MARK: LimitConnZone: "zone full" said once a second

    @Test func fullIsReportedOncePerSecond() {
        let zone = Self.connZone()
        #expect(zone.shouldReportFull(now: 1_000))
        #expect(!zone.shouldReportFull(now: 1_000))
        #expect(!zone.shouldReportFull(now: 1_000))
        #expect(zone.shouldReportFull(now: 1_001))
        #expect(!zone.shouldReportFull(now: 1_001))
        #expect(zone.shouldReportFull(now: 1_005))
        // Another zone keeps its own second.
        #expect(Self.connZone().shouldReportFull(now: 1_005))
    }

    @Test func fullIsReportedOnceASecondEvenFromManyThreads() {
        // Eight threads ask at about the same instant, second after second: each second is
        // reported once (the first to ask in a new second always reports, so any second said
        // twice shows in the total).
        let zone = Self.connZone()
        let rounds = 20_000, threads = 8
        let said = Counter()
        let barrier = Barrier(threads: threads)
        Self.onThreads(threads) { _ in
            for round in 0..<rounds {
                barrier.arrive(round: round)
                for _ in 0..<3 where zone.shouldReportFull(now: 1_000 + Int64(round)) { said.add() }
            }
        }
        #expect(said.load == rounds, "\(said.load - rounds) seconds were reported more than once")
    }

    // MARK: LimitRateZone: sessions

    @Test func fiveASecondBurstFive() {
        let zone = Self.rateZone(rate: 5, burst: 5)
        let a = Self.key("10.0.0.1")
        for i in 0..<5 { #expect(zone.admit(a, now: Self.t0), "admit #\(i + 1)") }
        #expect(!zone.admit(a, now: Self.t0), "the sixth at the same instant is refused")
        #expect(!zone.admit(a, now: Self.t0 + 199 * Self.millisecond))
        #expect(zone.admit(a, now: Self.t0 + 200 * Self.millisecond), "one more after 200 ms")
        #expect(!zone.admit(a, now: Self.t0 + 200 * Self.millisecond))
        // After a long idle: the burst again, no more.
        let later = Self.t0 + 3_600 * Self.second
        for _ in 0..<5 { #expect(zone.admit(a, now: later)) }
        #expect(!zone.admit(a, now: later))
    }

    @Test func rateKeysAreIndependent() {
        let zone = Self.rateZone(rate: 1, burst: 1)
        let a = Self.key("a"), b = Self.key("b")
        #expect(zone.admit(a, now: Self.t0))
        #expect(!zone.admit(a, now: Self.t0))
        #expect(zone.admit(b, now: Self.t0), "b has its own bucket")
        #expect(!zone.admit(b, now: Self.t0))
        #expect(zone.keyCount == 2)
        // The same key gets the same bucket.
        #expect(zone.bucket(for: a, now: Self.t0) === zone.bucket(for: a, now: Self.t0))
        #expect(zone.bucket(for: a, now: Self.t0) !== zone.bucket(for: b, now: Self.t0))
    }

    @Test func aNewKeysBucketStartsFullAtItsFirstSight() {
        let zone = Self.rateZone(rate: 2, burst: 3)
        // First seen late: it must not have accrued anything from before (nor be empty).
        let bucket = zone.bucket(for: Self.key("late"), now: Self.t0 + 1_000 * Self.second)
        #expect(bucket.tokens == 3)
    }

    @Test(arguments: [(32 * 1024, 256), (1 << 20, 8_192), (10 << 20, 81_920), (100, 16)])
    func rateCapacityIsSizeOver128(size: Int, capacity: Int) {
        #expect(Self.rateZone(size: size).capacity == capacity)
    }

    @Test func tenTimesCapacityOfKeysNeverGrowsPastIt() {
        let zone = Self.rateZone(size: 32 * 1024)  // 256 keys
        #expect(zone.capacity == 256)
        for i in 0..<2_560 {
            #expect(zone.admit(Self.key("flood-\(i)"), now: Self.t0 + UInt64(i)), "a new key starts full")
            if i % 64 == 0 { #expect(zone.keyCount <= 256) }
        }
        #expect(zone.keyCount == 256)
    }

    @Test func leastRecentlyUsedIsEvictedFirst() {
        let zone = Self.rateZone(rate: 1, burst: 1, size: 32 * 1024)  // 16 keys per shard
        let k = Self.keys(inShard: 9, count: 18)
        let t = Self.t0
        // Fill shard 9 with k0…k15, each drained: oldest k0, newest k15.
        for i in 0..<16 {
            #expect(zone.admit(k[i], now: t))
            #expect(!zone.admit(k[i], now: t))
        }
        #expect(zone.keyCount == 16)
        let k0Bucket = zone.bucket(for: k[0], now: t)  // k0 is now the most recently used
        // k16 needs room: k1 (now the least recently used) goes, not k0.
        #expect(zone.admit(k[16], now: t))
        #expect(zone.keyCount == 16)
        #expect(!zone.admit(k[0], now: t), "k0 was touched: still there, still empty")
        #expect(zone.bucket(for: k[0], now: t) === k0Bucket)
        #expect(zone.admit(k[1], now: t), "k1 was evicted: it comes back with a new, full bucket")
        // That re-entry evicted k2, the next oldest; k15 (recent) is untouched.
        #expect(!zone.admit(k[15], now: t))
        #expect(zone.admit(k[2], now: t), "k2 was evicted next")
        #expect(zone.keyCount == 16)
        // Other shards are not touched by any of this.
        let other = Self.keys(inShard: 10, count: 1)[0]
        #expect(zone.admit(other, now: t))
        #expect(zone.keyCount == 17)
    }

    @Test func touchingEveryKeyInTurnKeepsTheNewestOnes() {
        // A shard of 16 used round-robin by 17 keys evicts each key just before its turn;
        // used by 16 keys nothing is evicted.
        let zone = Self.rateZone(rate: 1, burst: 1, size: 32 * 1024)
        let k = Self.keys(inShard: 0, count: 16)
        let buckets = k.map { zone.bucket(for: $0, now: Self.t0) }
        for round in 0..<5 {
            for i in (0..<16).reversed() {
                #expect(zone.bucket(for: k[i], now: Self.t0) === buckets[i], "round \(round) key \(i)")
            }
        }
    }

    @Test func aSingleSlotShardEvictsOnEveryNewKey() {
        // size 100 → capacity 16 → one key per shard.
        let zone = Self.rateZone(rate: 1, burst: 1, size: 100)
        let k = Self.keys(inShard: 5, count: 3)
        #expect(zone.admit(k[0], now: Self.t0))
        #expect(!zone.admit(k[0], now: Self.t0))
        #expect(zone.admit(k[1], now: Self.t0))
        #expect(zone.admit(k[0], now: Self.t0), "k0 was evicted by k1")
        #expect(zone.admit(k[2], now: Self.t0))
        #expect(zone.keyCount == 1)
    }

    // MARK: LimitRateZone: bandwidth and SharedBucket

    @Test func bandwidthBucketIsSharedByAKeysConnections() {
        let zone = Self.rateZone(kind: .bandwidth, rate: 1_000, burst: 1_000)
        let k = Self.key("10.0.0.9")
        let first = zone.bucket(for: k, now: Self.t0)
        let second = zone.bucket(for: k, now: Self.t0)
        #expect(first === second)
        #expect(first.wait(now: Self.t0) == 0, "a full bucket: read now")
        #expect(second.wait(now: Self.t0) == 0, "asking again reserves nothing while there are tokens")
        first.spend(600, now: Self.t0)
        second.spend(600, now: Self.t0)
        #expect(first.tokens == -200)
        // The first to find it empty waits until there is a token again: (1 + 200) / 1000 s.
        #expect(second.wait(now: Self.t0, chunk: 100) == 201_000_000)
    }

    /// Connections of one key that find the bucket empty are given turns one read apart
    /// (a read's worth of time is chunk ÷ rate), rather than all waking at the same refill.
    @Test func anEmptySharedBucketHandsOutTurns() {
        let rate = 1_048_576.0, chunk = 16_384
        let bucket = SharedBucket(TokenBucket(rate: rate, burst: rate, now: Self.t0))
        bucket.spend(1_048_576 + chunk, now: Self.t0)  // one read into debt
        var alone = TokenBucket(rate: rate, burst: rate, now: Self.t0)
        alone.spend(1_048_576 + Double(chunk), now: Self.t0)
        let ready = alone.wait(now: Self.t0)  // when the bucket itself allows a read
        #expect(ready > 15_000_000 && ready < 16_000_000, "\(ready)")
        let turn = UInt64(Double(chunk) / rate * 1e9)  // 15.625 ms
        #expect(turn == 15_625_000)
        let waits = (0..<3).map { _ in bucket.wait(now: Self.t0, chunk: chunk) }
        #expect(waits == [ready, ready + turn, ready + 2 * turn])
        // Later, but before the last turn is over: after the turns already given out.
        #expect(bucket.wait(now: Self.t0 + ready, chunk: chunk) == 3 * turn)
        // Once every turn is over and the bucket has refilled, reads go ahead at once.
        let later = Self.t0 + ready + 10 * turn
        #expect(bucket.wait(now: later, chunk: chunk) == 0)
        #expect(bucket.wait(now: later, chunk: chunk) == 0)
    }

    @Test func sharedBucketLosesNoUpdatesAcrossFourThreads() {
        // No refill (the clock stands still): what is left is exactly what was not spent.
        let bucket = SharedBucket(TokenBucket(rate: 1_000, burst: 10_000_000, now: Self.t0))
        let reads = 50_000
        Self.onThreads(4) { thread in
            for i in 0..<reads { bucket.spend(1 + (i + thread) % 3, now: Self.t0) }
        }
        // 1, 2 or 3 bytes a read; what the four threads spent, summed exactly:
        var expected = 0
        for thread in 0..<4 { for i in 0..<reads { expected += 1 + (i + thread) % 3 } }
        #expect(bucket.tokens == Double(10_000_000 - expected), "\(Double(10_000_000 - expected) - bucket.tokens) bytes not accounted for")
    }

    @Test func sharedBucketTakesExactlyItsTokensAcrossThreads() {
        let bucket = SharedBucket(TokenBucket(rate: 1, burst: 200_000, now: Self.t0))
        let taken = Counter()
        Self.onThreads(4) { _ in
            for _ in 0..<100_000 where bucket.take(now: Self.t0) { taken.add() }
        }
        #expect(taken.load == 200_000)
        #expect(bucket.tokens == 0)
    }

    @Test func sharedBucketWithAMovingClockFromFourThreads() {
        // Spending with time moving forward on every thread: the total spent is what the
        // bucket accounts for, give or take floating-point dust.
        let rate = 1_000_000.0
        let bucket = SharedBucket(TokenBucket(rate: rate, burst: rate, now: Self.t0))
        let clock = Counter()
        let spent = Counter()
        Self.onThreads(4) { _ in
            for _ in 0..<5_000 {
                let now = Self.t0 + UInt64(clock.add(1_000))  // 1 µs a read
                bucket.spend(1, now: now)
                spent.add()
            }
        }
        // Final refill at the last time handed out: burst - spent + (refilled, capped).
        let end = Self.t0 + UInt64(clock.load)
        _ = bucket.wait(now: end)
        let tokens = bucket.tokens
        #expect(spent.load == 20_000)
        // 20 000 µs at 1e6/s = 20 000 tokens refilled, so a full bucket spending 1 per µs
        // stays near full: never below burst − 20 000, never above the burst.
        #expect(tokens <= rate)
        #expect(tokens >= rate - 20_000)
    }

    // MARK: AuditSampler

    static func json(_ text: String) throws -> [String: Any] {
        let object = try JSONSerialization.jsonObject(with: Data(text.utf8))
        return try #require(object as? [String: Any])
    }

    @Test func nLinesASecondPassAndTheRestAreSummarisedNextSecond() throws {
        var sampler = AuditSampler(linesPerSecond: 3)
        let base = 1_764_270_000.0
        func at(_ i: Int) -> Double { base + Double(i) * 0.09 }
        var written = 0
        for i in 0..<10 {
            let phase = i % 3 == 0 ? "access" : "limit_conn"
            let (write, summary) = sampler.admit(phase: phase, now: at(i))
            #expect(summary == nil, "no summary within the second")
            if write { written += 1 }
            #expect(write == (i < 3), "line \(i)")
        }
        #expect(written == 3)
        // Lines 3…9 were left out: i = 3, 6, 9 are "access", 4, 5, 7, 8 "limit_conn".
        let (write, summary) = sampler.admit(phase: "limit_rate", now: base + 1.25)
        #expect(write)
        let text = try #require(summary)
        #expect(!text.contains("\n"))
        let object = try Self.json(text)
        #expect(object["summary"] as? String == "audit lines suppressed")
        #expect(object["suppressed"] as? Int == 7)
        let byPhase = try #require(object["by_phase"] as? [String: Int])
        #expect(byPhase == ["access": 3, "limit_conn": 4])
        #expect(object["lines_per_second"] as? Int == 3)
        #expect(object["from"] as? String == TimeText.iso8601(at(3), milliseconds: true), "the first line left out")
        #expect(object["time"] as? String == TimeText.iso8601(at(9), milliseconds: true), "the last line left out")
        #expect(Set(object.keys) == ["time", "summary", "suppressed", "by_phase", "from", "lines_per_second"])
        // The new second has its own allowance of 3 (the line above was the first of them).
        let next = (0..<3).map { sampler.admit(phase: "access", now: base + 1.5 + Double($0) * 0.1) }
        #expect(next.map(\.write) == [true, true, false])
        #expect(next.allSatisfy { $0.summary == nil })
    }

    @Test func noSummaryWhenNothingWasSuppressed() {
        var sampler = AuditSampler(linesPerSecond: 2)
        #expect(sampler.takeSummary() == nil)
        let results = [100.1, 100.2, 101.0, 105.0].map { sampler.admit(phase: "access", now: $0) }
        #expect(results.map(\.write) == [true, true, true, true])
        #expect(results.allSatisfy { $0.summary == nil }, "exactly N lines a second: nothing suppressed, nothing to say")
        #expect(sampler.takeSummary() == nil)
    }

    @Test func aSummaryIsNotRepeated() throws {
        var sampler = AuditSampler(linesPerSecond: 1)
        let first = sampler.admit(phase: "access", now: 200.0)
        let second = sampler.admit(phase: "access", now: 200.5)
        #expect(first.write && !second.write)
        // Taken at close…
        let taken = sampler.takeSummary()
        let summary = try #require(taken)
        #expect(try Self.json(summary)["suppressed"] as? Int == 1)
        #expect(sampler.takeSummary() == nil, "taken once")
        // …so the next seconds do not say it again.
        let later = [201.0, 202.0].map { sampler.admit(phase: "access", now: $0) }
        #expect(later.map(\.write) == [true, true])
        #expect(later.allSatisfy { $0.summary == nil })
    }

    @Test func aSummaryAtANewSecondIsNotRepeatedAtTheNext() throws {
        var sampler = AuditSampler(linesPerSecond: 1)
        _ = sampler.admit(phase: "access", now: 500.0)
        _ = sampler.admit(phase: "access", now: 500.1)
        let atNewSecond = sampler.admit(phase: "access", now: 501.0)
        #expect(atNewSecond.summary != nil)
        let following = [501.5, 502.0, 503.0].map { sampler.admit(phase: "access", now: $0) }
        // 501.5 is over the allowance of 501 (suppressed), so 502 reports that one line only.
        #expect(following.map(\.write) == [false, true, true])
        #expect(following[0].summary == nil)
        let again = try Self.json(try #require(following[1].summary))
        #expect(again["suppressed"] as? Int == 1)
        #expect(following[2].summary == nil)
        #expect(sampler.takeSummary() == nil)
    }

    @Test func aFloodOverSeveralSecondsIsSummarisedPerSecond() throws {
        var sampler = AuditSampler(linesPerSecond: 1)
        for i in 0..<6 { _ = sampler.admit(phase: "limit_conn", now: 300.0 + Double(i) * 0.1) }  // 5 left out
        var summaries: [String] = []
        for i in 0..<3 {
            let result = sampler.admit(phase: "limit_rate", now: 301.0 + Double(i) * 0.1)  // 2 left out
            if let s = result.summary { summaries.append(s) }
        }
        let (_, last) = sampler.admit(phase: "access", now: 302.0)
        if let last { summaries.append(last) }
        try #require(summaries.count == 2)
        let first = try Self.json(summaries[0]), second = try Self.json(summaries[1])
        #expect(first["suppressed"] as? Int == 5)
        #expect(first["by_phase"] as? [String: Int] == ["limit_conn": 5])
        #expect(second["suppressed"] as? Int == 2)
        #expect(second["by_phase"] as? [String: Int] == ["limit_rate": 2], "the first second's counts are not carried over")
        #expect(second["from"] as? String == TimeText.iso8601(301.0 + 1 * 0.1, milliseconds: true))
    }

    @Test func aSummaryWithAnOddPhaseNameIsStillValidJSON() throws {
        var sampler = AuditSampler(linesPerSecond: 1)
        _ = sampler.admit(phase: "a", now: 400.0)
        _ = sampler.admit(phase: "we\"ird\\\n", now: 400.1)
        let taken = sampler.takeSummary()
        let summary = try #require(taken)
        #expect(!summary.contains("\n"))
        #expect(try Self.json(summary)["by_phase"] as? [String: Int] == ["we\"ird\\\n": 1])
    }
}
