import Testing
import PortcullisCore
import PortcullisRules
@testable import PortcullisPolicy

private struct NoHostsForTLSCompiler: HostResolver {
    func addresses(of host: String) -> [IPAddress] { [] }
}

/// The `ssl_*`, `proxy_ssl*` and `ssl_preread` directives: nginx's defaults, inheritance from
/// the stream block, and the located errors.
@Suite struct TLSCompilerTests {
    static func compile(_ text: String) -> CompileResult {
        RuleLoader.load(text: text, file: "rules.conf", resolver: NoHostsForTLSCompiler())
    }

    /// Line 3 is the listen, the body starts on line 4.
    static func server(_ body: String, listen: String = "listen 127.0.0.1:8443 ssl;") -> String {
        "stream {\n    server {\n        \(listen)\n\(body)        proxy_pass 127.0.0.1:9000;\n    }\n}\n"
    }

    static let certificates = "        ssl_certificate /etc/portcullis/a.pem;\n        ssl_certificate_key /etc/portcullis/a.key;\n"

    static func servers(_ text: String) throws -> [ServerPolicy] {
        let result = compile(text)
        let snapshot = try #require(result.snapshot, "\(result.rendered)")
        #expect(result.diagnostics.isEmpty, "\(result.rendered)")
        return snapshot.servers
    }

    static func paths(_ tls: TLSServerSettings?) -> [String] {
        (tls?.certificates ?? []).map { "\($0.certificateText) \($0.keyText)" }
    }

    // MARK: Defaults

    @Test("nginx's defaults: TLSv1.2+1.3, HIGH:!aNULL:!MD5, session cache none, tickets on, 300 s, 60 s handshake, depth 1; proxy_ssl off with DEFAULT ciphers and reuse on")
    func defaults() throws {
        let server = try #require(try Self.servers(Self.server(Self.certificates)).first)
        let tls = try #require(server.tls)
        #expect(tls.protocols == [.tlsv1_2, .tlsv1_3] && tls.protocols.rawValue == 0x30)
        #expect(tls.ciphers == "HIGH:!aNULL:!MD5")
        #expect(!tls.preferServerCiphers)
        #expect(tls.ecdhCurve == "auto")
        #expect(tls.sessionCache == TLSSessionCache.none)
        #expect(tls.sessionTickets)
        #expect(tls.sessionTimeoutSeconds == 300)
        #expect(tls.handshakeTimeoutMilliseconds == 60_000)
        #expect(tls.clientCertificate == nil && tls.trustedCertificate == nil)
        #expect(tls.verifyClient == .off && tls.verifyDepth == 1)
        #expect(tls.alpn.isEmpty && tls.confCommands.isEmpty)
        #expect(Self.paths(tls) == ["/etc/portcullis/a.pem /etc/portcullis/a.key"])
        let certificate = try #require(tls.certificates.first)
        #expect(certificate.location == SourceLocation(file: "rules.conf", line: 4, column: 25))
        #expect(!certificate.usesVariables && certificate.certificate.literalText == "/etc/portcullis/a.pem")
        #expect(server.listens.map(\.ssl) == [true])

        let upstream = server.upstreamTLS
        #expect(!upstream.enabled)
        #expect(upstream.protocols == [.tlsv1_2, .tlsv1_3])
        #expect(upstream.ciphers == "DEFAULT")
        #expect(!upstream.sendServerName && upstream.name == nil && !upstream.verify)
        #expect(upstream.verifyDepth == 1 && upstream.sessionReuse)
        #expect(upstream.trustedCertificate == nil && upstream.certificate == nil && upstream.certificateKey == nil)
        #expect(upstream.location == nil)

        #expect(!server.preread && !server.prereadBeforeAccess)
        #expect(server.proxy.prereadBufferSize == 16_384 && server.proxy.prereadTimeoutMilliseconds == 30_000)
    }

    @Test("without listen … ssl: no termination settings, no certificate needed, ssl_* accepted")
    func noSSLListen() throws {
        let server = try #require(try Self.servers(Self.server("        ssl_protocols TLSv1.3;\n", listen: "listen 127.0.0.1:8443;")).first)
        #expect(server.tls == nil)
        #expect(server.listens.map(\.ssl) == [false])
    }

    // MARK: Every directive

    @Test("every ssl_* directive compiles to its setting")
    func everyServerSetting() throws {
        let body = Self.certificates + """
                    ssl_protocols TLSv1.3;
                    ssl_ciphers ECDHE+AESGCM;
                    ssl_prefer_server_ciphers on;
                    ssl_ecdh_curve X25519:prime256v1;
                    ssl_session_cache shared:SSL:1m;
                    ssl_session_tickets off;
                    ssl_session_timeout 1h;
                    ssl_handshake_timeout 10s;
                    ssl_client_certificate /etc/portcullis/clients.pem;
                    ssl_trusted_certificate /etc/portcullis/trusted.pem;
                    ssl_verify_client optional;
                    ssl_verify_depth 3;
                    ssl_alpn h2 http/1.1;
                    ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
                    ssl_conf_command Options PrioritizeChaCha;

            """
        let tls = try #require(try Self.servers(Self.server(body)).first?.tls)
        #expect(tls.protocols == .tlsv1_3)
        #expect(tls.ciphers == "ECDHE+AESGCM")
        #expect(tls.preferServerCiphers)
        #expect(tls.ecdhCurve == "X25519:prime256v1")
        #expect(tls.sessionCache == .builtin(sessions: 4_096))
        #expect(!tls.sessionTickets)
        #expect(tls.sessionTimeoutSeconds == 3_600)
        #expect(tls.handshakeTimeoutMilliseconds == 10_000)
        #expect(tls.clientCertificate == "/etc/portcullis/clients.pem")
        #expect(tls.trustedCertificate == "/etc/portcullis/trusted.pem")
        #expect(tls.verifyClient == .optional && tls.verifyDepth == 3)
        #expect(tls.alpn == ["h2", "http/1.1"])
        #expect(tls.confCommands.map { "\($0.0)=\($0.1)" } == ["Ciphersuites=TLS_AES_128_GCM_SHA256", "Options=PrioritizeChaCha"])
    }

    @Test("every proxy_ssl* directive compiles to its setting; proxy_ssl_name keeps its variables")
    func everyUpstreamSetting() throws {
        let body = """
                    proxy_ssl on;
                    proxy_ssl_protocols TLSv1.2;
                    proxy_ssl_ciphers HIGH;
                    proxy_ssl_server_name on;
                    proxy_ssl_name $remote_addr.example;
                    proxy_ssl_verify on;
                    proxy_ssl_verify_depth 2;
                    proxy_ssl_trusted_certificate /etc/portcullis/ca.pem;
                    proxy_ssl_certificate /etc/portcullis/me.pem;
                    proxy_ssl_certificate_key /etc/portcullis/me.key;
                    proxy_ssl_session_reuse off;

            """
        let server = try #require(try Self.servers(Self.server(body, listen: "listen 127.0.0.1:8443;")).first)
        let upstream = server.upstreamTLS
        #expect(upstream.enabled && upstream.location == SourceLocation(file: "rules.conf", line: 4, column: 9))
        #expect(upstream.protocols == .tlsv1_2)
        #expect(upstream.ciphers == "HIGH")
        #expect(upstream.sendServerName && upstream.verify)
        #expect(upstream.name == (try LogTemplate.parse("$remote_addr.example")))
        #expect(upstream.verifyDepth == 2)
        #expect(upstream.trustedCertificate == "/etc/portcullis/ca.pem")
        #expect(upstream.certificate == "/etc/portcullis/me.pem" && upstream.certificateKey == "/etc/portcullis/me.key")
        #expect(!upstream.sessionReuse)
        #expect(server.tls == nil)
    }

    @Test("ssl_preread, preread_buffer_size, preread_timeout")
    func prereadSettings() throws {
        let body = "        ssl_preread on;\n        preread_buffer_size 4k;\n        preread_timeout 2s;\n"
        let server = try #require(try Self.servers(Self.server(body, listen: "listen 127.0.0.1:8443;")).first)
        #expect(server.preread && !server.prereadBeforeAccess)
        #expect(server.proxy.prereadBufferSize == 4_096 && server.proxy.prereadTimeoutMilliseconds == 2_000)
        let off = try #require(try Self.servers(Self.server("        ssl_preread off;\n", listen: "listen 127.0.0.1:8443;")).first)
        #expect(!off.preread)
    }

    @Test("ssl_session_cache forms", arguments: [
        ("off", TLSSessionCache.off),
        ("none", TLSSessionCache.none),
        ("builtin", TLSSessionCache.builtin(sessions: nil)),
        ("builtin:1000", TLSSessionCache.builtin(sessions: 1_000)),
        ("shared:SSL:10m", TLSSessionCache.builtin(sessions: 40_960)),
        ("shared:SSL:32k", TLSSessionCache.builtin(sessions: 128)),
        ("builtin:1000 shared:x:1m", TLSSessionCache.builtin(sessions: 4_096)),
        ("builtin:100000 shared:x:1m", TLSSessionCache.builtin(sessions: 100_000)),
        ("builtin shared:x:1m", TLSSessionCache.builtin(sessions: 4_096)),
    ])
    func sessionCache(value: String, expected: TLSSessionCache) throws {
        let tls = try #require(try Self.servers(Self.server(Self.certificates + "        ssl_session_cache \(value);\n")).first?.tls)
        #expect(tls.sessionCache == expected)
    }

    // MARK: Inheritance

    static let inheriting = """
        stream {
            ssl_protocols TLSv1.3;
            ssl_ciphers ECDHE+AESGCM;
            ssl_handshake_timeout 5s;
            ssl_certificate /etc/portcullis/stream.pem;
            ssl_certificate_key /etc/portcullis/stream.key;
            proxy_ssl on;
            proxy_ssl_server_name on;
            server { listen 127.0.0.1:8443 ssl; proxy_pass 127.0.0.1:9000; }
            server {
                listen 127.0.0.1:8444 ssl;
                ssl_certificate /etc/portcullis/rsa.pem;
                ssl_certificate /etc/portcullis/ecdsa.pem;
                ssl_certificate_key /etc/portcullis/rsa.key;
                ssl_certificate_key /etc/portcullis/ecdsa.key;
                ssl_handshake_timeout 1s;
                proxy_ssl off;
                proxy_pass 127.0.0.1:9000;
            }
            server {
                listen 127.0.0.1:8445 ssl;
                ssl_certificate /etc/portcullis/own.pem;
                proxy_pass 127.0.0.1:9000;
            }
        }
        """

    @Test("stream-level ssl_* and proxy_ssl* are inherited; a server's own ssl_certificate list replaces the stream's, pairs kept in order")
    func inheritance() throws {
        let servers = try Self.servers(Self.inheriting)
        try #require(servers.count == 3)
        let (first, second, third) = (servers[0], servers[1], servers[2])
        #expect(Self.paths(first.tls) == ["/etc/portcullis/stream.pem /etc/portcullis/stream.key"])
        #expect(first.tls?.protocols == .tlsv1_3 && first.tls?.ciphers == "ECDHE+AESGCM")
        #expect(first.tls?.handshakeTimeoutMilliseconds == 5_000)
        #expect(first.upstreamTLS.enabled && first.upstreamTLS.sendServerName)

        #expect(Self.paths(second.tls) == ["/etc/portcullis/rsa.pem /etc/portcullis/rsa.key",
                                          "/etc/portcullis/ecdsa.pem /etc/portcullis/ecdsa.key"])
        #expect(second.tls?.certificates.map(\.location.line) == [12, 13])
        #expect(second.tls?.protocols == .tlsv1_3 && second.tls?.handshakeTimeoutMilliseconds == 1_000)
        #expect(!second.upstreamTLS.enabled && second.upstreamTLS.sendServerName)

        // Its own certificates, the stream's keys (each array is inherited on its own, as nginx).
        #expect(Self.paths(third.tls) == ["/etc/portcullis/own.pem /etc/portcullis/stream.key"])
    }

    @Test("certificate paths with variables are loaded per handshake")
    func certificateVariables() throws {
        let body = "        ssl_certificate /etc/portcullis/$ssl_server_name.pem;\n        ssl_certificate_key /etc/portcullis/$ssl_server_name.key;\n"
        let tls = try #require(try Self.servers(Self.server(body)).first?.tls)
        let certificate = try #require(tls.certificates.first)
        #expect(certificate.usesVariables && certificate.certificate.literalText == nil)
        #expect(certificate.certificate.variables == [.fixed(.sslServerName)])
    }

    @Test("ssl_verify_client optional_no_ca needs no CA; on and optional with ssl_trusted_certificate alone compile")
    func verifyClientWithoutCA() throws {
        for body in ["        ssl_verify_client optional_no_ca;\n",
                     "        ssl_verify_client on;\n        ssl_trusted_certificate /etc/portcullis/ca.pem;\n",
                     "        ssl_verify_client optional;\n        ssl_client_certificate /etc/portcullis/ca.pem;\n"] {
            let result = Self.compile(Self.server(Self.certificates + body))
            #expect(result.diagnostics.isEmpty && result.snapshot != nil, "\(result.rendered)")
        }
    }

    // MARK: Located errors

    /// Listen errors point at the address, as the other listen errors do.
    static let sslListenColumn = "rules.conf:3:16"

    static let errors: [(String, String, String)] = [
        ("", "listen 127.0.0.1:8443 ssl;",
         "\(sslListenColumn): error: no \"ssl_certificate\" is defined for the \"listen … ssl\" directive in this server"),
        ("        ssl_certificate /a.pem;\n", "listen 127.0.0.1:8443 ssl;",
         "rules.conf:4:25: error: no \"ssl_certificate_key\" is defined for certificate \"/a.pem\""),
        ("        ssl_certificate /a.pem;\n        ssl_certificate /b.pem;\n        ssl_certificate_key /a.key;\n", "listen 127.0.0.1:8443 ssl;",
         "rules.conf:5:25: error: no \"ssl_certificate_key\" is defined for certificate \"/b.pem\""),
        (certificates + "        ssl_protocols TLSv1.2 TLS1.3;\n", "listen 127.0.0.1:8443 ssl;",
         "rules.conf:6:31: error: invalid value \"TLS1.3\" in \"ssl_protocols\"; expected SSLv3, TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3 (did you mean \"TLSv1.3\"?)"),
        ("        proxy_ssl_protocols tlsv1.2;\n", "listen 127.0.0.1:8443;",
         "rules.conf:4:29: error: invalid value \"tlsv1.2\" in \"proxy_ssl_protocols\"; expected SSLv3, TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3"),
        (certificates + "        ssl_verify_client yes;\n", "listen 127.0.0.1:8443 ssl;",
         "rules.conf:6:27: error: invalid value \"yes\" in \"ssl_verify_client\"; it must be \"on\", \"off\", \"optional\" or \"optional_no_ca\""),
        (certificates + "        ssl_verify_client on;\n", "listen 127.0.0.1:8443 ssl;",
         "\(sslListenColumn): error: no ssl_client_certificate or ssl_trusted_certificate for ssl_verify_client"),
        (certificates + "        ssl_verify_client optional;\n", "listen 127.0.0.1:8443 ssl;",
         "\(sslListenColumn): error: no ssl_client_certificate or ssl_trusted_certificate for ssl_verify_client"),
        (certificates + "        ssl_verify_depth 101;\n", "listen 127.0.0.1:8443 ssl;",
         "rules.conf:6:26: error: invalid value \"101\" in \"ssl_verify_depth\"; expected a number from 0 to 100"),
        (certificates + "        ssl_session_cache shared:SSL;\n", "listen 127.0.0.1:8443 ssl;",
         "rules.conf:6:27: error: invalid session cache \"shared:SSL\" in \"ssl_session_cache\"; expected shared:NAME:SIZE with a size of at least 32k"),
        (certificates + "        ssl_session_cache shared:SSL:16k;\n", "listen 127.0.0.1:8443 ssl;",
         "rules.conf:6:27: error: invalid session cache \"shared:SSL:16k\" in \"ssl_session_cache\"; expected shared:NAME:SIZE with a size of at least 32k"),
        (certificates + "        ssl_session_cache builtin:lots;\n", "listen 127.0.0.1:8443 ssl;",
         "rules.conf:6:27: error: invalid session cache \"builtin:lots\" in \"ssl_session_cache\"; expected off, none, builtin[:SIZE] or shared:NAME:SIZE"),
        (certificates + "        ssl_session_cache builtin none;\n", "listen 127.0.0.1:8443 ssl;",
         "rules.conf:6:35: error: \"none\" cannot be combined with other values in \"ssl_session_cache\""),
        (certificates, "listen 127.0.0.1:8443 udp ssl;",
         "rules.conf:3:35: error: \"ssl\" parameter is incompatible with \"udp\""),
        (certificates + "        ssl_preread on;\n", "listen 127.0.0.1:8443 ssl;",
         "\(sslListenColumn): error: \"ssl_preread on\" cannot be used with \"listen … ssl\" in the same server: preread reads the ClientHello that termination consumes; route by $ssl_server_name instead"),
        (certificates + "        server_name a.test;\n", "listen 127.0.0.1:8443 ssl;",
         "rules.conf:6:9: error: \"server_name\" is part of the rule language but not supported yet (server_name (SNI virtual servers, nginx 1.25.5) is not built yet; route by $ssl_preread_server_name or $ssl_server_name with map and proxy_pass $var)"),
    ]

    @Test("located errors, exactly", arguments: errors)
    func locatedErrors(body: String, listen: String, expected: String) {
        let result = Self.compile(Self.server(body, listen: listen))
        #expect(result.diagnostics.map(\.description) == [expected], "\(result.rendered)")
        #expect(result.snapshot == nil)
    }

    @Test("the missing-certificate error points at the listen … ssl in a server with several listens, rendered with its caret")
    func missingCertificateRendered() {
        let text = "stream {\n    server {\n        listen 127.0.0.1:8080;\n        listen 127.0.0.1:8443 ssl;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n"
        let result = Self.compile(text)
        #expect(result.diagnostics.map(\.description) == [
            "rules.conf:4:16: error: no \"ssl_certificate\" is defined for the \"listen … ssl\" directive in this server",
        ], "\(result.rendered)")
        #expect(result.rendered == "rules.conf:4:16: error: no \"ssl_certificate\" is defined for the \"listen … ssl\" directive in this server\n        listen 127.0.0.1:8443 ssl;\n               ^~~~~~~~~~~~~~")
    }

    @Test("an unknown variable in ssl_certificate: located at the variable, with did-you-mean; no snapshot")
    func unknownVariableInCertificate() {
        let body = "        ssl_certificate /etc/$ssl_server_nam.pem;\n        ssl_certificate_key /etc/a.key;\n"
        let result = Self.compile(Self.server(body))
        // One error: the path that did not compile is not also "no ssl_certificate defined".
        #expect(result.diagnostics.map(\.description)
                == ["rules.conf:4:30: error: unknown variable \"$ssl_server_nam\" in \"ssl_certificate\"; did you mean \"$ssl_server_name\"?"])
        #expect(result.snapshot == nil)
        let key = Self.compile(Self.server("        ssl_certificate /etc/a.pem;\n        ssl_certificate_key /etc/$ssl_sever_name.key;\n"))
        #expect(key.diagnostics.map(\.description)
                == ["rules.conf:5:34: error: unknown variable \"$ssl_sever_name\" in \"ssl_certificate_key\"; did you mean \"$ssl_server_name\"?"])
        #expect(key.snapshot == nil)
    }

    @Test("proxy_ssl checks nginx -t makes: verify without trusted CAs, a certificate without its key, variables in the client certificate path")
    func upstreamChecks() {
        let verify = Self.compile("stream {\n    server {\n        listen 127.0.0.1:8443;\n        proxy_ssl on;\n        proxy_ssl_verify on;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n")
        #expect(verify.diagnostics.map(\.description) == ["rules.conf:5:9: error: no \"proxy_ssl_trusted_certificate\" for \"proxy_ssl_verify\""])
        let key = Self.compile("stream {\n    server {\n        listen 127.0.0.1:8443;\n        proxy_ssl on;\n        proxy_ssl_certificate /etc/c.pem;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n")
        #expect(key.diagnostics.map(\.description) == ["rules.conf:5:9: error: no \"proxy_ssl_certificate_key\" is defined for certificate \"/etc/c.pem\""])
        let variable = Self.compile("stream {\n    server {\n        listen 127.0.0.1:8443;\n        proxy_ssl on;\n        proxy_ssl_certificate /etc/$server_port.pem;\n        proxy_ssl_certificate_key /etc/c.key;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n")
        #expect(variable.diagnostics.map(\.description) == ["rules.conf:5:31: error: variables in \"proxy_ssl_certificate\" are not supported yet; name one file"])
    }

    @Test("ssl_conf_command: a server with its own list inherits none of the stream's, as nginx")
    func confCommandsReplace() throws {
        let text = "stream {\n    ssl_conf_command Options -SessionTicket;\n    server {\n        listen 127.0.0.1:8443 ssl;\n\(Self.certificates)        ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;\n        proxy_pass 127.0.0.1:9000;\n    }\n    server {\n        listen 127.0.0.1:8444 ssl;\n\(Self.certificates)        proxy_pass 127.0.0.1:9000;\n    }\n}\n"
        let servers = try Self.servers(text)
        #expect(servers[0].tls?.confCommands.map { "\($0.0) \($0.1)" } == ["Ciphersuites TLS_AES_128_GCM_SHA256"])
        #expect(servers[1].tls?.confCommands.map { "\($0.0) \($0.1)" } == ["Options -SessionTicket"])
    }

    @Test("warnings for access rules and limit keys that can never see their value: $ssl_* of the handshake (it comes after access) and $ssl_preread_* without ssl_preread on; none where the value is known")
    func unknowableVariablesWarn() {
        let text = """
            stream {
                map $ssl_server_name $bad_name { evil.test 1; default ""; }
                map $ssl_preread_server_name $bad_sni { evil.test 1; default ""; }
                limit_conn_zone $ssl_client_s_dn zone=by_dn:1m;
                server {
                    listen 127.0.0.1:8443 ssl;
                    ssl_certificate /etc/a.pem;
                    ssl_certificate_key /etc/a.key;
                    deny $bad_name;
                    limit_conn by_dn 1;
                    proxy_pass 127.0.0.1:9000;
                }
                server {
                    listen 127.0.0.1:8444;
                    deny $bad_sni;
                    proxy_pass 127.0.0.1:9000;
                }
                server {
                    listen 127.0.0.1:8445;
                    ssl_preread on;
                    deny $bad_sni;
                    proxy_pass 127.0.0.1:9000;
                }
            }

            """
        let result = Self.compile(text)
        #expect(result.snapshot != nil)
        #expect(result.diagnostics.map(\.description) == [
            "rules.conf:9:1: warning: \"deny $bad_name;\" reads $ssl_* variables of the TLS handshake, which happens after the access phases: they have no value here (use ssl_preread and $ssl_preread_server_name to decide by SNI)",
            "rules.conf:10:1: warning: \"limit_conn by_dn 1;\" reads $ssl_* variables of the TLS handshake, which happens after the access phases: they have no value here (use ssl_preread and $ssl_preread_server_name to decide by SNI)",
            "rules.conf:15:1: warning: \"deny $bad_sni;\" reads $ssl_preread_* variables, but this server has no \"ssl_preread on\": they have no value",
        ])
    }
}
