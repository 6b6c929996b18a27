import CPortcullisLinux
import Glibc
import Logging
import PortcullisCore
import PortcullisPolicy

/// One listening socket of one TCP `listen`, on one event loop.
///
/// Each loop has its own socket with `SO_REUSEPORT`, so the kernel spreads connections over the
/// loops and no accepted connection is handed from one thread to another
/// (docs/decisions/0009-listener-per-event-loop.md). nginx does this only with `reuseport`;
/// without it, `bind` first binds a plain socket to the address and closes it, so an address
/// already in use (by another program, or a wildcard `listen` of this one) is still an error.
final class TCPListener {
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
    private var lastDescriptorComplaint: UInt64 = 0
    private static let acceptBatch = 64

    private init(fd: Int32, box: RuntimeBox, endpoint: SocketEndpoint) {
        self.fd = fd
        self.box = box
        self.endpoint = endpoint
        wildcard = endpoint.address == .v4(0) || endpoint.address == .v6(0)
        inheritedNoDelay = box.runtime.policy.proxy.tcpNoDelay
    }

    func close() { Glibc.close(fd) }

    /// The sockets of `box`'s listen, one per loop when there are several loops (or
    /// `reuseport`). Throws `ListenError`, with nothing left open.
    static func bind(_ box: RuntimeBox, loops: Int) throws(ListenError) -> [TCPListener] {
        let listen = box.runtime.listen
        let perLoop = listen.reusePort || loops > 1
        var opened: [TCPListener] = []
        do throws(SystemCallError) {
            if perLoop && !listen.reusePort { try probe(listen) }
            var endpoint = listen.endpoint
            for _ in 0..<(perLoop ? loops : 1) {
                let fd = try open(endpoint, listen: listen, reusePort: perLoop,
                                  tcpNoDelay: box.runtime.policy.proxy.tcpNoDelay)
                // Port 0: the other loops' sockets join the port the kernel picked for the first.
                if endpoint.port == 0, let bound = Socket.localEndpoint(fd) { endpoint = bound }
                opened.append(TCPListener(fd: fd, box: box, endpoint: endpoint))
            }
        } catch {
            for listener in opened { listener.close() }
            throw ListenError(listen: listen, errno: error.errno)
        }
        return opened
    }

    /// A socket bound to `endpoint` with the listen's options; listening unless `probe`.
    /// TCP_NODELAY and keepalive are set here because accepted sockets inherit them.
    private static func open(_ endpoint: SocketEndpoint, listen: ListenSpec, reusePort: Bool, tcpNoDelay: Bool,
                             probe: Bool = false) throws(SystemCallError) -> Int32 {
        let fd = socket(endpoint.family, Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemCallError("socket") }
        do throws(SystemCallError) {
            try Socket.setOption(fd, SOL_SOCKET, SO_REUSEADDR, 1)
            if reusePort { try Socket.setOption(fd, SOL_SOCKET, SO_REUSEPORT, 1) }
            if case .v6 = endpoint.address {
                try Socket.setOption(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, listen.ipv6Only ? 1 : 0)
            }
            if !probe {
                try Socket.setOption(fd, Int32(IPPROTO_TCP), TCP_NODELAY, tcpNoDelay ? 1 : 0)
                Socket.applyKeepalive(fd, listen.keepalive)
            }
            guard endpoint.withSockAddr({ Glibc.bind(fd, $0, $1) }) == 0 else { throw SystemCallError("bind") }
            if !probe {
                guard Glibc.listen(fd, Int32(clamping: listen.backlog)) == 0 else { throw SystemCallError("listen") }
            }
        } catch {
            Glibc.close(fd)
            throw error
        }
        return fd
    }

    /// Binds and closes a plain socket (no `SO_REUSEPORT`) on the listen address: fails with
    /// EADDRINUSE if anything listens there, as the single socket nginx opens would.
    private static func probe(_ listen: ListenSpec) throws(SystemCallError) {
        Glibc.close(try open(listen.endpoint, listen: listen, reusePort: false, tcpNoDelay: false, probe: true))
    }

    /// Accepts what is waiting, up to a batch (the socket is level-triggered: the rest comes
    /// with the next wake-up, after the other sockets' events had their turn).
    func acceptBatch(on loop: EventLoop) {
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
            let peer = SocketEndpoint(storage) ?? SocketEndpoint(address: .v4(0), port: 0)
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

    /// nginx's line (crit), at most once a second, not once per refused accept.
    private func complainAboutDescriptors(_ error: Int32, runtime: ServerRuntime, now: UInt64) {
        guard lastDescriptorComplaint == 0 || now &- lastDescriptorComplaint >= 1_000_000_000 else { return }
        lastDescriptorComplaint = now
        runtime.errorLog.critical("\(SystemCallError("accept4", errno: error)) on \(runtime.listen), accepting again in 100 ms")
    }
}
