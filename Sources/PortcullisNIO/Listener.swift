import NIOCore
import NIOPosix
public import PortcullisEngine
public import PortcullisPolicy

/// The SwiftNIO listeners: UDP (`listen … udp`, UDPListener.swift). Plain TCP is the epoll
/// engine's (PortcullisEngine).
public enum Listener {
    /// Binds one UDP `listen`. Throws `ListenError`, with nothing bound.
    public static func bind(_ box: RuntimeBox, group: MultiThreadedEventLoopGroup) async throws -> [any Channel] {
        precondition(box.runtime.listen.udp, "TCP listens are the engine's")
        return try await bindUDP(box, group: group)
    }
}

extension ListenError {
    /// A bind that SwiftNIO reported.
    init(listen: ListenSpec, underlying: any Error) {
        if let io = underlying as? IOError {
            self.init(listen: listen, errno: io.errnoCode)
        } else {
            self.init(listen: listen, reason: "\(underlying)")
        }
    }
}
