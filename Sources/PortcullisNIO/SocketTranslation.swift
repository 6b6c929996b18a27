#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import PortcullisCore
import PortcullisPolicy
import PortcullisEngine

// The one place SwiftNIO's addresses and errors become the pure layer's words (the epoll
// engine's are in PortcullisEngine/Posix).

extension SocketEndpoint {
    init?(_ address: SocketAddress) {
        switch address {
        case .v4(let v4): self.init(v4.address)
        case .v6(let v6): self.init(v6.address)
        case .unixDomainSocket: return nil
        }
    }

    public var socketAddress: SocketAddress {
        if let sin = sockaddrIPv4 { return SocketAddress(sin, host: "") }
        return SocketAddress(sockaddrIPv6!, host: "")
    }
}

extension DialFailure {
    /// A failed connect, as SwiftNIO reported it.
    init(_ error: any Error) {
        if let io = error as? IOError {
            self.init(errno: io.errnoCode)
        } else if case ChannelError.connectTimeout = error {
            self = .timedOut
        } else {
            self = .other("\(error)")
        }
    }
}

extension IOError {
    /// nginx's wording of a failed system call: `recv() failed (111: Connection refused)`.
    func described(as call: String) -> String {
        "\(call)() failed (\(errnoCode): \(String(cString: strerror(errnoCode))))"
    }
}
