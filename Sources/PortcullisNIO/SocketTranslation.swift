#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import PortcullisCore
import PortcullisPolicy

// The one place SwiftNIO's addresses and errors become the pure layer's words.

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

    var socketAddress: SocketAddress {
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
            self = .failed(errno: io.errnoCode, message: String(cString: strerror(io.errnoCode)))
        } else if case ChannelError.connectTimeout = error {
            self = .timedOut
        } else {
            self = .other("\(error)")
        }
    }
}

extension SessionMachine.Failure {
    /// A relay side's error, as SwiftNIO reported it: a reset is passed on as a reset, SwiftNIO's
    /// own channel errors (a close we asked for) are not worth a line.
    init(_ error: any Error) {
        if let io = error as? IOError, io.errnoCode == ECONNRESET || io.errnoCode == EPIPE {
            self = .reset("\(error)")
        } else if error is ChannelError {
            self = .quiet("\(error)")
        } else {
            self = .error("\(error)")
        }
    }
}

extension IOError {
    /// nginx's wording of a failed system call: `recv() failed (111: Connection refused)`.
    func described(as call: String) -> String {
        "\(call)() failed (\(errnoCode): \(String(cString: strerror(errnoCode))))"
    }
}
