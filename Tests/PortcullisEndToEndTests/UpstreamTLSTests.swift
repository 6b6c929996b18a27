#if canImport(Glibc)
import Glibc
#endif
import Foundation
import PortcullisTestSupport
import PortcullisWire
import Testing

/// Issue #14 parts 2 and 4: `proxy_ssl*` to real nginx and HAProxy TLS upstreams (SNI,
/// verification, client certificates, session reuse), and PROXY v2 SSL TLVs both ways: HAProxy
/// terminating TLS sends them to Portcullis, Portcullis terminating TLS sends them upstream.
@Suite("TLS to upstreams, PROXY v2 SSL TLVs", .serialized)
struct UpstreamTLSTests {
    /// nginx as a TLS upstream that says what the handshake brought.
    static func nginxUpstream(_ pki: TestPKI) throws -> ExternalPeer {
        try ExternalPeer.nginx("""
            stream {
                server {
                    listen 127.0.0.1:{PORT} ssl;
                    ssl_protocols TLSv1.2 TLSv1.3;
                    ssl_certificate \(pki.path("backend.test.crt"));
                    ssl_certificate_key \(pki.path("backend.test.key"));
                    ssl_verify_client optional;
                    ssl_client_certificate \(pki.path("ca.crt"));
                    return "sni=$ssl_server_name reused=$ssl_session_reused client=$ssl_client_s_dn\\n";
                }
            }
            """)
    }

    /// `ports[0]` is `{PORT}` (the harness's); the others are free ports.
    static func gatewayRules(_ pki: TestPKI, upstream: UInt16, ports: [UInt16]) -> String {
        """
        stream {
            error_log {DIR}/error.log info;
            log_format u '$server_port $status';
            access_log {DIR}/access.log u;
            proxy_ssl_trusted_certificate \(pki.path("ca.crt"));
            server {
                listen 127.0.0.1:{PORT};
                proxy_pass 127.0.0.1:\(upstream);
                proxy_ssl on;
                proxy_ssl_server_name on;
                proxy_ssl_name backend.test;
                proxy_ssl_verify on;
                proxy_ssl_certificate \(pki.path("client.crt"));
                proxy_ssl_certificate_key \(pki.path("client.key"));
            }
            server {
                listen 127.0.0.1:\(ports[1]);
                proxy_pass 127.0.0.1:\(upstream);
                proxy_ssl on;
                proxy_ssl_name wrong.test;
                proxy_ssl_verify on;
            }
            server {
                listen 127.0.0.1:\(ports[2]);
                proxy_pass 127.0.0.1:\(upstream);
                proxy_ssl on;
                proxy_ssl_session_reuse off;
            }
        }
        """
    }

    static func ask(_ port: UInt16) -> String { TestConnection.reply(from: port) }

    @Test("proxy_ssl to nginx: SNI from proxy_ssl_name, the upstream verified, a client certificate, the session reused on the next connection; a name the certificate lacks fails (502); the same replies as nginx proxying")
    func toNginxSameAsNginx() async throws {
        let pki = try TestPKI.shared()
        let upstream = try Self.nginxUpstream(pki)
        defer { upstream.stop() }
        var ourPorts = try (0..<3).map { _ in try freePort() }
        let gateway = try await GatewayHarness.start(Self.gatewayRules(pki, upstream: upstream.port, ports: ourPorts))
        ourPorts[0] = gateway.port
        var theirPorts = try (0..<3).map { _ in try freePort() }
        let nginx = try ExternalPeer.nginx(Self.gatewayRules(pki, upstream: upstream.port, ports: theirPorts))
        defer { nginx.stop() }
        theirPorts[0] = nginx.port
        for ports in [ourPorts, theirPorts] {
            let first = Self.ask(ports[0]), second = Self.ask(ports[0])
            #expect(first == "sni=backend.test reused=. client=CN=alice,O=Example\n", "\(ports): \(first)")
            #expect(second == "sni=backend.test reused=r client=CN=alice,O=Example\n", "\(ports): \(second)")
            #expect(Self.ask(ports[1]) == "", "\(ports): a name the certificate lacks")
            let plain = [Self.ask(ports[2]), Self.ask(ports[2])]
            #expect(plain == ["sni= reused=. client=\n", "sni= reused=. client=\n"], "\(ports): \(plain)")
        }
        let lines = await gateway.waitForLines(of: "access.log") { $0.count >= 5 }
        #expect(lines.filter { $0 == "\(ourPorts[0]) 200" }.count == 2, "\(lines)")
        #expect(lines.contains("\(ourPorts[1]) 502"), "\(lines)")
        // nginx's words for a name the certificate lacks, in both error logs.
        let mismatch = "upstream SSL certificate does not match \"wrong.test\" while SSL handshaking to upstream"
        let errors = gateway.lines(of: "error.log")
        #expect(errors.contains { $0.contains(mismatch) }, "\(errors)")
        #expect(nginx.lines(of: "error.log").contains { $0.contains(mismatch) }, "\(nginx.lines(of: "error.log"))")
        await gateway.stop()
    }

    @Test("proxy_ssl_verify with proxy_ssl_name from a variable: a session verified for one name is never resumed for another on the same address (the name is checked on every handshake)")
    func verifiedSessionsStayWithTheirName() async throws {
        let pki = try TestPKI.shared()
        let upstream = try ExternalPeer.nginx("""
            stream {
                server {
                    listen 127.0.0.1:{PORT} ssl;
                    ssl_protocols TLSv1.2 TLSv1.3;
                    ssl_certificate \(pki.path("a.test.crt"));
                    ssl_certificate_key \(pki.path("a.test.key"));
                    return "reused=$ssl_session_reused\\n";
                }
            }
            """)
        defer { upstream.stop() }
        let second = try freePort()
        let gateway = try await GatewayHarness.start("""
            stream {
                error_log {DIR}/error.log info;
                map $server_port $upstream_name {
                    \(second)  b.test;
                    default   a.test;
                }
                server {
                    listen 127.0.0.1:{PORT};
                    listen 127.0.0.1:\(second);
                    proxy_pass 127.0.0.1:\(upstream.port);
                    proxy_ssl on;
                    proxy_ssl_name $upstream_name;
                    proxy_ssl_verify on;
                    proxy_ssl_trusted_certificate \(pki.path("ca.crt"));
                }
            }
            """)
        #expect(Self.ask(gateway.port) == "reused=.\n")
        #expect(Self.ask(gateway.port) == "reused=r\n", "a.test's session is resumed for a.test")
        #expect(Self.ask(second) == "", "b.test gets no session of a.test's, and the certificate does not name it")
        let errors = gateway.lines(of: "error.log")
        #expect(errors.contains { $0.contains("upstream SSL certificate does not match \"b.test\"") }, "\(errors)")
        await gateway.stop()
    }

    @Test("proxy_ssl to HAProxy terminating TLS: 2 MiB each way through an echo arrive intact")
    func toHAProxy() async throws {
        let pki = try TestPKI.shared()
        let combined = pki.directory.appendingPathComponent("backend-combined.pem")
        try (String(contentsOfFile: pki.path("backend.test.crt"), encoding: .utf8)
            + String(contentsOfFile: pki.path("backend.test.key"), encoding: .utf8)).write(to: combined, atomically: true, encoding: .utf8)
        let size = 2 << 20
        let echo = try TestServer { connection in
            if let bytes = try? connection.receive(exactly: size) { try? connection.send(bytes) }
            connection.close()
        }
        defer { echo.stop() }
        let haproxy = try ExternalPeer.haproxy("""
            frontend tls
                bind 127.0.0.1:{PORT} ssl crt \(combined.path)
                default_backend echo
            backend echo
                server echo 127.0.0.1:\(echo.port)
            """)
        defer { haproxy.stop() }
        let gateway = try await GatewayHarness.start("""
            stream {
                server {
                    listen 127.0.0.1:{PORT};
                    proxy_pass 127.0.0.1:\(haproxy.port);
                    proxy_ssl on;
                    proxy_ssl_verify on;
                    proxy_ssl_name backend.test;
                    proxy_ssl_trusted_certificate \(pki.path("ca.crt"));
                }
            }
            """)
        let connection = try TestConnection.connect(to: "127.0.0.1", port: gateway.port, timeout: 3)
        connection.setTimeout(20)
        var generator = SplitMix64(seed: 41)
        let payload = (0..<size).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
        let sender = Thread { try? connection.send(payload) }
        sender.start()
        let back = try connection.receive(exactly: size)
        #expect(back == payload)
        connection.close()
        await gateway.stop()
    }

    @Test("HAProxy terminating TLS sends PROXY v2 with SSL TLVs (send-proxy-v2-ssl-cn): $proxy_protocol_tlv_ssl_version, _ssl_cn and _ssl_cipher say the client's TLS")
    func receivesHAProxySSLTLVs() async throws {
        let pki = try TestPKI.shared()
        let combined = pki.directory.appendingPathComponent("gateway-combined.pem")
        try (String(contentsOfFile: pki.path("server-ec.crt"), encoding: .utf8)
            + String(contentsOfFile: pki.path("server-ec.key"), encoding: .utf8)).write(to: combined, atomically: true, encoding: .utf8)
        let gateway = try await GatewayHarness.start("""
            stream {
                log_format t '$remote_addr|$proxy_protocol_tlv_ssl_version|$proxy_protocol_tlv_ssl_cn|$proxy_protocol_tlv_ssl_cipher';
                access_log {DIR}/access.log t;
                server {
                    listen 127.0.0.1:{PORT} proxy_protocol;
                    set_real_ip_from 127.0.0.1;
                    return "ok\\n";
                }
            }
            """)
        let haproxy = try ExternalPeer.haproxy("""
            frontend tls
                bind 127.0.0.1:{PORT} ssl crt \(combined.path) ca-file \(pki.path("ca.crt")) verify optional
                default_backend portcullis
            backend portcullis
                server pc 127.0.0.1:\(gateway.port) send-proxy-v2-ssl-cn proxy-v2-options ssl-cipher
            """)
        defer { haproxy.stop() }
        let reply = try sClient(port: haproxy.port, ["-cert", pki.path("client.crt"), "-key", pki.path("client.key"), "-tls1_3"])
        #expect(reply.text == "ok\n", "\(reply)")
        let lines = await gateway.waitForLines(of: "access.log") { !$0.isEmpty }
        #expect(lines == ["127.0.0.1|TLSv1.3|alice|TLS_AES_256_GCM_SHA384"], "\(lines)")
        await gateway.stop()
    }

    @Test("terminating TLS with proxy_protocol v2: the upstream gets ALPN, AUTHORITY (the SNI) and the SSL TLV (client bits, verify 0, version, CN, cipher, signature and key algorithms); HAProxy reads the AUTHORITY")
    func sendsSSLTLVs() async throws {
        let pki = try TestPKI.shared()
        let headers = HeaderBox()
        let receiver = try TestServer { connection in
            var bytes: [UInt8] = []
            while let more = try? connection.receive(), !more.isEmpty {
                bytes += more
                if let found = try? ProxyHeaderDecoder.decode(bytes) {
                    headers.append(found.header)
                    break
                }
            }
            try? connection.send("ok\n")
            connection.close()
        }
        defer { receiver.stop() }
        let answer = try TestServer { connection in
            try? connection.send("ok\n")
            connection.close()
        }
        defer { answer.stop() }
        let haproxy = try ExternalPeer.haproxy("""
            frontend from_portcullis
                bind 127.0.0.1:{PORT} accept-proxy
                log-format "authority=%[fc_pp_authority]"
                default_backend answer
            backend answer
                server answer 127.0.0.1:\(answer.port)
            """)
        defer { haproxy.stop() }
        let second = try freePort()
        let gateway = try await GatewayHarness.start("""
            stream {
                server {
                    listen 127.0.0.1:{PORT} ssl;
                    listen 127.0.0.1:\(second) ssl;
                    ssl_certificate \(pki.path("server-ec.crt"));
                    ssl_certificate_key \(pki.path("server-ec.key"));
                    ssl_alpn imap h2;
                    ssl_verify_client optional;
                    ssl_client_certificate \(pki.path("ca.crt"));
                    proxy_protocol v2;
                    proxy_pass $upstream_for_port;
                }
                map $server_port $upstream_for_port {
                    \(second) 127.0.0.1:\(haproxy.port);
                    default 127.0.0.1:\(receiver.port);
                }
            }
            """)
        let reply = try sClient(port: gateway.port, ["-servername", "mail.gateway.test", "-alpn", "imap",
                                                     "-cert", pki.path("client.crt"), "-key", pki.path("client.key")])
        #expect(reply.text == "ok\n", "\(reply)")
        let header = try #require(headers.all.first)
        #expect(header.tlv(ProxyTLVType.alpn.rawValue) == Array("imap".utf8))
        #expect(header.tlv(ProxyTLVType.authority.rawValue) == Array("mail.gateway.test".utf8))
        let ssl = try #require(header.tlv(ProxyTLVType.ssl.rawValue).flatMap(ProxySSLInfo.init))
        #expect(ssl.client == 0x07, "PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS")
        #expect(ssl.verify == 0)
        let sub = Dictionary(uniqueKeysWithValues: ssl.subTLVs.map { ($0.type, String(decoding: $0.value, as: UTF8.self)) })
        #expect(sub[0x21] == "TLSv1.3")
        #expect(sub[0x22] == "alice")
        #expect(sub[0x23] == "TLS_AES_256_GCM_SHA384")
        #expect(sub[0x24] == "ecdsa-with-SHA256", "\(sub)")
        #expect(sub[0x25] == "EC256", "\(sub)")
        // Without a client certificate: SSL only, verify non-zero, no CN.
        _ = try sClient(port: gateway.port, ["-servername", "gateway.test"])
        let plain = try #require(headers.all.dropFirst().first.flatMap { $0.tlv(ProxyTLVType.ssl.rawValue) }.flatMap(ProxySSLInfo.init))
        #expect(plain.client == 0x01 && plain.verify != 0 && !plain.subTLVs.contains { $0.type == 0x22 })
        // HAProxy, a real receiver, reads the SNI from the AUTHORITY TLV.
        let viaHAProxy = try sClient(port: second, ["-servername", "imap.gateway.test"])
        #expect(viaHAProxy.text == "ok\n", "\(viaHAProxy)")
        let logged = await haproxy.waitForLogLines { !$0.isEmpty }
        #expect(logged.contains("authority=imap.gateway.test"), "\(logged)")
        await gateway.stop()
    }
}

/// Headers a test upstream decoded, in arrival order.
final class HeaderBox: @unchecked Sendable {
    private let lock = NSLock()
    private var headers: [ProxyHeader] = []
    func append(_ header: ProxyHeader) { lock.withLock { headers.append(header) } }
    var all: [ProxyHeader] { lock.withLock { headers } }
}
