import Glibc
import PortcullisCore
@testable import PortcullisEngine
import Testing

/// The engine's bookkeeping without sockets: the timer heap, event tokens, socket addresses.
@Suite("engine structures")
struct EngineStructuresTests {
    @Test("the timer heap gives deadlines back in order, and only once they are due")
    func timerHeapOrder() {
        var heap = TimerHeap()
        var generator = SystemRandomNumberGenerator()
        let deadlines = (0..<1_000).map { _ in UInt64.random(in: 1...10_000, using: &generator) }
        for (index, deadline) in deadlines.enumerated() {
            heap.push(.init(deadline: deadline, slot: UInt32(index), generation: 1))
        }
        #expect(heap.popDue(now: 0) == nil, "nothing is due before the earliest deadline")
        var popped: [UInt64] = []
        while let entry = heap.popDue(now: 5_000) { popped.append(entry.deadline) }
        #expect(popped == deadlines.filter { $0 <= 5_000 }.sorted())
        #expect(heap.count == deadlines.filter { $0 > 5_000 }.count)
        #expect(heap.earliest == deadlines.filter { $0 > 5_000 }.min())
        while let entry = heap.popDue(now: .max) { popped.append(entry.deadline) }
        #expect(popped == deadlines.sorted())
        #expect(heap.isEmpty)
    }

    @Test("an event token carries tag, slot, generation and dial attempt through epoll's data word")
    func tokenRoundTrip() {
        let cases: [EventToken] = [
            EventToken(tag: .client, slot: 0, generation: 1),
            EventToken(tag: .upstream, slot: 0xFF_FFFF, generation: .max, attempt: 63),
            EventToken(tag: .listener, slot: 7),
            EventToken(tag: .wake, slot: 0),
            EventToken(tag: .upstream, slot: 12_345, generation: 99, attempt: 64),  // attempts wrap at 64
        ]
        for token in cases {
            #expect(EventToken(word: token.word) == token)
        }
        #expect(EventToken(tag: .upstream, slot: 1, attempt: 64).attempt == 0)
        #expect(EventToken(tag: .upstream, slot: 1, attempt: 1).word != EventToken(tag: .upstream, slot: 1, attempt: 2).word)
    }

    @Test("socket addresses convert both ways, IPv4 and IPv6, ports in network order")
    func socketAddresses() throws {
        for text in ["127.0.0.1:80", "10.1.2.3:65535", "[::1]:443", "[2001:db8::5]:1", "[::ffff:192.0.2.1]:8080"] {
            let endpoint = try #require(SocketEndpoint(text))
            let back = endpoint.withSockAddr { pointer, length -> SocketEndpoint? in
                var storage = sockaddr_storage()
                withUnsafeMutableBytes(of: &storage) { raw in
                    raw.copyMemory(from: UnsafeRawBufferPointer(start: pointer, count: Int(length)))
                }
                return SocketEndpoint(storage)
            }
            #expect(back == endpoint, "\(text)")
        }
        let port = try #require(SocketEndpoint("127.0.0.1:8080")).withSockAddr { pointer, _ in
            pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_port }
        }
        #expect(port == UInt16(8080).bigEndian)
    }

    @Test("failed system calls read as nginx writes them; resets are passed on as resets")
    func errorWording() {
        #expect("\(SystemCallError("recv", errno: ECONNRESET))" == "recv() failed (104: Connection reset by peer)")
        #expect("\(DialFailure(errno: ECONNREFUSED))" == "connect() failed (111: Connection refused)")
        #expect(SessionMachineFailureProbe.kind(ECONNRESET) == "reset")
        #expect(SessionMachineFailureProbe.kind(EPIPE) == "reset")
        #expect(SessionMachineFailureProbe.kind(ETIMEDOUT) == "error")
    }
}

import PortcullisPolicy

enum SessionMachineFailureProbe {
    static func kind(_ errno: Int32) -> String {
        switch SessionMachine.Failure(SystemCallError("recv", errno: errno)) {
        case .reset: "reset"
        case .error: "error"
        case .quiet: "quiet"
        }
    }
}
