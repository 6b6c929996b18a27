import Testing
import PortcullisCore
import PortcullisRules
@testable import PortcullisPolicy

/// The PROXY protocol directives: what compiles to what, and the located errors.
@Suite struct ProxyProtocolCompilerTests {
    static func server(_ body: String) -> String {
        "stream {\n    server {\n        listen 127.0.0.1:8080 proxy_protocol;\n\(body)        proxy_pass 127.0.0.1:9000;\n    }\n}\n"
    }

    /// Two servers: the first inherits the stream-level settings, the second sets its own.
    static func twoServers(secondServer: String) -> String {
        """
        stream {
            set_real_ip_from 10.0.0.0/8;
            proxy_protocol v2;
            proxy_protocol_tlv authority "example.com";
            proxy_protocol_timeout 3s;
            server { listen 127.0.0.1:8080 proxy_protocol; proxy_pass 127.0.0.1:9000; }
            server {
                listen 127.0.0.1:8081;
                set_real_ip_from 192.168.0.0/16;
        \(secondServer)
                proxy_pass 127.0.0.1:9000;
            }
        }
        """
    }

    @Test func settingsCompileAndInherit() throws {
        // The second server sends v1 with a TLV: that is an error (v1 carries no TLVs).
        let result = load(Self.twoServers(secondServer: """
                    proxy_protocol on;
                    proxy_protocol_tlv 0xE0 "c=$remote_addr";
            """))
        #expect(result.diagnostics.map(\.description) == [
            "rules.conf:11:9: error: \"proxy_protocol_tlv\" needs \"proxy_protocol v2\" (v1 headers carry no TLVs); this server sends v1",
        ])
        let fixed = load(Self.twoServers(secondServer: """
                    proxy_protocol_tlv 0xE0 "c=$remote_addr";
                    proxy_protocol_crc32c on;
            """))
        let snapshot = try #require(fixed.snapshot, "\(fixed.rendered)")
        let (first, second) = (snapshot.servers[0], snapshot.servers[1])
        #expect(first.listens[0].proxyProtocol)
        #expect(!second.listens[0].proxyProtocol)
        #expect(first.proxy.sendProxyProtocol == .v2)
        #expect(first.proxy.proxyProtocolTimeoutMilliseconds == 3000)
        // Lists are inherited only by a server with none of its own.
        #expect(first.proxy.proxyProtocolTLVs.map(\.type) == [0x02])
        #expect(second.proxy.proxyProtocolTLVs.map(\.type) == [0xE0])
        #expect(first.realIPFrom.trusts(.v4(0x0A01_0203)))
        #expect(!first.realIPFrom.trusts(.v4(0xC0A8_0001)))
        #expect(second.realIPFrom.trusts(.v4(0xC0A8_0001)))
        #expect(!second.realIPFrom.trusts(.v4(0x0A01_0203)))
        // An IPv4-mapped peer is the same peer.
        #expect(second.realIPFrom.trusts(IPAddress("::ffff:192.168.3.4")!))
        #expect(second.proxy.proxyProtocolCRC32C)
    }

    @Test(arguments: [
        ("        proxy_protocol v3;\n",
         "rules.conf:4:24: error: invalid value \"v3\" in \"proxy_protocol\"; it must be \"on\", \"off\", \"v1\" or \"v2\""),
        ("        proxy_protocol v2;\n        proxy_protocol_tlv autority x;\n",
         "rules.conf:5:28: error: invalid TLV type \"autority\" in \"proxy_protocol_tlv\"; expected a name (alpn, authority, unique_id, netns, noop) or a number such as 0xE0; did you mean \"authority\"?"),
        ("        proxy_protocol v2;\n        proxy_protocol_tlv +5 x;\n",
         "rules.conf:5:28: error: invalid TLV type \"+5\" in \"proxy_protocol_tlv\"; expected a name (alpn, authority, unique_id, netns, noop) or a number such as 0xE0"),
        ("        proxy_protocol v2;\n        proxy_protocol_tlv crc32c x;\n",
         "rules.conf:5:28: error: the CRC32C TLV is computed, not configured: use \"proxy_protocol_crc32c on\""),
        ("        proxy_protocol v2;\n        proxy_protocol_tlv 0x26 x;\n",
         "rules.conf:5:28: error: SSL TLVs are not configured: a server with \"listen … ssl\" sends them from its handshake (version, CN, cipher, signature and key algorithms)"),
        ("        proxy_protocol_crc32c on;\n",
         "rules.conf:4:9: error: \"proxy_protocol_crc32c\" needs \"proxy_protocol v2\" (v1 headers carry no TLVs); this server sends no header"),
        ("        set_real_ip_from 10.0.0.300;\n",
         "rules.conf:4:26: error: invalid address or CIDR \"10.0.0.300\" in \"set_real_ip_from\"; expected an IPv4 or IPv6 address, a block such as 10.0.0.0/8 or 2001:db8::/32, or a host name"),
        ("        proxy_protocol v2;\n        proxy_protocol_tlv 0xE1 \"$proxy_protocol_tlv_autority\";\n",
         "rules.conf:5:34: error: unknown variable \"$proxy_protocol_tlv_autority\" in \"proxy_protocol_tlv\"; did you mean \"$proxy_protocol_tlv_authority\"?"),
    ])
    func locatedErrors(body: String, expected: String) {
        let result = load(Self.server(body))
        #expect(result.diagnostics.map(\.description) == [expected])
        #expect(result.snapshot == nil)
    }

    @Test func tlvVariablesParse() throws {
        #expect(Variable(name: "proxy_protocol_tlv_0xe7") == .proxyProtocolTLV(0xE7))
        #expect(Variable(name: "proxy_protocol_tlv_unique_id") == .proxyProtocolTLV(0x05))
        #expect(Variable(name: "proxy_protocol_tlv_ssl_cn") == .proxyProtocolSSLSubTLV(0x22))
        #expect(Variable(name: "proxy_protocol_tlv_0x1") == nil)
        #expect(Variable(name: "proxy_protocol_tlv_bogus") == nil)
    }
}
