#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

/// Issue #13 point 7: `access_log … gzip[=level] [buffer=] [flush=]`, against nginx 1.22 on the
/// same rule file: what each file holds while the gateway runs, after `flush=`, and after a
/// reopen (SIGUSR1), read back by Python's zlib rather than by our own code.
@Suite("buffered and gzip access logs", .serialized)
struct BufferedLogTests {
    static let rules = """
        stream {
            log_format l '$remote_addr $remote_port $status $bytes_sent';
            # No flush=: lines stay in memory until the buffer is full or the file is reopened.
            access_log {DIR}/held.log.gz l gzip;
            access_log {DIR}/access.log.gz l gzip=6 flush=1s;
            server {
                listen 127.0.0.1:{PORT} proxy_protocol;
                set_real_ip_from 127.0.0.1;
                deny 10.6.6.6;
                return "hi $remote_addr";
            }
        }
        """

    static func lines(_ members: [String]?) -> [String] {
        (members ?? []).joined().split(separator: "\n").map(String.init).sorted()
    }

    static func visit(port: UInt16) throws {
        for (client, sourcePort) in [("10.1.1.1", 6001), ("10.6.6.6", 6002), ("192.0.2.77", 6003)] {
            let connection = try TestConnection.connect(to: "127.0.0.1", port: port, timeout: 3)
            connection.setTimeout(5)
            try connection.send("PROXY TCP4 \(client) 127.0.0.1 \(sourcePort) 7000\r\n")
            _ = try? connection.receiveAll(limit: 4096)
            connection.close()
        }
    }

    @Test("gzip flush=1s: the lines arrive as gzip after about a second; gzip without flush= holds them until SIGUSR1; the same lines and the same file states as nginx")
    func sameAsNginx() async throws {
        let nginx = try ExternalPeer.nginx(Self.rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(Self.rules)
        try Self.visit(port: nginx.port)
        try Self.visit(port: gateway.port)
        let expected = ["10.1.1.1 6001 200 11", "10.6.6.6 6002 403 0", "192.0.2.77 6003 200 13"]

        // Right after the sessions nothing is written yet (the flush clock runs for 1 s).
        #expect(gzipMembers(gateway.path("access.log.gz")) == [], "Portcullis wrote before flush=1s")
        try await Task.sleep(for: .milliseconds(1_800))
        for (who, folder) in [("nginx", nginx.path("")), ("Portcullis", gateway.path(""))] {
            let flushed = gzipMembers(folder + "/access.log.gz")
            #expect(flushed?.count == 1, "\(who): one gzip member per buffer write: \(String(describing: flushed))")
            #expect(Self.lines(flushed) == expected, "\(who): \(String(describing: flushed))")
            // The buffer without flush= still holds its three lines.
            #expect(gzipMembers(folder + "/held.log.gz") == [], "\(who) wrote the held buffer early")
        }

        // Reopen (logrotate's SIGUSR1): what the buffer holds goes to the file first.
        kill(nginx.pid, SIGUSR1)
        gateway.gateway.reopenLogs()
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline,
              gzipMembers(gateway.path("held.log.gz"))?.isEmpty != false || gzipMembers(nginx.path("held.log.gz"))?.isEmpty != false {
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(Self.lines(gzipMembers(nginx.path("held.log.gz"))) == expected)
        #expect(Self.lines(gzipMembers(gateway.path("held.log.gz"))) == expected)
        await gateway.stop()
    }
}
