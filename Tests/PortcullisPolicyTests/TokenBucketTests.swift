import Testing
@testable import PortcullisPolicy

/// `TokenBucket` under a manual clock: every time below is nanoseconds passed in by the test.
@Suite struct TokenBucketTests {
    static let second: UInt64 = 1_000_000_000
    static let millisecond: UInt64 = 1_000_000
    /// An arbitrary, non-zero start, so no test depends on the clock starting at 0.
    static let t0: UInt64 = 5_000 * second + 123_456_789

    /// Empties the bucket at `now` (whatever its burst), leaving exactly 0 tokens.
    static func drained(rate: Double, burst: Double, now: UInt64 = t0) -> TokenBucket {
        var bucket = TokenBucket(rate: rate, burst: burst, now: now)
        bucket.spend(burst, now: now)
        #expect(bucket.tokens == 0)
        return bucket
    }

    // MARK: Starting state

    @Test func startsFullAndTakesExactlyBurstAtOneInstant() {
        var bucket = TokenBucket(rate: 10, burst: 5, now: Self.t0)
        #expect(bucket.tokens == 5)
        #expect(bucket.rate == 10)
        #expect(bucket.burst == 5)
        for i in 0..<5 { let took1 = bucket.take(now: Self.t0); #expect(took1, "take #\(i + 1) of a full bucket of 5") }
        let took2 = bucket.take(now: Self.t0)
        #expect(!took2, "a sixth take at the same instant must be refused")
        #expect(bucket.tokens == 0)
    }

    @Test func fractionalBurstStartsAtThatFraction() {
        var bucket = TokenBucket(rate: 1, burst: 0.5, now: Self.t0)
        #expect(bucket.tokens == 0.5)
        let took3 = bucket.take(now: Self.t0)
        #expect(!took3)
        #expect(bucket.tokens == 0.5, "a refused take must not change the tokens")
    }

    // MARK: Refill at fractional rates

    @Test func halfATokenPerSecond() {
        var bucket = Self.drained(rate: 0.5, burst: 1)
        let took4 = bucket.take(now: Self.t0 + Self.second)
        #expect(!took4, "after 1 s at 0.5/s there is only half a token")
        #expect(bucket.tokens == 0.5)
        let took5 = bucket.take(now: Self.t0 + 2 * Self.second - Self.millisecond)
        #expect(!took5)
        let took6 = bucket.take(now: Self.t0 + 2 * Self.second)
        #expect(took6, "after 2 s at 0.5/s there is one token")
        #expect(abs(bucket.tokens) < 1e-12)
    }

    @Test func oneTokenAMinute() {
        // 1r/m: the compiler makes rate 1/60.
        var bucket = Self.drained(rate: 1.0 / 60, burst: 1)
        let took7 = bucket.take(now: Self.t0 + 30 * Self.second)
        #expect(!took7)
        #expect(abs(bucket.tokens - 0.5) < 1e-12, "\(bucket.tokens)")
        let took8 = bucket.take(now: Self.t0 + 59 * Self.second)
        #expect(!took8)
        #expect(abs(bucket.tokens - 59.0 / 60) < 1e-12, "\(bucket.tokens)")
        let took9 = bucket.take(now: Self.t0 + 60 * Self.second)
        #expect(took9, "one token after a minute at 1r/m")
        let took10 = bucket.take(now: Self.t0 + 61 * Self.second)
        #expect(!took10)
    }

    @Test func hundredPerMinute() {
        // 100r/m = 1.666…/s: one token every 600 ms.
        var bucket = Self.drained(rate: 100.0 / 60, burst: 2)
        let took11 = bucket.take(now: Self.t0 + 599 * Self.millisecond)
        #expect(!took11)
        let took12 = bucket.take(now: Self.t0 + 601 * Self.millisecond)
        #expect(took12)
        let took13 = bucket.take(now: Self.t0 + 1_199 * Self.millisecond)
        #expect(!took13)
        let took14 = bucket.take(now: Self.t0 + 1_201 * Self.millisecond)
        #expect(took14)
    }

    @Test func onePointFiveMegabytesPerSecond() {
        let rate = 1.5 * 1_048_576  // 1572864 B/s
        var bucket = Self.drained(rate: rate, burst: rate)
        bucket.refill(now: Self.t0 + 100 * Self.millisecond)
        #expect(abs(bucket.tokens - 157_286.4) < 1e-6, "\(bucket.tokens)")
        bucket.refill(now: Self.t0 + 500 * Self.millisecond)
        #expect(abs(bucket.tokens - 786_432) < 1e-6, "\(bucket.tokens)")
        bucket.refill(now: Self.t0 + 1 * Self.second + 1)
        #expect(bucket.tokens == rate, "a full second refills to the burst and no further")
    }

    // MARK: Burst cap

    @Test(arguments: [
        3_600 * TokenBucketTests.second,       // an hour
        31_536_000 * TokenBucketTests.second,  // a year
        UInt64.max - TokenBucketTests.t0,      // the rest of the clock
    ])
    func longIdleRefillsToBurstAndNoFurther(idle: UInt64) {
        var bucket = Self.drained(rate: 1_000, burst: 7)
        bucket.spend(1_000_000, now: Self.t0)  // a deep debt
        bucket.refill(now: Self.t0 + idle)
        #expect(bucket.tokens == 7)
        #expect(bucket.tokens.isFinite)
        for _ in 0..<7 { let took15 = bucket.take(now: Self.t0 + idle); #expect(took15) }
        let took16 = bucket.take(now: Self.t0 + idle)
        #expect(!took16)
    }

    @Test func hugeRateStaysCapped() {
        // 1g/s for a year: the product is ~3e25 and must still come out as the burst.
        var bucket = Self.drained(rate: Double(1 << 30), burst: 4_096)
        bucket.refill(now: Self.t0 + 31_536_000 * Self.second)
        #expect(bucket.tokens == 4_096)
    }

    // MARK: Clocks that do not move, or move backwards

    @Test func clockNotMovingAddsNothing() {
        var bucket = Self.drained(rate: 1_000_000, burst: 10)
        for _ in 0..<1_000 { bucket.refill(now: Self.t0) }
        #expect(bucket.tokens == 0)
        let took17 = bucket.take(now: Self.t0)
        #expect(!took17)
        bucket.spend(3, now: Self.t0)
        bucket.refill(now: Self.t0)
        #expect(bucket.tokens == -3)
    }

    @Test func clockGoingBackwardsAddsNothingAndKeepsTheLaterTime() {
        // rate 10/s, burst 100: far from the cap, so a wrong "last" time shows.
        var bucket = Self.drained(rate: 10, burst: 100, now: Self.t0 + 10 * Self.second)
        bucket.refill(now: Self.t0 + 5 * Self.second)  // 5 s into the past
        #expect(bucket.tokens == 0)
        let tookInThePast = bucket.take(now: Self.t0)  // and further still
        #expect(!tookInThePast)
        #expect(bucket.tokens == 0)
        bucket.spend(1, now: Self.t0 + 1)  // a spend with a past clock still spends
        #expect(bucket.tokens == -1)
        // 0.5 s after the latest time seen: 5 tokens accrue, counted from t0+10s (not from
        // t0+5s, which would give 55, nor from t0, which would give 100).
        bucket.refill(now: Self.t0 + 10_500 * Self.millisecond)
        #expect(abs(bucket.tokens - 4) < 1e-9, "\(bucket.tokens)")
        // And refills carry on normally afterwards.
        bucket.refill(now: Self.t0 + 11 * Self.second)
        #expect(abs(bucket.tokens - 9) < 1e-9, "\(bucket.tokens)")
    }

    @Test func backwardsThenForwardEqualsForward() {
        var a = Self.drained(rate: 7, burst: 50)
        var b = a
        a.refill(now: Self.t0 + 2 * Self.second)
        a.refill(now: Self.t0 + 1 * Self.second)  // backwards: ignored
        a.refill(now: Self.t0 + 3 * Self.second)
        b.refill(now: Self.t0 + 3 * Self.second)
        #expect(abs(a.tokens - b.tokens) < 1e-9)
        #expect(abs(a.tokens - 21) < 1e-9)
    }

    // MARK: take, spend, wait

    @Test func takeOnlyWhenThereAreEnough() {
        var bucket = TokenBucket(rate: 1, burst: 2.5, now: Self.t0)
        let took18 = bucket.take(3, now: Self.t0)
        #expect(!took18)
        #expect(bucket.tokens == 2.5, "a refused take leaves the tokens alone")
        let took19 = bucket.take(2.5, now: Self.t0)
        #expect(took19, "exactly enough is enough")
        #expect(bucket.tokens == 0)
        let took20 = bucket.take(now: Self.t0)
        #expect(!took20)
        #expect(bucket.tokens == 0, "take never goes into debt")
        let took21 = bucket.take(now: Self.t0 + 999 * Self.millisecond)
        #expect(!took21)
        let took22 = bucket.take(now: Self.t0 + Self.second)
        #expect(took22)
    }

    @Test func spendAllowsADebtAndWaitMeasuresIt() {
        var bucket = TokenBucket(rate: 1_000, burst: 1_000, now: Self.t0)
        let wait23 = bucket.wait(now: Self.t0)
        #expect(wait23 == 0, "a full bucket: no wait")
        bucket.spend(3_000, now: Self.t0)
        #expect(bucket.tokens == -2_000)
        // (1 - (-2000)) / 1000 s = 2.001 s.
        let wait24 = bucket.wait(now: Self.t0)
        #expect(wait24 == 2_001_000_000)
        let took25 = bucket.take(now: Self.t0 + Self.second)
        #expect(!took25, "still in debt after 1 s")
        let wait26 = bucket.wait(now: Self.t0 + Self.second)
        #expect(wait26 == 1_001_000_000)
        // At exactly 2.001 s the refill comes to 2000.9999999999998 (2.001 is not exact in
        // binary), so the bucket may still ask for one more nanosecond: no more than that.
        let wait27 = bucket.wait(now: Self.t0 + 2_001 * Self.millisecond)
        #expect(wait27 <= 1)
        let took28 = bucket.take(now: Self.t0 + 2_001 * Self.millisecond + 1)
        #expect(took28)
        let tookAgain = bucket.take(now: Self.t0 + 2_001 * Self.millisecond + 1)
        #expect(!tookAgain, "one token, taken once")
    }

    /// `wait` is ⌈(1 − tokens) ÷ rate⌉ in nanoseconds, checked on values worked out by hand.
    @Test(arguments: [
        // (rate, tokens left after spending from a full bucket, expected nanoseconds)
        (3.0, 0.0, UInt64(333_333_334)),              // 1/3 s, rounded up
        (1.0, 0.0, UInt64(1_000_000_000)),
        (0.5, 0.5, UInt64(1_000_000_000)),            // half a token at 0.5/s: 1 s
        (1.0 / 60, 0.0, UInt64(60_000_000_000)),       // 1r/m
        (1_048_576.0, -1_048_575.0, UInt64(1_000_000_000)),  // 1m/s, a buffer's debt
        (1_000.0, 0.75, UInt64(250_000)),
        (8.0, -1.0, UInt64(250_000_000)),
    ])
    func waitMatchesTheFormula(rate: Double, tokens: Double, expected: UInt64) {
        var bucket = TokenBucket(rate: rate, burst: max(1, rate), now: Self.t0)
        bucket.spend(bucket.burst - tokens, now: Self.t0)
        #expect(abs(bucket.tokens - tokens) < 1e-9)
        let wait = bucket.wait(now: Self.t0)
        // Within a nanosecond of the exact figure (the division is in floating point)…
        #expect(wait + 1 >= expected && wait <= expected + 1, "wait \(wait), expected \(expected)")
        // …and it is the formula, rounded up.
        #expect(wait == UInt64(((1 - bucket.tokens) / rate * 1e9).rounded(.up)))
        // Sooner than that there is not a whole token yet.
        var early = bucket
        let took29 = early.take(now: Self.t0 + wait - min(wait, 2))
        #expect(!took29)
    }

    /// Once the wait is over, a token is there: a reader that sleeps for `wait` and retries
    /// must go ahead, not be told to wait again (for all but floating-point dust).
    @Test func afterTheWaitThereIsAToken() {
        let rates: [Double] = [0.5, 1.0 / 60, 100.0 / 60, 3, 7, 1_000, 1.5 * 1_048_576, 524_288, 12_345.678]
        let debts: [Double] = [0, 0.3, 1, 2.5, 16_384, 65_536, 1_234.567]
        for rate in rates {
            for debt in debts {
                var bucket = TokenBucket(rate: rate, burst: max(1, rate), now: Self.t0)
                bucket.spend(bucket.burst + debt, now: Self.t0)
                let wait = bucket.wait(now: Self.t0)
                #expect(wait > 0)
                var later = bucket
                let again = later.wait(now: Self.t0 + wait)
                #expect(again <= 1, "rate \(rate) debt \(debt): waited \(wait) ns, then told to wait \(again) ns more")
                #expect(later.tokens > 1 - 1e-6, "rate \(rate) debt \(debt): \(later.tokens) tokens after the wait")
            }
        }
    }

    @Test func manySmallStepsEqualOneBigStep() {
        let rate = 1_234.5
        var stepped = Self.drained(rate: rate, burst: 1e12)
        var jumped = stepped
        var now = Self.t0
        for _ in 0..<10_000 {
            now += 100_007  // ~0.1 ms, not a round number
            stepped.refill(now: now)
        }
        jumped.refill(now: now)
        let expected = Double(now - Self.t0) / 1e9 * rate
        #expect(abs(jumped.tokens - expected) < 1e-9 * expected)
        #expect(abs(stepped.tokens - jumped.tokens) < 1e-9 * expected, "\(stepped.tokens) vs \(jumped.tokens)")
    }

    @Test func nanosecondStepsAreNotLost() {
        // One nanosecond at a time at 1 token/s: each step adds 1e-9, which must not round away.
        var stepped = Self.drained(rate: 1, burst: 10)
        var now = Self.t0
        for _ in 0..<100_000 {
            now += 1
            stepped.refill(now: now)
        }
        #expect(abs(stepped.tokens - 1e-4) < 1e-12, "\(stepped.tokens)")
    }

    /// A reader that does what the relay does — ask `wait`, sleep that long, then read one
    /// buffer and `spend` it — gets the burst plus the rate over the time, and no more.
    @Test func aThrottledReaderGetsTheRate() {
        let rate = 1_000.0, buffer = 100.0
        var bucket = TokenBucket(rate: rate, burst: rate, now: Self.t0)
        var now = Self.t0
        var read = 0.0
        let end = Self.t0 + 10 * Self.second
        while now < end {
            let wait = bucket.wait(now: now)
            if wait > 0 { now += wait; continue }
            bucket.spend(buffer, now: now)
            read += buffer
        }
        // 1000 (the burst) + 10 s × 1000/s, give or take one buffer.
        #expect(abs(read - 11_000) <= buffer, "\(read) bytes in 10 s")
    }

    @Test func equatableComparesState() {
        let a = TokenBucket(rate: 1, burst: 2, now: Self.t0)
        var b = a
        #expect(a == b)
        b.spend(1, now: Self.t0)
        #expect(a != b)
    }
}
