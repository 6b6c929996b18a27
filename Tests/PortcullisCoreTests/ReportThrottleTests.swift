import Testing
import PortcullisCore

@Suite struct ReportThrottleTests {
    @Test("once per interval: the first ask, then nothing until the interval has passed since the last report; a clock read before it is never allowed")
    func oncePerInterval() {
        let throttle = ReportThrottle(interval: 1_000)
        #expect(throttle.allows(now: 5_000))
        #expect(!throttle.allows(now: 5_000))
        #expect(!throttle.allows(now: 5_999))
        #expect(!throttle.allows(now: 4_000), "another thread's older clock reading")
        #expect(throttle.allows(now: 6_000))
        #expect(!throttle.allows(now: 6_500))
        #expect(throttle.allows(now: 9_000_000))
    }

    @Test("a clock that starts at zero or below is still reported the first time")
    func firstAskAtAnyTime() {
        #expect(ReportThrottle(interval: 1).allows(now: 0))
        #expect(ReportThrottle(interval: 1).allows(now: .min + 1))
    }
}
