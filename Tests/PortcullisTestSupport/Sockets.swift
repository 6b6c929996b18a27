#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization

/// Plain blocking sockets for test peers: independent of SwiftNIO, so the code under test is
/// not also the code that checks it.
public enum TestSocketError: Error, CustomStringConvertible {
    case system(String, Int32)
    public var description: String {
        switch self {
        case .system(let call, let code): return "\(call) failed: \(String(cString: strerror(code)))"
        }
    }
}

func check(_ result: Int32, _ call: String) throws {
    if result < 0 { throw TestSocketError.system(call, errno) }
}

/// `unix:/path` is a unix-domain socket; an address with a colon IPv6; else IPv4.
public func addressFamily(_ host: String) -> Int32 {
    host.hasPrefix("unix:") ? AF_UNIX : host.contains(":") ? AF_INET6 : AF_INET
}

public func makeAddress(_ host: String, _ port: UInt16) -> (sockaddr_storage, socklen_t) {
    var storage = sockaddr_storage()
    if host.hasPrefix("unix:") {
        let path = Array(host.dropFirst(5).utf8)
        withUnsafeMutableBytes(of: &storage) { raw in
            raw.storeBytes(of: sa_family_t(AF_UNIX), as: sa_family_t.self)
            for (i, byte) in path.enumerated() { raw[2 + i] = byte }
        }
        return (storage, socklen_t(path.isEmpty ? 2 : 2 + path.count + 1))  // "unix:": the family alone
    }
    if host.contains(":") {
        var sin6 = sockaddr_in6()
        sin6.sin6_family = sa_family_t(AF_INET6)
        sin6.sin6_port = port.bigEndian
        inet_pton(AF_INET6, host, &sin6.sin6_addr)
        withUnsafeBytes(of: sin6) { raw in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: raw) } }
        return (storage, socklen_t(MemoryLayout<sockaddr_in6>.size))
    }
    var sin = sockaddr_in()
    sin.sin_family = sa_family_t(AF_INET)
    sin.sin_port = port.bigEndian
    inet_pton(AF_INET, host, &sin.sin_addr)
    withUnsafeBytes(of: sin) { raw in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: raw) } }
    return (storage, socklen_t(MemoryLayout<sockaddr_in>.size))
}

/// A connected TCP socket with blocking reads and writes and a receive timeout.
public final class TestConnection: @unchecked Sendable {
    public let fd: Int32
    private let closed = Atomic<Bool>(false)

    init(fd: Int32) { self.fd = fd }

    /// Connects to `host:port`, optionally from a chosen source address (any 127.x.y.z works).
    /// `unix:/path` hosts are unix-domain sockets (the port is ignored; a `unix:` source binds
    /// the client to that path).
    public static func connect(to host: String, port: UInt16, from source: String? = nil,
                               timeout: Double = 10) throws -> TestConnection {
        let family = addressFamily(host)
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try check(fd, "socket")
        let connection = TestConnection(fd: fd)
        connection.setTimeout(timeout)
        if let source {
            var (address, length) = makeAddress(source, 0)
            try withUnsafePointer(to: &address) {
                try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try check(bind(fd, $0, length), "bind \(source)") }
            }
        }
        var (address, length) = makeAddress(host, port)
        try withUnsafePointer(to: &address) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try check(Glibc.connect(fd, $0, length), "connect") }
        }
        return connection
    }

    public func setTimeout(_ seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    public func send(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw TestSocketError.system("send", errno)
            }
            offset += n
        }
    }

    public func send(_ text: String) throws { try send(Array(text.utf8)) }

    /// Reads up to `max` bytes; empty means EOF. Throws on timeout or error.
    public func receive(max: Int = 65536) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: max)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, max, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                throw TestSocketError.system("recv", errno)
            }
            return Array(buffer.prefix(n))
        }
    }

    /// True once the peer has closed: EOF, or a reset (a peer that closes with unread bytes
    /// in its receive buffer sends a reset, nginx and Portcullis alike).
    public func isClosedByPeer() -> Bool {
        do {
            return try receiveAll().isEmpty
        } catch TestSocketError.system(_, let code) where code == ECONNRESET {
            return true
        } catch {
            return false
        }
    }

    /// Reads until EOF (or until `limit` bytes).
    public func receiveAll(limit: Int = 1 << 30) throws -> [UInt8] {
        var out: [UInt8] = []
        while out.count < limit {
            let chunk = try receive()
            if chunk.isEmpty { break }
            out += chunk
        }
        return out
    }

    /// Reads exactly `count` bytes or throws.
    public func receive(exactly count: Int) throws -> [UInt8] {
        var out: [UInt8] = []
        while out.count < count {
            let chunk = try receive(max: count - out.count)
            if chunk.isEmpty { throw TestSocketError.system("recv (EOF after \(out.count) of \(count) bytes)", 0) }
            out += chunk
        }
        return out
    }

    public func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }

    /// Connects to 127.0.0.1:`port`, sends `bytes`, and returns what comes back until the other
    /// side closes (5 s at most) as text: "no connect" if the connect fails.
    public static func reply(from port: UInt16, sending bytes: [UInt8] = []) -> String {
        guard let connection = try? connect(to: "127.0.0.1", port: port, timeout: 3) else { return "no connect" }
        connection.setTimeout(5)
        defer { connection.close() }
        if !bytes.isEmpty { try? connection.send(bytes) }
        return String(decoding: (try? connection.receiveAll(limit: 4096)) ?? [], as: UTF8.self)
    }

    /// Closes with a TCP reset instead of a FIN.
    public func reset() {
        var value = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &value, socklen_t(MemoryLayout<linger>.size))
        close()
    }

    public func close() {
        if !closed.exchange(true, ordering: .relaxed) { Glibc.close(fd) }
    }

    deinit { close() }
}

/// A TCP server on a thread per connection, running `handler` for each accepted socket.
/// Counts connections, so a test can prove an upstream was never contacted.
public final class TestServer: @unchecked Sendable {
    public let port: UInt16
    public let host: String
    private let fd: Int32
    private let accepted = Atomic<Int>(0)
    private let stopped = Atomic<Bool>(false)
    private let handler: @Sendable (TestConnection) -> Void

    public var connectionCount: Int { accepted.load(ordering: .relaxed) }

    public init(host: String = "127.0.0.1", port: UInt16 = 0, handler: @escaping @Sendable (TestConnection) -> Void) throws {
        self.host = host
        self.handler = handler
        let family = addressFamily(host)
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try check(fd, "socket")
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var (address, length) = makeAddress(host, port)
        try withUnsafePointer(to: &address) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try check(bind(fd, $0, length), "bind") }
        }
        try check(listen(fd, 128), "listen")
        self.fd = fd
        self.port = try Self.localPort(fd)
        let thread = Thread { [self] in self.acceptLoop() }
        thread.start()
    }

    /// The port a socket is bound to (getsockname).
    public static func localPort(_ fd: Int32) throws -> UInt16 {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        try withUnsafeMutablePointer(to: &storage) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try check(getsockname(fd, $0, &length), "getsockname") }
        }
        return withUnsafeBytes(of: storage) { raw in
            UInt16(bigEndian: raw.load(fromByteOffset: 2, as: UInt16.self))
        }
    }

    private func acceptLoop() {
        while !stopped.load(ordering: .relaxed) {
            let client = accept(fd, nil, nil)
            if client < 0 {
                if stopped.load(ordering: .relaxed) { return }
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            if stopped.load(ordering: .relaxed) {
                Glibc.close(client)
                return
            }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)  // children of the tests must not inherit it
            accepted.wrappingAdd(1, ordering: .relaxed)
            let connection = TestConnection(fd: client)
            connection.setTimeout(30)
            let handler = self.handler
            Thread { handler(connection) }.start()
        }
    }

    /// Stops accepting. Safe to call twice: only the first call closes the socket (a second
    /// close could hit a descriptor number already reused by someone else).
    public func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        shutdown(fd, Int32(SHUT_RDWR))
        Glibc.close(fd)
    }

    deinit { stop() }

    /// Echoes every byte until EOF, then closes.
    public static func echo(host: String = "127.0.0.1") throws -> TestServer {
        try TestServer(host: host) { connection in
            while let chunk = try? connection.receive(), !chunk.isEmpty {
                try? connection.send(chunk)
            }
            connection.close()
        }
    }
}

/// A port that was free a moment ago (bind :0, read it, release it).
public func freePort(host: String = "127.0.0.1") throws -> UInt16 {
    let family = host.contains(":") ? AF_INET6 : AF_INET
    let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    try check(fd, "socket")
    defer { Glibc.close(fd) }
    var (address, length) = makeAddress(host, 0)
    try withUnsafePointer(to: &address) {
        try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try check(bind(fd, $0, length), "bind") }
    }
    return try TestServer.localPort(fd)
}
