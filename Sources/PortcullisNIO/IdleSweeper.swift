import NIOCore
import NIOPosix

/// A session whose `proxy_timeout` an `IdleSweeper` watches.
protocol IdleWatched: AnyObject {
    /// Whether the session has been idle for its timeout.
    func isIdle(now: NIODeadline) -> Bool
    /// Ends the session if it has been idle for its timeout; called on its event loop.
    func checkIdle(now: NIODeadline)
}

/// `proxy_timeout` for long timeouts (nginx's default is 10 minutes): one pass a second over
/// the event loop's sessions instead of one SwiftNIO scheduled task per session.
///
/// A scheduled task costs three allocations and about 210 bytes per session, and cancelling
/// one is a linear search through every task of the loop (SwiftNIO's timer heap): with 9,000
/// idle connections held, new connections a second dropped by 4 %. Here a session costs one
/// dictionary slot, and its end removes it in O(1). The price is precision: a session ends up
/// to a second after its timeout, so only timeouts of `minimumTimeout` or more are swept;
/// shorter ones keep a scheduled task.
public final class IdleSweeper {
    static let minimumTimeout = TimeAmount.seconds(10)
    private static let interval = TimeAmount.seconds(1)
    /// One sweeper per event loop thread, made on first use. (Each thread sees only its own
    /// value, which is what makes the shared variable safe.)
    nonisolated(unsafe) private static let current = ThreadSpecificVariable<IdleSweeper>()

    private var watched: [ObjectIdentifier: any IdleWatched] = [:]
    private var scheduled = false
    private let eventLoop: any EventLoop

    private init(eventLoop: any EventLoop) { self.eventLoop = eventLoop }

    /// The sweeper of `eventLoop`; call on that loop.
    static func on(_ eventLoop: any EventLoop) -> IdleSweeper {
        if let sweeper = current.currentValue { return sweeper }
        let sweeper = IdleSweeper(eventLoop: eventLoop)
        current.currentValue = sweeper
        return sweeper
    }

    /// (Keyed by the session object: connection numbers repeat across gateways in one process.)
    func watch(_ session: any IdleWatched) {
        watched[ObjectIdentifier(session)] = session
        if !scheduled { scheduleSweep() }
    }

    /// The next pass in a second; none while nothing is watched, so an idle gateway sleeps.
    private func scheduleSweep() {
        scheduled = true
        eventLoop.assumeIsolated().scheduleTask(in: Self.interval) { [self] in
            scheduled = false
            guard !watched.isEmpty else { return }
            // Ending a session unwatches it, so first find the idle ones, then end them.
            let now = NIODeadline.now()
            let idle = watched.values.filter { $0.isIdle(now: now) }
            for session in idle { session.checkIdle(now: now) }
            if !watched.isEmpty { scheduleSweep() }
        }
    }

    /// Sessions watched on each of `group`'s event loops, summed (for tests and diagnostics: a
    /// session that ended must not stay here).
    public static func watchedCount(in group: MultiThreadedEventLoopGroup) async -> Int {
        var total = 0
        for loop in group.makeIterator() {
            total += (try? await loop.submit { current.currentValue?.watched.count ?? 0 }.get()) ?? 0
        }
        return total
    }

    func unwatch(_ session: any IdleWatched) {
        watched.removeValue(forKey: ObjectIdentifier(session))
    }
}

/// One session's `proxy_timeout`, in whichever form suits its length (decision 0010): the event
/// loop's sweep from `IdleSweeper.minimumTimeout` up, a scheduled task below. The session keeps
/// its last activity and says what ending means (`checkIdle`); this keeps the watching.
struct IdleTimeout {
    let timeout: TimeAmount
    private var task: Scheduled<Void>?
    private var swept = false

    init(milliseconds: Int) { timeout = .milliseconds(Int64(milliseconds)) }

    func isIdle(since lastActivity: NIODeadline, now: NIODeadline) -> Bool { now - lastActivity >= timeout }

    /// Starts watching `session`, or — a scheduled task that fired before the session was idle
    /// long enough — waits again from its last activity. (Swept sessions stay watched.)
    mutating func arm(_ session: any IdleWatched, on eventLoop: any EventLoop, lastActivity: NIODeadline) {
        guard timeout < IdleSweeper.minimumTimeout else {
            if !swept { IdleSweeper.on(eventLoop).watch(session) }
            swept = true
            return
        }
        task = eventLoop.assumeIsolated().scheduleTask(deadline: lastActivity + timeout) {
            session.checkIdle(now: .now())
        }
    }

    /// No more watching: the session timed out or ended.
    mutating func stop(_ session: any IdleWatched, on eventLoop: any EventLoop) {
        task?.cancel()
        task = nil
        if swept { IdleSweeper.on(eventLoop).unwatch(session) }
        swept = false
    }
}
