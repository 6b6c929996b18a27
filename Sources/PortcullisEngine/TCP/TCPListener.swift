import CPortcullisLinux
import Glibc
import Logging
import PortcullisCore
import PortcullisPolicy

/// One listening socket of one TCP `listen`, on one event loop.
///
/// Each loop has its own socket with `SO_REUSEPORT`, so the kernel spreads connections over the
/// loops and no accepted connection is handed from one thread to another
/// (docs/decisions/0009-listener-per-event-loop.md; `ListeningSocket`).
final class TCPListener: LoopListener {
    let fd: Int32
    let box: RuntimeBox
    /// The address it is bound to (the real port when the rule said 0).
    let endpoint: SocketEndpoint
    /// Bound to 0.0.0.0 or [::]: each connection's own local address is asked for.
    private let wildcard: Bool
    var slot: UInt32 = 0
    var paused = false
    /// TCP_NODELAY as set on the listening socket: accepted sockets inherit it (and the
    /// keepalive options), so a connection costs no setsockopt unless a reload changed it.
    private let inheritedNoDelay: Bool
    /// One for the whole process (monotonic ns): each listen has a socket per loop, and a
    /// per-socket limit let every one of them say it once a second (4 lines a second with 2
    /// listens on 2 loops).
    private static let descriptorComplaints = ReportThrottle(interval: 1_000_000_000)
    private static let acceptBatch = 64

    private init(fd: Int32, box: RuntimeBox, endpoint: SocketEndpoint) {
        self.fd = fd
        self.box = box
        self.endpoint = endpoint
        wildcard = endpoint.address == .v4(0) || endpoint.address == .v6(0)
        inheritedNoDelay = box.runtime.policy.proxy.tcpNoDelay
    }

    func close() {
        Glibc.close(fd)
        ListeningSocket.removeSocketFile(of: endpoint)
    }

    /// The sockets of `box`'s listen, one per loop when there are several loops (or
    /// `reuseport`). Throws `ListenError`, with nothing left open.
    static func bind(_ box: RuntimeBox, loops: Int) throws(ListenError) -> [TCPListener] {
        let listen = box.runtime.listen
        let tcpNoDelay = box.runtime.policy.proxy.tcpNoDelay
        let sockets = try ListeningSocket.open(listen, count: listen.reusePort || loops > 1 ? loops : 1,
                                               type: SOCK_STREAM) { fd throws(SystemCallError) in
            guard !listen.endpoint.isUnix else { return }  // no TCP options on a unix socket
            // Set here because accepted sockets inherit them.
            try Socket.setOption(fd, Int32(IPPROTO_TCP), TCP_NODELAY, tcpNoDelay ? 1 : 0)
            Socket.applyKeepalive(fd, listen.keepalive)
        }
        return sockets.map { TCPListener(fd: $0.fd, box: box, endpoint: $0.endpoint) }
    }

    /// Accepts what is waiting, up to a batch (the socket is level-triggered: the rest comes
    /// with the next wake-up, after the other sockets' events had their turn).
    func readable(on loop: EventLoop) {
        // One look at the runtime per batch: a reload's new rules apply from the next batch.
        let runtime = box.runtime
        for _ in 0..<Self.acceptBatch {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let client = withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { portcullis_accept4(fd, $0, &length) }
            }
            guard client >= 0 else {
                let error = errno
                switch error {
                case EAGAIN, EWOULDBLOCK: return
                case EINTR, ECONNABORTED, EPROTO: continue
                case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                    complainAboutDescriptors(error, runtime: runtime, now: loop.now)
                    loop.pauseAccepting(self)
                    return
                default:
                    runtime.errorLog.error("\(SystemCallError("accept4", errno: error)) on \(runtime.listen)")
                    return
                }
            }
            // (An unnamed unix client's address is the family alone, or nothing at all.)
            let peer = SocketEndpoint(storage, length: length)
                ?? (endpoint.isUnix ? SocketEndpoint(unixPath: "") : SocketEndpoint(address: .v4(0), port: 0))
            let local = wildcard ? (Socket.localEndpoint(client) ?? endpoint) : endpoint
            configure(client, runtime)
            TCPSession.start(fd: client, peer: peer, local: local, runtime: runtime, loop: loop)
        }
    }

    /// Per-connection socket options: TCP_NODELAY (`tcp_nodelay on` is nginx's default) and
    /// keepalive (`listen … so_keepalive=`) come from the listening socket; only a reloaded
    /// `tcp_nodelay` that differs from it costs a call here. (`so_keepalive=` belongs to the
    /// `listen` itself: a reload that changes it must open a new listening socket, issue #15.)
    private func configure(_ fd: Int32, _ runtime: ServerRuntime) {
        let noDelay = runtime.policy.proxy.tcpNoDelay
        if noDelay != inheritedNoDelay { try? Socket.setOption(fd, Int32(IPPROTO_TCP), TCP_NODELAY, noDelay ? 1 : 0) }
    }

    /// nginx's line (crit), at most once a second for the whole process, not once per refused
    /// accept nor once per listening socket.
    private func complainAboutDescriptors(_ error: Int32, runtime: ServerRuntime, now: UInt64) {
        guard Self.descriptorComplaints.allows(now: Int64(truncatingIfNeeded: now)) else { return }
        runtime.errorLog.critical("\(SystemCallError("accept4", errno: error)) on \(runtime.listen), accepting again in 100 ms")
    }
}
