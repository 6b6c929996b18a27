#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import PortcullisTestSupport

/// The relay over real loopback sockets: in-process gateway, blocking-socket peers.
@Suite("Relay", .serialized)
struct RelayTests {
    static let logFormat = """
        log_format main '$remote_addr $status $bytes_sent $bytes_received $upstream_addr $upstream_bytes_sent $upstream_bytes_received';
        """

    @Test("an allowed client's bytes echo through and the session is logged with its byte counts")
    func echo() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                \(Self.logFormat)
                access_log {DIR}/access.log main;
                server { listen 127.0.0.1:{PORT}; proxy_pass 127.0.0.1:\(upstream.port); }
            }
            """)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try client.send("hello, gateway")
        #expect(try client.receive(exactly: 14) == Array("hello, gateway".utf8))
        try client.send("again")
        #expect(try client.receive(exactly: 5) == Array("again".utf8))
        client.close()
        let lines = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        #expect(lines == ["127.0.0.1 200 19 19 127.0.0.1:\(upstream.port) 19 19"])
        #expect(upstream.connectionCount == 1)
        await gateway.stop()
    }

    @Test("64 MiB each way arrive byte-exact (SHA-256) with proxy_half_close on", arguments: [true, false])
    func bulkByteExact(throughGateway: Bool) async throws {
        let size = 64 << 20
        let chunk = 256 << 10
        let received = ReceivedHash()
        let upstream = try TestServer { connection in
            // Send our own 64 MiB while hashing what arrives.
            let sender = Thread {
                var pattern = PatternStream(seed: 2)
                var sent = 0
                while sent < size {
                    try? connection.send(pattern.next(chunk))
                    sent += chunk
                }
                connection.shutdownWrite()
            }
            sender.start()
            var hasher = SHA256()
            var count = 0
            while let bytes = try? connection.receive(max: 1 << 20), !bytes.isEmpty {
                hasher.update(bytes)
                count += bytes.count
            }
            received.set(hex: hasher.finalize().hex, count: count)
            while !sender.isFinished { usleep(1000) }
            connection.close()
        }
        let gateway = try await GatewayHarness.start("""
            stream {
                server { listen 127.0.0.1:{PORT}; proxy_half_close on; proxy_pass 127.0.0.1:\(upstream.port); }
            }
            """)
        // Direct too, so a fault in the test's own peers cannot pass for a relay fault.
        let client = try TestConnection.connect(
            to: "127.0.0.1", port: throughGateway ? gateway.port : upstream.port, timeout: 60)
        let sender = Thread {
            var pattern = PatternStream(seed: 1)
            var sent = 0
            while sent < size {
                try? client.send(pattern.next(chunk))
                sent += chunk
            }
            client.shutdownWrite()
        }
        sender.start()
        var hasher = SHA256()
        var count = 0
        while true {
            let bytes = try client.receive(max: 1 << 20)
            if bytes.isEmpty { break }
            hasher.update(bytes)
            count += bytes.count
        }
        let clientHash = hasher.finalize().hex
        var expected1 = SHA256(), expected2 = SHA256()
        var p1 = PatternStream(seed: 1), p2 = PatternStream(seed: 2)
        for _ in 0..<(size / chunk) {
            expected1.update(p1.next(chunk))
            expected2.update(p2.next(chunk))
        }
        #expect(count == size)
        #expect(clientHash == expected2.finalize().hex)
        let upstreamSide = await received.wait()
        #expect(upstreamSide.count == size)
        #expect(upstreamSide.hex == expected1.finalize().hex)
        client.close()
        await gateway.stop()
    }

    @Test("half-close: the client shuts its write side and still receives the reply")
    func halfClose() async throws {
        let upstream = try Self.replyAfterEOF()
        let gateway = try await GatewayHarness.start("""
            stream {
                server { listen 127.0.0.1:{PORT}; proxy_half_close on; proxy_pass 127.0.0.1:\(upstream.port); }
            }
            """)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try client.send("hello")
        client.shutdownWrite()
        #expect(String(decoding: try client.receiveAll(), as: UTF8.self) == "got 5 bytes")
        await gateway.stop()
    }

    @Test("without proxy_half_close (nginx's default) the session ends at the client's EOF")
    func noHalfCloseEndsSession() async throws {
        let upstream = try Self.replyAfterEOF()
        let gateway = try await GatewayHarness.start("""
            stream {
                server { listen 127.0.0.1:{PORT}; proxy_pass 127.0.0.1:\(upstream.port); }
            }
            """)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try client.send("hello")
        client.shutdownWrite()
        #expect(try client.receiveAll().isEmpty)
        await gateway.stop()
    }

    /// Reads until EOF, then answers how many bytes it got.
    /// A listening socket that never accepts, its queue already full: a connect to it hangs (the
    /// kernel drops the SYN) until the connecting side gives up.
    final class StuckListener {
        let port: UInt16
        private var fds: [Int32] = []

        init() throws {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            _ = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard listen(fd, 0) == 0 else { throw HarnessError("listen: \(errno)") }
            fds.append(fd)
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
            }
            port = UInt16(bigEndian: address.sin_port)
            // Fill the accept queue (backlog 0 holds one) and the SYN queue behind it.
            for _ in 0..<2 {
                let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                _ = withUnsafePointer(to: &address) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                }
                fds.append(client)
            }
            usleep(100_000)
        }

        deinit { for fd in fds { Glibc.close(fd) } }
    }

    @Test("a client that sends and closes its write side before the upstream connect completes: its bytes and its EOF reach the upstream once it does (with and without proxy_half_close); if no attempt succeeds, one 502 and nothing left behind")
    func clientEOFBeforeUpstreamConnects() async throws {
        let stuck = try StuckListener()
        let seen = Mutex<[Int]>([])  // bytes each upstream connection received before EOF
        let upstream = try TestServer { connection in
            let bytes = (try? connection.receiveAll()) ?? []
            seen.withLock { $0.append(bytes.count) }
            try? connection.send("got \(bytes.count) bytes")
            connection.close()
        }
        for halfClose in ["on", "off"] {
            // The first server hangs for proxy_connect_timeout, so the client's bytes and FIN
            // arrive while the gateway is still connecting; the second server answers.
            let gateway = try await GatewayHarness.start("""
                stream {
                    upstream pair { server 127.0.0.1:\(stuck.port); server 127.0.0.1:\(upstream.port); }
                    server {
                        listen 127.0.0.1:{PORT};
                        proxy_connect_timeout 400ms;
                        proxy_half_close \(halfClose);
                        proxy_pass pair;
                    }
                }
                """)
            let before = upstream.connectionCount
            let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
            try client.send("hello")
            client.shutdownWrite()
            let reply = String(decoding: try client.receiveAll(), as: UTF8.self)
            if halfClose == "on" {
                #expect(reply == "got 5 bytes", "proxy_half_close on: the upstream's answer to the 5 bytes")
            }
            // (With proxy_half_close off the client can see its close before the upstream's
            // accept thread has counted the connection: wait for it, bounded.)
            let deadline = Date().addingTimeInterval(3)
            while (seen.withLock({ $0.count }) < before + 1 || upstream.connectionCount < before + 1) && Date() < deadline { usleep(10_000) }
            #expect(upstream.connectionCount == before + 1, "the second server was reached")
            let counts = seen.withLock { $0 }
            #expect(counts.count == before + 1 && counts.last == 5, "proxy_half_close \(halfClose): the upstream got the 5 bytes, then EOF: \(counts)")
            await gateway.stop()
        }

        // Every attempt fails: the kept bytes go nowhere, the client is closed, the session is
        // logged once (502) and leaves nothing behind.
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format main '$status $bytes_received';
                access_log {DIR}/access.log main;
                server { listen 127.0.0.1:{PORT}; proxy_connect_timeout 300ms; proxy_pass 127.0.0.1:\(stuck.port); }
            }
            """)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try client.send("hello")
        client.shutdownWrite()
        #expect(try client.receiveAll().isEmpty)
        let lines = await gateway.waitForLines(of: "access.log", timeout: 3) { !$0.isEmpty }
        #expect(lines == ["502 0"], "\(lines)")
        #expect(gateway.gateway.liveSessions == 0)
        await gateway.stop()
    }

    static func replyAfterEOF() throws -> TestServer {
        try TestServer { connection in
            let bytes = (try? connection.receiveAll()) ?? []
            try? connection.send("got \(bytes.count) bytes")
            connection.close()
        }
    }

    @Test("an upstream that is down gives $status 502 in the access log and the client is closed")
    func upstreamDown() async throws {
        let deadPort = try freePort()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format main '$status $upstream_addr $upstream_connect_time';
                access_log {DIR}/access.log main;
                error_log {DIR}/error.log info;
                server { listen 127.0.0.1:{PORT}; proxy_pass 127.0.0.1:\(deadPort); }
            }
            """)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        #expect(try client.receiveAll().isEmpty)
        let lines = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        #expect(lines == ["502 127.0.0.1:\(deadPort) -"])
        await gateway.stop()
    }

    @Test("a failed upstream server is skipped for the next one in the group")
    func nextUpstream() async throws {
        let deadPort = try freePort()
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format main '$status $upstream_addr';
                access_log {DIR}/access.log main;
                upstream pool { server 127.0.0.1:\(deadPort); server 127.0.0.1:\(upstream.port); }
                server { listen 127.0.0.1:{PORT}; proxy_pass pool; }
            }
            """)
        for _ in 0..<2 {
            let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
            try client.send("x")
            #expect(try client.receive(exactly: 1) == [UInt8(ascii: "x")])
            client.close()
        }
        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= 2 }
        // The first session tries the dead server first; after that it is marked failed
        // (max_fails=1 within fail_timeout) and skipped. (Sessions end on different event
        // loops, so their lines may come in either order.)
        #expect(Set(lines) == ["200 127.0.0.1:\(deadPort), 127.0.0.1:\(upstream.port)", "200 127.0.0.1:\(upstream.port)"])
        await gateway.stop()
    }

    @Test("a client that resets its connection costs that connection only")
    func resetDoesNotHurtListener() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream { server { listen 127.0.0.1:{PORT}; proxy_pass 127.0.0.1:\(upstream.port); } }
            """)
        for _ in 0..<20 {
            let rude = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
            try rude.send("partial")
            rude.reset()
        }
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try client.send("still here")
        #expect(try client.receive(exactly: 10) == Array("still here".utf8))
        client.close()
        await gateway.stop()
    }

    @Test("a client's reset reaches the upstream as a reset, not as an orderly end")
    func resetPropagates() async throws {
        let outcome = ReceivedHash()
        let upstream = try TestServer { connection in
            do {
                let bytes = try connection.receiveAll()
                outcome.set(hex: "eof", count: bytes.count)
            } catch TestSocketError.system(_, let code) {
                outcome.set(hex: code == ECONNRESET ? "reset" : "error \(code)", count: 0)
            } catch {
                outcome.set(hex: "\(error)", count: 0)
            }
        }
        let gateway = try await GatewayHarness.start("""
            stream { server { listen 127.0.0.1:{PORT}; proxy_pass 127.0.0.1:\(upstream.port); } }
            """)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try client.send("some bytes")
        try await Task.sleep(for: .milliseconds(100))  // let the upstream leg be established
        client.reset()
        let result = await outcome.wait()
        #expect(result.hex == "reset")
        await gateway.stop()
    }

    @Test("proxy_timeout closes an idle session")
    func idleTimeout() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream { server { listen 127.0.0.1:{PORT}; proxy_timeout 300ms; proxy_pass 127.0.0.1:\(upstream.port); } }
            """)
        let client = try TestConnection.connect(to: "127.0.0.1", port: gateway.port)
        try client.send("a")
        #expect(try client.receive(exactly: 1) == [UInt8(ascii: "a")])
        let start = Date()
        #expect(try client.receiveAll().isEmpty)  // closed by the gateway, not by our 10 s timeout
        let waited = Date().timeIntervalSince(start)
        #expect(waited > 0.2 && waited < 3)
        await gateway.stop()
    }

    @Test("a long proxy_timeout (12s, watched by the event loop's once-a-second sweep) closes idle sessions within about a second after 12 s idle, and not an active one")
    func longIdleTimeoutSwept() async throws {
        let upstream = try TestServer.echo()
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log info;
                server { listen 127.0.0.1:{PORT}; proxy_timeout 12s; proxy_pass 127.0.0.1:\(upstream.port); }
            }
            """)
        // Eight idle sessions, and one kept busy past the timeout by a byte every second.
        let idle = try (0..<8).map { _ in try TestConnection.connect(to: "127.0.0.1", port: gateway.port, timeout: 20) }
        for connection in idle {
            try connection.send("a")
            #expect(try connection.receive(exactly: 1) == [UInt8(ascii: "a")])
        }
        let busy = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, timeout: 20)
        let start = Date()
        // Blocking reads on threads of their own (not on the tests' cooperative thread pool).
        let closedAfter = Mutex<[Double]>([])
        for connection in idle {
            Thread {
                if (try? connection.receiveAll())?.isEmpty == true {
                    closedAfter.withLock { $0.append(Date().timeIntervalSince(start)) }
                }
            }.start()
        }
        // Meanwhile the busy one talks for 14 s: it must stay open throughout.
        for _ in 0..<14 {
            try busy.send("b")
            #expect(try busy.receive(exactly: 1) == [UInt8(ascii: "b")])
            usleep(1_000_000)
        }
        let waits = closedAfter.withLock { $0 }
        #expect(waits.count == 8)
        #expect(waits.allSatisfy { $0 > 11.8 && $0 < 13.8 }, "\(waits)")
        try busy.send("c")
        #expect(try busy.receive(exactly: 1) == [UInt8(ascii: "c")], "the active session is still open")
        let timedOut = gateway.lines(of: "error.log").filter { $0.contains("connection timed out (proxy_timeout)") }
        #expect(timedOut.count == 8, "one line per idle session, not one per sweep: \(timedOut.count)")
        // Ended sessions leave the sweep: only the busy one is watched, then none.
        #expect(await gateway.gateway.sweptSessions() == 1)
        busy.close()
        let deadline = Date().addingTimeInterval(3)
        while await gateway.gateway.sweptSessions() > 0 && Date() < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(await gateway.gateway.sweptSessions() == 0)
        await gateway.stop()
    }

    @Test("a streamed chunked HTTP response arrives chunk by chunk, as fast as it does directly")
    func chunkedStreamingIsNotHeldBack() async throws {
        let server = try ChunkedServer.start(chunks: 20, interval: 0.05)
        defer { server.stop() }
        let gateway = try await GatewayHarness.start("""
            stream { server { listen 127.0.0.1:{PORT}; proxy_pass 127.0.0.1:\(server.port); } }
            """)
        // Direct and through the gateway at the same time, so both see the same machine load.
        async let directDelays = Task.detached { try ChunkedServer.fetchDelays(port: server.port) }.value
        async let proxiedDelays = Task.detached { try ChunkedServer.fetchDelays(port: gateway.port) }.value
        let direct = try await directDelays
        let proxied = try await proxiedDelays
        #expect(direct.count == 20)
        #expect(proxied.count == 20)
        let sortedDirect = direct.sorted(), sortedProxied = proxied.sorted()
        let medianDirect = sortedDirect[10], medianProxied = sortedProxied[10]
        // Every chunk must arrive promptly: a gateway that buffered would add tens of ms
        // (one chunk interval is 50 ms).
        #expect(sortedProxied.last! < 0.025, "slowest chunk through the gateway took \(sortedProxied.last!) s")
        #expect(medianProxied - medianDirect < 0.005, "median added delay \(medianProxied - medianDirect) s")
        await gateway.stop()
    }
}

/// The Python chunked HTTP server from Tests/Fixtures.
struct ChunkedServer {
    let process: Process
    let port: UInt16

    static func start(chunks: Int, interval: Double) throws -> ChunkedServer {
        let directory = try makeTemporaryDirectory("chunked")
        let portFile = directory.appendingPathComponent("port").path
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", packageRoot.appendingPathComponent("Tests/Fixtures/chunked_server.py").path,
                             portFile, String(chunks), String(interval)]
        // Never inherit the test runner's output pipe: a leftover child would keep it open.
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if let text = try? String(contentsOfFile: portFile, encoding: .utf8), let port = UInt16(text) {
                return ChunkedServer(process: process, port: port)
            }
            usleep(20_000)
        }
        process.terminate()
        throw HarnessError("chunked_server.py did not start")
    }

    func stop() { process.terminate() }

    /// GETs the stream and returns, per chunk, receive time minus the time the server sent it.
    static func fetchDelays(port: UInt16) throws -> [Double] {
        let connection = try TestConnection.connect(to: "127.0.0.1", port: port)
        try connection.send("GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        var delays: [Double] = []
        var pending = ""
        while true {
            let bytes = try connection.receive()
            let now = Date().timeIntervalSince1970
            if bytes.isEmpty { break }
            pending += String(decoding: bytes, as: UTF8.self)
            while let newline = pending.firstIndex(of: "\n") {
                let line = pending[..<newline]
                if let range = line.range(of: "t=") , line.hasPrefix("chunk ") || line.contains("chunk "),
                   let sent = Double(line[range.upperBound...].trimmingCharacters(in: .whitespaces)) {
                    delays.append(now - sent)
                }
                pending = String(pending[pending.index(after: newline)...])
            }
            if pending.hasSuffix("0\r\n\r\n") { break }
        }
        return delays
    }
}

final class ReceivedHash: Sendable {
    private let value = Mutex<(hex: String, count: Int)?>(nil)

    func set(hex: String, count: Int) { value.withLock { $0 = (hex, count) } }

    func wait() async -> (hex: String, count: Int) {
        for _ in 0..<3000 {
            if let current = value.withLock({ $0 }) { return current }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return ("timeout", -1)
    }
}

extension Array where Element == UInt8 {
    var hex: String { map { String(format: "%02x", $0) }.joined() }
}
