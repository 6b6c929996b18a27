#if canImport(Glibc)
import Glibc
#endif
import Foundation
import PortcullisCore
import PortcullisEngine
import Synchronization

/// `metrics_listen`: a small HTTP/1.1 server for Prometheus scrapes, on a thread of its own
/// (never an event loop's). One scrape at a time: a request must arrive within 2 s and fit in
/// 8 KiB, or the connection is closed; `GET /metrics` (or `/`) gets the text format, anything
/// else 404 or 405. Each answer closes the connection. A scraper needs nothing more, and a
/// client that never sends its request costs a scrape 2 s, never the relay.
final class MetricsEndpoint: @unchecked Sendable {
    let endpoint: SocketEndpoint
    private let fd: Int32
    /// A pipe: `stop` writes to it, which ends the thread's poll.
    private let wakeup: (read: Int32, write: Int32)
    private let body: @Sendable () -> [UInt8]
    private let done = DispatchSemaphore(value: 0)
    private let stopped = Atomic<Bool>(false)

    struct BindError: Error, CustomStringConvertible {
        var description: String
    }

    /// Binds `endpoint` now (a failure stops the start); `body` renders a scrape.
    init(endpoint: SocketEndpoint, location: SourceLocation?, body: @escaping @Sendable () -> [UInt8]) throws {
        let fd = socket(endpoint.family, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw BindError(description: "metrics_listen: socket(): \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard endpoint.withSockAddr({ bind(fd, $0, $1) }) == 0, listen(fd, 16) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            let site = location.map { " (\($0))" } ?? ""
            throw BindError(description: "cannot listen on metrics_listen \(endpoint)\(site): \(reason) (\(errno))")
        }
        self.fd = fd
        self.endpoint = Self.boundEndpoint(fd) ?? endpoint
        var ends: [Int32] = [-1, -1]
        _ = pipe(&ends)
        for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        wakeup = (ends[0], ends[1])
        self.body = body
        let thread = Thread { [self] in
            serve()
            done.signal()
        }
        thread.name = "portcullis-metrics"
        thread.start()
    }

    private static func boundEndpoint(_ fd: Int32) -> SocketEndpoint? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) == 0 }
        }
        return ok ? SocketEndpoint(storage) : nil
    }

    func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        var one: UInt8 = 1
        _ = write(wakeup.write, &one, 1)
        done.wait()
        close(fd)
        close(wakeup.read)
        close(wakeup.write)
    }

    private func serve() {
        while !stopped.load(ordering: .relaxed) {
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeup.read, events: Int16(POLLIN), revents: 0)]
            guard poll(&fds, 2, -1) > 0 else { continue }
            if fds[1].revents != 0 { return }
            let client = accept(fd, nil, nil)
            guard client >= 0 else { continue }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            answer(client)
            close(client)
        }
    }

    private func answer(_ client: Int32) {
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var request: [UInt8] = []
        let end: [UInt8] = Array("\r\n\r\n".utf8)
        var chunk = [UInt8](repeating: 0, count: 2048)
        while request.count < 8192 {
            let n = recv(client, &chunk, chunk.count, 0)
            guard n > 0 else { return }
            request += chunk[0..<n]
            if request.suffix(n + 3).contains(end) { break }
        }
        let line = String(decoding: request.prefix { $0 != UInt8(ascii: "\r") && $0 != UInt8(ascii: "\n") }, as: UTF8.self)
        let parts = line.split(separator: " ")
        let (status, type, payload): (String, String, [UInt8])
        if parts.count != 3 || !parts[2].hasPrefix("HTTP/") {
            (status, type, payload) = ("400 Bad Request", "text/plain", Array("bad request\n".utf8))
        } else if parts[0] != "GET" && parts[0] != "HEAD" {
            (status, type, payload) = ("405 Method Not Allowed", "text/plain", Array("only GET\n".utf8))
        } else if let path = parts[1].split(separator: "?").first, path == "/metrics" || path == "/" {
            (status, type, payload) = ("200 OK", "text/plain; version=0.0.4; charset=utf-8", parts[0] == "HEAD" ? [] : body())
        } else {
            (status, type, payload) = ("404 Not Found", "text/plain", Array("the metrics are at /metrics\n".utf8))
        }
        let head = "HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(payload.count)\r\nConnection: close\r\n\r\n"
        sendAll(client, Array(head.utf8) + payload)
    }

    private func sendAll(_ client: Int32, _ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { return }
            offset += n
        }
    }
}
