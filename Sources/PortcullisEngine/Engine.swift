import Foundation
public import PortcullisCore
import PortcullisPolicy
import Synchronization

/// The relay engine for TCP and UDP (docs/decisions/0012-relay-engine.md): one epoll event
/// loop per thread, each with its own listening socket per TCP `listen` (and per `listen … udp
/// reuseport`), sessions driven by `SessionMachine` with no futures, channels or per-session
/// allocations beyond the session itself.
public final class Engine: Sendable {
    private let loops: [EventLoop]
    private let exited: [DispatchSemaphore]
    private let stopped = Atomic<Bool>(false)
    /// The loop the next single-socket listen goes to (they are spread over the loops).
    private let nextSingleSocketLoop = Atomic<Int>(0)

    /// Starts `loopCount` loop threads (at least one).
    public init(loopCount: Int) throws {
        // OpenSSL writes TLS sockets with write(2), not send(MSG_NOSIGNAL): a peer that reset
        // would kill the process with SIGPIPE. Ignored process-wide, as nginx does.
        signal(SIGPIPE, SIG_IGN)
        var loops: [EventLoop] = []
        for index in 0..<max(loopCount, 1) { loops.append(try EventLoop(index: index)) }
        self.loops = loops
        exited = loops.map { _ in DispatchSemaphore(value: 0) }
        for (loop, done) in zip(loops, exited) {
            let thread = Thread {
                loop.run()
                done.signal()
            }
            thread.name = "portcullis-loop-\(loop.index)"
            thread.start()
        }
    }

    /// Binds `box`'s listen and starts accepting (TCP: one socket per loop) or reading (UDP: one
    /// socket, or one per loop with `reuseport`). Returns the bound address. Throws
    /// `ListenError`, with nothing bound.
    public func bind(_ box: RuntimeBox) async throws -> SocketEndpoint {
        let listeners: [any LoopListener]
        if box.runtime.listen.udp {
            listeners = try UDPListener.bind(box, loops: loops.count)
        } else {
            listeners = try TCPListener.bind(box, loops: loops.count)
        }
        // A single socket (UDP without reuseport, any unix path) goes to the next loop in turn.
        var first = 0
        if listeners.count == 1 { first = nextSingleSocketLoop.wrappingAdd(1, ordering: .relaxed).oldValue % loops.count }
        for (index, listener) in listeners.enumerated() {
            let send = UncheckedBox(listener)
            await loops[(first + index) % loops.count].submit { loop in loop.addListener(send.value) }
        }
        return listeners[0].endpoint
    }

    /// Stops accepting on `box`'s listen and closes its sockets (a reload removed it). TCP
    /// sessions go on; a UDP listen's sessions end with it, as no datagram can reach them.
    public func unbind(_ box: RuntimeBox) async {
        for loop in loops { await loop.submit { $0.closeListeners(of: box) } }
    }

    /// Stops accepting on every listener (sessions go on).
    public func closeListeners() async {
        for loop in loops { await loop.submit { $0.closeListeners() } }
    }

    /// Closes every live session's client connection (the end of a drain); each then writes its
    /// record as any session does.
    public func closeAllSessions() async {
        for loop in loops {
            await loop.submit { loop in
                for session in loop.liveSessions { session.closeClient() }
            }
        }
    }

    /// Sessions whose `proxy_timeout` is watched, summed over the loops (0 once all ended).
    public func watchedSessions() async -> Int {
        var total = 0
        for loop in loops {
            total += await loop.submit { loop in loop.liveSessions.filter(\.isWatchingIdle).count }
        }
        return total
    }

    /// Stops the loops (what is still open is closed without a record) and waits for them.
    public func shutdown() async {
        // A second call must not wait for threads that are gone.
        guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for loop in loops { loop.execute { [loop] in loop.stop() } }
        for done in exited {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                DispatchQueue.global().async {
                    done.wait()
                    continuation.resume()
                }
            }
        }
    }
}

/// Hands a loop-confined object to its loop's thread through a `@Sendable` task.
struct UncheckedBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
