import Glibc
import PortcullisCore
import PortcullisPolicy

/// The listening sockets of one `listen`, TCP or UDP: bound with the listen's options, one per
/// event loop when asked for (`SO_REUSEPORT`, docs/decisions/0009-listener-per-event-loop.md).
/// A `listen unix:PATH` is always one socket (a path cannot be bound twice), on one loop.
enum ListeningSocket {
    /// `count` sockets on the listen's address (`SO_REUSEPORT` when more than one, or with
    /// `reuseport`); `configure` sets what the kind of socket needs before it is bound. TCP
    /// sockets are listening when this returns. Throws `ListenError`, with nothing left open.
    ///
    /// Several sockets without `reuseport`: a plain socket is bound to the address and closed
    /// first, so an address already in use (by another program, or a wildcard `listen` of this
    /// one) is still an error, as the single socket nginx opens would be.
    static func open(_ listen: ListenSpec, count: Int, type: __socket_type,
                     configure: (Int32) throws(SystemCallError) -> Void) throws(ListenError) -> [(fd: Int32, endpoint: SocketEndpoint)] {
        if let path = listen.endpoint.unixPath {
            do throws(SystemCallError) {
                return [(try unixSocket(path, listen: listen, type: type, configure: configure), listen.endpoint)]
            } catch {
                var failure = ListenError(listen: listen, errno: error.errno)
                if error.errno == EADDRINUSE {
                    failure.reason += "; a live socket or a file that is not a socket is at \(path): remove it, or listen elsewhere"
                }
                throw failure
            }
        }
        let reusePort = listen.reusePort || count > 1
        var opened: [(fd: Int32, endpoint: SocketEndpoint)] = []
        do throws(SystemCallError) {
            if reusePort && !listen.reusePort {
                Glibc.close(try socket(listen.endpoint, listen: listen, type: type, reusePort: false, probe: true) { _ throws(SystemCallError) in })
            }
            var endpoint = listen.endpoint
            for _ in 0..<count {
                let fd = try socket(endpoint, listen: listen, type: type, reusePort: reusePort, probe: false, configure: configure)
                // Port 0: the other loops' sockets join the port the kernel picked for the first.
                if endpoint.port == 0, let bound = Socket.localEndpoint(fd) { endpoint = bound }
                opened.append((fd, endpoint))
            }
        } catch {
            for socket in opened { Glibc.close(socket.fd) }
            throw ListenError(listen: listen, errno: error.errno)
        }
        return opened
    }

    /// A socket bound to `endpoint`; listening (TCP) unless `probe`.
    private static func socket(_ endpoint: SocketEndpoint, listen: ListenSpec, type: __socket_type, reusePort: Bool,
                               probe: Bool, configure: (Int32) throws(SystemCallError) -> Void) throws(SystemCallError) -> Int32 {
        let fd = Glibc.socket(endpoint.family, Int32(type.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemCallError("socket") }
        do throws(SystemCallError) {
            try Socket.setOption(fd, SOL_SOCKET, SO_REUSEADDR, 1)
            if reusePort { try Socket.setOption(fd, SOL_SOCKET, SO_REUSEPORT, 1) }
            if case .v6 = endpoint.address {
                try Socket.setOption(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, listen.ipv6Only ? 1 : 0)
            }
            if !probe { try configure(fd) }
            guard endpoint.withSockAddr({ Glibc.bind(fd, $0, $1) }) == 0 else { throw SystemCallError("bind") }
            if !probe && type == SOCK_STREAM {
                guard Glibc.listen(fd, Int32(clamping: listen.backlog)) == 0 else { throw SystemCallError("listen") }
            }
        } catch {
            Glibc.close(fd)
            throw error
        }
        return fd
    }

    /// A unix-domain socket at `path`, mode 0666 (as nginx: who may connect is the folder's
    /// permissions' business). A file already there is an error, as in nginx, except a socket
    /// that nobody listens on any more (a previous run that was killed): that one is replaced,
    /// where nginx would refuse to start until someone removes it.
    private static func unixSocket(_ path: String, listen: ListenSpec, type: __socket_type,
                                   configure: (Int32) throws(SystemCallError) -> Void) throws(SystemCallError) -> Int32 {
        let endpoint = listen.endpoint
        if isStaleSocket(endpoint) { unlink(path) }
        let fd = Glibc.socket(AF_UNIX, Int32(type.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemCallError("socket") }
        do throws(SystemCallError) {
            try configure(fd)
            guard endpoint.withSockAddr({ Glibc.bind(fd, $0, $1) }) == 0 else { throw SystemCallError("bind") }
            guard chmod(path, 0o666) == 0 else { throw SystemCallError("chmod") }
            if type == SOCK_STREAM {
                guard Glibc.listen(fd, Int32(clamping: listen.backlog)) == 0 else { throw SystemCallError("listen") }
            }
        } catch {
            Glibc.close(fd)
            throw error
        }
        return fd
    }

    /// A socket file whose listener is gone: connecting to it is refused.
    private static func isStaleSocket(_ endpoint: SocketEndpoint) -> Bool {
        var status = stat()
        guard let path = endpoint.unixPath, lstat(path, &status) == 0, status.st_mode & S_IFMT == S_IFSOCK else { return false }
        for type in [SOCK_STREAM, SOCK_DGRAM] {
            // Non-blocking: a live listener with a full backlog must not stall the start.
            let probe = Glibc.socket(AF_UNIX, Int32(type.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
            guard probe >= 0 else { return false }
            defer { Glibc.close(probe) }
            if endpoint.withSockAddr({ Glibc.connect(probe, $0, $1) }) == 0 { return false }
            // EPROTOTYPE: a live socket of the other type; try that one.
            if errno != EPROTOTYPE { return errno == ECONNREFUSED }
        }
        return false
    }

    /// At the close of a `listen unix:PATH`, its file goes too (nginx removes it at exit).
    static func removeSocketFile(of endpoint: SocketEndpoint) {
        guard let path = endpoint.unixPath, !endpoint.isUnnamedUnix else { return }
        unlink(path)
    }
}
