import Synchronization

/// "At most once per interval", shared by every thread that might say the same thing: the
/// first to ask after the interval has passed gets `true`, everyone else `false`. For error
/// lines that a flood would otherwise repeat thousands of times a second (a full
/// `limit_conn` zone, a process out of descriptors).
public final class ReportThrottle: Sendable {
    private let interval: Int64
    /// When the last report was allowed, in the caller's clock; .min: never.
    private let last = Atomic<Int64>(.min)

    /// `interval` in the units of the `now` the caller will pass (seconds, nanoseconds…).
    public init(interval: Int64) { self.interval = interval }

    /// Whether to report now. A `now` before the last report (threads reading a clock at
    /// slightly different moments) is never allowed.
    public func allows(now: Int64) -> Bool {
        let previous = last.load(ordering: .relaxed)
        guard previous == .min || now &- previous >= interval else { return false }
        return last.compareExchange(expected: previous, desired: now, ordering: .relaxed).exchanged
    }
}
