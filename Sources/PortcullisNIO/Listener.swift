#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import NIOPosix
import PortcullisCore
import PortcullisPolicy
import Synchronization

/// The current runtime of one listener. Reload swaps it; every accept reads it once, so a
/// session keeps the policy it started with.
public final class RuntimeBox: Sendable {
    private let current: Mutex<ServerRuntime>

    public init(_ runtime: ServerRuntime) { current = Mutex(runtime) }
    public var runtime: ServerRuntime { current.withLock { $0 } }
    public func replace(with runtime: ServerRuntime) { current.withLock { $0 = runtime } }
}

public struct ListenError: Error, CustomStringConvertible {
    public var listen: ListenSpec
    public var underlying: any Error

    public var description: String {
        let reason: String
        if let io = underlying as? IOError {
            reason = "\(String(cString: strerror(io.errnoCode))) (\(io.errnoCode))"
        } else {
            reason = "\(underlying)"
        }
        return "cannot listen on \(listen) (\(listen.location)): \(reason)"
    }
}

/// Opens the listening sockets of one TCP `listen`: one socket per event loop with
/// `SO_REUSEPORT`, so the kernel spreads connections over the loops and no accepted connection
/// is handed from one thread to another (docs/decisions/0009-listener-per-event-loop.md: +15–20 %
/// connections a second on 2 cores). nginx does this only with `reuseport`; without it,
/// Portcullis first binds a plain socket to the address and closes it, so an address already in
/// use (by another program, or a wildcard `listen` of this one) is still an error at start-up.
public enum Listener {
    public static func bind(_ box: RuntimeBox, group: MultiThreadedEventLoopGroup) async throws -> [any Channel] {
        let listen = box.runtime.listen
        if listen.udp { return try await bindUDP(box, group: group) }
        let loops: [any EventLoop] = group.makeIterator().map { $0 }
        let perLoop = listen.reusePort || loops.count > 1
        var channels: [any Channel] = []
        do {
            if perLoop && !listen.reusePort { try probe(listen) }
            for loop in loops {  // one loop, or one socket per loop
                let bootstrap = ServerBootstrap(group: loop)
                    .serverChannelOption(.backlog, value: Int32(clamping: listen.backlog))
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .serverChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            if perLoop {
                                try channel.syncOptions!.setOption(.socketOption(.init(rawValue: SO_REUSEPORT)), value: 1)
                            }
                            if case .v6 = listen.address {
                                try channel.syncOptions!.setOption(
                                    ChannelOptions.Types.SocketOption(level: .ipv6, name: .init(rawValue: IPV6_V6ONLY)),
                                    value: listen.ipv6Only ? 1 : 0)
                            }
                        }
                    }
                    .childChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try configureClient(channel, box.runtime)
                        }
                    }
                channels.append(try await bootstrap.bind(to: listen.endpoint.socketAddress).get())
            }
        } catch {
            for channel in channels { try? await channel.close() }
            throw ListenError(listen: listen, underlying: error)
        }
        return channels
    }

    /// Binds and closes a plain socket (no `SO_REUSEPORT`) on the listen address: fails with
    /// EADDRINUSE if anything listens there, as the single socket nginx opens would.
    static func probe(_ listen: ListenSpec) throws {
        let address = listen.endpoint.socketAddress
        let fd = socket(Int32(address.protocol.rawValue), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        defer { close(fd) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        if case .v6 = listen.address {
            var v6only: Int32 = listen.ipv6Only ? 1 : 0
            setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &v6only, socklen_t(MemoryLayout<Int32>.size))
        }
        let result = address.withSockAddr { Glibc.bind(fd, $0, socklen_t($1)) }
        guard result == 0 else { throw IOError(errnoCode: errno, reason: "bind") }
    }

    /// Per-connection options through `syncOptions` (no future per option) and the one handler.
    static func configureClient(_ channel: any Channel, _ runtime: ServerRuntime) throws {
        let options = channel.syncOptions!
        try options.setOption(.autoRead, value: false)
        try options.setOption(.allowRemoteHalfClosure, value: true)
        try options.setOption(
            .recvAllocator,
            value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 256 * 1024))
        if !runtime.policy.proxy.tcpNoDelay {
            try options.setOption(.tcpOption(.tcp_nodelay), value: 0)
        }
        switch runtime.listen.keepalive {
        case .systemDefault: break
        case .off: try options.setOption(.socketOption(.so_keepalive), value: 0)
        case .on: try options.setOption(.socketOption(.so_keepalive), value: 1)
        case .tuned(let idle, let interval, let count):
            try options.setOption(.socketOption(.so_keepalive), value: 1)
            if let idle { try options.setOption(.tcpOption(.init(rawValue: TCP_KEEPIDLE)), value: idle) }
            if let interval { try options.setOption(.tcpOption(.init(rawValue: TCP_KEEPINTVL)), value: interval) }
            if let count { try options.setOption(.tcpOption(.init(rawValue: TCP_KEEPCNT)), value: count) }
        }
        try channel.pipeline.syncOperations.addHandler(RelayHandler(side: .client, runtime: runtime))
    }
}
