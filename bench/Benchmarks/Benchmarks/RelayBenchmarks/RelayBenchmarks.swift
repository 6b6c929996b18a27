// What one relayed TCP connection costs the gateway: the real Gateway (rules compiled from
// text, NIO event loop, relay handlers) runs in this process, and each benchmark iteration is
// one whole session through it: connect, send 64 bytes, read them back, close, and wait until
// the gateway has ended the session.
//
// The malloc counters see every thread of the process, so the client and the upstream are
// plain POSIX sockets (socket/connect/send/recv/poll/close on buffers allocated once in setup)
// that allocate nothing per connection: mallocCountTotal is the gateway's own allocations for
// one session, both legs (client side and upstream side) included. A second benchmark makes
// the same connection straight to the upstream, to show that (0 mallocs) and the time floor.
// The gateway runs one event loop (`worker_processes 1`) and logs errors only.
#if canImport(Glibc)
import Glibc
#endif
import Benchmark
import PortcullisGateway
import PortcullisPolicy
import Synchronization

let benchmarks: @Sendable () -> Void = {
    Benchmark(
        "relay one TCP connection (connect, 64 B echo, close)",
        configuration: .init(
            metrics: [.wallClock, .throughput, .mallocCountTotal, .mallocBytesCount],
            timeUnits: .microseconds,
            warmupIterations: 50,
            maxDuration: .seconds(5),
            maxIterations: 5_000
        )
    ) { (benchmark: Benchmark, relay: Relay) in
        if let failure = relay.connectionThroughGateway() { benchmark.error(failure) }
    } setup: {
        try await Relay.start()
    } teardown: {
        await Relay.stopCurrent()
    }

    // The same client straight to the echo upstream, the gateway idle: what the harness itself
    // costs. Its mallocs should read 0 (so the relay's count is the gateway's alone), and its
    // time is the floor under the relay's.
    Benchmark(
        "baseline: the same connection straight to the upstream",
        configuration: .init(
            metrics: [.wallClock, .throughput, .mallocCountTotal, .mallocBytesCount],
            timeUnits: .microseconds,
            warmupIterations: 50,
            maxDuration: .seconds(3),
            maxIterations: 5_000
        )
    ) { (benchmark: Benchmark, relay: Relay) in
        if let failure = relay.connectionToUpstream() { benchmark.error(failure) }
    } setup: {
        try await Relay.start()
    } teardown: {
        await Relay.stopCurrent()
    }
}

/// The gateway, the echo upstream behind it, and the client's buffers.
final class Relay: @unchecked Sendable {
    let gateway: Gateway
    let gatewayPort: UInt16
    let upstream: EchoUpstream
    let directory: String
    private let payload: UnsafeMutableRawBufferPointer
    private let received: UnsafeMutableRawBufferPointer
    private var gatewayAddress: sockaddr_in
    private var upstreamAddress: sockaddr_in

    static let payloadSize = 64
    /// The running relay, for teardown (which gets no setup state).
    nonisolated(unsafe) static var current: Relay?

    private init(gateway: Gateway, gatewayPort: UInt16, upstream: EchoUpstream, directory: String) {
        self.gateway = gateway
        self.gatewayPort = gatewayPort
        self.upstream = upstream
        self.directory = directory
        payload = .allocate(byteCount: Self.payloadSize, alignment: 8)
        for i in 0..<Self.payloadSize { payload[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 1) }
        received = .allocate(byteCount: Self.payloadSize, alignment: 8)
        gatewayAddress = loopback(port: gatewayPort)
        upstreamAddress = loopback(port: upstream.port)
    }

    deinit {
        payload.deallocate()
        received.deallocate()
    }

    /// Starts the echo upstream, then a gateway on a free loopback port that relays to it:
    /// one event loop, no access log, errors only to a log file in a temporary folder.
    static func start() async throws -> Relay {
        let upstream = try EchoUpstream()
        var template = Array("/tmp/portcullis-bench.XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw RelayError("mkdtemp", errno) }
        let directory = String(cString: made)
        var lastError: (any Error)?
        for _ in 0..<5 {  // a free port can be taken between finding it and binding it
            let port = try freeLoopbackPort()
            let rules = """
                worker_processes 1;
                error_log \(directory)/error.log error;
                stream {
                    server { listen 127.0.0.1:\(port); proxy_pass 127.0.0.1:\(upstream.port); }
                }
                """
            let result = RuleLoader.load(text: rules, file: "relay.conf")
            guard let snapshot = result.snapshot, !result.hasErrors else {
                throw RelayError("the rules did not compile:\n\(result.rendered)")
            }
            let gateway = try Gateway(snapshot: snapshot)
            do {
                try await gateway.start()
            } catch {
                lastError = error
                await gateway.stop()
                continue
            }
            let relay = Relay(gateway: gateway, gatewayPort: port, upstream: upstream, directory: directory)
            if let failure = relay.connectionThroughGateway() {
                await relay.stop()
                throw RelayError("the first connection through the gateway failed: \(failure)")
            }
            current = relay
            return relay
        }
        upstream.stop()
        throw lastError ?? RelayError("could not start the gateway")
    }

    static func stopCurrent() async {
        await current?.stop()
        current = nil
    }

    func stop() async {
        gateway.setDrainTimeout(.milliseconds(200))
        await gateway.stop()
        upstream.stop()
        unlink(directory + "/error.log")
        rmdir(directory)
    }

    /// One session through the gateway; nil when it went as expected, else what went wrong.
    func connectionThroughGateway() -> String? {
        if let failure = echo(through: &gatewayAddress) { return failure }
        // The session ends on the gateway's event loop after our close: wait for it, so that
        // its allocations (closing both legs) count in this iteration, not the next one.
        var spins = 0
        while gateway.liveSessions > 0 {
            spins += 1
            if spins > 200_000 { return "the gateway did not end the session" }
            if spins > 100 { usleep(10) } else { sched_yield() }
        }
        return nil
    }

    /// The same, straight to the upstream.
    func connectionToUpstream() -> String? { echo(through: &upstreamAddress) }

    /// Connect, send the payload, read it back, close. Allocates nothing: the socket calls take
    /// this object's buffers and sockaddr.
    private func echo(through address: inout sockaddr_in) -> String? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return "socket: errno \(errno)" }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard connected == 0 else { return "connect: errno \(errno)" }
        guard sendAll(fd, UnsafeRawBufferPointer(payload)) else { return "send: errno \(errno)" }
        var got = 0
        while got < Self.payloadSize {
            let n = recv(fd, received.baseAddress! + got, Self.payloadSize - got, 0)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return n == 0 ? "the gateway closed after \(got) bytes" : "recv: errno \(errno)" }
            got += n
        }
        guard memcmp(payload.baseAddress!, received.baseAddress!, Self.payloadSize) == 0 else {
            return "the echo came back different"
        }
        return nil
    }
}

struct RelayError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
    init(_ call: String, _ code: Int32) { description = "\(call) failed: \(String(cString: strerror(code)))" }
}

func loopback(port: UInt16) -> sockaddr_in {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
    return address
}

func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
    var sent = 0
    while sent < bytes.count {
        let n = send(fd, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { return false }
        sent += n
    }
    return true
}

/// A listening TCP socket on 127.0.0.1 and a port chosen by the kernel.
func listeningSocket() throws -> (fd: Int32, port: UInt16) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw RelayError("socket", errno) }
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var address = loopback(port: 0)
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer -> Int32 in
            guard bind(fd, pointer, length) == 0, listen(fd, 512) == 0 else { return -1 }
            return getsockname(fd, pointer, &length)
        }
    }
    guard bound == 0 else {
        let code = errno
        close(fd)
        throw RelayError("bind/listen", code)
    }
    return (fd, UInt16(bigEndian: address.sin_port))
}

func freeLoopbackPort() throws -> UInt16 {
    let (fd, port) = try listeningSocket()
    close(fd)
    return port
}

/// The upstream: one thread that accepts on 127.0.0.1 and writes back whatever each connection
/// sends until it closes. poll() over a fixed table allocated once, so serving a connection
/// allocates nothing.
final class EchoUpstream: @unchecked Sendable {
    let port: UInt16
    private let listener: Int32
    private let stopping = Atomic<Bool>(false)
    private static let capacity = 256
    private let fds = UnsafeMutablePointer<pollfd>.allocate(capacity: capacity)
    private let buffer = UnsafeMutableRawPointer.allocate(byteCount: 64 * 1024, alignment: 16)
    private var thread = pthread_t()

    init() throws {
        (listener, port) = try listeningSocket()
        let created = pthread_create(&thread, nil, { argument in
            Unmanaged<EchoUpstream>.fromOpaque(argument!).takeUnretainedValue().serve()
            return nil
        }, Unmanaged.passUnretained(self).toOpaque())
        guard created == 0 else {
            close(listener)
            throw RelayError("pthread_create", created)
        }
    }

    deinit {
        fds.deallocate()
        buffer.deallocate()
    }

    /// Ends the thread (it polls at most 100 ms at a time) and closes every socket.
    func stop() {
        guard !stopping.exchange(true, ordering: .relaxed) else { return }
        pthread_join(thread, nil)
    }

    private func serve() {
        fds[0] = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        var count = 1
        while !stopping.load(ordering: .relaxed) {
            guard poll(fds, nfds_t(count), 100) > 0 else { continue }
            var i = count - 1
            while i >= 1 {
                if fds[i].revents != 0 {
                    let n = recv(fds[i].fd, buffer, 64 * 1024, 0)
                    let echoed = n > 0 && sendAll(fds[i].fd, UnsafeRawBufferPointer(start: buffer, count: n))
                    if !echoed && !(n < 0 && errno == EINTR) {
                        close(fds[i].fd)
                        count -= 1
                        fds[i] = fds[count]
                    }
                }
                i -= 1
            }
            if fds[0].revents & Int16(POLLIN) != 0 {
                let client = accept(listener, nil, nil)
                if client >= 0 {
                    if count < Self.capacity {
                        fds[count] = pollfd(fd: client, events: Int16(POLLIN), revents: 0)
                        count += 1
                    } else {
                        close(client)
                    }
                }
            }
        }
        for i in 0..<count { close(fds[i].fd) }
    }
}
