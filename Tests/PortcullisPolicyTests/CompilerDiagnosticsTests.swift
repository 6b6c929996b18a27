import Testing
import PortcullisCore
import PortcullisRules
@testable import PortcullisPolicy

/// Knows only "localhost", so no test ever asks DNS.
struct StubResolver: HostResolver {
    func addresses(of host: String) -> [IPAddress] { host == "localhost" ? [.v4(0x7F00_0001)] : [] }
}

func load(_ text: String) -> CompileResult {
    RuleLoader.load(text: text, file: "rules.conf", resolver: StubResolver())
}

@Suite struct CompilerDiagnosticsTests {
    /// Whole rendered output: `file:line:col: severity: message`, the source line, the caret line.
    static let golden: [(String, String, String)] = [
        ("unknownDirective", "stream {\n    server {\n        listen 8080;\n        alow 10.0.0.0/8;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
         "rules.conf:4:9: error: unknown directive \"alow\"; did you mean \"allow\"?\n        alow 10.0.0.0/8;\n        ^~~~"),
        ("allowInMain", "allow all;\nstream {\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n",
         "rules.conf:1:1: error: \"allow\" directive is not allowed in main context; it belongs in: server, stream\nallow all;\n^~~~~"),
        ("listenInStream", "stream {\n    listen 8080;\n    server { listen 8081; proxy_pass 127.0.0.1:9000; }\n}\n",
         "rules.conf:2:5: error: \"listen\" directive is not allowed in stream context; it belongs in: server\n    listen 8080;\n    ^~~~~~"),
        ("argCount", "stream {\n    server {\n        listen 8080;\n        allow 10.0.0.1 10.0.0.2;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
         "rules.conf:4:9: error: invalid number of arguments in \"allow\" directive: expected 1, got 2\n        allow 10.0.0.1 10.0.0.2;\n        ^~~~~"),
        ("badCIDR", "stream {\n    server {\n        listen 8080;\n        deny 10.0.0.0/33;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
         "rules.conf:4:14: error: invalid address or CIDR \"10.0.0.0/33\" in \"deny\"; expected an IPv4 or IPv6 address, a block such as 10.0.0.0/8 or 2001:db8::/32, or \"all\"\n        deny 10.0.0.0/33;\n             ^~~~~~~~~~~"),
        ("badPort", "stream {\n    server {\n        listen 127.0.0.1:99999;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
         "rules.conf:3:16: error: invalid port \"99999\" in \"listen 127.0.0.1:99999\"; expected 1-65535\n        listen 127.0.0.1:99999;\n               ^~~~~~~~~~~~~~~"),
        ("badTime", "stream {\n    proxy_timeout 10x;\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n",
         "rules.conf:2:19: error: invalid time \"10x\" in \"proxy_timeout\"; expected a time such as 500ms, 30s, 10m or 1m30s\n    proxy_timeout 10x;\n                  ^~~"),
        ("badSize", "stream {\n    server {\n        listen 8080;\n        proxy_buffer_size 16kb;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
         "rules.conf:4:27: error: invalid size \"16kb\" in \"proxy_buffer_size\"; expected a size such as 512, 16k or 10m\n        proxy_buffer_size 16kb;\n                          ^~~~"),
        ("badFlag", "stream {\n    tcp_nodelay yes;\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n",
         "rules.conf:2:17: error: invalid value \"yes\" in \"tcp_nodelay\"; it must be \"on\" or \"off\"\n    tcp_nodelay yes;\n                ^~~"),
        ("unknownUpstream", "stream {\n    upstream backend { server 127.0.0.1:9000; }\n    server {\n        listen 8080;\n        proxy_pass backnd;\n    }\n}\n",
         "rules.conf:5:20: error: unknown upstream \"backnd\" in \"proxy_pass\"; did you mean \"backend\"?\n        proxy_pass backnd;\n                   ^~~~~~"),
        ("unknownVar", "stream {\n    log_format main \"$remote_addr $remote_adr\";\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n",
         "rules.conf:2:35: error: unknown variable \"$remote_adr\" in \"log_format\"; did you mean \"$remote_addr\"?\n    log_format main \"$remote_addr $remote_adr\";\n                                  ^"),
        // A quoted string over several lines, with escapes before the variable: located where
        // it is written (the fuzzer found it put at line 2, column 280).
        ("unknownVarNextLine", "stream {\n    log_format main '$remote_addr \\t\\\"x\\\"\n        é $remote_adr';\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n",
         "rules.conf:3:11: error: unknown variable \"$remote_adr\" in \"log_format\"; did you mean \"$remote_addr\"?\n        é $remote_adr';\n          ^"),
        ("unknownFormat", "stream {\n    log_format main \"$remote_addr\";\n    server {\n        listen 8080;\n        access_log /tmp/a.log mian;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
         "rules.conf:5:31: error: unknown log format \"mian\"; did you mean \"main\"?\n        access_log /tmp/a.log mian;\n                              ^~~~"),
        ("dupSingle", "stream {\n    server {\n        listen 8080;\n        proxy_pass 127.0.0.1:9000;\n        proxy_pass 127.0.0.1:9001;\n    }\n}\n",
         "rules.conf:5:9: error: \"proxy_pass\" directive is duplicate; it was first set at rules.conf:4:9\n        proxy_pass 127.0.0.1:9001;\n        ^~~~~~~~~~"),
        ("http", "http {\n    server { listen 80; }\n}\nstream {\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n",
         "rules.conf:1:1: error: an \"http\" block is not Portcullis's business: Portcullis is a TCP/UDP gateway and reads only \"stream\"; keep HTTP configuration in nginx\nhttp {\n^~~~"),
        ("geo", "stream {\n    geo $blocked {\n        default 0;\n        10.0.0.0/33 1;\n    }\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n",
         "rules.conf:4:9: error: invalid network \"10.0.0.0/33\" in \"geo\"; expected an address or a block such as 10.0.0.0/8 or 2001:db8::/32\n        10.0.0.0/33 1;\n        ^~~~~~~~~~~"),
        ("reuse_port", "stream {\n    server {\n        listen 8080 reuse_port;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
         "rules.conf:3:21: error: invalid parameter \"reuse_port\" in \"listen\"; did you mean \"reuseport\"?\n        listen 8080 reuse_port;\n                    ^~~~~~~~~~"),
        ("many", "stream {\n    server {\n        listen 8080;\n        alow 10.0.0.0/8;\n        deny 300.0.0.0/8;\n        proxy_timeout 5parsecs;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
         "rules.conf:4:9: error: unknown directive \"alow\"; did you mean \"allow\"?\n        alow 10.0.0.0/8;\n        ^~~~\nrules.conf:5:14: error: invalid address or CIDR \"300.0.0.0/8\" in \"deny\"; expected an IPv4 or IPv6 address, a block such as 10.0.0.0/8 or 2001:db8::/32, or \"all\"\n        deny 300.0.0.0/8;\n             ^~~~~~~~~~~\nrules.conf:6:23: error: invalid time \"5parsecs\" in \"proxy_timeout\"; expected a time such as 500ms, 30s, 10m or 1m30s\n        proxy_timeout 5parsecs;\n                      ^~~~~~~~"),
        ("unclosed", "stream {\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n",
         "rules.conf:1:1: error: unexpected end of file, expecting \"}\" to close the block \"stream\" opened here\nstream {\n^~~~~~"),
        ("noListen", "stream {\n    server {\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
         "rules.conf:2:5: error: no \"listen\" is defined for this server\n    server {\n    ^~~~~~"),
    ]

    @Test(arguments: golden)
    func renderedExactly(name: String, text: String, expected: String) {
        let result = load(text)
        #expect(result.rendered == expected, "\(name)")
        #expect(result.hasErrors)
        #expect(result.snapshot == nil)
    }

    /// First line only (the rest of the rendering is covered above).
    static let firstLines: [(String, String, [String])] = [
        ("missingSemicolon", "stream {\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\nworker_processes 2",
         ["rules.conf:4:1: error: unexpected end of file, expecting \";\" or \"}\" after the directive \"worker_processes\""]),
        ("unexpectedBrace", "stream {\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\n}\n",
         ["rules.conf:4:1: error: unexpected \"}\" with no block open"]),
        ("noProxyPass", "stream {\n    server {\n        listen 8080;\n    }\n}\n",
         ["rules.conf:2:5: error: no \"proxy_pass\" or \"return\" is defined for this server: it would have nowhere to send connections"]),
        ("unknownHost", "stream {\n    server {\n        listen 8080;\n        proxy_pass example.invalid:80;\n    }\n}\n",
         ["rules.conf:4:20: error: host not found in \"example.invalid:80\" of \"proxy_pass\""]),
    ]

    @Test(arguments: firstLines)
    func diagnosticLines(name: String, text: String, expected: [String]) {
        let result = load(text)
        #expect(result.diagnostics.map(\.description) == expected, "\(name)")
        #expect(result.snapshot == nil)
    }

    @Test func duplicateListenAcrossServers() {
        let result = load("stream {\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n    server { listen 8080; proxy_pass 127.0.0.1:9001; }\n}\n")
        #expect(result.diagnostics.map(\.description) == [
            "rules.conf:3:21: error: duplicate listen 0.0.0.0:8080; it is already used at rules.conf:2:21",
        ])
        #expect(result.snapshot == nil)
        // The caret underlines what was written ("8080", 4 characters), not the endpoint text.
        #expect(result.rendered == "rules.conf:3:21: error: duplicate listen 0.0.0.0:8080; it is already used at rules.conf:2:21\n    server { listen 8080; proxy_pass 127.0.0.1:9001; }\n                    ^~~~")
    }

    @Test func hostBitsWarnButCompile() throws {
        let result = load("stream {\n    server {\n        listen 8080;\n        allow 10.1.2.3/8;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n")
        #expect(result.rendered == """
            rules.conf:4:15: warning: low address bits of 10.1.2.3/8 are meaningless; the rule applies to 10.0.0.0/8
                    allow 10.1.2.3/8;
                          ^~~~~~~~~~
            """)
        #expect(!result.hasErrors)
        let snapshot = try #require(result.snapshot)
        let rule = try #require(snapshot.servers.first?.access.rules.first)
        guard case .block(let block) = rule.match else { Issue.record("not a block"); return }
        #expect(block.network == .v4(0x0A00_0000))
        #expect(block.prefixLength == 8)
        #expect(block.hostBitsSet)
        #expect(snapshot.servers[0].access.evaluate(.v4(0x0AFF_0001)).allowed)
    }

    @Test func mappedBlockWarnsAndCompiles() throws {
        let result = load("stream {\n    server {\n        listen 8080;\n        deny ::ffff:10.0.0.0/104;\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n")
        #expect(result.diagnostics.map(\.description) == [
            "rules.conf:4:14: warning: ::ffff:10.0.0.0/104 is an IPv4-mapped block: Portcullis applies it to IPv4 clients in 10.0.0.0/8 too (nginx would skip it for them)",
        ])
        let snapshot = try #require(result.snapshot)
        #expect(snapshot.servers[0].access.evaluate(.v4(0x0A01_0101)).allowed == false)
    }

    @Test func everyErrorIsReported() {
        let result = load("""
            allow all;
            stream {
                server {
                    listen 8080 reuse_port;
                    alow 10.0.0.0/8;
                    deny 300.0.0.0/8;
                    proxy_timeout 5parsecs;
                    proxy_pass 127.0.0.1:9000;
                }
                server {
                    listen 8081;
                    tcp_nodelay yes;
                    proxy_pass nowhere;
                }
            }
            """)
        #expect(result.diagnostics.map(\.description) == [
            "rules.conf:1:1: error: \"allow\" directive is not allowed in main context; it belongs in: server, stream",
            "rules.conf:4:21: error: invalid parameter \"reuse_port\" in \"listen\"; did you mean \"reuseport\"?",
            "rules.conf:5:9: error: unknown directive \"alow\"; did you mean \"allow\"?",
            "rules.conf:6:14: error: invalid address or CIDR \"300.0.0.0/8\" in \"deny\"; expected an IPv4 or IPv6 address, a block such as 10.0.0.0/8 or 2001:db8::/32, or \"all\"",
            "rules.conf:7:23: error: invalid time \"5parsecs\" in \"proxy_timeout\"; expected a time such as 500ms, 30s, 10m or 1m30s",
            "rules.conf:12:21: error: invalid value \"yes\" in \"tcp_nodelay\"; it must be \"on\" or \"off\"",
            "rules.conf:13:20: error: unknown upstream \"nowhere\" in \"proxy_pass\"; expected the name of an upstream block or HOST:PORT",
        ])
        #expect(result.snapshot == nil)
    }

    @Test func noStreamBlock() {
        let result = load("worker_processes 1;\n")
        #expect(result.rendered == "rules.conf:1:1: error: no \"stream\" block is defined: there is nothing to listen on\nworker_processes 1;\n^")
        #expect(result.snapshot == nil)
    }

    @Test func syntaxErrorRendersWithSource() {
        let result = load("stream {\n    server { listen 8080; proxy_pass 127.0.0.1:9000; }\n}\nworker_processes 2")
        // The complete stream block before the error is still compiled: no follow-on errors.
        #expect(result.rendered == "rules.conf:4:1: error: unexpected end of file, expecting \";\" or \"}\" after the directive \"worker_processes\"\nworker_processes 2\n^~~~~~~~~~~~~~~~")
        #expect(result.snapshot == nil)
    }

    @Test func tabsAreKeptInTheCaretLine() {
        let result = load("stream {\n\tserver {\n\t\tlisten 8080;\n\t\talow all;\n\t\tproxy_pass 127.0.0.1:9000;\n\t}\n}\n")
        #expect(result.rendered == "rules.conf:4:3: error: unknown directive \"alow\"; did you mean \"allow\"?\n\t\talow all;\n\t\t^~~~")
    }
}

@Suite struct CompilerSemanticsTests {
    func compile(_ text: String) throws -> PolicySnapshot {
        let result = load(text)
        #expect(!result.hasErrors, "\(result.rendered)")
        return try #require(result.snapshot)
    }

    func server(_ snapshot: PolicySnapshot, port: UInt16) throws -> ServerPolicy {
        try #require(snapshot.servers.first { $0.listens.contains { $0.port == port } })
    }

    @Test func accessRulesInheritedOnlyByServersWithoutTheirOwn() throws {
        let snapshot = try compile("""
            stream {
                allow 10.0.0.0/8;
                deny all;
                server { listen 1001; proxy_pass 127.0.0.1:9000; }
                server { listen 1002; deny 10.1.0.0/16; proxy_pass 127.0.0.1:9000; }
            }
            """)
        let inherited = try server(snapshot, port: 1001)
        #expect(inherited.access.rules.map(\.reference.text) == ["allow 10.0.0.0/8;", "deny all;"])
        #expect(inherited.access.evaluate(.v4(0x0B00_0001)).allowed == false)
        #expect(inherited.access.evaluate(.v4(0x0A01_0001)).allowed)
        let own = try server(snapshot, port: 1002)
        #expect(own.access.rules.map(\.reference.text) == ["deny 10.1.0.0/16;"])
        #expect(own.access.evaluate(.v4(0x0B00_0001)).allowed)  // stream's "deny all" not inherited
        #expect(own.access.evaluate(.v4(0x0A01_0001)).allowed == false)
        #expect(own.access.rules[0].reference.line == 5)
    }

    @Test func accessLogsInheritedAndOff() throws {
        let snapshot = try compile("""
            stream {
                log_format short "$remote_addr $status";
                access_log /tmp/pc-stream.log short;
                server { listen 1001; proxy_pass 127.0.0.1:9000; }
                server { listen 1002; access_log off; proxy_pass 127.0.0.1:9000; }
                server { listen 1003; access_log /tmp/pc-own.log; proxy_pass 127.0.0.1:9000; }
            }
            """)
        let a = try server(snapshot, port: 1001)
        #expect(a.accessLogs.map(\.path) == ["/tmp/pc-stream.log"])
        #expect(a.accessLogs.first?.format.name == "short")
        #expect(try server(snapshot, port: 1002).accessLogs.isEmpty)
        let c = try server(snapshot, port: 1003)
        #expect(c.accessLogs.map(\.path) == ["/tmp/pc-own.log"])
        #expect(c.accessLogs.first?.format == LogFormat.basic)
        #expect(snapshot.logPaths == ["/tmp/pc-stream.log", "/tmp/pc-own.log"])

        let off = try compile("""
            stream {
                access_log /tmp/pc-stream.log;
                access_log off;
                server { listen 1001; proxy_pass 127.0.0.1:9000; }
            }
            """)
        #expect(off.servers[0].accessLogs.isEmpty)
    }

    /// Issue #13 point 7: `access_log … buffer= flush= gzip[=level]`, with nginx's rules and errors.
    @Test func accessLogBufferAndGzip() throws {
        let snapshot = try compile("""
            stream {
                log_format short "$remote_addr $status";
                access_log /tmp/pc-plain.log short;
                access_log /tmp/pc-gz.log.gz short gzip flush=5s;
                server { listen 1001; access_log /tmp/pc-buf.log short buffer=32k; proxy_pass 127.0.0.1:9000; }
                server { listen 1002; access_log /tmp/pc-gz9.log.gz short buffer=8k gzip=9; proxy_pass 127.0.0.1:9000; }
            }
            """)
        #expect(snapshot.logBuffers["/tmp/pc-plain.log"] == nil)
        // gzip without buffer= buffers 64k, and a bare gzip is level 1, as nginx.
        #expect(snapshot.logBuffers["/tmp/pc-gz.log.gz"] == LogBuffer(size: 65_536, flushMilliseconds: 5_000, gzipLevel: 1))
        #expect(snapshot.logBuffers["/tmp/pc-buf.log"] == LogBuffer(size: 32_768))
        #expect(snapshot.logBuffers["/tmp/pc-gz9.log.gz"] == LogBuffer(size: 8_192, gzipLevel: 9))

        func errors(_ directives: String) -> [String] {
            let result = RuleLoader.load(text: "stream {\n    log_format short \"$status\";\n    server {\n        listen 1;\n        \(directives)\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
                                         file: "rules.conf", resolver: StubResolver())
            return result.diagnostics.map { "\($0.location.map { "\($0.line):\($0.column)" } ?? "?") \($0.message)" }
        }
        #expect(errors("access_log /tmp/a short gzip=0;") == ["5:33 invalid compression level \"0\" in \"access_log\"; expected 1 to 9"])
        #expect(errors("access_log /tmp/a short gzip=10;") == ["5:33 invalid compression level \"10\" in \"access_log\"; expected 1 to 9"])
        #expect(errors("access_log /tmp/a short buffer=0;") == ["5:33 invalid buffer size \"0\" in \"access_log\"; expected a size such as 64k"])
        #expect(errors("access_log /tmp/a short flush=0s buffer=1k;") == ["5:33 invalid flush time \"0s\" in \"access_log\"; expected a time such as 5s"])
        #expect(errors("access_log /tmp/a short flush=1s;") == ["5:20 no buffer is defined for access_log \"/tmp/a\"; \"flush=\" needs \"buffer=\" or \"gzip\""])
        #expect(errors("access_log /tmp/a short gzip; access_log /tmp/a short gzip=2;") == [
            "5:50 access_log \"/tmp/a\" already defined with conflicting parameters (buffer=, flush=, gzip must be the same for one file)",
        ])
        // The same parameters twice, or one buffered and one plain line for the same file, are fine (nginx).
        #expect(errors("access_log /tmp/a short gzip; access_log /tmp/a short buffer=64k gzip=1;").isEmpty)
        #expect(errors("access_log /tmp/a short gzip; access_log /tmp/a short;").isEmpty)
    }

    /// Issue #13 point 6: `proxy_bind`, its forms and nginx's errors (nginx 1.22's `nginx -t`).
    @Test func proxyBindForms() throws {
        let snapshot = try compile("""
            stream {
                proxy_bind 127.0.0.2;
                server { listen 1001; proxy_pass 127.0.0.1:9000; }
                server { listen 1002; proxy_bind [2001:db8::1]:5555 transparent; proxy_pass 127.0.0.1:9000; }
                server { listen 1003; proxy_bind off; proxy_pass 127.0.0.1:9000; }
                server { listen 1004; proxy_bind $remote_addr transparent; proxy_pass 127.0.0.1:9000; }
                server { listen 1005; proxy_bind ::1:5555; proxy_pass 127.0.0.1:9000; }
            }
            """)
        #expect(try server(snapshot, port: 1001).proxy.bind == ProxyBind(address: .fixed(SocketEndpoint.local("127.0.0.2")!), transparent: false))
        let b = try server(snapshot, port: 1002).proxy.bind
        #expect(b?.transparent == true)
        #expect(b?.address == .fixed(SocketEndpoint(address: IPAddress("2001:db8::1")!, port: 5555)))
        #expect(try server(snapshot, port: 1003).proxy.bind == nil, "off cancels the inherited one")
        if case .variable? = try server(snapshot, port: 1004).proxy.bind?.address {} else { Issue.record("a variable") }
        // As nginx: "::1:5555" is the IPv6 address ::1:5555, not ::1 port 5555.
        #expect(try server(snapshot, port: 1005).proxy.bind?.address == .fixed(SocketEndpoint(address: IPAddress("::1:5555")!, port: 0)))

        func errors(_ directive: String) -> [String] {
            let result = RuleLoader.load(text: "stream {\n    server {\n        listen 1;\n        \(directive)\n        proxy_pass 127.0.0.1:9000;\n    }\n}\n",
                                         file: "rules.conf", resolver: StubResolver())
            return result.diagnostics.map { "\($0.location.map { "\($0.line):\($0.column)" } ?? "?") \($0.message)" }
        }
        let expected = "; expected an IP address such as 192.0.2.1 or [2001:db8::1]:5000, a variable, or \"off\""
        for bad in ["foo", "localhost", "300.1.1.1", "unix:/x", "[::1]", "127.0.0.2:0", "127.0.0.2:99999", "127.0.0.1/8"] {
            #expect(errors("proxy_bind \(bad);") == ["4:20 invalid address \"\(bad)\" in \"proxy_bind\"" + expected])
        }
        #expect(errors("proxy_bind off transparent;") == ["4:20 invalid address \"off\" in \"proxy_bind\"" + expected])
        #expect(errors("proxy_bind 127.0.0.2 bogus;") == ["4:30 invalid parameter \"bogus\" in \"proxy_bind\"; expected \"transparent\""])
        #expect(errors("proxy_bind 127.0.0.2; proxy_bind 127.0.0.3;").first?.contains("\"proxy_bind\" directive is duplicate") == true)
    }

    /// Issue #13 point 5: `unix:` in listen, proxy_pass, upstream servers, allow/deny and
    /// set_real_ip_from, with nginx's errors.
    @Test func unixSockets() throws {
        let snapshot = try compile("""
            stream {
                upstream u { server unix:/run/a.sock weight=2; server 127.0.0.1:9000; }
                server { listen unix:/run/gw.sock; allow unix:; deny all; set_real_ip_from unix:; proxy_pass u; }
                server { listen unix:/run/gw-dgram.sock udp; proxy_pass unix:/run/dns.sock; }
            }
            """)
        let a = snapshot.servers[0]
        #expect(a.listens.map(\.endpoint) == [SocketEndpoint(unixPath: "/run/gw.sock")])
        #expect(a.access.rules.first?.match == .unix)
        #expect(a.realIPFrom.trusts(SocketEndpoint(unixPath: "")))
        #expect(snapshot.upstreams["u"]?.servers.first?.endpoint == SocketEndpoint(unixPath: "/run/a.sock"))
        #expect(snapshot.servers[1].upstream?.servers.first?.endpoint == SocketEndpoint(unixPath: "/run/dns.sock"))

        func errors(_ text: String) -> [String] {
            RuleLoader.load(text: text, file: "rules.conf", resolver: StubResolver()).diagnostics
                .map { "\($0.location.map { "\($0.line):\($0.column)" } ?? "?") \($0.message)" }
        }
        let long = "unix:/" + String(repeating: "a", count: 107)
        #expect(errors("stream { server { listen unix:; return x; } }") == [
            "1:26 no path in the unix domain socket in \"unix:\" of the \"listen\" directive"])
        #expect(errors("stream { server { listen \(long); return x; } }") == [
            "1:26 too long path in the unix domain socket in \"\(long)\" of the \"listen\" directive; at most 107 bytes"])
        #expect(errors("stream { server { listen 1; proxy_pass unix:; } }") == [
            "1:40 no path in the unix domain socket in \"unix:\" of \"proxy_pass\""])
        #expect(errors("stream { server { listen 1; allow unix:/x; return x; } }") == [
            "1:35 invalid parameter \"unix:/x\" in \"allow\"; \"unix:\" alone means clients on unix-domain sockets (no path)"])
        // One socket file cannot be a stream and a datagram listener at once.
        #expect(errors("stream { server { listen unix:/run/x.sock; return x; } server { listen unix:/run/x.sock udp; return y; } }")
            .first?.contains("duplicate listen unix:/run/x.sock") == true)
    }

    @Test func proxySettingsInheritedAndOverridden() throws {
        let snapshot = try compile("""
            stream {
                proxy_connect_timeout 5s;
                proxy_timeout 1m30s;
                tcp_nodelay off;
                proxy_buffer_size 4k;
                server { listen 1001; proxy_pass 127.0.0.1:9000; }
                server {
                    listen 1002;
                    proxy_timeout 500ms;
                    proxy_half_close on;
                    proxy_next_upstream_tries 3;
                    proxy_pass 127.0.0.1:9000;
                }
            }
            """)
        let a = try server(snapshot, port: 1001).proxy
        #expect(a.connectTimeoutMilliseconds == 5_000)
        #expect(a.idleTimeoutMilliseconds == 90_000)
        #expect(a.tcpNoDelay == false)
        #expect(a.bufferSize == 4096)
        #expect(a.halfClose == false)
        let b = try server(snapshot, port: 1002).proxy
        #expect(b.connectTimeoutMilliseconds == 5_000)
        #expect(b.idleTimeoutMilliseconds == 500)
        #expect(b.halfClose)
        #expect(b.tcpNoDelay == false)
        #expect(b.nextUpstreamTries == 3)
        // nginx defaults when nothing is set.
        let defaults = ProxySettings()
        #expect(defaults.connectTimeoutMilliseconds == 60_000)
        #expect(defaults.idleTimeoutMilliseconds == 600_000)
        #expect(defaults.tcpNoDelay)
    }

    @Test func upstreamParameters() throws {
        let snapshot = try compile("""
            stream {
                upstream pool {
                    zone pool 64k;
                    server 10.0.0.1:80 weight=5 max_fails=3 fail_timeout=30s;
                    server 10.0.0.2:80 backup;
                    server 10.0.0.3:80 down;
                    server localhost:81;
                }
                server { listen 1001; proxy_pass pool; }
            }
            """)
        let group = try #require(snapshot.upstreams["pool"])
        #expect(snapshot.servers[0].upstream === group)
        #expect(group.servers.map(\.endpoint.description) == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "127.0.0.1:81"])
        #expect(group.servers.map(\.weight) == [5, 1, 1, 1])
        #expect(group.servers.map(\.maxFails) == [3, 1, 1, 1])
        #expect(group.servers.map(\.failTimeoutMilliseconds) == [30_000, 10_000, 10_000, 10_000])
        #expect(group.servers.map(\.backup) == [false, true, false, false])
        #expect(group.servers.map(\.down) == [false, false, true, false])
        #expect(group.servers[3].name == "localhost:81")
    }

    @Test func nginxMainContextIsAccepted() throws {
        let result = load("""
            user nobody nogroup;
            worker_processes auto;
            daemon off;
            master_process on;
            pid /run/p.pid;
            load_module modules/x.so;
            env TZ;
            events {
                worker_connections 1024;
            }
            stream {
                server { listen localhost:8080; proxy_pass localhost:9000; }
            }
            """)
        #expect(result.diagnostics.map(\.description) == [
            "rules.conf:6:1: note: \"load_module\" is ignored: every stream feature Portcullis has is built in",
            "rules.conf:7:1: note: \"env\" is ignored: Portcullis keeps its environment as it is",
        ])
        let snapshot = try #require(result.snapshot)
        #expect(snapshot.main.workerProcesses == nil)
        #expect(snapshot.main.pidFile == "/run/p.pid")
        #expect(snapshot.main.user == "nobody")
        #expect(snapshot.main.group == "nogroup")
        #expect(snapshot.servers[0].listens[0].endpoint.description == "127.0.0.1:8080")
        #expect(snapshot.servers[0].upstream?.servers[0].endpoint.description == "127.0.0.1:9000")

        let counted = try compile("worker_processes 4;\nstream { server { listen 1; proxy_pass 127.0.0.1:2; } }")
        #expect(counted.main.workerProcesses == 4)
    }

    @Test func listenForms() throws {
        let snapshot = try compile("""
            stream {
                server {
                    listen 1001;
                    listen *:1002 reuseport backlog=64;
                    listen [::1]:1003 ipv6only=off so_keepalive=30m::10;
                    listen 127.0.0.1:1004;
                    proxy_pass 127.0.0.1:9000;
                }
            }
            """)
        let listens = snapshot.servers[0].listens
        #expect(listens.map(\.description) == ["0.0.0.0:1001", "0.0.0.0:1002", "[::1]:1003", "127.0.0.1:1004"])
        #expect(listens.map(\.reusePort) == [false, true, false, false])
        #expect(listens.map(\.backlog) == [511, 64, 511, 511])
        #expect(listens[2].ipv6Only == false)
        #expect(listens[2].keepalive == .tuned(idle: 1800, interval: nil, count: 10))
        #expect(listens[0].location == SourceLocation(file: "rules.conf", line: 3, column: 16))
    }
}
