#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import PortcullisTestSupport

/// Issue #13 point 6: `proxy_bind ADDRESS [transparent]`: the upstream sees the address the
/// gateway bound to; a variable's empty value means no bind, a value that is not an address an
/// error line and no bind; an address that cannot be bound is nginx's 500. Checked against
/// nginx 1.22 on the same rule file; the transparent mode for real in a network namespace.
@Suite("proxy_bind", .serialized)
struct ProxyBindTests {
    /// An upstream that answers each connection with the source address it sees, then closes.
    static func sourceReporter() throws -> TestServer {
        try TestServer { connection in
            let seen = (try? connection.remoteEndpoint().address) ?? "?"
            try? connection.send(seen + "\n")
            connection.close()
        }
    }

    static func rules(upstream: UInt16) -> String {
        """
        stream {
            error_log {DIR}/error.log info;
            log_format l '$remote_addr $status';
            access_log {DIR}/access.log l;
            map $remote_addr $source {
                127.0.0.5   127.0.0.9;
                127.0.0.6   foo;
                127.0.0.8   10.9.9.9;
                default     "";
            }
            server {
                listen 127.0.0.1:{PORT};
                proxy_bind $source;
                proxy_pass 127.0.0.1:\(upstream);
            }
        }
        """
    }

    static func probe(port: UInt16) throws -> [String: String] {
        var seen: [String: String] = [:]
        for client in ["127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"] {
            let connection = try TestConnection.connect(to: "127.0.0.1", port: port, from: client, timeout: 3)
            connection.setTimeout(5)
            seen[client] = String(decoding: (try? connection.receiveAll(limit: 256)) ?? [], as: UTF8.self)
            connection.close()
        }
        return seen
    }

    @Test("proxy_bind $variable: an address is used, an empty value and a non-address are not (with an error line), an address that is not this host's is a 500; the same as nginx")
    func variableSameAsNginx() async throws {
        let upstream = try Self.sourceReporter()
        defer { upstream.stop() }
        let rules = Self.rules(upstream: upstream.port)
        let nginx = try ExternalPeer.nginx(rules)
        defer { nginx.stop() }
        let gateway = try await GatewayHarness.start(rules)
        let theirs = try Self.probe(port: nginx.port)
        let ours = try Self.probe(port: gateway.port)
        #expect(theirs == ["127.0.0.5": "127.0.0.9\n", "127.0.0.6": "127.0.0.1\n", "127.0.0.7": "127.0.0.1\n", "127.0.0.8": ""],
                "nginx: \(theirs)")
        #expect(ours == theirs)
        let expectedLines: Set = ["127.0.0.5 200", "127.0.0.6 200", "127.0.0.7 200", "127.0.0.8 500"]
        let ourLines = await gateway.waitForLines(of: "access.log", timeout: 5) { $0.count >= 4 }
        let theirLines = await nginx.waitForLogLines { $0.count >= 4 }
        #expect(Set(theirLines) == expectedLines, "nginx: \(theirLines)")
        #expect(Set(ourLines) == expectedLines, "Portcullis: \(ourLines)")
        let errors = await gateway.waitForLines(of: "error.log", timeout: 3) { lines in lines.contains { $0.contains("bind(") } }
        #expect(errors.contains { $0.contains("[error]") && $0.contains("invalid local address \"foo\", client: 127.0.0.6") }, "\(errors)")
        #expect(errors.contains {
            $0.contains("[crit]") && $0.contains("bind(10.9.9.9) failed (99: Cannot assign requested address) while connecting to upstream, client: 127.0.0.8")
        }, "\(errors)")
        await gateway.stop()
    }

    @Test("proxy_bind on udp: the upstream's datagrams come from the bound address and port")
    func udpFixedAddress() async throws {
        let upstream = try UDPTestSocket(bind: "127.0.0.1")
        let bindPort = try freePort(host: "127.0.0.3")
        let gateway = try await GatewayHarness.start("""
            stream {
                server {
                    listen 127.0.0.1:{PORT} udp;
                    proxy_bind 127.0.0.3:\(bindPort);
                    proxy_pass 127.0.0.1:\(upstream.localPort);
                }
            }
            """)
        let client = try UDPTestSocket(bind: "127.0.0.1")
        try client.connect("127.0.0.1", gateway.port)
        try client.send(Array("ping".utf8))
        let got = upstream.receiveFrom(timeout: 3)
        #expect(got?.bytes == Array("ping".utf8))
        #expect(got?.host == "127.0.0.3" && got?.port == bindPort, "the upstream saw \(String(describing: got?.host)):\(String(describing: got?.port))")
        await gateway.stop()
    }

    /// Whether this machine lets the tests make a network namespace (root, or a kernel that
    /// allows unprivileged user namespaces is not enough: the routing rules need CAP_NET_ADMIN).
    static let namespacesWork: Bool = {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
        process.arguments = ["-n", "/usr/sbin/ip", "link", "set", "lo", "up"]
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return false }
        process.waitUntilExit()
        return process.terminationStatus == 0
    }()

    /// Runs in a fresh network namespace (`unshare -n`): loopback up, a local route for every
    /// address in table 100, and rules that send the upstream's replies (from its port) there:
    /// nginx's IP-transparency recipe without the iptables mark. Then an upstream that reports
    /// the source it sees, the gateway, and clients that send PROXY headers naming foreign
    /// addresses. Prints one JSON object.
    static let namespaceScript = #"""
        import json, socket, subprocess, sys, threading, time
        binary, folder = sys.argv[1], sys.argv[2]
        def ip(*args): subprocess.run(["/usr/sbin/ip", *args], check=True)
        ip("link", "set", "lo", "up")
        ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        ip("rule", "add", "from", "127.0.0.1", "ipproto", "tcp", "sport", "7010", "lookup", "100")
        ip("-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100")
        ip("-6", "rule", "add", "from", "::1", "ipproto", "tcp", "sport", "7011", "lookup", "100")
        def upstream(family, host, port):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port)); s.listen(16)
            while True:
                c, peer = s.accept()
                c.sendall((peer[0] + "\n").encode()); c.close()
        for args in [(socket.AF_INET, "127.0.0.1", 7010), (socket.AF_INET6, "::1", 7011)]:
            threading.Thread(target=upstream, args=args, daemon=True).start()
        gateway = subprocess.Popen([binary, "run", "-c", folder + "/rules.conf"],
                                   stdout=subprocess.DEVNULL, stderr=open(folder + "/stderr.log", "w"))
        def ask(port, header):
            deadline = time.time() + 10
            while True:
                try:
                    c = socket.create_connection(("127.0.0.1", port), timeout=5); break
                except OSError:
                    if time.time() > deadline: return "(gateway not listening)"
                    time.sleep(0.05)
            c.sendall(header.encode())
            data = b""
            while True:
                chunk = c.recv(256)
                if not chunk: break
                data += chunk
            c.close()
            return data.decode().strip()
        result = {
            "transparent4": ask(8001, "PROXY TCP4 192.0.2.1 127.0.0.1 1234 8001\r\n"),
            "transparent6": ask(8003, "PROXY TCP6 2001:db8::1 ::1 1234 8003\r\n"),
            "plain": ask(8002, "PROXY TCP4 192.0.2.2 127.0.0.1 1234 8002\r\n"),
        }
        gateway.terminate(); gateway.wait(timeout=10)
        print(json.dumps(result))
        """#

    @Test("proxy_bind $remote_addr transparent in a network namespace: the upstream sees the client's own address from its PROXY header (IPv4 and IPv6); without transparent the bind fails with 500",
          .enabled(if: namespacesWork, "needs `unshare -n` and CAP_NET_ADMIN (root) to make a network namespace with its own routing rules"))
    func transparentInANamespace() async throws {
        let folder = try makeTemporaryDirectory("portcullis-transparent")
        defer { try? FileManager.default.removeItem(at: folder) }
        try """
            stream {
                error_log \(folder.path)/error.log info;
                log_format l '$remote_addr $status $upstream_addr';
                access_log \(folder.path)/access.log l;
                proxy_bind $remote_addr transparent;
                server { listen 127.0.0.1:8001 proxy_protocol; set_real_ip_from 127.0.0.1; proxy_pass 127.0.0.1:7010; }
                server { listen 127.0.0.1:8003 proxy_protocol; set_real_ip_from 127.0.0.1; proxy_pass [::1]:7011; }
                server {
                    listen 127.0.0.1:8002 proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    proxy_bind $remote_addr;
                    proxy_pass 127.0.0.1:7010;
                }
            }
            """.write(toFile: folder.path + "/rules.conf", atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/timeout")
        process.arguments = ["60", "/usr/bin/unshare", "-n", "/usr/bin/python3", "-c", Self.namespaceScript,
                             PortcullisBinary.url.path, folder.path]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let stderr = (try? String(contentsOfFile: folder.path + "/stderr.log", encoding: .utf8)) ?? ""
        let result = try #require(try? JSONDecoder().decode([String: String].self, from: data),
                                  "script: \(String(decoding: data, as: UTF8.self)) gateway stderr: \(stderr)")
        #expect(result["transparent4"] == "192.0.2.1", "\(result)")
        #expect(result["transparent6"] == "2001:db8::1", "\(result)")
        #expect(result["plain"] == "", "without transparent the foreign address cannot be bound: \(result)")
        let log = (try? String(contentsOfFile: folder.path + "/access.log", encoding: .utf8)) ?? ""
        #expect(Set(log.split(separator: "\n").map(String.init))
                == ["192.0.2.1 200 127.0.0.1:7010", "2001:db8::1 200 [::1]:7011", "192.0.2.2 500 -"], "\(log)")
        let errors = (try? String(contentsOfFile: folder.path + "/error.log", encoding: .utf8)) ?? ""
        #expect(errors.contains("bind(192.0.2.2) failed (99: Cannot assign requested address)"), "\(errors)")
    }
}
