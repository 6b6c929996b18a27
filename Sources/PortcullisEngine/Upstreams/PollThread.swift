import CPortcullisLinux
import Foundation
import Glibc
import Synchronization

/// A background thread that sleeps in `poll(2)` on its own sockets and this wake-up eventfd,
/// and can be woken and stopped from any thread: what the health checks and the resolver run on.
final class PollThread: Sendable {
    /// Poll this (POLLIN) with the thread's own sockets; `wake()` makes it readable.
    let wakeup: Int32
    private let stopped = Atomic<Bool>(false)
    private let started = Atomic<Bool>(false)
    private let finished = Atomic<Bool>(false)

    init() { wakeup = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC)) }

    var isStopped: Bool { stopped.load(ordering: .relaxed) }

    func start(name: String, _ body: @escaping @Sendable () -> Void) {
        started.store(true, ordering: .relaxed)
        let thread = Thread { [self] in
            body()
            finished.store(true, ordering: .releasing)
        }
        thread.name = name
        thread.start()
    }

    func wake() {
        var one: UInt64 = 1
        _ = write(wakeup, &one, 8)
    }

    /// Takes the wake-ups so far (after a poll said the eventfd is readable).
    func clearWakeups() {
        var count: UInt64 = 0
        _ = read(wakeup, &count, 8)
    }

    /// Asks the thread to end (its loop reads `isStopped`), waits for it, closes the eventfd.
    /// Once; a thread never started is not waited for.
    func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        wake()
        if started.load(ordering: .relaxed) {
            while !finished.load(ordering: .acquiring) { usleep(1_000) }
        }
        Glibc.close(wakeup)
    }
}
