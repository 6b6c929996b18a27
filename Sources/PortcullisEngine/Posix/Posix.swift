import CPortcullisLinux
import Glibc
public import PortcullisCore
public import PortcullisPolicy

// The one place the engine's system calls become the pure layer's words: socket addresses,
// errno texts in nginx's wording, socket options.

/// A failed system call: which one and its errno.
public struct SystemCallError: Error, Sendable, CustomStringConvertible {
    public var call: String
    public var errno: Int32

    public init(_ call: String, errno: Int32 = Glibc.errno) {
        self.call = call
        self.errno = errno
    }

    /// strerror's text: "Connection refused".
    public static func text(_ errno: Int32) -> String { String(cString: strerror(errno)) }

    /// nginx's wording: `recv() failed (104: Connection reset by peer)`.
    public var description: String { "\(call)() failed (\(errno): \(Self.text(errno)))" }
}

extension DialFailure {
    /// connect() (or the socket before it) failed with `errno`.
    public init(errno: Int32) { self = .failed(errno: errno, message: SystemCallError.text(errno)) }
}

extension SessionMachine.Failure {
    /// A relay side's failed read or write: a reset is passed on as a reset.
    init(_ error: SystemCallError) {
        self = error.errno == ECONNRESET || error.errno == EPIPE ? .reset("\(error)") : .error("\(error)")
    }
}

extension SocketEndpoint {
    /// The address a `sockaddr_in`/`sockaddr_in6`/`sockaddr_un` holds; nil for other families.
    /// `length`: what the kernel said the address takes (accept, recvmsg), which is how an
    /// unnamed unix socket (no path) and an abstract name (NUL first, not NUL-terminated) are
    /// told apart; nil when only a terminated path can be there.
    public init?(_ storage: sockaddr_storage, length: socklen_t? = nil) {
        var storage = storage
        switch Int32(storage.ss_family) {
        case AF_INET:
            self.init(withUnsafeBytes(of: &storage) { $0.load(as: sockaddr_in.self) })
        case AF_INET6:
            self.init(withUnsafeBytes(of: &storage) { $0.load(as: sockaddr_in6.self) })
        case AF_UNIX:
            let pathOffset = MemoryLayout<sa_family_t>.size
            let capacity = MemoryLayout<sockaddr_un>.size - pathOffset
            let available = length.map { max(0, min(Int($0) - pathOffset, capacity)) } ?? capacity
            let path = withUnsafeBytes(of: &storage) { raw -> [UInt8] in
                let bytes = Array(raw[pathOffset..<(pathOffset + available)])
                // A path name ends at its NUL; an abstract name is all the bytes the length says.
                return bytes.first == 0 ? bytes : Array(bytes.prefix { $0 != 0 })
            }
            // A name that is not UTF-8 cannot be kept exactly: treated as no name (not keyed, not
            // answered), never as a nearby path that another socket could own.
            let text = String(decoding: path, as: UTF8.self)
            self.init(unixPath: Array(text.utf8) == path ? text : "")
        default:
            return nil
        }
    }

    public var family: Int32 { isUnix ? AF_UNIX : address.isIPv4 ? AF_INET : AF_INET6 }

    /// This endpoint as a `sockaddr_in`; nil for IPv6. (Also SwiftNIO's `SocketAddress` is
    /// made from these, in PortcullisNIO.)
    public var sockaddrIPv4: sockaddr_in? {
        guard case .v4(let value) = address else { return nil }
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = port.bigEndian
        sin.sin_addr.s_addr = value.bigEndian
        return sin
    }

    /// This endpoint as a `sockaddr_in6`; nil for IPv4.
    public var sockaddrIPv6: sockaddr_in6? {
        guard case .v6 = address else { return nil }
        var sin6 = sockaddr_in6()
        sin6.sin6_family = sa_family_t(AF_INET6)
        sin6.sin6_port = port.bigEndian
        let bytes = address.bytes
        withUnsafeMutableBytes(of: &sin6.sin6_addr) { raw in
            for i in 0..<16 { raw[i] = bytes[i] }
        }
        return sin6
    }

    /// Writes this endpoint into `storage` as a `sockaddr_in` or `sockaddr_in6`; its length.
    @discardableResult
    func store(into storage: inout sockaddr_storage) -> socklen_t {
        if let unixPath {
            // An unnamed socket is the family alone; a path name is NUL-terminated; an
            // abstract name (NUL first) is exactly its bytes.
            let bytes = Array(unixPath.utf8)
            let pathOffset = MemoryLayout<sa_family_t>.size
            let count = min(bytes.count, MemoryLayout<sockaddr_un>.size - pathOffset - 1)
            storage = sockaddr_storage()
            withUnsafeMutableBytes(of: &storage) { raw in
                raw.storeBytes(of: sa_family_t(AF_UNIX), as: sa_family_t.self)
                for i in 0..<count { raw[pathOffset + i] = bytes[i] }
            }
            let terminator = bytes.isEmpty || bytes.first == 0 ? 0 : 1
            return socklen_t(pathOffset + count + terminator)
        }
        if let sin = sockaddrIPv4 {
            withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: sin, as: sockaddr_in.self) }
            return socklen_t(MemoryLayout<sockaddr_in>.size)
        }
        withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: sockaddrIPv6!, as: sockaddr_in6.self) }
        return socklen_t(MemoryLayout<sockaddr_in6>.size)
    }

    /// Calls `body` with this endpoint as a `sockaddr` and its length.
    public func withSockAddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        var storage = sockaddr_storage()
        let length = store(into: &storage)
        return withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) }
        }
    }

    /// The address a `sockaddr_in` holds.
    public init(_ sin: sockaddr_in) {
        self.init(address: .v4(UInt32(bigEndian: sin.sin_addr.s_addr)), port: UInt16(bigEndian: sin.sin_port))
    }

    /// The address a `sockaddr_in6` holds.
    public init(_ sin6: sockaddr_in6) {
        let address = withUnsafeBytes(of: sin6.sin6_addr) { IPAddress(bytes: $0) }!  // always 16 bytes
        self.init(address: address, port: UInt16(bigEndian: sin6.sin6_port))
    }
}

/// Socket calls on a raw descriptor.
enum Socket {
    static func setOption(_ fd: Int32, _ level: Int32, _ name: Int32, _ value: Int32) throws(SystemCallError) {
        var value = value
        guard setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
            throw SystemCallError("setsockopt")
        }
    }

    /// `proxy_bind`: binds an upstream socket before its connect. With `transparent`,
    /// IP_TRANSPARENT (IPV6_TRANSPARENT) first, so the address need not be this host's; for
    /// port 0 on TCP, IP_BIND_ADDRESS_NO_PORT, so the port is chosen at connect and many upstream
    /// connections can share one local address; for a fixed UDP port, SO_REUSEADDR (as nginx).
    /// Returns nil, or nginx's wording of what failed and whether nginx logs it as crit
    /// (bind) rather than alert (setsockopt).
    static func bindLocal(_ fd: Int32, _ local: SessionMachine.LocalBind, datagram: Bool) -> (message: String, critical: Bool)? {
        let v4 = local.endpoint.address.isIPv4
        if local.transparent {
            let (level, name, option) = v4 ? (Int32(IPPROTO_IP), Int32(IP_TRANSPARENT), "IP_TRANSPARENT")
                                           : (Int32(IPPROTO_IPV6), Int32(IPV6_TRANSPARENT), "IPV6_TRANSPARENT")
            do throws(SystemCallError) {
                try setOption(fd, level, name, 1)
            } catch {
                return ("setsockopt(\(option)) failed (\(error.errno): \(SystemCallError.text(error.errno)))", false)
            }
        }
        if local.endpoint.port == 0 {
            // (TCP only: a UDP socket gets its port at bind all the same.)
            if !datagram { try? setOption(fd, Int32(IPPROTO_IP), IP_BIND_ADDRESS_NO_PORT, 1) }
        } else if datagram {
            try? setOption(fd, SOL_SOCKET, SO_REUSEADDR, 1)
        }
        guard local.endpoint.withSockAddr({ Glibc.bind(fd, $0, $1) }) == 0 else {
            let error = errno
            let shown = local.endpoint.port == 0 ? local.endpoint.address.description : local.endpoint.description
            return ("bind(\(shown)) failed (\(error): \(SystemCallError.text(error)))", true)
        }
        return nil
    }

    /// `SO_LINGER {1, 0}`: the coming close sends a reset (a peer's reset passed on).
    static func resetOnClose(_ fd: Int32) {
        var option = linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &option, socklen_t(MemoryLayout<linger>.size))
    }

    /// The pending error of a socket (`SO_ERROR`): how a non-blocking connect ended.
    static func pendingError(_ fd: Int32) -> Int32 {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_ERROR, &value, &length) == 0 else { return errno }
        return value
    }

    static func localEndpoint(_ fd: Int32) -> SocketEndpoint? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return result == 0 ? SocketEndpoint(storage, length: length) : nil
    }

    /// `SO_KEEPALIVE` and its TCP tuning, as `listen … so_keepalive=` says.
    static func applyKeepalive(_ fd: Int32, _ keepalive: ListenSpec.Keepalive) {
        switch keepalive {
        case .systemDefault:
            break
        case .off:
            try? setOption(fd, SOL_SOCKET, SO_KEEPALIVE, 0)
        case .on:
            try? setOption(fd, SOL_SOCKET, SO_KEEPALIVE, 1)
        case .tuned(let idle, let interval, let count):
            try? setOption(fd, SOL_SOCKET, SO_KEEPALIVE, 1)
            if let idle { try? setOption(fd, Int32(IPPROTO_TCP), TCP_KEEPIDLE, Int32(clamping: idle)) }
            if let interval { try? setOption(fd, Int32(IPPROTO_TCP), TCP_KEEPINTVL, Int32(clamping: interval)) }
            if let count { try? setOption(fd, Int32(IPPROTO_TCP), TCP_KEEPCNT, Int32(clamping: count)) }
        }
    }
}

/// Monotonic and wall clocks as the session machine wants them.
public enum Clock {
    /// CLOCK_MONOTONIC in nanoseconds: the machine's `now` (SwiftNIO's deadlines use the same clock).
    @inline(__always)
    public static func monotonic() -> UInt64 {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return UInt64(time.tv_sec) &* 1_000_000_000 &+ UInt64(time.tv_nsec)
    }

    /// Seconds since 1970.
    public static func wall() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_REALTIME, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
    }
}
