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
        case .v4(let v4):
            self.init(address: .v4(UInt32(bigEndian: v4.address.sin_addr.s_addr)), port: UInt16(address.port ?? 0))
        case .v6(let v6):
            let bytes = withUnsafeBytes(of: v6.address.sin6_addr) { Array($0) }
            guard let ip = IPAddress(bytes: bytes) else { return nil }
            self.init(address: ip, port: UInt16(address.port ?? 0))
        case .unixDomainSocket:
            return nil
        }
    }

    public var socketAddress: SocketAddress {
        switch address {
        case .v4(let value):
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = port.bigEndian
            sin.sin_addr.s_addr = value.bigEndian
            return SocketAddress(sin, host: "")
        case .v6:
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = port.bigEndian
            let bytes = address.bytes
            withUnsafeMutableBytes(of: &sin6.sin6_addr) { raw in
                for i in 0..<16 { raw[i] = bytes[i] }
            }
            return SocketAddress(sin6, host: "")
        }
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
