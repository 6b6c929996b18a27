import CPortcullisLinux
import Glibc
import PortcullisCore
import PortcullisPolicy
import Synchronization

/// What an epoll registration is for, in the low two bits of its `data`.
enum EventTag: UInt64 {
    case client = 0, upstream = 1, listener = 2, wake = 3
}

/// An epoll `data` word: generation (32 bits) | slot (24) | dial attempt (6) | tag (2). The
/// generation and attempt make an event for a socket closed earlier in the same batch (its slot
/// reused, or a retried dial's old socket) recognisable as stale.
struct EventToken: Equatable {
    var tag: EventTag
    var slot: UInt32
    var generation: UInt32 = 0
    var attempt: UInt8 = 0

    static let maximumSlots = 1 << 24

    var word: UInt64 {
        UInt64(generation) << 32 | UInt64(slot & 0xFF_FFFF) << 8 | UInt64(attempt & 0x3F) << 2 | tag.rawValue
    }

    init(tag: EventTag, slot: UInt32, generation: UInt32 = 0, attempt: UInt8 = 0) {
        self.tag = tag
        self.slot = slot
        self.generation = generation
        self.attempt = attempt & 0x3F
    }

    init(word: UInt64) {
        tag = EventTag(rawValue: word & 3)!
        attempt = UInt8(truncatingIfNeeded: word >> 2) & 0x3F
        slot = UInt32(truncatingIfNeeded: word >> 8) & 0xFF_FFFF
        generation = UInt32(truncatingIfNeeded: word >> 32)
    }
}

/// What a loop's slab holds: a TCP or a UDP session, reached from its sockets' events and its
/// timers.
protocol LoopSession: AnyObject {
    /// An event on one of its sockets (`attempt`: which dial's socket, for the upstream).
    func handle(_ flags: UInt32, side: SessionMachine.Side, attempt: UInt8)
    /// A deadline it scheduled came due.
    func timerFired(_ deadline: UInt64)
    /// The end of a drain: stop now (its record is written as for any end).
    func closeClient()
    /// The loop is stopping: close without a record.
    func abandon()
    /// Whether its `proxy_timeout` is being watched.
    var isWatchingIdle: Bool { get }
}

/// What a loop's listener table holds: a TCP or a UDP listening socket (level-triggered).
protocol LoopListener: AnyObject {
    var fd: Int32 { get }
    /// The address it is bound to (the real port when the rule said 0).
    var endpoint: SocketEndpoint { get }
    var slot: UInt32 { get set }
    /// The listen's current rules (a reload swaps what it holds).
    var box: RuntimeBox { get }
    /// The socket is readable: accept, or read datagrams, a batch.
    func readable(on loop: EventLoop)
    func close()
}

/// The live sessions of one loop, by slot: what an event's token points at. Freed slots are
/// reused (last freed first, so the slab stays as small as the peak of live sessions), each
/// reuse with the next generation.
struct SessionSlab {
    private(set) var sessions: [(any LoopSession)?] = []
    private var generations: [UInt32] = []
    private var free: [UInt32] = []
    private(set) var count = 0

    mutating func insert(_ session: any LoopSession) -> (slot: UInt32, generation: UInt32)? {
        let slot: UInt32
        if let reused = free.popLast() {
            slot = reused
            generations[Int(slot)] &+= 1
            sessions[Int(slot)] = session
        } else {
            guard sessions.count < EventToken.maximumSlots else { return nil }
            slot = UInt32(sessions.count)
            sessions.append(session)
            generations.append(1)
        }
        count += 1
        return (slot, generations[Int(slot)])
    }

    func session(slot: UInt32, generation: UInt32) -> (any LoopSession)? {
        let index = Int(slot)
        guard index < sessions.count, generations[index] == generation else { return nil }
        return sessions[index]
    }

    mutating func remove(slot: UInt32) {
        guard sessions[Int(slot)] != nil else { return }
        sessions[Int(slot)] = nil
        free.append(slot)
        count -= 1
    }
}

/// One thread, one epoll instance: its listening sockets (one `SO_REUSEPORT` socket per loop),
/// the sessions they accept, their upstream sockets, timers, and a task queue other threads
/// post to (woken through an eventfd). Everything but `execute` runs on the loop's thread.
final class EventLoop: @unchecked Sendable {
    let index: Int
    private let epoll: Int32
    private let wakeFD: Int32
    private let tasks = Mutex<[@Sendable () -> Void]>([])
    private let wakePending = Atomic<Bool>(false)
    private var stopping = false

    var slab = SessionSlab()
    var timers = TimerHeap()
    /// By slot; a listen a reload removed leaves a hole the next listener fills.
    private var listeners: [(any LoopListener)?] = []
    /// One-shot tasks at a deadline that are not a session's (a listener's once-a-second report).
    private var tasksAt: [(deadline: UInt64, run: () -> Void)] = []
    /// Sessions that stopped reading to let others have a turn (read cap, or one throttled read
    /// a turn); they read again after this turn's events.
    private var deferred: [TCPSession] = []
    /// A listener that ran out of descriptors sleeps until then (0: none).
    private var acceptResumeAt: UInt64 = 0
    /// The loop's clock, read once per wake-up: every event of a batch happens "now".
    private(set) var now: UInt64 = Clock.monotonic()

    /// Where reads land before they are written to the other side: one per loop, so a relayed
    /// connection holds no buffer of its own unless its reader is slow (`BufferPool`).
    let scratch: UnsafeMutableRawBufferPointer
    static let scratchSize = 256 * 1024
    var pool = BufferPool()
    /// Where UDP listeners' batch reads land: a 64 KiB slot per datagram of a batch (a slot
    /// must hold the largest datagram), made when the loop gets its first UDP listener. Only
    /// the pages datagrams land on are ever touched.
    private(set) lazy var datagramBuffer = DatagramBuffer()

    private static let batch = 256
    private var events: UnsafeMutablePointer<epoll_event>

    init(index: Int) throws(SystemCallError) {
        self.index = index
        epoll = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard epoll >= 0 else { throw SystemCallError("epoll_create1") }
        wakeFD = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        guard wakeFD >= 0 else {
            let error = SystemCallError("eventfd")
            Glibc.close(epoll)
            throw error
        }
        scratch = .allocate(byteCount: Self.scratchSize, alignment: 16)
        events = .allocate(capacity: Self.batch)
        var event = epoll_event()
        event.events = EPOLLIN.rawValue
        event.data.u64 = EventToken(tag: .wake, slot: 0).word
        epoll_ctl(epoll, EPOLL_CTL_ADD, wakeFD, &event)
    }

    deinit {
        Glibc.close(epoll)
        Glibc.close(wakeFD)
        scratch.deallocate()
        events.deallocate()
    }

    // MARK: From other threads

    /// Runs `task` on the loop's thread, soon.
    func execute(_ task: @escaping @Sendable () -> Void) {
        tasks.withLock { $0.append(task) }
        if !wakePending.exchange(true, ordering: .acquiringAndReleasing) {
            var one: UInt64 = 1
            _ = write(wakeFD, &one, 8)
        }
    }

    /// Runs `body` on the loop and returns its result.
    func submit<T: Sendable>(_ body: @escaping @Sendable (EventLoop) -> T) async -> T {
        await withCheckedContinuation { continuation in
            execute { [self] in continuation.resume(returning: body(self)) }
        }
    }

    // MARK: Registration

    /// Registers `fd` once for everything (edge-triggered): the engine keeps per-socket flags
    /// of what the last edge said, so no `epoll_ctl(MOD)` is ever needed for a session.
    func register(_ fd: Int32, _ token: EventToken) -> Bool {
        var event = epoll_event()
        event.events = EPOLLIN.rawValue | EPOLLOUT.rawValue | EPOLLRDHUP.rawValue | EPOLLET.rawValue
        event.data.u64 = token.word
        return epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event) == 0
    }

    /// A UDP session's upstream socket: level-triggered input only. Its replies are read a few
    /// at a time without the extra read that would find EAGAIN, and it is never written to
    /// through epoll (a full send buffer drops the datagram, as UDP does).
    func registerDatagramSocket(_ fd: Int32, _ token: EventToken) -> Bool {
        var event = epoll_event()
        event.events = EPOLLIN.rawValue
        event.data.u64 = token.word
        return epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event) == 0
    }

    /// Listening sockets are level-triggered: a batch of accepts or reads may stop before EAGAIN.
    func addListener(_ listener: any LoopListener) {
        let slot = UInt32(listeners.firstIndex { $0 == nil } ?? listeners.count)
        if slot == listeners.count { listeners.append(listener) } else { listeners[Int(slot)] = listener }
        listener.slot = slot
        watchListener(listener, reading: true, add: true)
    }

    private func watchListener(_ listener: any LoopListener, reading: Bool, add: Bool = false) {
        var event = epoll_event()
        event.events = reading ? EPOLLIN.rawValue : 0
        event.data.u64 = EventToken(tag: .listener, slot: listener.slot).word
        epoll_ctl(epoll, add ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, listener.fd, &event)
    }

    func closeListeners() {
        for listener in listeners { listener?.close() }
        listeners = []
    }

    /// Closes the sockets of `box`'s listen (a reload removed it); its TCP sessions go on.
    func closeListeners(of box: RuntimeBox) {
        for index in listeners.indices where listeners[index]?.box === box {
            listeners[index]?.close()
            listeners[index] = nil
        }
    }

    /// A listener out of descriptors (EMFILE) stops accepting for 100 ms instead of spinning on
    /// a level-triggered event it cannot clear.
    func pauseAccepting(_ listener: TCPListener) {
        watchListener(listener, reading: false)
        listener.paused = true
        acceptResumeAt = now + 100_000_000
    }

    // MARK: Sessions

    func schedule(_ entry: TimerHeap.Entry) { timers.push(entry) }

    func deferRead(_ session: TCPSession) { deferred.append(session) }

    /// Runs `task` on this loop once `deadline` has passed.
    func run(at deadline: UInt64, _ task: @escaping () -> Void) { tasksAt.append((deadline, task)) }

    var liveSessions: [any LoopSession] { slab.sessions.compactMap { $0 } }

    // MARK: The loop

    func run() {
        while !stopping {
            let count = epoll_wait(epoll, events, Int32(Self.batch), timeoutMilliseconds())
            now = Clock.monotonic()
            if count > 0 {
                for i in 0..<Int(count) {
                    let event = events[i]
                    dispatch(event.events, EventToken(word: event.data.u64))
                }
            }
            runTimers()
            runDeferred()
        }
        for session in liveSessions { session.abandon() }
        closeListeners()
    }

    func stop() { stopping = true }

    private func dispatch(_ flags: UInt32, _ token: EventToken) {
        switch token.tag {
        case .wake:
            var value: UInt64 = 0
            _ = read(wakeFD, &value, 8)
            wakePending.store(false, ordering: .releasing)
            let pending = tasks.withLock { tasks in
                defer { tasks = [] }
                return tasks
            }
            for task in pending { task() }
        case .listener:
            guard Int(token.slot) < listeners.count, let listener = listeners[Int(token.slot)] else { return }
            listener.readable(on: self)
        case .client, .upstream:
            guard let session = slab.session(slot: token.slot, generation: token.generation) else { return }
            session.handle(flags, side: token.tag == .client ? .client : .upstream, attempt: token.attempt)
        }
    }

    private func timeoutMilliseconds() -> Int32 {
        if !deferred.isEmpty || wakePending.load(ordering: .relaxed) { return 0 }
        var next = timers.earliest ?? 0
        if acceptResumeAt != 0 && (next == 0 || acceptResumeAt < next) { next = acceptResumeAt }
        for task in tasksAt where next == 0 || task.deadline < next { next = task.deadline }
        guard next != 0 else { return -1 }
        let current = Clock.monotonic()
        guard next > current else { return 0 }
        // Rounded up: waking before a deadline would only mean waiting again.
        return Int32(clamping: (next - current + 999_999) / 1_000_000)
    }

    private func runTimers() {
        while let entry = timers.popDue(now: now) {
            slab.session(slot: entry.slot, generation: entry.generation)?.timerFired(entry.deadline)
        }
        if acceptResumeAt != 0 && now >= acceptResumeAt {
            acceptResumeAt = 0
            for case let listener as TCPListener in listeners.compactMap({ $0 }) where listener.paused {
                listener.paused = false
                watchListener(listener, reading: true)
            }
        }
        if !tasksAt.isEmpty {
            let due = tasksAt.filter { $0.deadline <= now }
            tasksAt.removeAll { $0.deadline <= now }
            for task in due { task.run() }
        }
    }

    private func runDeferred() {
        guard !deferred.isEmpty else { return }
        let sessions = deferred
        deferred = []
        for session in sessions { session.resumeDeferred() }
    }
}

/// Buffers for bytes a slow reader has not taken yet (up to 16 of 256 KiB kept per loop): a session holds one only while its
/// writes are short, and gives it back when they drain. Kept per loop, bounded.
struct BufferPool {
    private var free: [[UInt8]] = []
    private static let kept = 16

    mutating func take() -> [UInt8] {
        if let buffer = free.popLast() { return buffer }
        var buffer: [UInt8] = []
        buffer.reserveCapacity(EventLoop.scratchSize)
        return buffer
    }

    mutating func giveBack(_ buffer: inout [UInt8]) {
        guard buffer.capacity > 0 else { return }
        var returned: [UInt8] = []
        swap(&returned, &buffer)
        guard free.count < Self.kept, returned.capacity <= 4 * EventLoop.scratchSize else { return }
        returned.removeAll(keepingCapacity: true)
        free.append(returned)
    }
}

/// One loop's room for a UDP batch read (`portcullis_receive_datagrams`): the slots and what
/// the kernel said about each datagram.
final class DatagramBuffer {
    static let count = Int(PORTCULLIS_DATAGRAM_BATCH)
    static let slot = 65_536
    let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: count * slot, alignment: 16)
    let datagrams = UnsafeMutablePointer<portcullis_datagram>.allocate(capacity: count)
    /// A session's batched sends: two parts (PROXY header, payload) per datagram at most.
    let vectors = UnsafeMutablePointer<iovec>.allocate(capacity: 2 * count)

    deinit {
        bytes.deallocate()
        datagrams.deallocate()
        vectors.deallocate()
    }

    /// The bytes of the `index`-th datagram of the last read.
    func payload(_ index: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: bytes[index * Self.slot ..< index * Self.slot + Int(datagrams[index].length)])
    }
}
