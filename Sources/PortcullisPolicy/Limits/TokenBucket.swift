/// A token bucket with time passed in (nanoseconds of a monotonic clock), so its arithmetic is
/// tested under a manual clock. See docs/decisions/0007-limiter-state.md.
public struct TokenBucket: Sendable, Equatable {
    /// Tokens added per second.
    public let rate: Double
    /// The most tokens the bucket holds (what an idle key may spend at once).
    public let burst: Double
    public private(set) var tokens: Double
    private var last: UInt64

    /// Starts full.
    public init(rate: Double, burst: Double, now: UInt64) {
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now
    }

    /// Adds what accrued since the last call. A clock that does not move adds nothing; one
    /// that goes backwards is ignored (the bucket keeps its later time).
    public mutating func refill(now: UInt64) {
        guard now > last else { return }
        tokens = Swift.min(burst, tokens + Double(now - last) / 1e9 * rate)
        last = now
    }

    /// Takes `count` tokens if there are that many (an event: a new connection).
    public mutating func take(_ count: Double = 1, now: UInt64) -> Bool {
        refill(now: now)
        guard tokens >= count else { return false }
        tokens -= count
        return true
    }

    /// Spends `count` tokens even if that leaves a debt (bytes already read).
    public mutating func spend(_ count: Double, now: UInt64) {
        refill(now: now)
        tokens -= count
    }

    /// Nanoseconds until the bucket holds at least one token again; 0 if it does now.
    public mutating func wait(now: UInt64) -> UInt64 {
        refill(now: now)
        guard tokens < 1 else { return 0 }
        return UInt64(((1 - tokens) / rate * 1e9).rounded(.up))
    }
}

import Synchronization

/// A mutex-guarded value in a class, so that arrays of them can be built (a `Mutex` cannot be
/// copied into an array): the shards of a limit zone.
final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: sending Value) { mutex = Mutex(value) }
    func withLock<R>(_ body: (inout sending Value) throws -> sending R) rethrows -> sending R {
        try mutex.withLock(body)
    }
}
