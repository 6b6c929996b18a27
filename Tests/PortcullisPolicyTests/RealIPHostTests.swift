import Testing
import PortcullisCore
import PortcullisRules
@testable import PortcullisPolicy

/// `set_real_ip_from HOST`: resolved once at load, every address trusted (as nginx).
@Suite struct RealIPHostTests {
    private struct Resolver: HostResolver {
        func addresses(of host: String) -> [IPAddress] {
            host == "lb.example" ? [IPAddress("10.1.1.1")!, IPAddress("2001:db8::1")!] : []
        }
    }

    static func load(_ realIP: String) -> CompileResult {
        RuleLoader.load(text: """
            stream {
                server {
                    listen 8080 proxy_protocol;
                    \(realIP)
                    proxy_pass 127.0.0.1:9000;
                }
            }
            """, file: "rules.conf", resolver: Resolver())
    }

    @Test("a host name is trusted by every address it has, and by nothing else; one that does not resolve is nginx's located error")
    func hostName() throws {
        let result = Self.load("set_real_ip_from lb.example; set_real_ip_from 192.0.2.0/24;")
        let snapshot = try #require(result.snapshot, "\(result.rendered)")
        let trusted = snapshot.servers[0].realIPFrom
        #expect(trusted.trusts(IPAddress("10.1.1.1")!) && trusted.trusts(IPAddress("2001:db8::1")!))
        #expect(trusted.trusts(IPAddress("192.0.2.9")!))
        #expect(!trusted.trusts(IPAddress("10.1.1.2")!) && !trusted.trusts(IPAddress("2001:db8::2")!))
        let missing = Self.load("set_real_ip_from nowhere.example;")
        #expect(missing.snapshot == nil)
        #expect(missing.diagnostics.map { "\($0.location.map { "\($0.line):\($0.column)" } ?? "?") \($0.message)" }
                == ["4:26 host not found in set_real_ip_from \"nowhere.example\""])
        // Not a host name: still the address error.
        #expect(Self.load("set_real_ip_from 10.0.0.0/33;").diagnostics.first?.message.contains("invalid address or CIDR") == true)
    }
}
