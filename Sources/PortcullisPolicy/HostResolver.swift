#if canImport(Glibc)
import Glibc
#endif
public import PortcullisCore

/// Turns a host name from a rule file into addresses, once, at compile time (as nginx resolves
/// `proxy_pass` and `upstream` names when it loads its configuration).
public protocol HostResolver: Sendable {
    func addresses(of host: String) -> [IPAddress]
}

/// getaddrinfo(3), the system's resolver.
public struct SystemHostResolver: HostResolver {
    public init() {}

    public func addresses(of host: String) -> [IPAddress] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, nil, &hints, &result) == 0 else { return [] }
        defer { freeaddrinfo(result) }
        var addresses: [IPAddress] = []
        var cursor = result
        while let info = cursor?.pointee {
            if info.ai_family == AF_INET, let raw = info.ai_addr {
                let sin = UnsafeRawPointer(raw).load(as: sockaddr_in.self)
                addresses.append(.v4(UInt32(bigEndian: sin.sin_addr.s_addr)))
            } else if info.ai_family == AF_INET6, let raw = info.ai_addr {
                let sin6 = UnsafeRawPointer(raw).load(as: sockaddr_in6.self)
                let bytes = withUnsafeBytes(of: sin6.sin6_addr) { Array($0) }
                if let address = IPAddress(bytes: bytes) { addresses.append(address) }
            }
            cursor = info.ai_next
        }
        var seen = Set<IPAddress>()
        return addresses.filter { seen.insert($0).inserted }
    }
}
