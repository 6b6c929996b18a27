#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

/// Issue #13 point 4: `return VALUE;` — the server answers by itself with text and variables,
/// after the access and limit phases, instead of proxying; for TCP checked against nginx 1.22
/// on the same rule file (what the client receives and what the access log says).
@Suite("return", .serialized)
struct ReturnTests {
    /// `proxy_pass` first and `return` last: in nginx the later one is what runs.
    static let rules = """
        stream {
            error_log {DIR}/error.log info;
            log_format l '$remote_port $remote_addr $status $bytes_sent $bytes_received';
            access_log {DIR}/access.log l;
            server {
                listen 127.0.0.1:{PORT} proxy_protocol;
                set_real_ip_from 127.0.0.1;
                deny 10.6.6.6;
                proxy_pass 127.0.0.1:1;
                return "hello $remote_addr:$remote_port from $proxy_protocol_server_port\\n";
            }
        }
        """

    /// Each client: what it received before the close, by its PROXY header's source port.
    static func probe(port: UInt16, clients: [(String, UInt16)]) throws -> [UInt16: [UInt8]] {
        var received: [UInt16: [UInt8]] = [:]
        for (client, sourcePort) in clients {
            let connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
            connection.setTimeout(5)
            try connection.send("PROXY TCP4 \(client) 127.0.0.1 \(sourcePort) 7000\r\n")
            received[sourcePort] = (try? connection.receiveAll(limit: 4096)) ?? Array("(no close)".utf8)
            connection.close()
        }
        return received
    }

    @Test("return after a PROXY header, with a deny: the same bytes to each client and the same log lines as nginx (200 with the text's length, 403 with nothing)")
    func sameAsNginx() async throws {
        let nginx = try ExternalPeer.nginx(Self.rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(Self.rules)
        let clients = [("10.1.1.1", UInt16(6001)), ("10.6.6.6", 6002), ("192.0.2.77", 6003)]
        let theirs = try Self.probe(port: nginx.port, clients: clients)
        let ours = try Self.probe(port: gateway.port, clients: clients)
        #expect(theirs[6001] == Array("hello 10.1.1.1:6001 from 7000\n".utf8), "nginx: \(String(decoding: theirs[6001] ?? [], as: UTF8.self))")
        #expect(theirs[6002] == [], "nginx refuses 10.6.6.6 with nothing")
        #expect(ours == theirs, "Portcullis \(ours.mapValues { String(decoding: $0, as: UTF8.self) }), nginx \(theirs.mapValues { String(decoding: $0, as: UTF8.self) })")
        let ourLines = await gateway.waitForLines(of: "access.log", timeout: 5) { $0.count >= 3 }
        let deadline = Date().addingTimeInterval(5)
        while nginx.logLines().count < 3 && Date() < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(Set(ourLines) == Set(nginx.logLines()), "Portcullis \(ourLines), nginx \(nginx.logLines())")
        #expect(Set(ourLines).contains("6001 10.1.1.1 200 \(Array("hello 10.1.1.1:6001 from 7000\n".utf8).count) 0"), "\(ourLines)")
        await gateway.stop()
    }

    @Test("return on udp: each datagram is answered with the value and its session ends at once (200, the datagram counted as received, as nginx logs it)")
    func udp() async throws {
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format l '$protocol $status $bytes_sent $bytes_received';
                access_log {DIR}/access.log l;
                server {
                    listen 127.0.0.1:{PORT} udp;
                    return "u $remote_addr";
                }
            }
            """)
        let client = try UDPTestSocket(bind: "127.0.0.1")
        try client.connect("127.0.0.1", gateway.port)
        for _ in 0..<3 {
            try client.send(Array("q".utf8))
            #expect(client.receive(timeout: 2) == Array("u 127.0.0.1".utf8))
        }
        let lines = await gateway.waitForLines(of: "access.log", timeout: 3) { $0.count >= 3 }
        #expect(lines == Array(repeating: "UDP 200 11 1", count: 3), "\(lines)")
        #expect(gateway.gateway.liveSessions == 0)
        await gateway.stop()
    }

    @Test("set lines run in order, as nginx: set $x \"${x}b\" builds on the earlier value, and on nothing before the first; the same answers as nginx")
    func setBuildsStepByStep() async throws {
        let rules = """
            stream {
                server {
                    listen 127.0.0.1:{PORT};
                    set $x a;
                    set $x "${x}b";
                    set $x "$x-$remote_addr";
                    set $y "${y}z";
                    return "$x [$y]";
                }
            }
            """
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        func ask(_ port: UInt16) throws -> String {
            let connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
            connection.setTimeout(3)
            defer { connection.close() }
            return String(decoding: try connection.receiveAll(limit: 100), as: UTF8.self)
        }
        let theirs = try ask(nginx.port)
        #expect(theirs == "ab-127.0.0.1 [z]", "nginx: \(theirs)")
        #expect(try ask(gateway.port) == theirs)
        await gateway.stop()
    }
}
